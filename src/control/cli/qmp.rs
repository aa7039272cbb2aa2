//! A minimal QMP client for `vdiskctl volume resize --qmp`: after a live
//! grow, QEMU (9.2 and later) re-reads a vhost-user-blk device's config and
//! tells the guest when asked with `device-sync-config`. vhost-user-backend
//! 0.24 cannot send VHOST_USER_BACKEND_CONFIG_CHANGE_MSG itself, so the
//! operator's tool asks the VMM instead.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// How long QEMU may take to answer one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("QMP {path}: {what}")]
    Protocol { path: String, what: String },
}

/// Sends `device-sync-config` for device `qdev` over the QMP socket `path`.
pub fn device_sync_config(path: &Path, qdev: &str) -> Result<(), QmpError> {
    let shown = path.display().to_string();
    let io = |source| QmpError::Io {
        path: shown.clone(),
        source,
    };
    let proto = |what: String| QmpError::Protocol {
        path: shown.clone(),
        what,
    };
    let stream = UnixStream::connect(path).map_err(io)?;
    stream.set_read_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(QMP_TIMEOUT)).map_err(io)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(io)?);
    let mut writer = stream;
    let next = |reader: &mut BufReader<UnixStream>| -> Result<Value, QmpError> {
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).map_err(io)? == 0 {
                return Err(proto("QEMU closed the connection".into()));
            }
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| proto(format!("not JSON ({e}): {}", line.trim())))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    let greeting = next(&mut reader)?;
    if greeting.get("QMP").is_none() {
        return Err(proto(format!("not a QMP greeting: {greeting}")));
    }
    for cmd in [
        json!({"execute": "qmp_capabilities"}),
        json!({"execute": "device-sync-config", "arguments": {"id": qdev}}),
    ] {
        writer
            .write_all(format!("{cmd}\n").as_bytes())
            .map_err(io)?;
        let reply = next(&mut reader)?;
        if let Some(err) = reply.get("error") {
            let desc = err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(proto(format!("{}: {desc}", cmd["execute"])));
        }
    }
    Ok(())
}
