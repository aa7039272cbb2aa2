//! Opening a disk: a raw file or block device, or a null device, and
//! choosing the engine that serves it (probed once, logged once).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BlockError, Engine, FlushLatch, Overlay, OverlayEngine, SyncEngine, UringEngine};
use crate::sys;

/// Where a disk's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// A regular file or a block device.
    File(PathBuf),
    /// A device of this many bytes that reads zeros and drops writes.
    Null(u64),
    /// A copy-on-write overlay (`data` + `bitmap`) over an optional base
    /// image, served by [`OverlayEngine`].
    Overlay {
        data: PathBuf,
        bitmap: PathBuf,
        base: Option<PathBuf>,
    },
}

/// Why a disk could not grow.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    #[error("disks only grow: this one has {size} bytes")]
    Shrink { size: u64 },
    #[error("the new size is not a multiple of 512")]
    NotSectors,
    #[error("the disk is served read-only")]
    ReadOnly,
    #[error("{0} cannot grow here")]
    Unsupported(&'static str),
    #[error(transparent)]
    Io(io::Error),
}

/// Which engine serves a disk's queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// io_uring, one ring per queue worker (the default where it works).
    IoUring,
    /// Synchronous preadv/pwritev on the worker thread: for tests and for
    /// kernels without io_uring.
    Sync,
    /// No I/O at all (null devices).
    Null,
}

/// How to open a disk.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub readonly: bool,
    /// Open a second descriptor with O_DIRECT and use it for every aligned
    /// read and write.
    pub direct: bool,
    /// Force an engine (an error if it cannot be had); `None` probes
    /// io_uring and falls back to sync with a warning.
    pub engine: Option<EngineKind>,
}

/// The O_DIRECT side of a file disk.
#[derive(Debug, Clone)]
pub(super) struct DirectFile {
    pub file: Arc<File>,
    /// Alignment of buffer addresses.
    pub mem_align: u64,
    /// Alignment of offsets and lengths.
    pub offset_align: u64,
}

impl DirectFile {
    /// True when every slice and the offset meet O_DIRECT's alignment.
    pub fn fits(&self, offset: u64, iov: &[sys::IoSlice]) -> bool {
        offset.is_multiple_of(self.offset_align)
            && iov.iter().all(|s| {
                (s.base as u64).is_multiple_of(self.mem_align)
                    && (s.len as u64).is_multiple_of(self.offset_align)
            })
    }
}

/// An open disk; engines are made from it, one per queue worker.
pub struct Disk {
    source: DiskSource,
    file: Option<Arc<File>>,
    overlay: Option<Arc<Overlay>>,
    direct: Option<DirectFile>,
    /// Grows with [`Disk::grow`].
    size: AtomicU64,
    readonly: bool,
    engine: EngineKind,
    /// Shared by every engine of this disk (the overlay's own, for one).
    latch: Arc<FlushLatch>,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("source", &self.source)
            .field("size", &self.size)
            .field("readonly", &self.readonly)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Disk {
    pub fn open(source: &DiskSource, opts: &OpenOptions) -> Result<Disk, BlockError> {
        match source {
            DiskSource::Null(size) => {
                if *size == 0 || size % 512 != 0 {
                    return Err(BlockError::BadSize {
                        path: "null device".into(),
                        size: *size,
                    });
                }
                Ok(Disk {
                    source: source.clone(),
                    file: None,
                    overlay: None,
                    direct: None,
                    size: AtomicU64::new(*size),
                    readonly: opts.readonly,
                    engine: EngineKind::Null,
                    latch: FlushLatch::new("null device"),
                })
            }
            DiskSource::File(path) => Self::open_file(source, path, opts),
            DiskSource::Overlay { data, bitmap, base } => {
                Self::open_overlay(source, data, bitmap, base.as_deref(), opts)
            }
        }
    }

    fn open_overlay(
        source: &DiskSource,
        data: &Path,
        bitmap: &Path,
        base: Option<&Path>,
        opts: &OpenOptions,
    ) -> Result<Disk, BlockError> {
        let shown = data.display().to_string();
        let ov = Overlay::open(data, bitmap, base).map_err(|e| BlockError::Open {
            path: shown.clone(),
            source: io::Error::other(e.to_string()),
        })?;
        let size = ov.size();
        if size == 0 || size % 512 != 0 {
            return Err(BlockError::BadSize { path: shown, size });
        }
        let engine = choose_engine(&shown, opts)?;
        log::info!(
            "{shown}: overlay of {size} bytes over {}, engine {engine:?}",
            base.map_or_else(|| "nothing".to_string(), |b| b.display().to_string())
        );
        Ok(Disk {
            source: source.clone(),
            file: None,
            latch: ov.latch().clone(),
            overlay: Some(Arc::new(ov)),
            direct: None,
            size: AtomicU64::new(size),
            readonly: opts.readonly,
            engine,
        })
    }

    /// The overlay behind this disk, if it is one.
    pub fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.overlay.as_ref()
    }

    fn open_file(source: &DiskSource, path: &Path, opts: &OpenOptions) -> Result<Disk, BlockError> {
        let shown = path.display().to_string();
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(!opts.readonly);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let file = open(false).map_err(|source| BlockError::Open {
            path: shown.clone(),
            source,
        })?;
        let size = file_size(&file).map_err(|source| BlockError::Size {
            path: shown.clone(),
            source,
        })?;
        if size == 0 || size % 512 != 0 {
            return Err(BlockError::BadSize { path: shown, size });
        }
        let direct = if opts.direct {
            let dfile = open(true).map_err(|source| BlockError::Open {
                path: shown.clone(),
                source,
            })?;
            let (mem_align, offset_align) = sys::dio_alignment(dfile.as_fd()).unwrap_or((512, 512));
            log::info!(
                "{shown}: O_DIRECT with {mem_align}-byte memory and {offset_align}-byte offset alignment; unaligned requests use the page cache"
            );
            Some(DirectFile {
                file: Arc::new(dfile),
                mem_align: mem_align.into(),
                offset_align: offset_align.into(),
            })
        } else {
            None
        };
        let engine = choose_engine(&shown, opts)?;
        log::info!(
            "{shown}: {size} bytes, engine {engine:?}, {}",
            if opts.readonly {
                "read-only"
            } else {
                "read-write"
            }
        );
        Ok(Disk {
            source: source.clone(),
            file: Some(Arc::new(file)),
            overlay: None,
            direct,
            size: AtomicU64::new(size),
            readonly: opts.readonly,
            engine,
            latch: FlushLatch::new(shown),
        })
    }

    pub fn source(&self) -> &DiskSource {
        &self.source
    }

    /// Size in bytes (a multiple of 512).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Grow the disk to `new_size` bytes while it is served: a regular
    /// file is extended (and fsynced), an overlay grows its data file and
    /// bitmap ([`Overlay::grow`], with `grown_bitmap` as the temporary
    /// file beside its bitmap). Block devices and null devices do not grow
    /// here, and nothing shrinks.
    pub fn grow(&self, new_size: u64, grown_bitmap: &Path) -> Result<(), GrowError> {
        let old = self.size();
        if new_size < old {
            return Err(GrowError::Shrink { size: old });
        }
        if !new_size.is_multiple_of(512) {
            return Err(GrowError::NotSectors);
        }
        if new_size == old {
            return Ok(());
        }
        if self.readonly {
            return Err(GrowError::ReadOnly);
        }
        match (&self.source, &self.overlay, &self.file) {
            (DiskSource::Overlay { bitmap, .. }, Some(ov), _) => ov
                .grow(new_size, grown_bitmap, bitmap)
                .map_err(|e| GrowError::Io(io::Error::other(e.to_string())))?,
            (DiskSource::File(_), _, Some(f)) => {
                if f.metadata()
                    .map_err(GrowError::Io)?
                    .file_type()
                    .is_block_device()
                {
                    return Err(GrowError::Unsupported("a block device"));
                }
                f.set_len(new_size)
                    .and_then(|_| f.sync_all())
                    .map_err(GrowError::Io)?;
            }
            _ => return Err(GrowError::Unsupported("a null device")),
        }
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn engine_kind(&self) -> EngineKind {
        self.engine
    }

    /// The flush-error latch: why flushes fail, once one did.
    pub fn flush_latch(&self) -> &Arc<FlushLatch> {
        &self.latch
    }

    /// A new engine for one queue worker, allowing `depth` operations in
    /// flight.
    pub fn new_engine(&self, depth: usize) -> Result<Box<dyn Engine>, BlockError> {
        let event = || EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd);
        if let Some(ov) = &self.overlay {
            return Ok(Box::new(OverlayEngine::new(
                ov.clone(),
                self.engine,
                depth,
            )?));
        }
        Ok(match (self.engine, &self.file) {
            (EngineKind::IoUring, Some(file)) => Box::new(UringEngine::new(
                file.clone(),
                self.direct.clone(),
                depth,
                event()?,
                self.latch.clone(),
            )?),
            (EngineKind::Sync, Some(file)) => Box::new(SyncEngine::new(
                file.clone(),
                self.direct.clone(),
                depth,
                event()?,
                self.latch.clone(),
            )?),
            _ => Box::new(SyncEngine::null(depth)?),
        })
    }

    /// Make every completed write durable, outside any engine (shutdown).
    pub fn sync(&self) -> io::Result<()> {
        if let Some(ov) = &self.overlay {
            return if self.readonly { Ok(()) } else { ov.flush() };
        }
        match &self.file {
            Some(f) if !self.readonly => self.latch.pass(super::failpoint::sync_data(f)),
            _ => Ok(()),
        }
    }
}

fn choose_engine(shown: &str, opts: &OpenOptions) -> Result<EngineKind, BlockError> {
    decide_engine(shown, opts.engine, UringEngine::supported)
}

/// The engine for a disk: a forced one or nothing (an error when io_uring
/// was forced and is not usable); without one, io_uring where the probe
/// says it works, else the synchronous engine, with a warning.
pub(super) fn decide_engine(
    shown: &str,
    forced: Option<EngineKind>,
    uring_works: impl FnOnce() -> bool,
) -> Result<EngineKind, BlockError> {
    match forced {
        Some(EngineKind::Sync) => Ok(EngineKind::Sync),
        Some(EngineKind::IoUring) | Some(EngineKind::Null) => {
            if uring_works() {
                Ok(EngineKind::IoUring)
            } else {
                Err(BlockError::EngineUnavailable {
                    path: shown.to_string(),
                })
            }
        }
        None if uring_works() => Ok(EngineKind::IoUring),
        None => {
            log::warn!("{shown}: io_uring is not usable here, serving with the synchronous engine");
            Ok(EngineKind::Sync)
        }
    }
}

fn file_size(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        sys::block_device_size(file.as_fd())
    } else {
        Ok(meta.len())
    }
}

/// Zero `len` bytes at `offset` without the fast path: used when the
/// filesystem refuses the fallocate mode an engine tried first.
///
/// With `unmap`, a punched hole is best (it frees space); otherwise the
/// range stays allocated. Writing zeros is the last resort and always works.
pub(super) fn zero_range_slow(
    fd: BorrowedFd<'_>,
    file: &File,
    offset: u64,
    len: u64,
    unmap: bool,
) -> io::Result<()> {
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    let zero = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    let tries: &[i32] = if unmap { &[punch, zero] } else { &[zero] };
    for &mode in tries {
        match sys::fallocate(fd, mode, offset, len) {
            Ok(()) => return Ok(()),
            Err(e) if is_unsupported(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    write_zeros(file, offset, len)
}

/// The fallocate mode for a discard or a write-zeroes.
pub(super) fn fallocate_mode(unmap: bool) -> i32 {
    if unmap {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    }
}

pub(super) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

/// One shared page-sized buffer of zeros is enough: writes repeat it.
const ZERO_CHUNK: usize = 64 * 1024;

fn write_zeros(file: &File, mut offset: u64, len: u64) -> io::Result<()> {
    static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    while offset < end {
        let n = (end - offset).min(ZERO_CHUNK as u64) as usize;
        file.write_all_at(&ZEROS[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}
