//! vdiskd as a service, through the real binaries: import an image with
//! vdiskctl, clone it, export the clones, read and write them with the
//! blkio client, kill -9 the daemon and check that everything comes back.

#[path = "common/client.rs"]
mod client;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::path::{Path, PathBuf};

use client::{assert_same, pattern, Client};
use serde_json::Value;

use vdiskd::{sha256_file, Vdiskd};

const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 8 * MIB;
const SEED: u64 = 0x1a6e;

/// Reads the whole disk in 1 MiB pieces.
fn read_all(c: &mut Client, size: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(MIB) as usize;
        out.extend(
            c.read(off, n)
                .unwrap_or_else(|e| panic!("read at {off}: {e}")),
        );
        off += n as u64;
    }
    out
}

/// An image with a pattern everywhere but a zero (sparse) last MiB.
fn make_image(path: &Path) -> Vec<u8> {
    let mut data = pattern(SEED, 0, (IMAGE_SIZE - MIB) as usize);
    data.resize(IMAGE_SIZE as usize, 0);
    std::fs::write(path, &data).unwrap();
    data
}

/// Writes `data` at `offset` through the client and into the model.
fn write_both(c: &mut Client, model: &mut [u8], offset: u64, data: &[u8]) {
    c.write(offset, data)
        .unwrap_or_else(|e| panic!("write at {offset}: {e}"));
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

fn connect(socket: &Path) -> Client {
    Client::connect(socket, 1).unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()))
}

#[test]
fn clones_read_the_image_diverge_and_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("run/control.sock");
    let src = dir.path().join("base.img");
    let image = make_image(&src);
    let src_sha = sha256_file(&src);

    // No --export flag at all: the control socket is enough.
    let d = Vdiskd::start(&state, &control);
    let img = d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let digest = img["digest"].as_str().expect("digest").to_string();
    assert_eq!(digest, src_sha);
    assert_eq!(img["size"], IMAGE_SIZE);
    let cached = state.join("images").join(&digest);

    // Two overlay clones; c1 one MiB bigger than the image.
    let v = d.ctl(&["volume", "create", "c1", "--image", "img", "--size", "9M"]);
    assert_eq!(v["kind"], "overlay");
    assert_eq!(v["base"], digest.as_str());
    assert_eq!(v["size"], 9 * MIB);
    assert_eq!(v["state"], "ready");
    d.ctl(&["volume", "create", "c2", "--image", "img"]);
    let err = d.ctl_fails(&["volume", "create", "c2", "--image", "img"]);
    assert!(err.contains("exists"), "{err}");

    let s1 = dir.path().join("c1.sock");
    let s2 = dir.path().join("c2.sock");
    let e = d.ctl(&["export", "start", "c1", "--socket", s1.to_str().unwrap()]);
    assert_eq!(e["volume"], "c1");
    d.ctl(&["export", "start", "c2", "--socket", s2.to_str().unwrap()]);

    // c1 reads the image, then zeros past it.
    let mut c1 = connect(&s1);
    assert_eq!(c1.capacity(), 9 * MIB);
    let mut model1 = image.clone();
    model1.resize((9 * MIB) as usize, 0);
    assert_same(&read_all(&mut c1, 9 * MIB), &model1, "fresh clone c1");

    // Writes across cluster (64 KiB) boundaries, unaligned to clusters,
    // and one past the end of the base.
    let w1 = pattern(7, 0, 12 * 1024);
    write_both(&mut c1, &mut model1, 64 * 1024 - 4096, &w1);
    let w2 = pattern(8, 0, 512);
    write_both(&mut c1, &mut model1, 3 * MIB + 1536, &w2);
    let w3 = pattern(9, 0, 128 * 1024);
    write_both(&mut c1, &mut model1, IMAGE_SIZE - 4096, &w3);
    c1.flush().expect("flush c1");
    assert_same(&read_all(&mut c1, 9 * MIB), &model1, "c1 after writes");

    // c2 still reads the image; its own write does not show in c1.
    let mut c2 = connect(&s2);
    assert_eq!(c2.capacity(), IMAGE_SIZE);
    let mut model2 = image.clone();
    assert_same(
        &read_all(&mut c2, IMAGE_SIZE),
        &model2,
        "c2 untouched by c1",
    );
    let w4 = pattern(10, 0, 8192);
    write_both(&mut c2, &mut model2, 64 * 1024 - 4096, &w4);
    c2.flush().expect("flush c2");
    assert_same(
        &read_all(&mut c2, IMAGE_SIZE),
        &model2,
        "c2 after its write",
    );
    assert_same(&read_all(&mut c1, 9 * MIB), &model1, "c1 after c2's write");

    // The image is untouched, in the cache and at its source.
    assert_eq!(sha256_file(&cached), digest);
    assert_eq!(sha256_file(&src), src_sha);

    // The catalog's view: allocated bytes, exported, refusals.
    let show = d.ctl(&["volume", "show", "c1"]);
    assert_eq!(show["exported"], true);
    let allocated = show["allocated_bytes"].as_u64().unwrap();
    assert!(
        allocated > 0 && allocated < 2 * MIB,
        "allocated {allocated}"
    );
    let err = d.ctl_fails(&["volume", "delete", "c1"]);
    assert!(err.contains("in_use") || err.contains("exported"), "{err}");
    let err = d.ctl_fails(&["image", "remove", "img"]);
    assert!(err.contains("c1"), "{err}");
    let list = d.ctl(&["export", "list"]);
    let exports = list["exports"].as_array().unwrap();
    assert_eq!(exports.len(), 2);
    assert!(exports.iter().all(|e| e["connected"] == true), "{list}");

    // kill -9 with both clients connected; the flushed data must be back.
    drop(c1);
    drop(c2);
    d.kill9();
    let d = Vdiskd::start(&state, &control);
    let list = d.ctl(&["export", "list"]);
    let vols: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["volume"].as_str().unwrap())
        .collect();
    assert_eq!(vols, ["c1", "c2"]);
    let mut c1 = connect(&s1);
    assert_same(&read_all(&mut c1, 9 * MIB), &model1, "c1 after kill -9");
    let mut c2 = connect(&s2);
    assert_same(&read_all(&mut c2, IMAGE_SIZE), &model2, "c2 after kill -9");
    drop(c2);

    // Flattened export of the live clone.
    let raw = dir.path().join("c1.raw");
    let r = d.ctl(&["volume", "export-raw", "c1", raw.to_str().unwrap()]);
    assert_eq!(r["size"], 9 * MIB);
    assert_same(&std::fs::read(&raw).unwrap(), &model1, "export-raw c1");

    // Stop and delete c2; the image stays in use by c1 only.
    d.ctl(&["export", "stop", "c2"]);
    assert!(!s2.exists(), "socket of a stopped export");
    d.ctl(&["volume", "delete", "c2"]);
    assert!(!state.join("volumes/c2").exists());
    let err = d.ctl_fails(&["image", "remove", "img"]);
    assert!(err.contains("c1") && !err.contains("c2"), "{err}");
    assert_eq!(sha256_file(&cached), digest);
    drop(c1);
}

#[test]
fn full_copies_empty_volumes_and_resize() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let src = dir.path().join("base.img");
    let image = make_image(&src);
    let d = Vdiskd::start(&state, &control);
    d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "img"]);

    // A full copy is independent of the image and sparse where it is.
    let v = d.ctl(&["volume", "create", "f1", "--image", "img", "--full"]);
    assert_eq!(v["kind"], "raw");
    assert_eq!(v["size"], IMAGE_SIZE);
    let data = state.join("volumes/f1/data");
    assert_same(&std::fs::read(&data).unwrap(), &image, "full copy");

    // An empty volume, grown, exported with the default socket.
    let v = d.ctl(&["volume", "create", "e1", "--size", "4M"]);
    assert_eq!(v["kind"], "raw");
    assert_eq!(v["base"], Value::Null);
    let v = d.ctl(&["volume", "resize", "e1", "6M"]);
    assert_eq!(v["size"], 6 * MIB);
    let err = d.ctl_fails(&["volume", "resize", "e1", "5M"]);
    assert!(err.contains("grow"), "{err}");
    let e = d.ctl(&["export", "start", "e1"]);
    let socket = PathBuf::from(e["socket"].as_str().unwrap());
    assert_eq!(socket, dir.path().join("e1.sock"));
    let mut c = connect(&socket);
    assert_eq!(c.capacity(), 6 * MIB);
    let w = pattern(11, 0, 4096);
    c.write(5 * MIB, &w).unwrap();
    c.flush().unwrap();
    assert_same(&c.read(5 * MIB, 4096).unwrap(), &w, "empty volume write");
    drop(c);
    // Exported, it grows in place: a new connection sees the new size and
    // writes past the old end.
    let v = d.ctl(&["volume", "resize", "e1", "8M"]);
    assert_eq!(v["size"], 8 * MIB);
    assert_eq!(v["exported"], true);
    let mut c = connect(&socket);
    assert_eq!(c.capacity(), 8 * MIB);
    c.write(7 * MIB, &w).unwrap();
    assert_same(
        &c.read(7 * MIB, 4096).unwrap(),
        &w,
        "write past the old end",
    );
    assert_same(&c.read(5 * MIB, 4096).unwrap(), &w, "write before the grow");
    drop(c);

    // An overlay grows at rest too: the image, then zeros.
    d.ctl(&["volume", "create", "o1", "--image", "img"]);
    let o1 = dir.path().join("o1.sock");
    d.ctl(&["export", "start", "o1", "--socket", o1.to_str().unwrap()]);
    let mut c = connect(&o1);
    let w = pattern(14, 0, 4096);
    c.write(IMAGE_SIZE - 4096, &w).unwrap();
    c.flush().unwrap();
    drop(c);
    d.ctl(&["export", "stop", "o1"]);
    let v = d.ctl(&["volume", "resize", "o1", "16M"]);
    assert_eq!(v["size"], 16 * MIB);
    d.ctl(&["export", "start", "o1", "--socket", o1.to_str().unwrap()]);
    let mut c = connect(&o1);
    assert_eq!(c.capacity(), 16 * MIB);
    let mut model = image.clone();
    model.resize((16 * MIB) as usize, 0);
    model[(IMAGE_SIZE - 4096) as usize..IMAGE_SIZE as usize].copy_from_slice(&w);
    assert_same(&read_all(&mut c, 16 * MIB), &model, "grown overlay");
    let w2 = pattern(15, 0, 8192);
    write_both(&mut c, &mut model, IMAGE_SIZE - 4096, &w2);
    write_both(&mut c, &mut model, 12 * MIB + 512, &w2);
    c.flush().unwrap();
    assert_same(
        &read_all(&mut c, 16 * MIB),
        &model,
        "grown overlay, written",
    );
    drop(c);
    assert!(!state.join("volumes/o1/bitmap.grown").exists());

    // Names with a slash never reach the service.
    let out = d.ctl_raw(&["volume", "create", "../x", "--size", "1M"]);
    assert!(!out.status.success());

    let list = d.ctl(&["volume", "list"]);
    let names: Vec<&str> = list["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["e1", "f1", "o1"]);
}

#[test]
fn half_made_volumes_are_rolled_back_at_start() {
    use vdisk::catalog::{Catalog, VolumeKind, VolumeRecord, VolumeState};
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    // What a crash between begin_volume and finish_volume leaves.
    {
        let cat = Catalog::open(&state).unwrap();
        let vdir = state.join("volumes/half");
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("data"), b"partial").unwrap();
        cat.begin_volume(&VolumeRecord {
            name: "half".into(),
            kind: VolumeKind::Empty,
            base: None,
            size: MIB,
            path: vdir.join("data"),
            state: VolumeState::Creating,
            created: 0,
        })
        .unwrap();
    }
    let d = Vdiskd::start(&state, &control);
    let list = d.ctl(&["volume", "list"]);
    assert_eq!(list["volumes"].as_array().unwrap().len(), 0, "{list}");
    assert!(!state.join("volumes/half").exists());
    // The name is free again.
    d.ctl(&["volume", "create", "half", "--size", "1M"]);
}

#[test]
fn volume_exports_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let d = Vdiskd::start(&state, &control);
    d.ctl(&["volume", "create", "v1", "--size", "2M"]);
    d.kill9();

    let socket = dir.path().join("v1.sock");
    let spec = format!("socket={},volume=v1", socket.display());
    let d = Vdiskd::start_with(&state, &control, &["--export".into(), spec]);
    let mut c = connect(&socket);
    assert_eq!(c.capacity(), 2 * MIB);
    let w = pattern(12, 0, 4096);
    c.write(MIB, &w).unwrap();
    c.flush().unwrap();
    assert_same(&c.read(MIB, 4096).unwrap(), &w, "flag export");
    let show = d.ctl(&["volume", "show", "v1"]);
    assert_eq!(show["exported"], true);
    let err = d.ctl_fails(&["volume", "delete", "v1"]);
    assert!(err.contains("exported"), "{err}");
    drop(c);
    d.ctl(&["export", "stop", "v1"]);
    d.ctl(&["volume", "delete", "v1"]);
}

/// A 1 GiB image (sparse, with data at a few places): the clone is made
/// without copying (its data file allocates nothing), reads the image
/// through it, and the image's digest is unchanged after writes.
#[test]
fn clone_of_a_1_gib_image() {
    const GIB: u64 = 1 << 30;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let src = dir.path().join("big.img");
    let spots = [0, 300 * MIB + 4096, GIB / 2, GIB - MIB];
    {
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(GIB).unwrap();
        use std::os::unix::fs::FileExt;
        for &o in &spots {
            f.write_all_at(&pattern(o, o, MIB as usize), o).unwrap();
        }
    }
    let d = Vdiskd::start(&state, &control);
    let img = d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "big"]);
    let digest = img["digest"].as_str().unwrap().to_string();

    // O(1): the clone's data file allocates nothing (how long it takes is
    // the clone benchmark's business, not a test's).
    let v = d.ctl(&["volume", "create", "b1", "--image", "big"]);
    assert_eq!(v["size"], GIB);
    assert_eq!(v["allocated_bytes"], 0, "{v}");

    let socket = dir.path().join("b1.sock");
    d.ctl(&[
        "export",
        "start",
        "b1",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    let mut c = connect(&socket);
    assert_eq!(c.capacity(), GIB);
    for &o in &spots {
        assert_same(
            &c.read(o, MIB as usize).unwrap(),
            &pattern(o, o, MIB as usize),
            &format!("image data at {o}"),
        );
    }
    assert_eq!(c.read(GIB / 4, 4096).unwrap(), vec![0; 4096]);
    let w = pattern(13, 0, 3 * 4096);
    c.write(GIB / 2 + 64 * 1024 - 4096, &w).unwrap();
    c.flush().unwrap();
    assert_same(
        &c.read(GIB / 2 + 64 * 1024 - 4096, w.len()).unwrap(),
        &w,
        "write across clusters",
    );
    drop(c);
    assert_eq!(sha256_file(&state.join("images").join(&digest)), digest);
}

/// A growth interrupted by a crash: after the data file was extended it
/// is completed at start, before that it is undone.
#[test]
fn interrupted_overlay_growth_is_finished_or_undone() {
    use vdisk::block::Overlay;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let src = dir.path().join("base.img");
    let image = make_image(&src);
    let d = Vdiskd::start(&state, &control);
    d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    d.ctl(&["volume", "create", "done", "--image", "img"]);
    d.ctl(&["volume", "create", "undone", "--image", "img"]);
    d.kill9();
    // The state a crash leaves part-way through `volume resize`.
    for (name, extend) in [("done", true), ("undone", false)] {
        let vdir = state.join("volumes").join(name);
        let (data, bitmap) = (vdir.join("data"), vdir.join("bitmap"));
        let ov = Overlay::open(&data, &bitmap, None).unwrap();
        ov.write_grown_bitmap(&vdir.join("bitmap.grown"), 2 * IMAGE_SIZE)
            .unwrap();
        drop(ov);
        if extend {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&data)
                .unwrap()
                .set_len(2 * IMAGE_SIZE)
                .unwrap();
        }
    }
    let d = Vdiskd::start(&state, &control);
    for (name, size) in [("done", 2 * IMAGE_SIZE), ("undone", IMAGE_SIZE)] {
        let v = d.ctl(&["volume", "show", name]);
        assert_eq!(v["size"], size, "{name}: {v}");
        assert!(!state
            .join("volumes")
            .join(name)
            .join("bitmap.grown")
            .exists());
        let socket = dir.path().join(format!("{name}.sock"));
        d.ctl(&[
            "export",
            "start",
            name,
            "--socket",
            socket.to_str().unwrap(),
        ]);
        let mut c = connect(&socket);
        assert_eq!(c.capacity(), size, "{name}");
        let mut model = image.clone();
        model.resize(size as usize, 0);
        assert_same(&read_all(&mut c, size), &model, name);
    }
}

/// Image times go from the catalog (Unix seconds) to `image list`,
/// `image show` and `--json` (Unix milliseconds) unchanged; `stats` says
/// plainly that the cache has no budget when none is set.
#[test]
fn image_times_and_cache_budget_as_vdiskctl_prints_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let src = dir.path().join("base.img");
    make_image(&src);

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let d = Vdiskd::start(&state, &control);
    let img = d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "img"]);
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let created = img["created"].as_u64().expect("created");
    assert!(
        (before * 1000..=(after + 1) * 1000).contains(&created),
        "created {created} ms is not between {before} s and {after} s"
    );

    let stats = d.ctl_raw(&["stats"]);
    let text = String::from_utf8_lossy(&stats.stdout);
    assert!(
        text.contains(" used (no budget), 1 images, "),
        "stats: {text}"
    );
    let stats = d.ctl(&["stats"]);
    assert_eq!(stats["cache"]["budget"], Value::Null, "{stats}");
    d.kill9();

    // A known time, written where vdiskd keeps it.
    let db = rusqlite::Connection::open(state.join(vdisk::catalog::CATALOG_FILE)).unwrap();
    let n = db
        .execute("UPDATE images SET created = 1700000000", [])
        .unwrap();
    assert_eq!(n, 1);
    drop(db);

    let d = Vdiskd::start(&state, &control);
    let list = d.ctl(&["image", "list"]);
    assert_eq!(list["images"][0]["created"], 1_700_000_000_000u64, "{list}");
    for args in [&["image", "list"][..], &["image", "show", "img"][..]] {
        let out = d.ctl_raw(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {text}");
        assert!(
            text.contains("2023-11-14 22:13:20Z"),
            "vdiskctl {args:?} shows the wrong time:\n{text}"
        );
    }
}

/// A full copy of a 1 GiB image runs without the service's exports lock:
/// while it runs, `export start` of another volume and `stats` answer
/// within 100 ms, and the volume being copied cannot be deleted.
#[test]
fn exports_and_stats_go_on_while_a_full_copy_runs() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let src = dir.path().join("big.img");
    {
        let mut f = std::fs::File::create(&src).unwrap();
        let chunk = vec![0xabu8; 4 << 20];
        for _ in 0..256 {
            f.write_all(&chunk).unwrap();
        }
    }
    let d = Vdiskd::start(&state, &control);
    d.ctl(&["image", "import", src.to_str().unwrap(), "--name", "big"]);
    d.ctl(&["volume", "create", "small", "--size", "8M"]);

    let mut copy = std::process::Command::new(vdiskd::VDISKCTL)
        .args(["--control", control.to_str().unwrap()])
        .args(["volume", "create", "copy", "--image", "big", "--full"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let list = d.ctl(&["volume", "list"]);
        let creating = list["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "copy" && v["state"] == "creating");
        if creating {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the copy never started: {list}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }

    let socket = dir.path().join("small.sock");
    let t = std::time::Instant::now();
    d.ctl(&[
        "export",
        "start",
        "small",
        "--socket",
        socket.to_str().unwrap(),
    ]);
    let export_took = t.elapsed();
    let t = std::time::Instant::now();
    d.ctl(&["stats"]);
    let stats_took = t.elapsed();
    let err = d.ctl_fails(&["volume", "delete", "copy"]);
    let v = d.ctl(&["volume", "show", "copy"]);
    assert_eq!(
        v["state"], "creating",
        "the copy ended before the checks: it proves nothing ({v})"
    );
    assert!(err.contains("busy"), "{err}");
    assert!(
        export_took < std::time::Duration::from_millis(100),
        "export start took {export_took:?} during the copy"
    );
    assert!(
        stats_took < std::time::Duration::from_millis(100),
        "stats took {stats_took:?} during the copy"
    );
    assert!(copy.wait().unwrap().success());
    let v = d.ctl(&["volume", "show", "copy"]);
    assert_eq!(v["state"], "ready", "{v}");
    // The export started during the copy serves.
    let mut c = connect(&socket);
    c.write(0, &[5u8; 4096]).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![5u8; 4096]);
}

/// `volume export-raw` into a read-only file system (what the shipped
/// systemd unit's ProtectSystem=strict makes of everything but the state
/// directory) fails with an error naming the restriction and the way out.
#[test]
fn export_raw_to_a_read_only_file_system_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    let Some(_tmpfs) = vdiskd::Tmpfs::mount(&ro, "ro,size=1m") else {
        return;
    };
    let d = Vdiskd::start(&dir.path().join("state"), &dir.path().join("control.sock"));
    d.ctl(&["volume", "create", "v", "--size", "1M"]);
    let out = ro.join("v.raw");
    let err = d.ctl_fails(&["volume", "export-raw", "v", out.to_str().unwrap()]);
    assert!(err.contains("read-only file system"), "{err}");
    assert!(err.contains("/var/lib/vdisk/exports"), "{err}");
    assert!(err.contains("ReadWritePaths="), "{err}");
}

/// Several vdiskctl clients at once against the real daemon, each doing
/// something else: one creates and deletes volumes, one starts and stops
/// exports, one asks for stats and lists, one streams events. Every call
/// succeeds and the end state is what the calls say.
#[test]
fn concurrent_clients_doing_different_things() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let d = std::sync::Arc::new(Vdiskd::start(&state, &control));
    for i in 0..3 {
        d.ctl(&["volume", "create", &format!("e{i}"), "--size", "1M"]);
    }
    let mut watch = std::process::Command::new(vdiskd::VDISKCTL)
        .args(["--control", control.to_str().unwrap(), "--json", "watch"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let stdout = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The watcher is subscribed once it sees an event made after it started.
    d.ctl(&["volume", "create", "w", "--size", "1M"]);
    loop {
        let line = lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the watcher never saw volume w created");
        if line.contains("volume.created") && line.contains("\"w\"") {
            break;
        }
    }
    const ROUNDS: usize = 8;
    let creator = {
        let d = d.clone();
        std::thread::spawn(move || {
            for i in 0..ROUNDS {
                let name = format!("c{i}");
                d.ctl(&["volume", "create", &name, "--size", "2M"]);
                if i % 2 == 0 {
                    d.ctl(&["volume", "delete", &name]);
                }
            }
        })
    };
    let exporter = {
        let (d, dir) = (d.clone(), dir.path().to_path_buf());
        std::thread::spawn(move || {
            for r in 0..ROUNDS {
                for i in 0..3 {
                    let sock = dir.join(format!("e{i}.sock"));
                    d.ctl(&[
                        "export",
                        "start",
                        &format!("e{i}"),
                        "--socket",
                        sock.to_str().unwrap(),
                    ]);
                }
                for i in 0..3 {
                    if r + 1 < ROUNDS || i != 0 {
                        d.ctl(&["export", "stop", &format!("e{i}")]);
                    }
                }
            }
        })
    };
    let reader = {
        let d = d.clone();
        std::thread::spawn(move || {
            for _ in 0..ROUNDS * 3 {
                let s = d.ctl(&["stats"]);
                assert!(s["volumes"].is_array(), "{s}");
                let l = d.ctl(&["volume", "list"]);
                assert!(l["volumes"].as_array().unwrap().len() >= 3, "{l}");
                d.ctl(&["export", "list"]);
            }
        })
    };
    creator.join().expect("creator");
    exporter.join().expect("exporter");
    reader.join().expect("reader");

    let names: Vec<String> = d.ctl(&["volume", "list"])["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = (0..3).map(|i| format!("e{i}")).collect();
    want.push("w".into());
    want.extend((0..ROUNDS).filter(|i| i % 2 == 1).map(|i| format!("c{i}")));
    let mut got = names.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    let exports = d.ctl(&["export", "list"]);
    let exported: Vec<&str> = exports["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["volume"].as_str().unwrap())
        .collect();
    assert_eq!(exported, ["e0"], "{exports}");
    // The watcher saw every export start and stop.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let _ = watch.kill();
    let _ = watch.wait();
    let text: String = lines.try_iter().collect::<Vec<_>>().join("\n");
    let started = text.matches("\"export.started\"").count();
    let stopped = text.matches("\"export.stopped\"").count();
    assert_eq!(started, 3 * ROUNDS, "{text}");
    assert_eq!(stopped, 3 * ROUNDS - 1, "{text}");
}
