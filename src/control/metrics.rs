//! The same figures as `stats`, in Prometheus text format, on a small
//! HTTP/1.1 listener: `GET /metrics` and nothing else. Hand-written rather
//! than hyper: one path, one method, `Connection: close`, and no new
//! dependency tree in the daemon for it.

use std::fmt::Write as _;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::protocol::{PoolImageStats, StatsResult, VolumeStats};
use super::rt::{self, RuntimeThread};
use super::Service;

/// A scraper sends a few hundred bytes of headers; more is not a scraper.
const MAX_HEAD: usize = 8 << 10;
/// A client that has not sent its request by then is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed accept (EMFILE), wait this long rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start the metrics runtime")]
    Runtime(#[source] io::Error),
}

/// A running metrics listener; dropping it stops it.
#[derive(Debug)]
pub struct MetricsHandle {
    addr: SocketAddr,
    thread: RuntimeThread,
}

impl MetricsHandle {
    /// The bound address (the real port when asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.thread.stop();
    }
}

/// Listens on `addr` on a thread of its own. Meant for a loopback address.
pub fn serve(addr: SocketAddr, source: Arc<dyn Service>) -> Result<MetricsHandle, MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let std_listener = std::net::TcpListener::bind(addr).map_err(bind_err)?;
    std_listener.set_nonblocking(true).map_err(bind_err)?;
    let local = std_listener.local_addr().map_err(bind_err)?;
    if !local.ip().is_loopback() {
        log::warn!("metrics: listening on {local}, which is not a loopback address");
    }
    let rt = rt::runtime("vdisk-metrics").map_err(MetricsError::Runtime)?;
    let listener = {
        let _guard = rt.enter();
        TcpListener::from_std(std_listener).map_err(bind_err)?
    };
    let thread = RuntimeThread::spawn("vdisk-metrics", rt, move |stop| {
        accept_loop(listener, source, stop)
    })
    .map_err(MetricsError::Runtime)?;
    log::info!("metrics: serving http://{local}/metrics");
    Ok(MetricsHandle {
        addr: local,
        thread,
    })
}

async fn accept_loop(
    listener: TcpListener,
    source: Arc<dyn Service>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, source.clone()));
                }
                Err(e) => {
                    log::warn!("metrics: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

async fn answer(mut stream: TcpStream, source: Arc<dyn Service>) {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(Ok(Some(head))) => head,
        _ => return,
    };
    let mut words = head.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let reply = match (method, path) {
        ("GET" | "HEAD", "/metrics") => {
            match tokio::task::spawn_blocking(move || source.metrics()).await {
                Ok(stats) => response("200 OK", &render(&stats), method == "HEAD"),
                Err(e) => {
                    log::error!("metrics: collecting failed: {e}");
                    response("500 Internal Server Error", "collecting failed\n", false)
                }
            }
        }
        ("GET" | "HEAD", _) => response("404 Not Found", "try /metrics\n", method == "HEAD"),
        _ => response("405 Method Not Allowed", "GET only\n", false),
    };
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The request head up to the blank line, as text; `None` when the
/// client hung up early or sent too much.
async fn read_head(stream: &mut TcpStream) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        let end = buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n");
        if end {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_HEAD {
            return Ok(None);
        }
    }
}

fn response(status: &str, body: &str, head_only: bool) -> String {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        r.push_str(body);
    }
    r
}

/// One metric family: its samples share a name, a help line and a type.
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
}

/// Reads one figure of a volume.
type VolumeFigure = fn(&VolumeStats) -> f64;

/// The Prometheus text exposition of `stats`.
pub fn render(stats: &StatsResult) -> String {
    let mut out = String::new();
    let per_volume: [(Family, VolumeFigure); 10] = [
        (
            counter("vdisk_volume_reads_total", "Read requests completed."),
            |v| v.io.reads as f64,
        ),
        (
            counter("vdisk_volume_writes_total", "Write requests completed."),
            |v| v.io.writes as f64,
        ),
        (
            counter("vdisk_volume_read_bytes_total", "Bytes read."),
            |v| v.io.read_bytes as f64,
        ),
        (
            counter("vdisk_volume_write_bytes_total", "Bytes written."),
            |v| v.io.write_bytes as f64,
        ),
        (
            counter("vdisk_volume_errors_total", "Requests that failed."),
            |v| v.io.errors as f64,
        ),
        (
            gauge("vdisk_volume_read_iops", "Reads per second, last interval."),
            |v| v.read_iops,
        ),
        (
            gauge(
                "vdisk_volume_write_iops",
                "Writes per second, last interval.",
            ),
            |v| v.write_iops,
        ),
        (
            gauge(
                "vdisk_volume_read_bytes_per_second",
                "Bytes read per second, last interval.",
            ),
            |v| v.read_bytes_per_sec,
        ),
        (
            gauge(
                "vdisk_volume_write_bytes_per_second",
                "Bytes written per second, last interval.",
            ),
            |v| v.write_bytes_per_sec,
        ),
        (
            gauge(
                "vdisk_volume_flush_failed",
                "1 once a flush failed: every later flush fails until the export restarts.",
            ),
            |v| f64::from(u8::from(v.flush_error.is_some())),
        ),
    ];
    for (family, value) in &per_volume {
        header(&mut out, family);
        for v in &stats.volumes {
            let _ = writeln!(
                out,
                "{}{{volume=\"{}\"}} {}",
                family.name,
                escape(&v.volume),
                number(value(v))
            );
        }
    }
    let latency = gauge(
        "vdisk_volume_latency_microseconds",
        "Request latency percentiles, last interval.",
    );
    header(&mut out, &latency);
    for v in &stats.volumes {
        for (q, value) in [("0.5", v.latency_p50_us), ("0.99", v.latency_p99_us)] {
            if let Some(x) = value {
                let _ = writeln!(
                    out,
                    "{}{{volume=\"{}\",quantile=\"{q}\"}} {x}",
                    latency.name,
                    escape(&v.volume)
                );
            }
        }
    }
    let p = &stats.pool;
    for (family, value) in [
        (
            gauge("vdisk_pool_ready", "Ready copies of the image."),
            (|i: &PoolImageStats| u64::from(i.ready)) as fn(&PoolImageStats) -> u64,
        ),
        (
            gauge(
                "vdisk_pool_wanted",
                "Ready copies the image's pool entry wants.",
            ),
            |i: &PoolImageStats| u64::from(i.wanted),
        ),
    ] {
        header(&mut out, &family);
        for i in &p.images {
            let _ = writeln!(
                out,
                "{}{{image=\"{}\"}} {}",
                family.name,
                escape(&i.image),
                value(i)
            );
        }
    }
    for (family, x) in [
        (
            counter(
                "vdisk_pool_hits_total",
                "Full-copy deploys that took a ready copy.",
            ),
            p.images.iter().map(|i| i.hits).sum::<u64>(),
        ),
        (
            counter(
                "vdisk_pool_misses_total",
                "Full-copy deploys of a pooled image that found no ready copy.",
            ),
            p.images.iter().map(|i| i.misses).sum(),
        ),
    ] {
        header(&mut out, &family);
        let _ = writeln!(out, "{} {x}", family.name);
    }
    let ev = counter(
        "vdisk_pool_evictions_total",
        "Ready copies deleted to give space back, by reason.",
    );
    header(&mut out, &ev);
    let _ = writeln!(out, "{}{{reason=\"reserve\"}} {}", ev.name, p.evictions);
    let _ = writeln!(out, "{}{{reason=\"fewer_wanted\"}} {}", ev.name, p.trimmed);
    for (family, x) in [
        (
            gauge(
                "vdisk_pool_free_bytes",
                "Free bytes on the pool's file system.",
            ),
            p.free_bytes,
        ),
        (
            gauge(
                "vdisk_pool_reserve_bytes",
                "Bytes the pool's filler keeps free.",
            ),
            p.reserve_bytes,
        ),
    ] {
        header(&mut out, &family);
        let _ = writeln!(out, "{} {x}", family.name);
    }
    let c = &stats.cache;
    // No budget, no budget gauge: 0 would read as "the cache may hold nothing".
    let budget = c.budget.map(|b| {
        (
            gauge("vdisk_cache_budget_bytes", "Bytes the image cache may use."),
            b,
        )
    });
    for (family, x) in budget.into_iter().chain([
        (
            gauge("vdisk_cache_used_bytes", "Bytes the image cache uses."),
            c.used_bytes,
        ),
        (
            gauge("vdisk_cache_images", "Images in the cache."),
            c.images,
        ),
        (
            gauge(
                "vdisk_cache_fs_free_bytes",
                "Free bytes on the cache's filesystem.",
            ),
            c.fs_free_bytes,
        ),
    ]) {
        header(&mut out, &family);
        let _ = writeln!(out, "{} {x}", family.name);
    }
    out
}

fn counter<'a>(name: &'a str, help: &'a str) -> Family<'a> {
    Family {
        name,
        kind: "counter",
        help,
    }
}

fn gauge<'a>(name: &'a str, help: &'a str) -> Family<'a> {
    Family {
        name,
        kind: "gauge",
        help,
    }
}

fn header(out: &mut String, f: &Family) {
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
}

/// Label values escape `\`, `"` and newlines.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn number(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x.is_infinite() {
        if x > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{CacheStats, IoCounters};
    use super::*;

    #[test]
    fn renders_families_and_labels() {
        let stats = StatsResult {
            volumes: vec![VolumeStats {
                volume: "vm\"1".into(),
                io: IoCounters {
                    reads: 3,
                    ..Default::default()
                },
                read_iops: 1.5,
                latency_p50_us: Some(80),
                ..Default::default()
            }],
            cache: CacheStats {
                used_bytes: 42,
                ..Default::default()
            },
            pool: crate::control::protocol::PoolStats {
                images: vec![PoolImageStats {
                    image: "debian".into(),
                    ready: 2,
                    wanted: 4,
                    hits: 5,
                    misses: 1,
                }],
                evictions: 3,
                trimmed: 2,
                free_bytes: 100,
                reserve_bytes: 10,
            },
        };
        let text = render(&stats);
        assert!(
            text.contains("vdisk_pool_ready{image=\"debian\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("vdisk_pool_wanted{image=\"debian\"} 4\n"));
        assert!(text.contains("vdisk_pool_hits_total 5\n"));
        assert!(text.contains("vdisk_pool_misses_total 1\n"));
        assert!(text.contains("vdisk_pool_evictions_total{reason=\"reserve\"} 3\n"));
        assert!(text.contains("vdisk_pool_evictions_total{reason=\"fewer_wanted\"} 2\n"));
        assert!(text.contains("vdisk_pool_reserve_bytes 10\n"));
        assert!(text.contains("# TYPE vdisk_volume_reads_total counter\n"));
        assert!(text.contains("vdisk_volume_reads_total{volume=\"vm\\\"1\"} 3\n"));
        assert!(text.contains("vdisk_volume_read_iops{volume=\"vm\\\"1\"} 1.5\n"));
        assert!(text.contains(
            "vdisk_volume_latency_microseconds{volume=\"vm\\\"1\",quantile=\"0.5\"} 80\n"
        ));
        assert!(!text.contains("quantile=\"0.99\""));
        assert!(text.contains("vdisk_cache_used_bytes 42\n"));
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
