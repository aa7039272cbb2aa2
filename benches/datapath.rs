//! Data-path benchmark: vdiskd against qemu-storage-daemon, same client.
//!
//! `cargo bench --bench datapath` starts each daemon in turn on the same
//! 1 GiB file (filled with data and fsynced first, so reads hit the page
//! cache; both daemons use buffered io_uring) and on a 1 GiB null device, and
//! drives it with the `blkio` client through the workloads below. For every
//! run it prints IOPS, p50/p99 latency, the daemon's CPU time per million
//! I/Os (utime+stime from /proc/PID/stat) and its peak RSS (VmHWM), then the
//! vdiskd/qsd ratios, as markdown tables.
//!
//! Options (after `--`) and environment:
//!
//! - `--quick`, or `VDISK_BENCH_SECS=N`: seconds per run (default 5; quick
//!   is 1), after a warm-up of a fifth of that (at most 1 s) not counted.
//! - `--filter TEXT`: only workloads whose name contains TEXT.
//! - `VDISK_BENCH_SERVERS=vdiskd,qsd`: which daemons (default both).
//! - `VDISK_BENCH_TARGETS=file,null`: which backings (default both).
//! - `VDISK_BENCH_DIR`: where the 1 GiB file goes (default the temp dir).
//! - `VDISK_BENCH_PIN=split|none`: CPU placement (default split, below).
//! - `VDISK_BENCH_WAIT=poll|eventfd`: how the client waits for completions
//!   (default poll, below).
//! - `VDISK_BENCH_LOG`: VDISK_LOG for vdiskd (default `warn`).
//! - `--guest`: the same workloads as fio jobs in a QEMU TCG guest (the
//!   guest helper of tests/common/guest.rs), one boot per run; see
//!   `run_guest_one`.
//!
//! Placement: the machine this was written for has 2 cores. With `split`
//! the daemon runs under `taskset -c 1` (all its threads) and the client is
//! pinned to CPU 0, so the two never compete for a core and the daemon's
//! numbers are per core. Waiting: by default the client busy-polls the used
//! rings (`do_io` with min_completions 0, completion eventfds disabled, so a
//! daemon that honours EVENT_IDX need not signal) from a single thread that
//! round-robins over all queues: it owns CPU 0, so it is never the
//! bottleneck, and it adds no wake-up latency of its own. One polling
//! thread per queue would time-slice on the one client core (milliseconds
//! of p99). `VDISK_BENCH_WAIT=eventfd` instead sleeps on each queue's
//! completion eventfd, one thread per queue, as a guest waits for an
//! interrupt: the daemon then pays for signalling, as with a VM. The two
//! daemons run one after the other for each workload, in alternating order,
//! each freshly started. "client idle polls %" is the share of the polling
//! client's `do_io` calls that found no completion (near 100: the client
//! waits for the daemon, not the other way round); "others CPU %" is what
//! the rest of the machine used meanwhile: a run where it is high was
//! disturbed.

#[path = "../tests/common/client.rs"]
mod client;
#[path = "../tests/common/guest.rs"]
mod guest;

use blkio::{Blkioq, Completion, ReqFlags};
use client::{Client, ClientOptions, Daemon, DaemonOptions, Export, Server};
use guest::{Disk, Guest};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const DISK_SIZE: u64 = GIB;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rw {
    RandRead,
    RandWrite,
    SeqRead,
}

#[derive(Clone, Copy, Debug)]
struct Workload {
    name: &'static str,
    rw: Rw,
    bs: usize,
    /// Requests in flight per queue.
    qd: usize,
    queues: usize,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "4k randread QD1",
        rw: Rw::RandRead,
        bs: 4096,
        qd: 1,
        queues: 1,
    },
    Workload {
        name: "4k randread QD32",
        rw: Rw::RandRead,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "4k randwrite QD32",
        rw: Rw::RandWrite,
        bs: 4096,
        qd: 32,
        queues: 1,
    },
    Workload {
        name: "128k seqread QD8",
        rw: Rw::SeqRead,
        bs: 128 << 10,
        qd: 8,
        queues: 1,
    },
    Workload {
        name: "4k randread QD32x2q",
        rw: Rw::RandRead,
        bs: 4096,
        qd: 32,
        queues: 2,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    File,
    Null,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::File => "file",
            Target::Null => "null",
        }
    }
}

struct Config {
    secs: f64,
    warmup: f64,
    filter: Option<String>,
    servers: Vec<Server>,
    targets: Vec<Target>,
    pin: bool,
    poll: bool,
    log: String,
    dir: PathBuf,
}

impl Config {
    fn from_env_and_args() -> (Config, bool) {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let quick = args.iter().any(|a| a == "--quick");
        let guest = args.iter().any(|a| a == "--guest");
        // cargo bench passes `--bench`; ignore that and anything unknown.
        let filter = args
            .iter()
            .position(|a| a == "--filter")
            .and_then(|i| args.get(i + 1).cloned());
        let secs = match std::env::var("VDISK_BENCH_SECS") {
            Ok(s) => s.parse().expect("VDISK_BENCH_SECS: a number of seconds"),
            Err(_) if quick => 1.0,
            Err(_) => 5.0,
        };
        let servers = std::env::var("VDISK_BENCH_SERVERS")
            .unwrap_or_else(|_| "vdiskd,qsd".into())
            .split(',')
            .map(|s| match s.trim() {
                "vdiskd" => Server::Vdiskd,
                "qsd" => Server::Qsd,
                other => panic!("VDISK_BENCH_SERVERS: unknown server {other:?}"),
            })
            .collect();
        let targets = std::env::var("VDISK_BENCH_TARGETS")
            .unwrap_or_else(|_| "file,null".into())
            .split(',')
            .map(|s| match s.trim() {
                "file" => Target::File,
                "null" => Target::Null,
                other => panic!("VDISK_BENCH_TARGETS: unknown target {other:?}"),
            })
            .collect();
        let pin = match std::env::var("VDISK_BENCH_PIN").as_deref() {
            Ok("none") => false,
            Ok("split") | Err(_) => online_cpus() >= 2,
            Ok(other) => panic!("VDISK_BENCH_PIN: split or none, not {other:?}"),
        };
        let cfg = Config {
            secs,
            warmup: (secs / 5.0).min(1.0),
            filter,
            servers,
            targets,
            pin,
            poll: match std::env::var("VDISK_BENCH_WAIT").as_deref() {
                Ok("poll") | Err(_) => true,
                Ok("eventfd") => false,
                Ok(other) => panic!("VDISK_BENCH_WAIT: poll or eventfd, not {other:?}"),
            },
            log: std::env::var("VDISK_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            dir: std::env::var_os("VDISK_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        };
        (cfg, guest)
    }
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within its bounds for
    // cpu < CPU_SETSIZE; sched_setaffinity(0, ..) affects only this thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(
            rc,
            0,
            "sched_setaffinity: {}",
            std::io::Error::last_os_error()
        );
    }
}

// ---------------------------------------------------------------------------
// Latency histogram
// ---------------------------------------------------------------------------

/// Log-linear histogram of nanoseconds: exact below 64 ns, then 32
/// sub-buckets per power of two (under 3.2% error), ~2000 buckets in all.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

const SUB_BITS: u32 = 5;

impl Histogram {
    fn new() -> Self {
        Histogram {
            counts: vec![0; 64 << SUB_BITS],
            total: 0,
        }
    }

    fn index(v: u64) -> usize {
        if v < (2 << SUB_BITS) {
            return v as usize;
        }
        let shift = 63 - v.leading_zeros() - SUB_BITS;
        ((shift as usize) << SUB_BITS) + (v >> shift) as usize
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < (2 << SUB_BITS) {
            return i as u64;
        }
        let shift = (i >> SUB_BITS) - 1;
        let mant = (i & ((1 << SUB_BITS) - 1)) as u64 + (1 << SUB_BITS);
        (mant << shift) + ((1u64 << shift) >> 1)
    }

    fn record(&mut self, ns: u64) {
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    fn percentile(&self, p: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let want = ((p / 100.0) * self.total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value(i);
            }
        }
        unreachable!()
    }
}

// ---------------------------------------------------------------------------
// Daemon measurements from /proc
// ---------------------------------------------------------------------------

/// utime + stime of all the process's threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// CPU time all CPUs spent busy (not idle or waiting for I/O), in seconds.
fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").expect("read /proc/stat");
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user)
    let busy = f[0] + f[1] + f[2] + f[5] + f[6];
    // SAFETY: sysconf has no preconditions.
    busy as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// This process's user+system CPU time, in seconds.
fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Peak resident set size (VmHWM) in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// The client engine
// ---------------------------------------------------------------------------

struct QueueResult {
    ios: u64,
    hist: Histogram,
    /// `do_io` calls in the measured window, and how many found nothing:
    /// a polling client that mostly finds nothing is not the bottleneck.
    polls: u64,
    empty_polls: u64,
}

/// A xorshift64* generator: cheap, and the same sequence for each daemon.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Keeps `wl.qd` requests in flight on one queue until `end`, counting the
/// completions that arrive in `[start, end)`.
struct QueueDriver<'a> {
    q: &'a mut Blkioq,
    qi: usize,
    wl: Workload,
    buf_addr: usize,
    blocks: u64,
    rng: Rng,
    seq: u64,
    issued: Vec<Instant>,
    in_flight: usize,
    completions: Vec<MaybeUninit<Completion>>,
    res: QueueResult,
}

impl<'a> QueueDriver<'a> {
    fn new(q: &'a mut Blkioq, qi: usize, wl: Workload, buf_addr: usize, poll: bool) -> Self {
        let blocks = DISK_SIZE / wl.bs as u64;
        // Interrupt-driven waits need the device to signal; polling does not.
        q.set_completion_fd_enabled(!poll);
        QueueDriver {
            q,
            qi,
            wl,
            buf_addr,
            blocks,
            rng: Rng(0x9E37_79B9_7F4A_7C15 ^ (qi as u64 + 1)),
            // Sequential streams: each queue starts in its own part of the disk.
            seq: (qi as u64 * blocks / wl.queues as u64) % blocks,
            issued: vec![Instant::now(); wl.qd],
            in_flight: 0,
            completions: (0..wl.qd).map(|_| MaybeUninit::uninit()).collect(),
            res: QueueResult {
                ios: 0,
                hist: Histogram::new(),
                polls: 0,
                empty_polls: 0,
            },
        }
    }

    fn submit(&mut self, slot: usize, now: Instant) {
        let block = match self.wl.rw {
            Rw::SeqRead => {
                let b = self.seq;
                self.seq = (self.seq + 1) % self.blocks;
                b
            }
            Rw::RandRead | Rw::RandWrite => self.rng.next() % self.blocks,
        };
        let offset = block * self.wl.bs as u64;
        let buf = (self.buf_addr + slot * self.wl.bs) as *mut u8;
        self.issued[slot] = now;
        match self.wl.rw {
            Rw::RandRead | Rw::SeqRead => {
                self.q
                    .read(offset, buf, self.wl.bs, slot, ReqFlags::empty())
            }
            Rw::RandWrite => self
                .q
                .write(offset, buf, self.wl.bs, slot, ReqFlags::empty()),
        }
    }

    fn fill(&mut self) {
        for slot in 0..self.wl.qd {
            self.submit(slot, Instant::now());
        }
        self.in_flight = self.wl.qd;
    }

    /// One `do_io` call (blocking for at least one completion unless
    /// `min` is 0); resubmits each finished slot until `end`.
    fn step(&mut self, min: usize, start: Instant, end: Instant) {
        let min = min.min(self.in_flight);
        let mut timeout = Duration::from_secs(10);
        let qi = self.qi;
        let n = self
            .q
            .do_io(&mut self.completions, min, Some(&mut timeout), None)
            .unwrap_or_else(|e| panic!("queue {qi}: do_io: {e}"));
        let now = Instant::now();
        if now >= start && now < end {
            self.res.polls += 1;
            self.res.empty_polls += u64::from(n == 0);
        }
        if n == 0 {
            return;
        }
        for i in 0..n {
            // SAFETY: do_io initialised the first `n` entries.
            let c = unsafe { self.completions[i].assume_init_read() };
            assert_eq!(c.ret, 0, "queue {qi}: request failed: errno {}", -c.ret);
            let slot = c.user_data;
            if now >= start && now < end {
                self.res.ios += 1;
                self.res
                    .hist
                    .record((now - self.issued[slot]).as_nanos() as u64);
            }
            if now < end {
                self.submit(slot, now);
            } else {
                self.in_flight -= 1;
            }
        }
    }
}

/// Runs `drivers` on the current thread: one driver sleeps in `do_io`;
/// several are polled in turn (so one thread can keep many queues busy
/// without time-slicing against itself on a single core).
fn drive(
    mut drivers: Vec<QueueDriver>,
    start: Instant,
    end: Instant,
    poll: bool,
) -> Vec<QueueResult> {
    for d in &mut drivers {
        d.fill();
    }
    let min = usize::from(!poll && drivers.len() == 1);
    while drivers.iter().any(|d| d.in_flight > 0) {
        for d in &mut drivers {
            if d.in_flight > 0 {
                d.step(min, start, end);
            }
        }
    }
    drivers.into_iter().map(|d| d.res).collect()
}

struct RunResult {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
    cpu_per_mio: f64,
    daemon_cpu_pct: f64,
    client_cpu_pct: f64,
    /// Share of the polling client's `do_io` calls that found nothing.
    client_idle_pct: f64,
    /// CPU used by everything else on the machine meanwhile: a noisy run.
    other_cpu_pct: f64,
    rss_mib: f64,
}

/// Starts `server` exporting `target` with `wl.queues` queues on
/// `dir/bench.sock`, pinned to CPU 1 if so configured.
fn start_daemon(
    cfg: &Config,
    server: Server,
    target: Target,
    disk: &Path,
    wl: Workload,
    dir: &Path,
) -> (Daemon, PathBuf) {
    let sock = dir.join("bench.sock");
    let export = match target {
        Target::File => Export::file(&sock, disk).direct(false),
        Target::Null => Export::null(&sock, DISK_SIZE),
    }
    .queues(wl.queues as u16);
    let opts = DaemonOptions {
        log: cfg.log.clone(),
        cpus: cfg.pin.then(|| "1".to_string()),
        extra_args: Vec::new(),
    };
    (Daemon::start_with(server, dir, vec![export], opts), sock)
}

fn run_one(cfg: &Config, server: Server, target: Target, disk: &Path, wl: Workload) -> RunResult {
    let dir = tempfile::Builder::new()
        .prefix("vdisk-bench")
        .tempdir()
        .unwrap();
    let (daemon, sock) = start_daemon(cfg, server, target, disk, wl, dir.path());
    let mut client = Client::connect_with(
        &sock,
        &ClientOptions {
            queues: wl.queues,
            buffer_size: (wl.queues * wl.qd * wl.bs).next_multiple_of(1 << 20),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: connect: {e}", server.name()));
    assert_eq!(client.capacity(), DISK_SIZE);
    let (buf_addr, buf_len) = client.buffer_raw();
    // Writes carry data, not the zeros of a fresh buffer.
    // SAFETY: the client's mapped buffer; nothing is in flight yet.
    unsafe { std::ptr::write_bytes(buf_addr as *mut u8, 0x5a, buf_len) };

    let pid = daemon.pid();
    let t0 = Instant::now();
    let start = t0 + Duration::from_secs_f64(cfg.warmup);
    let end = start + Duration::from_secs_f64(cfg.secs);
    let (pin, poll) = (cfg.pin, cfg.poll);
    // Polling and pinned: one client thread polls every queue (one core
    // for the client). Otherwise one thread per queue.
    let one_thread = poll && pin;
    let (results, daemon_cpu, client_cpu, machine_busy) = std::thread::scope(|s| {
        let drivers: Vec<QueueDriver> = client
            .queues_mut()
            .iter_mut()
            .enumerate()
            .map(|(qi, q)| QueueDriver::new(q, qi, wl, buf_addr + qi * wl.qd * wl.bs, poll))
            .collect();
        let mut groups: Vec<Vec<QueueDriver>> = Vec::new();
        for d in drivers {
            match groups.last_mut() {
                Some(g) if one_thread => g.push(d),
                _ => groups.push(vec![d]),
            }
        }
        let handles: Vec<_> = groups
            .into_iter()
            .map(|g| {
                s.spawn(move || {
                    if pin {
                        pin_current_thread(0);
                    }
                    drive(g, start, end, poll)
                })
            })
            .collect();
        std::thread::sleep(start.saturating_duration_since(Instant::now()));
        let (cpu0, self0, busy0) = (cpu_seconds(pid), self_cpu_seconds(), machine_busy_seconds());
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let (cpu1, self1, busy1) = (cpu_seconds(pid), self_cpu_seconds(), machine_busy_seconds());
        let res: Vec<QueueResult> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        (res, cpu1 - cpu0, self1 - self0, busy1 - busy0)
    });
    let rss = peak_rss_kib(pid);
    drop(client);
    drop(daemon);

    let mut hist = Histogram::new();
    let (mut ios, mut polls, mut empty) = (0, 0, 0);
    for r in &results {
        hist.merge(&r.hist);
        ios += r.ios;
        polls += r.polls;
        empty += r.empty_polls;
    }
    RunResult {
        iops: ios as f64 / cfg.secs,
        p50_us: hist.percentile(50.0) as f64 / 1e3,
        p99_us: hist.percentile(99.0) as f64 / 1e3,
        cpu_per_mio: if ios > 0 {
            daemon_cpu / (ios as f64 / 1e6)
        } else {
            f64::NAN
        },
        daemon_cpu_pct: 100.0 * daemon_cpu / cfg.secs,
        client_cpu_pct: 100.0 * client_cpu / cfg.secs,
        client_idle_pct: if poll && polls > 0 {
            100.0 * empty as f64 / polls as f64
        } else {
            f64::NAN
        },
        other_cpu_pct: 100.0 * (machine_busy - daemon_cpu - client_cpu).max(0.0) / cfg.secs,
        rss_mib: rss as f64 / 1024.0,
    }
}

/// Creates the 1 GiB file filled with non-zero data, fsynced, so that
/// reads hit the page cache and no write-back runs during the measurements.
fn make_disk(dir: &Path) -> PathBuf {
    let path = dir.join("vdisk-bench-1g.img");
    let mut f = File::create(&path).unwrap();
    let chunk: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..DISK_SIZE / chunk.len() as u64 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    path
}

type Row = (Workload, Target, Server, Result<RunResult, String>);
type Runner = fn(&Config, Server, Target, &Path, Workload) -> RunResult;

fn main() {
    let (cfg, guest) = Config::from_env_and_args();
    let disk_dir = cfg.dir.join(format!("vdisk-bench-{}", std::process::id()));
    std::fs::create_dir_all(&disk_dir).unwrap();
    let _cleanup = RemoveDir(disk_dir.clone());
    let disk = if cfg.targets.contains(&Target::File) {
        eprintln!("creating the 1 GiB file in {}", disk_dir.display());
        make_disk(&disk_dir)
    } else {
        PathBuf::new()
    };

    let runner: Runner = if guest {
        // Build (or check) the guest image now, so that its build is not
        // counted as QEMU's CPU time in the first run.
        guest::guest_image();
        eprintln!(
            "guest mode: fio in a QEMU TCG guest, {} s per job; {}",
            cfg.secs.ceil(),
            if cfg.pin {
                "daemon on CPU 1, QEMU on CPU 0"
            } else {
                "unpinned"
            }
        );
        run_guest_one
    } else {
        eprintln!(
            "{} s per run (+{} s warm-up); placement: {}; client waits by {}",
            cfg.secs,
            cfg.warmup,
            if cfg.pin {
                "daemon on CPU 1, client on CPU 0"
            } else {
                "unpinned"
            },
            if cfg.poll {
                "polling (one thread)"
            } else {
                "sleeping on the completion eventfd (a thread per queue)"
            }
        );
        run_one
    };
    let rows = run_all(&cfg, &disk, runner);
    println!("{}", report(&cfg, guest, &rows));
}

/// Every selected workload on every target, the daemons one after the
/// other in alternating order. A run that panics becomes a failed row.
fn run_all(cfg: &Config, disk: &Path, runner: Runner) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    let mut order = 0usize;
    for target in cfg.targets.clone() {
        for wl in WORKLOADS {
            if let Some(f) = &cfg.filter {
                if !wl.name.contains(f.as_str()) {
                    continue;
                }
            }
            let mut servers = cfg.servers.clone();
            if order % 2 == 1 {
                servers.reverse();
            }
            order += 1;
            for server in servers {
                eprint!("{:<22} {:<5} {:<7}", wl.name, target.name(), server.name());
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runner(cfg, server, target, disk, wl)
                }))
                .map_err(|e| {
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into())
                });
                match &r {
                    Ok(r) => eprintln!(
                        " {:>9.0} IOPS  p50 {:>7.1} us  p99 {:>7.1} us",
                        r.iops, r.p50_us, r.p99_us
                    ),
                    Err(e) => eprintln!(" FAILED: {}", e.lines().next().unwrap_or("")),
                }
                rows.push((wl, target, server, r));
            }
        }
    }
    rows
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn report(cfg: &Config, guest: bool, rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n### Data path{}: {} s per run, {}{}\n",
        if guest { " (fio in a TCG guest)" } else { "" },
        if guest { cfg.secs.ceil() } else { cfg.secs },
        match (cfg.pin, guest) {
            (true, false) => "daemon pinned to CPU 1, client to CPU 0",
            (true, true) => "daemon pinned to CPU 1, QEMU to CPU 0",
            (false, _) => "unpinned",
        },
        match (guest, cfg.poll) {
            (true, _) => "; client CPU % is QEMU's",
            (false, true) => "; client polls",
            (false, false) => "; client sleeps on eventfds",
        }
    );
    let _ = writeln!(
        out,
        "| workload | target | daemon | IOPS | p50 µs | p99 µs | daemon CPU s / M I/O | daemon CPU % | client CPU % | client idle polls % | others CPU % | peak RSS MiB |"
    );
    let _ = writeln!(
        out,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (wl, target, server, r) in rows {
        match r {
            Ok(r) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {:.0} | {:.1} | {:.1} | {:.2} | {:.0} | {:.0} | {} | {:.0} | {:.1} |",
                    wl.name,
                    target.name(),
                    server.name(),
                    r.iops,
                    r.p50_us,
                    r.p99_us,
                    r.cpu_per_mio,
                    r.daemon_cpu_pct,
                    r.client_cpu_pct,
                    if r.client_idle_pct.is_nan() {
                        "-".to_string()
                    } else {
                        format!("{:.0}", r.client_idle_pct)
                    },
                    r.other_cpu_pct,
                    r.rss_mib
                );
            }
            Err(e) => {
                let e = e.lines().next().unwrap_or("").replace('|', "/");
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | failed: {e} | | | | | | | | |",
                    wl.name,
                    target.name(),
                    server.name()
                );
            }
        }
    }

    let find = |wl: &Workload, t: Target, s: Server| {
        rows.iter()
            .find(|(w, tt, ss, _)| w.name == wl.name && *tt == t && *ss == s)
            .and_then(|(_, _, _, r)| r.as_ref().ok())
    };
    let mut ratios = String::new();
    for (wl, target, server, _) in rows {
        if *server != Server::Vdiskd {
            continue;
        }
        if let (Some(v), Some(q)) = (
            find(wl, *target, Server::Vdiskd),
            find(wl, *target, Server::Qsd),
        ) {
            let _ = writeln!(
                ratios,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                wl.name,
                target.name(),
                v.iops / q.iops,
                v.p99_us / q.p99_us,
                v.cpu_per_mio / q.cpu_per_mio,
                v.rss_mib / q.rss_mib
            );
        }
    }
    if !ratios.is_empty() {
        let _ = writeln!(
            out,
            "\nvdiskd / qsd (IOPS: higher is better; the others: lower is better)\n"
        );
        let _ = writeln!(
            out,
            "| workload | target | IOPS | p99 latency | CPU per I/O | peak RSS |"
        );
        let _ = writeln!(out, "|---|---|---:|---:|---:|---:|");
        out += &ratios;
    }
    out
}

/// CPU time of the children this process has reaped, in seconds.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Sets this thread's CPU affinity to every online CPU again.
fn unpin_current_thread() {
    // SAFETY: as in `pin_current_thread`.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..online_cpus() {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The fio job for a workload, run in the guest against /dev/vda with
/// O_DIRECT and libaio: `numjobs` is the queue count (the guest has as many
/// vCPUs, so blk-mq maps one job to one queue).
fn fio_command(wl: Workload, secs: u64) -> String {
    let rw = match wl.rw {
        Rw::RandRead => "randread",
        Rw::RandWrite => "randwrite",
        Rw::SeqRead => "read",
    };
    format!(
        "fio --name=bench --filename=/dev/vda --direct=1 --ioengine=libaio --rw={rw} \
         --bs={} --iodepth={} --numjobs={} --group_reporting --time_based --runtime={secs} \
         --norandommap --randrepeat=0 --output-format=terse --terse-version=3",
        wl.bs, wl.qd, wl.queues
    )
}

/// Reads IOPS, I/O count and clat p50/p99 (µs) from a terse v3 line.
/// Fields (0-based): read KiB 5, read IOPS 7, read clat percentiles 17..37;
/// the write side is the same 41 fields later.
fn parse_fio_terse(line: &str, wl: Workload) -> Result<(f64, f64, f64, f64), String> {
    let f: Vec<&str> = line.trim().split(';').collect();
    if f.len() < 80 || f[0] != "3" {
        return Err(format!("not a fio terse v3 line: {line:?}"));
    }
    let base = if wl.rw == Rw::RandWrite { 41 } else { 0 };
    let num = |i: usize| -> Result<f64, String> {
        f[base + i]
            .parse::<f64>()
            .map_err(|e| format!("fio field {}: {e}", base + i))
    };
    let pct = |p: &str| -> Result<f64, String> {
        f[base + 17..base + 37]
            .iter()
            .find_map(|x| x.strip_prefix(p))
            .ok_or_else(|| format!("fio: no {p} percentile"))?
            .parse::<f64>()
            .map_err(|e| format!("fio percentile {p}: {e}"))
    };
    let ios = num(5)? * 1024.0 / wl.bs as f64;
    Ok((num(7)?, ios, pct("50.000000%=")?, pct("99.000000%=")?))
}

/// `--guest`: the workload as a fio job inside a QEMU TCG guest (one boot
/// per run), with the daemon measured as in the direct runs. The daemon's
/// CPU is counted from the guest's start to its exit (the boot adds little
/// I/O); QEMU's is the client column. TCG is slow: the guest, not the
/// daemon, is the bottleneck here, so look at CPU per I/O more than IOPS.
fn run_guest_one(
    cfg: &Config,
    server: Server,
    target: Target,
    disk: &Path,
    wl: Workload,
) -> RunResult {
    let dir = tempfile::Builder::new()
        .prefix("vdisk-bench")
        .tempdir()
        .unwrap();
    let (daemon, sock) = start_daemon(cfg, server, target, disk, wl, dir.path());
    let pid = daemon.pid();
    let secs = cfg.secs.ceil().max(1.0) as u64;
    let script = format!(
        "{} > /tmp/fio.out 2>&1\nrc=$?\nsed 's/^/FIO=/' /tmp/fio.out\nexit $rc\n",
        fio_command(wl, secs)
    );
    let guest = Guest::new()
        .cpus(wl.queues as u32)
        .timeout(Duration::from_secs(180 + secs))
        .disk(Disk::new(&sock).queues(wl.queues as u16));
    // QEMU inherits the affinity of the thread that starts it.
    if cfg.pin {
        pin_current_thread(0);
    }
    let (cpu0, qemu0, busy0) = (
        cpu_seconds(pid),
        children_cpu_seconds(),
        machine_busy_seconds(),
    );
    let run = guest.run(&script);
    let (cpu1, qemu1, busy1) = (
        cpu_seconds(pid),
        children_cpu_seconds(),
        machine_busy_seconds(),
    );
    if cfg.pin {
        unpin_current_thread();
    }
    let rss = peak_rss_kib(pid);
    drop(daemon);
    run.assert_success();
    let lines = run.values("FIO=");
    let line = lines
        .iter()
        .find(|l| l.starts_with("3;"))
        .unwrap_or_else(|| panic!("no fio result\n{run}"));
    let (iops, ios, p50, p99) = parse_fio_terse(line, wl).unwrap_or_else(|e| panic!("{e}\n{run}"));
    let wall = run.elapsed.as_secs_f64();
    RunResult {
        iops,
        p50_us: p50,
        p99_us: p99,
        cpu_per_mio: (cpu1 - cpu0) / (ios / 1e6),
        daemon_cpu_pct: 100.0 * (cpu1 - cpu0) / wall,
        client_cpu_pct: 100.0 * (qemu1 - qemu0) / wall,
        client_idle_pct: f64::NAN,
        other_cpu_pct: 100.0 * ((busy1 - busy0) - (cpu1 - cpu0) - (qemu1 - qemu0)).max(0.0) / wall,
        rss_mib: rss as f64 / 1024.0,
    }
}
