//! The control socket's protocol layer against a fake service, driven with
//! raw JSON lines: every error case keeps the connection usable, peers are
//! checked, `watch` streams events, progress lines arrive before the reply,
//! and the Prometheus renderer serves whatever figures the service gives.
//! The figures are the fake's; the real vdiskd's are tested in
//! tests/live_stats.rs, its calls in tests/service_clone.rs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use vdisk::control::metrics;
use vdisk::control::protocol::{
    CacheStats, EventKind, ImageInfo, IoCounters, VolumeInfo, VolumeStats,
};
use vdisk::control::{
    ApiError, AuthPolicy, Call, ControlHandle, ErrorCode, Event, EventBus, Progress, Response,
    Server, Service, StatsResult,
};

/// Every read in these tests gives up after this long instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(10);

struct Fake {
    /// `volume.resize` of "slow" waits here until the test lets it go.
    release: Mutex<mpsc::Receiver<()>>,
}

impl Service for Fake {
    fn call(&self, call: Call, progress: &dyn Fn(Progress)) -> Result<Response, ApiError> {
        match call {
            Call::VolumeShow(p) if p.name == "vm1" => Ok(Response::Volume(VolumeInfo {
                name: p.name,
                size: 1 << 30,
                ..Default::default()
            })),
            Call::VolumeShow(p) => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no volume {}", p.name),
            )),
            Call::ImageFetch(p) => {
                for done in [0, 50, 100] {
                    progress(Progress {
                        done,
                        total: Some(100),
                    });
                    // Past the server's throttle, so every report goes out.
                    std::thread::sleep(Duration::from_millis(150));
                }
                Ok(Response::Image(ImageInfo {
                    digest: format!("sha256:{}", p.sha256),
                    source: p.url,
                    size: 100,
                    ..Default::default()
                }))
            }
            Call::VolumeResize(p) if p.name == "slow" => {
                let _ = self.release.lock().unwrap().recv_timeout(TIMEOUT);
                Ok(Response::Volume(VolumeInfo {
                    name: p.name,
                    size: p.size.bytes(),
                    ..Default::default()
                }))
            }
            // The wrong result type for the method.
            Call::VolumeDelete(_) => Ok(Response::Images(Default::default())),
            Call::ExportStop(_) => panic!("the fake service fails on purpose"),
            other => Err(ApiError::new(
                ErrorCode::Internal,
                format!("{} is not in this fake", other.method()),
            )),
        }
    }

    fn metrics(&self) -> StatsResult {
        StatsResult {
            volumes: vec![VolumeStats {
                volume: "vm1".into(),
                io: IoCounters {
                    reads: 7,
                    writes: 3,
                    read_bytes: 7 * 4096,
                    write_bytes: 3 * 4096,
                    errors: 0,
                },
                read_iops: 12.5,
                latency_p50_us: Some(90),
                latency_p99_us: None,
                ..Default::default()
            }],
            cache: CacheStats {
                budget: Some(10 << 30),
                used_bytes: 1 << 30,
                images: 2,
                fs_free_bytes: 50 << 30,
            },
            pool: Default::default(),
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    bus: EventBus,
    release: mpsc::Sender<()>,
    handle: Option<ControlHandle>,
}

fn fake() -> (Arc<Fake>, mpsc::Sender<()>) {
    let (tx, rx) = mpsc::channel();
    (
        Arc::new(Fake {
            release: Mutex::new(rx),
        }),
        tx,
    )
}

fn start_with(auth: AuthPolicy) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet: the server creates it.
    let path = dir.path().join("run/vdisk/control.sock");
    let bus = EventBus::new();
    let (service, release) = fake();
    let handle = Server::start(&path, service, bus.clone(), auth).unwrap();
    Fixture {
        _dir: dir,
        path,
        bus,
        release,
        handle: Some(handle),
    }
}

/// Allows exactly the uid these tests run as.
fn me() -> AuthPolicy {
    let file = tempfile::NamedTempFile::new().unwrap();
    let uid = file.as_file().metadata().unwrap().uid();
    AuthPolicy {
        uids: vec![uid],
        gids: vec![],
    }
}

fn start() -> Fixture {
    start_with(me())
}

struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(path: &Path) -> Conn {
        let s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        Conn {
            writer: s.try_clone().unwrap(),
            reader: BufReader::new(s),
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    fn send(&mut self, line: &str) {
        self.send_raw(format!("{line}\n").as_bytes());
    }

    /// The next line as JSON; Null at end of stream.
    fn recv(&mut self) -> Value {
        let mut line = String::new();
        if self.reader.read_line(&mut line).unwrap() == 0 {
            return Value::Null;
        }
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }

    fn call(&mut self, request: Value) -> Value {
        self.send(&request.to_string());
        self.recv()
    }

    fn assert_usable(&mut self) {
        let r = self.call(json!({"v": 1, "id": "ping", "method": "version"}));
        assert_eq!(r["id"], "ping", "{r}");
        assert_eq!(r["result"]["protocol"], 1, "{r}");
    }
}

fn error_code(reply: &Value) -> &str {
    reply["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {reply}"))
}

#[test]
fn version() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let r = c.call(json!({"v": 1, "id": 41, "method": "version", "params": {}}));
    assert_eq!(
        r,
        json!({"v": 1, "id": 41, "result": {"protocol": 1, "vdisk": env!("CARGO_PKG_VERSION")}})
    );
    // `params` may be left out, and an id may be any JSON value.
    let r = c.call(json!({"v": 1, "id": {"a": [1]}, "method": "version"}));
    assert_eq!(r["id"], json!({"a": [1]}));
}

#[test]
fn every_error_keeps_the_connection_usable() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let cases: Vec<(&str, &str, Value)> = vec![
        ("{not json", "bad_json", Value::Null),
        ("[1,2]", "bad_request", Value::Null),
        (
            r#"{"v":1,"id":1,"method":"volume.frobnicate","params":{}}"#,
            "unknown_method",
            json!(1),
        ),
        (
            r#"{"v":1,"id":2,"method":"volume.show","params":{"name":"vm1","colour":"red"}}"#,
            "bad_request",
            json!(2),
        ),
        (
            r#"{"v":1,"id":3,"method":"volume.list","params":{"all":true}}"#,
            "bad_request",
            json!(3),
        ),
        (
            r#"{"v":1,"id":4,"method":"volume.show","params":{}}"#,
            "bad_request",
            json!(4),
        ),
        (
            r#"{"v":1,"id":5,"method":"volume.show","params":{"name":7}}"#,
            "bad_request",
            json!(5),
        ),
        (
            r#"{"v":1,"id":6,"method":"volume.resize","params":{"name":"vm1","size":"lots"}}"#,
            "bad_request",
            json!(6),
        ),
        (
            r#"{"v":2,"id":7,"method":"version"}"#,
            "unsupported_version",
            json!(7),
        ),
        (r#"{"id":8,"method":"version"}"#, "bad_request", json!(8)),
        (
            r#"{"v":1,"id":9,"method":"version","extra":true}"#,
            "bad_request",
            json!(9),
        ),
        (
            r#"{"v":1,"id":10,"method":"volume.show","params":{"name":"../etc/passwd"}}"#,
            "bad_name",
            json!(10),
        ),
        (
            r#"{"v":1,"id":11,"method":"volume.show","params":{"name":"a/b"}}"#,
            "bad_name",
            json!(11),
        ),
        (
            r#"{"v":1,"id":12,"method":"volume.create","params":{"name":"..","size":"1G"}}"#,
            "bad_name",
            json!(12),
        ),
        (
            r#"{"v":1,"id":13,"method":"volume.create","params":{"name":"ok","image":"x/y"}}"#,
            "bad_name",
            json!(13),
        ),
        (
            r#"{"v":1,"id":14,"method":"image.import","params":{"file":"relative.img"}}"#,
            "bad_request",
            json!(14),
        ),
        (
            r#"{"v":1,"id":15,"method":"volume.show","params":{"name":"nope"}}"#,
            "not_found",
            json!(15),
        ),
        // The service returns the wrong type, then panics: both internal.
        (
            r#"{"v":1,"id":16,"method":"volume.delete","params":{"name":"vm1"}}"#,
            "internal",
            json!(16),
        ),
        (
            r#"{"v":1,"id":17,"method":"export.stop","params":{"volume":"vm1"}}"#,
            "internal",
            json!(17),
        ),
    ];
    for (line, code, id) in cases {
        c.send(line);
        let r = c.recv();
        assert_eq!(error_code(&r), code, "{line} -> {r}");
        assert_eq!(r["id"], id, "{line} -> {r}");
        assert_eq!(r["v"], 1);
        assert!(r["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        c.assert_usable();
    }
    // Blank lines are skipped, CRLF is accepted.
    c.send_raw(b"\n  \n{\"v\":1,\"id\":\"crlf\",\"method\":\"version\"}\r\n");
    assert_eq!(c.recv()["id"], "crlf");
}

#[test]
fn oversized_line_is_refused_and_the_next_one_served() {
    let f = start();
    let mut c = Conn::open(&f.path);
    let mut big = br#"{"v":1,"id":1,"method":"version","params":{"pad":""#.to_vec();
    big.resize(2 << 20, b'x');
    big.extend_from_slice(b"\"}}\n");
    // Write from another thread: the server reads while we wait for it.
    let mut w = c.writer.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&big).unwrap());
    let r = c.recv();
    writer.join().unwrap();
    assert_eq!(error_code(&r), "too_large", "{r}");
    assert_eq!(r["id"], Value::Null);
    c.assert_usable();
    // Exactly at the limit is not too large (it is bad JSON here).
    let mut limit = vec![b' '; 1 << 20];
    limit[0] = b'{';
    limit.push(b'\n');
    let mut w = c.writer.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&limit).unwrap());
    let r = c.recv();
    writer.join().unwrap();
    assert_eq!(error_code(&r), "bad_json", "{r}");
    c.assert_usable();
}

#[test]
fn socket_mode_directory_and_cleanup() {
    let mut f = start();
    let meta = std::fs::metadata(&f.path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert!(f.path.parent().unwrap().is_dir());
    // A second server on the same live socket is refused.
    let (service, _release) = fake();
    let err = Server::start(&f.path, service, EventBus::new(), me()).unwrap_err();
    assert!(err.to_string().contains("already answers"), "{err}");
    // Stopping removes the socket; a stale one is replaced on start.
    f.handle.take().unwrap().stop();
    assert!(!f.path.exists());
    let stale = std::os::unix::net::UnixListener::bind(&f.path).unwrap();
    drop(stale);
    let (service, _release) = fake();
    let again = Server::start(&f.path, service, EventBus::new(), me()).unwrap();
    Conn::open(&f.path).assert_usable();
    again.stop();
    // Anything but a socket is left alone.
    std::fs::write(&f.path, b"not a socket").unwrap();
    let (service, _release) = fake();
    let err = Server::start(&f.path, service, EventBus::new(), me()).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&f.path).unwrap(), b"not a socket");
}

#[test]
fn denied_peer_gets_permission_denied() {
    let f = start_with(AuthPolicy::deny_all());
    let mut c = Conn::open(&f.path);
    let r = c.recv();
    assert_eq!(error_code(&r), "permission_denied", "{r}");
    assert_eq!(r["id"], Value::Null);
    assert_eq!(c.recv(), Value::Null, "the connection closes");
    // A group policy without our groups refuses too.
    let f = start_with(AuthPolicy {
        uids: vec![],
        gids: vec![u32::MAX - 1],
    });
    let r = Conn::open(&f.path).recv();
    assert_eq!(error_code(&r), "permission_denied", "{r}");
}

#[test]
fn watch_streams_published_events() {
    let f = start();
    let mut w = Conn::open(&f.path);
    let r = w.call(json!({"v": 1, "id": "w", "method": "watch", "params": {}}));
    assert_eq!(r, json!({"v": 1, "id": "w", "result": {"watching": true}}));
    // Published from a plain thread, as the daemon does.
    let bus = f.bus.clone();
    std::thread::spawn(move || {
        bus.publish(Event::now(EventKind::VolumeCreated { name: "vm9".into() }))
    })
    .join()
    .unwrap();
    let e = w.recv();
    assert_eq!(e["v"], 1);
    assert_eq!(e["event"]["type"], "volume.created", "{e}");
    assert_eq!(e["event"]["name"], "vm9");
    assert!(e["event"]["at"].as_u64().unwrap() > 1_600_000_000_000);
    // A watcher that hangs up is dropped from the bus.
    drop(w);
    for _ in 0..100 {
        if f.bus.watchers() == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("the watcher was not dropped");
}

#[test]
fn progress_lines_come_before_the_reply_and_reach_watchers() {
    let f = start();
    let mut w = Conn::open(&f.path);
    w.call(json!({"v": 1, "id": 0, "method": "watch"}));
    let mut c = Conn::open(&f.path);
    let sha = "ab".repeat(32);
    c.send(
        &json!({"v": 1, "id": "f", "method": "image.fetch", "progress": true,
            "params": {"url": "http://127.0.0.1/x.img", "sha256": sha}})
        .to_string(),
    );
    let mut seen = Vec::new();
    let reply = loop {
        let r = c.recv();
        assert_eq!(r["id"], "f", "{r}");
        match r.get("progress") {
            Some(p) => seen.push(p["done"].as_u64().unwrap()),
            None => break r,
        }
    };
    assert_eq!(reply["result"]["size"], 100, "{reply}");
    assert!(!seen.is_empty(), "no progress lines");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let e = w.recv();
    assert_eq!(e["event"]["type"], "image.fetch_progress", "{e}");
    assert_eq!(e["event"]["url"], "http://127.0.0.1/x.img");
    // Without "progress": true, only the reply.
    let r = c.call(json!({"v": 1, "id": "g", "method": "image.fetch",
        "params": {"url": "http://127.0.0.1/x.img", "sha256": sha}}));
    assert_eq!(r["result"]["size"], 100, "{r}");
}

#[test]
fn a_slow_call_does_not_hold_up_other_clients() {
    let f = start();
    let mut slow = Conn::open(&f.path);
    slow.send(r#"{"v":1,"id":"s","method":"volume.resize","params":{"name":"slow","size":"2G"}}"#);
    // Served while the slow call is still waiting for its release.
    let mut other = Conn::open(&f.path);
    other.assert_usable();
    f.release.send(()).unwrap();
    let r = slow.recv();
    assert_eq!(r["result"]["size"], 2u64 << 30, "{r}");
}

#[test]
fn stats_results_are_passed_through_unchanged() {
    let f = start();
    let r = Conn::open(&f.path).call(json!({"v": 1, "id": 1, "method": "stats"}));
    let s = &r["result"];
    assert_eq!(s["volumes"][0]["volume"], "vm1", "{r}");
    assert_eq!(s["volumes"][0]["reads"], 7);
    assert_eq!(s["volumes"][0]["latency_p50_us"], 90);
    assert_eq!(s["volumes"][0]["latency_p99_us"], Value::Null);
    assert_eq!(s["cache"]["images"], 2);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn prometheus_renderer_serves_the_service_figures() {
    let (service, _release) = fake();
    let m = metrics::serve("127.0.0.1:0".parse().unwrap(), service).unwrap();
    let text = http_get(m.local_addr(), "/metrics");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    assert!(
        text.contains("Content-Type: text/plain; version=0.0.4"),
        "{text}"
    );
    for want in [
        "# TYPE vdisk_volume_reads_total counter\n",
        "vdisk_volume_reads_total{volume=\"vm1\"} 7\n",
        "vdisk_volume_write_bytes_total{volume=\"vm1\"} 12288\n",
        "vdisk_volume_read_iops{volume=\"vm1\"} 12.5\n",
        "vdisk_volume_latency_microseconds{volume=\"vm1\",quantile=\"0.5\"} 90\n",
        "vdisk_cache_used_bytes 1073741824\n",
        "vdisk_cache_images 2\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let length: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(body.len(), length);
    assert!(http_get(m.local_addr(), "/other").starts_with("HTTP/1.1 404"));
    m.stop();
}
