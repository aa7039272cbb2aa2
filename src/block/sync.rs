//! The synchronous engine: each operation runs to completion inside
//! `push`, on the worker thread, and its completion is queued. Slower than
//! io_uring but simple, portable and deterministic: used by tests and where
//! io_uring is unavailable. Without a file it is the null engine: reads
//! return zeros, everything else succeeds at once (the protocol floor for
//! benchmarks).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::{fallocate_mode, is_unsupported, zero_range_slow, DirectFile};
use super::{failpoint, BlockError, Completion, Engine, FlushLatch, Op, OpKind};
use crate::sys;

pub struct SyncEngine {
    /// `None`: the null device.
    file: Option<Arc<File>>,
    direct: Option<DirectFile>,
    done: VecDeque<Completion>,
    event: EventFd,
    depth: usize,
    write_through: bool,
    /// `None`: the null device, which has nothing to flush.
    latch: Option<Arc<FlushLatch>>,
}

impl SyncEngine {
    pub(super) fn new(
        file: Arc<File>,
        direct: Option<DirectFile>,
        depth: usize,
        event: EventFd,
        latch: Arc<FlushLatch>,
    ) -> Result<Self, BlockError> {
        Ok(SyncEngine {
            file: Some(file),
            direct,
            done: VecDeque::with_capacity(depth),
            event,
            depth,
            write_through: false,
            latch: Some(latch),
        })
    }

    /// The null device: nothing behind it.
    pub fn null(depth: usize) -> Result<Self, BlockError> {
        Ok(SyncEngine {
            file: None,
            direct: None,
            done: VecDeque::with_capacity(depth),
            event: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            depth,
            write_through: false,
            latch: None,
        })
    }

    /// A data sync through the disk's latch.
    fn sync(&self, file: &File) -> io::Result<()> {
        let r = failpoint::sync_data(file);
        match &self.latch {
            Some(l) => l.pass(r),
            None => r,
        }
    }

    fn run(&self, op: &mut Op) -> io::Result<u64> {
        let Some(file) = &self.file else {
            if op.kind == OpKind::Read {
                // SAFETY: the caller of `push` guarantees the slices
                // describe writable memory that stays alive until the
                // completion is reaped, which is after this call.
                unsafe { sys::zero_fill(&op.iov) };
            }
            return Ok(op.len);
        };
        match op.kind {
            OpKind::Read | OpKind::Write => self.transfer(file, op),
            OpKind::Flush => self.sync(file).map(|_| 0),
            OpKind::Discard | OpKind::WriteZeroes { .. } => {
                let unmap = !matches!(op.kind, OpKind::WriteZeroes { unmap: false });
                let n = zero(file, op.offset, op.len, unmap)?;
                // Write-through: the range is durable before it completes.
                if self.write_through {
                    self.sync(file)?;
                }
                Ok(n)
            }
        }
    }

    /// Loop until the whole request moved: preadv/pwritev may be short.
    fn transfer(&self, file: &File, op: &mut Op) -> io::Result<u64> {
        let fd = match &self.direct {
            Some(d) if d.fits(op.offset, &op.iov) => d.file.as_fd(),
            _ => file.as_fd(),
        };
        let mut iov = op.iov.clone();
        let mut offset = op.offset;
        let mut total = 0u64;
        while !iov.is_empty() {
            // SAFETY: the caller of `push` keeps the memory the slices
            // describe alive and unaliased until the completion is reaped,
            // which is after this synchronous call returns.
            let n = unsafe {
                if op.kind == OpKind::Read {
                    sys::preadv(fd, &iov, offset)?
                } else {
                    sys::pwritev(fd, &iov, offset, self.write_through)?
                }
            };
            if n == 0 {
                // A read past the end of a file that shrank underneath us.
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            total += n as u64;
            offset += n as u64;
            advance(&mut iov, n);
        }
        Ok(total)
    }
}

fn zero(file: &File, offset: u64, len: u64, unmap: bool) -> io::Result<u64> {
    match sys::fallocate(file.as_fd(), fallocate_mode(unmap), offset, len) {
        Ok(()) => Ok(len),
        Err(e) if is_unsupported(&e) => {
            zero_range_slow(file.as_fd(), file, offset, len, unmap).map(|_| len)
        }
        Err(e) => Err(e),
    }
}

/// Drop the first `n` bytes from a scatter-gather list.
pub(super) fn advance(iov: &mut Vec<sys::IoSlice>, mut n: usize) {
    let mut skip = 0;
    for s in iov.iter_mut() {
        if n >= s.len {
            n -= s.len;
            skip += 1;
        } else {
            s.base += n;
            s.len -= n;
            break;
        }
    }
    iov.drain(..skip);
}

impl Engine for SyncEngine {
    fn push(&mut self, mut op: Op, user_data: u64) -> Result<(), (BlockError, Op)> {
        if self.done.len() >= self.depth {
            return Err((BlockError::QueueFull, op));
        }
        let result = self.run(&mut op);
        self.done.push_back(Completion { user_data, result });
        Ok(())
    }

    fn submit(&mut self) -> Result<(), BlockError> {
        // Everything completed inside `push`; the caller reaps right after
        // submit (the Engine contract), so no wake-up is needed.
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.extend(self.done.drain(..));
    }

    fn wait(&mut self) -> Result<(), BlockError> {
        Ok(())
    }

    fn notifier(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn ack_notifier(&self) {
        let _ = self.event.read();
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn capacity(&self) -> usize {
        self.depth
    }

    fn name(&self) -> &'static str {
        if self.file.is_some() {
            "sync"
        } else {
            "null"
        }
    }

    fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }
}
