//! Serving one export on its vhost-user socket: accept a frontend, run the
//! device until it disconnects, drain, and wait for the next one (QEMU's
//! `reconnect=`), until shutdown.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::device::BlockDevice;
use super::events::ExportEvent;
use super::stats::StatsSnapshot;
use crate::block::Disk;

/// Socket files are group-accessible: the hypervisor runs as another user
/// in the socket's group.
pub const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the socket directory {path}")]
    SocketDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: String,
        source: vhost::vhost_user::Error,
    },
    #[error("cannot set the mode of {path}")]
    Chmod {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot start the serving thread")]
    Thread(#[source] std::io::Error),
}

#[derive(Default)]
struct Shared {
    shutting_down: bool,
    connection: Option<ShutdownHandle>,
}

/// A running export.
pub struct Server {
    name: String,
    socket: PathBuf,
    device: Arc<BlockDevice>,
    disk: Arc<Disk>,
    shared: Arc<Mutex<Shared>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Bind the socket (mode 0660) and start accepting frontends.
    pub fn start(
        name: &str,
        socket: &Path,
        device: Arc<BlockDevice>,
        disk: Arc<Disk>,
    ) -> Result<Server, ServerError> {
        let shown = socket.display().to_string();
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ServerError::SocketDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let listener = Listener::new(socket, true).map_err(|source| ServerError::Listen {
            path: shown.clone(),
            source,
        })?;
        std::fs::set_permissions(socket, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(
            |source| ServerError::Chmod {
                path: shown.clone(),
                source,
            },
        )?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let thread = {
            let socket_path = socket.to_path_buf();
            let (name, device, disk, shared) = (
                name.to_string(),
                device.clone(),
                disk.clone(),
                shared.clone(),
            );
            std::thread::Builder::new()
                .name(format!("export-{name}"))
                .spawn(move || serve(&name, &socket_path, listener, &device, &disk, &shared))
                .map_err(ServerError::Thread)?
        };
        log::info!("export {name}: listening on {shown}");
        Ok(Server {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            device,
            disk,
            shared,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn connected(&self) -> bool {
        lock(&self.shared).connection.is_some()
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.device.stats()
    }

    /// The disk grew to `size` bytes: requests up to it are accepted and
    /// the config space reports it from now on.
    pub fn set_capacity(&self, size: u64) {
        self.device.config().set_size(size);
        log::info!("export {}: capacity now {size} bytes", self.name);
    }

    /// Stop: disconnect the frontend, let in-flight I/O finish, make it
    /// durable, remove the socket.
    pub fn stop(mut self) {
        let connected = {
            let mut s = lock(&self.shared);
            s.shutting_down = true;
            match s.connection.take() {
                Some(h) => {
                    h.shutdown();
                    true
                }
                None => false,
            }
        };
        if connected {
            // The serving thread drains the device and syncs the disk.
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else if let Err(e) = self.disk.sync() {
            log::error!("export {}: final flush failed: {e}", self.name);
        }
        let _ = std::fs::remove_file(&self.socket);
        log::info!("export {}: stopped", self.name);
    }
}

fn lock(m: &Mutex<Shared>) -> std::sync::MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(
    name: &str,
    socket: &Path,
    mut listener: Listener,
    device: &Arc<BlockDevice>,
    disk: &Disk,
    shared: &Mutex<Shared>,
) {
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        device.reset(&mem);
        let mut daemon = match VhostUserDaemon::new(format!("vhost-{name}"), device.clone(), mem) {
            Ok(d) => d,
            Err(e) => {
                log::error!("export {name}: cannot set up the device: {e}");
                return;
            }
        };
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            for (fd, token, what) in [
                (device.notifier(i), device.completion_token(), "completions"),
                (device.rescan_fd(i), device.rescan_token(), "rescan timer"),
            ] {
                if let Err(e) = handler.register_listener(fd, EventSet::IN, token) {
                    log::error!("export {name}: cannot watch queue {i}'s {what}: {e}");
                    return;
                }
            }
        }
        if let Err(e) = daemon.start(&mut listener) {
            log::error!("export {name}: accepting a frontend failed: {e}");
            continue;
        }
        {
            let mut s = lock(shared);
            if s.shutting_down {
                return;
            }
            s.connection = daemon.shutdown_handle();
        }
        let peer_pid = crate::sys::unix_socket_peers(socket).first().copied();
        match peer_pid {
            Some(pid) => log::info!("export {name}: frontend connected (pid {pid})"),
            None => log::info!("export {name}: frontend connected"),
        }
        device.reporter().send(ExportEvent::Connected { peer_pid });
        match daemon.wait() {
            Ok(()) => log::info!("export {name}: frontend disconnected"),
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => log::info!("export {name}: frontend disconnected"),
            Err(e) => log::warn!("export {name}: connection ended: {e}"),
        }
        device.reporter().send(ExportEvent::Disconnected);
        // Dropping the daemon stops and joins the queue workers.
        drop(daemon);
        device.reset(&GuestMemoryAtomic::new(GuestMemoryMmap::new()));
        if let Err(e) = disk.sync() {
            log::error!("export {name}: flush after disconnect failed: {e}");
        }
        let mut s = lock(shared);
        s.connection = None;
        if s.shutting_down {
            return;
        }
    }
}
