//! The queue worker against a real vring in test memory: good requests,
//! bad ones mixed in, a broken ring, and a property test that throws
//! random descriptor tables and ring indexes at it.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use proptest::prelude::*;
use vhost_user_backend::VringT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};

use super::*;
use crate::block::{Disk, DiskSource, EngineKind, OpenOptions};
use crate::vhost::config::DeviceConfig;
use crate::vhost::request::{req_type, status};

const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUF: u64 = 0x10_0000;
const MEM_SIZE: usize = 0x100_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const DISK_SIZE: u64 = 1 << 20;

struct Rig {
    mem: AtomicMem,
    vring: Vring,
    worker: QueueWorker,
    cfg: DeviceConfig,
    _file: Option<tempfile::NamedTempFile>,
    avail_idx: u16,
    next_desc: u16,
}

fn cfg(readonly: bool) -> DeviceConfig {
    DeviceConfig {
        size: std::sync::atomic::AtomicU64::new(DISK_SIZE),
        num_queues: 1,
        queue_size: QSIZE,
        readonly,
        block_size: 512,
        serial: b"worker-test".to_vec(),
        writeback: AtomicBool::new(true),
    }
}

impl Rig {
    fn new(engine: EngineKind) -> Rig {
        let gm: Mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let mem = GuestMemoryAtomic::new(gm);
        let (disk, file) = match engine {
            EngineKind::Null => (
                Disk::open(&DiskSource::Null(DISK_SIZE), &OpenOptions::default()).unwrap(),
                None,
            ),
            kind => {
                let f = tempfile::NamedTempFile::new().unwrap();
                f.as_file().set_len(DISK_SIZE).unwrap();
                let opts = OpenOptions {
                    engine: Some(kind),
                    ..Default::default()
                };
                (
                    Disk::open(&DiskSource::File(f.path().into()), &opts).unwrap(),
                    Some(f),
                )
            }
        };
        let vring = Vring::new(mem.clone(), QSIZE).unwrap();
        vring.set_queue_size(QSIZE);
        vring.set_queue_info(DESC, AVAIL, USED).unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let worker = QueueWorker::new(
            disk.new_engine(64).unwrap(),
            mem.clone(),
            Arc::default(),
            ExportReporter::new("test"),
            0,
        );
        Rig {
            mem,
            vring,
            worker,
            cfg: cfg(false),
            _file: file,
            avail_idx: 0,
            next_desc: 0,
        }
    }

    fn m(&self) -> Arc<Mem> {
        self.mem.memory().into_inner()
    }

    /// Put a chain in the descriptor table and offer it.
    fn offer(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let m = self.m();
        let head = self.next_desc;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i == descs.len() - 1;
            let flags = if last { *flags } else { flags | F_NEXT };
            let next = (idx + 1) % QSIZE;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&raw, GuestAddress(DESC + u64::from(idx) * 16))
                .unwrap();
        }
        self.next_desc = (head + descs.len() as u16) % QSIZE;
        self.offer_head(head);
        head
    }

    fn offer_head(&mut self, head: u16) {
        let m = self.m();
        let slot = AVAIL + 4 + u64::from(self.avail_idx % QSIZE) * 2;
        m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        m.write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn header(&self, at: u64, ty: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m().write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Kick, then complete until nothing is in flight.
    fn run(&mut self, event_idx: bool) -> Result<(), QueueError> {
        self.worker
            .on_kick(&self.vring, &self.cfg, event_idx, false)?;
        for _ in 0..100 {
            self.worker
                .on_completion(&self.vring, &self.cfg, event_idx, false)?;
            if self.worker.engine.in_flight() == 0 && self.worker.backlog.is_empty() {
                break;
            }
            self.worker.engine.wait().unwrap();
        }
        Ok(())
    }

    fn used(&self) -> Vec<(u32, u32)> {
        let m = self.m();
        let idx: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = GuestAddress(USED + 4 + u64::from(i % QSIZE) * 8);
                (
                    m.read_obj(at).unwrap(),
                    m.read_obj(at.unchecked_add(4)).unwrap(),
                )
            })
            .collect()
    }

    fn status(&self, at: u64) -> u8 {
        self.m().read_obj(GuestAddress(at)).unwrap()
    }
}

#[test]
fn write_then_read_back_through_the_sync_and_uring_engines() {
    for kind in [EngineKind::Sync, EngineKind::IoUring] {
        for event_idx in [false, true] {
            let mut r = Rig::new(kind);
            let m = r.m();
            let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
            m.write_slice(&pattern, GuestAddress(BUF + 0x1000)).unwrap();
            r.header(BUF, req_type::OUT, 16);
            // Scatter-gather: two data descriptors.
            let w = r.offer(&[
                (BUF, 16, 0),
                (BUF + 0x1000, 4096, 0),
                (BUF + 0x2000, 4096, 0),
                (BUF + 0x9000, 1, F_WRITE),
            ]);
            r.run(event_idx).unwrap();
            assert_eq!(r.status(BUF + 0x9000), status::OK);
            r.header(BUF + 0x100, req_type::FLUSH, 0);
            r.offer(&[(BUF + 0x100, 16, 0), (BUF + 0x9001, 1, F_WRITE)]);
            r.header(BUF + 0x200, req_type::IN, 16);
            let rd = r.offer(&[
                (BUF + 0x200, 16, 0),
                (BUF + 0x4000, 8192, F_WRITE),
                (BUF + 0x9002, 1, F_WRITE),
            ]);
            r.run(event_idx).unwrap();
            assert_eq!(r.status(BUF + 0x9001), status::OK);
            assert_eq!(r.status(BUF + 0x9002), status::OK);
            let mut back = vec![0u8; 8192];
            m.read_slice(&mut back, GuestAddress(BUF + 0x4000)).unwrap();
            assert_eq!(back, pattern, "{kind:?}");
            let used = r.used();
            assert_eq!(used.len(), 3);
            assert!(used.contains(&(u32::from(w), 1)));
            assert!(used.contains(&(u32::from(rd), 8193)));
            if let Some(f) = &r._file {
                let content = std::fs::read(f.path()).unwrap();
                assert_eq!(&content[8192..16384], &pattern[..]);
            }
        }
    }
}

#[test]
fn bad_requests_get_their_status_and_the_queue_goes_on() {
    let mut r = Rig::new(EngineKind::Sync);
    r.header(BUF, req_type::IN, (DISK_SIZE / 512) - 1); // straddles the end
    r.offer(&[
        (BUF, 16, 0),
        (BUF + 0x1000, 1024, F_WRITE),
        (BUF + 0x9000, 1, F_WRITE),
    ]);
    r.header(BUF + 0x100, 77, 0); // unknown type
    r.offer(&[(BUF + 0x100, 16, 0), (BUF + 0x9001, 1, F_WRITE)]);
    r.header(BUF + 0x200, req_type::GET_ID, 0);
    r.offer(&[
        (BUF + 0x200, 16, 0),
        (BUF + 0x3000, 20, F_WRITE),
        (BUF + 0x9002, 1, F_WRITE),
    ]);
    r.header(BUF + 0x300, req_type::IN, 0); // good
    r.offer(&[
        (BUF + 0x300, 16, 0),
        (BUF + 0x4000, 512, F_WRITE),
        (BUF + 0x9003, 1, F_WRITE),
    ]);
    r.run(true).unwrap();
    assert_eq!(r.status(BUF + 0x9000), status::IOERR);
    assert_eq!(r.status(BUF + 0x9001), status::UNSUPP);
    assert_eq!(r.status(BUF + 0x9002), status::OK);
    assert_eq!(r.status(BUF + 0x9003), status::OK);
    let mut id = [0u8; 20];
    r.m()
        .read_slice(&mut id, GuestAddress(BUF + 0x3000))
        .unwrap();
    assert_eq!(&id[..11], b"worker-test");
    assert_eq!(r.used().len(), 4);
}

#[test]
fn a_corrupt_avail_index_stops_the_queue() {
    let mut r = Rig::new(EngineKind::Null);
    // The driver claims more new buffers than the queue holds.
    r.m()
        .write_obj((QSIZE + 5).to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    assert!(matches!(r.run(false), Err(QueueError::BrokenRing(_))));
}

#[test]
fn a_head_offered_twice_while_in_flight_stops_the_queue() {
    let mut r = Rig::new(EngineKind::Sync);
    r.header(BUF, req_type::IN, 0);
    let head = r.offer(&[
        (BUF, 16, 0),
        (BUF + 0x1000, 512, F_WRITE),
        (BUF + 0x9000, 1, F_WRITE),
    ]);
    r.offer_head(head);
    assert!(matches!(r.run(false), Err(QueueError::BadHead(h)) if h == head));
}

#[test]
fn a_head_outside_the_queue_stops_the_queue() {
    let mut r = Rig::new(EngineKind::Null);
    r.offer_head(QSIZE + 3);
    assert!(matches!(r.run(false), Err(QueueError::BadHead(_))));
}

#[test]
fn write_through_after_the_guest_clears_writeback() {
    let mut r = Rig::new(EngineKind::IoUring);
    r.cfg
        .write(crate::vhost::config::WRITEBACK_OFFSET as u32, &[0])
        .unwrap();
    r.header(BUF, req_type::OUT, 0);
    r.offer(&[
        (BUF, 16, 0),
        (BUF + 0x1000, 4096, 0),
        (BUF + 0x9000, 1, F_WRITE),
    ]);
    r.run(true).unwrap();
    assert_eq!(r.status(BUF + 0x9000), status::OK);
}

/// Random descriptor tables, avail rings and headers: the worker must
/// never panic, and whatever it puts in the used ring must name a real
/// head. Run longer with PROPTEST_CASES=100000.
type RandomRing = (Vec<(u64, u32, u16, u16)>, Vec<u16>, u16, Vec<(u32, u64)>);

fn random_ring() -> impl Strategy<Value = RandomRing> {
    let addr = prop_oneof![
        4 => (0u64..16).prop_map(|i| BUF + i * 0x1000),
        1 => (0u64..16).prop_map(|i| BUF + i * 0x1000 + 7),
        1 => Just(MEM_SIZE as u64 - 8),
        1 => any::<u64>(),
        1 => Just(DESC),
    ];
    let len = prop_oneof![
        Just(16u32),
        Just(1),
        Just(512),
        Just(4096),
        0u32..9000,
        Just(u32::MAX),
        Just(16 * 4)
    ];
    let flags = 0u16..8; // NEXT, WRITE, INDIRECT in any mix
    let desc = (addr, len, flags, 0u16..20);
    let header = (
        prop_oneof![
            Just(0u32),
            Just(1),
            Just(4),
            Just(8),
            Just(11),
            Just(13),
            any::<u32>()
        ],
        prop_oneof![0u64..4096, any::<u64>()],
    );
    (
        proptest::collection::vec(desc, QSIZE as usize),
        proptest::collection::vec(0u16..20, QSIZE as usize),
        0u16..40,
        proptest::collection::vec(header, 16),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_rings_never_panic((descs, avail, avail_idx, headers) in random_ring(), engine in prop_oneof![Just(EngineKind::Null), Just(EngineKind::Sync), Just(EngineKind::IoUring)], event_idx in any::<bool>()) {
        let mut r = Rig::new(engine);
        let m = r.m();
        for (i, (ty, sector)) in headers.iter().enumerate() {
            let at = BUF + i as u64 * 0x1000;
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&ty.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            m.write_slice(&h, GuestAddress(at)).unwrap();
        }
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            m.write_slice(&raw, GuestAddress(DESC + i as u64 * 16)).unwrap();
        }
        for (i, head) in avail.iter().enumerate() {
            m.write_obj(head.to_le(), GuestAddress(AVAIL + 4 + i as u64 * 2)).unwrap();
        }
        m.write_obj(avail_idx.to_le(), GuestAddress(AVAIL + 2)).unwrap();
        // A guest may point its buffers at its own rings and scribble over
        // them: that is its own memory. The used ring is only checked when
        // no buffer can reach the rings (no indirect tables, all direct
        // buffers above them).
        let rings_untouchable = descs
            .iter()
            .all(|&(addr, _, flags, _)| flags & 4 == 0 && addr >= USED + 0x1000);
        if r.run(event_idx).is_ok() && rings_untouchable {
            let used = r.used();
            prop_assert!(used.len() <= usize::from(avail_idx));
            for (id, len) in used {
                prop_assert!(id < u32::from(QSIZE));
                prop_assert!(len <= 1 << 24);
            }
        }
        // Whatever happened, the worker can be drained and reused.
        r.worker.stop(false);
        r.worker.reset(r.mem.clone());
    }
}

/// An engine whose flushes fail, as fsync does after a lost write-back.
struct FailingFlush(crate::block::SyncEngine);

impl crate::block::Engine for FailingFlush {
    fn push(
        &mut self,
        op: crate::block::Op,
        ud: u64,
    ) -> Result<(), (crate::block::BlockError, crate::block::Op)> {
        if op.kind == crate::block::OpKind::Flush {
            // Turn the flush into a read of nothing, then fail it on reap.
            self.0
                .push(crate::block::Op::read(0, Vec::new()), ud | 1 << 63)
        } else {
            self.0.push(op, ud)
        }
    }
    fn submit(&mut self) -> Result<(), crate::block::BlockError> {
        self.0.submit()
    }
    fn reap(&mut self, out: &mut Vec<crate::block::Completion>) {
        let start = out.len();
        self.0.reap(out);
        for c in &mut out[start..] {
            if c.user_data & 1 << 63 != 0 {
                c.user_data &= !(1 << 63);
                c.result = Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
        }
    }
    fn wait(&mut self) -> Result<(), crate::block::BlockError> {
        self.0.wait()
    }
    fn notifier(&self) -> std::os::fd::RawFd {
        self.0.notifier()
    }
    fn ack_notifier(&self) {
        self.0.ack_notifier()
    }
    fn in_flight(&self) -> usize {
        self.0.in_flight()
    }
    fn capacity(&self) -> usize {
        self.0.capacity()
    }
    fn name(&self) -> &'static str {
        "failing-flush"
    }
}

#[test]
fn a_failed_fsync_reaches_the_guest_as_ioerr() {
    let mut r = Rig::new(EngineKind::Null);
    r.worker = QueueWorker::new(
        Box::new(FailingFlush(crate::block::SyncEngine::null(16).unwrap())),
        r.mem.clone(),
        Arc::default(),
        ExportReporter::new("test"),
        0,
    );
    r.header(BUF, req_type::FLUSH, 0);
    r.offer(&[(BUF, 16, 0), (BUF + 0x9000, 1, F_WRITE)]);
    r.header(BUF + 0x100, req_type::IN, 0);
    r.offer(&[
        (BUF + 0x100, 16, 0),
        (BUF + 0x1000, 512, F_WRITE),
        (BUF + 0x9001, 1, F_WRITE),
    ]);
    r.run(true).unwrap();
    assert_eq!(r.status(BUF + 0x9000), status::IOERR);
    assert_eq!(r.status(BUF + 0x9001), status::OK);
}

#[test]
fn a_completion_on_a_queue_marked_not_ready_takes_nothing_and_the_queue_lives() {
    for disable in [false, true] {
        let mut r = Rig::new(EngineKind::Sync);
        r.header(BUF, req_type::IN, 0);
        r.offer(&[
            (BUF, 16, 0),
            (BUF + 0x1000, 512, F_WRITE),
            (BUF + 0x9000, 1, F_WRITE),
        ]);
        // GET_VRING_BASE marks the queue not ready before stop_vring; a
        // frontend may also disable it (SET_VRING_ENABLE 0).
        if disable {
            r.vring.set_enabled(false);
        } else {
            r.vring.set_queue_ready(false);
        }
        r.worker
            .on_completion(&r.vring, &r.cfg, true, false)
            .expect("a queue that is not ready has nothing to take, it is not broken");
        assert!(r.used().is_empty(), "took a chain from a stopped queue");
        // Resumed (or the guest rebooted on the same connection): it serves.
        r.vring.set_queue_ready(true);
        r.vring.set_enabled(true);
        r.run(true).unwrap();
        assert_eq!(r.used().len(), 1);
        assert_eq!(r.status(BUF + 0x9000), status::OK);
    }
}

/// The vhost-user message thread needs the vring lock and stop_vring needs
/// the worker's mutex: while a guest keeps the queue busy without a pause,
/// each must be had within 100 ms.
#[test]
fn control_messages_get_the_locks_while_the_guest_keeps_the_queue_busy() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    let r = Rig::new(EngineKind::Null);
    const CHAINS: u16 = 4;
    let m = r.m();
    // Four chains of three descriptors (header, 4 KiB read, status).
    for c in 0..CHAINS {
        let head = c * 3;
        let hdr = BUF + u64::from(c) * 0x100;
        r.header(hdr, req_type::IN, u64::from(c) * 8);
        let descs = [
            (hdr, 16u32, F_NEXT),
            (
                BUF + 0x10000 + u64::from(c) * 0x1000,
                4096,
                F_NEXT | F_WRITE,
            ),
            (BUF + 0x9000 + u64::from(c), 1, F_WRITE),
        ];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&addr.to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&(idx + 1).to_le_bytes());
            m.write_slice(&raw, GuestAddress(DESC + u64::from(idx) * 16))
                .unwrap();
        }
    }
    let vring = r.vring.clone();
    let cfg = r.cfg;
    let mut worker = r.worker;
    worker.set_poll(Duration::from_micros(50));
    let worker = Arc::new(Mutex::new(worker));
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));

    // The guest: offers every chain, and offers each again as soon as it
    // comes back in the used ring. The queue is never idle.
    let guest = {
        let (mem, stop, served) = (r.mem.clone(), stop.clone(), served.clone());
        std::thread::spawn(move || {
            let m = mem.memory();
            let offer = |avail: &mut u16, head: u16| {
                let slot = AVAIL + 4 + u64::from(*avail % QSIZE) * 2;
                m.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
                *avail = avail.wrapping_add(1);
                m.write_obj(avail.to_le(), GuestAddress(AVAIL + 2)).unwrap();
            };
            let mut avail = 0u16;
            for c in 0..CHAINS {
                offer(&mut avail, c * 3);
            }
            let mut seen = 0u16;
            while !stop.load(Ordering::Relaxed) {
                let used: u16 = m.read_obj(GuestAddress(USED + 2)).unwrap();
                while seen != used {
                    let at = GuestAddress(USED + 4 + u64::from(seen % QSIZE) * 8);
                    let id: u32 = m.read_obj(at).unwrap();
                    offer(&mut avail, id as u16);
                    seen = seen.wrapping_add(1);
                    served.fetch_add(1, Ordering::Relaxed);
                }
                std::hint::spin_loop();
            }
        })
    };
    // The queue's thread: serves kick after kick.
    let thread = {
        let (worker, vring, stop) = (worker.clone(), vring.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                serve(&*worker, &vring, &cfg, false, false, Wake::Kick).unwrap();
            }
        })
    };
    let start = Instant::now();
    while served.load(Ordering::Relaxed) < 1000 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the load never started"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut worst_vring = Duration::ZERO;
    let mut worst_worker = Duration::ZERO;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        let t = Instant::now();
        drop(vring.get_mut());
        worst_vring = worst_vring.max(t.elapsed());
        let t = Instant::now();
        drop(worker.lock().unwrap());
        worst_worker = worst_worker.max(t.elapsed());
    }
    let before = served.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(20));
    let still_busy = served.load(Ordering::Relaxed) > before;
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    thread.join().unwrap();
    assert!(still_busy, "the load stopped, so the test proves nothing");
    assert!(
        worst_vring < Duration::from_millis(100),
        "the vring lock took {worst_vring:?} to get under load"
    );
    assert!(
        worst_worker < Duration::from_millis(100),
        "the worker took {worst_worker:?} to get under load"
    );
}
