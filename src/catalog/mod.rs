//! The persistent catalog: which images, volumes and exports exist.
//!
//! One SQLite database, `<state-dir>/catalog.db`, in WAL mode with
//! `synchronous=FULL`: a change is on disk when its call returns. Every
//! call that changes something is one transaction, so a failure part-way
//! (or a crash) leaves the catalog as it was before the call.
//!
//! The catalog only records; it never touches image or volume files. The
//! cache and the volume code order their file work around it (a file is
//! made before its row is written, and its row is deleted before the file).

mod exports;
mod images;
mod pool;
mod records;
mod schema;
mod volumes;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, Transaction, TransactionBehavior};

pub use images::check_image_name;
pub use pool::{CopyState, PoolCopy, PoolEntry, MAX_COPIES};
pub use records::{ExportRecord, ImageRecord, VolumeKind, VolumeRecord, VolumeState};
pub use schema::SCHEMA_VERSION;

/// The database file's name inside the state directory.
pub const CATALOG_FILE: &str = "catalog.db";

/// How long a call waits for another connection's write lock (another
/// process holding the database, such as an operator's `sqlite3` shell)
/// before giving up with an error.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Shortest digest prefix that `image()` resolves: 12 hex characters
/// (48 bits) make an accidental collision among a host's images unlikely.
pub const MIN_DIGEST_PREFIX: usize = 12;

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot create state directory {path}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open catalog {path}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("catalog: {op} failed")]
    Db {
        op: &'static str,
        source: rusqlite::Error,
    },
    #[error("catalog schema version {found} is newer than this vdisk supports ({supported})")]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("bad name `{name}`: {why}")]
    BadName { name: String, why: &'static str },
    #[error("bad digest `{0}`: expected 64 lowercase hex characters (a sha256)")]
    BadDigest(String),
    #[error("bad {what} `{name}`: {why}")]
    Invalid {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("no {what} `{name}`")]
    NotFound { what: &'static str, name: String },
    #[error("`{prefix}` matches several images: {}", .matches.join(", "))]
    Ambiguous {
        prefix: String,
        matches: Vec<String>,
    },
    #[error("{what} `{name}` already exists")]
    Exists { what: &'static str, name: String },
    #[error("in use by {}", .dependants.join(", "))]
    InUse { dependants: Vec<String> },
    #[error("{what} {value} is too large for the catalog (at most 2^63 - 1)")]
    TooLarge { what: &'static str, value: u64 },
    #[error("catalog table {table}, row `{key}`: {why}")]
    Corrupt {
        table: &'static str,
        key: String,
        why: String,
    },
}

/// Map a SQLite error to [`CatalogError::Db`] naming the operation.
pub(crate) fn db(op: &'static str) -> impl FnOnce(rusqlite::Error) -> CatalogError {
    move |source| CatalogError::Db { op, source }
}

/// The catalog. `Send + Sync`: calls from several threads take turns on
/// one connection.
#[derive(Debug)]
pub struct Catalog {
    path: PathBuf,
    conn: Mutex<Connection>,
}

impl Catalog {
    /// Open (creating if needed) `<state_dir>/catalog.db` and bring its
    /// schema up to date.
    pub fn open(state_dir: &Path) -> Result<Self, CatalogError> {
        std::fs::create_dir_all(state_dir).map_err(|source| CatalogError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(CATALOG_FILE);
        let open_err = |source| CatalogError::Open {
            path: path.clone(),
            source,
        };
        let mut conn = Connection::open(&path).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // journal_mode answers with the mode it ended up in.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            log::warn!(
                "catalog {}: journal mode is {mode}, not wal",
                path.display()
            );
        }
        // FULL: the WAL is fsynced at every commit, so a committed change
        // survives power loss, not just a process crash.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        schema::migrate(&mut conn)?;
        Ok(Catalog {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock dropped its transaction, which
        // rolled it back: the connection is still consistent.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` in one write transaction; any error rolls everything back.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db(op))?;
        let out = f(&tx)?;
        tx.commit().map_err(db(op))?;
        Ok(out)
    }

    /// Run `f` in one read transaction, so that it sees one snapshot.
    fn read<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(db(op))?;
        f(&tx)
    }
}

/// Seconds since the Unix epoch, for the `created` fields.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// `name` as `vdisk::config::check_name` accepts it.
pub fn check_name(name: &str) -> Result<(), CatalogError> {
    crate::config::check_name(name).map_err(|why| CatalogError::BadName {
        name: name.into(),
        why,
    })
}

/// `digest` is 64 lowercase hex characters.
pub fn check_digest(digest: &str) -> Result<(), CatalogError> {
    if digest.len() == 64 && is_lower_hex(digest) {
        Ok(())
    } else {
        Err(CatalogError::BadDigest(digest.into()))
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn to_i64(what: &'static str, value: u64) -> Result<i64, CatalogError> {
    i64::try_from(value).map_err(|_| CatalogError::TooLarge { what, value })
}

fn to_u64(table: &'static str, key: &str, value: i64) -> Result<u64, CatalogError> {
    u64::try_from(value).map_err(|_| CatalogError::Corrupt {
        table,
        key: key.into(),
        why: format!("negative size {value}"),
    })
}

/// Paths are stored as their bytes: a Unix path need not be UTF-8.
fn path_bytes(p: &Path) -> &[u8] {
    p.as_os_str().as_bytes()
}

fn path_from(bytes: Vec<u8>) -> PathBuf {
    PathBuf::from(OsString::from_vec(bytes))
}
