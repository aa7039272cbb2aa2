//! Where a fetch reads from: `http://`, `https://` or `file://` URLs, opened
//! at an offset so that an interrupted fetch can resume.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::time::Duration;

use ureq::http::{StatusCode, Uri};

use super::CacheError;

/// Time allowed to set up a connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A transfer that delivers nothing for this long is treated as
/// interrupted (it can be resumed), not waited on forever.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A parsed fetch URL.
#[derive(Debug)]
pub(super) enum Url {
    Http { uri: String, loopback: bool },
    File(PathBuf),
}

impl Url {
    pub(super) fn parse(url: &str) -> Result<Self, CacheError> {
        let bad = |why| CacheError::BadUrl {
            url: redact(url),
            why,
        };
        if let Some(rest) = url.strip_prefix("file://") {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(bad("a file URL needs an absolute path (file:///path)"));
            }
            if path.contains(['?', '#']) {
                return Err(bad("a file URL has no query or fragment"));
            }
            let bytes = percent_decode(path).ok_or_else(|| bad("bad %-escape"))?;
            let path: std::ffi::OsString = std::os::unix::ffi::OsStringExt::from_vec(bytes);
            return Ok(Url::File(PathBuf::from(path)));
        }
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("only http://, https:// and file:// URLs are fetched")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        Ok(Url::Http {
            uri: url.to_string(),
            loopback,
        })
    }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hexs = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hexs, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `url` with any `user:password@` replaced, for logs, errors and the
/// catalog's `source` field.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..auth_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// What opening a source at an offset gave.
pub(super) enum Opened {
    /// The bytes from `offset` on (`offset` is the one asked for, or 0
    /// when the source starts over).
    Stream {
        offset: u64,
        total: Option<u64>,
        reader: Box<dyn Read>,
    },
    /// Nothing lies past the offset asked for: the part may be whole.
    Complete,
    /// The part does not fit the source (longer than it, or a range the
    /// server got wrong): start again from 0.
    StartOver,
}

/// HTTP agents: one honouring the proxy environment, one direct for
/// loopback hosts (a proxy cannot reach this host's loopback).
pub(super) struct Http {
    proxied: ureq::Agent,
    direct: ureq::Agent,
}

impl Http {
    pub(super) fn new() -> Self {
        let builder = || {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_per_read(Some(READ_TIMEOUT))
        };
        Http {
            proxied: builder().build().into(),
            direct: builder().proxy(None).build().into(),
        }
    }

    pub(super) fn open(&self, url: &Url, offset: u64) -> Result<Opened, CacheError> {
        match url {
            Url::File(path) => open_file(path, offset),
            Url::Http { uri, loopback } => {
                let agent = if *loopback {
                    &self.direct
                } else {
                    &self.proxied
                };
                open_http(agent, uri, offset)
            }
        }
    }
}

fn open_file(path: &std::path::Path, offset: u64) -> Result<Opened, CacheError> {
    let io = |op, e| super::files::io_err(op, path, e);
    let mut file = File::open(path).map_err(|e| io("open", e))?;
    let len = file.metadata().map_err(|e| io("stat", e))?.len();
    if offset > len {
        return Ok(Opened::StartOver);
    }
    file.seek(SeekFrom::Start(offset))
        .map_err(|e| io("seek", e))?;
    Ok(Opened::Stream {
        offset,
        total: Some(len),
        reader: Box::new(file),
    })
}

fn open_http(agent: &ureq::Agent, uri: &str, offset: u64) -> Result<Opened, CacheError> {
    let shown = redact(uri);
    let mut req = agent
        .get(uri)
        // Image bytes as they are: a transfer encoding would break both
        // the byte ranges and the digest.
        .header("Accept-Encoding", "identity");
    if offset > 0 {
        req = req.header("Range", format!("bytes={offset}-"));
    }
    let resp = req.call().map_err(|e| CacheError::Transport {
        url: shown.clone(),
        source: Box::new(e),
    })?;
    let status = resp.status();
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let length = resp.body().content_length();
    match status {
        StatusCode::OK => Ok(Opened::Stream {
            offset: 0,
            total: length,
            reader: Box::new(resp.into_body().into_reader()),
        }),
        StatusCode::PARTIAL_CONTENT if offset > 0 => {
            let range = header("content-range").unwrap_or_default();
            match parse_content_range(&range) {
                Some((start, total)) if start == offset => Ok(Opened::Stream {
                    offset,
                    total: total.or(length.map(|l| offset + l)),
                    reader: Box::new(resp.into_body().into_reader()),
                }),
                _ => {
                    log::warn!("{shown}: asked for bytes {offset}-, got `{range}`; starting over");
                    Ok(Opened::StartOver)
                }
            }
        }
        StatusCode::RANGE_NOT_SATISFIABLE if offset > 0 => {
            // `bytes */TOTAL`: the resource has TOTAL bytes.
            let total = header("content-range").and_then(|r| {
                r.strip_prefix("bytes */")
                    .and_then(|t| t.trim().parse().ok())
            });
            Ok(if total == Some(offset) {
                Opened::Complete
            } else {
                Opened::StartOver
            })
        }
        _ => Err(CacheError::Http {
            url: shown,
            status: status.as_u16(),
            reason: status.canonical_reason().unwrap_or("").to_string(),
        }),
    }
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`) -> (START, TOTAL).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = v.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 10-99/*"), Some((10, None)));
        assert_eq!(parse_content_range("items 1-2/3"), None);
    }

    #[test]
    fn urls() {
        assert!(matches!(
            Url::parse("file:///a%20b/c.img"),
            Ok(Url::File(p)) if p == Path::new("/a b/c.img")
        ));
        assert!(matches!(
            Url::parse("file://localhost/x"),
            Ok(Url::File(p)) if p == Path::new("/x")
        ));
        assert!(Url::parse("file://relative").is_err());
        assert!(Url::parse("ftp://host/x").is_err());
        assert!(matches!(
            Url::parse("http://127.0.0.1:8080/x"),
            Ok(Url::Http { loopback: true, .. })
        ));
        assert!(matches!(
            Url::parse("https://example.com/x"),
            Ok(Url::Http {
                loopback: false,
                ..
            })
        ));
        assert_eq!(
            redact("https://u:p@host/x@y"),
            "https://***@host/x@y".to_string()
        );
        assert_eq!(redact("http://host/x"), "http://host/x");
    }
}
