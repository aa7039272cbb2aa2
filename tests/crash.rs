//! kill -9 with the client still connected and mid-load: only what was
//! flushed (or written through) may be expected back, and all of it must be.
//!
//! The daemon is killed while a blkio client keeps writing a known pattern
//! and flushing every few writes, on an overlay clone (whose allocation
//! bitmap lives in memory until a flush writes it) and on a raw volume; the
//! daemon restarts on the same state directory and every write acknowledged
//! before the last completed flush must read back intact, round after round.
//!
//! A QEMU guest that turns its write cache off never flushes: there every
//! write the guest saw complete must survive the kill.

#[path = "common/client.rs"]
mod client;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{pattern, Client, ClientOptions, Op};
use vdiskd::Vdiskd;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
const ROUNDS: u64 = 10;
/// Each round writes into its own region, so earlier rounds stay checkable.
const REGION: u64 = 2 * MIB;
const DISK: u64 = ROUNDS * REGION;
/// Writes per batch (one batch in flight at a time), and batches per flush.
const BATCH: usize = 8;
const BATCHES_PER_FLUSH: usize = 2;

/// The blocks of round `r`, in the order they are written: every block of
/// the region once, shuffled, so that writes land in fresh and in already
/// allocated overlay clusters, at any place inside a cluster.
fn order(r: u64) -> Vec<u64> {
    let n = REGION / BLOCK;
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ r;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v.into_iter().map(|b| r * REGION + b * BLOCK).collect()
}

fn seed(r: u64) -> u64 {
    0xc0ffee + r
}

struct Setup {
    _dir: tempfile::TempDir,
    state: PathBuf,
    control: PathBuf,
    socket: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        Setup {
            state: dir.path().join("state"),
            control: dir.path().join("control.sock"),
            socket: dir.path().join("vol.sock"),
            _dir: dir,
        }
    }

    fn start(&self) -> Vdiskd {
        Vdiskd::start(&self.state, &self.control)
    }
}

fn connect(socket: &Path) -> Client {
    Client::connect_with(socket, &ClientOptions::queues(2))
        .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()))
}

fn check(c: &mut Client, flushed: &[usize], what: &str) {
    for (r, &n) in flushed.iter().enumerate() {
        let r = r as u64;
        for &off in &order(r)[..n] {
            let got = c
                .read(off, BLOCK as usize)
                .unwrap_or_else(|e| panic!("{what}: read at {off}: {e}"));
            if got != pattern(seed(r), off, BLOCK as usize) {
                panic!(
                    "{what}: round {r}: the block at {off} was written and flushed before the kill but reads back different ({n} blocks were flushed that round)"
                );
            }
        }
    }
}

fn kill_9_rounds(make_volume: impl Fn(&Vdiskd, &Path), what: &str) {
    let s = Setup::new();
    let d = s.start();
    make_volume(&d, &s.socket);
    let mut d = Some(d);
    let mut flushed = Vec::new();
    for r in 0..ROUNDS {
        let daemon = d.take().unwrap();
        let progress = Arc::new(AtomicUsize::new(0));
        let (p, socket) = (progress.clone(), s.socket.clone());
        let load = std::thread::spawn(move || load_round(&socket, r, &p));
        // Kill at a different point of the load each round, with writes
        // in flight: once a flush has covered `target` blocks.
        let target = (BATCH * BATCHES_PER_FLUSH) * (1 + (r as usize * 7) % 25);
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress.load(Ordering::SeqCst) < target && !load.is_finished() {
            assert!(
                Instant::now() < deadline,
                "{what}: round {r}: no flush covered {target} blocks in 30 s"
            );
            std::thread::yield_now();
        }
        daemon.kill9();
        load.join().expect("load thread");
        let n = progress.load(Ordering::SeqCst);
        flushed.push(n);
        let d2 = s.start();
        // The catalog came back whole: the volume is there and ready, and
        // its export was restored.
        let v = d2.ctl(&["volume", "show", "vol"]);
        assert_eq!(v["state"], "ready", "{what}: round {r}: {v}");
        let exports = d2.ctl(&["export", "list"]);
        assert_eq!(
            exports["exports"].as_array().map(Vec::len),
            Some(1),
            "{exports}"
        );
        let mut c = connect(&s.socket);
        check(&mut c, &flushed, &format!("{what} after kill {r}"));
        drop(c);
        d = Some(d2);
    }
    eprintln!("{what}: blocks flushed before each kill: {flushed:?}");
    let total = (REGION / BLOCK) as usize;
    let mid_load = flushed.iter().filter(|&&n| n > 0 && n < total).count();
    assert!(
        mid_load >= (ROUNDS / 2) as usize,
        "{what}: too few rounds were killed after a flush and before the load ended: {flushed:?} of {total}"
    );
}

/// Round `r`'s load: its blocks in batches spread over both queues, a
/// flush every few batches, until the daemon dies under it (or the blocks
/// run out). `flushed` says how many of `order(r)` a completed flush
/// covered.
fn load_round(socket: &Path, r: u64, flushed: &Arc<AtomicUsize>) {
    let f = flushed.clone();
    let socket = socket.to_path_buf();
    let blocks = order(r);
    let writer = std::thread::spawn(move || {
        // A killed daemon never answers: give up on it soon.
        let opts = ClientOptions {
            io_timeout: Duration::from_secs(2),
            ..ClientOptions::queues(2)
        };
        let mut c = match Client::connect_with(&socket, &opts) {
            Ok(c) => c,
            Err(_) => return,
        };
        // The kill makes the client fail or panic (an unanswered request,
        // a broken socket): either ends the load, as it should.
        let _ = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut done = 0;
            for (i, batch) in blocks.chunks(BATCH).enumerate() {
                let ops: Vec<(usize, Op)> = batch
                    .iter()
                    .enumerate()
                    .map(|(j, &off)| {
                        (
                            j % 2,
                            Op::Write {
                                offset: off,
                                data: pattern(seed(r), off, BLOCK as usize),
                            },
                        )
                    })
                    .collect();
                if c.run(&ops).iter().any(Result::is_err) {
                    return;
                }
                done += batch.len();
                if (i + 1) % BATCHES_PER_FLUSH == 0 {
                    if c.flush().is_err() {
                        return;
                    }
                    f.store(done, Ordering::SeqCst);
                }
            }
        }));
        // The daemon is gone: blkio's teardown would wait on a dead socket.
        std::mem::forget(c);
    });
    let _ = writer.join();
}

#[test]
fn kill_9_mid_load_keeps_every_flushed_write_on_a_clone() {
    kill_9_rounds(
        |d, socket| {
            let img = socket.with_file_name("base.img");
            // A base that is not zeros, so a lost allocation bit shows.
            std::fs::write(&img, pattern(0xba5e, 0, DISK as usize)).unwrap();
            d.ctl(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
            d.ctl(&["volume", "create", "vol", "--image", "base"]);
            d.ctl(&[
                "export",
                "start",
                "vol",
                "--socket",
                socket.to_str().unwrap(),
                "--queues",
                "2",
            ]);
        },
        "overlay clone",
    );
}

#[test]
fn kill_9_mid_load_keeps_every_flushed_write_on_a_raw_volume() {
    kill_9_rounds(
        |d, socket| {
            d.ctl(&[
                "volume",
                "create",
                "vol",
                "--size",
                &format!("{}M", DISK / MIB),
            ]);
            d.ctl(&[
                "export",
                "start",
                "vol",
                "--socket",
                socket.to_str().unwrap(),
                "--queues",
                "2",
            ]);
        },
        "raw volume",
    );
}

/// The guest turns the write cache off (virtio-blk's CONFIG_WCE, through
/// QEMU's SET_CONFIG) and writes with O_DIRECT and no flush: a partial
/// first write to a clone's cluster (copy-up), a whole fresh cluster, and
/// a run of partial clusters. vdiskd is killed with SIGKILL while QEMU is
/// still connected; after a restart every write the guest saw complete
/// reads back, on the overlay clone and on a raw volume.
#[test]
fn write_through_writes_survive_kill_9_without_a_flush() {
    use guest::{seq_pattern, Disk, Guest};
    let s = Setup::new();
    let d = s.start();
    let size = 8 * MIB;
    let base = pattern(0xba5e, 0, size as usize);
    let img = s.socket.with_file_name("base.img");
    std::fs::write(&img, &base).unwrap();
    d.ctl(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
    d.ctl(&["volume", "create", "ov", "--image", "base"]);
    d.ctl(&["volume", "create", "raw", "--size", "8M"]);
    let sock = |v: &str| s.socket.with_file_name(format!("{v}.sock"));
    for v in ["ov", "raw"] {
        d.ctl(&["export", "start", v, "--socket", sock(v).to_str().unwrap()]);
    }

    // (offset, length) of each guest write, all from the start of /tmp/p.
    let writes: [(u64, u64); 3] = [
        (5 * 4096, 4096),
        (3 * 65536, 65536),
        (300 * 4096, 32 * 4096),
    ];
    let mut script = String::from(
        "set -e\nseq 1 300000 | head -c 1048576 > /tmp/p\n\
         for d in vda vdb; do echo 'write through' > /sys/block/$d/cache_type; done\n\
         echo \"CACHE=$(cat /sys/block/vda/cache_type),$(cat /sys/block/vdb/cache_type)\"\n",
    );
    for d in ["vda", "vdb"] {
        for (off, len) in writes {
            script.push_str(&format!(
                "dd if=/tmp/p of=/dev/{d} bs=4096 seek={} count={} oflag=direct conv=notrunc 2>/dev/null\n",
                off / 4096,
                len / 4096
            ));
        }
    }
    script.push_str("echo WRITTEN\nsleep 600\n");
    let mut guest = Guest::new()
        .timeout(Duration::from_secs(120))
        .disk(Disk::new(sock("ov")))
        .disk(Disk::new(sock("raw")))
        .spawn(&script);
    let written = guest.wait_for_line("WRITTEN");
    let console = guest.console();
    assert!(
        written.is_some(),
        "the guest did not finish its writes:\n{console}"
    );
    assert!(
        console.contains("CACHE=write through,write through"),
        "the guest could not turn the write cache off:\n{console}"
    );
    // The crash, with the guest still connected and no flush ever sent.
    d.kill9();
    drop(guest);

    let d = s.start();
    let p = seq_pattern(MIB as usize);
    for (v, mut model) in [("ov", base.clone()), ("raw", vec![0u8; size as usize])] {
        for (off, len) in writes {
            model[off as usize..(off + len) as usize].copy_from_slice(&p[..len as usize]);
        }
        let mut c = Client::connect(&sock(v), 1).expect("connect after the restart");
        let got = c.read(0, size as usize).expect("read back");
        if got != model {
            let at = got.iter().zip(&model).position(|(a, b)| a != b).unwrap();
            panic!("{v}: a write-through write acknowledged before the kill is lost (first difference at byte {at})");
        }
    }
    drop(d);
}
