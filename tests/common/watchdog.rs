//! Deadlines for waits that the waiting code cannot bound itself: a blocking
//! call into another process (vdiskctl against a daemon, a client library
//! waiting for a socket) or a whole test that owns a daemon.
//!
//! [`arm`] returns a guard; if it is still alive when its limit passes, the
//! watchdog prints which test was waiting for what, kills (SIGKILL) every
//! child process of the test binary, so that no daemon, QEMU or
//! qemu-storage-daemon outlives it, and ends the test binary with exit code
//! 124. A hung wait inside one test cannot be unwound from outside its
//! thread, so ending the binary is the only way to stop it; `scripts/test.sh`
//! then reports the binary as failed. Dropping the guard disarms it.
//!
//! Why a watchdog in the tests rather than cargo-nextest's `slow-timeout`:
//! the suite runs with plain `cargo test` on a machine that may not have
//! nextest, several tests in one binary share a built guest image, and the
//! message can name what was being waited for, not only the test.
//!
//! Include it with `#[path = "common/watchdog.rs"] mod watchdog;` (client.rs
//! and guest.rs include it themselves).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Armed {
    test: String,
    what: String,
    limit: Duration,
    expires: Instant,
}

struct State {
    next: u64,
    armed: BTreeMap<u64, Armed>,
}

struct Watchdog {
    state: Mutex<State>,
    changed: Condvar,
}

fn watchdog() -> &'static Watchdog {
    static W: OnceLock<&'static Watchdog> = OnceLock::new();
    W.get_or_init(|| {
        let w: &'static Watchdog = Box::leak(Box::new(Watchdog {
            state: Mutex::new(State {
                next: 0,
                armed: BTreeMap::new(),
            }),
            changed: Condvar::new(),
        }));
        std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || w.run())
            .expect("spawn the test watchdog");
        w
    })
}

impl Watchdog {
    fn run(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            let first = st.armed.values().map(|a| a.expires).min();
            match first {
                Some(at) if at <= now => {
                    if let Some(a) = st.armed.values().find(|a| a.expires == at) {
                        expire(a);
                    }
                }
                Some(at) => {
                    st = self
                        .changed
                        .wait_timeout(st, at - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
                None => st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
    }
}

fn expire(a: &Armed) -> ! {
    use std::io::Write as _;
    let children = kill_children();
    // Straight to fd 2: libtest captures eprintln! in the test's threads
    // (this one included), and exit() would throw the capture away.
    let _ = writeln!(
        std::io::stderr(),
        "\nDEADLINE: test `{}` waited more than {:?} for {}; killed its child processes {:?} and ended the test binary",
        a.test, a.limit, a.what, children
    );
    std::process::exit(124)
}

/// SIGKILLs every process whose parent is this one; returns their pids.
fn kill_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut killed = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses,
        // so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid = rest.split_whitespace().nth(1);
        if ppid == Some(me.as_str()) {
            // SAFETY: kill(2) with a pid read from /proc whose parent is us:
            // it cannot be reused before we reap it, and we do not reap here.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed.push(pid);
        }
    }
    killed
}

/// A deadline in force until dropped.
#[must_use = "the deadline is disarmed when the guard is dropped"]
pub struct Deadline {
    id: u64,
}

/// Arms a deadline of `limit` for `what` (say what is awaited: "vdiskd's
/// socket /tmp/x/a.sock", "vdiskctl volume create ...").
/// `VDISK_TEST_DEADLINE_SCALE` (a float, default 1) scales every limit, for
/// slow machines.
pub fn arm(what: impl Into<String>, limit: Duration) -> Deadline {
    let scale = std::env::var("VDISK_TEST_DEADLINE_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    let limit = limit.mul_f64(scale);
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed thread>")
        .to_string();
    let w = watchdog();
    let mut st = w.state.lock().unwrap_or_else(|e| e.into_inner());
    let id = st.next;
    st.next += 1;
    st.armed.insert(
        id,
        Armed {
            test,
            what: what.into(),
            limit,
            expires: Instant::now() + limit,
        },
    );
    drop(st);
    w.changed.notify_all();
    Deadline { id }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let w = watchdog();
        w.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .armed
            .remove(&self.id);
        w.changed.notify_all();
    }
}
