//! vdiskd run for real, driven through vdiskctl: a temporary state
//! directory and control socket, `--json` calls parsed, kill -9 as a crash.
//!
//! Include it with `#[path = "common/vdiskd.rs"] mod vdiskd;`, beside
//! `#[path = "common/client.rs"] mod client;`, whose watchdog it uses.
#![allow(dead_code)]

use crate::client::watchdog;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const VDISKD: &str = env!("CARGO_BIN_EXE_vdiskd");
pub const VDISKCTL: &str = env!("CARGO_BIN_EXE_vdiskctl");

/// A vdiskd with a temporary state directory and control socket. Killed
/// (SIGKILL) on drop.
pub struct Vdiskd {
    pub child: Child,
    pub control: PathBuf,
}

impl Vdiskd {
    pub fn start(state: &Path, control: &Path) -> Vdiskd {
        Vdiskd::start_with(state, control, &[])
    }

    pub fn start_with(state: &Path, control: &Path, extra: &[String]) -> Vdiskd {
        Vdiskd::spawn(state, control, extra, None)
    }

    /// As [`Vdiskd::start_with`], with the daemon's log (stderr) in `log`.
    pub fn start_logged(state: &Path, control: &Path, extra: &[String], log: &Path) -> Vdiskd {
        Vdiskd::spawn(state, control, extra, Some(log))
    }

    fn spawn(state: &Path, control: &Path, extra: &[String], log: Option<&Path>) -> Vdiskd {
        let mut cmd = Command::new(VDISKD);
        cmd.args(extra)
            .arg("--state-dir")
            .arg(state)
            .arg("--control")
            .arg(control)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null());
        if let Some(log) = log {
            cmd.stderr(std::fs::File::create(log).expect("create the daemon log"));
        }
        let child = cmd.spawn().expect("spawn vdiskd");
        let d = Vdiskd {
            child,
            control: control.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if control.exists() && d.ctl_raw(&["version"]).status.success() {
                return d;
            }
            assert!(Instant::now() < deadline, "vdiskd did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn ctl_raw(&self, args: &[&str]) -> Output {
        // The longest call here copies a 1 GiB image.
        let _deadline = watchdog::arm(
            format!("vdiskctl {} to answer", args.join(" ")),
            Duration::from_secs(120),
        );
        Command::new(VDISKCTL)
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run vdiskctl")
    }

    /// Runs vdiskctl --json ARGS, which must succeed, and parses its output.
    pub fn ctl(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ctl_raw(&all);
        assert!(
            out.status.success(),
            "vdiskctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Runs vdiskctl ARGS, which must fail with exit code 1, and returns
    /// its stderr.
    pub fn ctl_fails(&self, args: &[&str]) -> String {
        let out = self.ctl_raw(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "vdiskctl {args:?}: {err}");
        err
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9 vdiskd");
        self.child.wait().unwrap();
    }
}

impl Drop for Vdiskd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sha256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A tmpfs the test mounts (`mount -t tmpfs -o OPTIONS`) on `dir`, lazily
/// unmounted on drop. `None` when not root: the caller skips, saying so.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, options: &str) -> Option<Tmpfs> {
        // SAFETY: getuid(2) has no preconditions.
        if unsafe { libc::getuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            ok.success(),
            "mount -t tmpfs -o {options} {}",
            dir.display()
        );
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
