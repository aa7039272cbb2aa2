//! Per-queue I/O counters: written by the queue's worker only, read by
//! anyone (the control plane, logs). Relaxed atomics: figures, not locks.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
pub struct QueueStats {
    pub reads: Counter,
    pub writes: Counter,
    pub other: Counter,
    pub read_bytes: Counter,
    pub write_bytes: Counter,
    pub errors: Counter,
}

impl QueueStats {
    pub fn record(&self, is_write: bool, is_read: bool, bytes: u64) {
        if is_write {
            self.writes.inc();
            self.write_bytes.add(bytes);
        } else if is_read {
            self.reads.inc();
            self.read_bytes.add(bytes);
        } else {
            self.other.inc();
        }
    }
}

/// A snapshot summed over queues.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub other: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
}

impl StatsSnapshot {
    pub fn sum<'a>(queues: impl IntoIterator<Item = &'a QueueStats>) -> Self {
        queues.into_iter().fold(Self::default(), |mut s, q| {
            s.reads += q.reads.get();
            s.writes += q.writes.get();
            s.other += q.other.get();
            s.read_bytes += q.read_bytes.get();
            s.write_bytes += q.write_bytes.get();
            s.errors += q.errors.get();
            s
        })
    }
}
