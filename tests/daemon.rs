//! vdiskd's process contract: readiness through $NOTIFY_SOCKET, socket
//! mode, the config file, exit codes and messages for bad input, and the
//! systemd unit.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/client.rs"]
mod client;

use client::watchdog;

const VDISKD: &str = env!("CARGO_BIN_EXE_vdiskd");

struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn p(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
    fn disk(&self, name: &str, size: u64) -> PathBuf {
        let p = self.p(name);
        std::fs::File::create(&p).unwrap().set_len(size).unwrap();
        p
    }
    fn cmd(&self) -> Command {
        let mut c = Command::new(VDISKD);
        c.arg("--state-dir")
            .arg(self.p("state"))
            .arg("--control")
            .arg(self.p("control.sock"));
        c.env_remove("NOTIFY_SOCKET").stdin(Stdio::null());
        c
    }
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill(2) with a pid we own and a valid signal number.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let t = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "vdiskd did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run(cmd: &mut Command) -> Output {
    let _deadline = watchdog::arm(format!("{cmd:?} to exit"), Duration::from_secs(30));
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[test]
fn tells_systemd_it_is_ready_and_exits_zero_on_sigterm() {
    let d = Dir::new();
    let disk = d.disk("a.img", 1 << 20);
    let notify = d.p("notify.sock");
    let listener = UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let sock = d.p("a.sock");
    let mut child = Guard(
        d.cmd()
            .arg("--export")
            .arg(format!("socket={},file={}", sock.display(), disk.display()))
            .env("NOTIFY_SOCKET", &notify)
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).expect("no READY=1 within 10 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means the socket is there, with mode 0660.
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let st = sigterm(&mut child.0);
    assert!(st.success(), "{st:?}");
    let n = listener.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn exports_come_from_the_config_file_too() {
    let d = Dir::new();
    let a = d.disk("a.img", 1 << 20);
    let b = d.disk("b.img", 1 << 20);
    let cfg = d.p("vdiskd.toml");
    std::fs::write(
        &cfg,
        format!(
            "log = \"debug\"\n[[export]]\nsocket = \"{}\"\nfile = \"{}\"\nqueues = 2\nreadonly = true\n",
            d.p("a.sock").display(),
            a.display()
        ),
    )
    .unwrap();
    let mut child = Guard(
        d.cmd()
            .arg("--config")
            .arg(&cfg)
            .arg("--export")
            .arg(format!(
                "socket={},file={}",
                d.p("b.sock").display(),
                b.display()
            ))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&d.p("a.sock"));
    wait_for(&d.p("b.sock"));
    // queues = 2 and readonly = true took effect on a, not on b.
    let raw = client::RawClient::connect(&d.p("a.sock")).expect("raw connect a");
    assert!(
        raw.features()
            .contains(virtio_driver::VirtioBlkFeatureFlags::RO),
        "a is not read-only"
    );
    drop(raw);
    let opts = client::ClientOptions::queues(2).read_only();
    let mut a2 = client::Client::connect_with(&d.p("a.sock"), &opts).expect("a serves 2 queues");
    assert_eq!(a2.num_queues(), 2);
    assert!(a2.write(0, &[1u8; 512]).is_err(), "a took a write");
    drop(a2);
    assert!(
        client::Client::connect_with(&d.p("b.sock"), &client::ClientOptions::queues(2)).is_err(),
        "b has one queue: a 2-queue connection must be refused"
    );
    let mut b1 = client::Client::connect(&d.p("b.sock"), 1).expect("b serves 1 queue");
    b1.write(0, &[1u8; 512]).expect("b is writable");
    drop(b1);
    assert!(sigterm(&mut child.0).success());
}

#[test]
fn bad_command_lines_exit_2_with_a_clear_message() {
    let d = Dir::new();
    let disk = d.disk("a.img", 1 << 20);
    let cases = [
        (
            vec!["--export".to_string(), format!("file={}", disk.display())],
            "`socket=` is required",
        ),
        (
            vec![
                "--export".into(),
                format!(
                    "socket={},file={},queues=99",
                    d.p("s").display(),
                    disk.display()
                ),
            ],
            "expected 1 to 16",
        ),
        (
            vec![
                "--export".into(),
                format!(
                    "socket={},file={},colour=red",
                    d.p("s").display(),
                    disk.display()
                ),
            ],
            "unknown key `colour`",
        ),
        (
            vec!["--config".into(), d.p("missing.toml").display().to_string()],
            "missing.toml",
        ),
        (
            vec![
                "--export".into(),
                format!("socket={},file={}", d.p("s").display(), disk.display()),
                "--export".into(),
                format!("socket={},null=1M", d.p("s").display()),
            ],
            "two exports use the socket",
        ),
    ];
    for (args, want) in cases {
        let out = run(d.cmd().args(&args));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: wanted `{want}` in: {err}");
    }
}

#[test]
fn a_disk_that_cannot_be_opened_exits_1_naming_it() {
    let d = Dir::new();
    let bad = d.disk("odd.img", 1000);
    for (spec, want) in [
        (
            format!(
                "socket={},file={}",
                d.p("s").display(),
                d.p("nope.img").display()
            ),
            "nope.img",
        ),
        (
            format!("socket={},file={}", d.p("s").display(), bad.display()),
            "not a multiple of 512",
        ),
    ] {
        let out = run(d.cmd().arg("--export").arg(&spec));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{spec}: {err}");
        assert!(err.contains(want), "{spec}: wanted `{want}` in: {err}");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(which) = Command::new("systemd-analyze").arg("--version").output() else {
        panic!("systemd-analyze is needed for this test (package systemd)");
    };
    assert!(which.status.success());
    let d = Dir::new();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/vdiskd.service"
    ))
    .unwrap();
    let unit = unit.replace("/usr/local/bin/vdiskd", VDISKD);
    let path = d.p("vdiskd.service");
    std::fs::write(&path, unit).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify:\n{err}");
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vdiskd.service"))
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{err}");
}

/// The unit's directives, one key to its values (repeated keys joined).
fn unit_directives() -> std::collections::HashMap<String, String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/vdiskd.service"
    ))
    .unwrap();
    let mut map = std::collections::HashMap::<String, String>::new();
    for line in unit.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (k, v) = line.split_once('=').expect("key=value");
        let e = map.entry(k.to_string()).or_default();
        if !e.is_empty() {
            e.push(' ');
        }
        e.push_str(v);
    }
    map
}

/// This machine cannot run the unit itself (PID 1 is not systemd), so each
/// documented feature is checked against what the unit allows.
#[test]
fn the_systemd_unit_allows_what_the_documented_features_need() {
    let u = unit_directives();
    let get = |k: &str| u.get(k).map(String::as_str).unwrap_or("");
    // Readiness and the sockets.
    assert_eq!(get("Type"), "notify");
    assert!(get("RuntimeDirectory")
        .split_whitespace()
        .any(|d| d == "vdisk"));
    // `image fetch` over http(s) and the Prometheus endpoint need IP.
    assert_ne!(
        get("PrivateNetwork"),
        "yes",
        "image fetch needs the network"
    );
    let families: Vec<&str> = get("RestrictAddressFamilies").split_whitespace().collect();
    for f in ["AF_UNIX", "AF_INET", "AF_INET6"] {
        assert!(families.contains(&f), "RestrictAddressFamilies lacks {f}");
    }
    // The state directory and the documented export-raw directory are
    // writable although ProtectSystem=strict makes the rest read-only.
    assert_eq!(get("ProtectSystem"), "strict");
    let writable: Vec<&str> = get("StateDirectory")
        .split_whitespace()
        .chain(get("ReadWritePaths").split_whitespace())
        .collect();
    assert!(writable.contains(&"vdisk"), "{writable:?}");
    assert!(writable.contains(&"vdisk/exports"), "{writable:?}");
    // io_uring is allowed by the system call filter.
    let calls = get("SystemCallFilter");
    for c in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        assert!(calls.contains(c), "SystemCallFilter lacks {c}");
    }
    // The defaults vdiskd uses are the unit's directories.
    assert!(get("ExecStart").contains("--config /etc/vdisk/vdiskd.toml"));
    assert_eq!(vdisk::config::DEFAULT_STATE_DIR, "/var/lib/vdisk");
    assert_eq!(vdisk::config::DEFAULT_CONTROL, "/run/vdisk/control.sock");
}
