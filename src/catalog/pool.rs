//! Ready copies: which images want full copies made ahead of time (the
//! pool table) and the copies that exist (pool_copies). A copy is `making`
//! until its file is complete and fsynced, then `ready`; claiming one
//! turns it into a volume in the same transaction that forgets it.

use std::path::{Path, PathBuf};

use rusqlite::{params, OptionalExtension, Transaction};

use super::{check_digest, db, path_bytes, path_from, Catalog, CatalogError, VolumeRecord};

/// One image's pool entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolEntry {
    pub digest: String,
    /// 1 (least important) to 10.
    pub priority: u8,
    /// Ready copies wanted; `None`: by the priority rule.
    pub copies: Option<u32>,
    pub hits: u64,
    pub misses: u64,
    /// Unix seconds of the last claim.
    pub last_claim: Option<i64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyState {
    Making,
    Ready,
}

impl CopyState {
    fn as_str(self) -> &'static str {
        match self {
            CopyState::Making => "making",
            CopyState::Ready => "ready",
        }
    }
}

/// One ready copy, or one being made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolCopy {
    pub id: i64,
    pub digest: String,
    pub path: PathBuf,
    pub state: CopyState,
    /// Unix seconds.
    pub created: i64,
}

pub const MIGRATION: &str = "
    CREATE TABLE pool (
        digest     TEXT PRIMARY KEY NOT NULL REFERENCES images(digest),
        priority   INTEGER NOT NULL CHECK (priority BETWEEN 1 AND 10),
        copies     INTEGER CHECK (copies IS NULL OR copies BETWEEN 0 AND 64),
        hits       INTEGER NOT NULL DEFAULT 0,
        misses     INTEGER NOT NULL DEFAULT 0,
        last_claim INTEGER
    ) STRICT;
    CREATE TABLE pool_copies (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        digest  TEXT NOT NULL REFERENCES pool(digest),
        path    BLOB NOT NULL UNIQUE,
        state   TEXT NOT NULL CHECK (state IN ('making', 'ready')),
        created INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX pool_copies_digest ON pool_copies(digest);
";

/// Most ready copies one image may ask for.
pub const MAX_COPIES: u32 = 64;

fn load_entry(tx: &Transaction<'_>, digest: &str) -> Result<Option<PoolEntry>, CatalogError> {
    tx.query_row(
        "SELECT digest, priority, copies, hits, misses, last_claim FROM pool WHERE digest = ?1",
        [digest],
        entry_row,
    )
    .optional()
    .map_err(db("read pool entry"))
}

fn entry_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PoolEntry> {
    Ok(PoolEntry {
        digest: r.get(0)?,
        priority: r.get::<_, i64>(1)?.clamp(1, 10) as u8,
        copies: r.get::<_, Option<i64>>(2)?.map(|c| c.clamp(0, 64) as u32),
        hits: r.get::<_, i64>(3)?.max(0) as u64,
        misses: r.get::<_, i64>(4)?.max(0) as u64,
        last_claim: r.get(5)?,
    })
}

fn copy_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PoolCopy> {
    let state: String = r.get(3)?;
    Ok(PoolCopy {
        id: r.get(0)?,
        digest: r.get(1)?,
        path: path_from(r.get(2)?),
        state: if state == "ready" {
            CopyState::Ready
        } else {
            CopyState::Making
        },
        created: r.get(4)?,
    })
}

impl Catalog {
    /// Add or change the pool entry of the image `digest`.
    pub fn set_pool(
        &self,
        digest: &str,
        priority: u8,
        copies: Option<u32>,
    ) -> Result<PoolEntry, CatalogError> {
        check_digest(digest)?;
        if !(1..=10).contains(&priority) {
            return Err(CatalogError::Invalid {
                what: "priority",
                name: priority.to_string(),
                why: "priorities go from 1 (least important) to 10",
            });
        }
        if copies.is_some_and(|c| c > MAX_COPIES) {
            return Err(CatalogError::Invalid {
                what: "number of copies",
                name: copies.unwrap_or(0).to_string(),
                why: "at most 64 ready copies per image",
            });
        }
        self.write("set pool entry", |tx| {
            super::images::require_image(tx, digest)?;
            tx.execute(
                "INSERT INTO pool (digest, priority, copies) VALUES (?1, ?2, ?3)
                 ON CONFLICT (digest) DO UPDATE SET priority = ?2, copies = ?3",
                params![digest, i64::from(priority), copies.map(i64::from)],
            )
            .map_err(db("set pool entry"))?;
            load_entry(tx, digest)?.ok_or_else(|| CatalogError::NotFound {
                what: "pool entry",
                name: digest.into(),
            })
        })
    }

    /// Forget the pool entry of `digest`; returns its copies, whose files
    /// the caller deletes.
    pub fn unset_pool(&self, digest: &str) -> Result<Vec<PoolCopy>, CatalogError> {
        check_digest(digest)?;
        self.write("unset pool entry", |tx| {
            if load_entry(tx, digest)?.is_none() {
                return Err(CatalogError::NotFound {
                    what: "pool entry for image",
                    name: digest.into(),
                });
            }
            let copies = copies_of(tx, Some(digest))?;
            tx.execute("DELETE FROM pool_copies WHERE digest = ?1", [digest])
                .map_err(db("delete pool copies"))?;
            tx.execute("DELETE FROM pool WHERE digest = ?1", [digest])
                .map_err(db("delete pool entry"))?;
            Ok(copies)
        })
    }

    pub fn pool_entries(&self) -> Result<Vec<PoolEntry>, CatalogError> {
        self.read("list pool", |tx| {
            let mut stmt = tx
                .prepare(
                    "SELECT digest, priority, copies, hits, misses, last_claim FROM pool
                     ORDER BY priority DESC, digest",
                )
                .map_err(db("list pool"))?;
            let rows = stmt
                .query_map([], entry_row)
                .map_err(db("list pool"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("list pool"));
            rows
        })
    }

    pub fn pool_entry(&self, digest: &str) -> Result<Option<PoolEntry>, CatalogError> {
        self.read("read pool entry", |tx| load_entry(tx, digest))
    }

    /// Every copy, made or being made, oldest first.
    pub fn pool_copies(&self) -> Result<Vec<PoolCopy>, CatalogError> {
        self.read("list pool copies", |tx| copies_of(tx, None))
    }

    /// Record a copy of `digest` about to be made at `path`.
    pub fn begin_copy(&self, digest: &str, path: &Path) -> Result<i64, CatalogError> {
        self.write("begin pool copy", |tx| {
            if load_entry(tx, digest)?.is_none() {
                return Err(CatalogError::NotFound {
                    what: "pool entry for image",
                    name: digest.into(),
                });
            }
            tx.execute(
                "INSERT INTO pool_copies (digest, path, state, created) VALUES (?1, ?2, ?3, ?4)",
                params![
                    digest,
                    path_bytes(path),
                    CopyState::Making.as_str(),
                    super::unix_now()
                ],
            )
            .map_err(db("insert pool copy"))?;
            Ok(tx.last_insert_rowid())
        })
    }

    /// The copy `id` is complete and durable. False when it is gone (its
    /// entry was unset meanwhile).
    pub fn finish_copy(&self, id: i64) -> Result<bool, CatalogError> {
        self.write("finish pool copy", |tx| {
            let n = tx
                .execute("UPDATE pool_copies SET state = 'ready' WHERE id = ?1", [id])
                .map_err(db("finish pool copy"))?;
            Ok(n == 1)
        })
    }

    pub fn remove_copy(&self, id: i64) -> Result<(), CatalogError> {
        self.write("remove pool copy", |tx| {
            tx.execute("DELETE FROM pool_copies WHERE id = ?1", [id])
                .map_err(db("remove pool copy"))?;
            Ok(())
        })
    }

    /// Claim the oldest ready copy of `vol.base` for the new volume `vol`,
    /// in one transaction: the copy is forgotten and `vol` recorded (as
    /// `creating`, until its file is in place), and the entry counts a hit.
    /// With no ready copy, nothing is recorded but a miss (when the image
    /// has a pool entry), and `None` comes back.
    pub fn claim_copy(&self, vol: &VolumeRecord) -> Result<Option<PoolCopy>, CatalogError> {
        let Some(digest) = vol.base.clone() else {
            return Ok(None);
        };
        self.write("claim pool copy", |tx| {
            if load_entry(tx, &digest)?.is_none() {
                return Ok(None);
            }
            let copy = tx
                .query_row(
                    "SELECT id, digest, path, state, created FROM pool_copies
                     WHERE digest = ?1 AND state = 'ready' ORDER BY created, id LIMIT 1",
                    [&digest],
                    copy_row,
                )
                .optional()
                .map_err(db("find a ready copy"))?;
            let Some(copy) = copy else {
                tx.execute(
                    "UPDATE pool SET misses = misses + 1 WHERE digest = ?1",
                    [&digest],
                )
                .map_err(db("count a pool miss"))?;
                return Ok(None);
            };
            tx.execute("DELETE FROM pool_copies WHERE id = ?1", [copy.id])
                .map_err(db("claim pool copy"))?;
            tx.execute(
                "UPDATE pool SET hits = hits + 1, last_claim = ?2 WHERE digest = ?1",
                params![digest, super::unix_now()],
            )
            .map_err(db("count a pool hit"))?;
            super::volumes::insert_creating(tx, vol)?;
            Ok(Some(copy))
        })
    }
}

fn copies_of(tx: &Transaction<'_>, digest: Option<&str>) -> Result<Vec<PoolCopy>, CatalogError> {
    let sql = "SELECT id, digest, path, state, created FROM pool_copies
               WHERE ?1 IS NULL OR digest = ?1 ORDER BY created, id";
    let mut stmt = tx.prepare(sql).map_err(db("list pool copies"))?;
    let rows = stmt
        .query_map([digest], copy_row)
        .map_err(db("list pool copies"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("list pool copies"));
    rows
}
