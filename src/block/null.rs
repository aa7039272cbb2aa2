//! The null engine: reads return zeros, everything else succeeds at once.
//! The protocol floor for benchmarks, and a disk for tests.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BlockError, Completion, Engine, Op, OpKind};
use crate::sys;

pub struct NullEngine {
    done: VecDeque<Completion>,
    event: EventFd,
    depth: usize,
}

impl NullEngine {
    pub fn new(depth: usize) -> Result<Self, BlockError> {
        Ok(NullEngine {
            done: VecDeque::with_capacity(depth),
            event: EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?,
            depth,
        })
    }
}

impl Engine for NullEngine {
    fn push(&mut self, op: Op, user_data: u64) -> Result<(), (BlockError, Op)> {
        if self.done.len() >= self.depth {
            return Err((BlockError::QueueFull, op));
        }
        if op.kind == OpKind::Read {
            // SAFETY: the caller of `push` guarantees the slices describe
            // writable memory that stays alive until the completion is
            // reaped, which is after this call.
            unsafe { sys::zero_fill(&op.iov) };
        }
        self.done.push_back(Completion {
            user_data,
            result: Ok(op.len),
        });
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
        "null"
    }
}
