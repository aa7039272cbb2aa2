//! A blocking client of the control socket, for vdiskctl and tests:
//! plain std I/O, one request at a time.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::protocol::{parse_incoming, request_line, Call, Incoming, Progress};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach vdiskd at {path}")]
    Connect { path: PathBuf, source: io::Error },
    #[error("vdiskd at {path} closed the connection")]
    Closed { path: PathBuf },
    #[error("talking to vdiskd at {path}")]
    Io { path: PathBuf, source: io::Error },
    #[error("vdiskd sent a line this client does not understand: {0}")]
    Protocol(String),
    /// The daemon refused or failed the call.
    #[error("{code}: {message}")]
    Api { code: String, message: String },
}

pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| ClientError::Connect {
            path: path.clone(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Client {
            path,
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
        })
    }

    /// Bounds every read and write; `None` (the default) waits forever,
    /// as a long fetch needs.
    pub fn set_timeout(&mut self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.writer
            .set_read_timeout(timeout)
            .and_then(|()| self.writer.set_write_timeout(timeout))
            .map_err(|e| self.io(e))
    }

    /// Sends `call` and returns its `result`. With `on_progress`, asks for
    /// interim progress lines and hands each one over.
    pub fn call(
        &mut self,
        call: &Call,
        mut on_progress: Option<&mut dyn FnMut(Progress)>,
    ) -> Result<Value, ClientError> {
        let id = Value::from(self.next_id);
        self.next_id += 1;
        let line = request_line(&id, call, on_progress.is_some());
        if let Err(e) = self.writer.write_all(line.as_bytes()) {
            // A refused peer finds the connection closed; the reason may
            // still be waiting to be read.
            return match self.read() {
                Ok(Incoming::Error { code, message, .. }) => {
                    Err(ClientError::Api { code, message })
                }
                _ => Err(self.io(e)),
            };
        }
        loop {
            match self.read()? {
                Incoming::Result { id: got, result } if got == id => return Ok(result),
                // Errors the server could not tie to a request (a refused
                // peer, an unreadable line) come with a null id.
                Incoming::Error {
                    id: got,
                    code,
                    message,
                } if got == id || got.is_null() => return Err(ClientError::Api { code, message }),
                Incoming::Progress { id: got, progress } if got == id => {
                    if let Some(f) = on_progress.as_mut() {
                        f(progress);
                    }
                }
                other => log::debug!("control client: ignoring {other:?}"),
            }
        }
    }

    /// After a successful `watch` call: the next event object, `None` when
    /// the daemon closes the stream.
    pub fn next_event(&mut self) -> Result<Option<Value>, ClientError> {
        loop {
            match self.read() {
                Ok(Incoming::Event(event)) => return Ok(Some(event)),
                Ok(other) => log::debug!("control client: ignoring {other:?}"),
                Err(ClientError::Closed { .. }) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    fn read(&mut self) -> Result<Incoming, ClientError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(ClientError::Closed {
                    path: self.path.clone(),
                });
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return parse_incoming(&line).map_err(ClientError::Protocol);
        }
    }

    fn io(&self, source: io::Error) -> ClientError {
        ClientError::Io {
            path: self.path.clone(),
            source,
        }
    }
}
