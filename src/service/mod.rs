//! The daemon's storage logic behind the control socket: the catalog, the
//! image cache, volumes under `<state>/volumes/<name>/` and the running
//! exports. `control/` parses and routes calls; this module carries them
//! out (see [`crate::control::Service`]).

mod errors;
pub mod files;

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::block::{Disk, DiskSource, EngineKind, OpenOptions, Overlay};
use crate::cache::ImageCache;
use crate::catalog::{self, Catalog, ExportRecord, ImageRecord, VolumeKind, VolumeRecord};
use crate::catalog::{CopyState, PoolCopy, PoolEntry};
use crate::config::{ExportSource, ExportSpec};
use crate::control::protocol::{
    CacheStats, Done, ExportInfo, ExportList, ExportStart, ImageFormat, ImageInfo, ImageList,
    IoCounters, RawExported, VolumeCreate, VolumeInfo, VolumeList, VolumeStats,
};
use crate::control::protocol::{PoolInfo, PoolList, PoolSet};
use crate::control::{
    ApiError, Call, ErrorCode, EventBus, EventKind, Progress, Response, Service, StatsResult,
};
use crate::pool::{Filler, PoolConfig, PoolEvent};
use crate::vhost::config::ID_BYTES;
use crate::vhost::events::ExportEvent;
use crate::vhost::server::Server;
use crate::vhost::stats::{Rates, StatsSnapshot};
use crate::vhost::{BlockDevice, DeviceConfig};

pub use errors::{cache_err, catalog_err, io_api};

/// Where the volumes live under the state directory.
pub const VOLUMES_DIR: &str = "volumes";
/// A volume's data file (raw content, or an overlay's clusters).
pub const DATA_FILE: &str = "data";
/// An overlay volume's allocation bitmap.
pub const BITMAP_FILE: &str = "bitmap";
/// The bitmap of an overlay being grown, until it replaces [`BITMAP_FILE`].
pub const GROWN_BITMAP_FILE: &str = "bitmap.grown";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Catalog(#[from] catalog::CatalogError),
    #[error(transparent)]
    Pool(#[from] crate::pool::PoolError),
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
    #[error("cannot create {path}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
}

/// A running export.
struct Running {
    rec: ExportRecord,
    server: Server,
    disk: Arc<Disk>,
    /// Recorded in the catalog (started by `export.start`), as opposed to
    /// a `--export volume=` flag.
    persistent: bool,
    /// The counters at the start of the current sampling interval, and the
    /// rates of the last whole one.
    sample: Mutex<Sample>,
}

/// Rates are taken over at least this long: `stats` calls (and scrapes)
/// closer together than this see the same figures; further apart, the
/// average since the previous one, as Prometheus's `rate()` would.
pub const SAMPLE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

struct Sample {
    at: std::time::Instant,
    counters: StatsSnapshot,
    rates: Rates,
}

impl Running {
    /// The rates of the last sampling interval, starting a new one when
    /// the current one is at least [`SAMPLE_INTERVAL`] old.
    fn rates(&self) -> Rates {
        let mut s = self.sample.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        let dt = now.duration_since(s.at);
        if dt >= SAMPLE_INTERVAL {
            let cur = self.server.stats();
            s.rates = Rates::between(&s.counters, &cur, dt);
            s.counters = cur;
            s.at = now;
        }
        s.rates
    }
}

/// How an export serves its disk beyond what the catalog records.
struct ServeOptions {
    block_size: u32,
    direct: bool,
    engine: Option<EngineKind>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            block_size: 512,
            direct: false,
            engine: None,
        }
    }
}

/// The service vdiskd runs: implements [`Service`].
pub struct Daemon {
    volumes_dir: PathBuf,
    /// Default directory for export sockets (the control socket's).
    socket_dir: PathBuf,
    catalog: Arc<Catalog>,
    cache: ImageCache,
    bus: EventBus,
    /// Running exports by volume. Held across every volume or export
    /// change, so that those take turns, but never across long work (a
    /// full copy, `export-raw`): that marks its volume in `busy` instead
    /// and runs without it, so exports, stats and metrics go on.
    exports: Mutex<HashMap<String, Running>>,
    /// Volumes with long work running, and what it is. Taken after
    /// `exports` when both are needed.
    busy: Mutex<HashMap<String, &'static str>>,
    /// Ready copies: where they live, the settings, and the thread that
    /// makes them.
    pool_dir: PathBuf,
    pool_config: PoolConfig,
    filler: Mutex<Option<Filler>>,
    /// Ready copies evicted since start to restore the reserve, and given
    /// back because their entry wanted fewer, for the metrics.
    pool_evictions: Arc<std::sync::atomic::AtomicU64>,
    pool_trims: Arc<std::sync::atomic::AtomicU64>,
}

/// A volume marked busy until this is dropped.
struct Busy<'a> {
    daemon: &'a Daemon,
    name: String,
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.daemon
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.name);
    }
}

impl Daemon {
    /// Open the catalog and the image cache under `state_dir`, roll back
    /// volumes a crash left half-made, and restart every recorded export.
    pub fn open(state_dir: &Path, socket_dir: &Path, bus: EventBus) -> Result<Daemon, StartError> {
        Daemon::open_with(state_dir, socket_dir, bus, PoolConfig::default())
    }

    /// [`Daemon::open`] with the `[pool]` settings.
    pub fn open_with(
        state_dir: &Path,
        socket_dir: &Path,
        bus: EventBus,
        pool_config: PoolConfig,
    ) -> Result<Daemon, StartError> {
        let catalog = Arc::new(Catalog::open(state_dir)?);
        let cache = ImageCache::open(state_dir, catalog.clone(), None)?;
        let volumes_dir = state_dir.join(VOLUMES_DIR);
        std::fs::create_dir_all(&volumes_dir).map_err(|source| StartError::Dir {
            path: volumes_dir.display().to_string(),
            source,
        })?;
        let d = Daemon {
            volumes_dir,
            socket_dir: socket_dir.to_path_buf(),
            catalog,
            cache,
            bus,
            exports: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            pool_dir: state_dir.join(crate::pool::POOL_DIR),
            pool_config,
            filler: Mutex::new(None),
            pool_evictions: Arc::default(),
            pool_trims: Arc::default(),
        };
        for v in d.catalog.incomplete_volumes()? {
            log::warn!(
                "volume {}: left half-made by a crash, rolling it back",
                v.name
            );
            let dir = d.volume_dir(&v.name);
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::error!("volume {}: cannot remove {}: {e}", v.name, dir.display());
                }
            }
            d.catalog.remove_volume(&v.name)?;
        }
        d.finish_grows()?;
        let recs = d.catalog.exports()?;
        let mut running = d.lock();
        for rec in recs {
            match d.start_server(&rec, &ServeOptions::default(), true) {
                Ok(r) => {
                    running.insert(rec.volume.clone(), r);
                }
                Err(e) => log::error!("export {}: cannot restart: {e}", rec.volume),
            }
        }
        drop(running);
        d.start_pool()?;
        Ok(d)
    }

    /// Clean up what a crash left in the pool and start the filler.
    fn start_pool(&self) -> Result<(), StartError> {
        crate::pool::recover(&self.catalog, &self.pool_dir)?;
        let (_, total) =
            crate::pool::fs_space(&self.pool_dir).map_err(|e| crate::pool::PoolError::Io {
                op: "statvfs",
                path: self.pool_dir.display().to_string(),
                source: e,
            })?;
        let reserve = self.pool_config.reserve.bytes(total);
        if reserve >= total {
            return Err(crate::pool::PoolError::Config(format!(
                "reserve of {reserve} bytes is not smaller than the file system of {} ({total} bytes)",
                self.pool_dir.display()
            ))
            .into());
        }
        let images = self.cache.dir().to_path_buf();
        let bus = self.bus.clone();
        let evictions = self.pool_evictions.clone();
        let trims = self.pool_trims.clone();
        let filler = Filler::start(crate::pool::FillerContext {
            catalog: self.catalog.clone(),
            dir: self.pool_dir.clone(),
            config: self.pool_config.clone(),
            image_path: Box::new(move |digest| images.join(digest)),
            events: Box::new(move |e| {
                let kind = match e {
                    PoolEvent::CopyReady { digest } => EventKind::PoolCopyReady { image: digest },
                    PoolEvent::Evicted {
                        digest,
                        reason,
                        trimmed,
                    } => {
                        if trimmed {
                            trims.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        } else {
                            evictions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        EventKind::PoolEvicted {
                            image: digest,
                            reason,
                        }
                    }
                    PoolEvent::ImageEvicted { digest, reason } => {
                        EventKind::ImageEvicted { digest, reason }
                    }
                };
                bus.publish(kind.into());
            }),
        })
        .map_err(|e| crate::pool::PoolError::Io {
            op: "start the filler for",
            path: self.pool_dir.display().to_string(),
            source: e,
        })?;
        *self.filler.lock().unwrap_or_else(|e| e.into_inner()) = Some(filler);
        Ok(())
    }

    fn wake_filler(&self) {
        if let Some(f) = self
            .filler
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            f.wake();
        }
    }

    /// Serve a `--export volume=NAME` from the command line. It is not
    /// recorded in the catalog (the flag brings it back at the next start)
    /// but counts as exported like any other.
    pub fn start_flag_export(&self, spec: &ExportSpec) -> Result<(), ApiError> {
        let ExportSource::Volume(volume) = &spec.source else {
            return Err(ApiError::new(ErrorCode::BadRequest, "not a volume export"));
        };
        let rec = ExportRecord {
            volume: volume.clone(),
            socket: spec.socket.clone(),
            queues: spec.queues,
            readonly: spec.readonly,
            serial: spec.serial.clone(),
        };
        let serve = ServeOptions {
            block_size: spec.block_size,
            direct: spec.direct,
            engine: spec.engine,
        };
        let mut running = self.lock();
        self.check_free(&running, &rec)?;
        let r = self.start_server(&rec, &serve, false)?;
        running.insert(rec.volume.clone(), r);
        Ok(())
    }

    fn check_free(
        &self,
        running: &HashMap<String, Running>,
        rec: &ExportRecord,
    ) -> Result<(), ApiError> {
        if running.contains_key(&rec.volume) {
            return Err(ApiError::new(
                ErrorCode::Exists,
                format!("volume `{}` is already exported", rec.volume),
            ));
        }
        if running.values().any(|r| r.rec.socket == rec.socket) {
            return Err(ApiError::new(
                ErrorCode::Exists,
                format!(
                    "socket {} is in use by another export",
                    rec.socket.display()
                ),
            ));
        }
        Ok(())
    }

    /// How many exports are being served.
    pub fn export_count(&self) -> usize {
        self.lock().len()
    }

    /// Stop every export (drain, flush, remove the sockets). The catalog
    /// keeps them: they come back at the next start.
    pub fn shutdown(&self) {
        if let Some(mut f) = self.filler.lock().unwrap_or_else(|e| e.into_inner()).take() {
            f.stop();
        }
        let running: Vec<Running> = self.lock().drain().map(|(_, r)| r).collect();
        for r in running {
            r.server.stop();
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Running>> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks `name` busy with `what` (call with `exports` held, so that
    /// the checks made under it still hold); refused if it already is.
    fn mark_busy(&self, name: &str, what: &'static str) -> Result<Busy<'_>, ApiError> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(doing) = busy.get(name) {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume `{name}` is busy: {doing}"),
            ));
        }
        busy.insert(name.to_string(), what);
        Ok(Busy {
            daemon: self,
            name: name.to_string(),
        })
    }

    /// Refused while long work runs on `name` (call with `exports` held).
    fn check_not_busy(&self, name: &str) -> Result<(), ApiError> {
        match self
            .busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            Some(doing) => Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume `{name}` is busy: {doing}"),
            )),
            None => Ok(()),
        }
    }

    fn volume_dir(&self, name: &str) -> PathBuf {
        self.volumes_dir.join(name)
    }

    fn disk_source(&self, v: &VolumeRecord) -> DiskSource {
        match v.kind {
            VolumeKind::Overlay => DiskSource::Overlay {
                data: v.path.clone(),
                bitmap: self.volume_dir(&v.name).join(BITMAP_FILE),
                base: v.base.as_ref().map(|d| self.cache.path(d)),
            },
            VolumeKind::Empty | VolumeKind::Full => DiskSource::File(v.path.clone()),
        }
    }

    fn start_server(
        &self,
        rec: &ExportRecord,
        serve: &ServeOptions,
        persistent: bool,
    ) -> Result<Running, ApiError> {
        let v = self.catalog.volume(&rec.volume).map_err(catalog_err)?;
        if v.state != catalog::VolumeState::Ready {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume `{}` is still being created", v.name),
            ));
        }
        let opts = OpenOptions {
            readonly: rec.readonly,
            direct: serve.direct,
            engine: serve.engine,
        };
        let disk = Disk::open(&self.disk_source(&v), &opts)
            .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?;
        let mut serial = rec
            .serial
            .clone()
            .unwrap_or_else(|| v.name.clone())
            .into_bytes();
        serial.truncate(ID_BYTES);
        let cfg = DeviceConfig {
            size: std::sync::atomic::AtomicU64::new(disk.size()),
            num_queues: rec.queues,
            queue_size: crate::vhost::device::MAX_QUEUE_SIZE as u16,
            readonly: rec.readonly,
            block_size: serve.block_size,
            serial,
            writeback: AtomicBool::new(true),
        };
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let device = BlockDevice::new(&v.name, &disk, cfg, mem)
            .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?;
        // A failed flush is latched by the disk; say so on the event bus.
        let (bus, volume) = (self.bus.clone(), v.name.clone());
        disk.flush_latch().set_observer(Box::new(move |why| {
            bus.publish(
                EventKind::ExportFlushFailed {
                    volume: volume.clone(),
                    reason: why.to_string(),
                }
                .into(),
            );
        }));
        let (bus, volume) = (self.bus.clone(), v.name.clone());
        device.reporter().set_observer(Arc::new(move |e| {
            let kind = match e {
                ExportEvent::Connected { peer_pid } => EventKind::ExportConnected {
                    volume: volume.clone(),
                    peer_pid,
                },
                ExportEvent::Disconnected => EventKind::ExportDisconnected {
                    volume: volume.clone(),
                },
                ExportEvent::IoError { message } => EventKind::ExportIoError {
                    volume: volume.clone(),
                    message,
                },
            };
            bus.publish(kind.into());
        }));
        let disk = Arc::new(disk);
        let server = Server::start(&v.name, &rec.socket, Arc::new(device), disk.clone())
            .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?;
        Ok(Running {
            rec: rec.clone(),
            server,
            disk,
            persistent,
            sample: Mutex::new(Sample {
                at: std::time::Instant::now(),
                counters: StatsSnapshot::default(),
                rates: Rates::default(),
            }),
        })
    }

    fn publish(&self, kind: EventKind) {
        self.bus.publish(kind.into());
    }

    fn volume_info(&self, v: &VolumeRecord, exported: bool) -> VolumeInfo {
        use crate::control::protocol::{VolumeKind as K, VolumeState as S};
        VolumeInfo {
            name: v.name.clone(),
            kind: match v.kind {
                VolumeKind::Overlay => K::Overlay,
                VolumeKind::Empty | VolumeKind::Full => K::Raw,
            },
            base: v.base.clone(),
            size: v.size,
            allocated_bytes: files::allocated(&v.path).unwrap_or(0),
            state: match v.state {
                catalog::VolumeState::Creating => S::Creating,
                catalog::VolumeState::Ready => S::Ready,
            },
            exported,
            from_pool: false,
        }
    }

    fn export_info(r: &Running) -> ExportInfo {
        let s = r.server.stats();
        ExportInfo {
            volume: r.rec.volume.clone(),
            socket: r.rec.socket.clone(),
            queues: r.rec.queues,
            readonly: r.rec.readonly,
            serial: r.rec.serial.clone(),
            connected: r.server.connected(),
            stats: IoCounters {
                reads: s.reads,
                writes: s.writes,
                read_bytes: s.read_bytes,
                write_bytes: s.write_bytes,
                errors: s.errors,
            },
        }
    }

    fn volume_create(
        &self,
        p: &VolumeCreate,
        progress: &dyn Fn(u64, Option<u64>),
    ) -> Result<VolumeInfo, ApiError> {
        let running = self.lock();
        let image = match &p.image {
            Some(i) => Some(self.cache.show(i).map_err(cache_err)?),
            None => None,
        };
        let kind = match (&image, p.full) {
            (None, _) => VolumeKind::Empty,
            (Some(_), false) => VolumeKind::Overlay,
            (Some(_), true) => VolumeKind::Full,
        };
        let image_size = image.as_ref().map_or(0, |i| i.size.next_multiple_of(512));
        let size = match p.size {
            Some(s) if s.0 < image_size => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "size {} is smaller than the image ({image_size} bytes)",
                        s.0
                    ),
                ))
            }
            Some(s) => s.0,
            None => image_size,
        };
        if size == 0 {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "a volume needs a size > 0",
            ));
        }
        let dir = self.volume_dir(&p.name);
        let rec = VolumeRecord {
            name: p.name.clone(),
            kind,
            base: image.as_ref().map(|i| i.digest.clone()),
            size,
            path: dir.join(DATA_FILE),
            state: catalog::VolumeState::Creating,
            created: catalog::unix_now(),
        };
        if kind == VolumeKind::Full {
            if let Some(info) = self.claim_ready_copy(&rec, image.as_ref(), &dir)? {
                return Ok(info);
            }
        }
        self.catalog.begin_volume(&rec).map_err(catalog_err)?;
        // The row says `creating` (no export can start on it) and the
        // volume is busy (no delete or resize): the copy runs unlocked.
        let busy = match self.mark_busy(&rec.name, "being created") {
            Ok(b) => b,
            Err(e) => {
                let _ = self.catalog.remove_volume(&rec.name);
                return Err(e);
            }
        };
        drop(running);
        match self.make_volume_files(&rec, &dir, image.as_ref(), progress) {
            Ok(()) => {}
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                let _ = self.catalog.remove_volume(&rec.name);
                return Err(e);
            }
        }
        self.catalog.finish_volume(&rec.name).map_err(catalog_err)?;
        drop(busy);
        self.publish(EventKind::VolumeCreated {
            name: rec.name.clone(),
        });
        let v = self.catalog.volume(&rec.name).map_err(catalog_err)?;
        Ok(self.volume_info(&v, false))
    }

    /// A full copy from the pool when one is ready: the catalog forgets
    /// the copy and records the volume in one transaction, then the file is
    /// renamed into place. No data is copied. `None` (a miss, counted) when
    /// no copy is ready.
    fn claim_ready_copy(
        &self,
        rec: &VolumeRecord,
        image: Option<&ImageRecord>,
        dir: &Path,
    ) -> Result<Option<VolumeInfo>, ApiError> {
        let Some(copy) = self.catalog.claim_copy(rec).map_err(catalog_err)? else {
            return Ok(None);
        };
        let placed = (|| -> Result<(), ApiError> {
            if dir.exists() {
                std::fs::remove_dir_all(dir).map_err(io_api("remove", dir))?;
            }
            std::fs::create_dir_all(dir).map_err(io_api("create", dir))?;
            std::fs::rename(&copy.path, &rec.path).map_err(io_api("move", &copy.path))?;
            let f = File::options()
                .write(true)
                .open(&rec.path)
                .map_err(io_api("open", &rec.path))?;
            if image.is_some_and(|i| rec.size > i.size) {
                f.set_len(rec.size).map_err(io_api("size", &rec.path))?;
                f.sync_all().map_err(io_api("fsync", &rec.path))?;
            }
            files::sync_dir(dir).map_err(io_api("fsync", dir))?;
            files::sync_dir(&self.volumes_dir).map_err(io_api("fsync", &self.volumes_dir))?;
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = std::fs::remove_dir_all(dir);
            let _ = std::fs::remove_file(&copy.path);
            let _ = self.catalog.remove_volume(&rec.name);
            return Err(e);
        }
        self.catalog.finish_volume(&rec.name).map_err(catalog_err)?;
        self.wake_filler();
        log::info!(
            "volume {}: a ready copy of {} claimed",
            rec.name,
            copy.digest
        );
        self.publish(EventKind::PoolClaimed {
            image: copy.digest.clone(),
            volume: rec.name.clone(),
        });
        self.publish(EventKind::VolumeCreated {
            name: rec.name.clone(),
        });
        let v = self.catalog.volume(&rec.name).map_err(catalog_err)?;
        let mut info = self.volume_info(&v, false);
        info.from_pool = true;
        Ok(Some(info))
    }

    fn pool_info(&self, e: &PoolEntry, copies: &[PoolCopy]) -> Result<PoolInfo, ApiError> {
        let img = self.catalog.image(&e.digest).map_err(catalog_err)?;
        let mine = copies.iter().filter(|c| c.digest == e.digest);
        let ready = mine.clone().filter(|c| c.state == CopyState::Ready).count() as u32;
        let making = mine.filter(|c| c.state == CopyState::Making).count() as u32;
        Ok(PoolInfo {
            digest: e.digest.clone(),
            names: img.names,
            priority: e.priority,
            wanted: crate::pool::wanted(&self.pool_config.rule, e),
            by_rule: e.copies.is_none(),
            ready,
            making,
            bytes_each: img.size,
            hits: e.hits,
            misses: e.misses,
            last_claim: e
                .last_claim
                .map(|s| u64::try_from(s).unwrap_or(0).saturating_mul(1000)),
        })
    }

    fn pool_set(&self, p: &PoolSet) -> Result<PoolInfo, ApiError> {
        let img = self.cache.show(&p.image).map_err(cache_err)?;
        let e = self
            .catalog
            .set_pool(&img.digest, p.priority, p.copies)
            .map_err(catalog_err)?;
        self.wake_filler();
        let copies = self.catalog.pool_copies().map_err(catalog_err)?;
        self.pool_info(&e, &copies)
    }

    fn pool_unset(&self, image: &str) -> Result<(), ApiError> {
        let img = self.cache.show(image).map_err(cache_err)?;
        for c in self.catalog.unset_pool(&img.digest).map_err(catalog_err)? {
            let _ = std::fs::remove_file(&c.path);
        }
        Ok(())
    }

    fn pool_show(&self, image: &str) -> Result<PoolInfo, ApiError> {
        let img = self.cache.show(image).map_err(cache_err)?;
        let e = self
            .catalog
            .pool_entry(&img.digest)
            .map_err(catalog_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("image `{image}` has no pool entry (vdiskctl pool set)"),
                )
            })?;
        let copies = self.catalog.pool_copies().map_err(catalog_err)?;
        self.pool_info(&e, &copies)
    }

    fn pool_stats(&self) -> crate::control::protocol::PoolStats {
        use crate::control::protocol::{PoolImageStats, PoolStats};
        let list = match self.pool_list() {
            Ok(l) => l,
            Err(e) => {
                log::warn!("pool stats: {}", e.message);
                return PoolStats::default();
            }
        };
        PoolStats {
            images: list
                .entries
                .iter()
                .map(|p| PoolImageStats {
                    image: p.names.first().cloned().unwrap_or_else(|| p.digest.clone()),
                    ready: p.ready,
                    wanted: p.wanted,
                    hits: p.hits,
                    misses: p.misses,
                })
                .collect(),
            evictions: self
                .pool_evictions
                .load(std::sync::atomic::Ordering::Relaxed),
            trimmed: self.pool_trims.load(std::sync::atomic::Ordering::Relaxed),
            free_bytes: list.free_bytes,
            reserve_bytes: list.reserve_bytes,
        }
    }

    fn pool_list(&self) -> Result<PoolList, ApiError> {
        let copies = self.catalog.pool_copies().map_err(catalog_err)?;
        let entries = self
            .catalog
            .pool_entries()
            .map_err(catalog_err)?
            .iter()
            .map(|e| self.pool_info(e, &copies))
            .collect::<Result<Vec<_>, _>>()?;
        let (free, total) =
            crate::pool::fs_space(&self.pool_dir).map_err(io_api("statvfs", &self.pool_dir))?;
        Ok(PoolList {
            entries,
            rule: self.pool_config.rule.describe(),
            free_bytes: free,
            reserve_bytes: self.pool_config.reserve.bytes(total),
        })
    }

    fn make_volume_files(
        &self,
        rec: &VolumeRecord,
        dir: &Path,
        image: Option<&ImageRecord>,
        progress: &dyn Fn(u64, Option<u64>),
    ) -> Result<(), ApiError> {
        // A directory left by an earlier failure has no row: it is garbage.
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io_api("remove", dir))?;
        }
        std::fs::create_dir_all(dir).map_err(io_api("create", dir))?;
        let data = dir.join(DATA_FILE);
        match rec.kind {
            VolumeKind::Overlay => {
                Overlay::create(&data, &dir.join(BITMAP_FILE), rec.size)
                    .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?;
            }
            VolumeKind::Empty | VolumeKind::Full => {
                let f = File::options()
                    .write(true)
                    .create_new(true)
                    .open(&data)
                    .map_err(io_api("create", &data))?;
                if let Some(img) = image {
                    let src_path = self.cache.path(&img.digest);
                    let src = File::open(&src_path).map_err(io_api("open", &src_path))?;
                    let reflinked = files::clone_or_copy(&src, &f, &|done, total| {
                        progress(done, total);
                        self.publish(EventKind::VolumeCopyProgress {
                            name: rec.name.clone(),
                            done,
                            total,
                        });
                    })
                    .map_err(io_api("copy into", &data))?;
                    log::info!(
                        "volume {}: full copy of {} by {}",
                        rec.name,
                        img.digest,
                        if reflinked { "reflink" } else { "sparse copy" }
                    );
                }
                f.set_len(rec.size).map_err(io_api("size", &data))?;
                f.sync_all().map_err(io_api("fsync", &data))?;
            }
        }
        files::sync_dir(dir).map_err(io_api("fsync", dir))?;
        files::sync_dir(&self.volumes_dir).map_err(io_api("fsync", &self.volumes_dir))?;
        Ok(())
    }

    fn volume_delete(&self, name: &str) -> Result<(), ApiError> {
        let running = self.lock();
        self.check_not_busy(name)?;
        if running.contains_key(name) {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume `{name}` is exported; stop the export first"),
            ));
        }
        self.catalog.remove_volume(name).map_err(catalog_err)?;
        let dir = self.volume_dir(name);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_api("remove", &dir)(e)),
        }
        drop(running);
        self.publish(EventKind::VolumeDeleted { name: name.into() });
        Ok(())
    }

    fn volume_resize(&self, name: &str, size: u64) -> Result<VolumeInfo, ApiError> {
        let running = self.lock();
        self.check_not_busy(name)?;
        let v = self.catalog.volume(name).map_err(catalog_err)?;
        if size < v.size {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("volumes only grow: `{name}` has {} bytes", v.size),
            ));
        }
        if !size.is_multiple_of(512) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("size {size} is not a multiple of 512"),
            ));
        }
        if size > v.size {
            let live = match running.get(name) {
                // Live: the disk grows under its queues, then the device
                // accepts the new range and its config space says so.
                Some(r) => {
                    let grown = self.volume_dir(name).join(GROWN_BITMAP_FILE);
                    r.disk.grow(size, &grown).map_err(|e| match e {
                        crate::block::GrowError::Io(e) => io_api("grow", &v.path)(e),
                        other => ApiError::new(ErrorCode::BadRequest, format!("`{name}`: {other}")),
                    })?;
                    r.server.set_capacity(size);
                    true
                }
                None => {
                    match v.kind {
                        VolumeKind::Overlay => self.grow_overlay(&v, size)?,
                        VolumeKind::Empty | VolumeKind::Full => {
                            let f = File::options()
                                .write(true)
                                .open(&v.path)
                                .map_err(io_api("open", &v.path))?;
                            f.set_len(size).map_err(io_api("resize", &v.path))?;
                            f.sync_all().map_err(io_api("fsync", &v.path))?;
                        }
                    }
                    false
                }
            };
            self.catalog
                .set_volume_size(name, size)
                .map_err(catalog_err)?;
            self.publish(EventKind::VolumeGrown {
                name: name.into(),
                size,
                old_size: v.size,
                live,
            });
        }
        let v = self.catalog.volume(name).map_err(catalog_err)?;
        Ok(self.volume_info(&v, running.contains_key(name)))
    }

    /// Grow an overlay that is not exported: a new bitmap beside the old
    /// one, the data file extended, the new bitmap renamed over the old
    /// ([`Overlay::write_grown_bitmap`]; [`Daemon::finish_grows`] completes
    /// or undoes one a crash interrupted).
    fn grow_overlay(&self, v: &VolumeRecord, size: u64) -> Result<(), ApiError> {
        let DiskSource::Overlay { data, bitmap, base } = self.disk_source(v) else {
            unreachable!("an overlay volume has an overlay source")
        };
        let dir = self.volume_dir(&v.name);
        let new = dir.join(GROWN_BITMAP_FILE);
        let _ = std::fs::remove_file(&new);
        let ov = Overlay::open(&data, &bitmap, base.as_deref())
            .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?;
        if let Err(e) = ov.write_grown_bitmap(&new, size) {
            let _ = std::fs::remove_file(&new);
            return Err(ApiError::new(ErrorCode::Io, errors::chain(&e)));
        }
        drop(ov);
        let f = File::options()
            .write(true)
            .open(&data)
            .map_err(io_api("open", &data))?;
        if let Err(e) = f.set_len(size).and_then(|_| f.sync_all()) {
            let _ = f.set_len(v.size);
            let _ = std::fs::remove_file(&new);
            return Err(io_api("grow", &data)(e));
        }
        std::fs::rename(&new, &bitmap).map_err(io_api("rename", &new))?;
        files::sync_dir(&dir).map_err(io_api("fsync", &dir))?;
        Ok(())
    }

    /// Complete or undo overlay growths a crash interrupted, and bring the
    /// catalog's size in line with the data file.
    fn finish_grows(&self) -> Result<(), StartError> {
        for v in self.catalog.volumes()? {
            if v.kind != VolumeKind::Overlay {
                continue;
            }
            let dir = self.volume_dir(&v.name);
            let new = dir.join(GROWN_BITMAP_FILE);
            if new.exists() {
                if Overlay::open(&v.path, &new, None).is_ok() {
                    log::warn!("volume {}: completing a growth a crash interrupted", v.name);
                    if let Err(e) = std::fs::rename(&new, dir.join(BITMAP_FILE)) {
                        log::error!("volume {}: {e}", v.name);
                    }
                } else {
                    log::warn!("volume {}: undoing a growth a crash interrupted", v.name);
                    let _ = std::fs::remove_file(&new);
                }
            }
            if let Ok(m) = std::fs::metadata(&v.path) {
                if m.len() > v.size {
                    self.catalog.set_volume_size(&v.name, m.len())?;
                }
            }
        }
        Ok(())
    }

    fn volume_export_raw(
        &self,
        name: &str,
        file: &Path,
        progress: &dyn Fn(u64, Option<u64>),
    ) -> Result<RawExported, ApiError> {
        let running = self.lock();
        let v = self.catalog.volume(name).map_err(catalog_err)?;
        // The copy runs without the exports lock; the volume is busy (no
        // delete or resize), and a running export's disk is kept open here.
        let _busy = self.mark_busy(name, "being exported to a raw file")?;
        let live = running.get(name).map(|r| r.disk.clone());
        drop(running);
        if v.state != catalog::VolumeState::Ready {
            return Err(ApiError::new(
                ErrorCode::InUse,
                format!("volume `{name}` is still being created"),
            ));
        }
        let dst = File::options()
            .write(true)
            .create_new(true)
            .open(file)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ApiError::new(ErrorCode::Exists, format!("{} exists", file.display()))
                } else if e.raw_os_error() == Some(libc::EROFS) {
                    // Under the shipped systemd unit (ProtectSystem=strict)
                    // only the state directory is writable.
                    ApiError::new(
                        ErrorCode::Io,
                        format!(
                            "cannot create {}: read-only file system; under vdiskd.service \
                             write under /var/lib/vdisk/exports, or allow the directory \
                             with ReadWritePaths= in a drop-in",
                            file.display()
                        ),
                    )
                } else {
                    io_api("create", file)(e)
                }
            })?;
        let result = (|| -> Result<(), ApiError> {
            let data = File::open(&v.path).map_err(io_api("open", &v.path))?;
            match v.kind {
                VolumeKind::Overlay => {
                    let live = live.as_ref().and_then(|d| d.overlay().cloned());
                    let ov = match live {
                        Some(ov) => {
                            ov.flush().map_err(io_api("flush", &v.path))?;
                            ov
                        }
                        None => {
                            let DiskSource::Overlay { data, bitmap, base } = self.disk_source(&v)
                            else {
                                unreachable!("an overlay volume has an overlay source")
                            };
                            Arc::new(
                                Overlay::open(&data, &bitmap, base.as_deref())
                                    .map_err(|e| ApiError::new(ErrorCode::Io, errors::chain(&e)))?,
                            )
                        }
                    };
                    let base = match &v.base {
                        Some(d) => {
                            let p = self.cache.path(d);
                            Some(File::open(&p).map_err(io_api("open", &p))?)
                        }
                        None => None,
                    };
                    files::flatten_overlay(&ov, &data, base.as_ref(), &dst, progress)
                        .map_err(io_api("write", file))?;
                }
                VolumeKind::Empty | VolumeKind::Full => {
                    if let Some(d) = &live {
                        d.sync().map_err(io_api("flush", &v.path))?;
                    }
                    files::clone_or_copy(&data, &dst, progress).map_err(io_api("write", file))?;
                }
            }
            dst.sync_all().map_err(io_api("fsync", file))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(file);
            return Err(e);
        }
        Ok(RawExported {
            name: name.into(),
            file: file.to_path_buf(),
            size: v.size,
        })
    }

    fn export_start(&self, p: &ExportStart) -> Result<ExportInfo, ApiError> {
        let mut running = self.lock();
        let rec = ExportRecord {
            volume: p.volume.clone(),
            socket: p
                .socket
                .clone()
                .unwrap_or_else(|| self.socket_dir.join(format!("{}.sock", p.volume))),
            queues: p.queues.unwrap_or(1),
            readonly: p.readonly,
            serial: p.serial.clone(),
        };
        if running.values().any(|r| r.rec.socket == rec.socket) {
            return Err(ApiError::new(
                ErrorCode::Exists,
                format!(
                    "socket {} is in use by another export",
                    rec.socket.display()
                ),
            ));
        }
        // The catalog checks the volume and the socket first; the row is
        // removed again if the server cannot start.
        self.catalog.put_export(&rec).map_err(catalog_err)?;
        let r = match self.start_server(&rec, &ServeOptions::default(), true) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.catalog.remove_export(&rec.volume);
                return Err(e);
            }
        };
        let info = Self::export_info(&r);
        running.insert(rec.volume.clone(), r);
        drop(running);
        self.publish(EventKind::ExportStarted {
            volume: rec.volume,
            socket: rec.socket,
        });
        Ok(info)
    }

    fn export_stop(&self, volume: &str) -> Result<(), ApiError> {
        let mut running = self.lock();
        let Some(r) = running.remove(volume) else {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("volume `{volume}` is not exported"),
            ));
        };
        r.server.stop();
        if r.persistent {
            self.catalog.remove_export(volume).map_err(catalog_err)?;
        }
        drop(running);
        self.publish(EventKind::ExportStopped {
            volume: volume.into(),
        });
        Ok(())
    }
}

fn image_info(r: ImageRecord) -> ImageInfo {
    ImageInfo {
        digest: r.digest,
        names: r.names,
        size: r.size,
        format: if r.format == "qcow2" {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        },
        source: r.source,
        // The catalog keeps Unix seconds; the protocol speaks milliseconds,
        // as events do.
        created: u64::try_from(r.created).unwrap_or(0).saturating_mul(1000),
    }
}

impl Service for Daemon {
    fn call(&self, call: Call, progress: &dyn Fn(Progress)) -> Result<Response, ApiError> {
        let prog = |done: u64, total: Option<u64>| progress(Progress { done, total });
        Ok(match call {
            Call::ImageImport(p) => {
                let r = self
                    .cache
                    .import(&p.file, p.name.as_deref(), &prog)
                    .map_err(cache_err)?;
                self.publish(EventKind::ImageImported {
                    digest: r.digest.clone(),
                    name: p.name,
                });
                Response::Image(image_info(r))
            }
            Call::ImageFetch(p) => {
                let r = self
                    .cache
                    .fetch(&p.url, &p.sha256, p.name.as_deref(), &|done, total| {
                        prog(done, total);
                        self.publish(EventKind::ImageFetchProgress {
                            url: p.url.clone(),
                            done,
                            total,
                        });
                    })
                    .map_err(cache_err)?;
                self.publish(EventKind::ImageImported {
                    digest: r.digest.clone(),
                    name: p.name,
                });
                Response::Image(image_info(r))
            }
            Call::ImageList(_) => Response::Images(ImageList {
                images: self
                    .cache
                    .list()
                    .map_err(cache_err)?
                    .into_iter()
                    .map(image_info)
                    .collect(),
            }),
            Call::ImageShow(p) => {
                Response::Image(image_info(self.cache.show(&p.image).map_err(cache_err)?))
            }
            Call::ImageRemove(p) => {
                let r = self.cache.remove(&p.image).map_err(cache_err)?;
                self.publish(EventKind::ImageRemoved { digest: r.digest });
                Response::Done(Done {})
            }
            Call::VolumeCreate(p) => Response::Volume(self.volume_create(&p, &prog)?),
            Call::VolumeList(_) => {
                let running = self.lock();
                let volumes = self
                    .catalog
                    .volumes()
                    .map_err(catalog_err)?
                    .iter()
                    .map(|v| self.volume_info(v, running.contains_key(&v.name)))
                    .collect();
                Response::Volumes(VolumeList { volumes })
            }
            Call::VolumeShow(p) => {
                let running = self.lock();
                let v = self.catalog.volume(&p.name).map_err(catalog_err)?;
                Response::Volume(self.volume_info(&v, running.contains_key(&v.name)))
            }
            Call::VolumeDelete(p) => {
                self.volume_delete(&p.name)?;
                Response::Done(Done {})
            }
            Call::VolumeResize(p) => Response::Volume(self.volume_resize(&p.name, p.size.0)?),
            Call::VolumeExportRaw(p) => {
                Response::RawExported(self.volume_export_raw(&p.name, &p.file, &prog)?)
            }
            Call::ExportStart(p) => Response::Export(self.export_start(&p)?),
            Call::ExportStop(p) => {
                self.export_stop(&p.volume)?;
                Response::Done(Done {})
            }
            Call::ExportList(_) => {
                let running = self.lock();
                let mut exports: Vec<ExportInfo> =
                    running.values().map(Self::export_info).collect();
                exports.sort_by(|a, b| a.volume.cmp(&b.volume));
                Response::Exports(ExportList { exports })
            }
            Call::PoolSet(p) => Response::Pool(self.pool_set(&p)?),
            Call::PoolUnset(p) => {
                self.pool_unset(&p.image)?;
                Response::Done(Done {})
            }
            Call::PoolShow(p) => Response::Pool(self.pool_show(&p.image)?),
            Call::PoolList(_) => Response::Pools(self.pool_list()?),
            Call::Stats(_) | Call::Watch(_) | Call::Version(_) => {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("{} is answered by the control server", call.method()),
                ))
            }
        })
    }

    fn metrics(&self) -> StatsResult {
        let running = self.lock();
        let mut volumes: Vec<VolumeStats> = running
            .values()
            .map(|r| {
                let rates = r.rates();
                VolumeStats {
                    volume: r.rec.volume.clone(),
                    io: Self::export_info(r).stats,
                    read_iops: rates.read_iops,
                    write_iops: rates.write_iops,
                    read_bytes_per_sec: rates.read_bytes_per_sec,
                    write_bytes_per_sec: rates.write_bytes_per_sec,
                    latency_p50_us: rates.p50_us,
                    latency_p99_us: rates.p99_us,
                    flush_error: r.disk.flush_latch().reason().map(str::to_string),
                }
            })
            .collect();
        drop(running);
        volumes.sort_by(|a, b| a.volume.cmp(&b.volume));
        let cache = match self.cache.usage() {
            Ok(u) => CacheStats {
                budget: u.budget,
                used_bytes: u.used_bytes,
                images: u.images as u64,
                fs_free_bytes: u.fs_free_bytes,
            },
            Err(e) => {
                log::warn!("cache usage: {e}");
                CacheStats::default()
            }
        };
        StatsResult {
            volumes,
            cache,
            pool: self.pool_stats(),
        }
    }
}

#[cfg(test)]
mod tests;
