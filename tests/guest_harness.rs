//! The guest harness itself, against qemu-storage-daemon: proves that the
//! guest boots, finds every vhost-user-blk disk, runs its script and reports
//! the script's exit code, independently of vdiskd.

#[path = "common/guest.rs"]
mod guest;
#[path = "common/server.rs"]
mod server;

use std::fs::File;
use std::time::Duration;

use guest::{Disk, Guest};
use server::{Export, Server, ServerKind};

#[test]
fn cpio_newc_layout() {
    let a = guest::cpio_newc(&[("test.sh", 0o100_755, b"exit 0\n")]);
    assert!(a.starts_with(b"070701"));
    assert_eq!(a.len() % 4, 0);
    let text = String::from_utf8_lossy(&a);
    assert!(text.contains("test.sh\0"));
    assert!(text.contains("exit 0\n"));
    assert!(text.contains("TRAILER!!!\0"));
}

/// Two disks from qemu-storage-daemon; the script's exit code comes back.
#[test]
fn boots_with_two_qsd_disks_and_reports_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let mut exports = Vec::new();
    for (i, mib) in [(0, 16u64), (1, 8)] {
        let disk = dir.path().join(format!("disk{i}.img"));
        File::create(&disk).unwrap().set_len(mib << 20).unwrap();
        exports.push(Export::file(dir.path().join(format!("s{i}.sock")), disk).queues(2));
    }
    let mut qsd = Server::start(ServerKind::Qsd, dir.path(), &exports);
    let run = Guest::new()
        .timeout(Duration::from_secs(120))
        .disk(Disk::new(&exports[0].socket).queues(2))
        .disk(Disk::new(&exports[1].socket).queues(1))
        .run(
            r#"
echo "VDA=$(cat /sys/block/vda/size)"
echo "VDB=$(cat /sys/block/vdb/size)"
exit 3
"#,
        );
    eprintln!("guest run took {:.1} s", run.elapsed.as_secs_f64());
    run.assert_exit(3);
    assert_eq!(run.value("VDA="), (16 * 2048).to_string(), "{run}");
    assert_eq!(run.value("VDB="), (8 * 2048).to_string(), "{run}");
    assert!(!run.timed_out);
    qsd.stop_ok();
}

/// A guest that never finishes is killed at the timeout (which here comes
/// before the boot is over; the kill path is the same).
#[test]
fn hung_guest_is_killed_at_timeout() {
    let run = Guest::new()
        .timeout(Duration::from_secs(5))
        .run("echo HUNG=yes; sleep 1000");
    assert!(run.timed_out, "{run}");
    assert_eq!(run.exit_code, None, "{run}");
}
