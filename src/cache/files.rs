//! Small file helpers: unique temporary names that clean up after
//! themselves, directory fsync, allocated size.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::CacheError;

/// Makes temporary names unique within this process; the pid makes them
/// unique across processes.
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// A file under `images/tmp/` that is deleted when dropped unless it was
/// [`kept`](TempFile::keep) (renamed into the cache, or left for resume).
#[derive(Debug)]
pub(super) struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Create a new empty file `<dir>/<prefix>-<pid>-<n>`, mode 0600.
    pub(super) fn create(dir: &Path, prefix: &str) -> Result<(Self, File), CacheError> {
        loop {
            let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{prefix}-{}-{n}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => return Ok((TempFile { path, armed: true }, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => return Err(io_err("create", &path, source)),
            }
        }
    }

    /// A name in `dir` for a file someone else (qemu-img) creates.
    pub(super) fn reserve(dir: &Path, prefix: &str) -> Self {
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        TempFile {
            path: dir.join(format!("{prefix}-{}-{n}", std::process::id())),
            armed: true,
        }
    }

    /// Take charge of an existing file (a `.part`): it is deleted on drop
    /// unless kept.
    pub(super) fn adopt(path: PathBuf) -> Self {
        TempFile { path, armed: true }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Do not delete the file on drop.
    pub(super) fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove {}: {e}", self.path.display());
                }
            }
        }
    }
}

pub(super) fn io_err(op: &'static str, path: &Path, source: io::Error) -> CacheError {
    CacheError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Make a rename or unlink in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), CacheError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("fsync directory", dir, e))
}

/// Bytes the file occupies on disk (holes excluded).
pub(super) fn allocated(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks().saturating_mul(512))
}
