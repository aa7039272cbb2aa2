//! vdiskd's life: read the configuration, open every export, tell systemd
//! we are ready, and on SIGTERM/SIGINT drain, flush and exit 0.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::block::{BlockError, Disk, OpenOptions};
use crate::config::{self, ConfigError, ExportSource, ExportSpec, FileConfig};
use crate::control::{AuthPolicy, EventBus, Server as ControlServer};
use crate::service::Daemon;
use crate::vhost::server::{Server, ServerError};
use crate::vhost::{BlockDevice, DeviceConfig};

#[derive(Debug, Parser)]
#[command(
    name = "vdiskd",
    version,
    about = "vdisk daemon: serves VM disks over vhost-user-blk"
)]
pub struct Args {
    /// Configuration file (TOML). Default /etc/vdisk/vdiskd.toml, if it exists.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where images, volumes and the catalog live.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The control socket.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g.
    /// 127.0.0.1:9337). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// An export: socket=PATH,(file=PATH|null=SIZE|volume=NAME)[,queues=N][,readonly=on|off]
    /// [,serial=TEXT][,block-size=512|4096][,direct=on|off][,engine=io-uring|sync]. Repeatable.
    #[arg(long = "export", value_name = "SPEC")]
    pub exports: Vec<ExportSpec>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("export {name}")]
    Disk { name: String, source: BlockError },
    #[error("export {name}")]
    Server { name: String, source: ServerError },
    #[error("export {name}: volume exports are served by the service (Daemon::start_flag_export)")]
    NoCatalog { name: String },
    #[error("export {name}")]
    Volume {
        name: String,
        source: crate::control::ApiError,
    },
    #[error("two exports use the socket {0}")]
    DuplicateSocket(String),
    #[error("cannot open the state in {path}")]
    Service {
        path: String,
        source: crate::service::StartError,
    },
    #[error("cannot start the control socket")]
    Control(#[source] crate::control::ServerError),
    #[error("cannot serve metrics")]
    Metrics(#[source] crate::control::metrics::MetricsError),
    #[error("cannot create the state directory {path}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// Settings after merging the file and the command line (flags win).
pub struct Settings {
    pub state_dir: PathBuf,
    pub control: PathBuf,
    pub log: Option<String>,
    pub metrics: Option<std::net::SocketAddr>,
    pub pool: crate::pool::PoolConfig,
    pub exports: Vec<ExportSpec>,
}

impl Settings {
    pub fn from_args(args: Args) -> Result<Settings, ConfigError> {
        let file = match &args.config {
            Some(path) => FileConfig::load(path)?,
            None if std::path::Path::new(config::DEFAULT_CONFIG).exists() => {
                FileConfig::load(config::DEFAULT_CONFIG.as_ref())?
            }
            None => FileConfig::default(),
        };
        let mut exports = file.exports()?;
        exports.extend(args.exports);
        Ok(Settings {
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| config::DEFAULT_STATE_DIR.into()),
            control: args
                .control
                .or(file.control)
                .unwrap_or_else(|| config::DEFAULT_CONTROL.into()),
            log: file.log,
            metrics: args.metrics.or(file.metrics),
            pool: match &file.pool {
                Some(p) => p.settings()?,
                None => crate::pool::PoolConfig::default(),
            },
            exports,
        })
    }
}

/// Open one export's disk and device and start serving it. `volume=`
/// exports go through the service instead ([`Daemon::start_flag_export`]).
pub fn start_export(spec: &ExportSpec) -> Result<Server, DaemonError> {
    let name = spec
        .socket
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    let source = match &spec.source {
        ExportSource::Disk(d) => d,
        ExportSource::Volume(_) => return Err(DaemonError::NoCatalog { name }),
    };
    let opts = OpenOptions {
        readonly: spec.readonly,
        direct: spec.direct,
        engine: spec.engine,
    };
    let disk = Disk::open(source, &opts).map_err(|source| DaemonError::Disk {
        name: name.clone(),
        source,
    })?;
    if disk.size() % u64::from(spec.block_size) != 0 {
        log::warn!("export {name}: size {} is not a multiple of block-size {}; the last partial block is unreachable for 4K guests", disk.size(), spec.block_size);
    }
    let cfg = DeviceConfig {
        size: AtomicU64::new(disk.size()),
        num_queues: spec.queues,
        queue_size: crate::vhost::device::MAX_QUEUE_SIZE as u16,
        readonly: spec.readonly,
        block_size: spec.block_size,
        serial: spec.serial_bytes(),
        writeback: AtomicBool::new(true),
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let device = BlockDevice::new(&name, &disk, cfg, mem).map_err(|source| DaemonError::Disk {
        name: name.clone(),
        source,
    })?;
    Server::start(&name, &spec.socket, Arc::new(device), Arc::new(disk))
        .map_err(|source| DaemonError::Server { name, source })
}

/// Run until SIGTERM or SIGINT. Returns once everything is drained and
/// flushed.
pub fn run(settings: Settings) -> Result<(), DaemonError> {
    let mut sockets: Vec<&PathBuf> = settings.exports.iter().map(|e| &e.socket).collect();
    sockets.sort();
    if let Some(w) = sockets.windows(2).find(|w| w[0] == w[1]) {
        return Err(DaemonError::DuplicateSocket(w[0].display().to_string()));
    }
    std::fs::create_dir_all(&settings.state_dir).map_err(|source| DaemonError::StateDir {
        path: settings.state_dir.display().to_string(),
        source,
    })?;
    let mut signals = Signals::new([SIGTERM, SIGINT]).map_err(DaemonError::Signals)?;
    let bus = EventBus::new();
    let socket_dir = settings
        .control
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let service = Arc::new(
        Daemon::open_with(
            &settings.state_dir,
            &socket_dir,
            bus.clone(),
            settings.pool.clone(),
        )
        .map_err(|source| DaemonError::Service {
            path: settings.state_dir.display().to_string(),
            source,
        })?,
    );
    let auth = AuthPolicy::root_and_groups(group_gid(VDISK_GROUP).into_iter().collect());
    let control = match ControlServer::start(&settings.control, service.clone(), bus, auth) {
        Ok(c) => c,
        Err(e) => {
            service.shutdown();
            return Err(DaemonError::Control(e));
        }
    };
    let metrics = match settings.metrics {
        Some(addr) => match crate::control::metrics::serve(addr, service.clone()) {
            Ok(m) => Some(m),
            Err(e) => {
                service.shutdown();
                control.stop();
                return Err(DaemonError::Metrics(e));
            }
        },
        None => None,
    };
    let mut servers = Vec::new();
    for spec in &settings.exports {
        let started = match &spec.source {
            ExportSource::Volume(volume) => {
                service
                    .start_flag_export(spec)
                    .map_err(|source| DaemonError::Volume {
                        name: volume.clone(),
                        source,
                    })
            }
            ExportSource::Disk(_) => start_export(spec).map(|s| servers.push(s)),
        };
        match started {
            Ok(()) => {}
            Err(e) => {
                for s in servers {
                    s.stop();
                }
                if let Some(m) = metrics {
                    m.stop();
                }
                service.shutdown();
                control.stop();
                return Err(e);
            }
        }
    }
    notify_systemd("READY=1");
    log::info!(
        "vdiskd ready: {} file/null export(s), {} volume export(s), control socket {}",
        servers.len(),
        service.export_count(),
        settings.control.display()
    );
    if let Some(sig) = signals.forever().next() {
        log::info!("signal {sig}: draining and flushing");
    }
    notify_systemd("STOPPING=1");
    for s in servers {
        s.stop();
    }
    if let Some(m) = metrics {
        m.stop();
    }
    service.shutdown();
    control.stop();
    log::info!("vdiskd stopped");
    Ok(())
}

/// The group whose members may use the control socket besides root.
pub const VDISK_GROUP: &str = "vdisk";

/// The gid of `name` from /etc/group, if the group exists.
pub fn group_gid(name: &str) -> Option<u32> {
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            log::warn!("sd_notify: {e}");
            return;
        }
    };
    let bytes = path.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    if let Err(e) = result {
        log::warn!("sd_notify {state}: {e}");
    }
}

/// Logging from VDISK_LOG, else the config's `log`, else `info`.
pub fn init_logging(config_level: Option<&str>) {
    let filter = std::env::var("VDISK_LOG")
        .ok()
        .or(config_level.map(str::to_string))
        .unwrap_or_else(|| "info".into());
    env_logger::Builder::new()
        .parse_filters(&filter)
        .format_timestamp_millis()
        .init();
}

/// vdiskd's main: exit code 0 after a clean shutdown, 2 for a bad command
/// line or configuration, 1 for anything else.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let settings = match Settings::from_args(args) {
        Ok(s) => s,
        Err(e) => {
            init_logging(None);
            log::error!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(settings.log.as_deref());
    match run(settings) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            log::error!("{msg}");
            match e {
                DaemonError::Config(_) | DaemonError::DuplicateSocket(_) => {
                    std::process::ExitCode::from(2)
                }
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}
