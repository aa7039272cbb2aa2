//! A volume on a file system that fills up: the write that does not fit
//! fails with IOERR, vdiskd stays up, warns once per export (not once per
//! request) and publishes one `export.io_error` event, other volumes keep
//! working, no acknowledged write is lost, and once space is freed the same
//! export writes again. Also: `export.connected` names the client's pid.

#[path = "common/client.rs"]
mod client;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use client::{pattern, Client};
use serde_json::Value;
use vdiskd::{Tmpfs, Vdiskd};

const MIB: u64 = 1 << 20;

/// Events from `vdiskctl --json watch`, one JSON object per line.
fn watch(control: &Path) -> (std::process::Child, mpsc::Receiver<Value>) {
    let mut child = Command::new(vdiskd::VDISKCTL)
        .args(["--control", control.to_str().unwrap(), "--json", "watch"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if tx.send(v).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The next event of `kind` (the event object), within 10 s.
fn next_event(rx: &mpsc::Receiver<Value>, kind: &str) -> Value {
    loop {
        let v = rx
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no {kind} event within 10 s"));
        let e = v.get("event").cloned().unwrap_or(v);
        if e["type"] == kind {
            return e;
        }
    }
}

#[test]
fn a_full_file_system_fails_writes_not_the_daemon_and_space_brings_them_back() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_tmpfs) = Tmpfs::mount(&state, "size=16m") else {
        return;
    };
    let control = dir.path().join("control.sock");
    let log = dir.path().join("vdiskd.log");
    let d = Vdiskd::start_logged(&state, &control, &[], &log);
    let (mut watcher, events) = watch(&control);
    // The watcher is subscribed once it sees this.
    d.ctl(&["volume", "create", "other", "--size", "1M"]);
    next_event(&events, "volume.created");
    d.ctl(&["volume", "create", "big", "--size", "64M"]);
    let sock = |v: &str| dir.path().join(format!("{v}.sock"));
    for v in ["big", "other"] {
        d.ctl(&["export", "start", v, "--socket", sock(v).to_str().unwrap()]);
    }
    let mut other = Client::connect(&sock("other"), 1).unwrap();
    other.write(0, &pattern(1, 0, MIB as usize)).unwrap();
    let mut big = Client::connect(&sock("big"), 1).unwrap();
    let mut connected = next_event(&events, "export.connected");
    if connected["volume"] != "big" {
        connected = next_event(&events, "export.connected");
    }
    assert_eq!(connected["volume"], "big", "{connected}");
    assert_eq!(connected["peer_pid"], std::process::id(), "{connected}");

    // Fill the file system, 1 MiB at a time.
    let mut acked = Vec::new();
    let mut failed_at = None;
    for i in 0..64 {
        match big.write(i * MIB, &pattern(i, i * MIB, MIB as usize)) {
            Ok(()) => acked.push(i),
            Err(e) => {
                failed_at = Some((i, e));
                break;
            }
        }
    }
    let (full, err) = failed_at.expect("a 64 MiB volume cannot fit in 16 MiB");
    assert_eq!(err, blkio::Errno::IO, "the failing write gets IOERR");
    // More failures, as a guest would keep trying.
    for j in 0..20 {
        assert!(big
            .write((full + 1) * MIB + j * 4096, &[7u8; 4096])
            .is_err());
    }
    d.ctl(&["version"]);
    let e = next_event(&events, "export.io_error");
    assert_eq!(e["volume"], "big", "{e}");

    // Another volume on the same file system keeps working.
    let back = pattern(2, 0, MIB as usize);
    other.write(0, &back).unwrap();
    assert_eq!(other.read(0, MIB as usize).unwrap(), back);

    // Free space: discard the first 8 MiB of big. The same export writes
    // again, where it failed.
    big.discard(0, 8 * MIB).unwrap();
    big.write(full * MIB, &pattern(full, full * MIB, MIB as usize))
        .expect("a write after space was freed");
    acked.push(full);
    for &i in acked.iter().filter(|&&i| i >= 8) {
        assert_eq!(
            big.read(i * MIB, MIB as usize).unwrap(),
            pattern(i, i * MIB, MIB as usize),
            "acknowledged MiB {i} is lost"
        );
    }
    drop((big, other));

    // One warning for the export, however many requests failed, and one
    // event.
    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("export big: I/O failed"))
        .count();
    assert_eq!(warnings, 1, "{text}");
    let list = d.ctl(&["volume", "list"]);
    for v in list["volumes"].as_array().unwrap() {
        assert_eq!(v["state"], "ready", "{list}");
    }
    let _ = watcher.kill();
    let _ = watcher.wait();
    let more_io_errors = events
        .try_iter()
        .filter(|v| v.get("event").unwrap_or(v)["type"] == "export.io_error")
        .count();
    assert_eq!(more_io_errors, 0, "more than one io_error event");
}
