//! Typed results. Clients ignore fields they do not know, so a newer
//! daemon may add fields without breaking an older vdiskctl.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::call::Call;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageFormat {
    #[default]
    Raw,
    Qcow2,
}

/// One cached image: read-only, content-addressed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// `sha256:<64 hex>`.
    pub digest: String,
    pub names: Vec<String>,
    /// Bytes of the image as a disk.
    pub size: u64,
    /// The format it arrived in (the cache keeps raw data).
    pub format: ImageFormat,
    /// The file or URL it came from.
    pub source: String,
    /// Unix time in milliseconds.
    pub created: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageList {
    pub images: Vec<ImageInfo>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeKind {
    /// Copy-on-write over a base image.
    #[default]
    Overlay,
    /// A plain file: an empty volume or a full copy.
    Raw,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeState {
    Creating,
    #[default]
    Ready,
    Deleting,
    Migrating,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    pub kind: VolumeKind,
    /// The base image's digest, for overlays.
    pub base: Option<String>,
    pub size: u64,
    pub allocated_bytes: u64,
    pub state: VolumeState,
    pub exported: bool,
    /// Made by claiming a ready copy from the pool (no data copied).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_pool: bool,
}

/// One image's ready copies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub digest: String,
    pub names: Vec<String>,
    pub priority: u8,
    /// Ready copies wanted.
    pub wanted: u32,
    /// `wanted` follows the priority rule (no explicit `copies`).
    pub by_rule: bool,
    pub ready: u32,
    pub making: u32,
    /// Bytes one copy takes (the image's size).
    pub bytes_each: u64,
    pub hits: u64,
    pub misses: u64,
    /// Unix time in milliseconds of the last claim.
    pub last_claim: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    pub entries: Vec<PoolInfo>,
    /// The rule giving the number of copies from the priority.
    pub rule: String,
    /// Free bytes on the pool's file system, and the reserve the filler
    /// keeps free (and evicts to restore).
    pub free_bytes: u64,
    pub reserve_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    pub volumes: Vec<VolumeInfo>,
}

/// The result of `volume.export_raw`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawExported {
    pub name: String,
    pub file: PathBuf,
    pub size: u64,
}

/// I/O counters since the export started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoCounters {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportInfo {
    pub volume: String,
    pub socket: PathBuf,
    pub queues: u16,
    pub readonly: bool,
    pub serial: Option<String>,
    /// A frontend (QEMU, cloud-hypervisor) is connected.
    pub connected: bool,
    pub stats: IoCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportList {
    pub exports: Vec<ExportInfo>,
}

/// One volume's figures: totals, and rates over the daemon's last
/// sampling interval.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStats {
    pub volume: String,
    #[serde(flatten)]
    pub io: IoCounters,
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_sec: f64,
    pub write_bytes_per_sec: f64,
    /// Request latency percentiles in microseconds; null when unmeasured.
    pub latency_p50_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
    /// Set once a flush of the volume's disk failed: why, and that every
    /// later flush fails until the export is restarted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_error: Option<String>,
}

/// The image cache's space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    /// Bytes the cache may use; `null` when no budget is set (the
    /// filesystem's free space is then the only limit).
    pub budget: Option<u64>,
    pub used_bytes: u64,
    pub images: u64,
    /// Free bytes on the cache's filesystem.
    pub fs_free_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsResult {
    pub volumes: Vec<VolumeStats>,
    pub cache: CacheStats,
    #[serde(default)]
    pub pool: PoolStats,
}

/// The ready copies, for `stats` and Prometheus.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStats {
    pub images: Vec<PoolImageStats>,
    /// Ready copies deleted to restore the reserve since vdiskd started.
    pub evictions: u64,
    /// Ready copies deleted because their entry wanted fewer.
    #[serde(default)]
    pub trimmed: u64,
    pub free_bytes: u64,
    pub reserve_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolImageStats {
    /// The image's first name, or its digest.
    pub image: String,
    pub ready: u32,
    pub wanted: u32,
    pub hits: u64,
    pub misses: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watching {
    pub watching: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub protocol: u32,
    pub vdisk: String,
}

/// `{}`: the call was done and has nothing to tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {}

/// What a call returns. On the wire it is the inner object alone: the
/// method of the request says which variant it is.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Response {
    Image(ImageInfo),
    Images(ImageList),
    Volume(VolumeInfo),
    Volumes(VolumeList),
    RawExported(RawExported),
    Export(ExportInfo),
    Exports(ExportList),
    Stats(StatsResult),
    Watching(Watching),
    Version(VersionInfo),
    Done(Done),
    Pool(PoolInfo),
    Pools(PoolList),
}

/// Which [`Response`] variant answers a method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Image,
    Images,
    Volume,
    Volumes,
    RawExported,
    Export,
    Exports,
    Stats,
    Watching,
    Version,
    Done,
    Pool,
    Pools,
}

impl Shape {
    pub fn of(call: &Call) -> Shape {
        match call {
            Call::ImageImport(_) | Call::ImageFetch(_) | Call::ImageShow(_) => Shape::Image,
            Call::ImageList(_) => Shape::Images,
            Call::ImageRemove(_)
            | Call::VolumeDelete(_)
            | Call::ExportStop(_)
            | Call::PoolUnset(_) => Shape::Done,
            Call::PoolSet(_) | Call::PoolShow(_) => Shape::Pool,
            Call::PoolList(_) => Shape::Pools,
            Call::VolumeCreate(_) | Call::VolumeShow(_) | Call::VolumeResize(_) => Shape::Volume,
            Call::VolumeList(_) => Shape::Volumes,
            Call::VolumeExportRaw(_) => Shape::RawExported,
            Call::ExportStart(_) => Shape::Export,
            Call::ExportList(_) => Shape::Exports,
            Call::Stats(_) => Shape::Stats,
            Call::Watch(_) => Shape::Watching,
            Call::Version(_) => Shape::Version,
        }
    }
}

impl Response {
    pub fn shape(&self) -> Shape {
        match self {
            Response::Image(_) => Shape::Image,
            Response::Images(_) => Shape::Images,
            Response::Volume(_) => Shape::Volume,
            Response::Volumes(_) => Shape::Volumes,
            Response::RawExported(_) => Shape::RawExported,
            Response::Export(_) => Shape::Export,
            Response::Exports(_) => Shape::Exports,
            Response::Stats(_) => Shape::Stats,
            Response::Watching(_) => Shape::Watching,
            Response::Version(_) => Shape::Version,
            Response::Done(_) => Shape::Done,
            Response::Pool(_) => Shape::Pool,
            Response::Pools(_) => Shape::Pools,
        }
    }

    /// Reads a reply's `result` as the type its method returns.
    pub fn decode(call: &Call, result: Value) -> Result<Response, serde_json::Error> {
        use serde_json::from_value as from;
        Ok(match Shape::of(call) {
            Shape::Image => Response::Image(from(result)?),
            Shape::Images => Response::Images(from(result)?),
            Shape::Volume => Response::Volume(from(result)?),
            Shape::Volumes => Response::Volumes(from(result)?),
            Shape::RawExported => Response::RawExported(from(result)?),
            Shape::Export => Response::Export(from(result)?),
            Shape::Exports => Response::Exports(from(result)?),
            Shape::Stats => Response::Stats(from(result)?),
            Shape::Watching => Response::Watching(from(result)?),
            Shape::Version => Response::Version(from(result)?),
            Shape::Done => Response::Done(from(result)?),
            Shape::Pool => Response::Pool(from(result)?),
            Shape::Pools => Response::Pools(from(result)?),
        })
    }
}
