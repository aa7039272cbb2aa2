//! A small HTTP/1.1 server on 127.0.0.1 for the image-fetch tests: it
//! serves byte buffers by path, honours `Range: bytes=N-` (or `N-M`), can
//! be told to cut its next response after a number of body bytes, and
//! records every request it saw.
//!
//! Include it with `#[path = "common/http.rs"] mod http;`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// A stuck client must not hang the test.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// One request as the server saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub path: String,
    /// The `Range` header, as sent.
    pub range: Option<String>,
    /// The first byte asked for by `Range: bytes=N-...`.
    pub range_start: Option<u64>,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Arc<Vec<u8>>>,
    cut_next_after: Option<usize>,
    ignore_range: bool,
    seen: Vec<Seen>,
}

pub struct HttpServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl HttpServer {
    pub fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let state = Arc::clone(&state);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        // One connection at a time: the tests fetch
                        // sequentially, and every response closes.
                        serve(conn, &state);
                    }
                }
            })
        };
        HttpServer {
            addr,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Serve `data` at `path`.
    pub fn put(&self, path: &str, data: Vec<u8>) {
        lock(&self.state).files.insert(path.into(), Arc::new(data));
    }

    /// The next response announces its full length but sends only `n`
    /// body bytes, then closes the connection.
    pub fn cut_next_after(&self, n: usize) {
        lock(&self.state).cut_next_after = Some(n);
    }

    /// Answer every request with the whole file (200), as a server
    /// without range support does.
    pub fn ignore_range(&self, yes: bool) {
        lock(&self.state).ignore_range = yes;
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.state).seen.clone()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_head(conn: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_HEAD || conn.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

/// `bytes=N-` or `bytes=N-M` -> (N, M).
fn parse_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (start, end) = v.trim().strip_prefix("bytes=")?.split_once('-')?;
    let end = if end.is_empty() {
        None
    } else {
        Some(end.parse().ok()?)
    };
    Some((start.parse().ok()?, end))
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) {
    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
    let Some(head) = read_head(&mut conn) else {
        return;
    };
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let range = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("range"))
        .map(|(_, v)| v.trim().to_string());
    let parsed = range.as_deref().and_then(parse_range);
    let (file, cut, ignore_range) = {
        let mut st = lock(state);
        st.seen.push(Seen {
            path: path.clone(),
            range: range.clone(),
            range_start: parsed.map(|(s, _)| s),
        });
        (
            st.files.get(&path).cloned(),
            st.cut_next_after.take(),
            st.ignore_range,
        )
    };
    let Some(file) = file else {
        let body = b"not found\n";
        let _ = write!(
            conn,
            "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = conn.write_all(body);
        return;
    };
    let len = file.len() as u64;
    let (status, start, end) = match parsed {
        Some((start, _)) if !ignore_range && start >= len => {
            let _ = write!(
                conn,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\n\
                 Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            return;
        }
        Some((start, end)) if !ignore_range => {
            let end = end.map_or(len, |e| (e + 1).min(len));
            ("206 Partial Content", start, end)
        }
        _ => ("200 OK", 0, len),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n",
        end - start
    );
    if status.starts_with("206") {
        head.push_str(&format!(
            "Content-Range: bytes {start}-{}/{len}\r\n",
            end.saturating_sub(1)
        ));
    }
    head.push_str("\r\n");
    let body = &file[start as usize..end as usize];
    let body = match cut {
        Some(n) => &body[..n.min(body.len())],
        None => body,
    };
    if conn.write_all(head.as_bytes()).is_ok() {
        let _ = conn.write_all(body);
    }
    let _ = conn.flush();
    let _ = conn.shutdown(Shutdown::Both);
}
