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

use std::time::Duration;

use client::{pattern, Client};
use guest::{seq_pattern, Disk, Guest};
use sha2::{Digest, Sha256};
use vdiskd::{sha256_file, Vdiskd};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

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

/// `vdiskctl volume resize` of exported volumes (an overlay clone and a raw
/// volume) while a guest runs: the guest's /sys/block/*/size changes
/// without a reboot once QEMU re-reads the config (QMP
/// device-sync-config, sent by vdiskctl --qmp), and a write past the old
/// end reads back. Shrinking is refused.
#[test]
fn a_guest_sees_its_disks_grow_without_a_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Vdiskd::start(&state, &dir.path().join("control.sock"));
    let img = dir.path().join("base.img");
    std::fs::write(&img, pattern(0xba5e, 0, (32 * MIB) as usize)).unwrap();
    d.ctl(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
    d.ctl(&["volume", "create", "g", "--image", "base"]);
    d.ctl(&["volume", "create", "r", "--size", "32M"]);
    let sock = |v: &str| dir.path().join(format!("{v}.sock"));
    for v in ["g", "r"] {
        d.ctl(&["export", "start", v, "--socket", sock(v).to_str().unwrap()]);
    }
    let mut guest = Guest::new()
        .timeout(Duration::from_secs(180))
        .qmp()
        .disk(Disk::new(sock("g")))
        .disk(Disk::new(sock("r")))
        .spawn(
            r#"
set -e
a=$(cat /sys/block/vda/size); b=$(cat /sys/block/vdb/size)
echo "SIZE0=$a,$b"
i=0
while [ "$(cat /sys/block/vda/size)" = "$a" ] || [ "$(cat /sys/block/vdb/size)" = "$b" ]; do
    i=$((i + 1))
    if [ $i -gt 1200 ]; then echo "NO-GROW"; exit 1; fi
    sleep 0.1
done
echo "SIZE1=$(cat /sys/block/vda/size),$(cat /sys/block/vdb/size)"
seq 1 300000 | head -c 1048576 > /tmp/p
for d in vda vdb; do
    dd if=/tmp/p of=/dev/$d bs=1048576 seek=40 count=1 oflag=direct conv=notrunc 2>/dev/null
    dd if=/dev/$d of=/tmp/r bs=1048576 skip=40 count=1 iflag=direct 2>/dev/null
    cmp /tmp/p /tmp/r
done
echo "GROWN-OK"
"#,
        );
    assert!(
        guest.wait_for_line("SIZE0=").is_some(),
        "the guest did not start:\n{}",
        guest.console()
    );
    let qmp = guest.qmp_socket().unwrap().to_path_buf();
    // The overlay clone, telling QEMU at once.
    let out = d.ctl_raw(&[
        "volume",
        "resize",
        "g",
        "48M",
        "--qmp",
        qmp.to_str().unwrap(),
        "--qdev",
        "disk0",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("the guest sees the new size"), "{text}");
    // The raw volume without --qmp: vdiskctl says what is left to do; then
    // the same size again with --qmp does just that.
    let out = d.ctl_raw(&["volume", "resize", "r", "48M"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("device-sync-config"), "{text}");
    let out = d.ctl_raw(&[
        "volume",
        "resize",
        "r",
        "48M",
        "--qmp",
        qmp.to_str().unwrap(),
        "--qdev",
        "disk1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Shrinking is refused, and changes nothing.
    let err = d.ctl_fails(&["volume", "resize", "g", "16M"]);
    assert!(err.contains("only grow"), "{err}");

    let run = guest.wait();
    run.assert_success();
    run.assert_no_io_errors();
    assert_eq!(run.value("SIZE0="), "65536,65536", "{run}");
    assert_eq!(run.value("SIZE1="), "98304,98304", "{run}");
    for v in ["g", "r"] {
        let info = d.ctl(&["volume", "show", v]);
        assert_eq!(info["size"], 48 * MIB, "{info}");
        let mut c = Client::connect(&sock(v), 1).unwrap();
        assert_eq!(c.capacity(), 48 * MIB);
        assert_eq!(
            c.read(40 * MIB, MIB as usize).unwrap(),
            seq_pattern(MIB as usize),
            "{v}: the guest's write past the old end"
        );
    }
}

/// A guest boots with a volume claimed from the pool of ready copies: it
/// reads the image's data, and its writes reach neither the image nor the
/// other ready copy.
#[test]
fn a_guest_runs_on_a_copy_claimed_from_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = Vdiskd::start(&state, &dir.path().join("control.sock"));
    let base = pattern(0x9001, 0, SIZE as usize);
    let img = dir.path().join("base.img");
    std::fs::write(&img, &base).unwrap();
    let r = d.ctl(&["image", "import", img.to_str().unwrap(), "--name", "base"]);
    let cached = state.join("images").join(r["digest"].as_str().unwrap());
    let before = sha256_file(&cached);
    d.ctl(&["pool", "set", "base", "--priority", "9", "--copies", "2"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while d.ctl(&["pool", "show", "base"])["ready"] != 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the pool never filled"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = d.ctl(&["volume", "create", "vm", "--image", "base", "--full"]);
    assert_eq!(v["from_pool"], true, "{v}");
    let sock = dir.path().join("vm.sock");
    d.ctl(&["export", "start", "vm", "--socket", sock.to_str().unwrap()]);
    let want: String = Sha256::digest(&base[(8 * MIB) as usize..(12 * MIB) as usize])
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let run = Guest::new()
        .timeout(Duration::from_secs(180))
        .disk(Disk::new(&sock))
        .run(
            r#"
set -e
echo "SUM=$(dd if=/dev/vda bs=1048576 skip=8 count=4 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
seq 1 300000 | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=1048576 count=1 oflag=direct conv=notrunc 2>/dev/null
sync
"#,
        );
    run.assert_success();
    assert_eq!(
        run.value("SUM="),
        want,
        "the guest read other data than the image's\n{run}"
    );
    assert_eq!(sha256_file(&cached), before, "the base image changed");
    // The other ready copy still holds the image.
    let v = d.ctl(&["volume", "create", "vm2", "--image", "base", "--full"]);
    assert_eq!(v["from_pool"], true, "{v}");
    let sock2 = dir.path().join("vm2.sock");
    d.ctl(&[
        "export",
        "start",
        "vm2",
        "--socket",
        sock2.to_str().unwrap(),
    ]);
    let mut c = Client::connect(&sock2, 1).unwrap();
    assert!(c.read(0, MIB as usize).unwrap() == base[..MIB as usize]);
}
