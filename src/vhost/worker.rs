//! One queue's worker: pops descriptor chains, parses them, hands the
//! operations to this queue's own engine, and completes requests when the
//! engine reports back. Runs on the queue's vhost-user worker thread; the
//! used ring is updated and the guest signalled once per batch.

use std::collections::VecDeque;
use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{VringRwLock, VringStateMutGuard, VringT};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::Bytes;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};

use super::config::DeviceConfig;
use super::events::ExportReporter;
use super::request::{self, status, Kind, Refused, Region, Request};
use super::stats::QueueStats;
use crate::block::{self, Completion, Engine, IoSlice, Op};

pub type Mem = GuestMemoryMmap<BitmapMmapRegion>;
pub type AtomicMem = GuestMemoryAtomic<Mem>;
pub type Vring = VringRwLock<AtomicMem>;

/// Why a queue had to stop.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the avail ring is corrupt: {0}")]
    BrokenRing(#[source] virtio_queue::Error),
    #[error("descriptor head {0} is outside the queue or already in flight")]
    BadHead(u16),
    #[error("cannot update the used ring")]
    UsedRing(#[source] virtio_queue::Error),
    #[error("cannot signal the guest")]
    Signal(#[source] io::Error),
}

impl From<QueueError> for io::Error {
    fn from(e: QueueError) -> Self {
        io::Error::other(e)
    }
}

/// A request the engine is working on.
struct Pending {
    head: u16,
    status_addr: GuestAddress,
    status: u8,
    /// Engine operations still outstanding for this request.
    parts: u32,
    /// Bytes the device writes into guest memory, reported in the used ring.
    used_len: u32,
    /// Read targets, for dirty logging.
    read_regions: Vec<Region>,
    /// Keeps the guest memory the engine reads and writes mapped.
    mem: Arc<Mem>,
    is_write: bool,
    bytes: u64,
    /// When the pass that took it off the ring began (one clock read per
    /// pass, not per request).
    taken: Instant,
}

pub struct QueueWorker {
    // Field order matters: the engine drops (and drains) before the
    // pending table releases the memory it points into.
    engine: Box<dyn Engine>,
    pending: Vec<Option<Pending>>,
    free: Vec<u32>,
    /// Operations popped but not yet accepted by a full engine.
    backlog: VecDeque<(Op, u64)>,
    /// Heads in flight, indexed by head: a head seen twice is a broken ring.
    heads: Vec<bool>,
    completions: Vec<Completion>,
    mem: AtomicMem,
    vring: Option<Vring>,
    stats: Arc<QueueStats>,
    /// The export's observer and I/O error rate limit.
    report: Arc<ExportReporter>,
    index: usize,
    /// How long to busy-poll after a batch before sleeping.
    poll: Duration,
    /// When the current pass began taking chains.
    pass_start: Instant,
}

impl QueueWorker {
    pub fn new(
        engine: Box<dyn Engine>,
        mem: AtomicMem,
        stats: Arc<QueueStats>,
        report: Arc<ExportReporter>,
        index: usize,
    ) -> Self {
        QueueWorker {
            engine,
            pending: Vec::new(),
            free: Vec::new(),
            backlog: VecDeque::new(),
            heads: Vec::new(),
            completions: Vec::new(),
            mem,
            vring: None,
            stats,
            report,
            index,
            poll: Duration::ZERO,
            pass_start: Instant::now(),
        }
    }

    /// Busy-poll for this long after each batch (zero: never).
    pub fn set_poll(&mut self, poll: Duration) {
        self.poll = poll;
    }

    pub fn notifier(&self) -> std::os::fd::RawFd {
        self.engine.notifier()
    }

    /// Start over for a new connection: wait for everything in flight and
    /// forget the old rings and memory.
    pub fn reset(&mut self, mem: AtomicMem) {
        self.backlog.clear();
        block::drain(self.engine.as_mut());
        self.completions.clear();
        self.pending.clear();
        self.free.clear();
        self.heads.clear();
        self.vring = None;
        self.mem = mem;
    }

    /// A kick: serve the queue to the end (see [`serve`]).
    pub fn on_kick(
        &mut self,
        vring: &Vring,
        cfg: &DeviceConfig,
        event_idx: bool,
        dirty_log: bool,
    ) -> Result<(), QueueError> {
        serve(self, vring, cfg, event_idx, dirty_log, Wake::Kick)
    }

    /// The engine's notifier fired: complete what finished, then serve the
    /// queue as a kick would.
    pub fn on_completion(
        &mut self,
        vring: &Vring,
        cfg: &DeviceConfig,
        event_idx: bool,
        dirty_log: bool,
    ) -> Result<(), QueueError> {
        serve(self, vring, cfg, event_idx, dirty_log, Wake::Completion)
    }

    /// The start of a wake-up. While this thread is awake it reaps by
    /// itself: completions need not wake it (re-armed in [`Self::finish`]).
    fn begin(&mut self, vring: &Vring, cfg: &DeviceConfig, wake: Wake) -> Duration {
        if wake == Wake::Completion {
            self.engine.ack_notifier();
        }
        if self.vring.is_none() {
            self.vring = Some(vring.clone());
        }
        self.engine.set_write_through(!cfg.writeback());
        self.engine.set_notify(false);
        if wake == Wake::Rescan {
            // A look, not a wake-up by the guest: no poll window after it.
            Duration::ZERO
        } else {
            self.poll
        }
    }

    /// One bounded pass, holding the vring lock only inside: complete what
    /// the engine finished, take at most [`MAX_BATCH`] chains, start them,
    /// and signal the guest if the used ring changed. Guest notifications
    /// stay off (EVENT_IDX) until [`Self::finish`].
    fn pass(
        &mut self,
        vring: &Vring,
        cfg: &DeviceConfig,
        event_idx: bool,
        dirty_log: bool,
    ) -> Result<Pass, QueueError> {
        let mut state = vring.get_mut();
        let mut signal = self.reap(&mut state, dirty_log)?;
        let mut mem = self.mem.memory().into_inner();
        if event_idx && serving(&state) {
            match state.get_queue_mut().disable_notification(&*mem) {
                Ok(()) => {}
                // A ring outside mapped memory is not ready: nothing to take.
                Err(virtio_queue::Error::GuestMemory(e)) => {
                    log::debug!("queue {}: used ring not writable yet: {e}", self.index);
                    return Ok(Pass::Idle);
                }
                Err(e) => return Err(QueueError::UsedRing(e)),
            }
        }
        // A driver publishes a chain only after the frontend has mapped the
        // memory it uses (ADD_MEM_REG is acknowledged first). Read the avail
        // index, then take a memory view at least that new, and take no
        // chain beyond that index.
        let pending = self.pending_chains(&state, &mem)?;
        let take = pending.min(MAX_BATCH);
        if take > 0 {
            self.pass_start = Instant::now();
            mem = self.mem.memory().into_inner();
            let size = state.get_queue().size();
            let chains: Vec<_> = state
                .get_queue_mut()
                .iter(&*mem)
                .map_err(QueueError::BrokenRing)?
                .take(usize::from(take))
                .collect();
            for chain in chains {
                signal |= self.start(chain, size, cfg, &mem, &mut state)?;
            }
            self.submit();
            // Page-cache hits complete inside the submit call: finish them
            // now instead of on the next wake-up.
            signal |= self.reap(&mut state, dirty_log)?;
        }
        if signal {
            self.signal(&mut state, &mem)?;
        }
        Ok(if pending > take {
            Pass::More
        } else if take > 0 {
            Pass::Took
        } else {
            Pass::Idle
        })
    }

    /// One look while polling: true when the driver offered a chain or a
    /// completion was finished (either restarts the poll window).
    fn poll_once(&mut self, vring: &Vring, dirty_log: bool) -> Result<bool, QueueError> {
        let mut state = vring.get_mut();
        let mem = self.mem.memory().into_inner();
        if self.pending_chains(&state, &mem)? > 0 {
            return Ok(true);
        }
        if self.engine.has_completions() && self.reap(&mut state, dirty_log)? {
            self.signal(&mut state, &mem)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Before sleeping: turn guest notifications and the engine's notifier
    /// back on. Returns true when work arrived in between (a chain the
    /// driver offered before it saw notifications on, a completion that
    /// signalled nothing): the caller serves again instead of sleeping.
    fn finish(&mut self, vring: &Vring, event_idx: bool) -> Result<bool, QueueError> {
        let mut state = vring.get_mut();
        if event_idx && serving(&state) {
            let mem = self.mem.memory().into_inner();
            match state.get_queue_mut().enable_notification(&*mem) {
                Ok(true) => return Ok(true),
                Ok(false) => {}
                Err(virtio_queue::Error::GuestMemory(e)) => {
                    log::debug!("queue {}: used ring not writable yet: {e}", self.index);
                }
                Err(e) => return Err(QueueError::UsedRing(e)),
            }
        }
        self.engine.set_notify(true);
        if self.engine.has_completions() {
            self.engine.set_notify(false);
            return Ok(true);
        }
        Ok(false)
    }

    fn pending_chains(
        &self,
        state: &VringStateMutGuardOf<'_>,
        mem: &Mem,
    ) -> Result<u16, QueueError> {
        if !serving(state) {
            return Ok(0);
        }
        let queue = state.get_queue();
        let avail = match queue.avail_idx(mem, Ordering::Acquire) {
            Ok(a) => a,
            // The view this batch started with may predate the memory
            // table that holds the ring; and while a frontend is (re)setting
            // up a queue, its ring may briefly lie outside the memory it has
            // mapped. Neither is a broken ring: there is nothing to take
            // now, and the next kick looks again.
            Err(_) => match queue.avail_idx(&*self.mem.memory(), Ordering::Acquire) {
                Ok(a) => a,
                Err(virtio_queue::Error::GuestMemory(e)) => {
                    log::debug!("queue {}: avail ring not readable yet: {e}", self.index);
                    return Ok(0);
                }
                Err(e) => return Err(QueueError::BrokenRing(e)),
            },
        };
        Ok((avail - Wrapping(queue.next_avail())).0)
    }

    /// GET_VRING_BASE: wait for every request in flight and complete it,
    /// so the frontend gets a ring with nothing outstanding.
    pub fn stop(&mut self, dirty_log: bool) {
        let Some(vring) = self.vring.clone() else {
            block::drain(self.engine.as_mut());
            return;
        };
        let mem = self.mem.memory().into_inner();
        while self.engine.in_flight() > 0 || !self.backlog.is_empty() {
            self.submit();
            if let Err(e) = self.engine.wait() {
                log::error!("queue {}: waiting for in-flight I/O: {e}", self.index);
                break;
            }
            let mut state = vring.get_mut();
            match self.reap(&mut state, dirty_log) {
                Ok(true) => {
                    let _ = self.signal(&mut state, &mem);
                }
                Ok(false) => {}
                Err(e) => {
                    log::error!("queue {}: completing in-flight I/O: {e}", self.index);
                    break;
                }
            }
        }
    }

    fn submit(&mut self) {
        while let Some((op, ud)) = self.backlog.pop_front() {
            if let Err((_, op)) = self.engine.push(op, ud) {
                self.backlog.push_front((op, ud));
                break;
            }
        }
        if let Err(e) = self.engine.submit() {
            log::error!("queue {}: {e}", self.index);
        }
    }

    fn push(&mut self, op: Op, ud: u64) {
        if !self.backlog.is_empty() {
            self.backlog.push_back((op, ud));
            return;
        }
        if let Err((_, op)) = self.engine.push(op, ud) {
            self.backlog.push_back((op, ud));
        }
    }

    /// Parse one chain and start it. Returns true when it completed at once
    /// (the used ring changed).
    fn start(
        &mut self,
        chain: virtio_queue::DescriptorChain<&Mem>,
        queue_size: u16,
        cfg: &DeviceConfig,
        mem: &Arc<Mem>,
        state: &mut VringStateMutGuardOf<'_>,
    ) -> Result<bool, QueueError> {
        let head = chain.head_index();
        if head >= queue_size {
            return Err(QueueError::BadHead(head));
        }
        if self.heads.len() < usize::from(queue_size) {
            self.heads.resize(usize::from(queue_size), false);
        }
        if self.heads[usize::from(head)] {
            return Err(QueueError::BadHead(head));
        }
        let req = match request::parse(chain, cfg) {
            Ok(r) => r,
            Err(Refused {
                head,
                error,
                status,
            }) => {
                log::debug!("queue {}: refused request {head}: {error}", self.index);
                self.stats.errors.inc();
                if let Some(addr) = status {
                    let _ = mem.write_obj(error.status(), addr);
                }
                let len = u32::from(status.is_some());
                state
                    .get_queue_mut()
                    .add_used(&**mem, head, len)
                    .map_err(QueueError::UsedRing)?;
                return Ok(true);
            }
        };
        match req.kind {
            Kind::GetId => {
                let n = self.write_id(&req, cfg, mem);
                let _ = mem.write_obj(status::OK, req.status);
                state
                    .get_queue_mut()
                    .add_used(&**mem, head, n + 1)
                    .map_err(QueueError::UsedRing)?;
                Ok(true)
            }
            _ => {
                self.heads[usize::from(head)] = true;
                self.dispatch(req, mem);
                Ok(false)
            }
        }
    }

    fn write_id(&self, req: &Request, cfg: &DeviceConfig, mem: &Mem) -> u32 {
        let id = request::id_bytes(&cfg.serial, req.data_len as usize);
        let mut done = 0usize;
        for r in &req.data {
            if done == id.len() {
                break;
            }
            let n = (r.len as usize).min(id.len() - done);
            if mem.write_slice(&id[done..done + n], r.addr).is_err() {
                break;
            }
            done += n;
        }
        done as u32
    }

    /// Turn a request into engine operations.
    fn dispatch(&mut self, req: Request, mem: &Arc<Mem>) {
        let (ops, is_read, is_write) = match &req.kind {
            Kind::Read { offset } | Kind::Write { offset } => {
                let is_read = matches!(req.kind, Kind::Read { .. });
                match host_slices(mem, &req.data) {
                    Some(iov) if is_read => (vec![Op::read(*offset, iov)], true, false),
                    Some(iov) => (vec![Op::write(*offset, iov)], false, true),
                    None => (Vec::new(), is_read, !is_read),
                }
            }
            Kind::Flush => (vec![Op::flush()], false, false),
            Kind::Discard(ranges) => (
                ranges
                    .iter()
                    .map(|r| Op::discard(r.offset, r.len))
                    .collect(),
                false,
                false,
            ),
            Kind::WriteZeroes(ranges) => (
                ranges
                    .iter()
                    .map(|r| Op::write_zeroes(r.offset, r.len, r.unmap))
                    .collect(),
                false,
                false,
            ),
            // GET_ID completes in `start`; were one to get here, it fails
            // as IOERR (no operations) rather than bringing the queue down.
            Kind::GetId => (Vec::new(), false, false),
        };
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.pending.push(None);
                (self.pending.len() - 1) as u32
            }
        };
        let parts = ops.len() as u32;
        self.pending[slot as usize] = Some(Pending {
            head: req.head,
            status_addr: req.status,
            // A request whose memory could not be mapped fails here.
            status: if parts == 0 {
                status::IOERR
            } else {
                status::OK
            },
            parts,
            used_len: if is_read { req.data_len + 1 } else { 1 },
            read_regions: if is_read { req.data } else { Vec::new() },
            mem: mem.clone(),
            is_write,
            bytes: u64::from(req.data_len),
            taken: self.pass_start,
        });
        if parts == 0 {
            // Nothing to wait for: finish through the normal path.
            self.completions.push(Completion {
                user_data: u64::from(slot),
                result: Ok(0),
            });
            if let Some(p) = self.pending[slot as usize].as_mut() {
                p.parts = 1;
            }
            return;
        }
        for op in ops {
            self.push(op, u64::from(slot));
        }
    }

    /// Complete every finished operation. Returns true if the used ring
    /// changed.
    fn reap(
        &mut self,
        state: &mut VringStateMutGuardOf<'_>,
        dirty_log: bool,
    ) -> Result<bool, QueueError> {
        let mut changed = false;
        loop {
            self.engine.reap(&mut self.completions);
            if self.completions.is_empty() {
                return Ok(changed);
            }
            changed = true;
            // One clock read for every request this round completes.
            let now = Instant::now();
            let mut done = std::mem::take(&mut self.completions);
            for c in done.drain(..) {
                let slot = c.user_data as usize;
                let Some(p) = self.pending.get_mut(slot).and_then(Option::as_mut) else {
                    continue;
                };
                if let Err(e) = &c.result {
                    self.report.io_failed(self.index, e);
                    p.status = status::IOERR;
                }
                p.parts -= 1;
                if p.parts > 0 {
                    continue;
                }
                let p = self.pending[slot].take().expect("checked above");
                self.free.push(slot as u32);
                if p.status == status::OK {
                    if dirty_log {
                        mark_dirty(&p.mem, &p.read_regions);
                    }
                    let is_read = !p.read_regions.is_empty();
                    self.stats.record(p.is_write, is_read, p.bytes);
                    if p.is_write || is_read {
                        self.stats
                            .latency
                            .record(now.saturating_duration_since(p.taken));
                    }
                } else {
                    self.stats.errors.inc();
                }
                // The request's own view of guest memory: the one its
                // addresses were checked against.
                let mem = &*p.mem;
                let _ = mem.write_obj(p.status, p.status_addr);
                let used = if p.status == status::OK {
                    p.used_len
                } else {
                    1
                };
                self.heads[usize::from(p.head)] = false;
                state
                    .get_queue_mut()
                    .add_used(mem, p.head, used)
                    .map_err(QueueError::UsedRing)?;
            }
            self.completions = done;
            // Slots freed: operations waiting for the engine may go now; what
            // finishes inside that submit is reaped by the next round.
            if !self.backlog.is_empty() {
                self.submit();
            }
        }
    }

    fn signal(&self, state: &mut VringStateMutGuardOf<'_>, mem: &Mem) -> Result<(), QueueError> {
        if state
            .get_queue_mut()
            .needs_notification(mem)
            .map_err(QueueError::UsedRing)?
        {
            state.signal_used_queue().map_err(QueueError::Signal)?;
        }
        Ok(())
    }
}

type VringStateMutGuardOf<'a> = <Vring as VringStateMutGuard<'a, AtomicMem>>::G;

/// Most chains one pass takes before it lets go of the vring lock and the
/// worker's mutex. The vhost-user message thread needs them for
/// SET_FEATURES (LOG_ALL when the VM starts migrating), SET_VRING_CALL,
/// SET_VRING_ENABLE and GET_VRING_BASE, and QEMU waits for some of those
/// synchronously: a message waits at most one pass of this many requests
/// (tens of microseconds), however busy the guest keeps the queue.
pub const MAX_BATCH: u16 = 64;

/// What woke the queue's thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// The guest kicked.
    Kick,
    /// The engine's notifier: operations finished.
    Completion,
    /// The periodic rescan (see `device::RESCAN_MS`).
    Rescan,
}

/// What one pass found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    /// It took [`MAX_BATCH`] chains and more are waiting.
    More,
    /// It took the chains there were.
    Took,
    /// There was no chain to take.
    Idle,
}

/// True when the queue may be served. The frontend marks a queue not ready
/// (GET_VRING_BASE, before `stop_vring`) or disables it; a completion that
/// arrives then must not take chains from it, or the avail iterator's
/// "not ready" error would be taken for a broken ring and stop the queue
/// for good.
fn serving(state: &VringStateMutGuardOf<'_>) -> bool {
    state.get_queue().ready() && state.is_enabled()
}

/// How [`serve`] reaches the worker: directly (one owner, as in tests) or
/// through the device's mutex, taken once per step so that `stop_vring`
/// gets in between steps.
pub trait WorkerAccess {
    fn with<R>(&mut self, f: impl FnOnce(&mut QueueWorker) -> R) -> R;
}

impl WorkerAccess for &mut QueueWorker {
    fn with<R>(&mut self, f: impl FnOnce(&mut QueueWorker) -> R) -> R {
        f(self)
    }
}

impl WorkerAccess for &std::sync::Mutex<QueueWorker> {
    fn with<R>(&mut self, f: impl FnOnce(&mut QueueWorker) -> R) -> R {
        // A worker that panicked is a bug; its state is still consistent
        // enough to drain, so do not poison the whole device.
        f(&mut self.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Serve a wake-up to the end:
/// bounded passes while chains keep coming, then a poll window of the
/// worker's `poll` in which a new chain or a completion starts the passes
/// again, then guest notifications and the engine's notifier back on
/// before sleeping. The vring lock and the worker are held one step at a
/// time, never across the poll window or more than [`MAX_BATCH`] chains.
/// Polling saves the guest's kick and this thread's wake-up at low queue
/// depth, which is most of a 4 KiB request's latency.
pub fn serve(
    mut worker: impl WorkerAccess,
    vring: &Vring,
    cfg: &DeviceConfig,
    event_idx: bool,
    dirty_log: bool,
    wake: Wake,
) -> Result<(), QueueError> {
    let poll = worker.with(|w| w.begin(vring, cfg, wake));
    let result = serve_steps(&mut worker, vring, cfg, event_idx, dirty_log, poll);
    if result.is_err() {
        worker.with(|w| w.engine.set_notify(true));
    }
    result
}

fn serve_steps(
    worker: &mut impl WorkerAccess,
    vring: &Vring,
    cfg: &DeviceConfig,
    event_idx: bool,
    dirty_log: bool,
    poll: Duration,
) -> Result<(), QueueError> {
    loop {
        if worker.with(|w| w.pass(vring, cfg, event_idx, dirty_log))? == Pass::More {
            continue;
        }
        if !poll.is_zero() {
            let deadline = Instant::now() + poll;
            let mut found = false;
            loop {
                if worker.with(|w| w.poll_once(vring, dirty_log))? {
                    found = true;
                    break;
                }
                if Instant::now() >= deadline {
                    break;
                }
                // Yield rather than spin: when queue workers share a core
                // (more queues than cores, or a pinned daemon) a spinning
                // worker would hold the core for its whole time slice while
                // another has work.
                std::thread::yield_now();
            }
            if found {
                continue;
            }
        }
        if !worker.with(|w| w.finish(vring, event_idx))? {
            return Ok(());
        }
    }
}

/// Host addresses of guest regions, split where guest memory regions end.
fn host_slices(mem: &Mem, regions: &[Region]) -> Option<Vec<IoSlice>> {
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        for s in GuestMemoryBackend::get_slices(mem, r.addr, r.len as usize) {
            let s = s.ok()?;
            out.push(IoSlice {
                base: s.ptr_guard_mut().as_ptr() as usize,
                len: s.len(),
            });
        }
    }
    Some(out)
}

/// The kernel wrote these regions behind vm-memory's back: tell the
/// frontend's dirty log.
fn mark_dirty(mem: &Mem, regions: &[Region]) {
    for r in regions {
        for s in GuestMemoryBackend::get_slices(mem, r.addr, r.len as usize).flatten() {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod tests;
