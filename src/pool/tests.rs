//! The pool's rules against a reference model, and the copy routine.

use proptest::prelude::*;

use super::*;

#[test]
fn copies_follow_the_priority_rule_unless_given() {
    let e = |priority, copies| PoolEntry {
        digest: "d".into(),
        priority,
        copies,
        hits: 0,
        misses: 0,
        last_claim: None,
    };
    let rule = CopiesRule::default();
    let got: Vec<u32> = (1..=10).map(|p| wanted(&rule, &e(p, None))).collect();
    assert_eq!(got, [0, 0, 0, 1, 1, 1, 2, 2, 4, 4]);
    assert_eq!(wanted(&rule, &e(1, Some(3))), 3);
    assert_eq!(wanted(&rule, &e(10, Some(0))), 0);
    assert_eq!(rule.describe(), "1-3:0, 4-6:1, 7-8:2, 9-10:4");
}

#[test]
fn the_rule_is_configurable_and_checked() {
    let r = CopiesRule::parse("1-5:0, 6:1, 7-9:3, 10:8").unwrap();
    let got: Vec<u32> = (1..=10).map(|p| r.copies(p)).collect();
    assert_eq!(got, [0, 0, 0, 0, 0, 1, 3, 3, 3, 8]);
    assert_eq!(r.describe(), "1-5:0, 6:1, 7-9:3, 10:8");
    assert_eq!(CopiesRule::parse(&r.describe()).unwrap(), r);
    for (bad, why) in [
        ("1-9:1", "priority 10 has no count"),
        ("1-10:1, 5:2", "given twice"),
        ("0-10:1", "1 to 10"),
        ("1-10:65", "0 to 64"),
        ("1-10", "PRIORITIES:COPIES"),
    ] {
        let e = CopiesRule::parse(bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[test]
fn reserves_parse_or_say_why() {
    assert_eq!(Reserve::parse("10%").unwrap(), Reserve::Percent(10));
    assert_eq!(Reserve::parse("2G").unwrap(), Reserve::Bytes(2 << 30));
    assert_eq!(Reserve::Percent(10).bytes(1000), 100);
    for bad in ["100%", "-1%", "lots", ""] {
        let e = Reserve::parse(bad).unwrap_err().to_string();
        assert!(e.contains("reserve"), "{bad}: {e}");
    }
}

fn evictable() -> impl Strategy<Value = Vec<Evictable>> {
    proptest::collection::vec((1u8..=10, 0i64..100, 1u64..1000), 0..30).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (priority, created, bytes))| Evictable {
                id: i as i64,
                priority,
                created,
                bytes,
            })
            .collect()
    })
}

proptest! {
    /// The model: enough is freed when it can be; nothing is evicted while
    /// a copy of lower priority (or the same priority and older) is kept;
    /// and no more is evicted than needed (without the last one chosen,
    /// the need would not be met).
    #[test]
    fn evictions_free_enough_lowest_priority_first(ready in evictable(), need in 0u64..10_000) {
        let chosen = choose_evictions(&ready, need);
        let freed: u64 = chosen.iter().map(|id| ready[*id as usize].bytes).sum();
        let all: u64 = ready.iter().map(|e| e.bytes).sum();
        prop_assert!(freed >= need.min(all));
        for id in &chosen {
            let e = &ready[*id as usize];
            for kept in ready.iter().filter(|k| !chosen.contains(&k.id)) {
                prop_assert!(
                    (kept.priority, kept.created, kept.id) > (e.priority, e.created, e.id),
                    "evicted {e:?} while keeping {kept:?}"
                );
            }
        }
        if let Some(last) = chosen.last() {
            prop_assert!(freed - ready[*last as usize].bytes < need);
        }
    }
}

#[test]
fn a_copy_is_sparse_complete_and_stoppable() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    let f = File::create(&src).unwrap();
    f.set_len(8 << 20).unwrap();
    f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
    f.write_all_at(&[9u8; 512], (8 << 20) - 512).unwrap();
    drop(f);
    let stop = AtomicBool::new(false);
    let dst = dir.path().join("dst");
    assert!(copy_file(&src, &dst, None, &stop).unwrap());
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&src).unwrap());
    use std::os::unix::fs::MetadataExt;
    assert!(
        std::fs::metadata(&dst).unwrap().blocks() * 512 <= 2 << 20,
        "not sparse"
    );
    // Rate-limited: 8 MiB of data at 32 MiB/s takes about a quarter of a
    // second (holes are skipped, so the file is dense).
    let dense = dir.path().join("dense");
    std::fs::write(&dense, vec![1u8; 8 << 20]).unwrap();
    let t = Instant::now();
    assert!(copy_file(&dense, &dir.path().join("slow"), Some(32 << 20), &stop).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("slow")).unwrap(),
        vec![1u8; 8 << 20]
    );
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    // Stopped: says so.
    stop.store(true, Ordering::Release);
    assert!(!copy_file(&src, &dir.path().join("stopped"), None, &stop).unwrap());
}
