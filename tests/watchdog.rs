//! The test watchdog (tests/common/watchdog.rs) ends a hung test: it names
//! the test and what it waited for, kills the processes the test started,
//! and ends the test binary, well before any CI ceiling.

#[path = "common/watchdog.rs"]
mod watchdog;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Hangs on purpose, holding a child process: run only by
/// `hung_test_is_ended_and_named` below, in a test binary of its own.
#[test]
#[ignore = "hangs on purpose; run by hung_test_is_ended_and_named"]
fn hangs_waiting_for_a_child() {
    let pidfile = std::env::var("WATCHDOG_PIDFILE").expect("WATCHDOG_PIDFILE");
    let mut child = Command::new("sleep")
        .arg("600")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(&pidfile, child.id().to_string()).unwrap();
    let _deadline = watchdog::arm("`sleep 600` to exit", Duration::from_secs(2));
    let _ = child.wait();
    unreachable!("the watchdog should have ended this binary");
}

#[test]
fn hung_test_is_ended_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("child.pid");
    let start = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "hangs_waiting_for_a_child"])
        .env("WATCHDOG_PIDFILE", &pidfile)
        .env_remove("VDISK_TEST_DEADLINE_SCALE")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(124), "{stderr}");
    assert!(
        took < Duration::from_secs(30),
        "the watchdog took {took:?} to end a 2 s deadline"
    );
    assert!(
        stderr.contains("DEADLINE: test `hangs_waiting_for_a_child` waited more than 2s for `sleep 600` to exit"),
        "{stderr}"
    );
    // The child it started is gone (killed, and reaped by init since its
    // parent exited).
    let pid: i32 = std::fs::read_to_string(&pidfile).unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // SAFETY: kill(2) with signal 0 only checks whether the pid exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        if !alive {
            break;
        }
        // A zombie not yet reaped counts as gone.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if state
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start().starts_with('Z'))
            == Some(true)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sleep {pid} outlived the watchdog"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_dropped_deadline_never_fires() {
    let d = watchdog::arm("nothing", Duration::from_millis(50));
    drop(d);
    std::thread::sleep(Duration::from_millis(200));
}
