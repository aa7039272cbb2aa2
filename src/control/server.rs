//! The control socket: binding it, the accept loop, and the handle the
//! daemon keeps to stop it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::oneshot;

use super::auth::AuthPolicy;
use super::conn;
use super::events::EventBus;
use super::rt::{self, RuntimeThread};
use super::Service;

/// The socket's mode: the daemon's user and group may connect; peer
/// credentials are checked on top of it.
pub const SOCKET_MODE: u32 = 0o660;
/// Mode of the socket's directory when the server creates it.
const DIR_MODE: u32 = 0o755;
/// After a failed accept (EMFILE, ENFILE), wait this long rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("another server already answers on {path}")]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot remove stale socket {path}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot bind {path}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set the mode of {path}")]
    Mode { path: PathBuf, source: io::Error },
    #[error("cannot start the control runtime")]
    Runtime(#[source] io::Error),
}

/// What every connection shares.
pub(crate) struct Shared {
    pub service: Arc<dyn Service>,
    pub bus: EventBus,
    pub auth: AuthPolicy,
}

pub struct Server;

impl Server {
    /// Binds `path` (creating its directory, replacing a stale socket,
    /// refusing to replace anything else) and serves it on a thread of its
    /// own until the handle is stopped or dropped.
    pub fn start(
        path: impl AsRef<Path>,
        service: Arc<dyn Service>,
        bus: EventBus,
        auth: AuthPolicy,
    ) -> Result<ControlHandle, ServerError> {
        let path = path.as_ref().to_path_buf();
        let std_listener = bind(&path, &auth)?;
        let (dev, ino) = fs::metadata(&path)
            .map(|m| (m.dev(), m.ino()))
            .map_err(|source| ServerError::Bind {
                path: path.clone(),
                source,
            })?;
        let rt = rt::runtime("vdisk-control").map_err(ServerError::Runtime)?;
        let listener = {
            let _guard = rt.enter();
            UnixListener::from_std(std_listener).map_err(|source| ServerError::Bind {
                path: path.clone(),
                source,
            })?
        };
        let shared = Arc::new(Shared { service, bus, auth });
        let thread = RuntimeThread::spawn("vdisk-control", rt, move |stop| {
            accept_loop(listener, shared, stop)
        })
        .map_err(ServerError::Runtime)?;
        log::info!("control: serving {}", path.display());
        Ok(ControlHandle {
            path,
            dev,
            ino,
            thread,
        })
    }
}

/// A running control server. Dropping it stops it too.
#[derive(Debug)]
pub struct ControlHandle {
    path: PathBuf,
    dev: u64,
    ino: u64,
    thread: RuntimeThread,
}

impl ControlHandle {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, closes every connection and removes the socket.
    pub fn stop(self) {}
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.thread.stop();
        // Remove the socket only if it is still ours.
        if let Ok(m) = fs::symlink_metadata(&self.path) {
            if m.dev() == self.dev && m.ino() == self.ino {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn bind(path: &Path, auth: &AuthPolicy) -> Result<StdListener, ServerError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(|source| ServerError::CreateDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if StdStream::connect(path).is_ok() {
                return Err(ServerError::InUse { path: path.into() });
            }
            fs::remove_file(path).map_err(|source| ServerError::RemoveStale {
                path: path.into(),
                source,
            })?;
        }
        Ok(_) => return Err(ServerError::NotASocket { path: path.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.into(),
                source,
            })
        }
    }
    let listener = StdListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.into(),
        source,
    })?;
    let mode_err = |source| ServerError::Mode {
        path: path.into(),
        source,
    };
    fs::set_permissions(path, fs::Permissions::from_mode(SOCKET_MODE)).map_err(mode_err)?;
    // Mode 0660 lets the first allowed group in.
    if let Some(&gid) = auth.gids.first() {
        if let Err(e) = std::os::unix::fs::chown(path, None, Some(gid)) {
            log::warn!("control: cannot give {} to gid {gid}: {e}", path.display());
        }
    }
    listener
        .set_nonblocking(true)
        .map_err(|source| ServerError::Bind {
            path: path.into(),
            source,
        })?;
    Ok(listener)
}

async fn accept_loop(listener: UnixListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(conn::serve(stream, shared.clone()));
                }
                Err(e) => {
                    log::warn!("control: accept: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}
