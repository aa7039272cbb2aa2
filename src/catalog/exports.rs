//! Exports: which volumes are served on which sockets.

use rusqlite::{params, OptionalExtension};

use super::{check_name, db, path_bytes, path_from, Catalog, CatalogError, ExportRecord};

impl Catalog {
    /// Record (or replace) the export of `rec.volume`. The volume must
    /// exist, and no other volume may use the same socket.
    pub fn put_export(&self, rec: &ExportRecord) -> Result<(), CatalogError> {
        check_name(&rec.volume)?;
        let invalid = |why| CatalogError::Invalid {
            what: "export",
            name: rec.volume.clone(),
            why,
        };
        if rec.queues == 0 {
            return Err(invalid("at least one queue"));
        }
        if rec.socket.as_os_str().is_empty() {
            return Err(invalid("empty socket path"));
        }
        let socket = path_bytes(&rec.socket);
        self.write("put export", |tx| {
            if super::volumes::load_volume(tx, &rec.volume)?.is_none() {
                return Err(CatalogError::NotFound {
                    what: "volume",
                    name: rec.volume.clone(),
                });
            }
            let holder: Option<String> = tx
                .query_row(
                    "SELECT volume FROM exports WHERE socket = ?1 AND volume != ?2",
                    params![socket, rec.volume],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db("check export socket"))?;
            if holder.is_some() {
                return Err(CatalogError::Exists {
                    what: "export socket",
                    name: rec.socket.display().to_string(),
                });
            }
            tx.execute(
                "INSERT INTO exports (volume, socket, queues, readonly, serial)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (volume) DO UPDATE SET socket = excluded.socket,
                     queues = excluded.queues, readonly = excluded.readonly,
                     serial = excluded.serial",
                params![rec.volume, socket, rec.queues, rec.readonly, rec.serial],
            )
            .map_err(db("write export"))?;
            Ok(())
        })
    }

    /// Every export, by volume name.
    pub fn exports(&self) -> Result<Vec<ExportRecord>, CatalogError> {
        self.read("list exports", |tx| {
            let op = "list exports";
            let mut stmt = tx
                .prepare(
                    "SELECT volume, socket, queues, readonly, serial FROM exports
                     ORDER BY volume",
                )
                .map_err(db(op))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ExportRecord {
                        volume: r.get(0)?,
                        socket: path_from(r.get(1)?),
                        queues: r.get(2)?,
                        readonly: r.get(3)?,
                        serial: r.get(4)?,
                    })
                })
                .map_err(db(op))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(db(op))
        })
    }

    /// Forget the export of `volume`.
    pub fn remove_export(&self, volume: &str) -> Result<(), CatalogError> {
        self.write("remove export", |tx| {
            let n = tx
                .execute("DELETE FROM exports WHERE volume = ?1", [volume])
                .map_err(db("delete export"))?;
            if n == 0 {
                return Err(CatalogError::NotFound {
                    what: "export",
                    name: volume.into(),
                });
            }
            Ok(())
        })
    }
}
