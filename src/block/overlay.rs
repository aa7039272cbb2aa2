//! Copy-on-write overlay: a sparse data file the size of the disk, an
//! allocation bitmap at a fixed cluster size, and a read-only base image.
//!
//! A read of an allocated cluster comes from the data file, of an
//! unallocated one from the base (zeros past the base's end). The first
//! write to a cluster copies the base cluster up, merged with the new
//! bytes, then marks the cluster allocated; later writes go straight to
//! the data file.
//!
//! ## Cluster size
//! 64 KiB, as qcow2: a first 4 KiB write costs one 64 KiB read and write,
//! and a 1 TiB disk needs a 2 MiB bitmap. Smaller clusters make the bitmap
//! (written whole at a flush after new allocations) larger; bigger ones
//! make copy-up slower.
//!
//! ## The bitmap file
//! Two slots, A and B, each a 4 KiB header then the bitmap. The header
//! holds a magic, a format version, the cluster size, the disk size, a
//! generation and a CRC32C over header and bitmap. A flush that allocated
//! clusters writes the next generation into the slot not holding the
//! current one and fdatasyncs it, after fdatasyncing the data file: the
//! bitmap never names a cluster whose data is not durable. Opening takes
//! the valid slot with the highest generation, so a torn slot write falls
//! back to the previous flush.
//!
//! ## Concurrency
//! Each queue has its own [`OverlayEngine`]; they share one [`Overlay`].
//! Allocation (copy-up and the bit) happens under one mutex and before
//! the write completes, so a write to an unallocated cluster is
//! synchronous on its queue's thread, while reads and writes of allocated
//! clusters go through io_uring.
//!
//! ## Durability
//! Every allocation bumps an allocation generation (under the mutex); the
//! bitmap on disk covers a durable generation. A flush reads the
//! allocation generation on entry and returns only once the durable one
//! covers it, whether it wrote the bitmap itself or another flush, running
//! at the same time on another queue, did: no flush is acknowledged before
//! the bitmap naming every cluster it saw allocated is durable.
//!
//! In write-through mode (the guest turned its write cache off) a write
//! that allocates a cluster, and every discard and write-zeroes, is
//! followed by a flush before it completes: data and bitmap are durable
//! when the guest sees the completion, as a guest that never flushes
//! expects.
//!
//! A failed data sync trips the disk's [`FlushLatch`]: every later flush
//! fails. A failed bitmap write does not: the bitmap is rewritten whole
//! from memory by the next flush, so retrying it is safe.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{fallocate_mode, is_unsupported, zero_range_slow};
use super::{
    failpoint, BlockError, Completion, Engine, EngineKind, FlushLatch, IoSlice, Op, OpKind,
    SyncEngine, UringEngine,
};
use crate::sys;

pub const CLUSTER_SIZE: u64 = 64 * 1024;
const MAGIC: &[u8; 8] = b"VDSKOVL\x01";
const VERSION: u32 = 1;
const HEADER: u64 = 4096;

/// Errors opening or creating an overlay.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("{path}")]
    Io { path: String, source: io::Error },
    #[error("{path}: no valid bitmap slot (both fail their magic, version or checksum)")]
    Corrupt { path: String },
    #[error("{path}: bitmap is for a {found}-byte disk, the data file has {expected}")]
    SizeMismatch {
        path: String,
        found: u64,
        expected: u64,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> OverlayError + '_ {
    move |source| OverlayError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The shared state of one overlay volume.
pub struct Overlay {
    data: Arc<File>,
    base: Option<Arc<File>>,
    base_size: u64,
    /// Grows (see [`Overlay::grow`]) while queues use the overlay.
    size: AtomicU64,
    /// One bit per cluster. Replaced whole, under `meta`, when the overlay
    /// grows; every look loads the current one.
    bits: ArcSwap<Vec<AtomicU64>>,
    meta: Mutex<Meta>,
    /// Bumped, under `meta`, each time a cluster is allocated.
    alloc_gen: AtomicU64,
    /// The `alloc_gen` that the bitmap on disk covers.
    durable_gen: AtomicU64,
    /// The guest turned its write cache off: see the module docs.
    write_through: AtomicBool,
    latch: Arc<FlushLatch>,
    /// Runs between the data sync and the bitmap write of a flush, so a
    /// test can hold a flush there and race another against it.
    #[cfg(test)]
    pub(crate) after_data_sync: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

struct Meta {
    file: File,
    generation: u64,
    /// Slot holding `generation`.
    slot: u64,
}

fn clusters(size: u64) -> u64 {
    size.div_ceil(CLUSTER_SIZE)
}

fn bitmap_bytes(size: u64) -> u64 {
    clusters(size).div_ceil(64) * 8
}

fn slot_len(size: u64) -> u64 {
    HEADER + bitmap_bytes(size).div_ceil(4096) * 4096
}

fn header(size: u64, generation: u64, bitmap: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; HEADER as usize];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(CLUSTER_SIZE as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..32].copy_from_slice(&generation.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h[0..32]), bitmap);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

impl Overlay {
    /// Make a new overlay: a sparse data file and a bitmap file with no
    /// cluster allocated. O(1) in the disk size apart from the bitmap's
    /// checksum (2 MiB of zeros for 1 TiB).
    pub fn create(data: &Path, bitmap: &Path, size: u64) -> Result<(), OverlayError> {
        let f = File::options()
            .write(true)
            .create_new(true)
            .open(data)
            .map_err(io_err(data))?;
        f.set_len(size).map_err(io_err(data))?;
        f.sync_all().map_err(io_err(data))?;
        let b = File::options()
            .write(true)
            .create_new(true)
            .open(bitmap)
            .map_err(io_err(bitmap))?;
        let zeros = vec![0u8; bitmap_bytes(size) as usize];
        b.set_len(2 * slot_len(size)).map_err(io_err(bitmap))?;
        b.write_all_at(&header(size, 1, &zeros), 0)
            .map_err(io_err(bitmap))?;
        b.sync_all().map_err(io_err(bitmap))?;
        Ok(())
    }

    /// Open an overlay over `base` (or over nothing: reads of unallocated
    /// clusters are zeros).
    pub fn open(data: &Path, bitmap: &Path, base: Option<&Path>) -> Result<Overlay, OverlayError> {
        let dfile = File::options()
            .read(true)
            .write(true)
            .open(data)
            .map_err(io_err(data))?;
        let size = dfile.metadata().map_err(io_err(data))?.len();
        let mfile = File::options()
            .read(true)
            .write(true)
            .open(bitmap)
            .map_err(io_err(bitmap))?;
        let nbytes = bitmap_bytes(size) as usize;
        let mut best: Option<(u64, u64, Vec<u8>)> = None;
        for slot in 0..2u64 {
            let off = slot * slot_len(size);
            let mut h = vec![0u8; HEADER as usize];
            let mut bm = vec![0u8; nbytes];
            if mfile.read_exact_at(&mut h, off).is_err()
                || mfile.read_exact_at(&mut bm, off + HEADER).is_err()
            {
                continue;
            }
            let le64 =
                |r: std::ops::Range<usize>| u64::from_le_bytes(h[r].try_into().expect("8 bytes"));
            let found_size = le64(16..24);
            if &h[0..8] != MAGIC || h[8..12] != VERSION.to_le_bytes() {
                continue;
            }
            if found_size != size {
                return Err(OverlayError::SizeMismatch {
                    path: bitmap.display().to_string(),
                    found: found_size,
                    expected: size,
                });
            }
            let crc = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes"));
            if crc32c::crc32c_append(crc32c::crc32c(&h[0..32]), &bm) != crc {
                log::warn!(
                    "{}: bitmap slot {slot} fails its checksum, ignored",
                    bitmap.display()
                );
                continue;
            }
            let generation = le64(24..32);
            if best.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                best = Some((generation, slot, bm));
            }
        }
        let Some((generation, slot, bm)) = best else {
            return Err(OverlayError::Corrupt {
                path: bitmap.display().to_string(),
            });
        };
        let bits = bm
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes"))))
            .collect();
        let (base, base_size) = match base {
            Some(p) => {
                let f = File::open(p).map_err(io_err(p))?;
                let len = f.metadata().map_err(io_err(p))?.len();
                (Some(Arc::new(f)), len)
            }
            None => (None, 0),
        };
        Ok(Overlay {
            data: Arc::new(dfile),
            base,
            base_size,
            size: AtomicU64::new(size),
            bits: ArcSwap::from_pointee(bits),
            meta: Mutex::new(Meta {
                file: mfile,
                generation,
                slot,
            }),
            alloc_gen: AtomicU64::new(0),
            durable_gen: AtomicU64::new(0),
            write_through: AtomicBool::new(false),
            latch: FlushLatch::new(data.display().to_string()),
            #[cfg(test)]
            after_data_sync: Mutex::new(None),
        })
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn is_allocated(&self, cluster: u64) -> bool {
        self.bits
            .load()
            .get((cluster / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (cluster % 64)) != 0)
    }

    /// Marks `cluster` allocated. The caller holds `meta`, so a flush's
    /// bitmap snapshot and the generation it records agree, and the bitmap
    /// cannot be replaced meanwhile.
    fn set_allocated(&self, cluster: u64, _meta: &Meta) {
        let bits = self.bits.load();
        let Some(word) = bits.get((cluster / 64) as usize) else {
            return;
        };
        let bit = 1 << (cluster % 64);
        if word.fetch_or(bit, Ordering::AcqRel) & bit == 0 {
            self.alloc_gen.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The bitmap as bytes, `bitmap_bytes(size)` long.
    fn bitmap_snapshot(&self, size: u64) -> Vec<u8> {
        let mut bm: Vec<u8> = self
            .bits
            .load()
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect();
        bm.resize(bitmap_bytes(size) as usize, 0);
        bm
    }

    /// The disk's flush-error latch, shared with the engines of its data
    /// file.
    pub fn latch(&self) -> &Arc<FlushLatch> {
        &self.latch
    }

    /// Write-through mode: see the module docs.
    pub fn set_write_through(&self, on: bool) {
        self.write_through.store(on, Ordering::Release);
    }

    fn write_through(&self) -> bool {
        self.write_through.load(Ordering::Acquire)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.latch.pass(failpoint::sync_data(&self.data))
    }

    /// Allocated clusters, for `volume show`.
    pub fn allocated_clusters(&self) -> u64 {
        self.bits
            .load()
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Make every completed write durable: data first, then the bitmap if
    /// clusters were allocated that the bitmap on disk does not name yet.
    /// Returns only when the durable generation covers every allocation
    /// made before the call (see the module docs).
    pub fn flush(&self) -> io::Result<()> {
        self.latch.check()?;
        let target = self.alloc_gen.load(Ordering::Acquire);
        if self.durable_gen.load(Ordering::Acquire) >= target {
            return self.sync_data();
        }
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        if self.durable_gen.load(Ordering::Acquire) >= target {
            // Another flush wrote a bitmap covering ours while we waited
            // for the lock; the data written since still needs its sync.
            drop(meta);
            return self.sync_data();
        }
        // Snapshot under the lock: no allocation runs meanwhile, so the
        // bitmap holds exactly the allocations up to `covers`, and each
        // bit was set after its data write returned, so the fdatasync
        // below makes that data durable before the bitmap names it.
        let covers = self.alloc_gen.load(Ordering::Acquire);
        let size = self.size();
        let bm = self.bitmap_snapshot(size);
        self.sync_data()?;
        #[cfg(test)]
        if let Some(hook) = self
            .after_data_sync
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook();
        }
        let next = meta.generation + 1;
        let slot = 1 - meta.slot;
        let off = slot * slot_len(size);
        meta.file
            .write_all_at(&header(size, next, &bm), off)
            .and_then(|_| meta.file.write_all_at(&bm, off + HEADER))
            .and_then(|_| failpoint::sync_data(&meta.file))?;
        meta.generation = next;
        meta.slot = slot;
        self.durable_gen.store(covers, Ordering::Release);
        Ok(())
    }

    /// Write, to the new file `path`, the bitmap of this overlay grown to
    /// `new_size` bytes (the same clusters allocated), fsynced. Growing is
    /// then: this, extend the data file to `new_size`, rename `path` over
    /// the bitmap. A crash before the rename leaves `path` beside a bitmap
    /// that still opens if the data file was not extended; after the data
    /// file was extended only `path` opens with it.
    pub fn write_grown_bitmap(&self, path: &Path, new_size: u64) -> Result<(), OverlayError> {
        let _meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        self.write_grown_bitmap_locked(path, new_size)
    }

    fn write_grown_bitmap_locked(&self, path: &Path, new_size: u64) -> Result<(), OverlayError> {
        let size = self.size();
        if new_size < size {
            return Err(OverlayError::SizeMismatch {
                path: path.display().to_string(),
                found: new_size,
                expected: size,
            });
        }
        let bm = self.bitmap_snapshot(new_size);
        let b = File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path))?;
        b.set_len(2 * slot_len(new_size)).map_err(io_err(path))?;
        b.write_all_at(&header(new_size, 1, &bm), 0)
            .and_then(|_| b.write_all_at(&bm, HEADER))
            .and_then(|_| b.sync_all())
            .map_err(io_err(path))?;
        Ok(())
    }

    /// Grow the overlay to `new_size` while queues use it: the grown bitmap
    /// is written to `grown` (beside `bitmap`), the data file extended, and
    /// `grown` renamed over `bitmap`, as for an overlay at rest (a crash
    /// anywhere in between is finished or undone at the next start, see
    /// [`Overlay::write_grown_bitmap`]); then flushes use the new bitmap
    /// file and lookups the longer bitmap. Allocation and flushes wait for
    /// the allocation lock meanwhile; reads and writes of allocated
    /// clusters go on.
    pub fn grow(&self, new_size: u64, grown: &Path, bitmap: &Path) -> Result<(), OverlayError> {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.size();
        if new_size == old {
            return Ok(());
        }
        let _ = std::fs::remove_file(grown);
        // Everything allocated so far goes into the new bitmap: make its
        // data durable first, as a flush would.
        self.sync_data().map_err(io_err(grown))?;
        let covers = self.alloc_gen.load(Ordering::Acquire);
        if let Err(e) = self.write_grown_bitmap_locked(grown, new_size) {
            let _ = std::fs::remove_file(grown);
            return Err(e);
        }
        if let Err(e) = self
            .data
            .set_len(new_size)
            .and_then(|_| self.data.sync_all())
        {
            let _ = self.data.set_len(old);
            let _ = std::fs::remove_file(grown);
            return Err(io_err(grown)(e));
        }
        std::fs::rename(grown, bitmap).map_err(io_err(grown))?;
        if let Some(dir) = bitmap.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open(bitmap)
            .map_err(io_err(bitmap))?;
        *meta = Meta {
            file,
            generation: 1,
            slot: 0,
        };
        let old_bits = self.bits.load();
        let words = (bitmap_bytes(new_size) / 8) as usize;
        let bits: Vec<AtomicU64> = (0..words)
            .map(|i| AtomicU64::new(old_bits.get(i).map_or(0, |w| w.load(Ordering::Acquire))))
            .collect();
        self.bits.store(Arc::new(bits));
        self.size.store(new_size, Ordering::Release);
        self.durable_gen.fetch_max(covers, Ordering::AcqRel);
        Ok(())
    }

    /// Read `buf.len()` bytes of the base at `offset`, zeros past its end.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        buf.fill(0);
        let Some(base) = &self.base else {
            return Ok(());
        };
        if offset >= self.base_size {
            return Ok(());
        }
        let n = ((self.base_size - offset) as usize).min(buf.len());
        base.read_exact_at(&mut buf[..n], offset)
    }

    /// Write `src` (bytes `skip..skip+len` of the slices, or zeros) to
    /// `offset..offset+len`, all inside one cluster, allocating the cluster
    /// first if needed. Synchronous, under the allocation lock.
    fn write_in_cluster(
        &self,
        offset: u64,
        len: u64,
        src: Option<(&[IoSlice], usize)>,
        unmap: bool,
    ) -> io::Result<()> {
        let cluster = offset / CLUSTER_SIZE;
        let guard = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        let start = cluster * CLUSTER_SIZE;
        let end = (start + CLUSTER_SIZE).min(self.size());
        let whole = offset == start && offset + len == end;
        if self.is_allocated(cluster) || whole {
            match src {
                Some((iov, skip)) => {
                    let mut buf = vec![0u8; len as usize];
                    // SAFETY: the engine's caller keeps the slices' memory
                    // alive until the completion is reaped, after this.
                    unsafe { sys::copy_from_slices(iov, skip, &mut buf) };
                    self.data.write_all_at(&buf, offset)?;
                }
                None => zero(&self.data, offset, len, unmap || whole)?,
            }
        } else {
            // Copy-up: the base cluster merged with the new bytes.
            let mut buf = vec![0u8; (end - start) as usize];
            self.read_base(start, &mut buf)?;
            let at = (offset - start) as usize;
            match src {
                // SAFETY: as above.
                Some((iov, skip)) => unsafe {
                    sys::copy_from_slices(iov, skip, &mut buf[at..at + len as usize]);
                },
                None => buf[at..at + len as usize].fill(0),
            }
            self.data.write_all_at(&buf, start)?;
        }
        self.set_allocated(cluster, &guard);
        Ok(())
    }
}

fn zero(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
    match sys::fallocate(file.as_fd(), fallocate_mode(unmap), offset, len) {
        Ok(()) => Ok(()),
        Err(e) if is_unsupported(&e) => zero_range_slow(file.as_fd(), file, offset, len, unmap),
        Err(e) => Err(e),
    }
}

/// The sub-list of `iov` covering bytes `skip..skip+len`.
fn sub_slices(iov: &[IoSlice], mut skip: usize, mut len: usize) -> Vec<IoSlice> {
    let mut out = Vec::new();
    for s in iov {
        if len == 0 {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(len);
        out.push(IoSlice {
            base: s.base + skip,
            len: n,
        });
        len -= n;
        skip = 0;
    }
    out
}

struct Outer {
    user_data: u64,
    parts: u32,
    len: u64,
    error: Option<io::Error>,
}

/// One queue's engine over a shared [`Overlay`].
pub struct OverlayEngine {
    ov: Arc<Overlay>,
    data: Box<dyn Engine>,
    base: Option<Box<dyn Engine>>,
    event: EventFd,
    outer: Vec<Option<Outer>>,
    free: Vec<u32>,
    ready: VecDeque<Completion>,
    /// Sub-operations an inner engine had no room for: (to base?, op, slot).
    backlog: VecDeque<(bool, Op, u64)>,
    scratch: Vec<Completion>,
}

impl OverlayEngine {
    pub fn new(ov: Arc<Overlay>, kind: EngineKind, depth: usize) -> Result<Self, BlockError> {
        let event = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        let latch = ov.latch.clone();
        let make = |file: Arc<File>| -> Result<Box<dyn Engine>, BlockError> {
            let ev = event.try_clone().map_err(BlockError::EventFd)?;
            let latch = latch.clone();
            Ok(match kind {
                EngineKind::Sync | EngineKind::Null => {
                    Box::new(SyncEngine::new(file, None, depth, ev, latch)?)
                }
                EngineKind::IoUring => Box::new(UringEngine::new(file, None, depth, ev, latch)?),
            })
        };
        let data = make(ov.data.clone())?;
        let base = ov.base.clone().map(make).transpose()?;
        Ok(OverlayEngine {
            ov,
            data,
            base,
            event,
            outer: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            ready: VecDeque::new(),
            backlog: VecDeque::new(),
            scratch: Vec::new(),
        })
    }

    fn inner(&mut self, to_base: bool, op: Op, slot: u64) {
        if let Some(o) = self.outer[slot as usize].as_mut() {
            o.parts += 1;
        }
        if !self.backlog.is_empty() {
            self.backlog.push_back((to_base, op, slot));
            return;
        }
        let engine = if to_base {
            self.base.as_mut()
        } else {
            Some(&mut self.data)
        };
        let Some(engine) = engine else { return };
        if let Err((_, op)) = engine.push(op, slot) {
            self.backlog.push_back((to_base, op, slot));
        }
    }

    fn fail(&mut self, slot: u64, e: io::Error) {
        if let Some(o) = self.outer[slot as usize].as_mut() {
            o.error.get_or_insert(e);
        }
    }

    /// Whether all of `op` is served by one file, and which: a read or
    /// write whose clusters are all allocated goes to the data file
    /// (`Some(false)`); a read whose clusters are all unallocated and that
    /// ends inside the base goes to the base (`Some(true)`). Anything else
    /// is split (`None`).
    fn one_file(&self, op: &Op) -> Option<bool> {
        let first = op.offset / CLUSTER_SIZE;
        let last = (op.offset + op.len - 1) / CLUSTER_SIZE;
        let allocated = self.ov.is_allocated(first);
        if (first + 1..=last).any(|c| self.ov.is_allocated(c) != allocated) {
            return None;
        }
        match (allocated, op.kind) {
            (true, _) => Some(false),
            (false, OpKind::Read)
                if self.base.is_some() && op.offset + op.len <= self.ov.base_size =>
            {
                Some(true)
            }
            _ => None,
        }
    }

    /// Split a read by cluster runs: allocated from the data file,
    /// unallocated from the base, zeros past the base.
    fn read(&mut self, op: &Op, slot: u64) {
        let (mut pos, end) = (op.offset, op.offset + op.len);
        while pos < end {
            let alloc = self.ov.is_allocated(pos / CLUSTER_SIZE);
            let mut run_end = ((pos / CLUSTER_SIZE) + 1) * CLUSTER_SIZE;
            while run_end < end && self.ov.is_allocated(run_end / CLUSTER_SIZE) == alloc {
                run_end += CLUSTER_SIZE;
            }
            let run_end = run_end.min(end);
            let skip = (pos - op.offset) as usize;
            let iov = sub_slices(&op.iov, skip, (run_end - pos) as usize);
            if alloc {
                self.inner(false, Op::read(pos, iov), slot);
            } else {
                let from_base = if self.base.is_some() {
                    self.ov.base_size.clamp(pos, run_end)
                } else {
                    pos
                };
                if from_base > pos {
                    let part = sub_slices(&op.iov, skip, (from_base - pos) as usize);
                    self.inner(true, Op::read(pos, part), slot);
                }
                if run_end > from_base {
                    let zeros = sub_slices(
                        &op.iov,
                        skip + (from_base - pos) as usize,
                        (run_end - from_base) as usize,
                    );
                    // SAFETY: the caller keeps the slices' memory alive and
                    // writable until the completion is reaped.
                    unsafe { sys::zero_fill(&zeros) };
                }
            }
            pos = run_end;
        }
    }

    /// Writes, discards and write-zeroes: allocated clusters through the
    /// data engine (writes) or fallocate; unallocated ones synchronously.
    /// In write-through mode, whatever was done synchronously (an
    /// allocation, a discard, a write-zeroes) is flushed before the
    /// operation completes; the asynchronous writes carry RWF_DSYNC.
    fn modify(&mut self, op: &Op, slot: u64) {
        let mut synchronous = false;
        let result = self.modify_parts(op, slot, &mut synchronous);
        let result = result.and_then(|()| {
            if synchronous && self.ov.write_through() {
                self.ov.flush()
            } else {
                Ok(())
            }
        });
        if let Err(e) = result {
            self.fail(slot, e);
        }
    }

    fn modify_parts(&mut self, op: &Op, slot: u64, synchronous: &mut bool) -> io::Result<()> {
        let (mut pos, end) = (op.offset, op.offset + op.len);
        while pos < end {
            let cluster = pos / CLUSTER_SIZE;
            let cend = ((cluster + 1) * CLUSTER_SIZE).min(end);
            let skip = (pos - op.offset) as usize;
            let len = cend - pos;
            let result = match op.kind {
                OpKind::Write if self.ov.is_allocated(cluster) => {
                    // Merge the allocated run into one async write.
                    let mut run_end = cend;
                    while run_end < end && self.ov.is_allocated(run_end / CLUSTER_SIZE) {
                        run_end = (run_end + CLUSTER_SIZE).min(end);
                    }
                    let iov = sub_slices(&op.iov, skip, (run_end - pos) as usize);
                    self.inner(false, Op::write(pos, iov), slot);
                    pos = run_end;
                    continue;
                }
                OpKind::Write => self
                    .ov
                    .write_in_cluster(pos, len, Some((&op.iov, skip)), false),
                OpKind::Discard => self.ov.write_in_cluster(pos, len, None, true),
                OpKind::WriteZeroes { unmap } => self.ov.write_in_cluster(pos, len, None, unmap),
                OpKind::Read | OpKind::Flush => Ok(()),
            };
            *synchronous = true;
            result?;
            pos = cend;
        }
        Ok(())
    }

    fn finish_parts(&mut self, slot: u64, result: io::Result<u64>) {
        let Some(o) = self.outer.get_mut(slot as usize).and_then(Option::as_mut) else {
            return;
        };
        if let Err(e) = result {
            o.error.get_or_insert(e);
        }
        o.parts -= 1;
        if o.parts == 0 {
            let o = self.outer[slot as usize].take().expect("checked");
            self.free.push(slot as u32);
            let result = match o.error {
                Some(e) => Err(e),
                None => Ok(o.len),
            };
            self.ready.push_back(Completion {
                user_data: o.user_data,
                result,
            });
        }
    }
}

impl Engine for OverlayEngine {
    fn push(&mut self, op: Op, user_data: u64) -> Result<(), (BlockError, Op)> {
        let Some(slot) = self.free.pop() else {
            return Err((BlockError::QueueFull, op));
        };
        // One "part" stands for the synchronous work until it is done.
        self.outer[slot as usize] = Some(Outer {
            user_data,
            parts: 1,
            len: op.len,
            error: None,
        });
        let slot = u64::from(slot);
        match op.kind {
            // The common case, a request inside one run of clusters: the
            // op goes to one file as it is, with no split and no copy of
            // its slices.
            OpKind::Read | OpKind::Write if op.len > 0 => match self.one_file(&op) {
                Some(to_base) => self.inner(to_base, op, slot),
                None if op.kind == OpKind::Read => self.read(&op, slot),
                None => self.modify(&op, slot),
            },
            OpKind::Read => self.read(&op, slot),
            OpKind::Flush => {
                if let Err(e) = self.ov.flush() {
                    self.fail(slot, e);
                }
            }
            _ => self.modify(&op, slot),
        }
        self.finish_parts(slot, Ok(0));
        Ok(())
    }

    fn submit(&mut self) -> Result<(), BlockError> {
        while let Some((to_base, op, slot)) = self.backlog.pop_front() {
            let engine = if to_base {
                self.base.as_mut()
            } else {
                Some(&mut self.data)
            };
            let Some(engine) = engine else { continue };
            if let Err((_, op)) = engine.push(op, slot) {
                self.backlog.push_front((to_base, op, slot));
                break;
            }
        }
        self.data.submit()?;
        if let Some(b) = self.base.as_mut() {
            b.submit()?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        self.data.reap(&mut scratch);
        if let Some(b) = self.base.as_mut() {
            b.reap(&mut scratch);
        }
        for c in scratch.drain(..) {
            self.finish_parts(c.user_data, c.result);
        }
        self.scratch = scratch;
        if !self.backlog.is_empty() {
            let _ = self.submit();
        }
        out.extend(self.ready.drain(..));
    }

    fn wait(&mut self) -> Result<(), BlockError> {
        if !self.ready.is_empty() {
            return Ok(());
        }
        if self.data.in_flight() > 0 {
            return self.data.wait();
        }
        match self.base.as_mut() {
            Some(b) if b.in_flight() > 0 => b.wait(),
            _ => Ok(()),
        }
    }

    fn notifier(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn ack_notifier(&self) {
        let _ = self.event.read();
    }

    fn in_flight(&self) -> usize {
        self.outer.len() - self.free.len() + self.ready.len()
    }

    fn capacity(&self) -> usize {
        self.outer.len()
    }

    fn name(&self) -> &'static str {
        "overlay"
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty()
            || self.data.has_completions()
            || self.base.as_mut().is_some_and(|b| b.has_completions())
    }

    fn set_notify(&mut self, on: bool) {
        self.data.set_notify(on);
        if let Some(b) = self.base.as_mut() {
            b.set_notify(on);
        }
    }

    fn set_write_through(&mut self, on: bool) {
        self.ov.set_write_through(on);
        self.data.set_write_through(on);
    }
}

#[cfg(test)]
#[path = "overlay_tests.rs"]
mod tests;
