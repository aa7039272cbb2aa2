//! Every method and its typed parameters.
//!
//! Parameters are checked twice: serde rejects unknown and missing fields
//! and wrong types (`bad_request`), then [`Call::validate`] checks names
//! (`bad_name`) and values (`bad_request`) before the service sees them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::size::Size;
use super::{ApiError, ErrorCode};
use crate::config::{check_name, MAX_QUEUES};
use crate::vhost::config::ID_BYTES;

/// Sizes are in 512-byte sectors on the virtio-blk side.
const SECTOR: u64 = 512;

/// One request's method and parameters, as `{"method": …, "params": …}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params")]
pub enum Call {
    #[serde(rename = "image.import")]
    ImageImport(ImageImport),
    #[serde(rename = "image.fetch")]
    ImageFetch(ImageFetch),
    #[serde(rename = "image.list")]
    ImageList(NoParams),
    #[serde(rename = "image.show")]
    ImageShow(ImageRef),
    #[serde(rename = "image.remove")]
    ImageRemove(ImageRef),
    #[serde(rename = "volume.create")]
    VolumeCreate(VolumeCreate),
    #[serde(rename = "volume.list")]
    VolumeList(NoParams),
    #[serde(rename = "volume.show")]
    VolumeShow(VolumeRef),
    #[serde(rename = "volume.delete")]
    VolumeDelete(VolumeRef),
    #[serde(rename = "volume.resize")]
    VolumeResize(VolumeResize),
    #[serde(rename = "volume.export_raw")]
    VolumeExportRaw(VolumeExportRaw),
    #[serde(rename = "export.start")]
    ExportStart(ExportStart),
    #[serde(rename = "export.stop")]
    ExportStop(ExportRef),
    #[serde(rename = "export.list")]
    ExportList(NoParams),
    #[serde(rename = "pool.set")]
    PoolSet(PoolSet),
    #[serde(rename = "pool.unset")]
    PoolUnset(PoolRef),
    #[serde(rename = "pool.show")]
    PoolShow(PoolRef),
    #[serde(rename = "pool.list")]
    PoolList(NoParams),
    /// Answered by the server from [`Service::metrics`](crate::control::Service::metrics).
    #[serde(rename = "stats")]
    Stats(NoParams),
    /// Answered by the server: the connection becomes an event stream.
    #[serde(rename = "watch")]
    Watch(NoParams),
    /// Answered by the server.
    #[serde(rename = "version")]
    Version(NoParams),
}

/// `{}`: methods without parameters still refuse unknown ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    /// An absolute path on the daemon's host.
    pub file: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageFetch {
    /// http://, https:// or file:// URL.
    pub url: String,
    /// The expected sha256 of the image, 64 hex digits.
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// An image by name or by digest (`sha256:<hex>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    pub image: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    /// The base image; without it the volume starts empty and `size` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Defaults to the image's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    /// An independent full copy of the image instead of an overlay.
    #[serde(default)]
    pub full: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeRef {
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    pub name: String,
    pub size: Size,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeExportRaw {
    pub name: String,
    /// An absolute path on the daemon's host.
    pub file: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportStart {
    pub volume: String,
    /// Absolute; the daemon chooses one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u16>,
    #[serde(default)]
    pub readonly: bool,
    /// The GET_ID serial, at most 20 printable ASCII bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRef {
    pub volume: String,
}

/// Keep ready full copies of `image`: `copies` of them, or as many as the
/// priority's rule says when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSet {
    pub image: String,
    /// 1 (least important) to 10.
    pub priority: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copies: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolRef {
    pub image: String,
}

impl Call {
    /// Every method name, as on the wire.
    pub const METHODS: &'static [&'static str] = &[
        "image.import",
        "image.fetch",
        "image.list",
        "image.show",
        "image.remove",
        "volume.create",
        "volume.list",
        "volume.show",
        "volume.delete",
        "volume.resize",
        "volume.export_raw",
        "export.start",
        "export.stop",
        "export.list",
        "pool.set",
        "pool.unset",
        "pool.show",
        "pool.list",
        "stats",
        "watch",
        "version",
    ];

    pub fn method(&self) -> &'static str {
        match self {
            Call::ImageImport(_) => "image.import",
            Call::ImageFetch(_) => "image.fetch",
            Call::ImageList(_) => "image.list",
            Call::ImageShow(_) => "image.show",
            Call::ImageRemove(_) => "image.remove",
            Call::VolumeCreate(_) => "volume.create",
            Call::VolumeList(_) => "volume.list",
            Call::VolumeShow(_) => "volume.show",
            Call::VolumeDelete(_) => "volume.delete",
            Call::VolumeResize(_) => "volume.resize",
            Call::VolumeExportRaw(_) => "volume.export_raw",
            Call::ExportStart(_) => "export.start",
            Call::ExportStop(_) => "export.stop",
            Call::ExportList(_) => "export.list",
            Call::PoolSet(_) => "pool.set",
            Call::PoolUnset(_) => "pool.unset",
            Call::PoolShow(_) => "pool.show",
            Call::PoolList(_) => "pool.list",
            Call::Stats(_) => "stats",
            Call::Watch(_) => "watch",
            Call::Version(_) => "version",
        }
    }

    /// Checks what serde cannot: names, paths and ranges.
    pub fn validate(&self) -> Result<(), ApiError> {
        match self {
            Call::ImageImport(p) => {
                absolute("file", &p.file)?;
                opt_name("name", p.name.as_deref())
            }
            Call::ImageFetch(p) => {
                if p.url.is_empty() {
                    return Err(bad_request("`url` is empty"));
                }
                if p.sha256.len() != 64 || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad_request("`sha256` must be 64 hex digits"));
                }
                opt_name("name", p.name.as_deref())
            }
            Call::ImageShow(p) | Call::ImageRemove(p) => name("image", &p.image),
            Call::VolumeCreate(p) => {
                name("name", &p.name)?;
                opt_name("image", p.image.as_deref())?;
                if p.full && p.image.is_none() {
                    return Err(bad_request("`full` needs an `image` to copy"));
                }
                match p.size {
                    Some(s) => sectors("size", s),
                    None if p.image.is_none() => {
                        Err(bad_request("give an `image`, a `size`, or both"))
                    }
                    None => Ok(()),
                }
            }
            Call::VolumeShow(p) | Call::VolumeDelete(p) => name("name", &p.name),
            Call::VolumeResize(p) => {
                name("name", &p.name)?;
                sectors("size", p.size)
            }
            Call::VolumeExportRaw(p) => {
                name("name", &p.name)?;
                absolute("file", &p.file)
            }
            Call::ExportStart(p) => {
                name("volume", &p.volume)?;
                if let Some(s) = &p.socket {
                    absolute("socket", s)?;
                }
                if let Some(q) = p.queues {
                    if !(1..=MAX_QUEUES).contains(&q) {
                        return Err(bad_request(format!("`queues` must be 1 to {MAX_QUEUES}")));
                    }
                }
                match &p.serial {
                    Some(s) if s.len() > ID_BYTES => {
                        Err(bad_request(format!("`serial` is at most {ID_BYTES} bytes")))
                    }
                    Some(s) if s.bytes().any(|b| !(0x20..0x7f).contains(&b)) => {
                        Err(bad_request("`serial` is printable ASCII only"))
                    }
                    _ => Ok(()),
                }
            }
            Call::ExportStop(p) => name("volume", &p.volume),
            Call::PoolSet(p) => {
                name("image", &p.image)?;
                if !(1..=10).contains(&p.priority) {
                    return Err(bad_request(format!(
                        "`priority` goes from 1 (least important) to 10, not {}",
                        p.priority
                    )));
                }
                match p.copies {
                    Some(c) if c > 64 => {
                        Err(bad_request(format!("`copies` is at most 64, not {c}")))
                    }
                    _ => Ok(()),
                }
            }
            Call::PoolUnset(p) | Call::PoolShow(p) => name("image", &p.image),
            Call::ImageList(_)
            | Call::PoolList(_)
            | Call::VolumeList(_)
            | Call::ExportList(_)
            | Call::Stats(_)
            | Call::Watch(_)
            | Call::Version(_) => Ok(()),
        }
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

fn name(field: &str, value: &str) -> Result<(), ApiError> {
    check_name(value)
        .map_err(|why| ApiError::new(ErrorCode::BadName, format!("`{field}` {value:?}: {why}")))
}

fn opt_name(field: &str, value: Option<&str>) -> Result<(), ApiError> {
    value.map_or(Ok(()), |v| name(field, v))
}

fn absolute(field: &str, path: &Path) -> Result<(), ApiError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(bad_request(format!(
            "`{field}` must be an absolute path, not {}",
            path.display()
        )))
    }
}

fn sectors(field: &str, size: Size) -> Result<(), ApiError> {
    if size.0 == 0 || !size.0.is_multiple_of(SECTOR) {
        return Err(bad_request(format!(
            "`{field}` must be a non-zero multiple of {SECTOR} bytes, not {}",
            size.0
        )));
    }
    Ok(())
}
