//! The control protocol: one JSON object per line each way.
//! docs/PROTOCOL.md describes it for people; this is the reference.
//!
//! Parsing and formatting only: no I/O here.

mod call;
mod event;
mod result;
mod size;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use call::{
    Call, ExportRef, ExportStart, ImageFetch, ImageImport, ImageRef, NoParams, PoolRef, PoolSet,
    VolumeCreate, VolumeExportRaw, VolumeRef, VolumeResize,
};
pub use event::{unix_ms, Event, EventKind, Progress};
pub use result::{
    CacheStats, Done, ExportInfo, ExportList, ImageFormat, ImageInfo, ImageList, IoCounters,
    PoolImageStats, PoolInfo, PoolList, PoolStats, RawExported, Response, Shape, StatsResult,
    VersionInfo, VolumeInfo, VolumeKind, VolumeList, VolumeState, VolumeStats, Watching,
};
pub use size::Size;

/// The `v` of every line.
pub const PROTOCOL_VERSION: u32 = 1;

/// The longest request line the server reads, newline excluded. Requests
/// are small; 1 MiB bounds what one client can make the server buffer.
pub const MAX_LINE: usize = 1 << 20;

/// Why a request failed, as the `code` string on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadJson,
    BadRequest,
    UnknownMethod,
    UnsupportedVersion,
    TooLarge,
    BadName,
    PermissionDenied,
    NotFound,
    Exists,
    InUse,
    NoSpace,
    BadDigest,
    Io,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BadName => "bad_name",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Exists => "exists",
            ErrorCode::InUse => "in_use",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::BadDigest => "bad_digest",
            ErrorCode::Io => "io",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed call: what the service returns and what the client receives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

/// A parsed request line.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// Echoed in every line answering this request.
    pub id: Value,
    /// The client wants interim `progress` lines.
    pub progress: bool,
    pub call: Call,
}

/// A request that failed to parse: the id to answer with (null when the
/// line was not a JSON object with one) and the error.
pub type Rejected = (Value, ApiError);

/// Parses one request line (without its newline).
pub fn parse_request(line: &[u8]) -> Result<Request, Rejected> {
    let value: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Value::Null,
            ApiError::new(ErrorCode::BadJson, e.to_string()),
        )
    })?;
    let Value::Object(mut obj) = value else {
        return Err((Value::Null, bad_request("a request is a JSON object")));
    };
    let id = obj.remove("id").unwrap_or(Value::Null);
    match parse_envelope(obj) {
        Ok((progress, call)) => Ok(Request { id, progress, call }),
        Err(e) => Err((id, e)),
    }
}

fn parse_envelope(mut obj: Map<String, Value>) -> Result<(bool, Call), ApiError> {
    match obj.remove("v") {
        None => return Err(bad_request("missing field `v`")),
        Some(Value::Number(n)) if n.as_u64() == Some(u64::from(PROTOCOL_VERSION)) => {}
        Some(Value::Number(n)) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                "protocol version {n} is not spoken here; this server speaks {PROTOCOL_VERSION}"
            ),
            ))
        }
        Some(_) => return Err(bad_request("`v` must be a number")),
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return Err(bad_request("`method` must be a string")),
        None => return Err(bad_request("missing field `method`")),
    };
    let progress = match obj.remove("progress") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(_) => return Err(bad_request("`progress` must be true or false")),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(p @ Value::Object(_)) => p,
        Some(_) => return Err(bad_request("`params` must be an object")),
    };
    if let Some(key) = obj.keys().next() {
        return Err(bad_request(format!("unknown field `{key}` in the request")));
    }
    if !Call::METHODS.contains(&method.as_str()) {
        return Err(ApiError::new(
            ErrorCode::UnknownMethod,
            format!("unknown method `{method}`"),
        ));
    }
    let mut tagged = Map::new();
    tagged.insert("method".into(), Value::String(method.clone()));
    tagged.insert("params".into(), params);
    let call: Call = serde_json::from_value(Value::Object(tagged))
        .map_err(|e| bad_request(format!("{method}: {e}")))?;
    call.validate()?;
    Ok((progress, call))
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::BadRequest, message)
}

#[derive(Serialize)]
struct ResultLine<'a, T> {
    v: u32,
    id: &'a Value,
    result: &'a T,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    v: u32,
    id: &'a Value,
    error: &'a ApiError,
}

#[derive(Serialize)]
struct ProgressLine<'a> {
    v: u32,
    id: &'a Value,
    progress: &'a Progress,
}

#[derive(Serialize)]
struct EventLine<'a> {
    v: u32,
    event: &'a Event,
}

/// `{"v":1,"id":…,"result":…}` and a newline.
pub fn result_line(id: &Value, result: &Response) -> String {
    line(&ResultLine {
        v: PROTOCOL_VERSION,
        id,
        result,
    })
}

/// `{"v":1,"id":…,"error":{"code":…,"message":…}}` and a newline.
pub fn error_line(id: &Value, error: &ApiError) -> String {
    line(&ErrorLine {
        v: PROTOCOL_VERSION,
        id,
        error,
    })
}

/// `{"v":1,"id":…,"progress":{"done":…,"total":…}}` and a newline.
pub fn progress_line(id: &Value, progress: &Progress) -> String {
    line(&ProgressLine {
        v: PROTOCOL_VERSION,
        id,
        progress,
    })
}

/// `{"v":1,"event":{"type":…,"at":…,…}}` and a newline.
pub fn event_line(event: &Event) -> String {
    line(&EventLine {
        v: PROTOCOL_VERSION,
        event,
    })
}

/// A request line as a client writes it.
pub fn request_line(id: &Value, call: &Call, progress: bool) -> String {
    let mut obj = match serde_json::to_value(call) {
        Ok(Value::Object(obj)) => obj,
        _ => Map::new(),
    };
    obj.insert("v".into(), Value::from(PROTOCOL_VERSION));
    obj.insert("id".into(), id.clone());
    if progress {
        obj.insert("progress".into(), Value::Bool(true));
    }
    line(&obj)
}

fn line<T: Serialize>(t: &T) -> String {
    match serde_json::to_string(t) {
        Ok(mut s) => {
            s.push('\n');
            s
        }
        // Our types have string keys only; this is a bug, said plainly.
        Err(e) => format!(
            "{{\"v\":{PROTOCOL_VERSION},\"id\":null,\"error\":{{\"code\":\"internal\",\"message\":{}}}}}\n",
            Value::String(format!("cannot encode a reply: {e}"))
        ),
    }
}

/// A line a client receives.
#[derive(Clone, Debug, PartialEq)]
pub enum Incoming {
    Result {
        id: Value,
        result: Value,
    },
    /// `code` stays a string: a newer server may send codes this client
    /// does not know.
    Error {
        id: Value,
        code: String,
        message: String,
    },
    Progress {
        id: Value,
        progress: Progress,
    },
    /// The event object, kept as JSON so unknown event types still print.
    Event(Value),
}

#[derive(Deserialize)]
struct WireError {
    code: String,
    message: String,
}

/// Parses a line received from the server.
pub fn parse_incoming(line: &[u8]) -> Result<Incoming, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    let Value::Object(mut obj) = value else {
        return Err("a reply is a JSON object".into());
    };
    match obj.get("v").and_then(Value::as_u64) {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        other => {
            return Err(format!(
                "protocol version {other:?}, expected {PROTOCOL_VERSION}"
            ))
        }
    }
    let id = obj.remove("id").unwrap_or(Value::Null);
    if let Some(result) = obj.remove("result") {
        return Ok(Incoming::Result { id, result });
    }
    if let Some(error) = obj.remove("error") {
        let e: WireError = serde_json::from_value(error).map_err(|e| format!("error: {e}"))?;
        return Ok(Incoming::Error {
            id,
            code: e.code,
            message: e.message,
        });
    }
    if let Some(progress) = obj.remove("progress") {
        let progress = serde_json::from_value(progress).map_err(|e| format!("progress: {e}"))?;
        return Ok(Incoming::Progress { id, progress });
    }
    if let Some(event) = obj.remove("event") {
        return Ok(Incoming::Event(event));
    }
    Err("a line with no result, error, progress or event".into())
}

#[cfg(test)]
mod tests;
