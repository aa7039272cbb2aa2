//! A small Linux guest in QEMU (TCG) for end-to-end tests.
//!
//! The guest is the host's Debian kernel with an initramfs made by
//! `tests/guest/mkinitramfs.sh` (busybox, fio, the virtio-blk modules). It is
//! built once into `<target>/guest/` and reused. Each run appends a second cpio
//! archive holding the test's `/test.sh`; the guest's `/init` runs it, prints
//! `VDISK-GUEST-EXIT=<rc>` on the serial console and powers off.
//!
//! Include it from a test file with
//! `#[path = "common/guest.rs"] mod guest;`.
#![allow(dead_code)]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// The line `/init` prints after `/test.sh` ends.
const EXIT_MARKER: &str = "VDISK-GUEST-EXIT=";

/// Guest RAM. The memfd backend with `share=on` is what lets a vhost-user
/// server map guest memory.
const GUEST_MEM_MIB: u32 = 512;

/// How often a running QEMU is checked for exit while waiting.
const POLL: Duration = Duration::from_millis(50);

/// The kernel and initramfs every guest boots.
#[derive(Debug, Clone)]
pub struct GuestImage {
    pub kernel: PathBuf,
    /// The uncompressed cpio archive (the script's `initramfs.cpio.gz`,
    /// decompressed).
    pub initramfs: PathBuf,
}

/// Where the guest image is cached: `<target>/guest`.
pub fn guest_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    match tmp.parent() {
        Some(target) => target.join("guest"),
        None => tmp.join("guest"),
    }
}

/// Builds the guest image once per test process; a file lock keeps several
/// test processes from building it at the same time. The script itself skips
/// the work when its output is up to date.
pub fn guest_image() -> GuestImage {
    static IMAGE: OnceLock<Result<GuestImage, String>> = OnceLock::new();
    IMAGE
        .get_or_init(build_guest_image)
        .clone()
        .unwrap_or_else(|e| panic!("guest image: {e}"))
}

fn build_guest_image() -> Result<GuestImage, String> {
    let dir = guest_dir();
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock_path = dir.with_extension("lock");
    let lock = File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("lock {}: {e}", lock_path.display()))?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guest/mkinitramfs.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed ({}):\n{}{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let initramfs = uncompressed(&dir.join("initramfs.cpio.gz"))?;
    drop(lock);
    Ok(GuestImage {
        kernel: dir.join("vmlinuz"),
        initramfs,
    })
}

/// The initramfs decompressed once, next to the `.gz`: an emulated CPU
/// takes about 2 s per boot to gunzip it, a copy costs milliseconds.
fn uncompressed(gz: &Path) -> Result<PathBuf, String> {
    let cpio = gz.with_extension("");
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if mtime(&cpio).is_some() && mtime(&cpio) >= mtime(gz) {
        return Ok(cpio);
    }
    let tmp = gz.with_extension("tmp");
    let out = File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let status = Command::new("gzip")
        .arg("-dc")
        .arg(gz)
        .stdout(out)
        .status()
        .map_err(|e| format!("run gzip: {e}"))?;
    if !status.success() {
        return Err(format!("gzip -dc {} failed ({status})", gz.display()));
    }
    fs::rename(&tmp, &cpio).map_err(|e| format!("rename to {}: {e}", cpio.display()))?;
    Ok(cpio)
}

/// One vhost-user-blk disk of the guest: `/dev/vda` is the first.
#[derive(Debug, Clone)]
pub struct Disk {
    pub socket: PathBuf,
    pub num_queues: u16,
    /// QEMU's `reconnect-ms` on the chardev: reconnect after the server goes
    /// away instead of failing.
    pub reconnect_ms: Option<u32>,
}

impl Disk {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Disk {
            socket: socket.into(),
            num_queues: 1,
            reconnect_ms: None,
        }
    }

    pub fn queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }
}

/// A guest to boot: its disks, CPUs and time limit.
#[derive(Debug, Clone)]
pub struct Guest {
    pub disks: Vec<Disk>,
    pub cpus: u32,
    pub timeout: Duration,
    /// Extra words for the kernel command line.
    pub append: String,
    /// Serve QMP on a socket, for [`RunningGuest::qmp`].
    pub qmp: bool,
    /// Let a reset (QMP `system_reset`) reboot the guest; by default QEMU
    /// runs with `-no-reboot` and a reset ends it.
    pub reboot: bool,
}

impl Default for Guest {
    fn default() -> Self {
        Guest {
            disks: Vec::new(),
            cpus: 1,
            timeout: Duration::from_secs(120),
            append: String::new(),
            qmp: false,
            reboot: false,
        }
    }
}

impl Guest {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// Serve QMP (see [`RunningGuest::qmp`]).
    pub fn qmp(mut self) -> Self {
        self.qmp = true;
        self
    }

    /// Reboot on reset instead of exiting.
    pub fn allow_reboot(mut self) -> Self {
        self.reboot = true;
        self
    }

    pub fn append(mut self, words: &str) -> Self {
        self.append = words.to_string();
        self
    }

    /// Boots the guest, runs `script` as its `/test.sh` (with `sh`), and
    /// returns when QEMU exits or after `timeout`, when QEMU is killed.
    pub fn run(&self, script: &str) -> GuestRun {
        self.spawn(script).wait()
    }

    /// Boots the guest and returns while it runs; `timeout` counts from now.
    pub fn spawn(&self, script: &str) -> RunningGuest {
        let image = guest_image();
        let slot = GuestSlot::acquire();
        let work = tempfile::Builder::new()
            .prefix("vdisk-guest-")
            .tempdir()
            .expect("create guest temp dir");
        let initrd = work.path().join("initrd");
        write_initrd(&image.initramfs, script, &initrd)
            .unwrap_or_else(|e| panic!("write {}: {e}", initrd.display()));
        let console_path = work.path().join("console.log");
        let qemu_log = work.path().join("qemu.log");

        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35", "-cpu", "max"])
            .args(["-smp", &self.cpus.to_string()])
            .args(["-m", &format!("{GUEST_MEM_MIB}M")])
            .args([
                "-object",
                &format!("memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"),
                "-numa",
                "node,memdev=mem",
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .args(if self.reboot {
                &[][..]
            } else {
                &["-no-reboot"][..]
            })
            .args([
                "-chardev",
                &format!("file,id=console,path={}", console_path.display()),
                "-serial",
                "chardev:console",
            ])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                &format!("console=ttyS0 quiet panic=-1 {}", self.append),
            ]);
        for (i, disk) in self.disks.iter().enumerate() {
            let mut chardev = format!("socket,id=vdisk{i},path={}", disk.socket.display());
            if let Some(ms) = disk.reconnect_ms {
                chardev.push_str(&format!(",reconnect-ms={ms}"));
            }
            cmd.args(["-chardev", &chardev]).args([
                "-device",
                &format!(
                    "vhost-user-blk-pci,chardev=vdisk{i},num-queues={},id=disk{i}",
                    disk.num_queues
                ),
            ]);
        }
        let qmp_path = self.qmp.then(|| work.path().join("qmp.sock"));
        if let Some(q) = &qmp_path {
            cmd.args(["-qmp", &format!("unix:{},server=on,wait=off", q.display())]);
        }
        let log = File::create(&qemu_log).expect("create qemu log");
        kill_with_parent(&mut cmd);
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup qemu log"))
            .stderr(log);

        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start qemu-system-x86_64: {e}"));
        RunningGuest {
            child,
            started,
            deadline: started + self.timeout,
            console_path,
            qemu_log,
            qmp_path,
            qmp: None,
            _work: work,
            _slot: slot,
        }
    }
}

/// A guest that is running. Dropping it kills QEMU.
pub struct RunningGuest {
    child: Child,
    started: Instant,
    deadline: Instant,
    console_path: PathBuf,
    qemu_log: PathBuf,
    qmp_path: Option<PathBuf>,
    qmp: Option<std::io::BufReader<std::os::unix::net::UnixStream>>,
    _work: tempfile::TempDir,
    _slot: GuestSlot,
}

impl RunningGuest {
    /// The console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console_path)
    }

    /// Waits until the console has a line that starts with `prefix` and
    /// returns the rest of it; `None` if QEMU exits or the guest's deadline
    /// passes first.
    pub fn wait_for_line(&mut self, prefix: &str) -> Option<String> {
        loop {
            let console = self.console();
            if let Some(rest) = console
                .lines()
                .find_map(|l| l.trim_end().strip_prefix(prefix))
            {
                return Some(rest.to_string());
            }
            let exited = self.child.try_wait().expect("wait for qemu").is_some();
            if exited || Instant::now() >= self.deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    /// The QMP socket (the guest was made with [`Guest::qmp`]), for a tool
    /// that talks to QEMU itself. Disk `i` is the device `disk{i}`.
    pub fn qmp_socket(&self) -> Option<&Path> {
        self.qmp_path.as_deref()
    }

    /// Waits until the console has `n` lines that start with `prefix`;
    /// false if QEMU exits or the guest's deadline passes first.
    pub fn wait_for_lines(&mut self, prefix: &str, n: usize) -> bool {
        loop {
            let count = self
                .console()
                .lines()
                .filter(|l| l.trim_end().starts_with(prefix))
                .count();
            if count >= n {
                return true;
            }
            let exited = self.child.try_wait().expect("wait for qemu").is_some();
            if exited || Instant::now() >= self.deadline {
                return false;
            }
            thread::sleep(POLL);
        }
    }

    /// Runs a QMP command (the guest was made with [`Guest::qmp`]) and
    /// returns its `return` value; panics on an error reply, or when QEMU
    /// does not answer within 30 s. Events read meanwhile are skipped.
    pub fn qmp(&mut self, command: &str, arguments: serde_json::Value) -> serde_json::Value {
        use std::io::BufRead;
        const QMP_TIMEOUT: Duration = Duration::from_secs(30);
        fn reply(
            conn: &mut std::io::BufReader<std::os::unix::net::UnixStream>,
        ) -> serde_json::Value {
            loop {
                let mut line = String::new();
                match conn.read_line(&mut line) {
                    Ok(0) => panic!("QMP: QEMU closed the connection"),
                    Ok(_) => {}
                    Err(e) => panic!("QMP: no reply: {e}"),
                }
                let v: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP: {e}: {line}"));
                if v.get("event").is_none() {
                    return v;
                }
            }
        }
        if self.qmp.is_none() {
            let path = self
                .qmp_path
                .clone()
                .expect("the guest was made without .qmp()");
            let deadline = Instant::now() + QMP_TIMEOUT;
            let stream = loop {
                match std::os::unix::net::UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() < deadline => {
                        let _ = e;
                        thread::sleep(POLL);
                    }
                    Err(e) => panic!("QMP: connect {}: {e}", path.display()),
                }
            };
            stream.set_read_timeout(Some(QMP_TIMEOUT)).unwrap();
            let mut conn = std::io::BufReader::new(stream);
            let greeting = reply(&mut conn);
            assert!(greeting.get("QMP").is_some(), "QMP greeting: {greeting}");
            conn.get_mut()
                .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
                .unwrap();
            let r = reply(&mut conn);
            assert!(r.get("return").is_some(), "qmp_capabilities: {r}");
            self.qmp = Some(conn);
        }
        let conn = self.qmp.as_mut().expect("connected above");
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        conn.get_mut()
            .write_all(format!("{msg}\n").as_bytes())
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"));
        let r = reply(conn);
        match r.get("return") {
            Some(v) => v.clone(),
            None => panic!("QMP {command}: {r}"),
        }
    }

    /// Waits for QEMU to exit, killing it at the deadline.
    pub fn wait(mut self) -> GuestRun {
        let mut timed_out = false;
        let status = loop {
            match self.child.try_wait().expect("wait for qemu") {
                Some(status) => break Some(status),
                None if Instant::now() >= self.deadline => {
                    timed_out = true;
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
                None => thread::sleep(POLL),
            }
        };
        let console = self.console();
        GuestRun {
            exit_code: parse_exit_code(&console),
            console,
            qemu_output: read_lossy(&self.qemu_log),
            qemu_status: status,
            timed_out,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Boots a guest with one vhost-user-blk disk (one queue) per socket.
pub fn run_guest(disks: &[&Path], script: &str, timeout: Duration) -> GuestRun {
    let mut guest = Guest::new().timeout(timeout);
    for socket in disks {
        guest = guest.disk(Disk::new(*socket));
    }
    guest.run(script)
}

/// What a guest run left behind.
#[derive(Debug)]
pub struct GuestRun {
    /// The exit code of `/test.sh`, from the console's marker line; `None`
    /// if the guest never printed it (boot failure, hang, no script).
    pub exit_code: Option<i32>,
    /// Everything the guest wrote on its serial console.
    pub console: String,
    /// QEMU's own stdout and stderr.
    pub qemu_output: String,
    /// `None` when QEMU was killed at the timeout.
    pub qemu_status: Option<ExitStatus>,
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl GuestRun {
    /// Panics, showing the console, unless `/test.sh` exited 0.
    pub fn assert_success(&self) {
        self.assert_exit(0);
    }

    /// Panics, showing the console, unless `/test.sh` exited with `code`.
    pub fn assert_exit(&self, code: i32) {
        if self.exit_code != Some(code) {
            panic!("guest: expected /test.sh to exit {code}\n{self}");
        }
    }

    /// Console lines that look like a block-layer or virtio error.
    pub fn io_error_lines(&self) -> Vec<&str> {
        const PATTERNS: [&str; 6] = [
            "I/O error",
            "blk_update_request",
            "Buffer I/O error",
            "virtio_blk",
            "critical medium error",
            "print_req_error",
        ];
        self.console
            .lines()
            .filter(|l| PATTERNS.iter().any(|p| l.contains(p)))
            .collect()
    }

    /// Panics, showing the console, if the guest kernel logged an I/O error.
    pub fn assert_no_io_errors(&self) {
        let lines = self.io_error_lines();
        if !lines.is_empty() {
            panic!("guest logged I/O errors: {lines:?}\n{self}");
        }
    }

    /// The lines of `/test.sh`'s output that start with `prefix`, with the
    /// prefix removed and trailing whitespace (the console's `\r`) trimmed.
    pub fn values(&self, prefix: &str) -> Vec<String> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix(prefix))
            .map(|v| v.to_string())
            .collect()
    }

    /// The single value printed as a `prefix...` line; panics if absent.
    pub fn value(&self, prefix: &str) -> String {
        let mut v = self.values(prefix);
        match v.len() {
            1 => v.remove(0),
            n => panic!("guest: expected one line starting {prefix:?}, found {n}\n{self}"),
        }
    }
}

impl fmt::Display for GuestRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "guest exit code: {:?}, qemu: {}, after {:.1} s",
            self.exit_code,
            match (&self.qemu_status, self.timed_out) {
                (_, true) => "killed at timeout".to_string(),
                (Some(s), false) => s.to_string(),
                (None, false) => "unknown".to_string(),
            },
            self.elapsed.as_secs_f64()
        )?;
        writeln!(f, "----- guest console -----")?;
        writeln!(f, "{}", self.console.trim_end())?;
        if !self.qemu_output.trim().is_empty() {
            writeln!(f, "----- qemu output -----")?;
            writeln!(f, "{}", self.qemu_output.trim_end())?;
        }
        write!(f, "-------------------------")
    }
}

/// Has the child killed when the thread that started it dies (a test process
/// killed by ^C or a timeout must not leave QEMU or a server running).
/// The thread that starts a child here is the one that waits for it.
pub fn kill_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn parse_exit_code(console: &str) -> Option<i32> {
    console
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(EXIT_MARKER))
        .and_then(|v| v.trim().parse().ok())
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Writes `base` followed by a cpio archive holding `/test.sh`. The kernel
/// unpacks concatenated archives in order; an uncompressed one must start
/// at a multiple of 4 bytes, and zero bytes between archives are skipped.
pub fn write_initrd(base: &Path, script: &str, out: &Path) -> std::io::Result<()> {
    let mut bytes = fs::read(base)?;
    while !bytes.len().is_multiple_of(4) {
        bytes.push(0);
    }
    bytes.extend_from_slice(&cpio_newc(&[("test.sh", 0o100_755, script.as_bytes())]));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)?;
    f.write_all(&bytes)
}

/// A cpio archive in the "newc" format the kernel reads, holding regular
/// files `(name, mode, data)`.
pub fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let size = u32::try_from(data.len()).expect("cpio member too large");
        let namesize = u32::try_from(name.len() + 1).expect("cpio name too long");
        // magic, then 13 fields of 8 hex digits: ino, mode, uid, gid, nlink,
        // mtime, filesize, devmajor, devminor, rdevmajor, rdevminor,
        // namesize, check.
        let fields = [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, namesize, 0];
        out.extend_from_slice(b"070701");
        for v in fields {
            out.extend_from_slice(format!("{v:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
    }
    fn pad4(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, 0x7d00 + i as u32, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Bounds how many guests run at once in this process: under TCG each guest
/// CPU is a busy host thread, and oversubscribing a small host makes boot
/// times and fio runs erratic. `VDISK_GUEST_JOBS` overrides the default of
/// one guest per two host cores (at least one).
struct GuestSlot;

static SLOTS: Mutex<usize> = Mutex::new(0);
static SLOT_FREED: Condvar = Condvar::new();

impl GuestSlot {
    fn limit() -> usize {
        std::env::var("VDISK_GUEST_JOBS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
            .unwrap_or_else(|| {
                thread::available_parallelism()
                    .map(|n| n.get() / 2)
                    .unwrap_or(1)
                    .max(1)
            })
    }

    fn acquire() -> GuestSlot {
        let limit = Self::limit();
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= limit {
            used = SLOT_FREED.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += 1;
        GuestSlot
    }
}

impl Drop for GuestSlot {
    fn drop(&mut self) {
        let mut used = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        *used -= 1;
        SLOT_FREED.notify_one();
    }
}

/// `seq 1 300000 | head -c LEN`, as a guest script makes its test data.
pub fn seq_pattern(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    let mut n = 1u64;
    while out.len() < len {
        out.extend_from_slice(format!("{n}\n").as_bytes());
        n += 1;
    }
    out.truncate(len);
    out
}
