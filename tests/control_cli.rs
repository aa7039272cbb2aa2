//! vdiskctl against a control server with a fake service: the client side
//! of the protocol layer only (how results render as tables and --json,
//! what reaches the daemon, the exit codes 1, 2 and 3). The figures here
//! are the fake's; what the real vdiskd reports is tested against it in
//! tests/service_clone.rs and tests/live_stats.rs.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use vdisk::control::protocol::{
    CacheStats, Done, ExportInfo, ExportList, ImageInfo, IoCounters, VolumeInfo, VolumeKind,
    VolumeList, VolumeStats,
};
use vdisk::control::{
    ApiError, AuthPolicy, Call, ControlHandle, ErrorCode, Event, EventBus, EventKind, Progress,
    Response, Server, Service, StatsResult,
};

/// A vdiskctl run that takes longer than this is killed and fails the test.
const TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Fake {
    calls: Mutex<Vec<Call>>,
}

fn vm1() -> VolumeInfo {
    VolumeInfo {
        name: "vm1".into(),
        kind: VolumeKind::Overlay,
        base: Some(format!("sha256:{}", "0123456789ab".repeat(5) + "cdef")),
        size: 20 << 30,
        allocated_bytes: 3 << 20,
        exported: true,
        ..Default::default()
    }
}

impl Service for Fake {
    fn call(&self, call: Call, _progress: &dyn Fn(Progress)) -> Result<Response, ApiError> {
        self.calls.lock().unwrap().push(call.clone());
        match call {
            Call::VolumeList(_) => Ok(Response::Volumes(VolumeList {
                volumes: vec![
                    vm1(),
                    VolumeInfo {
                        name: "scratch-disk".into(),
                        kind: VolumeKind::Raw,
                        size: 512 << 20,
                        ..Default::default()
                    },
                ],
            })),
            Call::VolumeShow(p) if p.name == "vm1" => Ok(Response::Volume(vm1())),
            Call::VolumeShow(p) => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no volume {}", p.name),
            )),
            Call::VolumeCreate(p) => Ok(Response::Volume(VolumeInfo {
                name: p.name,
                kind: VolumeKind::Raw,
                size: p.size.map_or(0, |s| s.bytes()),
                ..Default::default()
            })),
            Call::VolumeDelete(_) => Ok(Response::Done(Done {})),
            Call::ImageImport(p) => Ok(Response::Image(ImageInfo {
                digest: format!("sha256:{}", "f".repeat(64)),
                names: p.name.into_iter().collect(),
                source: p.file.display().to_string(),
                ..Default::default()
            })),
            Call::ExportList(_) => Ok(Response::Exports(ExportList {
                exports: vec![ExportInfo {
                    volume: "vm1".into(),
                    socket: "/run/vdisk/vm1.sock".into(),
                    queues: 2,
                    connected: true,
                    stats: IoCounters {
                        reads: 10,
                        read_bytes: 40960,
                        ..Default::default()
                    },
                    ..Default::default()
                }],
            })),
            other => Err(ApiError::new(
                ErrorCode::Internal,
                format!("{} is not in this fake", other.method()),
            )),
        }
    }

    fn metrics(&self) -> StatsResult {
        StatsResult {
            volumes: vec![VolumeStats {
                volume: "vm1".into(),
                read_iops: 1500.0,
                latency_p99_us: Some(800),
                ..Default::default()
            }],
            cache: CacheStats {
                budget: Some(100 << 30),
                used_bytes: 3 << 30,
                images: 4,
                fs_free_bytes: 200 << 30,
            },
            pool: Default::default(),
        }
    }
}

struct Daemon {
    dir: tempfile::TempDir,
    path: PathBuf,
    fake: Arc<Fake>,
    bus: EventBus,
    _handle: ControlHandle,
}

fn my_uid() -> u32 {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid()
}

fn daemon_with(auth: AuthPolicy) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let fake = Arc::new(Fake::default());
    let bus = EventBus::new();
    let handle = Server::start(&path, fake.clone(), bus.clone(), auth).unwrap();
    Daemon {
        dir,
        path,
        fake,
        bus,
        _handle: handle,
    }
}

fn daemon() -> Daemon {
    daemon_with(AuthPolicy {
        uids: vec![my_uid()],
        gids: vec![],
    })
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn vdiskctl(control: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vdiskctl"));
    cmd.arg("--control")
        .arg(control)
        .args(args)
        .env_remove("VDISK_CONTROL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn finish(mut child: Child) -> Run {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            panic!("vdiskctl did not finish in {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    child.stdout.unwrap().read_to_string(&mut stdout).unwrap();
    child.stderr.unwrap().read_to_string(&mut stderr).unwrap();
    Run {
        code: status.code().expect("exited, not killed"),
        stdout,
        stderr,
    }
}

fn run(d: &Daemon, args: &[&str]) -> Run {
    finish(vdiskctl(&d.path, args).spawn().unwrap())
}

#[test]
fn volume_list_as_a_table() {
    let d = daemon();
    let r = run(&d, &["volume", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    let cols: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        cols,
        [
            "NAME",
            "KIND",
            "SIZE",
            "ALLOCATED",
            "BASE",
            "STATE",
            "EXPORTED"
        ]
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        row,
        [
            "vm1",
            "overlay",
            "20.0G",
            "3.0M",
            "sha256:0123456789ab",
            "ready",
            "yes"
        ]
    );
    assert!(lines[2].starts_with("scratch-disk  raw"), "{}", r.stdout);
    // Columns line up: every row has its SIZE ending where the header's does.
    let end = lines[0].find("SIZE").unwrap() + "SIZE".len();
    assert_eq!(&lines[1][end - 5..end + 1], "20.0G ");
    assert_eq!(&lines[2][end - 6..end + 1], "512.0M ");
}

#[test]
fn json_prints_the_result() {
    let d = daemon();
    let r = run(&d, &["--json", "volume", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["volumes"][0]["name"], "vm1");
    assert_eq!(v["volumes"][0]["size"], 20u64 << 30);
    // --json is global: after the noun works too.
    let r = run(&d, &["volume", "show", "vm1", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["kind"], "overlay");
}

#[test]
fn other_tables_render_the_results_they_are_given() {
    let d = daemon();
    let r = run(&d, &["volume", "show", "vm1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("size:      20.0G (21474836480 bytes)"),
        "{}",
        r.stdout
    );
    let r = run(&d, &["export", "list"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("VOLUME  SOCKET"), "{}", r.stdout);
    assert!(r.stdout.contains("/run/vdisk/vm1.sock"), "{}", r.stdout);
    let r = run(&d, &["stats"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("vm1"), "{}", r.stdout);
    assert!(r.stdout.contains("1500"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("cache: 3.0G used of 100.0G budget, 4 images, 200.0G free"),
        "{}",
        r.stdout
    );
    let r = run(&d, &["version"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("(protocol 1)"), "{}", r.stdout);
    let r = run(&d, &["volume", "delete", "vm1"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "deleted volume vm1\n"));
}

#[test]
fn arguments_reach_the_daemon() {
    let d = daemon();
    let r = run(&d, &["volume", "create", "vm2", "--size", "1G"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // A relative path is sent as an absolute one.
    let mut cmd = vdiskctl(
        &d.path,
        &["image", "import", "disk.img", "--name", "debian"],
    );
    let r = finish(cmd.current_dir(d.dir.path()).spawn().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    let calls = d.fake.calls.lock().unwrap();
    let Call::VolumeCreate(create) = &calls[0] else {
        panic!("{calls:?}")
    };
    assert_eq!(create.size.map(|s| s.bytes()), Some(1 << 30));
    assert!(!create.full && create.image.is_none());
    let Call::ImageImport(import) = &calls[1] else {
        panic!("{calls:?}")
    };
    assert_eq!(import.file, d.dir.path().join("disk.img"));
    assert_eq!(import.name.as_deref(), Some("debian"));
}

#[test]
fn control_socket_from_the_environment() {
    let d = daemon();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vdiskctl"));
    cmd.args(["volume", "show", "vm1"])
        .env("VDISK_CONTROL", &d.path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = finish(cmd.spawn().unwrap());
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("vm1"));
}

#[test]
fn exit_1_when_the_daemon_says_no() {
    let d = daemon();
    let r = run(&d, &["volume", "show", "nope"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr, "error: not_found: no volume nope\n");
    assert!(r.stdout.is_empty());
    // Names are checked by the daemon, not by vdiskctl.
    let r = run(&d, &["volume", "show", "../x"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.starts_with("error: bad_name: "), "{}", r.stderr);
    let denied = daemon_with(AuthPolicy::deny_all());
    let r = run(&denied, &["volume", "list"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.starts_with("error: permission_denied: "),
        "{}",
        r.stderr
    );
}

#[test]
fn exit_2_on_usage_errors() {
    let d = daemon();
    for args in [
        &["volume", "frobnicate"][..],
        &["volume"],
        &[],
        &["volume", "create", "vm3", "--size", "lots"],
        &["volume", "resize", "vm1"],
        &["image", "fetch", "http://x/y.img"],
    ] {
        let r = run(&d, args);
        assert_eq!(r.code, 2, "{args:?}: {}", r.stderr);
        assert!(!r.stderr.is_empty());
    }
    assert!(d.fake.calls.lock().unwrap().is_empty());
}

#[test]
fn exit_3_when_the_daemon_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nobody-here.sock");
    let r = finish(vdiskctl(&missing, &["volume", "list"]).spawn().unwrap());
    assert_eq!(r.code, 3);
    assert!(
        r.stderr.contains(&*missing.to_string_lossy()),
        "the message names the socket: {}",
        r.stderr
    );
    // A socket file nobody listens on: connection refused.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let r = finish(vdiskctl(&stale, &["version"]).spawn().unwrap());
    assert_eq!(r.code, 3);
    assert!(r.stderr.contains("stale.sock"), "{}", r.stderr);
    assert!(r.stderr.to_lowercase().contains("refused"), "{}", r.stderr);
}

#[test]
fn watch_prints_events() {
    let d = daemon();
    let mut child = vdiskctl(&d.path, &["--json", "watch"]).spawn().unwrap();
    let start = Instant::now();
    while d.bus.watchers() == 0 {
        assert!(start.elapsed() < TIMEOUT, "vdiskctl watch never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    d.bus.publish(Event::now(EventKind::ExportConnected {
        volume: "vm1".into(),
        peer_pid: None,
    }));
    let mut out = BufReader::new(child.stdout.take().unwrap());
    // Read on a thread so a silent vdiskctl fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(TIMEOUT);
    child.kill().unwrap();
    child.wait().unwrap();
    // With --json, one event object per line and nothing else.
    let line = line.expect("no event printed");
    let e: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(e["type"], "export.connected", "{line}");
    assert_eq!(e["volume"], "vm1");
}
