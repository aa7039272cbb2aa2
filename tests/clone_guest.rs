//! A QEMU guest boots with a copy-on-write clone of a cached image as its
//! disk and runs fio with crc32c verification over it; afterwards the base
//! image is byte for byte what it was (same sha256), and a second clone of
//! the same image still reads the base's data.

#[path = "common/client.rs"]
mod client;
#[path = "common/guest.rs"]
mod guest;
#[path = "common/vdiskd.rs"]
mod vdiskd;

use std::io::Read;
use std::time::Duration;

use client::{pattern, Client};
use guest::{Disk, Guest};
use sha2::{Digest, Sha256};
use vdiskd::Vdiskd;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

fn sha256_file(path: &std::path::Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_guest_runs_fio_on_a_clone_and_the_base_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Vdiskd::start(&state, &dir.path().join("control.sock"));
    let base = pattern(0xba5e, 0, SIZE as usize);
    let img = dir.path().join("base.img");
    std::fs::write(&img, &base).unwrap();
    let r = d.ctl(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
    let digest = r["digest"].as_str().unwrap().to_string();
    let cached = state.join("images").join(&digest);
    let before = sha256_file(&cached);
    assert_eq!(before, digest.trim_start_matches("sha256:"));

    for c in ["c1", "c2"] {
        d.ctl(&["volume", "create", c, "--image", "base"]);
        let sock = dir.path().join(format!("{c}.sock"));
        d.ctl(&[
            "export",
            "start",
            c,
            "--socket",
            sock.to_str().unwrap(),
            "--queues",
            "2",
        ]);
    }
    let run = Guest::new()
        .cpus(2)
        .timeout(Duration::from_secs(240))
        .disk(Disk::new(dir.path().join("c1.sock")).queues(2))
        .run(
            r#"
set -e
echo "SIZE=$(cat /sys/block/vda/size)"
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=24M \
    --numjobs=2 --offset_increment=32M --cpus_allowed=0,1 --cpus_allowed_policy=split \
    --ioengine=libaio --iodepth=16 --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
"#,
        );
    run.assert_success();
    run.assert_no_io_errors();
    assert_eq!(run.value("SIZE="), (SIZE / 512).to_string(), "{run}");
    assert!(
        run.console.contains("err= 0"),
        "fio did not report err= 0\n{run}"
    );

    // The guest's writes went to c1's overlay, never to the base.
    assert_eq!(sha256_file(&cached), before, "the base image changed");
    let c1 = d.ctl(&["volume", "show", "c1"]);
    assert!(
        c1["allocated_bytes"].as_u64().unwrap() > 0,
        "c1 allocated nothing: {c1}"
    );
    // The other clone still reads the base.
    let mut c2 = Client::connect(&dir.path().join("c2.sock"), 1).unwrap();
    let mut at = 0;
    while at < SIZE {
        let got = c2.read(at, 4 * MIB as usize).unwrap();
        assert!(
            got == base[at as usize..(at + 4 * MIB) as usize],
            "clone c2 differs from the base at MiB {}",
            at / MIB
        );
        at += 4 * MIB;
    }
}
