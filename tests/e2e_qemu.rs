//! End-to-end: a Linux guest in QEMU (TCG) uses a disk served by vdiskd over
//! vhost-user-blk.
//!
//! Each test makes its own temporary directory and sparse disk file, starts
//! the server, boots a guest whose `/test.sh` prints `KEY=value` lines, and
//! checks them and the host file afterwards. The server is stopped with
//! SIGTERM at the end and must exit 0.
//!
//! `VDISK_E2E_SERVER=qsd` runs the same tests against qemu-storage-daemon,
//! the reference peer (it has no serial number option and starts with a
//! write-through cache, so those checks are skipped there).
//!
//! Under TCG a guest boots in about 10 s; guests run one at a time by default
//! (see `VDISK_GUEST_JOBS` in `common/guest.rs`).

#[path = "common/guest.rs"]
mod guest;
#[path = "common/server.rs"]
mod server;

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::time::Duration;

use guest::{seq_pattern, Disk, Guest, GuestRun, RunningGuest};
use server::{Export, Server, ServerKind};

const MIB: u64 = 1 << 20;

/// Generous for one boot plus a short script under TCG (about 10 s alone,
/// well under a minute on a loaded 2-core host); a hung guest is killed then.
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A temporary directory with a sparse disk file and a server exporting it.
/// Field order matters: the server is stopped before the directory goes.
struct Fixture {
    server: Server,
    disk: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Fixture {
    /// `prepare` may write to the disk file before the server opens it;
    /// `export` adds options to the export.
    fn new(size: u64, prepare: impl FnOnce(&File), export: impl FnOnce(Export) -> Export) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("vdisk-e2e-")
            .tempdir()
            .expect("create temp dir");
        let disk = dir.path().join("disk.img");
        let file = File::create(&disk).expect("create disk file");
        file.set_len(size).expect("size disk file");
        prepare(&file);
        file.sync_all().expect("sync disk file");
        drop(file);
        let socket = dir.path().join("vhost.sock");
        let export = export(Export::file(&socket, &disk));
        let server = Server::start(ServerKind::from_env(), dir.path(), &[export]);
        Fixture {
            server,
            disk,
            socket,
            _dir: dir,
        }
    }

    fn kind(&self) -> ServerKind {
        self.server.kind
    }

    /// Boots a guest with this fixture's disk as /dev/vda.
    fn run(&self, queues: u16, cpus: u32, script: &str) -> GuestRun {
        let run = Guest::new()
            .cpus(cpus)
            .timeout(GUEST_TIMEOUT)
            .disk(Disk::new(&self.socket).queues(queues))
            .run(script);
        eprintln!(
            "guest run against {} took {:.1} s",
            self.kind().name(),
            run.elapsed.as_secs_f64()
        );
        run
    }

    /// Asserts the guest's script exited 0, with the console and the server
    /// log in the failure message.
    fn check(&self, run: &GuestRun) {
        if run.exit_code != Some(0) {
            panic!(
                "guest script failed against {}\n{run}\n{}",
                self.kind().name(),
                self.server.log_section()
            );
        }
        let errors = run.io_error_lines();
        if !errors.is_empty() {
            panic!(
                "guest logged I/O errors: {errors:?}\n{run}\n{}",
                self.server.log_section()
            );
        }
    }

    /// Asserts `actual == expected`, with the console and server log.
    fn check_eq<T: PartialEq + std::fmt::Debug>(
        &self,
        what: &str,
        actual: T,
        expected: T,
        run: &GuestRun,
    ) {
        if actual != expected {
            panic!(
                "{what}: got {actual:?}, expected {expected:?}\n{run}\n{}",
                self.server.log_section()
            );
        }
    }

    fn read_disk(&self) -> Vec<u8> {
        fs::read(&self.disk).expect("read disk file")
    }

    /// Stops the server with SIGTERM and asserts it exits 0.
    fn stop(mut self) {
        self.server.stop_ok();
    }
}

fn fill(file: &File, offset: u64, len: u64, byte: u8) {
    file.write_all_at(&vec![byte; len as usize], offset)
        .expect("fill disk file");
}

fn parse<T: std::str::FromStr>(run: &GuestRun, key: &str) -> T {
    let v = run.value(key);
    v.parse()
        .unwrap_or_else(|_| panic!("guest printed {key}{v:?}, not a number\n{run}"))
}

/// fio random writes with crc32c verification on two queues, one guest CPU
/// per queue so both hardware queues carry I/O.
#[test]
fn fio_randwrite_verify_two_queues() {
    let fx = Fixture::new(64 * MIB, |_| {}, |e| e.queues(2));
    let run = fx.run(
        2,
        2,
        r#"
set -e
echo "NR_HW_QUEUES=$(ls -d /sys/block/vda/mq/* | wc -l)"
fio --name=v --filename=/dev/vda --rw=randwrite --bs=4k --size=32M \
    --numjobs=2 --offset_increment=32M --cpus_allowed=0,1 --cpus_allowed_policy=split \
    --ioengine=libaio --iodepth=16 --direct=1 \
    --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting
awk '/-req\./ { s = 0; for (i = 2; i <= NF; i++) { if ($i !~ /^[0-9]+$/) break; s += $i }; print "REQ_IRQS=" $NF " " s }' /proc/interrupts
"#,
    );
    fx.check(&run);
    fx.check_eq(
        "hardware queues",
        parse::<u32>(&run, "NR_HW_QUEUES="),
        2,
        &run,
    );
    let irqs = run.values("REQ_IRQS=");
    fx.check_eq("request queues with interrupts", irqs.len(), 2, &run);
    for q in &irqs {
        let count: u64 = q
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if count == 0 {
            panic!("queue {q}: no completions interrupted the guest\n{run}");
        }
    }
    if !run.console.contains("err= 0") {
        panic!("fio did not report err= 0\n{run}");
    }
    for line in run.console.lines().filter(|l| l.contains("IOPS=")) {
        eprintln!("fio against {}: {}", fx.kind().name(), line.trim());
    }
    fx.stop();
}

/// The guest sees the file's size and the export's serial; a discard of the
/// whole device reads back as zeros in the guest and on the host.
#[test]
fn size_serial_and_discard() {
    const SERIAL: &str = "vdisk-e2e-serial";
    let size = 64 * MIB;
    let fx = Fixture::new(
        size,
        |f| {
            fill(f, 0, MIB, b'Z');
            fill(f, 8 * MIB, 4 * MIB, b'Z');
            fill(f, size - MIB, MIB, b'Z');
        },
        |e| e.serial(SERIAL),
    );
    let run = fx.run(
        1,
        1,
        r#"
set -e
echo "SIZE_SECTORS=$(cat /sys/block/vda/size)"
echo "SERIAL=$(cat /sys/block/vda/serial)"
echo "DISCARD_MAX_BYTES=$(cat /sys/block/vda/queue/discard_max_bytes)"
echo "BEFORE_NOT_Z=$(dd if=/dev/vda bs=1M skip=8 count=4 iflag=direct 2>/dev/null | tr -d Z | wc -c)"
blkdiscard /dev/vda
echo "AFTER_NOT_ZERO=$(dd if=/dev/vda bs=1M count=64 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)"
"#,
    );
    fx.check(&run);
    fx.check_eq(
        "size in bytes",
        parse::<u64>(&run, "SIZE_SECTORS=") * 512,
        size,
        &run,
    );
    if fx.kind() == ServerKind::Vdiskd {
        fx.check_eq("serial", run.value("SERIAL=").as_str(), SERIAL, &run);
    }
    if parse::<u64>(&run, "DISCARD_MAX_BYTES=") == 0 {
        panic!("the guest sees no discard support\n{run}");
    }
    fx.check_eq(
        "non-'Z' bytes before discard",
        parse::<u64>(&run, "BEFORE_NOT_Z="),
        0,
        &run,
    );
    fx.check_eq(
        "non-zero bytes after discard",
        parse::<u64>(&run, "AFTER_NOT_ZERO="),
        0,
        &run,
    );

    let data = fx.read_disk();
    fx.check_eq("host file length", data.len() as u64, size, &run);
    if let Some(pos) = data.iter().position(|&b| b != 0) {
        panic!("host file has non-zero byte at {pos} after the guest's discard\n{run}");
    }
    // Discard punches holes: the 6 MiB the guest wrote are given back
    // (blkdiscard covers the whole disk; file systems may keep a block).
    let allocated = fs::metadata(&fx.disk).expect("stat disk").blocks() * 512;
    if fx.kind() == ServerKind::Vdiskd && allocated > 64 * 1024 {
        panic!("host file still allocates {allocated} bytes after the guest's discard (6 MiB before)\n{run}");
    }
    fx.stop();
}

/// A read-only export: the guest kernel marks the disk read-only, reads
/// work, writes fail, and the host file is unchanged.
#[test]
fn readonly_export() {
    let fx = Fixture::new(
        32 * MIB,
        |f| fill(f, 0, 2 * MIB, b'Z'),
        |e| e.readonly(true),
    );
    let run = fx.run(
        1,
        1,
        r#"
set -e
echo "RO=$(cat /sys/block/vda/ro)"
echo "READ_NOT_Z=$(dd if=/dev/vda bs=1M count=2 iflag=direct 2>/dev/null | tr -d Z | wc -c)"
if dd if=/dev/zero of=/dev/vda bs=4k count=1 oflag=direct; then echo "WRITE=ok"; else echo "WRITE=failed"; fi
if blkdiscard /dev/vda; then echo "DISCARD=ok"; else echo "DISCARD=failed"; fi
"#,
    );
    fx.check(&run);
    fx.check_eq("/sys/block/vda/ro", run.value("RO=").as_str(), "1", &run);
    fx.check_eq(
        "non-'Z' bytes read",
        parse::<u64>(&run, "READ_NOT_Z="),
        0,
        &run,
    );
    fx.check_eq("direct write", run.value("WRITE=").as_str(), "failed", &run);
    fx.check_eq("discard", run.value("DISCARD=").as_str(), "failed", &run);
    let data = fx.read_disk();
    if data[..2 * MIB as usize].iter().any(|&b| b != b'Z') {
        panic!("read-only export: host file changed\n{run}");
    }
    fx.stop();
}

/// Data the guest writes (whole 4 KiB blocks, odd 512-byte sectors, the
/// last block of the disk) is in the host file afterwards, and nothing else
/// changed.
#[test]
fn guest_writes_reach_host_file() {
    let size = 64 * MIB;
    let fx = Fixture::new(size, |_| {}, |e| e);
    let run = fx.run(
        1,
        1,
        r#"
set -e
seq 1 300000 | head -c 1048576 > /tmp/p
head -c 1536 /tmp/p > /tmp/p3
tail -c 4096 /tmp/p > /tmp/plast
dd if=/tmp/p of=/dev/vda bs=4096 seek=1283 oflag=direct conv=notrunc
dd if=/tmp/p3 of=/dev/vda bs=512 seek=77777 oflag=direct conv=notrunc
dd if=/tmp/plast of=/dev/vda bs=4096 seek=16383 oflag=direct conv=notrunc
sync
dd if=/dev/vda of=/tmp/r bs=4096 skip=1283 count=256 iflag=direct
cmp /tmp/p /tmp/r
dd if=/dev/vda of=/tmp/r3 bs=512 skip=77777 count=3 iflag=direct
cmp /tmp/p3 /tmp/r3
echo "READBACK=ok"
"#,
    );
    fx.check(&run);
    fx.check_eq(
        "read back in the guest",
        run.value("READBACK=").as_str(),
        "ok",
        &run,
    );

    let pattern = seq_pattern(MIB as usize);
    let mut expected = vec![0u8; size as usize];
    let at = 1283 * 4096;
    expected[at..at + pattern.len()].copy_from_slice(&pattern);
    let at = 77777 * 512;
    expected[at..at + 1536].copy_from_slice(&pattern[..1536]);
    let at = size as usize - 4096;
    expected[at..].copy_from_slice(&pattern[pattern.len() - 4096..]);

    let data = fx.read_disk();
    fx.check_eq("host file length", data.len(), expected.len(), &run);
    if let Some(pos) = data.iter().zip(&expected).position(|(a, b)| a != b) {
        panic!(
            "host file differs from what the guest wrote, first at byte {pos} (sector {}): got {:#04x}, expected {:#04x}\n{run}\n{}",
            pos / 512,
            data[pos],
            expected[pos],
            fx.server.log_section()
        );
    }
    fx.stop();
}

/// `block-size=4096`: the guest's logical block size is 4096, the size is
/// unchanged, and 4 KiB I/O lands in place.
#[test]
fn block_size_4096() {
    let size = 32 * MIB;
    let fx = Fixture::new(size, |_| {}, |e| e.block_size(4096));
    let run = fx.run(
        1,
        1,
        r#"
set -e
echo "LOGICAL_BLOCK_SIZE=$(cat /sys/block/vda/queue/logical_block_size)"
echo "SIZE_SECTORS=$(cat /sys/block/vda/size)"
seq 1 2000 | head -c 8192 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=4096 seek=10 oflag=direct conv=notrunc
dd if=/dev/vda of=/tmp/r bs=4096 skip=10 count=2 iflag=direct
cmp /tmp/p /tmp/r
"#,
    );
    fx.check(&run);
    fx.check_eq(
        "logical block size",
        parse::<u32>(&run, "LOGICAL_BLOCK_SIZE="),
        4096,
        &run,
    );
    fx.check_eq(
        "size in bytes",
        parse::<u64>(&run, "SIZE_SECTORS=") * 512,
        size,
        &run,
    );
    let data = fx.read_disk();
    let pattern = seq_pattern(8192);
    if data[40960..40960 + 8192] != pattern[..] {
        panic!("4 KiB blocks written at block 10 are not in the host file\n{run}");
    }
    if data[..40960].iter().any(|&b| b != 0) {
        panic!("bytes before block 10 changed\n{run}");
    }
    fx.stop();
}

/// One server, two exports (a file with `direct=on` and two queues, and a
/// null device); the first guest writes, powers off and disconnects, and a
/// second guest on the same sockets reads the data back, starts with the
/// default write cache mode whatever the first left, and switches it to
/// write-through and back.
#[test]
fn two_exports_and_a_second_guest() {
    let dir = tempfile::Builder::new()
        .prefix("vdisk-e2e-")
        .tempdir()
        .expect("create temp dir");
    let disk = dir.path().join("a.img");
    File::create(&disk)
        .and_then(|f| f.set_len(32 * MIB))
        .expect("create disk file");
    let a = Export::file(dir.path().join("a.sock"), &disk)
        .queues(2)
        .direct(true);
    let b = Export::null(dir.path().join("b.sock"), 16 * MIB);
    let mut server = Server::start(ServerKind::from_env(), dir.path(), &[a.clone(), b.clone()]);
    let guest = Guest::new()
        .cpus(2)
        .timeout(GUEST_TIMEOUT)
        .disk(Disk::new(&a.socket).queues(2))
        .disk(Disk::new(&b.socket));
    let fail = |what: &str, run: &GuestRun, server: &Server| -> ! {
        panic!("{what}\n{run}\n{}", server.log_section())
    };

    let first = guest.run(
        r#"
set -e
echo "VDB_SECTORS=$(cat /sys/block/vdb/size)"
echo "VDB_NOT_ZERO=$(dd if=/dev/vdb bs=1M count=16 iflag=direct 2>/dev/null | tr -d '\000' | wc -c)"
dd if=/dev/urandom of=/dev/vdb bs=4096 count=16 oflag=direct
seq 1 300000 | head -c 1048576 > /tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 seek=16 oflag=direct conv=notrunc
echo "FIRST_CACHE=$(cat /sys/block/vda/cache_type)"
echo "write through" > /sys/block/vda/cache_type
echo "FIRST=ok"
"#,
    );
    eprintln!(
        "first guest against {} took {:.1} s",
        server.kind.name(),
        first.elapsed.as_secs_f64()
    );
    if first.exit_code != Some(0) || !first.io_error_lines().is_empty() {
        fail("first guest failed", &first, &server);
    }
    if first.value("VDB_SECTORS=") != (16 * MIB / 512).to_string() {
        fail("null export: wrong size", &first, &server);
    }
    if first.value("VDB_NOT_ZERO=") != "0" {
        fail("null export: reads are not zeros", &first, &server);
    }

    let second = guest.run(
        r#"
set -e
seq 1 300000 | head -c 1048576 > /tmp/p
dd if=/dev/vda of=/tmp/r bs=65536 skip=16 count=16 iflag=direct
cmp /tmp/p /tmp/r
echo "CACHE_BEFORE=$(cat /sys/block/vda/cache_type)"
echo "write through" > /sys/block/vda/cache_type
echo "CACHE_SET=$(cat /sys/block/vda/cache_type)"
dd if=/tmp/p of=/dev/vda bs=65536 seek=64 oflag=direct conv=notrunc
echo "write back" > /sys/block/vda/cache_type
echo "CACHE_AFTER=$(cat /sys/block/vda/cache_type)"
echo "SECOND=ok"
"#,
    );
    eprintln!(
        "second guest against {} took {:.1} s",
        server.kind.name(),
        second.elapsed.as_secs_f64()
    );
    if second.exit_code != Some(0) || !second.io_error_lines().is_empty() {
        fail("second guest failed", &second, &server);
    }
    // A new guest starts with the device's default write cache mode, not
    // the one the previous guest left. qemu-storage-daemon's default is
    // write-through when it is not told otherwise; vdiskd offers a write
    // back cache (it implements flush).
    if server.kind == ServerKind::Vdiskd {
        for (key, run) in [("FIRST_CACHE=", &first), ("CACHE_BEFORE=", &second)] {
            if run.value(key) != "write back" {
                fail(&format!("{key} expected \"write back\""), run, &server);
            }
        }
    }
    if first.value("FIRST_CACHE=") != second.value("CACHE_BEFORE=") {
        fail(
            "the second guest did not start with the default cache mode",
            &second,
            &server,
        );
    }
    for (key, want) in [
        ("CACHE_SET=", "write through"),
        ("CACHE_AFTER=", "write back"),
    ] {
        if second.value(key) != want {
            fail(&format!("{key} expected {want:?}"), &second, &server);
        }
    }

    let data = fs::read(&disk).expect("read disk file");
    let pattern = seq_pattern(MIB as usize);
    for at in [MIB as usize, 4 * MIB as usize] {
        if data[at..at + pattern.len()] != pattern[..] {
            fail(
                &format!("host file lacks the guests' data at {at}"),
                &second,
                &server,
            );
        }
    }
    server.stop_ok();
}

/// The server restarts (with SIGTERM, or with SIGKILL as in a crash) while the
/// guest writes and reads back in a loop; QEMU reconnects (`reconnect-ms`)
/// and the guest carries on without an error.
fn restart_under_io(kill: bool) {
    let size = 64 * MIB;
    let mut fx = Fixture::new(size, |_| {}, |e| e);
    let mut running = Guest::new()
        .timeout(GUEST_TIMEOUT)
        .disk(Disk::new(&fx.socket).reconnect_ms(100))
        .spawn(
            r#"
set -e
seq 1 300000 | head -c 1048576 > /tmp/p
echo "IO-START"
i=0
while [ $i -lt 48 ]; do
    dd if=/tmp/p of=/dev/vda bs=65536 seek=$((i * 16)) oflag=direct conv=notrunc 2>/dev/null
    dd if=/dev/vda of=/tmp/r bs=65536 skip=$((i * 16)) count=16 iflag=direct 2>/dev/null
    cmp /tmp/p /tmp/r
    i=$((i + 1))
done
echo "ROUNDS=$i"
"#,
        );
    if running.wait_for_line("IO-START").is_none() {
        let run = running.wait();
        panic!("guest did not start its I/O loop\n{run}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    if running.console().contains("ROUNDS=") {
        let run = running.wait();
        panic!("the guest's I/O loop ended before the restart: make it longer\n{run}");
    }
    let export = Export::file(&fx.socket, &fx.disk);
    let kind = fx.kind();
    if kill {
        fx.server.kill();
    } else {
        fx.server.stop_ok();
    }
    let old_log = fx.server.log();
    let dir = fx.disk.parent().expect("disk dir").to_path_buf();
    fx.server = Server::start_with_log(kind, &dir, &[export], "restarted");
    let run = running.wait();
    eprintln!(
        "guest run across a restart of {} took {:.1} s",
        kind.name(),
        run.elapsed.as_secs_f64()
    );
    if run.exit_code != Some(0) || !run.io_error_lines().is_empty() {
        panic!(
            "guest failed across the restart\n{run}\n----- first server log -----\n{old_log}\n{}",
            fx.server.log_section()
        );
    }
    fx.check_eq("rounds", run.value("ROUNDS=").as_str(), "48", &run);
    let data = fx.read_disk();
    let pattern = seq_pattern(MIB as usize);
    for i in 0..48 {
        let at = i * MIB as usize;
        if data[at..at + pattern.len()] != pattern[..] {
            panic!("host file: MiB {i} lacks the guest's data\n{run}");
        }
    }
    fx.stop();
}

#[test]
fn restart_with_sigterm_under_io() {
    restart_under_io(false);
}

#[test]
fn restart_after_sigkill_under_io() {
    restart_under_io(true);
}

/// A VM paused and resumed (QMP `stop`/`cont`: GET_VRING_BASE and
/// SET_VRING_ENABLE on every queue) 20 times while fio keeps both queues
/// busy, then reset 3 times: no control message waits behind the load, and
/// after every reset each queue (one per vCPU) serves again.
#[test]
fn stop_cont_and_reset_under_load_keep_every_queue_serving() {
    let fx = Fixture::new(64 * MIB, |_| {}, |e| e.queues(2));
    // Each boot: a write and read-back from each vCPU (so on each queue),
    // then fio on both vCPUs until the VM is reset or the test ends.
    let mut guest = Guest::new()
        .cpus(2)
        .timeout(Duration::from_secs(300))
        .qmp()
        .allow_reboot()
        .disk(Disk::new(&fx.socket).queues(2))
        .spawn(
            r#"
set -e
seq 1 300000 | head -c 1048576 > /tmp/p
for cpu in 1 2; do
    taskset $cpu dd if=/tmp/p of=/dev/vda bs=65536 seek=$((cpu * 16)) oflag=direct conv=notrunc 2>/dev/null
    taskset $cpu dd if=/dev/vda of=/tmp/r bs=65536 skip=$((cpu * 16)) count=16 iflag=direct 2>/dev/null
    cmp /tmp/p /tmp/r
done
echo "QUEUES-OK"
fio --name=load --filename=/dev/vda --rw=randrw --bs=4k --iodepth=16 --numjobs=2 \
    --cpus_allowed=0,1 --cpus_allowed_policy=split --ioengine=libaio --direct=1 \
    --offset=8M --size=32M --time_based --runtime=600 --group_reporting >/dev/null
"#,
        );
    let fail = |why: String, guest: RunningGuest, fx: &Fixture| -> ! {
        let run = guest.wait();
        panic!("{why}\n{run}\n{}", fx.server.log_section());
    };
    if !guest.wait_for_lines("QUEUES-OK", 1) {
        fail(
            "the first boot did not serve both queues".into(),
            guest,
            &fx,
        );
    }
    // Let fio get going.
    std::thread::sleep(Duration::from_secs(2));
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        guest.qmp("stop", serde_json::json!({}));
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(20));
        let t = std::time::Instant::now();
        guest.qmp("cont", serde_json::json!({}));
        worst = worst.max(t.elapsed());
        std::thread::sleep(Duration::from_millis(150));
    }
    eprintln!("slowest QMP stop/cont under load: {worst:?}");
    for boot in 2..=4 {
        guest.qmp("system_reset", serde_json::json!({}));
        if !guest.wait_for_lines("QUEUES-OK", boot) {
            fail(
                format!("after reset {} a queue did not serve", boot - 1),
                guest,
                &fx,
            );
        }
    }
    let console = guest.console();
    drop(guest);
    let log = fx.server.log();
    assert!(
        !log.contains("stopped:"),
        "a queue worker stopped:\n{log}\n{console}"
    );
    // QEMU under TCG pauses its vCPUs too; the daemon's share is small.
    assert!(
        worst < Duration::from_secs(2),
        "a QMP stop or cont took {worst:?} under load"
    );
    fx.stop();
}
