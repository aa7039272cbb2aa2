//! The vhost-user-blk server under test, started as a child process: vdiskd,
//! or qemu-storage-daemon (the peer, and the reference that proves the guest
//! harness). `VDISK_E2E_SERVER=qsd` runs the end-to-end tests against
//! qemu-storage-daemon instead of vdiskd.
//!
//! Include it from a test file with `#[path = "common/server.rs"] mod server;`,
//! beside `#[path = "common/guest.rs"] mod guest;`, whose helpers it uses.
#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a server may take to create its listening sockets.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a server may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    Vdiskd,
    Qsd,
}

impl ServerKind {
    /// `VDISK_E2E_SERVER`: `vdiskd` (the default) or `qsd`.
    pub fn from_env() -> Self {
        match std::env::var("VDISK_E2E_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("vdiskd") => ServerKind::Vdiskd,
            Ok("qsd") | Ok("qemu-storage-daemon") => ServerKind::Qsd,
            Ok(other) => panic!("VDISK_E2E_SERVER={other}: expected vdiskd or qsd"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Vdiskd => "vdiskd",
            ServerKind::Qsd => "qemu-storage-daemon",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Backing {
    File(PathBuf),
    /// A null device of this many bytes.
    Null(u64),
}

/// One vhost-user-blk export, in vdiskd's `--export` terms.
#[derive(Debug, Clone)]
pub struct Export {
    pub socket: PathBuf,
    pub backing: Backing,
    pub queues: Option<u16>,
    pub readonly: bool,
    pub serial: Option<String>,
    pub block_size: Option<u32>,
    pub direct: Option<bool>,
}

impl Export {
    pub fn file(socket: impl Into<PathBuf>, file: impl Into<PathBuf>) -> Self {
        Export {
            socket: socket.into(),
            backing: Backing::File(file.into()),
            queues: None,
            readonly: false,
            serial: None,
            block_size: None,
            direct: None,
        }
    }

    pub fn null(socket: impl Into<PathBuf>, size: u64) -> Self {
        Export {
            backing: Backing::Null(size),
            ..Export::file(socket, PathBuf::new())
        }
    }

    pub fn queues(mut self, n: u16) -> Self {
        self.queues = Some(n);
        self
    }

    pub fn readonly(mut self, on: bool) -> Self {
        self.readonly = on;
        self
    }

    pub fn serial(mut self, s: &str) -> Self {
        self.serial = Some(s.to_string());
        self
    }

    pub fn block_size(mut self, n: u32) -> Self {
        self.block_size = Some(n);
        self
    }

    pub fn direct(mut self, on: bool) -> Self {
        self.direct = Some(on);
        self
    }

    /// vdiskd's `--export` value.
    pub fn vdiskd_spec(&self) -> String {
        let on_off = |b: bool| if b { "on" } else { "off" };
        let mut s = format!("socket={}", self.socket.display());
        match &self.backing {
            Backing::File(p) => s.push_str(&format!(",file={}", p.display())),
            Backing::Null(n) => s.push_str(&format!(",null={n}")),
        }
        if let Some(q) = self.queues {
            s.push_str(&format!(",queues={q}"));
        }
        s.push_str(&format!(",readonly={}", on_off(self.readonly)));
        if let Some(serial) = &self.serial {
            s.push_str(&format!(",serial={serial}"));
        }
        if let Some(bs) = self.block_size {
            s.push_str(&format!(",block-size={bs}"));
        }
        if let Some(d) = self.direct {
            s.push_str(&format!(",direct={}", on_off(d)));
        }
        s
    }

    /// qemu-storage-daemon's `--blockdev` and `--export` values for export
    /// number `i`. qemu-storage-daemon has no serial number option for
    /// vhost-user-blk; `serial` is ignored.
    pub fn qsd_args(&self, i: usize) -> [String; 4] {
        let on_off = |b: bool| if b { "on" } else { "off" };
        let node = format!("disk{i}");
        let mut blockdev = match &self.backing {
            Backing::File(p) => format!(
                "driver=file,node-name={node},filename={},discard=unmap,cache.direct={}",
                p.display(),
                on_off(self.direct.unwrap_or(false))
            ),
            Backing::Null(n) => format!("driver=null-co,node-name={node},size={n},read-zeroes=on"),
        };
        blockdev.push_str(&format!(",read-only={}", on_off(self.readonly)));
        let mut export = format!(
            "type=vhost-user-blk,id=export{i},node-name={node},addr.type=unix,addr.path={},writable={}",
            self.socket.display(),
            on_off(!self.readonly)
        );
        if let Some(q) = self.queues {
            export.push_str(&format!(",num-queues={q}"));
        }
        if let Some(bs) = self.block_size {
            export.push_str(&format!(",logical-block-size={bs}"));
        }
        [
            "--blockdev".to_string(),
            blockdev,
            "--export".to_string(),
            export,
        ]
    }
}

/// A running server. Dropping it stops the process (SIGTERM, then SIGKILL),
/// so a failing test does not leave it behind.
pub struct Server {
    pub kind: ServerKind,
    child: Option<Child>,
    log_path: PathBuf,
}

impl Server {
    /// Starts `kind` serving `exports`, with its state, control socket and
    /// log under `dir`, and waits until every export's socket exists.
    pub fn start(kind: ServerKind, dir: &Path, exports: &[Export]) -> Server {
        Self::start_with_log(kind, dir, exports, "")
    }

    /// As `start`, with `tag` in the log file's name (for a second server
    /// in the same directory, e.g. after a restart).
    pub fn start_with_log(kind: ServerKind, dir: &Path, exports: &[Export], tag: &str) -> Server {
        let log_path = dir.join(format!("{}{tag}.log", kind.name()));
        let log = File::create(&log_path).expect("create server log");
        let mut cmd = match kind {
            ServerKind::Vdiskd => {
                let state = dir.join("state");
                std::fs::create_dir_all(&state).expect("create state dir");
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_vdiskd"));
                cmd.arg("--state-dir")
                    .arg(&state)
                    .arg("--control")
                    .arg(dir.join("control.sock"));
                for e in exports {
                    cmd.arg("--export").arg(e.vdiskd_spec());
                }
                if std::env::var_os("VDISK_LOG").is_none() {
                    cmd.env("VDISK_LOG", "debug");
                }
                cmd
            }
            ServerKind::Qsd => {
                let mut cmd = Command::new("qemu-storage-daemon");
                for (i, e) in exports.iter().enumerate() {
                    cmd.args(e.qsd_args(i));
                }
                cmd
            }
        };
        super::guest::kill_with_parent(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup server log"))
            .stderr(log);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", kind.name()));
        let mut server = Server {
            kind,
            child: Some(child),
            log_path,
        };
        server.wait_for_sockets(exports);
        server
    }

    fn wait_for_sockets(&mut self, exports: &[Export]) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let missing: Vec<&Path> = exports
                .iter()
                .map(|e| e.socket.as_path())
                .filter(|p| !is_socket(p))
                .collect();
            if missing.is_empty() {
                return;
            }
            let child = self.child.as_mut().expect("server child");
            if let Some(status) = child.try_wait().expect("wait for server") {
                panic!(
                    "{} exited ({status}) before creating {missing:?}\n{}",
                    self.kind.name(),
                    self.log_section()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not create {missing:?} within {START_TIMEOUT:?}\n{}",
                    self.kind.name(),
                    self.log_section()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("wait for server").is_none(),
            None => false,
        }
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after a grace period);
    /// returns the exit status and whether it had to be killed.
    pub fn stop(&mut self) -> (ExitStatus, bool) {
        let mut child = self.child.take().expect("server already stopped");
        if let Some(status) = child.try_wait().expect("wait for server") {
            return (status, false);
        }
        // SAFETY: kill(2) with a pid of our own child that has not been
        // reaped yet, so the pid cannot have been reused.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for server") {
                return (status, false);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                return (child.wait().expect("wait for server"), true);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("server already stopped");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops the server and panics, with its log, unless it exited 0 on
    /// SIGTERM in time.
    pub fn stop_ok(&mut self) {
        let (status, killed) = self.stop();
        if killed || !status.success() {
            panic!(
                "{} did not exit 0 on SIGTERM ({status}{})\n{}",
                self.kind.name(),
                if killed { ", killed after timeout" } else { "" },
                self.log_section()
            );
        }
    }

    /// Everything the server wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The log framed for a failure message (its last 200 lines).
    pub fn log_section(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(200)..];
        format!(
            "----- {} log ({}) -----\n{}\n-------------------------",
            self.kind.name(),
            self.log_path.display(),
            tail.join("\n")
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
    }
}

fn is_socket(p: &Path) -> bool {
    std::fs::metadata(p)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}
