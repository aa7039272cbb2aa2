//! The vhost-user-blk backend: features, config space, and the dispatch of
//! worker-thread events to each queue's [`QueueWorker`].
//!
//! One worker thread per queue (`queues_per_thread`), each with its own
//! engine behind its own mutex: the mutex is only ever contended by
//! GET_VRING_BASE (stop_vring), never by another queue, and the worker
//! holds it one bounded step at a time.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::os::fd::AsRawFd;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::VhostUserBackend;

use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::timerfd::TimerFd;

use super::config::DeviceConfig;
use super::events::ExportReporter;
use super::stats::{QueueStats, StatsSnapshot};
use super::worker::{serve, AtomicMem, QueueWorker, Vring, Wake};
use crate::block::{BlockError, Disk};

/// Largest queue we accept from a frontend (QEMU's default is 128,
/// cloud-hypervisor's 128 or 256; 1024 is virtio-blk's usual ceiling).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Operations one queue's engine keeps in flight; more wait in the
/// worker's backlog. 256 covers QD32 x several segments with room to spare.
pub const ENGINE_DEPTH: usize = 256;
/// How long a queue worker busy-polls its avail ring and engine after a
/// batch before it sleeps in epoll. 50 us covers a client's turnaround at
/// queue depth 1 (a few us) with room to spare, so a busy queue never
/// sleeps, while an idle one stops spinning after 50 us per kick.
/// `VDISK_POLL_US` overrides it (0 turns polling off).
pub const POLL_US: u64 = 50;

/// How often each queue looks at its avail ring without being kicked. A
/// frontend that reconnects (QEMU's `reconnect-ms` after a daemon restart)
/// sets the rings up again but does not kick them, and a guest using
/// EVENT_IDX does not kick again for requests it offered before: without a
/// look of our own those requests would wait forever. A look at an empty
/// or stopped ring is a lock and two loads, five times a second.
pub const RESCAN_MS: u64 = 200;

fn poll_interval() -> std::time::Duration {
    let us = std::env::var("VDISK_POLL_US")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(POLL_US);
    std::time::Duration::from_micros(us.min(10_000))
}

pub struct BlockDevice {
    cfg: DeviceConfig,
    workers: Vec<Mutex<QueueWorker>>,
    /// One periodic timer per queue thread: see [`RESCAN_MS`].
    rescans: Vec<Mutex<TimerFd>>,
    stats: Vec<Arc<QueueStats>>,
    event_idx: AtomicBool,
    dirty_log: AtomicBool,
    name: String,
    report: Arc<ExportReporter>,
}

impl BlockDevice {
    pub fn new(
        name: &str,
        disk: &Disk,
        cfg: DeviceConfig,
        mem: AtomicMem,
    ) -> Result<Self, BlockError> {
        let poll = poll_interval();
        let report = ExportReporter::new(name);
        let stats: Vec<_> = (0..cfg.num_queues)
            .map(|_| Arc::new(QueueStats::default()))
            .collect();
        let workers = stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let engine = disk.new_engine(ENGINE_DEPTH)?;
                let mut w = QueueWorker::new(engine, mem.clone(), s.clone(), report.clone(), i);
                w.set_poll(poll);
                Ok(Mutex::new(w))
            })
            .collect::<Result<_, BlockError>>()?;
        let rescans = (0..cfg.num_queues)
            .map(|_| {
                let mut t = TimerFd::new().map_err(|e| BlockError::EventFd(e.into()))?;
                let every = std::time::Duration::from_millis(RESCAN_MS);
                t.reset(every, Some(every))
                    .map_err(|e| BlockError::EventFd(e.into()))?;
                Ok(Mutex::new(t))
            })
            .collect::<Result<_, BlockError>>()?;
        Ok(BlockDevice {
            cfg,
            workers,
            rescans,
            stats,
            event_idx: AtomicBool::new(false),
            dirty_log: AtomicBool::new(false),
            name: name.to_string(),
            report,
        })
    }

    /// Where this export's events go (connections, failed I/O).
    pub fn reporter(&self) -> &Arc<ExportReporter> {
        &self.report
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// The epoll token of queue workers' completion notifiers: tokens up to
    /// `num_queues` belong to vhost-user-backend (queues and its exit event).
    pub fn completion_token(&self) -> u64 {
        u64::from(self.cfg.num_queues) + 1
    }

    /// The epoll token of the queue threads' rescan timers.
    pub fn rescan_token(&self) -> u64 {
        self.completion_token() + 1
    }

    /// The rescan timer to register with worker thread `i`'s epoll loop.
    pub fn rescan_fd(&self, i: usize) -> std::os::fd::RawFd {
        self.rescans[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_raw_fd()
    }

    fn worker(&self, i: usize) -> MutexGuard<'_, QueueWorker> {
        // A worker that panicked is a bug; its state is still consistent
        // enough to drain, so do not poison the whole device.
        self.workers[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fd to register with worker thread `i`'s epoll loop.
    pub fn notifier(&self, i: usize) -> std::os::fd::RawFd {
        self.worker(i).notifier()
    }

    /// Prepare for a new connection: drain every queue and take the new
    /// connection's guest memory.
    pub fn reset(&self, mem: &AtomicMem) {
        for i in 0..self.workers.len() {
            self.worker(i).reset(mem.clone());
        }
        self.event_idx.store(false, Ordering::Relaxed);
        self.dirty_log.store(false, Ordering::Relaxed);
        self.cfg.reset();
    }

    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::sum(self.stats.iter().map(|s| &**s))
    }
}

impl VhostUserBackend for BlockDevice {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.workers.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.cfg.features()
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        let log = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        self.dirty_log.store(log, Ordering::Relaxed);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.cfg.read(offset, size)
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.cfg.write(offset, buf).map_err(io::Error::other)?;
        let mode = if self.cfg.writeback() {
            "write-back"
        } else {
            "write-through"
        };
        log::info!("{}: the guest set the write cache to {mode}", self.name);
        Ok(())
    }

    fn update_memory(&self, _mem: AtomicMem) -> io::Result<()> {
        // The workers hold the same GuestMemoryAtomic the handler updates.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.workers.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC)
            .map_err(|e| log::error!("{}: cannot create a worker exit event: {e}", self.name))
            .ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(w) = self.workers.get(queue_index as usize) {
            w.lock()
                .unwrap_or_else(|e| e.into_inner())
                .stop(self.dirty_log.load(Ordering::Relaxed));
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let Some(vring) = vrings.first() else {
            return Ok(());
        };
        let Some(worker) = self.workers.get(thread_id) else {
            return Ok(());
        };
        // The worker's mutex and the vring lock are taken step by step
        // inside `serve`, so stop_vring and the message thread get in
        // between (see worker::MAX_BATCH).
        let token = u64::from(device_event);
        let wake = if token == self.completion_token() {
            Wake::Completion
        } else if token == self.rescan_token() {
            if let Some(t) = self.rescans.get(thread_id) {
                // Readable, so this read does not block.
                let _ = t.lock().unwrap_or_else(|e| e.into_inner()).wait();
            }
            Wake::Rescan
        } else {
            Wake::Kick
        };
        let result = serve(
            worker,
            vring,
            &self.cfg,
            self.event_idx.load(Ordering::Relaxed),
            self.dirty_log.load(Ordering::Relaxed),
            wake,
        );
        result.map_err(|e| {
            log::error!("{}: queue {thread_id} stopped: {e}", self.name);
            io::Error::from(e)
        })
    }
}
