//! Live figures from the real vdiskd: under a blkio client's load, `stats`
//! (table and `--json`) and the Prometheus endpoint report IOPS, bytes/s
//! and latency percentiles that agree with what the client measured.
//!
//! The load is 1 MiB reads, one at a time, from a volume whose pages the
//! test keeps out of the page cache: each read waits for the disk (about a
//! millisecond here), so the two wake-ups only the client sees (the kick,
//! the completion signal; tens of microseconds on a VM) stay well inside
//! the 20% the daemon's figures must agree within.

#[path = "common/client.rs"]
mod client;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use client::{pattern, Client, ClientOptions, Op};
use serde_json::Value;
use vdiskd::Vdiskd;

const MIB: u64 = 1 << 20;
const DISK: u64 = DISK_MIB * MIB;
/// One request at a time: the client's own latency is then the daemon's
/// plus one kick and one completion signal, not plus the time the client
/// spends queueing the rest of a batch before it can reap.
const DEPTH: usize = 1;
const DISK_MIB: u64 = 256;
const LOAD: Duration = Duration::from_secs(3);
/// Large enough that a request spends its time in the daemon, not in the
/// two wake-ups (kick, completion signal) only the client sees.
const BS: u64 = 1 << 20;

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an http response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// The sorted latencies' `q` quantile.
fn quantile(sorted: &[Duration], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn within(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        want > 0.0 && got > 0.0,
        "{what}: daemon says {got}, client measured {want}"
    );
    let off = (got - want).abs() / want;
    assert!(
        off <= tolerance,
        "{what}: daemon says {got:.1}, client measured {want:.1} ({:.0}% apart)",
        off * 100.0
    );
}

#[test]
fn stats_and_prometheus_agree_with_the_client_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = Vdiskd::start_with(
        &dir.path().join("state"),
        &dir.path().join("control.sock"),
        &["--metrics".into(), format!("127.0.0.1:{port}")],
    );
    d.ctl(&["volume", "create", "vol", "--size", &format!("{DISK_MIB}M")]);
    // Real data on disk (a hole would read as zeros without any I/O).
    let data_path = dir.path().join("state/volumes/vol/data");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&data_path)
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        let chunk = pattern(3, 0, MIB as usize);
        for i in 0..DISK_MIB {
            file.write_all_at(&chunk, i * MIB).unwrap();
        }
        file.sync_all().unwrap();
    }
    let drop_cache = |off: u64, len: u64| {
        use std::os::fd::AsRawFd;
        // SAFETY: posix_fadvise on a descriptor we own; it only drops
        // clean cached pages.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                off as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    };
    drop_cache(0, 0);
    let socket = dir.path().join("vol.sock");
    d.ctl(&[
        "export",
        "start",
        "vol",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    let opts = ClientOptions {
        buffer_size: DEPTH * BS as usize * 2,
        ..ClientOptions::queues(1)
    };
    let mut c = Client::connect_with(&socket, &opts).expect("connect");

    // Random 1 MiB reads at offsets from a simple LCG, each from the disk.
    let mut x = 12345u64;
    let mut batch = || -> Vec<(usize, Op)> {
        (0..DEPTH)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let off = (x >> 20) % (DISK / BS) * BS;
                // Whatever an earlier read brought in goes again.
                drop_cache(off, BS);
                (
                    0,
                    Op::Read {
                        offset: off,
                        len: BS as usize,
                    },
                )
            })
            .collect()
    };
    // Warm up, and let the first sampling interval pass.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(1200) {
        c.run(&batch());
    }
    // This call starts the interval the next one reports.
    d.ctl(&["stats"]);
    let start = Instant::now();
    let mut latencies = Vec::new();
    let mut ops = 0u64;
    while start.elapsed() < LOAD {
        let (results, lat) = c.run_timed(&batch());
        assert!(results.iter().all(Result::is_ok));
        ops += results.len() as u64;
        latencies.extend(lat);
    }
    let took = start.elapsed().as_secs_f64();
    let stats = d.ctl(&["stats"]);
    let table = String::from_utf8_lossy(&d.ctl_raw(&["stats"]).stdout).into_owned();
    let prom = scrape(port);

    latencies.sort();
    let iops = ops as f64 / took;
    let p50 = quantile(&latencies, 0.50);
    let p99 = quantile(&latencies, 0.99);
    eprintln!("client: {iops:.0} reads/s, p50 {p50:.0} us, p99 {p99:.0} us; daemon: {stats}");

    let v = &stats["volumes"][0];
    assert_eq!(v["volume"], "vol", "{stats}");
    within("read_iops", v["read_iops"].as_f64().unwrap(), iops, 0.20);
    within(
        "read_bytes_per_sec",
        v["read_bytes_per_sec"].as_f64().unwrap(),
        iops * BS as f64,
        0.20,
    );
    within(
        "latency_p50_us",
        v["latency_p50_us"].as_f64().unwrap_or(0.0),
        p50,
        0.20,
    );
    within(
        "latency_p99_us",
        v["latency_p99_us"].as_f64().unwrap_or(0.0),
        p99,
        0.20,
    );
    assert_eq!(v["write_iops"], 0.0, "{stats}");

    // The table shows the same figures (rounded).
    let row = table
        .lines()
        .find(|l| l.starts_with("vol "))
        .unwrap_or_else(|| panic!("no row for vol:\n{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    let shown: f64 = cells[1].parse().unwrap_or_else(|_| panic!("{table}"));
    within("READ/S column", shown, iops, 0.20);

    // Prometheus: parsed by a real text-format parser.
    let lines = prom.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
    let sample = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{prom}"));
        match s.value {
            prometheus_parse::Value::Gauge(x)
            | prometheus_parse::Value::Counter(x)
            | prometheus_parse::Value::Untyped(x) => x,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    within(
        "vdisk_volume_read_iops",
        sample("vdisk_volume_read_iops", &[("volume", "vol")]),
        iops,
        0.20,
    );
    within(
        "vdisk_volume_latency_microseconds p50",
        sample(
            "vdisk_volume_latency_microseconds",
            &[("volume", "vol"), ("quantile", "0.5")],
        ),
        p50,
        0.20,
    );
    let total = sample("vdisk_volume_reads_total", &[("volume", "vol")]);
    assert!(total >= ops as f64, "reads_total {total} < {ops}");
    assert_eq!(
        sample("vdisk_volume_flush_failed", &[("volume", "vol")]),
        0.0
    );
    let _: Value = stats;
}

#[test]
fn metrics_are_off_by_default_and_a_bad_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(vdiskd::VDISKD)
        .args(["--state-dir", dir.path().join("s").to_str().unwrap()])
        .args(["--control", dir.path().join("c.sock").to_str().unwrap()])
        .args(["--metrics", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--metrics"), "{err}");
}
