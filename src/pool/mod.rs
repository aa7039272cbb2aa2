//! Ready copies (DESIGN idea 1): full copies of important images, made in
//! free space before anyone asks, so that a full-copy deploy is a rename.
//!
//! - The table lives in the catalog (`pool`, `pool_copies`); this module
//!   holds the rules: how many copies a priority wants
//!   ([`CopiesRule`]), which copies go first when space runs short
//!   ([`choose_evictions`]), and the [`Filler`] thread that makes and
//!   evicts copies.
//! - Space has two marks: below the reserve the filler evicts ready copies,
//!   lowest priority first and oldest first among equals; it starts a copy
//!   only when the copy leaves at least the reserve plus half of it again
//!   free, so that filling and evicting never chase each other.
//! - Crash safety: a copy is recorded `making` before its file is written
//!   and `ready` only after the file is complete and fsynced; at start
//!   every `making` copy, and any file in the pool directory the catalog
//!   does not know, is deleted.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::catalog::{Catalog, CatalogError, CopyState, PoolCopy, PoolEntry};

/// Where the copies live, under the state directory.
pub const POOL_DIR: &str = "pool";

/// How often the filler looks when nothing wakes it.
const TICK: Duration = Duration::from_secs(1);

/// Bytes copied per read and write.
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("pool config: {0}")]
    Config(String),
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PoolError + 'a {
    move |source| PoolError::Io {
        op,
        path: path.display().to_string(),
        source,
    }
}

/// How many ready copies a priority wants when `copies` is not given. The
/// default, `1-3:0, 4-6:1, 7-8:2, 9-10:4`, is changed with `[pool]
/// copies-by-priority` in the same notation: ranges (or single
/// priorities) and counts that cover 1 to 10 once each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopiesRule {
    /// Copies for priorities 1 to 10.
    table: [u32; 10],
}

impl Default for CopiesRule {
    fn default() -> Self {
        CopiesRule {
            table: [0, 0, 0, 1, 1, 1, 2, 2, 4, 4],
        }
    }
}

impl CopiesRule {
    pub fn copies(&self, priority: u8) -> u32 {
        let i = usize::from(priority.clamp(1, 10)) - 1;
        self.table[i]
    }

    /// `1-3:0, 4-6:1, ...`: each priority once, counts at most 64.
    pub fn parse(s: &str) -> Result<CopiesRule, PoolError> {
        let bad = |why: &str| PoolError::Config(format!("copies-by-priority `{s}`: {why}"));
        let mut table = [None::<u32>; 10];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (range, count) = part
                .split_once(':')
                .ok_or_else(|| bad("each part is PRIORITIES:COPIES, such as 4-6:1"))?;
            let count: u32 = count
                .trim()
                .parse()
                .ok()
                .filter(|c| *c <= crate::catalog::MAX_COPIES)
                .ok_or_else(|| bad("a count of copies is 0 to 64"))?;
            let (lo, hi) = match range.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (range.trim(), range.trim()),
            };
            let (lo, hi): (u8, u8) = match (lo.parse(), hi.parse()) {
                (Ok(lo), Ok(hi)) if 1 <= lo && lo <= hi && hi <= 10 => (lo, hi),
                _ => return Err(bad("priorities go from 1 to 10")),
            };
            for p in lo..=hi {
                let slot = &mut table[usize::from(p) - 1];
                if slot.is_some() {
                    return Err(bad("a priority is given twice"));
                }
                *slot = Some(count);
            }
        }
        let mut out = [0u32; 10];
        for (i, c) in table.iter().enumerate() {
            out[i] = c.ok_or_else(|| bad(&format!("priority {} has no count", i + 1)))?;
        }
        Ok(CopiesRule { table: out })
    }

    /// The rule in the notation `parse` reads, runs of equal counts
    /// joined: `1-3:0, 4-6:1, 7-8:2, 9-10:4`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut start = 0;
        for i in 1..=10 {
            if i == 10 || self.table[i] != self.table[start] {
                let range = if start + 1 == i {
                    format!("{}", start + 1)
                } else {
                    format!("{}-{}", start + 1, i)
                };
                parts.push(format!("{range}:{}", self.table[start]));
                start = i;
            }
        }
        parts.join(", ")
    }
}

/// Copies wanted for `entry` under `rule`.
pub fn wanted(rule: &CopiesRule, entry: &PoolEntry) -> u32 {
    entry.copies.unwrap_or_else(|| rule.copies(entry.priority))
}

/// The space the filler keeps free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    Bytes(u64),
    /// Percent of the file system's size.
    Percent(u8),
}

impl Reserve {
    pub fn parse(s: &str) -> Result<Reserve, PoolError> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if p < 100 => Ok(Reserve::Percent(p)),
                _ => Err(PoolError::Config(format!(
                    "reserve `{s}`: a percentage from 0% to 99%"
                ))),
            };
        }
        crate::config::parse_size(s)
            .map(Reserve::Bytes)
            .ok_or_else(|| {
                PoolError::Config(format!("reserve `{s}`: a size (10G) or a percentage (10%)"))
            })
    }

    pub fn bytes(self, fs_size: u64) -> u64 {
        match self {
            Reserve::Bytes(b) => b,
            Reserve::Percent(p) => fs_size / 100 * u64::from(p),
        }
    }
}

/// The `[pool]` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub reserve: Reserve,
    /// Bytes per second the filler may copy; `None`: unlimited.
    pub rate: Option<u64>,
    pub rule: CopiesRule,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            reserve: Reserve::Percent(10),
            rate: None,
            rule: CopiesRule::default(),
        }
    }
}

/// A ready copy as eviction sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evictable {
    pub id: i64,
    pub priority: u8,
    pub created: i64,
    pub bytes: u64,
}

/// The copies to delete to free `need` bytes: lowest priority first, oldest
/// first among equals, and no more than needed. Copies being made or
/// claimed are not in `ready`, so they are never chosen.
pub fn choose_evictions(ready: &[Evictable], need: u64) -> Vec<i64> {
    let mut order: Vec<&Evictable> = ready.iter().collect();
    order.sort_by_key(|e| (e.priority, e.created, e.id));
    let mut freed = 0u64;
    let mut out = Vec::new();
    for e in order {
        if freed >= need {
            break;
        }
        freed = freed.saturating_add(e.bytes);
        out.push(e.id);
    }
    out
}

/// Free and total bytes of the file system holding `dir`.
pub fn fs_space(dir: &Path) -> io::Result<(u64, u64)> {
    let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    Ok((
        st.f_bavail.saturating_mul(st.f_frsize),
        st.f_blocks.saturating_mul(st.f_frsize),
    ))
}

/// What the filler reports (the service turns these into events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    CopyReady {
        digest: String,
    },
    /// A ready copy was deleted: to restore the reserve (`trimmed` false)
    /// or because its entry now wants fewer (`trimmed` true).
    Evicted {
        digest: String,
        reason: String,
        trimmed: bool,
    },
    /// A cached image nothing used was removed to restore the reserve.
    ImageEvicted {
        digest: String,
        reason: String,
    },
}

/// What the filler needs from the rest of the daemon.
pub struct FillerContext {
    pub catalog: Arc<Catalog>,
    pub dir: PathBuf,
    pub config: PoolConfig,
    /// The cached image file of a digest.
    pub image_path: Box<dyn Fn(&str) -> PathBuf + Send + Sync>,
    pub events: Box<dyn Fn(PoolEvent) + Send + Sync>,
}

/// Delete what a crash left: copies still `making`, and files in the pool
/// directory that no copy names.
pub fn recover(catalog: &Catalog, dir: &Path) -> Result<(), PoolError> {
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let copies = catalog.pool_copies()?;
    for c in &copies {
        if c.state == CopyState::Making {
            log::warn!(
                "pool: a copy of {} was being made when vdiskd stopped; removing it",
                c.digest
            );
            let _ = std::fs::remove_file(&c.path);
            catalog.remove_copy(c.id)?;
        }
    }
    let known: Vec<&PathBuf> = copies
        .iter()
        .filter(|c| c.state == CopyState::Ready)
        .map(|c| &c.path)
        .collect();
    for entry in std::fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .flatten()
    {
        let p = entry.path();
        if !known.contains(&&p) {
            log::warn!("pool: removing {}, which no copy names", p.display());
            let _ = std::fs::remove_file(&p);
        }
    }
    Ok(())
}

/// The background thread that keeps the pool full and the reserve free.
pub struct Filler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

struct Shared {
    stop: AtomicBool,
    wake: Mutex<bool>,
    cv: Condvar,
}

impl Filler {
    pub fn start(ctx: FillerContext) -> io::Result<Filler> {
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            wake: Mutex::new(false),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("pool-filler".into())
            .spawn(move || run(&ctx, &s))?;
        Ok(Filler {
            shared,
            thread: Some(thread),
        })
    }

    /// Look now (an entry changed, a copy was claimed).
    pub fn wake(&self) {
        *self.shared.wake.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.cv.notify_all();
    }

    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(ctx: &FillerContext, shared: &Shared) {
    // Copies are made in spare time: the guests' queue threads come first.
    crate::sys::background_thread();
    while !shared.stop.load(Ordering::Acquire) {
        if let Err(e) = tick(ctx, shared) {
            log::error!("pool: {e}");
        }
        let mut woken = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken {
            woken = shared
                .cv
                .wait_timeout(woken, TICK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *woken = false;
    }
}

/// One round: evict below the reserve, then make at most one copy.
fn tick(ctx: &FillerContext, shared: &Shared) -> Result<(), PoolError> {
    let entries = ctx.catalog.pool_entries()?;
    // What a copy takes on disk: the cached image's allocated bytes (a
    // sparse image's holes stay holes in its copies), not its size.
    let sizes: HashMap<String, u64> = entries
        .iter()
        .map(|e| {
            let bytes = std::fs::metadata((ctx.image_path)(&e.digest))
                .map(|m| {
                    use std::os::unix::fs::MetadataExt;
                    m.blocks().saturating_mul(512)
                })
                .unwrap_or(0);
            (e.digest.clone(), bytes)
        })
        .collect();
    let (free, total) = fs_space(&ctx.dir).map_err(io_err("statvfs", &ctx.dir))?;
    let reserve = ctx.config.reserve.bytes(total);
    let copies = ctx.catalog.pool_copies()?;

    // 1. Below the reserve: evict, lowest priority first.
    if free < reserve {
        let priority: HashMap<&str, u8> = entries
            .iter()
            .map(|e| (e.digest.as_str(), e.priority))
            .collect();
        let ready: Vec<Evictable> = copies
            .iter()
            .filter(|c| c.state == CopyState::Ready)
            .map(|c| Evictable {
                id: c.id,
                priority: priority.get(c.digest.as_str()).copied().unwrap_or(1),
                created: c.created,
                bytes: sizes.get(&c.digest).copied().unwrap_or(0),
            })
            .collect();
        let mut freed = 0u64;
        for id in choose_evictions(&ready, reserve - free) {
            if let Some(c) = copies.iter().find(|c| c.id == id) {
                evict(
                    ctx,
                    c,
                    &format!("free space {free} bytes is below the reserve {reserve}"),
                )?;
                freed = freed.saturating_add(sizes.get(&c.digest).copied().unwrap_or(0));
            }
        }
        if free.saturating_add(freed) < reserve {
            evict_unused_images(ctx, reserve - free - freed)?;
        }
        return Ok(());
    }

    // 2. An entry that now wants fewer copies than it has ready gives the
    //    oldest back: ready never exceeds wanted.
    for e in &entries {
        let want = wanted(&ctx.config.rule, e) as usize;
        let ready: Vec<&PoolCopy> = copies
            .iter()
            .filter(|c| c.digest == e.digest && c.state == CopyState::Ready)
            .collect();
        if ready.len() > want {
            for c in &ready[..ready.len() - want] {
                evict_copy(
                    ctx,
                    c,
                    &format!("the pool entry wants {want} ready copies"),
                    true,
                )?;
            }
            return Ok(());
        }
    }

    // 3. The most important image short of copies gets one, if it fits
    //    above the fill mark.
    let fill_mark = reserve.saturating_add(reserve / 2);
    for e in &entries {
        let have = copies.iter().filter(|c| c.digest == e.digest).count() as u32;
        if have >= wanted(&ctx.config.rule, e) {
            continue;
        }
        let size = sizes.get(&e.digest).copied().unwrap_or(0);
        if free.saturating_sub(size) < fill_mark {
            log::debug!(
                "pool: no room for a copy of {} ({size} bytes, {free} free, fill mark {fill_mark})",
                e.digest
            );
            continue;
        }
        make_copy(ctx, shared, &e.digest)?;
        // Look again at once: more may be wanted.
        *shared.wake.lock().unwrap_or_else(|e| e.into_inner()) = true;
        return Ok(());
    }
    Ok(())
}

/// Still short after the ready copies went: cached images that no volume
/// uses and no pool entry wants, oldest first, until `need` bytes are free.
/// The catalog refuses to forget an image a volume uses (checked in the
/// same transaction that forgets it), so a deploy that starts meanwhile
/// keeps its image.
fn evict_unused_images(ctx: &FillerContext, need: u64) -> Result<(), PoolError> {
    let used: Vec<String> = ctx
        .catalog
        .volumes()?
        .into_iter()
        .filter_map(|v| v.base)
        .collect();
    let pooled: Vec<String> = ctx
        .catalog
        .pool_entries()?
        .into_iter()
        .map(|e| e.digest)
        .collect();
    let mut images: Vec<_> = ctx
        .catalog
        .images()?
        .into_iter()
        .filter(|i| !used.contains(&i.digest) && !pooled.contains(&i.digest))
        .collect();
    images.sort_by_key(|i| (i.created, i.digest.clone()));
    let mut freed = 0u64;
    for img in images {
        if freed >= need {
            break;
        }
        if ctx.catalog.remove_image(&img.digest).is_err() {
            continue; // in use after all
        }
        let path = (ctx.image_path)(&img.digest);
        let bytes = std::fs::metadata(&path)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                m.blocks().saturating_mul(512)
            })
            .unwrap_or(0);
        let _ = std::fs::remove_file(&path);
        freed = freed.saturating_add(bytes);
        let reason = "free space is below the reserve and no volume or pool entry uses it";
        log::info!("pool: removed the cached image {}: {reason}", img.digest);
        (ctx.events)(PoolEvent::ImageEvicted {
            digest: img.digest.clone(),
            reason: reason.into(),
        });
    }
    Ok(())
}

fn evict(ctx: &FillerContext, c: &PoolCopy, reason: &str) -> Result<(), PoolError> {
    evict_copy(ctx, c, reason, false)
}

fn evict_copy(
    ctx: &FillerContext,
    c: &PoolCopy,
    reason: &str,
    trimmed: bool,
) -> Result<(), PoolError> {
    ctx.catalog.remove_copy(c.id)?;
    let _ = std::fs::remove_file(&c.path);
    log::info!("pool: evicted a copy of {}: {reason}", c.digest);
    (ctx.events)(PoolEvent::Evicted {
        digest: c.digest.clone(),
        reason: reason.to_string(),
        trimmed,
    });
    Ok(())
}

fn make_copy(ctx: &FillerContext, shared: &Shared, digest: &str) -> Result<(), PoolError> {
    let path = ctx.dir.join(format!(
        "{digest}-{}.raw",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    let id = ctx.catalog.begin_copy(digest, &path)?;
    let result = copy_file(
        &(ctx.image_path)(digest),
        &path,
        ctx.config.rate,
        &shared.stop,
    );
    match result {
        Ok(true) => {}
        Ok(false) => {
            // Stopped midway: nothing half made stays behind.
            let _ = std::fs::remove_file(&path);
            ctx.catalog.remove_copy(id)?;
            return Ok(());
        }
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            ctx.catalog.remove_copy(id)?;
            return Err(e);
        }
    }
    if ctx.catalog.finish_copy(id)? {
        log::info!("pool: a ready copy of {digest} is made");
        (ctx.events)(PoolEvent::CopyReady {
            digest: digest.into(),
        });
    } else {
        // The entry was unset while the copy was made.
        let _ = std::fs::remove_file(&path);
    }
    Ok(())
}

/// A sparse copy of `src` to the new file `dst` (zero chunks become
/// holes), at most `rate` bytes per second, fsynced. False when `stop` was
/// set midway.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    rate: Option<u64>,
    stop: &AtomicBool,
) -> Result<bool, PoolError> {
    let input = File::open(src).map_err(io_err("open", src))?;
    let size = input.metadata().map_err(io_err("stat", src))?.len();
    let out = File::options()
        .write(true)
        .create_new(true)
        .open(dst)
        .map_err(io_err("create", dst))?;
    if rustix::fs::ioctl_ficlone(&out, &input).is_ok() {
        out.sync_all().map_err(io_err("fsync", dst))?;
        return Ok(true);
    }
    let started = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    // Bytes read so far: what the rate limit counts (holes are skipped,
    // not read).
    let mut moved = 0u64;
    while off < size {
        if stop.load(Ordering::Acquire) {
            return Ok(false);
        }
        // Skip holes: a sparse image's empty GiBs are neither read nor
        // written (SEEK_DATA; a file system without it reads them).
        match rustix::fs::seek(&input, rustix::fs::SeekFrom::Data(off)) {
            Ok(data) if data > off => {
                off = data;
                continue;
            }
            Ok(_) => {}
            // ENXIO: no data past `off`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {}
        }
        let n = input
            .read_at(&mut buf[..CHUNK.min((size - off) as usize)], off)
            .map_err(io_err("read", src))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            out.write_all_at(&buf[..n], off)
                .map_err(io_err("write", dst))?;
        }
        off += n as u64;
        moved += n as u64;
        if let Some(rate) = rate.filter(|r| *r > 0) {
            // Ahead of the rate: wait until the bytes so far are due.
            let due = Duration::from_secs_f64(moved as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    out.set_len(size).map_err(io_err("size", dst))?;
    out.sync_all().map_err(io_err("fsync", dst))?;
    Ok(true)
}

#[cfg(test)]
mod tests;
