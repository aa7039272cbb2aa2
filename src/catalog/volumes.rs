//! Volumes.

use rusqlite::{params, OptionalExtension, Transaction};

use super::{
    check_digest, check_name, db, path_bytes, path_from, to_i64, to_u64, Catalog, CatalogError,
    VolumeKind, VolumeRecord, VolumeState,
};

const COLUMNS: &str = "name, kind, base, size, path, state, created";

impl Catalog {
    /// Record a new volume in state `Creating` (whatever `rec.state`
    /// says), before its files are made. Fails with `Exists` if the name
    /// is taken and `NotFound` if the base image is unknown.
    pub fn begin_volume(&self, rec: &VolumeRecord) -> Result<(), CatalogError> {
        self.write("begin volume", |tx| insert_creating(tx, rec))
    }

    /// Mark a volume `Ready`: its files are complete and durable.
    pub fn finish_volume(&self, name: &str) -> Result<(), CatalogError> {
        self.update_volume(
            "finish volume",
            name,
            "UPDATE volumes SET state = 'ready' WHERE name = ?1",
            params![name],
        )
    }

    /// Record a new size (the volume code decides whether it may change).
    pub fn set_volume_size(&self, name: &str, size: u64) -> Result<(), CatalogError> {
        let size = to_i64("volume size", size)?;
        self.update_volume(
            "set volume size",
            name,
            "UPDATE volumes SET size = ?2 WHERE name = ?1",
            params![name, size],
        )
    }

    fn update_volume(
        &self,
        op: &'static str,
        name: &str,
        sql: &str,
        params: &[&dyn rusqlite::ToSql],
    ) -> Result<(), CatalogError> {
        self.write(op, |tx| {
            if tx.execute(sql, params).map_err(db(op))? == 0 {
                return Err(not_found(name));
            }
            Ok(())
        })
    }

    pub fn volume(&self, name: &str) -> Result<VolumeRecord, CatalogError> {
        self.read("read volume", |tx| {
            load_volume(tx, name)?.ok_or_else(|| not_found(name))
        })
    }

    /// Every volume, by name.
    pub fn volumes(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        self.read("list volumes", |tx| select(tx, "ORDER BY name", &[]))
    }

    /// Volumes still `Creating`: left by a crash part-way through making
    /// them. The daemon removes their files and rows at start.
    pub fn incomplete_volumes(&self) -> Result<Vec<VolumeRecord>, CatalogError> {
        self.read("list incomplete volumes", |tx| {
            select(tx, "WHERE state = 'creating' ORDER BY name", &[])
        })
    }

    /// Forget a volume. Refused with [`CatalogError::InUse`] while it is
    /// exported. Returns the record as it was.
    pub fn remove_volume(&self, name: &str) -> Result<VolumeRecord, CatalogError> {
        self.write("remove volume", |tx| {
            let rec = load_volume(tx, name)?.ok_or_else(|| not_found(name))?;
            let socket: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT socket FROM exports WHERE volume = ?1",
                    [name],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db("find exports"))?;
            if let Some(socket) = socket {
                return Err(CatalogError::InUse {
                    dependants: vec![format!("export {}", path_from(socket).display())],
                });
            }
            tx.execute("DELETE FROM volumes WHERE name = ?1", [name])
                .map_err(db("delete volume"))?;
            Ok(rec)
        })
    }
}

fn not_found(name: &str) -> CatalogError {
    CatalogError::NotFound {
        what: "volume",
        name: name.into(),
    }
}

pub(super) fn load_volume(
    tx: &Transaction<'_>,
    name: &str,
) -> Result<Option<VolumeRecord>, CatalogError> {
    Ok(select(tx, "WHERE name = ?1", &[&name])?.into_iter().next())
}

fn select(
    tx: &Transaction<'_>,
    tail: &str,
    params: &[&dyn rusqlite::ToSql],
) -> Result<Vec<VolumeRecord>, CatalogError> {
    let op = "read volumes";
    let mut stmt = tx
        .prepare(&format!("SELECT {COLUMNS} FROM volumes {tail}"))
        .map_err(db(op))?;
    let rows = stmt
        .query_map(params, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<String>>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Vec<u8>>(4)?,
                r.get::<_, String>(5)?,
                r.get::<_, i64>(6)?,
            ))
        })
        .map_err(db(op))?;
    let mut out = Vec::new();
    for row in rows {
        let (name, kind, base, size, path, state, created) = row.map_err(db(op))?;
        let corrupt = |why: String| CatalogError::Corrupt {
            table: "volumes",
            key: name.clone(),
            why,
        };
        let kind = VolumeKind::parse(&kind).ok_or_else(|| corrupt(format!("kind `{kind}`")))?;
        let state =
            VolumeState::parse(&state).ok_or_else(|| corrupt(format!("state `{state}`")))?;
        let size = to_u64("volumes", &name, size)?;
        out.push(VolumeRecord {
            name,
            kind,
            base,
            size,
            path: path_from(path),
            state,
            created,
        });
    }
    Ok(out)
}

/// Check `rec` and record it as `Creating`, in the caller's transaction.
pub(super) fn insert_creating(
    tx: &Transaction<'_>,
    rec: &VolumeRecord,
) -> Result<(), CatalogError> {
    check_name(&rec.name)?;
    let invalid = |why| CatalogError::Invalid {
        what: "volume",
        name: rec.name.clone(),
        why,
    };
    match (rec.kind, &rec.base) {
        (VolumeKind::Empty, None) => {}
        (VolumeKind::Empty, Some(_)) => return Err(invalid("an empty volume has no base")),
        (VolumeKind::Overlay | VolumeKind::Full, None) => {
            return Err(invalid("an overlay or full copy needs a base image"))
        }
        (VolumeKind::Overlay | VolumeKind::Full, Some(base)) => check_digest(base)?,
    }
    if rec.path.as_os_str().is_empty() {
        return Err(invalid("empty data file path"));
    }
    let size = to_i64("volume size", rec.size)?;
    if load_volume(tx, &rec.name)?.is_some() {
        return Err(CatalogError::Exists {
            what: "volume",
            name: rec.name.clone(),
        });
    }
    if let Some(base) = &rec.base {
        super::images::require_image(tx, base)?;
    }
    tx.execute(
        "INSERT INTO volumes (name, kind, base, size, path, state, created)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            rec.name,
            rec.kind.as_str(),
            rec.base,
            size,
            path_bytes(&rec.path),
            VolumeState::Creating.as_str(),
            rec.created
        ],
    )
    .map_err(db("insert volume"))?;
    Ok(())
}
