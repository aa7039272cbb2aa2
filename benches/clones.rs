//! Clone benchmark: how fast vdiskd makes a copy-on-write clone, and what
//! serving from one costs, side by side with QEMU's qcow2 overlays on the
//! same base and the same client.
//!
//! `cargo bench --bench clones` prints three markdown tables:
//!
//! 1. Clone creation, median of 21 (and the fastest), for a 1 GiB image
//!    full of data and a 20 GiB sparse one: vdiskd's `volume.create` call
//!    on the control socket, the same through a `vdiskctl` process, `qemu-img
//!    create -f qcow2 -b` (a process too) and a full `cp --sparse=always`.
//! 2. 4k random reads, QD32, one queue: a fresh clone (every read falls
//!    through to the base), a clone whose every cluster was rewritten, the
//!    raw full copy of the image, and qemu-storage-daemon serving a fresh
//!    qcow2 overlay over the same base file.
//! 3. First writes: 4k random writes, QD32, each to a cluster not written
//!    before (copy-up), on a fresh vdiskd clone and a fresh qcow2 overlay.
//! 4. Ready copies (the pool): a full-copy deploy with a ready copy and
//!    without one, against `qemu-img convert` and `cp`; how fast the filler
//!    makes a copy against `qemu-img convert`; and the 4k random-read IOPS
//!    of another export while the filler copies, against the same without.
//!
//! The client is the blkio client of tests/common/client.rs (a batch of 32
//! in flight, then the next); both daemons get the same one, unpinned.
//! `VDISK_BENCH_SECS` (default 3) sets the seconds per run; `--quick` is 1
//! and makes the sparse image 4 GiB instead of 20 (CI's smoke run).

#[path = "../tests/common/client.rs"]
mod client;

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use client::{Client, ClientOptions, Op};
use vdisk::control::protocol::{ExportStart, Size, VolumeCreate};
use vdisk::control::{Call, Client as Control};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 64 * 1024;
const QD: usize = 32;
const ROUNDS: usize = 21;

fn vdiskd_bin() -> PathBuf {
    client::vdiskd_bin()
}

fn vdiskctl_bin() -> PathBuf {
    vdiskd_bin().with_file_name("vdiskctl")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn median(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    (v[v.len() / 2], v[0])
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// A 1 GiB image full of data, and a `sparse_gib` GiB one with 1 MiB of
/// data every GiB (the rest holes), both fsynced.
fn make_images(dir: &Path, sparse_gib: u64) -> (PathBuf, PathBuf) {
    let full = dir.join("base-1g.raw");
    let mut f = File::create(&full).unwrap();
    let chunk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..GIB / chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    let sparse = dir.join("base-sparse.raw");
    let f = File::create(&sparse).unwrap();
    f.set_len(sparse_gib * GIB).unwrap();
    use std::os::unix::fs::FileExt;
    for g in 0..sparse_gib {
        f.write_all_at(&chunk[..MIB as usize], g * GIB).unwrap();
    }
    f.sync_all().unwrap();
    (full, sparse)
}

fn call(c: &mut Control, call: Call) -> serde_json::Value {
    c.call(&call, None)
        .unwrap_or_else(|e| panic!("{}: {e}", call.method()))
}

fn create(name: &str, image: &str, full: bool) -> Call {
    Call::VolumeCreate(VolumeCreate {
        name: name.into(),
        image: Some(image.into()),
        size: None::<Size>,
        full,
    })
}

fn run_cmd(cmd: &mut Command) -> Duration {
    let t = Instant::now();
    let out = cmd.stdout(Stdio::null()).output().unwrap();
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Reads `path` once so that its pages are in the page cache: the images
/// and copies are made minutes apart, and hashing the sparse image fills
/// the cache with its holes, so without this the targets would be compared
/// on how much of each the page cache happened to keep.
fn warm(path: &Path) {
    use std::io::Read;
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf).unwrap() > 0 {}
}

/// Random 4 KiB reads at QD32 for `secs`: IOPS.
fn randread(sock: &Path, size: u64, secs: f64) -> f64 {
    let mut c = Client::connect(sock, 1).unwrap();
    let mut x = 0x1234_5678u64;
    let blocks = size / 4096;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let ops: Vec<(usize, Op)> = (0..QD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (
                    0,
                    Op::Read {
                        offset: x % blocks * 4096,
                        len: 4096,
                    },
                )
            })
            .collect();
        assert!(c.run(&ops).iter().all(Result::is_ok));
        n += QD as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// 4 KiB writes at QD32, each to a cluster not written before (at a random
/// place in it), for `secs` or until the clusters run out: IOPS.
fn first_writes(sock: &Path, size: u64, secs: f64) -> f64 {
    let mut c = Client::connect(sock, 1).unwrap();
    let clusters = size / CLUSTER;
    let mut order: Vec<u64> = (0..clusters).collect();
    let mut x = 0x9e37_79b9u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let data = vec![0x5au8; 4096];
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut n = 0u64;
    for batch in order.chunks(QD) {
        if Instant::now() >= deadline {
            break;
        }
        let ops: Vec<(usize, Op)> = batch
            .iter()
            .map(|&cl| {
                let inside = (cl * 7 % 16) * 4096;
                (
                    0,
                    Op::Write {
                        offset: cl * CLUSTER + inside,
                        data: data.clone(),
                    },
                )
            })
            .collect();
        assert!(c.run(&ops).iter().all(Result::is_ok));
        n += batch.len() as u64;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// qemu-storage-daemon serving a fresh qcow2 overlay over `base` on `sock`.
fn qsd_overlay(dir: &Path, base: &Path, name: &str) -> (Proc, PathBuf) {
    let ov = dir.join(format!("{name}.qcow2"));
    run_cmd(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(base)
            .arg(&ov),
    );
    let sock = dir.join(format!("{name}.sock"));
    let child = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=bf,aio=io_uring,read-only=on",
            base.display()
        ))
        .args([
            "--blockdev",
            "driver=raw,file=bf,node-name=base,read-only=on",
        ])
        .arg("--blockdev")
        .arg(format!(
            "driver=file,filename={},node-name=of,aio=io_uring",
            ov.display()
        ))
        .args([
            "--blockdev",
            "driver=qcow2,file=of,backing=base,node-name=ov",
        ])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=ov,writable=on,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for(&sock);
    (Proc(child), sock)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let secs: f64 = match std::env::var("VDISK_BENCH_SECS") {
        Ok(s) => s.parse().expect("VDISK_BENCH_SECS: seconds"),
        Err(_) if quick => 1.0,
        Err(_) => 3.0,
    };
    let dir = tempfile::Builder::new()
        .prefix("vdisk-clones")
        .tempdir_in(
            std::env::var_os("VDISK_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
        )
        .unwrap();
    let dir = dir.path();
    eprintln!("making the images in {}", dir.display());
    let sparse_gib = if quick { 4 } else { 20 };
    let (img1, img20) = make_images(dir, sparse_gib);
    let control = dir.join("control.sock");
    let _daemon = Proc(
        Command::new(vdiskd_bin())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--control")
            .arg(&control)
            .env("VDISK_LOG", "warn")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .spawn()
            .expect("start vdiskd"),
    );
    wait_for(&control);
    let mut ctl = Control::connect(&control).unwrap();
    ctl.set_timeout(Some(Duration::from_secs(600))).unwrap();
    use vdisk::control::protocol::ImageImport;
    for (img, name) in [(&img1, "g1"), (&img20, "g20")] {
        call(
            &mut ctl,
            Call::ImageImport(ImageImport {
                file: img.clone(),
                name: Some(name.into()),
            }),
        );
    }

    // 1. Clone creation.
    let mut rows = String::from(
        "| image | vdiskd call ms | vdiskctl process ms | qemu-img create ms | cp --sparse=always ms |\n|---|---:|---:|---:|---:|\n",
    );
    for (img, name) in [(&img1, "g1"), (&img20, "g20")] {
        let mut api = Vec::new();
        let mut cli = Vec::new();
        let mut qimg = Vec::new();
        for i in 0..ROUNDS {
            let t = Instant::now();
            call(&mut ctl, create(&format!("{name}-a{i}"), name, false));
            api.push(t.elapsed());
            cli.push(run_cmd(
                Command::new(vdiskctl_bin())
                    .arg("--control")
                    .arg(&control)
                    .args(["volume", "create", &format!("{name}-c{i}"), "--image", name]),
            ));
            qimg.push(run_cmd(
                Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
                    .arg(img)
                    .arg(dir.join(format!("{name}-{i}.qcow2"))),
            ));
        }
        let mut cp = Vec::new();
        for i in 0..3 {
            let dst = dir.join(format!("{name}-cp{i}.raw"));
            cp.push(run_cmd(
                Command::new("cp").arg("--sparse=always").arg(img).arg(&dst),
            ));
            let _ = std::fs::remove_file(&dst);
        }
        let fmt = |v: Vec<Duration>| {
            let (m, lo) = median(v);
            format!("{} (min {})", ms(m), ms(lo))
        };
        rows.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            if name == "g1" {
                "1 GiB, full".to_string()
            } else {
                format!("{sparse_gib} GiB, sparse")
            },
            fmt(api),
            fmt(cli),
            fmt(qimg),
            fmt(cp),
        ));
    }
    println!("Clone creation, median of {ROUNDS} (cp: of 3):\n\n{rows}");

    // 2. and 3. Serving from clones.
    call(&mut ctl, create("fresh", "g1", false));
    call(&mut ctl, create("rewritten", "g1", false));
    call(&mut ctl, create("raw", "g1", true));
    call(&mut ctl, create("firstw", "g1", false));
    let sock = |v: &str| dir.join(format!("{v}.sock"));
    for v in ["fresh", "rewritten", "raw", "firstw"] {
        call(
            &mut ctl,
            Call::ExportStart(ExportStart {
                volume: v.into(),
                socket: Some(sock(v)),
                queues: None,
                readonly: false,
                serial: None,
            }),
        );
    }
    {
        // Every cluster of `rewritten` gets written (copied up) once.
        let mut c = Client::connect_with(
            &sock("rewritten"),
            &ClientOptions {
                buffer_size: 8 << 20,
                ..ClientOptions::queues(1)
            },
        )
        .unwrap();
        let data = vec![0x33u8; MIB as usize];
        for m in 0..GIB / MIB {
            c.write(m * MIB, &data).unwrap();
        }
        c.flush().unwrap();
    }
    let (_qsd_r, qsd_read) = qsd_overlay(dir, &img1, "qsd-read");
    let g1_digest = call(
        &mut ctl,
        Call::ImageShow(vdisk::control::protocol::ImageRef { image: "g1".into() }),
    )["digest"]
        .as_str()
        .unwrap()
        .to_string();
    for f in [
        dir.join("state/images").join(&g1_digest),
        dir.join("state/volumes/raw/data"),
        dir.join("state/volumes/rewritten/data"),
        img1.clone(),
    ] {
        warm(&f);
    }
    let mut reads = String::from("| target | IOPS | vs raw volume |\n|---|---:|---:|\n");
    let raw = randread(&sock("raw"), GIB, secs);
    for (what, s) in [
        ("vdiskd raw full copy", sock("raw")),
        ("vdiskd fresh clone (reads from the base)", sock("fresh")),
        ("vdiskd rewritten clone", sock("rewritten")),
        ("qsd fresh qcow2 overlay", qsd_read.clone()),
    ] {
        let iops = if s == sock("raw") {
            raw
        } else {
            randread(&s, GIB, secs)
        };
        reads.push_str(&format!("| {what} | {iops:.0} | {:.2} |\n", iops / raw));
    }
    println!("4k random read, QD32, {secs} s each:\n\n{reads}");

    let (_qsd_w, qsd_write) = qsd_overlay(dir, &img1, "qsd-write");
    let v = first_writes(&sock("firstw"), GIB, secs);
    let q = first_writes(&qsd_write, GIB, secs);
    println!(
        "First writes (copy-up), 4k random, QD32, {secs} s each:\n\n| target | IOPS |\n|---|---:|\n| vdiskd fresh clone | {v:.0} |\n| qsd fresh qcow2 overlay | {q:.0} |\n\nratio vdiskd/qsd: {:.2}",
        v / q
    );

    // 4. Ready copies.
    let wait_ready = |ctl: &mut Control, image: &str, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = call(
                ctl,
                Call::PoolShow(vdisk::control::protocol::PoolRef {
                    image: image.into(),
                }),
            );
            if v["ready"].as_u64() == Some(n) {
                return;
            }
            assert!(Instant::now() < deadline, "{image}: never {n} ready: {v}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let pool_set = |ctl: &mut Control, image: &str, copies: u32| {
        call(
            ctl,
            Call::PoolSet(vdisk::control::protocol::PoolSet {
                image: image.into(),
                priority: 9,
                copies: Some(copies),
            }),
        );
    };
    let mut deploy = String::from(
        "| image | full copy, no ready copy ms | with a ready copy ms | qemu-img convert ms |\n|---|---:|---:|---:|\n",
    );
    let mut n = 0;
    for (img, name) in [(&img1, "g1"), (&img20, "g20")] {
        let mut plain = Vec::new();
        for _ in 0..3 {
            n += 1;
            let t = Instant::now();
            call(&mut ctl, create(&format!("p{n}"), name, true));
            plain.push(t.elapsed());
        }
        pool_set(&mut ctl, name, 3);
        wait_ready(&mut ctl, name, 3);
        let mut pooled = Vec::new();
        for _ in 0..3 {
            n += 1;
            let t = Instant::now();
            let v = call(&mut ctl, create(&format!("p{n}"), name, true));
            pooled.push(t.elapsed());
            assert_eq!(v["from_pool"], true, "{v}");
        }
        pool_set(&mut ctl, name, 0);
        let mut conv = Vec::new();
        for i in 0..3 {
            let out = dir.join(format!("conv-{name}-{i}.raw"));
            conv.push(run_cmd(
                Command::new("qemu-img")
                    .args(["convert", "-O", "raw"])
                    .arg(img)
                    .arg(&out),
            ));
            let _ = std::fs::remove_file(&out);
        }
        deploy.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            if name == "g1" {
                "1 GiB, full".to_string()
            } else {
                format!("{sparse_gib} GiB, sparse")
            },
            ms(median(plain).0),
            ms(median(pooled).0),
            ms(median(conv).0),
        ));
    }
    println!("Full-copy deploys, median of 3:\n\n{deploy}");

    // The filler's speed: one copy of the 1 GiB image (fsynced before it
    // counts as ready), against qemu-img convert of the same file (which
    // does not fsync), both from the page cache.
    let unset = |ctl: &mut Control, image: &str| {
        call(
            ctl,
            Call::PoolUnset(vdisk::control::protocol::PoolRef {
                image: image.into(),
            }),
        );
    };
    unset(&mut ctl, "g1");
    let t = Instant::now();
    pool_set(&mut ctl, "g1", 1);
    wait_ready(&mut ctl, "g1", 1);
    let fill = t.elapsed();
    let out = dir.join("conv-fill.raw");
    let conv = run_cmd(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&img1)
            .arg(&out),
    );
    let _ = std::fs::remove_file(&out);
    println!(
        "Filling one copy of 1 GiB: {} ms; qemu-img convert: {} ms; throughput ratio {:.2}\n",
        ms(fill),
        ms(conv),
        conv.as_secs_f64() / fill.as_secs_f64()
    );

    // Reads of another export while the filler copies (it runs at nice 19
    // and in the idle I/O class: under this load it gets little time).
    let quiet = randread(&sock("raw"), GIB, secs);
    unset(&mut ctl, "g1");
    pool_set(&mut ctl, "g1", 8);
    std::thread::sleep(Duration::from_millis(100));
    let busy = randread(&sock("raw"), GIB, secs);
    let made = call(
        &mut ctl,
        Call::PoolShow(vdisk::control::protocol::PoolRef { image: "g1".into() }),
    );
    pool_set(&mut ctl, "g1", 0);
    println!(
        "4k random read QD32 on another export: {quiet:.0} IOPS without filling, {busy:.0} while the filler copies ({:.2}); the filler had made {} copies meanwhile",
        busy / quiet,
        made["ready"]
    );
}
