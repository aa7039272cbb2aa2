//! The block layer: one engine trait with asynchronous submission and polled
//! completion, and the disks it runs on.
//!
//! This layer knows nothing of virtio, sockets or JSON. An operation is a
//! byte range plus, for reads and writes, a scatter-gather list of host
//! memory ([`IoSlice`]). The caller keeps that memory alive until the
//! operation's [`Completion`] comes back; an engine never frees or forgets
//! an operation the kernel may still be working on (dropping an engine
//! waits for everything in flight).

mod disk;
pub(crate) mod failpoint;
mod latch;
mod overlay;
mod sync;
mod uring;

use std::io;
use std::os::fd::RawFd;

pub use disk::{Disk, DiskSource, EngineKind, GrowError, OpenOptions};
pub use latch::{FlushLatch, LatchObserver};
pub use overlay::{Overlay, OverlayEngine, OverlayError, CLUSTER_SIZE};
pub use sync::SyncEngine;
pub use uring::UringEngine;

pub use crate::sys::IoSlice;

/// Errors of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open {path}")]
    Open { path: String, source: io::Error },
    #[error("cannot determine the size of {path}")]
    Size { path: String, source: io::Error },
    #[error("{path} is empty or its size ({size} bytes) is not a multiple of 512")]
    BadSize { path: String, size: u64 },
    #[error("cannot set up io_uring")]
    Uring(#[source] io::Error),
    #[error("{path}: engine=io-uring was asked for, but io_uring is not usable on this kernel (disabled, or blocked by seccomp); use engine=sync, or leave the engine out to fall back")]
    EngineUnavailable { path: String },
    #[error("cannot create the completion eventfd")]
    EventFd(#[source] io::Error),
    #[error("the engine's submission queue is full")]
    QueueFull,
    #[error("submitting to the kernel failed")]
    Submit(#[source] io::Error),
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// Read `len` bytes at `offset` into the slices.
    Read,
    /// Write the slices' `len` bytes at `offset`.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Deallocate the range; it reads back as zeros.
    Discard,
    /// Zero the range; with `unmap` the engine may deallocate it.
    WriteZeroes { unmap: bool },
}

/// One operation, owned by the engine from submission to completion.
#[derive(Debug)]
pub struct Op {
    pub kind: OpKind,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Byte length; for reads and writes, the sum of the slices' lengths.
    pub len: u64,
    /// Host memory for reads and writes; empty otherwise.
    pub iov: Vec<IoSlice>,
}

impl Op {
    pub fn read(offset: u64, iov: Vec<IoSlice>) -> Self {
        let len = iov.iter().map(|s| s.len as u64).sum();
        Op {
            kind: OpKind::Read,
            offset,
            len,
            iov,
        }
    }

    pub fn write(offset: u64, iov: Vec<IoSlice>) -> Self {
        let len = iov.iter().map(|s| s.len as u64).sum();
        Op {
            kind: OpKind::Write,
            offset,
            len,
            iov,
        }
    }

    pub fn flush() -> Self {
        Op {
            kind: OpKind::Flush,
            offset: 0,
            len: 0,
            iov: Vec::new(),
        }
    }

    pub fn discard(offset: u64, len: u64) -> Self {
        Op {
            kind: OpKind::Discard,
            offset,
            len,
            iov: Vec::new(),
        }
    }

    pub fn write_zeroes(offset: u64, len: u64, unmap: bool) -> Self {
        Op {
            kind: OpKind::WriteZeroes { unmap },
            offset,
            len,
            iov: Vec::new(),
        }
    }
}

/// The outcome of one operation: bytes transferred, or the OS error.
#[derive(Debug)]
pub struct Completion {
    pub user_data: u64,
    pub result: io::Result<u64>,
}

/// A block engine: one per queue worker, never shared between threads.
///
/// Operations are queued with [`push`](Engine::push), handed to the kernel
/// with [`submit`](Engine::submit), and come back through
/// [`reap`](Engine::reap) in any order. Call `reap` right after `submit`:
/// operations that finished before `submit` returned (page-cache hits,
/// synchronous engines) do not signal the notifier. The fd returned by
/// [`notifier`](Engine::notifier) becomes readable when operations finish
/// later; register it with the worker's event loop.
pub trait Engine: Send {
    /// Queue an operation. When the engine is at capacity the operation is
    /// handed back untouched with [`BlockError::QueueFull`].
    fn push(&mut self, op: Op, user_data: u64) -> Result<(), (BlockError, Op)>;
    /// Hand every queued operation to the kernel.
    fn submit(&mut self) -> Result<(), BlockError>;
    /// Move every finished operation's completion to `out`, without blocking.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// Block until at least one operation has finished (or none is in flight).
    fn wait(&mut self) -> Result<(), BlockError>;
    /// An fd that polls readable while completions are waiting.
    fn notifier(&self) -> RawFd;
    /// Clear the notifier after it fired (before reaping).
    fn ack_notifier(&self);
    /// Operations pushed and not yet reaped.
    fn in_flight(&self) -> usize;
    /// How many operations may be in flight at once.
    fn capacity(&self) -> usize;
    /// A short name for logs: "io_uring", "sync", "null".
    fn name(&self) -> &'static str;
    /// Make every write durable before it completes (the guest turned its
    /// write cache off).
    fn set_write_through(&mut self, _on: bool) {}
    /// True when `reap` would return something, without a system call.
    /// Engines that complete inside `push` never have anything late.
    fn has_completions(&mut self) -> bool {
        false
    }
    /// Turn the notifier off while the caller reaps by itself (polling),
    /// and back on before it sleeps. After turning it on, check
    /// `has_completions`: what finished in between signalled nothing.
    fn set_notify(&mut self, _on: bool) {}
}

/// Wait for every operation in flight and throw the completions away: what
/// an engine does before its buffers may be released.
pub fn drain(engine: &mut dyn Engine) {
    let mut sink = Vec::new();
    while engine.in_flight() > 0 {
        if let Err(e) = engine.submit() {
            log::error!("draining the {} engine: {e}", engine.name());
        }
        if let Err(e) = engine.wait() {
            log::error!("draining the {} engine: {e}", engine.name());
            break;
        }
        engine.reap(&mut sink);
        sink.clear();
    }
}

#[cfg(test)]
mod tests;
