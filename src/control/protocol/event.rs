//! Events streamed to `watch` connections, and progress of long calls.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// How far a long call (fetch, full copy) has got, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub done: u64,
    /// Unknown for a download without a length.
    pub total: Option<u64>,
}

impl Progress {
    pub fn finished(&self) -> bool {
        self.total.is_some_and(|t| self.done >= t)
    }
}

/// One event: `{"type": …, "at": <unix ms>, …}` on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix time in milliseconds.
    pub at: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

impl Event {
    /// An event stamped with the current time.
    pub fn now(kind: EventKind) -> Event {
        Event {
            at: unix_ms(),
            kind,
        }
    }
}

impl From<EventKind> for Event {
    fn from(kind: EventKind) -> Event {
        Event::now(kind)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "image.imported")]
    ImageImported {
        digest: String,
        name: Option<String>,
    },
    /// Published by the control server while `image.fetch` runs.
    #[serde(rename = "image.fetch_progress")]
    ImageFetchProgress {
        url: String,
        done: u64,
        total: Option<u64>,
    },
    #[serde(rename = "image.removed")]
    ImageRemoved { digest: String },
    /// A cached image that no volume used and no pool entry wanted was
    /// removed to restore the pool's reserve.
    #[serde(rename = "image.evicted")]
    ImageEvicted { digest: String, reason: String },
    #[serde(rename = "volume.created")]
    VolumeCreated { name: String },
    /// Published by the control server while a full copy runs.
    #[serde(rename = "volume.copy_progress")]
    VolumeCopyProgress {
        name: String,
        done: u64,
        total: Option<u64>,
    },
    #[serde(rename = "volume.deleted")]
    VolumeDeleted { name: String },
    /// The volume grew to `size` bytes; `live` when it is exported (the
    /// guest sees the new size once its VMM re-reads the device config).
    #[serde(rename = "volume.grown")]
    VolumeGrown {
        name: String,
        size: u64,
        old_size: u64,
        live: bool,
    },
    #[serde(rename = "export.started")]
    ExportStarted { volume: String, socket: PathBuf },
    #[serde(rename = "export.stopped")]
    ExportStopped { volume: String },
    /// A VMM connected; `peer_pid` when the socket's credentials give it.
    #[serde(rename = "export.connected")]
    ExportConnected {
        volume: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer_pid: Option<u32>,
    },
    #[serde(rename = "export.disconnected")]
    ExportDisconnected { volume: String },
    /// The pool's filler made a ready copy of `image`.
    #[serde(rename = "pool.copy_ready")]
    PoolCopyReady { image: String },
    /// `volume` was made by claiming a ready copy of `image`.
    #[serde(rename = "pool.claimed")]
    PoolClaimed { image: String, volume: String },
    /// A ready copy of `image` was deleted to give space back.
    #[serde(rename = "pool.evicted")]
    PoolEvicted { image: String, reason: String },
    /// I/O on the volume failed (a full disk, a failing device); at most
    /// one per export every 10 s, `message` counting the ones in between.
    #[serde(rename = "export.io_error")]
    ExportIoError { volume: String, message: String },
    /// A flush of the volume's disk failed: every later flush fails until
    /// the export is restarted (`reason` says why).
    #[serde(rename = "export.flush_failed")]
    ExportFlushFailed { volume: String, reason: String },
    /// Progress of any other long call.
    #[serde(rename = "progress")]
    Progress {
        method: String,
        done: u64,
        total: Option<u64>,
    },
    /// Sent to one watcher only: it read too slowly and `missed` events
    /// were dropped for it.
    #[serde(rename = "lagged")]
    Lagged { missed: u64 },
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
