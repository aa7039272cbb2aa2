//! vdiskd's process contract: readiness through $NOTIFY_SOCKET, socket
//! mode, the config file, exit codes and messages for bad input, and the
//! systemd unit.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

#[path = "common/watchdog.rs"]
mod watchdog;

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
    assert!(unit.contains("Type=notify"));
    assert!(unit.contains("RuntimeDirectory=vdisk"));
    let unit = unit.replace("/usr/local/bin/vdiskd", VDISKD);
    let path = d.p("vdiskd.service");
    std::fs::write(&path, unit).unwrap();
    let out = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("vdiskd.service"))
        // The test machine may lack the unit's Documentation file or group.
        .filter(|l| !l.contains("Documentation") && !l.contains("group"))
        .collect();
    assert!(problems.is_empty(), "systemd-analyze verify:\n{err}");
}
