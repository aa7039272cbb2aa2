//! The rows the catalog keeps, as plain Rust values.

use std::path::PathBuf;

/// A read-only master image in the cache, addressed by its sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// 64 lowercase hex characters: the sha256 of the raw content.
    pub digest: String,
    /// Size of the raw content in bytes.
    pub size: u64,
    /// Format of the cached file; `raw` for every image the cache makes.
    pub format: String,
    /// The file path or URL the image came from.
    pub source: String,
    /// Unix seconds.
    pub created: i64,
    /// Names pointing to this image, sorted.
    pub names: Vec<String>,
}

/// How a volume's data relates to an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeKind {
    /// No base: reads of unwritten ranges return zeros.
    Empty,
    /// A copy-on-write overlay that reads through to its base image.
    Overlay,
    /// An independent full copy of its base image.
    Full,
}

impl VolumeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeKind::Empty => "empty",
            VolumeKind::Overlay => "overlay",
            VolumeKind::Full => "full",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "empty" => Some(VolumeKind::Empty),
            "overlay" => Some(VolumeKind::Overlay),
            "full" => Some(VolumeKind::Full),
            _ => None,
        }
    }
}

/// Whether a volume is complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeState {
    /// Recorded before its files are made; rolled back at daemon start if
    /// it is still in this state.
    Creating,
    /// Complete and servable.
    Ready,
}

impl VolumeState {
    pub fn as_str(self) -> &'static str {
        match self {
            VolumeState::Creating => "creating",
            VolumeState::Ready => "ready",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "creating" => Some(VolumeState::Creating),
            "ready" => Some(VolumeState::Ready),
            _ => None,
        }
    }
}

/// A VM disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeRecord {
    pub name: String,
    pub kind: VolumeKind,
    /// The image digest it was made from; `None` exactly when `kind` is
    /// `Empty`.
    pub base: Option<String>,
    /// Size the guest sees, in bytes.
    pub size: u64,
    /// The volume's data file.
    pub path: PathBuf,
    pub state: VolumeState,
    /// Unix seconds.
    pub created: i64,
}

/// A volume served on a vhost-user-blk socket; kept so that exports come
/// back after a restart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportRecord {
    pub volume: String,
    pub socket: PathBuf,
    pub queues: u16,
    pub readonly: bool,
    pub serial: Option<String>,
}
