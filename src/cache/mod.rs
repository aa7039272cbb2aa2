//! The image cache: read-only master images, content-addressed by sha256.
//!
//! An image is the file `<state>/images/<sha256hex>` (mode 0444) plus its
//! catalog row. Work in progress lives in `<state>/images/tmp/`: a file
//! is written there, hashed as it is written, fsynced, renamed to its
//! digest name (atomic: the name appears with complete content or not at
//! all), the directory fsynced, and only then recorded in the catalog.
//! Removal goes the other way: the row first, then the file. So a crash
//! leaves at worst a file without a row, which `open` deletes, or a
//! temporary file, which `open` deletes too, except for `.part` files of
//! interrupted fetches, kept so that the next fetch resumes them.

mod fetch;
mod files;
mod qcow2;
mod scan;
mod source;

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::{self, Catalog, CatalogError, ImageRecord};

use files::{io_err, sync_dir, TempFile};

pub use qcow2::QCOW2_MAGIC;
pub use source::redact;

/// `progress(done, total)`: bytes processed so far and, when known, in all.
pub type Progress<'a> = &'a dyn Fn(u64, Option<u64>);

/// The directory under the state directory that holds the images.
pub const IMAGES_DIR: &str = "images";
/// Work in progress, inside [`IMAGES_DIR`] so that renames stay on one
/// filesystem.
pub const TMP_DIR: &str = "tmp";
/// Suffix of an interrupted fetch's data, kept across restarts.
pub const PART_SUFFIX: &str = ".part";
/// Held (flock) while an `ImageCache` is open, so that a second one on
/// the same state directory cannot delete the first one's temporary files.
const LOCK_FILE: &str = ".lock";

/// Errors of the image cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("cannot {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the image cache in {path} is already open in another process or handle")]
    Locked { path: PathBuf },
    #[error("image `{image}` is in use by volumes: {}", .dependants.join(", "))]
    InUse {
        image: String,
        dependants: Vec<String>,
    },
    #[error(
        "{path} is a qcow2 image; importing it needs qemu-img, which was not found on PATH \
         (install qemu-utils, or convert it to raw first)"
    )]
    Qcow2NeedsQemuImg { path: PathBuf },
    #[error("{path}: qcow2 image {why}")]
    Qcow2Unsupported { path: PathBuf, why: &'static str },
    #[error("qemu-img convert {path} failed ({status}): {stderr}")]
    QemuImg {
        path: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("{path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("bad URL `{url}`: {why}")]
    BadUrl { url: String, why: &'static str },
    #[error("GET {url}: HTTP {status} {reason}")]
    Http {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("GET {url}: {why}")]
    BadResponse { url: String, why: String },
    #[error("GET {url}")]
    Transport {
        url: String,
        source: Box<ureq::Error>,
    },
    #[error(
        "fetch of {url} interrupted after {got} of {} bytes; the partial download is kept \
         and fetching again resumes it",
        .expected.map_or_else(|| "?".to_string(), |e| e.to_string())
    )]
    Interrupted {
        url: String,
        got: u64,
        expected: Option<u64>,
        source: io::Error,
    },
    #[error(
        "digest mismatch for {url}: expected sha256 {expected}, got {got} \
         ({size} bytes); the download was deleted"
    )]
    DigestMismatch {
        url: String,
        expected: String,
        got: String,
        size: u64,
    },
    #[error("a fetch of {digest} is already running")]
    Busy { digest: String },
    #[error(
        "an image of {need} bytes does not fit the cache budget ({used} of {budget} bytes used)"
    )]
    OverBudget { need: u64, used: u64, budget: u64 },
}

/// Space figures of the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheUsage {
    /// The configured budget, if any.
    pub budget: Option<u64>,
    /// Bytes allocated on disk by the images (holes excluded).
    pub used_bytes: u64,
    pub images: usize,
    /// Free bytes on the cache's filesystem for unprivileged users.
    pub fs_free_bytes: u64,
}

/// Something `check()` found wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("image {digest}: file {path} is missing")]
    Missing { digest: String, path: PathBuf },
    #[error("image {digest}: file {path} has {found} bytes, the catalog says {expected}")]
    WrongSize {
        digest: String,
        path: PathBuf,
        expected: u64,
        found: u64,
    },
}

/// The image cache of one state directory.
pub struct ImageCache {
    dir: PathBuf,
    tmp: PathBuf,
    catalog: Arc<Catalog>,
    budget: Option<u64>,
    qemu_img: PathBuf,
    http: source::Http,
    /// Holds the flock on `tmp/.lock` for the cache's lifetime.
    _lock: File,
}

impl std::fmt::Debug for ImageCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("dir", &self.dir)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl ImageCache {
    /// Open the cache under `state_dir`, creating its directories, and
    /// clean up after a crash: temporary files go (`.part` files stay for
    /// resume), image files without a catalog row go.
    pub fn open(
        state_dir: &Path,
        catalog: Arc<Catalog>,
        budget: Option<u64>,
    ) -> Result<Self, CacheError> {
        let dir = state_dir.join(IMAGES_DIR);
        let tmp = dir.join(TMP_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| io_err("create", &dir, e))?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&tmp)
            .map_err(|e| io_err("create", &tmp, e))?;
        let lock_path = tmp.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| io_err("open", &lock_path, e))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                if e == rustix::io::Errno::WOULDBLOCK {
                    CacheError::Locked { path: dir.clone() }
                } else {
                    io_err("lock", &lock_path, e.into())
                }
            },
        )?;
        let cache = ImageCache {
            dir,
            tmp,
            catalog,
            budget,
            qemu_img: PathBuf::from("qemu-img"),
            http: source::Http::new(),
            _lock: lock,
        };
        cache.clean_tmp()?;
        cache.clean_orphans()?;
        for problem in cache.check()? {
            log::warn!("{problem}");
        }
        Ok(cache)
    }

    /// Use this `qemu-img` (a path or a name looked up on PATH) for qcow2
    /// input instead of `qemu-img`.
    pub fn with_qemu_img(mut self, qemu_img: impl Into<PathBuf>) -> Self {
        self.qemu_img = qemu_img.into();
        self
    }

    /// The file of the image `digest` (a full digest from the catalog).
    pub fn path(&self, digest: &str) -> PathBuf {
        self.dir.join(digest)
    }

    /// The directory the images are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where interrupted fetches and imports in progress live.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn clean_tmp(&self) -> Result<(), CacheError> {
        let entries = std::fs::read_dir(&self.tmp).map_err(|e| io_err("list", &self.tmp, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", &self.tmp, e))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(PART_SUFFIX) || name == LOCK_FILE {
                continue;
            }
            let path = entry.path();
            log::info!("removing stale temporary file {}", path.display());
            let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(|e| io_err("remove", &path, e))?;
        }
        Ok(())
    }

    fn clean_orphans(&self) -> Result<(), CacheError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err("list", &self.dir, e))?;
        let mut removed = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("list", &self.dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            if name == TMP_DIR {
                continue;
            }
            if catalog::check_digest(name).is_err() {
                log::warn!("{}: not an image file, left alone", entry.path().display());
                continue;
            }
            match self.catalog.image(name) {
                Ok(_) => {}
                Err(CatalogError::NotFound { .. }) => {
                    let path = entry.path();
                    log::info!("removing {} (no catalog row)", path.display());
                    std::fs::remove_file(&path).map_err(|e| io_err("remove", &path, e))?;
                    removed = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    /// Catalog rows whose file is missing or has the wrong size.
    pub fn check(&self) -> Result<Vec<Problem>, CacheError> {
        let mut problems = Vec::new();
        for rec in self.catalog.images()? {
            let path = self.path(&rec.digest);
            match std::fs::metadata(&path) {
                Ok(m) if m.len() == rec.size => {}
                Ok(m) => problems.push(Problem::WrongSize {
                    digest: rec.digest,
                    path,
                    expected: rec.size,
                    found: m.len(),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => problems.push(Problem::Missing {
                    digest: rec.digest,
                    path,
                }),
                Err(e) => return Err(io_err("stat", &path, e)),
            }
        }
        Ok(problems)
    }

    /// Every image, oldest first.
    pub fn list(&self) -> Result<Vec<ImageRecord>, CacheError> {
        Ok(self.catalog.images()?)
    }

    /// The image a name, digest or unique digest prefix stands for.
    pub fn show(&self, name_or_digest: &str) -> Result<ImageRecord, CacheError> {
        Ok(self.catalog.image(name_or_digest)?)
    }

    /// Remove an image (all its names) and its file. Refused with
    /// [`CacheError::InUse`] while volumes are based on it.
    pub fn remove(&self, name_or_digest: &str) -> Result<ImageRecord, CacheError> {
        let rec = self.catalog.image(name_or_digest)?;
        let rec = self
            .catalog
            .remove_image(&rec.digest)
            .map_err(|e| match e {
                CatalogError::InUse { dependants } => CacheError::InUse {
                    image: name_or_digest.to_string(),
                    dependants,
                },
                e => e.into(),
            })?;
        let path = self.path(&rec.digest);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", &path, e)),
        }
        Ok(rec)
    }

    /// The cache's budget, use and the free space of its filesystem.
    pub fn usage(&self) -> Result<CacheUsage, CacheError> {
        let images = self.catalog.images()?;
        let used_bytes = self.used_bytes(&images)?;
        let st =
            rustix::fs::statvfs(&self.dir).map_err(|e| io_err("statvfs", &self.dir, e.into()))?;
        Ok(CacheUsage {
            budget: self.budget,
            used_bytes,
            images: images.len(),
            fs_free_bytes: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    fn used_bytes(&self, images: &[ImageRecord]) -> Result<u64, CacheError> {
        let mut used = 0u64;
        for rec in images {
            let path = self.path(&rec.digest);
            match files::allocated(&path) {
                Ok(n) => used = used.saturating_add(n),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("stat", &path, e)),
            }
        }
        Ok(used)
    }

    /// Import a local raw or qcow2 image (a regular file or a block
    /// device). Importing content already in the cache only adds `name`.
    pub fn import(
        &self,
        file: &Path,
        name: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, CacheError> {
        if let Some(name) = name {
            catalog::check_image_name(name)?;
        }
        let source = std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .to_string_lossy()
            .into_owned();
        let mut src = File::open(file).map_err(|e| io_err("open", file, e))?;
        let ft = src
            .metadata()
            .map_err(|e| io_err("stat", file, e))?
            .file_type();
        if !(ft.is_file() || std::os::unix::fs::FileTypeExt::is_block_device(&ft)) {
            return Err(CacheError::NotAFile {
                path: file.to_path_buf(),
            });
        }
        if qcow2::is_qcow2(&src, file)? {
            return self.import_qcow2(file, &source, name, progress);
        }
        // seek(End) works for block devices, whose metadata length is 0.
        let size = src
            .seek(SeekFrom::End(0))
            .map_err(|e| io_err("size", file, e))?;
        let (tmp, dst) = TempFile::create(&self.tmp, "import")?;
        let digest =
            scan::scan(&src, size, Some(&dst), progress).map_err(|e| io_err("copy", file, e))?;
        dst.sync_all().map_err(|e| io_err("fsync", tmp.path(), e))?;
        drop(dst);
        self.commit(tmp, &digest, size, &source, name)
    }

    fn import_qcow2(
        &self,
        file: &Path,
        source: &str,
        name: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, CacheError> {
        let src = File::open(file).map_err(|e| io_err("open", file, e))?;
        qcow2::check_self_contained(&src, file)?;
        drop(src);
        let tmp = TempFile::reserve(&self.tmp, "convert");
        qcow2::convert(&self.qemu_img, file, tmp.path())?;
        let raw = File::open(tmp.path()).map_err(|e| io_err("open", tmp.path(), e))?;
        let size = raw
            .metadata()
            .map_err(|e| io_err("stat", tmp.path(), e))?
            .len();
        let digest =
            scan::scan(&raw, size, None, progress).map_err(|e| io_err("hash", tmp.path(), e))?;
        raw.sync_all().map_err(|e| io_err("fsync", tmp.path(), e))?;
        drop(raw);
        self.commit(tmp, &digest, size, source, name)
    }

    /// Move a complete, fsynced temporary file with content `digest` into
    /// the cache and record it (or, if the content is cached already,
    /// drop the file and add the name).
    fn commit(
        &self,
        tmp: TempFile,
        digest: &str,
        size: u64,
        source: &str,
        name: Option<&str>,
    ) -> Result<ImageRecord, CacheError> {
        let rec = ImageRecord {
            digest: digest.to_string(),
            size,
            format: "raw".into(),
            source: source.to_string(),
            created: catalog::unix_now(),
            names: name.map(|n| vec![n.to_string()]).unwrap_or_default(),
        };
        let target = self.path(digest);
        let known = match self.catalog.image(digest) {
            Ok(_) => true,
            Err(CatalogError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if known && target.exists() {
            // `tmp` is dropped (deleted) on return.
            return Ok(self.catalog.put_image(&rec)?);
        }
        if let Some(budget) = self.budget {
            let need = files::allocated(tmp.path()).map_err(|e| io_err("stat", tmp.path(), e))?;
            let used = self.used_bytes(&self.catalog.images()?)?;
            if used.saturating_add(need) > budget {
                return Err(CacheError::OverBudget { need, used, budget });
            }
        }
        std::fs::set_permissions(tmp.path(), Permissions::from_mode(0o444))
            .map_err(|e| io_err("chmod", tmp.path(), e))?;
        std::fs::rename(tmp.path(), &target).map_err(|e| io_err("rename into", &target, e))?;
        tmp.keep();
        sync_dir(&self.dir)?;
        match self.catalog.put_image(&rec) {
            Ok(stored) => Ok(stored),
            Err(e) => {
                if !known {
                    // No row: the file must not stay (open would delete
                    // it anyway).
                    let _ = std::fs::remove_file(&target);
                }
                Err(e.into())
            }
        }
    }
}
