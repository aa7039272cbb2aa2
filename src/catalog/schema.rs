//! The catalog's schema and its migrations.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`. Each runs
//! in its own transaction together with the update of `schema_version`, so
//! a crash mid-migration leaves the previous version intact. Append new
//! migrations; never edit one that has shipped.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::{db, CatalogError};

const MIGRATIONS: &[&str] = &[
    // 1: images with their names, volumes, exports.
    "
    CREATE TABLE images (
        digest  TEXT PRIMARY KEY NOT NULL CHECK (length(digest) = 64),
        size    INTEGER NOT NULL CHECK (size >= 0),
        format  TEXT NOT NULL,
        source  TEXT NOT NULL,
        created INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE image_names (
        name   TEXT PRIMARY KEY NOT NULL,
        digest TEXT NOT NULL REFERENCES images(digest)
    ) STRICT;
    CREATE INDEX image_names_digest ON image_names(digest);
    CREATE TABLE volumes (
        name    TEXT PRIMARY KEY NOT NULL,
        kind    TEXT NOT NULL CHECK (kind IN ('empty', 'overlay', 'full')),
        base    TEXT REFERENCES images(digest),
        size    INTEGER NOT NULL CHECK (size >= 0),
        path    BLOB NOT NULL,
        state   TEXT NOT NULL CHECK (state IN ('creating', 'ready')),
        created INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX volumes_base ON volumes(base);
    CREATE TABLE exports (
        volume   TEXT PRIMARY KEY NOT NULL REFERENCES volumes(name),
        socket   BLOB NOT NULL UNIQUE,
        queues   INTEGER NOT NULL CHECK (queues BETWEEN 1 AND 65535),
        readonly INTEGER NOT NULL CHECK (readonly IN (0, 1)),
        serial   TEXT
    ) STRICT;
    ",
    // 2: ready copies (the pool).
    super::pool::MIGRATION,
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Bring the schema up to [`SCHEMA_VERSION`].
pub(super) fn migrate(conn: &mut Connection) -> Result<(), CatalogError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL) STRICT",
    )
    .map_err(db("create schema_version"))?;
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db("begin migration"))?;
        let found: Option<i64> = tx
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
            .optional()
            .map_err(db("read schema_version"))?;
        let version = found.unwrap_or(0);
        if version > SCHEMA_VERSION {
            return Err(CatalogError::SchemaTooNew {
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        let index = usize::try_from(version).map_err(|_| CatalogError::Corrupt {
            table: "schema_version",
            key: version.to_string(),
            why: "negative version".into(),
        })?;
        let Some(step) = MIGRATIONS.get(index) else {
            return Ok(());
        };
        tx.execute_batch(step).map_err(db("migrate schema"))?;
        if found.is_some() {
            tx.execute("UPDATE schema_version SET version = ?1", [version + 1])
        } else {
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                [version + 1],
            )
        }
        .map_err(db("update schema_version"))?;
        tx.commit().map_err(db("commit migration"))?;
        log::info!("catalog schema migrated to version {}", version + 1);
    }
}
