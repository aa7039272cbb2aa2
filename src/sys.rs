//! The one home of `unsafe` outside the io_uring submission path: thin,
//! checked wrappers over the libc calls that std does not expose.
//!
//! Every function here takes plain Rust values and returns `io::Result`;
//! callers never see a raw pointer they must keep alive, except through
//! [`IoSlice`], whose contract is spelled out on the type.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// One contiguous piece of host memory taking part in an I/O: layout
/// compatible with `struct iovec`, so a `&[IoSlice]` can be handed to the
/// kernel as an iovec array.
///
/// It is only an address and a length: holding one keeps nothing alive. The
/// owner of the memory (for guest memory, an `Arc` of the guest memory map
/// held by the request in flight) must outlive every I/O that uses it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoSlice {
    pub base: usize,
    pub len: usize,
}

const _: () = assert!(std::mem::size_of::<IoSlice>() == std::mem::size_of::<libc::iovec>());
const _: () = assert!(std::mem::align_of::<IoSlice>() == std::mem::align_of::<libc::iovec>());

impl IoSlice {
    /// The iovec array the kernel reads.
    pub fn as_iovecs(slices: &[IoSlice]) -> *const libc::iovec {
        slices.as_ptr().cast()
    }
}

/// The most iovecs one system call takes (UIO_MAXIOV); longer lists are
/// transferred in several calls.
pub const IOV_MAX: usize = 1024;

fn cvt(ret: isize) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// `preadv(2)`. The caller guarantees that `iov` describes writable memory
/// that stays mapped for the duration of the call (it is synchronous).
///
/// # Safety
/// Every `IoSlice` must describe memory that is valid for writes of its
/// length and not accessed through a Rust reference during the call.
pub unsafe fn preadv(fd: BorrowedFd<'_>, iov: &[IoSlice], offset: u64) -> io::Result<usize> {
    let cnt = iov.len().min(IOV_MAX) as libc::c_int;
    // SAFETY: the caller guarantees the iovecs describe valid writable
    // memory; IoSlice is layout-compatible with iovec (checked above).
    let ret = unsafe { libc::preadv(fd.as_raw_fd(), IoSlice::as_iovecs(iov), cnt, offset as i64) };
    cvt(ret as isize)
}

/// `pwritev2(2)`, with `RWF_DSYNC` when `dsync` is set.
///
/// # Safety
/// Every `IoSlice` must describe memory that is valid for reads of its
/// length for the duration of the call.
pub unsafe fn pwritev(
    fd: BorrowedFd<'_>,
    iov: &[IoSlice],
    offset: u64,
    dsync: bool,
) -> io::Result<usize> {
    let cnt = iov.len().min(IOV_MAX) as libc::c_int;
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: the caller guarantees the iovecs describe valid readable
    // memory; IoSlice is layout-compatible with iovec (checked above).
    let ret = unsafe {
        libc::pwritev2(
            fd.as_raw_fd(),
            IoSlice::as_iovecs(iov),
            cnt,
            offset as i64,
            flags,
        )
    };
    cvt(ret as isize)
}

/// Fill the memory the slices describe with zeros.
///
/// # Safety
/// Every `IoSlice` must describe memory valid for writes of its length.
pub unsafe fn zero_fill(iov: &[IoSlice]) {
    for s in iov {
        // SAFETY: guaranteed by the caller: valid for writes of `len` bytes.
        unsafe { std::ptr::write_bytes(s.base as *mut u8, 0, s.len) };
    }
}

/// `fallocate(2)`.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes no pointers; an invalid fd or range is
    // reported through errno.
    let ret = unsafe { libc::fallocate(fd.as_raw_fd(), mode, offset as i64, len as i64) };
    cvt(ret as isize).map(|_| ())
}

/// Memory and offset alignment that O_DIRECT I/O on this file needs, from
/// `statx(STATX_DIOALIGN)` (Linux 6.1+). `None` when the kernel or the
/// filesystem does not say.
pub fn dio_alignment(fd: BorrowedFd<'_>) -> Option<(u32, u32)> {
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid NUL-terminated string and `stx` a valid,
    // writable statx buffer that outlives the call.
    let ret = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if ret != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_mem_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align, stx.stx_dio_offset_align))
}

/// Size in bytes of a block device (`BLKGETSIZE64`).
pub fn block_device_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer given, which is
    // valid for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
    cvt(ret as isize).map(|_| size)
}

/// `_IOR(0x12, 114, size_t)` from <linux/fs.h>.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Copy `dst.len()` bytes out of the memory the slices describe, starting
/// `skip` bytes in.
///
/// # Safety
/// Every `IoSlice` must describe memory valid for reads of its length for
/// the duration of the call.
pub unsafe fn copy_from_slices(iov: &[IoSlice], mut skip: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for s in iov {
        if done == dst.len() {
            break;
        }
        if skip >= s.len {
            skip -= s.len;
            continue;
        }
        let n = (s.len - skip).min(dst.len() - done);
        // SAFETY: the caller guarantees `s` is readable for `s.len` bytes,
        // and `skip + n <= s.len`; `dst[done..done + n]` is in bounds.
        unsafe {
            std::ptr::copy_nonoverlapping((s.base + skip) as *const u8, dst[done..].as_mut_ptr(), n)
        };
        done += n;
        skip = 0;
    }
    done
}

/// The pids of the peers connected to this process's Unix stream sockets
/// bound to `path` (SO_PEERCRED): the frontends of an export's socket,
/// which vhost-user-backend accepts without handing out the stream. The
/// listening socket itself reports this process and is left out.
pub fn unix_socket_peers(path: &std::path::Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let want = path.as_os_str().as_bytes();
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .map(|l| l.as_os_str().as_bytes().starts_with(b"socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        // SAFETY: getsockname(2) writes at most `len` bytes into `addr`. The
        // fd may have been closed (or reused) since it was listed; then the
        // call fails or describes another socket, and the path check below
        // sorts that out. Nothing is written to the fd.
        let rc =
            unsafe { libc::getsockname(fd, (&raw mut addr).cast::<libc::sockaddr>(), &mut len) };
        if rc != 0 || addr.sun_family != libc::AF_UNIX as libc::sa_family_t {
            continue;
        }
        let path_len = (len as usize)
            .saturating_sub(std::mem::size_of::<libc::sa_family_t>())
            .min(addr.sun_path.len());
        let got: Vec<u8> = addr.sun_path[..path_len]
            .iter()
            .map(|&c| c as u8)
            .take_while(|&c| c != 0)
            .collect();
        if got != want {
            continue;
        }
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut clen = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt(2) writes at most `clen` bytes into `cred`;
        // as above, a stale fd only makes the call fail or answer for
        // another socket bound to the same path.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&raw mut cred).cast::<libc::c_void>(),
                &mut clen,
            )
        };
        if rc == 0 && cred.pid > 0 && cred.pid as u32 != me {
            out.push(cred.pid as u32);
        }
    }
    out
}

/// Make the calling thread yield to everything else: nice 19, and the idle
/// I/O class where the I/O scheduler honours it. For background work (the
/// pool's filler) that must not take time from the guests' queues. Best
/// effort: a failure is logged and ignored.
pub fn background_thread() {
    // SAFETY: gettid(2) has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: setpriority(2) on this thread's own id, with a valid
    // priority; it changes nothing but this thread's scheduling.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, 19) } != 0 {
        log::debug!("nice 19: {}", io::Error::last_os_error());
    }
    // ioprio_set(IOPRIO_WHO_PROCESS, tid, IOPRIO_CLASS_IDLE << 13).
    const IOPRIO_WHO_PROCESS: libc::c_long = 1;
    const IOPRIO_CLASS_IDLE: libc::c_long = 3;
    // SAFETY: ioprio_set(2) with this thread's id and a valid class; it
    // only changes this thread's I/O priority.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            tid as libc::c_long,
            IOPRIO_CLASS_IDLE << 13,
        )
    };
    if rc != 0 {
        log::debug!("idle I/O class: {}", io::Error::last_os_error());
    }
}
