//! The overlay against a reference model: a plain buffer that receives the
//! same writes. Random unaligned-to-cluster writes, discards, write-zeroes,
//! flushes and reopen-after-flush, through both engines.

use std::os::unix::fs::FileExt;

use proptest::prelude::*;

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
fn creating_a_huge_overlay_is_quick_and_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    Overlay::create(&dir.path().join("d"), &dir.path().join("b"), 20 << 30).unwrap();
    let took = t.elapsed();
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
    eprintln!("20 GiB overlay created in {took:?}");
}
