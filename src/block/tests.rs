//! Engine tests: the same operations through every engine, on a real file.

use std::os::unix::fs::FileExt;

use super::*;

const SIZE: u64 = 4 << 20;

fn file() -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(SIZE).unwrap();
    f
}

fn open(f: &tempfile::NamedTempFile, kind: EngineKind, direct: bool) -> Disk {
    let opts = OpenOptions {
        engine: Some(kind),
        direct,
        readonly: false,
    };
    Disk::open(&DiskSource::File(f.path().into()), &opts).unwrap()
}

fn slice(buf: &mut [u8]) -> IoSlice {
    IoSlice {
        base: buf.as_mut_ptr() as usize,
        len: buf.len(),
    }
}

/// Push one op, submit, and wait for its completion.
fn run(e: &mut dyn Engine, op: Op) -> std::io::Result<u64> {
    e.push(op, 42)
        .map_err(|(err, _)| std::io::Error::other(err.to_string()))?;
    e.submit().unwrap();
    let mut out = Vec::new();
    while out.is_empty() {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].user_data, 42);
    out.pop().unwrap().result
}

fn engines() -> Vec<(EngineKind, bool)> {
    vec![
        (EngineKind::IoUring, false),
        (EngineKind::IoUring, true),
        (EngineKind::Sync, false),
        (EngineKind::Sync, true),
    ]
}

/// A page-aligned buffer, so O_DIRECT can take it.
fn aligned(len: usize) -> (Vec<u8>, usize) {
    let v = vec![0u8; len + 4096];
    let off = (4096 - (v.as_ptr() as usize % 4096)) % 4096;
    (v, off)
}

#[test]
fn write_read_flush_with_scatter_gather() {
    for (kind, direct) in engines() {
        let f = file();
        let disk = open(&f, kind, direct);
        let mut e = disk.new_engine(8).unwrap();
        let (mut a, ao) = aligned(8192);
        for (i, b) in a[ao..ao + 8192].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let (mut b, bo) = aligned(4096);
        b[bo..bo + 4096].fill(0xab);
        let iov = vec![slice(&mut a[ao..ao + 8192]), slice(&mut b[bo..bo + 4096])];
        assert_eq!(run(e.as_mut(), Op::write(65536, iov)).unwrap(), 12288);
        assert_eq!(run(e.as_mut(), Op::flush()).unwrap(), 0);
        let (mut r, ro) = aligned(12288);
        assert_eq!(
            run(
                e.as_mut(),
                Op::read(65536, vec![slice(&mut r[ro..ro + 12288])])
            )
            .unwrap(),
            12288
        );
        assert_eq!(
            &r[ro..ro + 8192],
            &a[ao..ao + 8192],
            "{kind:?} direct={direct}"
        );
        assert_eq!(&r[ro + 8192..ro + 12288], &b[bo..bo + 4096]);
        let mut host = vec![0u8; 12288];
        f.as_file().read_exact_at(&mut host, 65536).unwrap();
        assert_eq!(&host[..], &r[ro..ro + 12288]);
    }
}

#[test]
fn unaligned_buffers_work_with_direct_on() {
    let f = file();
    let disk = open(&f, EngineKind::IoUring, true);
    let mut e = disk.new_engine(8).unwrap();
    let (mut a, ao) = aligned(1024);
    // 512 bytes at an odd address: O_DIRECT would refuse it.
    let odd = &mut a[ao + 3..ao + 3 + 512];
    odd.fill(0x5a);
    assert_eq!(
        run(e.as_mut(), Op::write(512, vec![slice(odd)])).unwrap(),
        512
    );
    let mut host = vec![0u8; 512];
    f.as_file().read_exact_at(&mut host, 512).unwrap();
    assert!(host.iter().all(|&b| b == 0x5a));
}

#[test]
fn discard_and_write_zeroes_read_back_zeros() {
    for (kind, _) in engines() {
        let f = file();
        f.as_file()
            .write_all_at(&vec![0xffu8; SIZE as usize], 0)
            .unwrap();
        let disk = open(&f, kind, false);
        let mut e = disk.new_engine(8).unwrap();
        assert_eq!(run(e.as_mut(), Op::discard(4096, 8192)).unwrap(), 8192);
        assert_eq!(
            run(e.as_mut(), Op::write_zeroes(1 << 20, 4096, false)).unwrap(),
            4096
        );
        assert_eq!(
            run(e.as_mut(), Op::write_zeroes(2 << 20, 4096, true)).unwrap(),
            4096
        );
        let mut host = vec![0u8; SIZE as usize];
        f.as_file().read_exact_at(&mut host, 0).unwrap();
        for (off, len) in [(4096usize, 8192usize), (1 << 20, 4096), (2 << 20, 4096)] {
            assert!(
                host[off..off + len].iter().all(|&b| b == 0),
                "{kind:?} at {off}"
            );
            assert_eq!(host[off - 1], 0xff);
            assert_eq!(host[off + len], 0xff);
        }
    }
}

#[test]
fn many_in_flight_and_queue_full() {
    let f = file();
    let disk = open(&f, EngineKind::IoUring, false);
    let mut e = disk.new_engine(4).unwrap();
    let mut bufs: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8 + 1; 4096]).collect();
    for (i, b) in bufs.iter_mut().take(4).enumerate() {
        e.push(Op::write(i as u64 * 4096, vec![slice(b)]), i as u64)
            .unwrap();
    }
    let (err, op) = e
        .push(Op::write(0, vec![slice(&mut bufs[4])]), 9)
        .unwrap_err();
    assert!(matches!(err, BlockError::QueueFull));
    assert_eq!(op.len, 4096);
    e.submit().unwrap();
    let mut out = Vec::new();
    while out.len() < 4 {
        e.wait().unwrap();
        e.reap(&mut out);
    }
    let mut ids: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert!(out.iter().all(|c| matches!(c.result, Ok(4096))));
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn reading_past_the_end_of_a_shrunk_file_is_an_error_not_a_hang() {
    for (kind, _) in engines() {
        let f = file();
        let disk = open(&f, kind, false);
        f.as_file().set_len(4096).unwrap();
        let mut e = disk.new_engine(4).unwrap();
        let mut buf = vec![0u8; 4096];
        let r = run(e.as_mut(), Op::read(1 << 20, vec![slice(&mut buf)]));
        assert!(r.is_err(), "{kind:?}");
        // Straddling the new end: a short transfer, resubmitted for the
        // rest, which then finds the end of the file.
        let mut buf = vec![0u8; 8192];
        let r = run(
            e.as_mut(),
            Op::read(0, vec![slice(&mut buf[..4096]), slice(&mut buf[4096..])]),
        );
        assert!(r.is_err(), "{kind:?}");
    }
}

#[test]
fn null_engine_reads_zeros() {
    let disk = Disk::open(&DiskSource::Null(1 << 20), &OpenOptions::default()).unwrap();
    let mut e = disk.new_engine(4).unwrap();
    let mut buf = vec![0xeeu8; 4096];
    assert_eq!(
        run(e.as_mut(), Op::read(0, vec![slice(&mut buf)])).unwrap(),
        4096
    );
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(run(e.as_mut(), Op::flush()).unwrap(), 0);
}

#[test]
fn open_errors_are_clear() {
    let missing = Disk::open(
        &DiskSource::File("/nonexistent/x.img".into()),
        &OpenOptions::default(),
    )
    .unwrap_err();
    assert!(
        missing.to_string().contains("/nonexistent/x.img"),
        "{missing}"
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(1000).unwrap();
    let bad = Disk::open(&DiskSource::File(f.path().into()), &OpenOptions::default()).unwrap_err();
    assert!(
        matches!(bad, BlockError::BadSize { size: 1000, .. }),
        "{bad}"
    );
    assert!(Disk::open(&DiskSource::Null(0), &OpenOptions::default()).is_err());
}

#[test]
fn readonly_disks_open_read_only() {
    let f = file();
    let opts = OpenOptions {
        readonly: true,
        ..Default::default()
    };
    let disk = Disk::open(&DiskSource::File(f.path().into()), &opts).unwrap();
    let mut e = disk.new_engine(4).unwrap();
    let mut buf = vec![1u8; 4096];
    // The fd itself refuses writes (EBADF), whatever the layers above do.
    assert!(run(e.as_mut(), Op::write(0, vec![slice(&mut buf)])).is_err());
}

/// The worker sleeps in epoll until the notifier fires: an operation that
/// finishes after `submit` returned must make it readable, for page-cache
/// and O_DIRECT I/O alike (O_DIRECT completes from interrupt context).
#[test]
fn the_notifier_fires_for_late_completions() {
    for direct in [false, true] {
        let f = file();
        let disk = open(&f, EngineKind::IoUring, direct);
        let mut e = disk.new_engine(8).unwrap();
        let (mut a, ao) = aligned(65536);
        e.push(Op::write(0, vec![slice(&mut a[ao..ao + 65536])]), 1)
            .unwrap();
        e.submit().unwrap();
        let mut out = Vec::new();
        e.reap(&mut out);
        if out.is_empty() {
            let mut pfd = libc::pollfd {
                fd: e.notifier(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert_eq!(n, 1, "direct={direct}: the notifier never fired");
            e.ack_notifier();
            e.reap(&mut out);
        }
        assert_eq!(out.len(), 1, "direct={direct}");
    }
}

#[test]
fn a_failed_flush_is_latched_for_every_queue_of_the_disk() {
    for (kind, direct) in engines() {
        let f = file();
        let disk = open(&f, kind, direct);
        let mut q0 = disk.new_engine(8).unwrap();
        let mut q1 = disk.new_engine(8).unwrap();
        let mut buf = vec![0x42u8; 4096];
        run(q0.as_mut(), Op::write(0, vec![slice(&mut buf)])).unwrap();
        run(q0.as_mut(), Op::flush()).unwrap();
        failpoint::fail_syncs(f.as_file(), 1);
        let err = run(q0.as_mut(), Op::flush()).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{kind:?}");
        // The fault has passed; the data it lost has not come back.
        for q in [&mut q0, &mut q1] {
            assert!(run(q.as_mut(), Op::flush()).is_err(), "{kind:?}");
        }
        assert!(disk.sync().is_err(), "{kind:?}: shutdown sync");
        let why = disk.flush_latch().reason().unwrap();
        assert!(why.contains(&f.path().display().to_string()), "{why}");
        // Reads and writes still work.
        run(q1.as_mut(), Op::write(4096, vec![slice(&mut buf)])).unwrap();
        // Reopening (an export restart) starts clean.
        drop((q0, q1, disk));
        let disk = open(&f, kind, direct);
        run(disk.new_engine(8).unwrap().as_mut(), Op::flush()).unwrap();
    }
}

#[test]
fn write_through_discard_and_write_zeroes_sync_before_completing() {
    for (kind, direct) in engines() {
        let f = file();
        let disk = open(&f, kind, direct);
        let mut e = disk.new_engine(8).unwrap();
        // With the write cache on, no sync: the armed fault stays unused.
        failpoint::fail_syncs(f.as_file(), 1);
        run(e.as_mut(), Op::discard(0, 65536)).unwrap();
        run(e.as_mut(), Op::write_zeroes(65536, 65536, false)).unwrap();
        e.set_write_through(true);
        // Write-through: each one syncs, so the fault now shows.
        assert!(run(e.as_mut(), Op::discard(0, 65536)).is_err(), "{kind:?}");
        drop(e);
        let disk = open(&f, kind, direct);
        let mut e = disk.new_engine(8).unwrap();
        e.set_write_through(true);
        failpoint::fail_syncs(f.as_file(), 1);
        assert!(
            run(e.as_mut(), Op::write_zeroes(65536, 65536, false)).is_err(),
            "{kind:?}"
        );
        failpoint::fail_syncs(f.as_file(), 0);
    }
}

#[test]
fn a_forced_engine_is_that_engine_or_an_error() {
    use super::disk::decide_engine;
    let yes = || true;
    let no = || false;
    assert_eq!(decide_engine("d", None, yes).unwrap(), EngineKind::IoUring);
    assert_eq!(decide_engine("d", None, no).unwrap(), EngineKind::Sync);
    assert_eq!(
        decide_engine("d", Some(EngineKind::IoUring), yes).unwrap(),
        EngineKind::IoUring
    );
    let err = decide_engine("d", Some(EngineKind::IoUring), no).unwrap_err();
    assert!(
        err.to_string().contains("engine=io-uring was asked for"),
        "{err}"
    );
    // Sync is always there; the probe is not even asked.
    assert_eq!(
        decide_engine("d", Some(EngineKind::Sync), || panic!("probed")).unwrap(),
        EngineKind::Sync
    );
}

#[test]
fn every_engine_test_gets_the_engine_it_asked_for() {
    for (kind, direct) in engines() {
        let f = file();
        let disk = open(&f, kind, direct);
        assert_eq!(disk.engine_kind(), kind);
        assert_eq!(
            disk.new_engine(4).unwrap().name(),
            match kind {
                EngineKind::IoUring => "io_uring",
                _ => "sync",
            }
        );
    }
}
