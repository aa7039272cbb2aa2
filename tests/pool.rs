//! Ready copies through vdiskctl against the real vdiskd: the filler makes
//! the copies a pool entry wants, `volume create --full` claims one (no
//! data copied) and the filler replaces it; a miss is counted; a copy being
//! made when vdiskd is killed is never counted as ready; bad input changes
//! nothing; and when space runs short the lowest priority goes first.

#[path = "common/client.rs"]
mod client;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::path::Path;
use std::time::{Duration, Instant};

use client::{pattern, Client};
use serde_json::Value;
use vdiskd::Vdiskd;

const MIB: u64 = 1 << 20;

fn image(dir: &Path, name: &str, seed: u64, size: u64) -> Vec<u8> {
    let data = pattern(seed, 0, size as usize);
    std::fs::write(dir.join(format!("{name}.raw")), &data).unwrap();
    data
}

fn import(d: &Vdiskd, dir: &Path, name: &str) {
    let file = dir.join(format!("{name}.raw"));
    d.ctl(&["image", "import", file.to_str().unwrap(), "--name", name]);
}

/// Polls `pool show IMAGE` until `check` holds (30 s at most).
fn wait_pool(d: &Vdiskd, image: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = d.ctl(&["pool", "show", image]);
        if check(&v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{image}: never {what}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_volume(d: &Vdiskd, dir: &Path, name: &str, len: u64) -> Vec<u8> {
    let sock = dir.join(format!("{name}.sock"));
    d.ctl(&["export", "start", name, "--socket", sock.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1).unwrap();
    let mut data = Vec::with_capacity(len as usize);
    let mut at = 0;
    while at < len {
        let n = (len - at).min(4 * MIB);
        data.extend(c.read(at, n as usize).unwrap());
        at += n;
    }
    drop(c);
    d.ctl(&["export", "stop", name]);
    data
}

#[test]
fn deploys_take_ready_copies_and_the_filler_replaces_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Vdiskd::start(&dir.path().join("state"), &dir.path().join("control.sock"));
    let a = image(dir.path(), "a", 1, 32 * MIB);
    image(dir.path(), "b", 2, 8 * MIB);
    import(&d, dir.path(), "a");
    import(&d, dir.path(), "b");

    let set = d.ctl(&["pool", "set", "a", "--priority", "9", "--copies", "2"]);
    assert_eq!(set["wanted"], 2, "{set}");
    assert_eq!(set["by_rule"], false);
    wait_pool(&d, "a", "2 ready", |v| v["ready"] == 2 && v["making"] == 0);

    // A deploy takes one: no copy, the image's data, and a hit.
    let v = d.ctl(&["volume", "create", "v1", "--image", "a", "--full"]);
    assert_eq!(v["from_pool"], true, "{v}");
    assert_eq!(v["kind"], "raw");
    assert_eq!(v["state"], "ready");
    let shown = d.ctl(&["pool", "show", "a"]);
    assert_eq!(shown["hits"], 1, "{shown}");
    assert!(shown["last_claim"].as_u64().is_some(), "{shown}");
    assert!(
        read_volume(&d, dir.path(), "v1", 32 * MIB) == a,
        "v1 differs from image a"
    );
    // Bigger than the image: the copy grows, zeros past the image.
    let v = d.ctl(&[
        "volume", "create", "v2", "--image", "a", "--full", "--size", "40M",
    ]);
    assert_eq!(v["from_pool"], true, "{v}");
    assert_eq!(v["size"], 40 * MIB);
    let back = read_volume(&d, dir.path(), "v2", 40 * MIB);
    assert!(back[..a.len()] == a[..] && back[a.len()..].iter().all(|&b| b == 0));
    // Writes to one claimed copy reach neither the image nor the other.
    let sock = dir.path().join("v1.sock");
    d.ctl(&["export", "start", "v1", "--socket", sock.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1).unwrap();
    c.write(0, &[0xeeu8; 4096]).unwrap();
    drop(c);
    assert!(read_volume(&d, dir.path(), "v2", 4096) == a[..4096]);

    // The filler makes the two copies again.
    let shown = wait_pool(&d, "a", "refilled", |v| v["ready"] == 2);
    assert_eq!(shown["hits"], 2);
    // stats (and so Prometheus) carry the same figures.
    let stats = d.ctl(&["stats"]);
    let p = &stats["pool"]["images"][0];
    assert_eq!(
        (
            p["image"].clone(),
            p["ready"].clone(),
            p["wanted"].clone(),
            p["hits"].clone()
        ),
        ("a".into(), 2.into(), 2.into(), 2.into()),
        "{stats}"
    );
    assert!(
        stats["pool"]["reserve_bytes"].as_u64().unwrap() > 0,
        "{stats}"
    );

    // An image whose priority wants no copy by the rule: a miss, copied.
    let set = d.ctl(&["pool", "set", "b", "--priority", "2"]);
    assert_eq!(
        (set["wanted"].clone(), set["by_rule"].clone()),
        (0.into(), true.into())
    );
    let v = d.ctl(&["volume", "create", "w1", "--image", "b", "--full"]);
    assert_eq!(v.get("from_pool"), None, "{v}");
    assert_eq!(d.ctl(&["pool", "show", "b"])["misses"], 1);

    let list = d.ctl(&["pool", "list"]);
    assert_eq!(list["entries"].as_array().unwrap().len(), 2, "{list}");
    assert_eq!(list["entries"][0]["priority"], 9, "highest first: {list}");
    assert_eq!(list["rule"], "1-3:0, 4-6:1, 7-8:2, 9-10:4", "{list}");
    let table = String::from_utf8_lossy(&d.ctl_raw(&["pool", "list"]).stdout).into_owned();
    assert!(table.contains("copies by priority:"), "{table}");

    // Fewer copies wanted: the extra ready ones go (ready never exceeds
    // wanted).
    d.ctl(&["pool", "set", "a", "--priority", "9", "--copies", "1"]);
    wait_pool(&d, "a", "trimmed to 1", |v| v["ready"] == 1);
    assert_eq!(
        std::fs::read_dir(dir.path().join("state/pool"))
            .unwrap()
            .count(),
        1
    );

    // Unset: the copies go, the image can be removed once nothing uses it.
    d.ctl(&["pool", "unset", "a"]);
    let files = std::fs::read_dir(dir.path().join("state/pool"))
        .unwrap()
        .count();
    assert_eq!(files, 0);
    let err = d.ctl_fails(&["pool", "show", "a"]);
    assert!(err.contains("no pool entry"), "{err}");
    let err = d.ctl_fails(&["image", "remove", "b"]);
    assert!(
        err.contains("pool entry"),
        "an image with a pool entry was removable: {err}"
    );
}

#[test]
fn bad_pool_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Vdiskd::start(&dir.path().join("state"), &dir.path().join("control.sock"));
    image(dir.path(), "a", 1, MIB);
    import(&d, dir.path(), "a");
    for (args, want) in [
        (&["pool", "set", "nope", "--priority", "5"][..], "nope"),
        (&["pool", "set", "a", "--priority", "0"][..], "priority"),
        (&["pool", "set", "a", "--priority", "11"][..], "priority"),
        (
            &["pool", "set", "a", "--priority", "5", "--copies", "65"][..],
            "copies",
        ),
        (&["pool", "unset", "a"][..], "no pool entry"),
    ] {
        let err = d.ctl_fails(args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A negative count is not a number of copies: a usage error.
    let out = d.ctl_raw(&["pool", "set", "a", "--priority", "5", "--copies", "-1"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(d.ctl(&["pool", "list"])["entries"], Value::Array(vec![]));

    // A reserve the file system cannot hold: vdiskd says so and stops.
    let cfg = dir.path().join("vdiskd.toml");
    std::fs::write(&cfg, "[pool]\nreserve = \"1000000T\"\n").unwrap();
    let out = std::process::Command::new(vdiskd::VDISKD)
        .arg("--config")
        .arg(&cfg)
        .args(["--state-dir", dir.path().join("s2").to_str().unwrap()])
        .args(["--control", dir.path().join("c2.sock").to_str().unwrap()])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reserve") && err.contains("file system"),
        "{err}"
    );
    std::fs::write(&cfg, "[pool]\nreserve = \"lots\"\n").unwrap();
    let out = std::process::Command::new(vdiskd::VDISKD)
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool.reserve"), "{err}");
}

#[test]
fn a_copy_being_made_at_kill_9_is_never_counted_ready() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let cfg = dir.path().join("vdiskd.toml");
    // 32 MiB at 4 MiB/s: 8 s per copy, plenty of time to kill it midway.
    std::fs::write(&cfg, "[pool]\nrate = \"4M\"\nreserve = \"1%\"\n").unwrap();
    let extra = ["--config".to_string(), cfg.display().to_string()];
    let d = Vdiskd::start_with(&state, &control, &extra);
    image(dir.path(), "a", 1, 32 * MIB);
    import(&d, dir.path(), "a");
    d.ctl(&["pool", "set", "a", "--priority", "9", "--copies", "1"]);
    wait_pool(&d, "a", "making one", |v| v["making"] == 1);
    std::thread::sleep(Duration::from_millis(500));
    d.kill9();

    let d = Vdiskd::start_with(&state, &control, &extra);
    let v = d.ctl(&["pool", "show", "a"]);
    assert_eq!(v["ready"], 0, "a half-made copy counted as ready: {v}");
    // The half-made file is gone; at most the new one being made is there.
    let files: Vec<_> = std::fs::read_dir(state.join("pool"))
        .unwrap()
        .flatten()
        .collect();
    assert!(files.len() <= 1, "{files:?}");
    // A full-copy deploy now is a miss and copies, whole.
    let v = d.ctl(&["volume", "create", "v", "--image", "a", "--full"]);
    assert_eq!(v.get("from_pool"), None, "{v}");
    assert_eq!(d.ctl(&["pool", "show", "a"])["misses"], 1);
}

#[test]
fn when_space_runs_short_the_lowest_priority_copies_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let Some(_tmpfs) = vdiskd::Tmpfs::mount(&state, "size=96m") else {
        return;
    };
    let cfg = dir.path().join("vdiskd.toml");
    std::fs::write(&cfg, "[pool]\nreserve = \"24M\"\n").unwrap();
    let d = Vdiskd::start_with(
        &state,
        &dir.path().join("control.sock"),
        &["--config".into(), cfg.display().to_string()],
    );
    image(dir.path(), "a", 1, 8 * MIB);
    image(dir.path(), "b", 2, 8 * MIB);
    import(&d, dir.path(), "a");
    import(&d, dir.path(), "b");
    d.ctl(&["pool", "set", "a", "--priority", "9", "--copies", "2"]);
    d.ctl(&["pool", "set", "b", "--priority", "3", "--copies", "2"]);
    wait_pool(&d, "a", "2 ready", |v| v["ready"] == 2);
    wait_pool(&d, "b", "2 ready", |v| v["ready"] == 2);
    // An image nothing uses: the last thing to go.
    image(dir.path(), "c", 3, 8 * MIB);
    import(&d, dir.path(), "c");

    // A guest fills a volume: free space falls below the reserve.
    d.ctl(&["volume", "create", "big", "--size", "64M"]);
    let sock = dir.path().join("big.sock");
    d.ctl(&["export", "start", "big", "--socket", sock.to_str().unwrap()]);
    let mut c = Client::connect(&sock, 1).unwrap();
    // About 40 MiB are free: 28 MiB more in use leaves ~12 MiB, 12 short
    // of the 24 MiB reserve, which b's two 8 MiB copies cover.
    for i in 0..28 {
        c.write(i * MIB, &pattern(9, i * MIB, MIB as usize))
            .unwrap();
    }
    drop(c);
    // b (priority 3) gives its copies back; a (priority 9) keeps both, and
    // b is not refilled while that would take the space back under the
    // fill mark.
    wait_pool(&d, "b", "evicted", |v| v["ready"] == 0);
    let a = d.ctl(&["pool", "show", "a"]);
    assert_eq!(a["ready"], 2, "the higher priority lost a copy: {a}");
    std::thread::sleep(Duration::from_millis(2500));
    let b = d.ctl(&["pool", "show", "b"]);
    assert_eq!(
        (b["ready"].clone(), b["making"].clone()),
        (0.into(), 0.into()),
        "{b}"
    );
    let list = d.ctl(&["pool", "list"]);
    assert!(
        list["free_bytes"].as_u64().unwrap() >= list["reserve_bytes"].as_u64().unwrap(),
        "the reserve was not restored: {list}"
    );
    assert_eq!(
        d.ctl(&["image", "list"])["images"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // 24 MiB more: ~4 MiB free, 20 short; a's two copies (16 MiB) are not
    // enough; then the cached image nothing uses goes, never a pooled one.
    let mut c = Client::connect(&sock, 1).unwrap();
    for i in 28..52 {
        c.write(i * MIB, &pattern(9, i * MIB, MIB as usize))
            .unwrap();
    }
    drop(c);
    wait_pool(&d, "a", "evicted", |v| v["ready"] == 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = d.ctl(&["image", "list"])["images"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|i| i["names"].as_array().unwrap().clone())
            .map(|n| n.as_str().unwrap().to_string())
            .collect();
        if names == ["a", "b"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "image c was never evicted: {names:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
