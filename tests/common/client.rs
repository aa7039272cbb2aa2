//! Test client for vhost-user-blk daemons.
//!
//! - [`Client`]: a small synchronous wrapper over the `blkio` crate's
//!   `virtio-blk-vhost-user` driver. Every request returns `Result` with the
//!   errno the driver reported (`EIO` for a virtio IOERR status, `ENOTSUP` for
//!   UNSUPP). [`Client::run`] puts a whole batch in flight at once, spread over
//!   any of the queues.
//! - [`RawClient`]: one queue driven through `virtio-driver` directly, for the
//!   requests a well-behaved driver never sends (a write to a read-only device,
//!   a length that is not a whole number of sectors). The device must answer
//!   them with an error status, as it would an untrusted guest.
//! - [`Daemon`]: a drop guard that runs `vdiskd` (or, as the reference,
//!   `qemu-storage-daemon`) with the given exports, waits for its sockets, and
//!   can stop, kill and restart it. Its log goes to a file that is printed when
//!   the test panics. `VDISK_TEST_SERVER=qsd` makes [`Server::from_env`]
//!   pick qemu-storage-daemon; `VDISKD_BIN` runs another vdiskd binary.
//!
//! Include it with `#[path = "common/client.rs"] mod client;`.
#![allow(dead_code)]

#[path = "watchdog.rs"]
pub mod watchdog;

use blkio::{Blkio, Blkioq, Completion, Errno, MemoryRegion, ReqFlags};
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::mem::MaybeUninit;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The blkio driver name for a vhost-user-blk socket.
pub const DRIVER: &str = "virtio-blk-vhost-user";

/// virtio-blk addresses the disk in 512-byte sectors whatever its block size.
pub const SECTOR: u64 = 512;

/// How long one batch of requests may take before the test fails. A healthy
/// daemon answers in milliseconds; this is long enough for a loaded 2-core CI
/// machine and short enough that a hung daemon fails the test, not the CI run.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a daemon may take to create its sockets, and a client to get its
/// connection accepted (a restarted daemon may still be tearing down).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long blkio's vhost-user handshake (features, memory table, vring
/// set-up) may take once connected; it blocks on the socket without a limit
/// of its own, so the watchdog enforces this one.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Size of the shared buffer a [`Client`] maps by default: a batch of 4 queues
/// x 32 requests x 64 KiB fits.
pub const DEFAULT_BUFFER: usize = 8 << 20;

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// How to connect a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Number of virtqueues to start (interrupt-driven, not poll queues).
    pub queues: usize,
    /// Tell blkio that the device is read-only. blkio refuses to start a
    /// device that offers VIRTIO_BLK_F_RO unless this is set, and then fails
    /// writes itself (EBADF) without sending them.
    pub read_only: bool,
    /// Bytes of shared memory to map for I/O buffers.
    pub buffer_size: usize,
    /// Virtqueue size; `None` keeps blkio's default (256).
    pub queue_size: Option<i32>,
    /// How long to retry a refused connection.
    pub connect_timeout: Duration,
    /// How long one batch may wait for its completions ([`IO_TIMEOUT`]).
    pub io_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            queues: 1,
            read_only: false,
            buffer_size: DEFAULT_BUFFER,
            queue_size: None,
            connect_timeout: READY_TIMEOUT,
            io_timeout: IO_TIMEOUT,
        }
    }
}

impl ClientOptions {
    pub fn queues(n: usize) -> Self {
        ClientOptions {
            queues: n,
            ..Default::default()
        }
    }

    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }
}

/// One request of a batch given to [`Client::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A scatter read: one buffer per length, each starting `misalign`
    /// bytes past a 512-byte boundary, none adjacent. The result is the
    /// segments concatenated.
    Readv {
        offset: u64,
        lens: Vec<usize>,
        misalign: usize,
    },
    /// A gather write of the segments, placed as for `Readv`.
    Writev {
        offset: u64,
        segs: Vec<Vec<u8>>,
        misalign: usize,
    },
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
}

/// The result of one request: the data for a read, empty for the others.
pub type OpResult = Result<Vec<u8>, Errno>;

/// A connected, started blkio device with a mapped buffer.
pub struct Client {
    // Fields drop in declaration order: the queues before the Blkio that
    // owns the connection (blkio keeps the memory alive until both are gone).
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
    capacity: u64,
    io_timeout: Duration,
}

impl Client {
    /// Connects with `queues` queues and default options.
    pub fn connect(socket: &Path, queues: usize) -> Result<Client, blkio::Error> {
        Client::connect_with(socket, &ClientOptions::queues(queues))
    }

    /// Connects, retrying a refused connection for `opts.connect_timeout`,
    /// then starts the queues and maps the buffer.
    pub fn connect_with(socket: &Path, opts: &ClientOptions) -> Result<Client, blkio::Error> {
        let path = socket
            .to_str()
            .ok_or_else(|| blkio::Error::new(Errno::INVAL, "socket path is not UTF-8"))?;
        // blkio's handshake blocks on the socket: a daemon that accepts and
        // never answers would hang the test without this.
        let _deadline = watchdog::arm(
            format!("the vhost-user handshake on {path}"),
            opts.connect_timeout + HANDSHAKE_TIMEOUT,
        );
        let deadline = Instant::now() + opts.connect_timeout;
        let mut blkio = loop {
            let mut b = Blkio::new(DRIVER)?;
            b.set_str("path", path)?;
            b.set_bool("read-only", opts.read_only)?;
            match b.connect() {
                Ok(()) => break b,
                // The socket may not exist yet, or a restarted daemon may
                // not be listening yet: only those are worth a retry.
                Err(e)
                    if Instant::now() < deadline
                        && [Errno::CONNREFUSED, Errno::NOENT, Errno::AGAIN]
                            .contains(&e.errno()) =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        blkio.set_i32("num-queues", i32::try_from(opts.queues).unwrap())?;
        if let Some(size) = opts.queue_size {
            blkio.set_i32("queue-size", size)?;
        }
        let started = blkio.start()?;
        let region = blkio.alloc_mem_region(opts.buffer_size)?;
        blkio.map_mem_region(&region)?;
        let capacity = blkio.get_u64("capacity")?;
        Ok(Client {
            queues: started.queues,
            region,
            blkio,
            capacity,
            io_timeout: opts.io_timeout,
        })
    }

    /// Disk size in bytes, as the device's config space reports it.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The underlying blkio instance, to read properties
    /// (`request-alignment`, `max-transfer`, `max-queues`, ...).
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// The started queues, for callers that drive blkio themselves (the
    /// benchmark runs one thread per queue).
    pub fn queues_mut(&mut self) -> &mut [Blkioq] {
        &mut self.queues
    }

    /// The blkio instance and the queues at once, to map memory on one
    /// thread while another drives a queue.
    pub fn split_mut(&mut self) -> (&mut Blkio, &mut [Blkioq]) {
        (&mut self.blkio, &mut self.queues)
    }

    /// Address and length of the mapped buffer; only memory in it may be
    /// handed to the queues.
    pub fn buffer_raw(&self) -> (usize, usize) {
        (self.region.addr, self.region.len)
    }

    fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region was allocated by blkio for this client with
        // `region.len` bytes at `region.addr` and stays mapped until `self`
        // drops; only this client's requests (all completed before `run`
        // returns) hand it to the device.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Where each request's buffers go in the mapped region: a list of
    /// (offset in region, length) per request. Plain reads and writes get
    /// one 512-aligned slot; vectored ones get each segment at `misalign`
    /// bytes past a 512-byte boundary, with a gap after it so that no two
    /// segments touch.
    fn layout(&self, ops: &[(usize, Op)]) -> Vec<Vec<(usize, usize)>> {
        let mut next = 0usize;
        let mut out = Vec::with_capacity(ops.len());
        for (_, op) in ops {
            let mut segs = Vec::new();
            let mut place = |len: usize, misalign: usize| {
                segs.push((next + misalign, len));
                next += (len + misalign).div_ceil(512) * 512;
                if misalign > 0 {
                    next += 512;
                }
            };
            match op {
                Op::Read { len, .. } => place(*len, 0),
                Op::Write { data, .. } => place(data.len(), 0),
                Op::Readv { lens, misalign, .. } => {
                    for len in lens {
                        place(*len, *misalign);
                    }
                }
                Op::Writev {
                    segs: data,
                    misalign,
                    ..
                } => {
                    for d in data {
                        place(d.len(), *misalign);
                    }
                }
                Op::Flush | Op::Discard { .. } | Op::WriteZeroes { .. } => {}
            }
            out.push(segs);
        }
        assert!(
            next <= self.region.len,
            "batch needs {next} bytes of buffer, client has {}",
            self.region.len
        );
        out
    }

    /// Copies write data in and enqueues every request (not yet kicked).
    /// Returns the iovec arrays, which must outlive the requests, and the
    /// number of requests per queue.
    fn enqueue(
        &mut self,
        ops: &[(usize, Op)],
        layout: &[Vec<(usize, usize)>],
    ) -> (Vec<Vec<blkio::iovec>>, Vec<usize>, Vec<Instant>) {
        let base = self.region.addr as *mut u8;
        let mut pending = vec![0usize; self.queues.len()];
        // When each request became visible to the device: blkio publishes
        // a request in the avail ring as it is queued, and a polling
        // device may take it before any kick.
        let mut offered = Vec::with_capacity(ops.len());
        let mut iovecs: Vec<Vec<blkio::iovec>> = Vec::with_capacity(ops.len());
        for (i, ((q, op), segs)) in ops.iter().zip(layout).enumerate() {
            assert!(*q < self.queues.len(), "queue {q} not started");
            // SAFETY: `layout` checked every segment against the region.
            let ptrs: Vec<*mut u8> = segs.iter().map(|(o, _)| unsafe { base.add(*o) }).collect();
            let iov: Vec<blkio::iovec> = ptrs
                .iter()
                .zip(segs)
                .map(|(p, (_, len))| blkio::iovec {
                    iov_base: p.cast(),
                    iov_len: *len,
                })
                .collect();
            let write_in = |datas: &[&Vec<u8>]| {
                for (d, p) in datas.iter().zip(&ptrs) {
                    // SAFETY: in the region (checked), not in flight yet.
                    unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), *p, d.len()) };
                }
            };
            let queue = &mut self.queues[*q];
            let none = ReqFlags::empty();
            match op {
                Op::Read { offset, len } => queue.read(*offset, ptrs[0], *len, i, none),
                Op::Write { offset, data } => {
                    write_in(&[data]);
                    queue.write(*offset, ptrs[0], data.len(), i, none)
                }
                Op::Readv { offset, .. } => {
                    queue.readv(*offset, iov.as_ptr(), iov.len() as u32, i, none)
                }
                Op::Writev { offset, segs, .. } => {
                    write_in(&segs.iter().collect::<Vec<_>>());
                    queue.writev(*offset, iov.as_ptr(), iov.len() as u32, i, none)
                }
                Op::Flush => queue.flush(i, none),
                Op::Discard { offset, len } => queue.discard(*offset, *len, i, none),
                Op::WriteZeroes { offset, len, unmap } => {
                    let flags = if *unmap { none } else { ReqFlags::NO_UNMAP };
                    queue.write_zeroes(*offset, *len, i, flags)
                }
            }
            offered.push(Instant::now());
            // Moving the Vec into `iovecs` keeps its heap buffer in place.
            iovecs.push(iov);
            pending[*q] += 1;
        }
        (iovecs, pending, offered)
    }

    /// Sends every request at once (each on the queue paired with it), kicks
    /// all queues, and waits for all completions. Results are in request
    /// order. Panics if the daemon does not answer within the options'
    /// `io_timeout` ([`IO_TIMEOUT`] by default) or
    /// if the reads and writes do not fit in the buffer.
    pub fn run(&mut self, ops: &[(usize, Op)]) -> Vec<OpResult> {
        self.run_timed(ops).0
    }

    /// [`Client::run`], also returning each request's latency: from the
    /// moment it was offered to the device to the moment its completion was
    /// reaped.
    pub fn run_timed(&mut self, ops: &[(usize, Op)]) -> (Vec<OpResult>, Vec<Duration>) {
        let layout = self.layout(ops);
        let (_iovecs, mut pending, offered) = self.enqueue(ops, &layout);

        // Kick every queue before waiting on any, so that all are busy at once.
        for (q, queue) in self.queues.iter_mut().enumerate() {
            if pending[q] > 0 {
                queue
                    .do_io(&mut [], 0, None, None)
                    .unwrap_or_else(|e| panic!("queue {q}: submit failed: {e}"));
            }
        }

        let mut latencies = vec![Duration::ZERO; ops.len()];
        let mut results: Vec<Option<OpResult>> = vec![None; ops.len()];
        let mut completions: Vec<MaybeUninit<Completion>> =
            (0..64).map(|_| MaybeUninit::uninit()).collect();
        for (q, queue) in self.queues.iter_mut().enumerate() {
            let mut left = self.io_timeout;
            while pending[q] > 0 {
                let n = queue
                    .do_io(&mut completions, 1, Some(&mut left), None)
                    .unwrap_or_else(|e| {
                        panic!(
                            "queue {q}: {} of {} requests unanswered: {e} (errno {})",
                            pending[q],
                            ops.len(),
                            e.errno()
                        )
                    });
                let reaped = Instant::now();
                for c in &completions[..n] {
                    // SAFETY: do_io initialised the first `n` completions.
                    let c = unsafe { c.assume_init_read() };
                    let i = c.user_data;
                    latencies[i] = reaped.saturating_duration_since(offered[i]);
                    assert!(results[i].is_none(), "request {i} completed twice");
                    results[i] = Some(if c.ret == 0 {
                        Ok(Vec::new())
                    } else {
                        Err(Errno::from_raw_os_error(-c.ret))
                    });
                }
                pending[q] -= n;
            }
        }

        let buffer = self.buffer();
        let results = results
            .into_iter()
            .zip(ops)
            .zip(layout)
            .map(|((r, (_, op)), segs)| {
                let r = r.expect("every request completed");
                match (r, op) {
                    (Ok(_), Op::Read { .. } | Op::Readv { .. }) => {
                        // extend_from_slice is a memcpy even unoptimised.
                        let mut v = Vec::with_capacity(segs.iter().map(|s| s.1).sum());
                        for &(o, len) in &segs {
                            v.extend_from_slice(&buffer[o..o + len]);
                        }
                        Ok(v)
                    }
                    (r, _) => r,
                }
            })
            .collect();
        (results, latencies)
    }

    /// Sends the requests, kicks the queues and disconnects without waiting
    /// for any completion, as a crashing client would.
    pub fn abandon(mut self, ops: &[(usize, Op)]) {
        let layout = self.layout(ops);
        let (_iovecs, _, _) = self.enqueue(ops, &layout);
        for queue in &mut self.queues {
            let _ = queue.do_io(&mut [], 0, None, None);
        }
    }

    fn one(&mut self, q: usize, op: Op) -> OpResult {
        self.run(&[(q, op)]).pop().unwrap()
    }

    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.read_on(0, offset, len)
    }

    pub fn read_on(&mut self, q: usize, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.one(q, Op::Read { offset, len })
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.write_on(0, offset, data)
    }

    pub fn write_on(&mut self, q: usize, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let data = data.to_vec();
        self.one(q, Op::Write { offset, data }).map(drop)
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        self.one(0, Op::Flush).map(drop)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        self.one(0, Op::Discard { offset, len }).map(drop)
    }

    /// Write-zeroes; `unmap` false sends blkio's `ReqFlags::NO_UNMAP`.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Errno> {
        self.one(0, Op::WriteZeroes { offset, len, unmap })
            .map(drop)
    }
}

// ---------------------------------------------------------------------------
// RawClient
// ---------------------------------------------------------------------------

use virtio_driver::{
    VhostUser, VirtioBlkFeatureFlags, VirtioBlkQueue, VirtioBlkTransport, VirtioFeatureFlags,
};

/// One virtqueue driven through `virtio-driver` with none of blkio's checks:
/// it negotiates every feature the device offers (RO included) and then sends
/// whatever it is told to.
pub struct RawClient {
    // Drop order: the queue (which points into the transport's ring memory)
    // first, then the transport, then the buffer mapping.
    queue: VirtioBlkQueue<'static, usize>,
    transport: Box<VirtioBlkTransport>,
    buf: *mut u8,
    buf_len: usize,
    _memfd: File,
    next_id: usize,
}

impl RawClient {
    pub fn connect(socket: &Path) -> std::io::Result<RawClient> {
        let features = VirtioFeatureFlags::VERSION_1.bits()
            | VirtioFeatureFlags::RING_EVENT_IDX.bits()
            | (VirtioBlkFeatureFlags::SIZE_MAX
                | VirtioBlkFeatureFlags::SEG_MAX
                | VirtioBlkFeatureFlags::RO
                | VirtioBlkFeatureFlags::BLK_SIZE
                | VirtioBlkFeatureFlags::FLUSH
                | VirtioBlkFeatureFlags::TOPOLOGY
                | VirtioBlkFeatureFlags::MQ
                | VirtioBlkFeatureFlags::DISCARD
                | VirtioBlkFeatureFlags::WRITE_ZEROES
                | VirtioBlkFeatureFlags::CONFIG_WCE)
                .bits();
        let path = socket.to_str().unwrap();
        let deadline = Instant::now() + READY_TIMEOUT;
        let vhost = loop {
            match VhostUser::new(path, features) {
                Ok(v) => break v,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(e),
            }
        };
        let mut transport: Box<VirtioBlkTransport> = Box::new(vhost);
        let mut queues = VirtioBlkQueue::<usize>::setup_queues(&mut *transport, 1, 16)?;
        let queue = queues.pop().unwrap();

        let buf_len = 1 << 20;
        // SAFETY: plain libc calls with valid arguments; results are checked.
        let (memfd, buf) = unsafe {
            let fd = libc::memfd_create(c"vdisk-raw-client".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let memfd = <File as std::os::unix::io::FromRawFd>::from_raw_fd(fd);
            memfd.set_len(buf_len as u64)?;
            let p = libc::mmap(
                std::ptr::null_mut(),
                buf_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            );
            if p == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            (memfd, p as *mut u8)
        };
        transport.map_mem_region(buf as usize, buf_len, memfd.as_raw_fd(), 0)?;
        Ok(RawClient {
            queue,
            transport,
            buf,
            buf_len,
            _memfd: memfd,
            next_id: 0,
        })
    }

    /// The features both sides agreed on.
    pub fn features(&self) -> VirtioBlkFeatureFlags {
        VirtioBlkFeatureFlags::from_bits_truncate(self.transport.get_features())
    }

    fn wait(&mut self) -> i32 {
        self.wait_for(true)
    }

    /// Waits for the request just queued, kicking the device first when
    /// `kick`; without a kick only the device's own rescan finds it.
    fn wait_for(&mut self, kick: bool) -> i32 {
        let id = self.next_id;
        self.next_id += 1;
        if kick {
            self.transport
                .get_submission_notifier(0)
                .notify()
                .expect("kick");
        }
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(c) = self.queue.completions().next() {
                assert_eq!(c.context, id, "unexpected completion");
                return c.ret;
            }
            assert!(
                Instant::now() < deadline,
                "raw request unanswered after {IO_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn result(ret: i32) -> Result<(), Errno> {
        if ret == 0 {
            Ok(())
        } else {
            Err(Errno::from_raw_os_error(-ret))
        }
    }

    /// Reads `len` bytes (any length, even not a whole number of sectors).
    pub fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        self.read_via(offset, len, 0)
    }

    /// Reads into a buffer that starts `buf_off` bytes into the shared
    /// memory (an odd `buf_off` gives a buffer with no alignment at all).
    pub fn read_via(&mut self, offset: u64, len: usize, buf_off: usize) -> Result<Vec<u8>, Errno> {
        assert!(buf_off + len <= self.buf_len);
        let id = self.next_id;
        // SAFETY: `buf` maps `buf_len >= buf_off + len` bytes, shared with
        // the device.
        let buf = unsafe { self.buf.add(buf_off) };
        // SAFETY: as above.
        unsafe { self.queue.read_raw(offset, buf, len, id) }.expect("enqueue");
        Self::result(self.wait())?;
        // SAFETY: as above; the request has completed.
        Ok(unsafe { std::slice::from_raw_parts(buf, len) }.to_vec())
    }

    /// Writes `data` (any length) whether or not the device is read-only.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.write_via(offset, data, 0)
    }

    /// Writes from a buffer `buf_off` bytes into the shared memory.
    pub fn write_via(&mut self, offset: u64, data: &[u8], buf_off: usize) -> Result<(), Errno> {
        assert!(buf_off + data.len() <= self.buf_len);
        let id = self.next_id;
        // SAFETY: `buf` maps `buf_len >= buf_off + data.len()` bytes;
        // nothing is in flight.
        unsafe {
            let buf = self.buf.add(buf_off);
            std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len());
            self.queue.write_raw(offset, buf, data.len(), id)
        }
        .expect("enqueue");
        Self::result(self.wait())
    }

    /// Writes `data` at `offset` without kicking the device, as a
    /// frontend that reconnected after a daemon restart leaves the requests
    /// its guest had offered before.
    pub fn write_unkicked(&mut self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        assert!(data.len() <= self.buf_len);
        let id = self.next_id;
        // SAFETY: `buf` maps `buf_len >= data.len()` bytes; nothing is in
        // flight.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.buf, data.len());
            self.queue.write_raw(offset, self.buf, data.len(), id)
        }
        .expect("enqueue");
        Self::result(self.wait_for(false))
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), Errno> {
        let id = self.next_id;
        self.queue.discard(offset, len, id).expect("enqueue");
        Self::result(self.wait())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), Errno> {
        let id = self.next_id;
        self.queue
            .write_zeroes(offset, len, unmap, id)
            .expect("enqueue");
        Self::result(self.wait())
    }

    pub fn flush(&mut self) -> Result<(), Errno> {
        let id = self.next_id;
        self.queue.flush(id).expect("enqueue");
        Self::result(self.wait())
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        // SAFETY: `buf` was mapped with `buf_len` bytes in `connect`. The
        // daemon has its own mapping of the memfd, so unmapping ours while
        // it still holds one is harmless.
        unsafe { libc::munmap(self.buf.cast(), self.buf_len) };
    }
}

// ---------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------

/// Which server a [`Daemon`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    Vdiskd,
    /// qemu-storage-daemon, the reference implementation of the protocol.
    Qsd,
}

impl Server {
    /// `VDISK_TEST_SERVER=qsd` runs the tests against qemu-storage-daemon,
    /// to check the tests themselves; anything else (the default) vdiskd.
    pub fn from_env() -> Server {
        match std::env::var("VDISK_TEST_SERVER").as_deref() {
            Ok("qsd") => Server::Qsd,
            _ => Server::Vdiskd,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Server::Vdiskd => "vdiskd",
            Server::Qsd => "qsd",
        }
    }
}

/// What an export serves.
#[derive(Clone, Debug)]
pub enum Backing {
    File(PathBuf),
    /// A null device of this many bytes: reads return zeros.
    Null(u64),
}

/// One `--export`, in terms both servers understand.
#[derive(Clone, Debug)]
pub struct Export {
    pub socket: PathBuf,
    pub backing: Backing,
    pub queues: Option<u16>,
    pub readonly: bool,
    pub block_size: Option<u32>,
    pub serial: Option<String>,
    pub direct: Option<bool>,
}

impl Export {
    pub fn file(socket: impl Into<PathBuf>, file: impl Into<PathBuf>) -> Export {
        Export::new(socket.into(), Backing::File(file.into()))
    }

    pub fn null(socket: impl Into<PathBuf>, size: u64) -> Export {
        Export::new(socket.into(), Backing::Null(size))
    }

    fn new(socket: PathBuf, backing: Backing) -> Export {
        Export {
            socket,
            backing,
            queues: None,
            readonly: false,
            block_size: None,
            serial: None,
            direct: None,
        }
    }

    pub fn queues(mut self, n: u16) -> Self {
        self.queues = Some(n);
        self
    }

    pub fn readonly(mut self) -> Self {
        self.readonly = true;
        self
    }

    pub fn block_size(mut self, size: u32) -> Self {
        self.block_size = Some(size);
        self
    }

    pub fn serial(mut self, serial: &str) -> Self {
        self.serial = Some(serial.to_string());
        self
    }

    pub fn direct(mut self, on: bool) -> Self {
        self.direct = Some(on);
        self
    }

    /// The `--export` value for vdiskd.
    pub fn vdiskd_spec(&self) -> String {
        let mut spec = format!("socket={}", self.socket.display());
        match &self.backing {
            Backing::File(p) => spec += &format!(",file={}", p.display()),
            Backing::Null(size) => spec += &format!(",null={}", size_arg(*size)),
        }
        if let Some(n) = self.queues {
            spec += &format!(",queues={n}");
        }
        if self.readonly {
            spec += ",readonly=on";
        }
        if let Some(s) = &self.serial {
            spec += &format!(",serial={s}");
        }
        if let Some(bs) = self.block_size {
            spec += &format!(",block-size={bs}");
        }
        if let Some(d) = self.direct {
            spec += if d { ",direct=on" } else { ",direct=off" };
        }
        spec
    }

    /// The `--blockdev` and `--export` arguments for qemu-storage-daemon.
    /// Files use io_uring and the page cache (`aio=io_uring,cache.direct=off`
    /// unless `direct` is on) and pass discards down (`discard=unmap`).
    pub fn qsd_args(&self, idx: usize) -> Vec<String> {
        let node = format!("n{idx}");
        let ro = if self.readonly { "on" } else { "off" };
        let blockdev = match &self.backing {
            Backing::File(p) => format!(
                "driver=file,node-name={node},filename={},aio=io_uring,cache.direct={},\
                 discard=unmap,read-only={ro}",
                p.display(),
                if self.direct == Some(true) {
                    "on"
                } else {
                    "off"
                }
            ),
            Backing::Null(size) => {
                format!("driver=null-co,node-name={node},size={size},read-zeroes=on,read-only={ro}")
            }
        };
        let mut export = format!(
            "type=vhost-user-blk,id=e{idx},node-name={node},addr.type=unix,addr.path={},\
             writable={}",
            self.socket.display(),
            if self.readonly { "off" } else { "on" }
        );
        if let Some(n) = self.queues {
            export += &format!(",num-queues={n}");
        }
        if let Some(bs) = self.block_size {
            export += &format!(",logical-block-size={bs}");
        }
        vec!["--blockdev".into(), blockdev, "--export".into(), export]
    }
}

/// How to run a [`Daemon`] beyond its exports.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// `VDISK_LOG` for vdiskd (default `debug`, or the caller's `VDISK_LOG`).
    pub log: String,
    /// Run under `taskset -c CPUS` (the pid stays the daemon's: taskset execs).
    pub cpus: Option<String>,
    /// Extra arguments appended to the command line.
    pub extra_args: Vec<String>,
}

impl Default for DaemonOptions {
    fn default() -> Self {
        DaemonOptions {
            log: std::env::var("VDISK_LOG").unwrap_or_else(|_| "debug".into()),
            cpus: None,
            extra_args: Vec::new(),
        }
    }
}

/// A running vdiskd or qemu-storage-daemon. Dropping it stops the daemon
/// (SIGTERM, then SIGKILL), and prints its log if the thread is panicking.
pub struct Daemon {
    server: Server,
    exports: Vec<Export>,
    opts: DaemonOptions,
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
    starts: u32,
}

/// The vdiskd binary cargo built for this test or bench, or `VDISKD_BIN`
/// (to run the tests against an installed or instrumented build).
pub fn vdiskd_bin() -> PathBuf {
    std::env::var_os("VDISKD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_vdiskd")))
}

impl Daemon {
    /// Starts `server` with `exports`, keeping its state, control socket and
    /// log under `dir` (which must outlive the daemon), and waits until every
    /// export's socket exists.
    pub fn start(server: Server, dir: &Path, exports: Vec<Export>) -> Daemon {
        Daemon::start_with(server, dir, exports, DaemonOptions::default())
    }

    pub fn start_with(
        server: Server,
        dir: &Path,
        exports: Vec<Export>,
        opts: DaemonOptions,
    ) -> Daemon {
        let mut d = Daemon {
            server,
            exports,
            opts,
            dir: dir.to_path_buf(),
            child: None,
            log: PathBuf::new(),
            starts: 0,
        };
        d.spawn();
        d
    }

    pub fn server(&self) -> Server {
        self.server
    }

    pub fn exports(&self) -> &[Export] {
        &self.exports
    }

    /// The socket of export `i`.
    pub fn socket(&self, i: usize) -> &Path {
        &self.exports[i].socket
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Connects a client to export `i`.
    pub fn connect(&self, i: usize, queues: usize) -> Client {
        self.connect_with(i, &ClientOptions::queues(queues))
    }

    pub fn connect_with(&self, i: usize, opts: &ClientOptions) -> Client {
        Client::connect_with(self.socket(i), opts).unwrap_or_else(|e| {
            panic!(
                "connect to {} export {i} ({}): {e} (errno {})",
                self.server.name(),
                self.socket(i).display(),
                e.errno()
            )
        })
    }

    fn command(&self) -> Command {
        let mut args: Vec<String> = Vec::new();
        let program = match self.server {
            Server::Vdiskd => {
                let state = self.dir.join("state");
                args.push("--state-dir".into());
                args.push(state.display().to_string());
                args.push("--control".into());
                args.push(self.dir.join("control.sock").display().to_string());
                for e in &self.exports {
                    args.push("--export".into());
                    args.push(e.vdiskd_spec());
                }
                vdiskd_bin()
            }
            Server::Qsd => {
                for (i, e) in self.exports.iter().enumerate() {
                    args.extend(e.qsd_args(i));
                }
                PathBuf::from("qemu-storage-daemon")
            }
        };
        args.extend(self.opts.extra_args.iter().cloned());
        let mut cmd = match &self.opts.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(&args).env("VDISK_LOG", &self.opts.log);
        cmd
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        self.log = self
            .dir
            .join(format!("{}-{}.log", self.server.name(), self.starts));
        let log = File::create(&self.log).expect("create daemon log");
        let mut cmd = self.command();
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until every export's socket file exists (a stale file from a
    /// previous run also counts; [`Client::connect_with`] retries a refused
    /// connection, so that is enough).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "{} exited during start-up with {status}; log:\n{}",
                    self.server.name(),
                    self.log()
                );
            }
            if self.exports.iter().all(|e| e.socket.exists()) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: sockets not created after {READY_TIMEOUT:?}; log:\n{}",
                    self.server.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) on our own child, which has not been reaped yet
        // (the Child is still held), so the pid cannot have been reused.
        unsafe { libc::kill(pid, sig) };
    }

    /// Sends SIGTERM and waits for the exit; panics if the daemon does not
    /// exit within [`STOP_TIMEOUT`].
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if Instant::now() > deadline {
                self.signal(libc::SIGKILL);
                let _ = self.child.take().unwrap().wait();
                panic!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM; log:\n{}",
                    self.server.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, and assert that the exit status is 0.
    pub fn stop_ok(&mut self) {
        let status = self.stop();
        assert!(
            status.success(),
            "{} exited with {status} after SIGTERM; log:\n{}",
            self.server.name(),
            self.log()
        );
    }

    /// SIGKILL and reap, as a crash would.
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.take().unwrap().wait();
    }

    /// Stops the daemon cleanly (exit status 0 required) and starts it again
    /// with the same arguments.
    pub fn restart(&mut self) {
        self.stop_ok();
        self.spawn();
    }

    /// Starts the daemon again after [`Daemon::stop`] or [`Daemon::kill`].
    pub fn start_again(&mut self) {
        self.spawn();
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                self.signal(libc::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(5);
                let child = self.child.as_mut().unwrap();
                while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if child.try_wait().ok().flatten().is_none() {
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!(
                "---- {} log ({}), last {} lines ----",
                self.server.name(),
                self.log.display(),
                tail.len()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A size as vdiskd's `null=` takes it: `1G`, `64M`, `4K` or plain bytes.
pub fn size_arg(size: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if size != 0 && size.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", size >> shift);
        }
    }
    size.to_string()
}

// ---------------------------------------------------------------------------
// Data helpers
// ---------------------------------------------------------------------------

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn make_file(path: &Path, size: u64) -> PathBuf {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
    path.to_path_buf()
}

/// Deterministic bytes that depend on the seed and on the disk offset of
/// each 8-byte word, so that data written to the wrong place is noticed.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    assert_eq!(offset % 8, 0);
    let mut out = Vec::with_capacity(len + 8);
    let mut word = offset / 8;
    while out.len() < len {
        // splitmix64 of (seed, word)
        let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(word);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
        word += 1;
    }
    out.truncate(len);
    out
}

/// Reads `len` bytes at `offset` of a file on the host.
pub fn read_host(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// Asserts two buffers are equal, reporting the first difference rather
/// than dumping megabytes.
#[track_caller]
pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i} (sector {}): got {:02x?}, want {:02x?}",
            i / 512,
            &got[i..(i + 16).min(got.len())],
            &want[i..(i + 16).min(want.len())]
        );
    }
}

/// Asserts a buffer is all zeros.
#[track_caller]
pub fn assert_zeros(got: &[u8], what: &str) {
    if let Some(i) = got.iter().position(|&b| b != 0) {
        panic!("{what}: non-zero byte {:#04x} at {i}", got[i]);
    }
}
