//! Per-queue I/O counters and a latency histogram: written by the queue's
//! worker only, read by anyone (the control plane, logs). Relaxed atomics:
//! figures, not locks. Readers merge the queues into a [`StatsSnapshot`];
//! two snapshots give the rates and latency percentiles of the interval
//! between them ([`Rates::between`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

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

/// Sub-buckets per power of two: a bucket spans at most 1/8 of its lower
/// bound, so a percentile read from the histogram is within 12.5% of the
/// true value.
const SUB: u32 = 8;
/// Powers of two covered: up to 2^26 us (67 s); slower requests land in
/// the last bucket.
const OCTAVES: u32 = 26;
/// Buckets of the latency histogram.
pub const BUCKETS: usize = (SUB + OCTAVES * SUB) as usize;

/// The bucket of a latency of `us` microseconds: values below [`SUB`] get
/// a bucket each, then each power of two is split into [`SUB`] equal
/// parts.
fn bucket(us: u64) -> usize {
    if us < u64::from(SUB) {
        return us as usize;
    }
    let octave = 63 - us.leading_zeros(); // >= 3
    let shift = octave - SUB.trailing_zeros();
    let sub = ((us >> shift) as u32) - SUB; // 0..SUB
    let i = SUB + (octave - SUB.trailing_zeros()) * SUB + sub;
    (i as usize).min(BUCKETS - 1)
}

/// The smallest latency (us) that falls in bucket `i`.
fn bucket_floor(i: usize) -> u64 {
    let i = i as u32;
    if i < SUB {
        return u64::from(i);
    }
    let octave = (i - SUB) / SUB + SUB.trailing_zeros();
    let sub = (i - SUB) % SUB;
    u64::from(SUB + sub) << (octave - SUB.trailing_zeros())
}

/// The midpoint of bucket `i`, the estimate reported for it.
fn bucket_mid(i: usize) -> u64 {
    let lo = bucket_floor(i);
    let hi = if i + 1 < BUCKETS {
        bucket_floor(i + 1)
    } else {
        lo * 2
    };
    (lo + hi.max(lo + 1) - 1) / 2
}

#[derive(Debug)]
pub struct Histogram([AtomicU64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Histogram {
    pub fn record(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0[bucket(us)].fetch_add(1, Ordering::Relaxed);
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
    /// Latency of reads and writes, from the pass that took the request
    /// off the ring to the reap that completed it.
    pub latency: Histogram,
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub other: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    /// Requests per latency bucket, cumulative.
    pub latency: Box<[u64; BUCKETS]>,
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            reads: 0,
            writes: 0,
            other: 0,
            read_bytes: 0,
            write_bytes: 0,
            errors: 0,
            latency: Box::new([0; BUCKETS]),
        }
    }
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
            for (b, c) in s.latency.iter_mut().zip(&q.latency.0) {
                *b += c.load(Ordering::Relaxed);
            }
            s
        })
    }
}

/// What happened between two snapshots, per second.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Rates {
    pub read_iops: f64,
    pub write_iops: f64,
    pub read_bytes_per_sec: f64,
    pub write_bytes_per_sec: f64,
    /// Latency percentiles of the reads and writes completed in the
    /// interval, in microseconds; `None` when none completed.
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl Rates {
    /// The rates from `prev` to `cur`, taken `dt` apart. Counters that went
    /// backwards (a restarted export) count as zero.
    pub fn between(prev: &StatsSnapshot, cur: &StatsSnapshot, dt: Duration) -> Rates {
        let secs = dt.as_secs_f64();
        if secs <= 0.0 {
            return Rates::default();
        }
        let per_sec = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
        let counts: Vec<u64> = prev
            .latency
            .iter()
            .zip(cur.latency.iter())
            .map(|(a, b)| b.saturating_sub(*a))
            .collect();
        Rates {
            read_iops: per_sec(prev.reads, cur.reads),
            write_iops: per_sec(prev.writes, cur.writes),
            read_bytes_per_sec: per_sec(prev.read_bytes, cur.read_bytes),
            write_bytes_per_sec: per_sec(prev.write_bytes, cur.write_bytes),
            p50_us: percentile(&counts, 0.50),
            p99_us: percentile(&counts, 0.99),
        }
    }
}

/// The `q` quantile of a bucketed histogram, as its bucket's midpoint.
fn percentile(counts: &[u64], q: f64) -> Option<u64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the quantile, 1-based: the smallest value with at least
    // q of the requests at or below it.
    let rank = ((total as f64 * q).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_mid(i));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_within_an_eighth() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            100,
            1000,
            12_345,
            1 << 20,
            1 << 25,
        ] {
            let b = bucket(us);
            assert!(b >= last, "{us}");
            last = b;
            let lo = bucket_floor(b);
            assert!(lo <= us, "{us}: floor {lo}");
            if b + 1 < BUCKETS {
                let hi = bucket_floor(b + 1);
                assert!(us < hi, "{us}: next floor {hi}");
                assert!(
                    (hi - lo) * 8 <= lo.max(8),
                    "{us}: bucket {lo}..{hi} too wide"
                );
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for i in 0..BUCKETS {
            assert_eq!(bucket(bucket_floor(i)), i, "bucket {i}");
        }
    }

    #[test]
    fn rates_and_percentiles_between_snapshots() {
        let q = QueueStats::default();
        let before = StatsSnapshot::sum([&q]);
        for i in 0..100u64 {
            q.record(i % 4 == 0, i % 4 != 0, 4096);
            // 90 requests around 100 us, 10 around 2 ms.
            let us = if i < 90 { 100 } else { 2000 };
            q.latency.record(Duration::from_micros(us));
        }
        let after = StatsSnapshot::sum([&q]);
        let r = Rates::between(&before, &after, Duration::from_millis(500));
        assert_eq!(r.write_iops, 50.0);
        assert_eq!(r.read_iops, 150.0);
        assert_eq!(r.write_bytes_per_sec, 50.0 * 4096.0);
        let p50 = r.p50_us.unwrap();
        let p99 = r.p99_us.unwrap();
        assert!((88..=112).contains(&p50), "p50 {p50}");
        assert!((1750..=2250).contains(&p99), "p99 {p99}");
        // Nothing in between: no percentiles, zero rates.
        let r = Rates::between(&after, &after, Duration::from_secs(1));
        assert_eq!(r, Rates::default());
    }
}
