//! The overlay against a reference model: a plain buffer that receives the
//! same writes. Random unaligned-to-cluster writes, discards, write-zeroes,
//! flushes and reopen-after-flush, through both engines.

use std::os::unix::fs::FileExt;

use proptest::prelude::*;

use std::sync::Mutex;

use super::*;

const SIZE: u64 = 16 * CLUSTER_SIZE + 4096; // a partial last cluster
const BASE: u64 = 9 * CLUSTER_SIZE + 1536; // base shorter than the disk

struct Rig {
    dir: tempfile::TempDir,
    model: Vec<u8>,
    base: Vec<u8>,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let base: Vec<u8> = (0..BASE).map(|i| (i * 31 % 251) as u8 + 1).collect();
        std::fs::write(dir.path().join("base"), &base).unwrap();
        Overlay::create(&dir.path().join("data"), &dir.path().join("bitmap"), SIZE).unwrap();
        let mut model = base.clone();
        model.resize(SIZE as usize, 0);
        Rig { dir, model, base }
    }

    fn open(&self) -> Arc<Overlay> {
        let p = |n| self.dir.path().join(n);
        Arc::new(Overlay::open(&p("data"), &p("bitmap"), Some(&p("base"))).unwrap())
    }
}

fn run(e: &mut dyn Engine, op: Op) -> io::Result<u64> {
    e.push(op, 7)
        .map_err(|(err, _)| io::Error::other(err.to_string()))?;
    e.submit().unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    out.pop().unwrap().result
}

fn sl(buf: &mut [u8]) -> IoSlice {
    IoSlice {
        base: buf.as_mut_ptr() as usize,
        len: buf.len(),
    }
}

fn read_all(e: &mut dyn Engine) -> Vec<u8> {
    let mut buf = vec![0xeeu8; SIZE as usize];
    // Two slices split off-cluster, to exercise the sub-slicing.
    let (a, b) = buf.split_at_mut(3 * 4096 + 512);
    assert_eq!(run(e, Op::read(0, vec![sl(a), sl(b)])).unwrap(), SIZE);
    buf
}

#[derive(Clone, Debug)]
enum Step {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zeroes {
        sector: u64,
        sectors: u64,
        unmap: bool,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Flush,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    let total = SIZE / 512;
    let range = (0..total).prop_flat_map(move |s| (Just(s), 1..=(total - s).min(400)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Step::Write { sector, sectors, seed }),
        1 => range.clone().prop_map(|(sector, sectors)| Step::Discard { sector, sectors }),
        1 => (range.clone(), any::<bool>()).prop_map(|((sector, sectors), unmap)| Step::Zeroes { sector, sectors, unmap }),
        3 => range.prop_map(|(sector, sectors)| Step::Read { sector, sectors }),
        1 => Just(Step::Flush),
        1 => Just(Step::Reopen),
    ]
}

fn check(kind: EngineKind, steps: &[Step]) {
    let mut rig = Rig::new();
    let mut ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), kind, 16).unwrap();
    for st in steps {
        match *st {
            Step::Write {
                sector,
                sectors,
                seed,
            } => {
                let (off, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                let mut data: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                    .collect();
                rig.model[off..off + len].copy_from_slice(&data);
                let cut = len / 3;
                let (a, b) = data.split_at_mut(cut);
                let iov = if cut == 0 {
                    vec![sl(b)]
                } else {
                    vec![sl(a), sl(b)]
                };
                assert_eq!(run(&mut e, Op::write(off as u64, iov)).unwrap(), len as u64);
            }
            Step::Discard { sector, sectors }
            | Step::Zeroes {
                sector, sectors, ..
            } => {
                let (off, len) = (sector * 512, sectors * 512);
                rig.model[off as usize..(off + len) as usize].fill(0);
                let op = match *st {
                    Step::Discard { .. } => Op::discard(off, len),
                    Step::Zeroes { unmap, .. } => Op::write_zeroes(off, len, unmap),
                    _ => unreachable!(),
                };
                run(&mut e, op).unwrap();
            }
            Step::Read { sector, sectors } => {
                let (off, len) = ((sector * 512) as usize, (sectors * 512) as usize);
                let mut buf = vec![0xeeu8; len];
                run(&mut e, Op::read(off as u64, vec![sl(&mut buf)])).unwrap();
                assert_eq!(buf, rig.model[off..off + len], "read {off}+{len}");
            }
            Step::Flush => {
                run(&mut e, Op::flush()).unwrap();
            }
            Step::Reopen => {
                run(&mut e, Op::flush()).unwrap();
                drop(e);
                drop(ov);
                ov = rig.open();
                e = OverlayEngine::new(ov.clone(), kind, 16).unwrap();
            }
        }
    }
    assert_eq!(read_all(&mut e), rig.model);
    // The base is never written.
    assert_eq!(
        std::fs::read(rig.dir.path().join("base")).unwrap(),
        rig.base
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn random_operations_match_a_reference_model(steps in proptest::collection::vec(step(), 1..60), uring in any::<bool>()) {
        check(if uring { EngineKind::IoUring } else { EngineKind::Sync }, &steps);
    }
}

#[test]
fn thousands_of_operations_match_the_model() {
    // One long deterministic sequence (xorshift), thousands of operations.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let total = SIZE / 512;
    let steps: Vec<Step> = (0..3000)
        .map(|_| {
            let sector = next() % total;
            let sectors = 1 + next() % (total - sector).min(300);
            match next() % 12 {
                0..=6 => Step::Write {
                    sector,
                    sectors,
                    seed: next() as u8,
                },
                7 => Step::Discard { sector, sectors },
                8 => Step::Zeroes {
                    sector,
                    sectors,
                    unmap: next() % 2 == 0,
                },
                9 | 10 => Step::Read { sector, sectors },
                _ if next() % 10 == 0 => Step::Reopen,
                _ => Step::Flush,
            }
        })
        .collect();
    check(EngineKind::IoUring, &steps);
}

#[test]
fn a_fresh_overlay_reads_the_base_then_zeros() {
    let rig = Rig::new();
    let mut e = OverlayEngine::new(rig.open(), EngineKind::IoUring, 4).unwrap();
    assert_eq!(read_all(&mut e), rig.model);
}

#[test]
fn a_torn_bitmap_write_falls_back_to_the_previous_flush() {
    let rig = Rig::new();
    let ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), EngineKind::Sync, 4).unwrap();
    let mut a = vec![0x11u8; 512];
    run(&mut e, Op::write(0, vec![sl(&mut a)])).unwrap();
    run(&mut e, Op::flush()).unwrap(); // generation 2, slot 1
    let mut b = vec![0x22u8; 512];
    run(&mut e, Op::write(CLUSTER_SIZE * 3, vec![sl(&mut b)])).unwrap();
    run(&mut e, Op::flush()).unwrap(); // generation 3, slot 0
    drop(e);
    drop(ov);
    // Tear the newest slot (0): its checksum no longer matches.
    let bm = File::options()
        .write(true)
        .open(rig.dir.path().join("bitmap"))
        .unwrap();
    bm.write_all_at(&[0xff], HEADER).unwrap();
    let ov = rig.open();
    assert!(ov.is_allocated(0));
    assert!(
        !ov.is_allocated(3),
        "generation 3 was torn: back to generation 2"
    );
    // Both slots torn: a clear error, not wrong data.
    drop(ov);
    bm.write_all_at(&[0xff], slot_len(SIZE) + HEADER).unwrap();
    let p = |n| rig.dir.path().join(n);
    let err = Overlay::open(&p("data"), &p("bitmap"), Some(&p("base")))
        .err()
        .unwrap();
    assert!(matches!(err, OverlayError::Corrupt { .. }), "{err}");
}

#[test]
fn creating_a_huge_overlay_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    Overlay::create(&dir.path().join("d"), &dir.path().join("b"), 20 << 30).unwrap();
    let used = |n: &str| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(dir.path().join(n)).unwrap().blocks() * 512
    };
    assert!(used("d") == 0, "data file allocated {} bytes", used("d"));
    assert!(
        used("b") < 64 * 1024,
        "bitmap allocated {} bytes",
        used("b")
    );
}

/// What a restart after kill -9 sees: the files as they are, opened anew.
fn reopened(rig: &Rig) -> (Arc<Overlay>, Box<dyn Engine>) {
    let ov = rig.open();
    let e = OverlayEngine::new(ov.clone(), EngineKind::Sync, 4).unwrap();
    (ov, Box::new(e))
}

#[test]
fn write_through_allocations_are_durable_without_a_flush() {
    for kind in [EngineKind::Sync, EngineKind::IoUring] {
        let mut rig = Rig::new();
        let ov = rig.open();
        let mut e = OverlayEngine::new(ov.clone(), kind, 4).unwrap();
        e.set_write_through(true);
        // A partial first write (copy-up), a whole-cluster first write, a
        // write spanning an allocated and a fresh cluster, a write-zeroes
        // of a fresh cluster.
        let writes = [
            (512u64, 1024usize, 0x31u8),
            (2 * CLUSTER_SIZE, CLUSTER_SIZE as usize, 0x32),
            (CLUSTER_SIZE - 512, 1024, 0x33),
        ];
        for (off, len, byte) in writes {
            let mut data = vec![byte; len];
            rig.model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(
                run(&mut e, Op::write(off, vec![sl(&mut data)])).unwrap(),
                len as u64
            );
        }
        run(&mut e, Op::write_zeroes(5 * CLUSTER_SIZE, 4096, false)).unwrap();
        rig.model[(5 * CLUSTER_SIZE) as usize..(5 * CLUSTER_SIZE + 4096) as usize].fill(0);
        // No flush: the in-memory state is thrown away, as kill -9 would.
        drop(e);
        std::mem::forget(ov);
        let (ov2, mut e2) = reopened(&rig);
        for c in [0, 1, 2, 5] {
            assert!(ov2.is_allocated(c), "{kind:?}: cluster {c} lost its bit");
        }
        assert_eq!(read_all(e2.as_mut()), rig.model, "{kind:?}");
    }
}

#[test]
fn a_flush_waits_for_the_bitmap_another_flush_is_writing() {
    use std::sync::mpsc;
    let rig = Rig::new();
    let ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), EngineKind::Sync, 4).unwrap();
    let mut data = vec![0x5au8; 4096];
    run(&mut e, Op::write(3 * CLUSTER_SIZE, vec![sl(&mut data)])).unwrap();

    // Flush A stops between its data sync and its bitmap write.
    let (in_window, a_paused) = mpsc::channel::<()>();
    let (release, wait_release) = mpsc::channel::<()>();
    let wait_release = Mutex::new(wait_release);
    let in_window = Mutex::new(in_window);
    *ov.after_data_sync.lock().unwrap() = Some(Box::new(move || {
        let _ = in_window.lock().unwrap().send(());
        let _ = wait_release.lock().unwrap().recv();
    }));
    let a = {
        let ov = ov.clone();
        std::thread::spawn(move || ov.flush())
    };
    a_paused.recv().unwrap();
    // Flush B, from another queue, while A is in its window.
    let (b_done_tx, b_done) = mpsc::channel();
    let b = {
        let ov = ov.clone();
        std::thread::spawn(move || {
            let r = ov.flush();
            let _ = b_done_tx.send(());
            r
        })
    };
    let returned_early = b_done
        .recv_timeout(std::time::Duration::from_millis(300))
        .is_ok();
    // What a crash now would find on disk.
    let on_disk = rig.open().is_allocated(3);
    assert!(
        !on_disk,
        "the bitmap cannot be durable yet: A has not written it"
    );
    assert!(
        !returned_early,
        "flush B was acknowledged before the bitmap naming its cluster was durable"
    );
    release.send(()).unwrap();
    a.join().unwrap().unwrap();
    b.join().unwrap().unwrap();
    *ov.after_data_sync.lock().unwrap() = None;
    assert!(
        rig.open().is_allocated(3),
        "after both flushes the bitmap names it"
    );
}

#[test]
fn a_failed_data_sync_fails_every_later_flush() {
    let rig = Rig::new();
    let ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), EngineKind::IoUring, 4).unwrap();
    let mut data = vec![0x77u8; 4096];
    run(&mut e, Op::write(0, vec![sl(&mut data)])).unwrap();
    let dfile = File::open(rig.dir.path().join("data")).unwrap();
    failpoint::fail_syncs(&dfile, 1);
    let err = run(&mut e, Op::flush()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    // The fault is gone, but the page cache may have dropped the data:
    // flushes keep failing, with the reason kept.
    for _ in 0..3 {
        assert!(run(&mut e, Op::flush()).is_err());
    }
    assert!(ov.latch().reason().unwrap().contains("failed"));
    // Reads and writes go on.
    run(&mut e, Op::write(0, vec![sl(&mut data)])).unwrap();
    // A new open (an export restart) starts clean.
    drop(e);
    let (_, mut e2) = reopened(&rig);
    run(e2.as_mut(), Op::flush()).unwrap();
}

#[test]
fn a_failed_bitmap_write_is_retried_not_latched() {
    let rig = Rig::new();
    let ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), EngineKind::Sync, 4).unwrap();
    let mut data = vec![0x66u8; 4096];
    run(&mut e, Op::write(CLUSTER_SIZE, vec![sl(&mut data)])).unwrap();
    let bfile = File::open(rig.dir.path().join("bitmap")).unwrap();
    failpoint::fail_syncs(&bfile, 1);
    assert!(run(&mut e, Op::flush()).is_err());
    run(&mut e, Op::flush()).unwrap();
    assert!(rig.open().is_allocated(1));
}

#[test]
fn growing_in_use_keeps_every_cluster_and_serves_the_new_range() {
    let mut rig = Rig::new();
    let ov = rig.open();
    let mut e = OverlayEngine::new(ov.clone(), EngineKind::IoUring, 4).unwrap();
    let mut a = vec![0x41u8; 4096];
    run(&mut e, Op::write(CLUSTER_SIZE + 512, vec![sl(&mut a)])).unwrap();
    rig.model[(CLUSTER_SIZE + 512) as usize..(CLUSTER_SIZE + 512 + 4096) as usize].fill(0x41);
    let p = |n| rig.dir.path().join(n);
    let new_size = SIZE + 8 * CLUSTER_SIZE;
    ov.grow(new_size, &p("bitmap.grown"), &p("bitmap")).unwrap();
    assert_eq!(ov.size(), new_size);
    assert!(!p("bitmap.grown").exists());
    // The same engine writes past the old end; the old cluster is intact.
    let mut b = vec![0x42u8; 4096];
    run(&mut e, Op::write(SIZE + 2 * CLUSTER_SIZE, vec![sl(&mut b)])).unwrap();
    run(&mut e, Op::flush()).unwrap();
    rig.model.resize(new_size as usize, 0);
    rig.model[(SIZE + 2 * CLUSTER_SIZE) as usize..(SIZE + 2 * CLUSTER_SIZE + 4096) as usize]
        .fill(0x42);
    drop(e);
    // Reopened from disk: the new size, both clusters, the same content.
    let ov2 = rig.open();
    assert_eq!(ov2.size(), new_size);
    assert!(ov2.is_allocated(1));
    assert!(ov2.is_allocated((SIZE + 2 * CLUSTER_SIZE) / CLUSTER_SIZE));
    let mut e2 = OverlayEngine::new(ov2, EngineKind::Sync, 4).unwrap();
    let mut buf = vec![0xeeu8; new_size as usize];
    assert_eq!(
        run(&mut e2, Op::read(0, vec![sl(&mut buf)])).unwrap(),
        new_size
    );
    assert!(buf == rig.model, "content differs after growing");
    // Shrinking is not growing.
    assert!(ov.grow(SIZE, &p("bitmap.grown"), &p("bitmap")).is_err());
    assert_eq!(ov.size(), new_size);
}
