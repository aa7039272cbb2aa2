//! qcow2 input: recognised by its magic and converted to raw with
//! `qemu-img convert`.
//!
//! Only self-contained qcow2 files are accepted: a backing file or an
//! external data file would make qemu-img read another path on this host,
//! named by the (possibly downloaded) image itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use super::files::io_err;
use super::CacheError;

/// The first four bytes of every qcow2 file.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// The header fields read here end with `incompatible_features` (v3) at
/// bytes 72..80.
const HEADER_LEN: usize = 80;
/// qcow2 v3 incompatible feature bit: the data lives in an external file.
const EXTERNAL_DATA_FILE: u64 = 1 << 2;

/// Whether `file` starts with the qcow2 magic.
pub(super) fn is_qcow2(file: &File, path: &Path) -> Result<bool, CacheError> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(magic == QCOW2_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io_err("read", path, e)),
    }
}

fn be64(h: &[u8; HEADER_LEN], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[at..at + 8]);
    u64::from_be_bytes(b)
}

fn be32(h: &[u8; HEADER_LEN], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&h[at..at + 4]);
    u32::from_be_bytes(b)
}

/// Refuse qcow2 files that refer to other files.
pub(super) fn check_self_contained(file: &File, path: &Path) -> Result<(), CacheError> {
    let unsupported = |why| CacheError::Qcow2Unsupported {
        path: path.to_path_buf(),
        why,
    };
    let mut h = [0u8; HEADER_LEN];
    file.read_exact_at(&mut h, 0)
        .map_err(|_| unsupported("has a truncated header"))?;
    let version = be32(&h, 4);
    if !(2..=3).contains(&version) {
        return Err(unsupported("has an unknown version"));
    }
    if be64(&h, 8) != 0 {
        return Err(unsupported(
            "has a backing file; flatten it first (qemu-img convert -O qcow2)",
        ));
    }
    if version >= 3 && be64(&h, 72) & EXTERNAL_DATA_FILE != 0 {
        return Err(unsupported("keeps its data in an external file"));
    }
    Ok(())
}

/// `qemu-img convert -f qcow2 -O raw src dst`; `dst` must not exist.
pub(super) fn convert(qemu_img: &Path, src: &Path, dst: &Path) -> Result<(), CacheError> {
    let out = Command::new(qemu_img)
        .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CacheError::Qcow2NeedsQemuImg {
                    path: src.to_path_buf(),
                }
            } else {
                io_err("run qemu-img for", src, e)
            }
        })?;
    if !out.status.success() {
        return Err(CacheError::QemuImg {
            path: src.to_path_buf(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
