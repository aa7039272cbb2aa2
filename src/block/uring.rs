//! The io_uring engine: one ring per queue worker, completions signalled
//! on an eventfd that the worker's epoll loop watches.
//!
//! Each operation lives in a slot from `push` until its last CQE is reaped;
//! the slot index is the SQE's user data. Short transfers are resubmitted
//! for the remainder, so a completion always covers the whole request or
//! reports an error.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};
use vmm_sys_util::eventfd::EventFd;

use super::disk::{fallocate_mode, is_unsupported, zero_range_slow, DirectFile};
use super::sync::advance;
use super::{failpoint, BlockError, Completion, Engine, FlushLatch, Op, OpKind};
use crate::sys::IoSlice;

struct Slot {
    /// The operation; for reads and writes `op.iov` is what is left to
    /// transfer, advanced in place after a short transfer.
    op: Op,
    user_data: u64,
    /// Bytes transferred so far.
    done: u64,
}

pub struct UringEngine {
    ring: IoUring,
    file: Arc<File>,
    direct: Option<DirectFile>,
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    event: EventFd,
    /// Completions produced without the kernel (slow fallbacks).
    ready: VecDeque<Completion>,
    in_flight: usize,
    write_through: bool,
    /// The disk's flush-error latch: a failed fdatasync fails every later
    /// flush.
    latch: Arc<FlushLatch>,
    /// Cleared the first time the filesystem refuses FALLOC_FL_ZERO_RANGE.
    zero_range: bool,
    /// Reused buffer for reaped CQEs.
    cqes: Vec<(u32, i32)>,
}

impl UringEngine {
    /// True when this kernel lets us create a ring with every opcode the
    /// engine uses. Probed once per disk open.
    pub fn supported() -> bool {
        let Ok(ring) = IoUring::new(4) else {
            return false;
        };
        let mut probe = Probe::new();
        if ring.submitter().register_probe(&mut probe).is_err() {
            return false;
        }
        [
            opcode::Readv::CODE,
            opcode::Writev::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ]
        .iter()
        .all(|&c| probe.is_supported(c))
    }

    /// A ring on `file` whose completions signal `event` (which may be
    /// shared with other engines that feed the same worker).
    pub(super) fn new(
        file: Arc<File>,
        direct: Option<DirectFile>,
        depth: usize,
        event: EventFd,
        latch: Arc<FlushLatch>,
    ) -> Result<Self, BlockError> {
        let depth = depth.clamp(1, 4096);
        let ring = IoUring::new(depth.next_power_of_two() as u32).map_err(BlockError::Uring)?;
        // Every CQE signals the eventfd. (IORING_REGISTER_EVENTFD_ASYNC
        // would skip inline page-cache completions, but it only signals
        // completions posted by io-wq workers, so O_DIRECT completions
        // from interrupt context would never wake the worker.)
        ring.submitter()
            .register_eventfd(event.as_raw_fd())
            .map_err(BlockError::Uring)?;
        Ok(UringEngine {
            ring,
            file,
            direct,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as u32).rev().collect(),
            event,
            ready: VecDeque::new(),
            in_flight: 0,
            write_through: false,
            latch,
            zero_range: true,
            cqes: Vec::with_capacity(depth),
        })
    }

    /// Build the SQE for what is left of slot `idx`.
    fn sqe(&self, idx: u32) -> squeue::Entry {
        let slot = self.slots[idx as usize].as_ref().expect("slot in use");
        let op = &slot.op;
        let buffered = types::Fd(self.file.as_raw_fd());
        let entry = match op.kind {
            OpKind::Read | OpKind::Write => {
                let offset = op.offset + slot.done;
                let fd = match &self.direct {
                    Some(d) if d.fits(offset, &op.iov) => types::Fd(d.file.as_raw_fd()),
                    _ => buffered,
                };
                let iov = IoSlice::as_iovecs(&op.iov);
                let cnt = op.iov.len().min(crate::sys::IOV_MAX) as u32;
                if op.kind == OpKind::Read {
                    opcode::Readv::new(fd, iov, cnt).offset(offset).build()
                } else {
                    let flags = if self.write_through {
                        libc::RWF_DSYNC
                    } else {
                        0
                    };
                    opcode::Writev::new(fd, iov, cnt)
                        .offset(offset)
                        .rw_flags(flags)
                        .build()
                }
            }
            OpKind::Flush => opcode::Fsync::new(buffered)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            OpKind::Discard => opcode::Fallocate::new(buffered, op.len)
                .offset(op.offset)
                .mode(fallocate_mode(true))
                .build(),
            OpKind::WriteZeroes { unmap } => opcode::Fallocate::new(buffered, op.len)
                .offset(op.offset)
                .mode(fallocate_mode(unmap || !self.zero_range))
                .build(),
        };
        entry.user_data(u64::from(idx))
    }

    fn queue_sqe(&mut self, idx: u32) -> Result<(), BlockError> {
        let entry = self.sqe(idx);
        loop {
            // SAFETY: the SQE points at `slots[idx].op.iov` (an iovec array
            // whose heap buffer does not move while the slot is occupied)
            // and at the memory those iovecs describe, which the caller of
            // `push` keeps alive until the completion is reaped. The slot
            // is only freed after its CQE arrives, and Drop waits for all
            // CQEs, so the kernel never sees a dangling pointer.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel.
            self.ring.submit().map_err(BlockError::Submit)?;
        }
    }

    fn finish(&mut self, idx: u32, result: io::Result<u64>) {
        if let Some(slot) = self.slots[idx as usize].take() {
            self.free.push(idx);
            self.in_flight -= 1;
            self.ready.push_back(Completion {
                user_data: slot.user_data,
                result,
            });
        }
    }

    fn complete_cqe(&mut self, idx: u32, res: i32) -> Result<(), BlockError> {
        let Some(slot) = self.slots.get_mut(idx as usize).and_then(Option::as_mut) else {
            log::error!("io_uring completion for unknown slot {idx}");
            return Ok(());
        };
        let kind = slot.op.kind;
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            if let OpKind::WriteZeroes { .. } | OpKind::Discard = kind {
                if is_unsupported(&err) {
                    // This filesystem lacks the fallocate mode: take the
                    // slow path once, and avoid ZERO_RANGE from now on.
                    if let OpKind::WriteZeroes { unmap: false } = kind {
                        self.zero_range = false;
                    }
                    let (off, len, unmap) = (
                        slot.op.offset,
                        slot.op.len,
                        !matches!(kind, OpKind::WriteZeroes { unmap: false }),
                    );
                    let r = zero_range_slow(self.file.as_fd(), &self.file, off, len, unmap)
                        .and_then(|()| self.write_through_sync())
                        .map(|()| len);
                    self.finish(idx, r);
                    return Ok(());
                }
            }
            let err = if kind == OpKind::Flush {
                self.latch.trip(err)
            } else {
                err
            };
            self.finish(idx, Err(err));
            return Ok(());
        }
        match kind {
            OpKind::Read | OpKind::Write => {
                let n = res as u64;
                slot.done += n;
                if slot.done >= slot.op.len {
                    let done = slot.done;
                    self.finish(idx, Ok(done));
                } else if n == 0 {
                    // End of file inside the disk: the file shrank.
                    self.finish(idx, Err(io::Error::from_raw_os_error(libc::EIO)));
                } else {
                    advance(&mut slot.op.iov, n as usize);
                    self.queue_sqe(idx)?;
                }
            }
            OpKind::Flush => {
                let r = if failpoint::sync_fails(&self.file) {
                    Err(io::Error::from_raw_os_error(libc::EIO))
                } else {
                    Ok(0)
                };
                // Fails too when another queue's flush tripped the latch.
                let r = self.latch.pass(r);
                self.finish(idx, r);
            }
            OpKind::Discard | OpKind::WriteZeroes { .. } => {
                let len = slot.op.len;
                let r = self.write_through_sync().map(|()| len);
                self.finish(idx, r);
            }
        }
        Ok(())
    }

    /// In write-through mode, a discard or write-zeroes is followed by a
    /// data sync before it completes (synchronously: they are rare, and
    /// a guest without a write cache is waiting for durability anyway).
    fn write_through_sync(&self) -> io::Result<()> {
        if !self.write_through {
            return Ok(());
        }
        self.latch.pass(failpoint::sync_data(&self.file))
    }
}

impl Engine for UringEngine {
    fn push(&mut self, op: Op, user_data: u64) -> Result<(), (BlockError, Op)> {
        let Some(idx) = self.free.pop() else {
            return Err((BlockError::QueueFull, op));
        };
        self.slots[idx as usize] = Some(Slot {
            op,
            user_data,
            done: 0,
        });
        self.in_flight += 1;
        if let Err(e) = self.queue_sqe(idx) {
            self.in_flight -= 1;
            self.free.push(idx);
            let slot = self.slots[idx as usize].take().expect("slot just filled");
            return Err((e, slot.op));
        }
        Ok(())
    }

    fn submit(&mut self) -> Result<(), BlockError> {
        if !self.ring.submission().is_empty() {
            self.ring.submit().map_err(BlockError::Submit)?;
        }
        if !self.ready.is_empty() {
            let _ = self.event.write(1);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        loop {
            let mut cqes = std::mem::take(&mut self.cqes);
            cqes.extend(
                self.ring
                    .completion()
                    .map(|c| (c.user_data() as u32, c.result())),
            );
            if cqes.is_empty() {
                self.cqes = cqes;
                break;
            }
            for &(idx, res) in &cqes {
                if let Err(e) = self.complete_cqe(idx, res) {
                    log::error!("resubmitting a short transfer: {e}");
                    self.finish(idx, Err(io::Error::from_raw_os_error(libc::EIO)));
                }
            }
            cqes.clear();
            self.cqes = cqes;
            // Short transfers were queued again: hand them over and look
            // for completions once more (they may finish inline).
            if !self.ring.submission().is_empty() {
                if let Err(e) = self.ring.submit() {
                    log::error!("io_uring submit: {e}");
                }
            }
        }
        out.extend(self.ready.drain(..));
    }

    fn wait(&mut self) -> Result<(), BlockError> {
        if self.in_flight > 0 && self.ready.is_empty() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(BlockError::Submit(e)),
            }
        }
        Ok(())
    }

    fn notifier(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    fn ack_notifier(&self) {
        let _ = self.event.read();
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn name(&self) -> &'static str {
        "io_uring"
    }

    fn set_write_through(&mut self, on: bool) {
        self.write_through = on;
    }

    fn has_completions(&mut self) -> bool {
        !self.ready.is_empty() || !self.ring.completion().is_empty()
    }

    fn set_notify(&mut self, on: bool) {
        if on {
            self.ring.completion().enable_eventfd();
        } else {
            self.ring.completion().disable_eventfd();
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // The kernel may still write into memory the slots point at: wait
        // for every CQE before the slots (and the buffers they keep) go.
        let mut sink = Vec::new();
        while self.in_flight > self.ready.len() {
            if self.wait().is_err() {
                break;
            }
            self.reap(&mut sink);
            sink.clear();
        }
    }
}
