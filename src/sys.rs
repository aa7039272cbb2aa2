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
