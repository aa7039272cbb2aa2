//! Images and their names.

use std::collections::BTreeMap;

use rusqlite::{params, OptionalExtension, Transaction};

use super::{
    check_digest, check_name, db, is_lower_hex, to_i64, to_u64, Catalog, CatalogError, ImageRecord,
    MIN_DIGEST_PREFIX,
};

impl Catalog {
    /// Record an image, or add `rec.names` to the one already recorded
    /// with this digest (its other fields are kept). A name that pointed
    /// to another image moves to this one. Returns the stored record.
    pub fn put_image(&self, rec: &ImageRecord) -> Result<ImageRecord, CatalogError> {
        check_digest(&rec.digest)?;
        for name in &rec.names {
            check_image_name(name)?;
        }
        if rec.format.is_empty() {
            return Err(CatalogError::Invalid {
                what: "image format",
                name: rec.digest.clone(),
                why: "empty",
            });
        }
        let size = to_i64("image size", rec.size)?;
        self.write("put image", |tx| {
            if let Some(old) = load_image(tx, &rec.digest)? {
                if old.size != rec.size {
                    return Err(CatalogError::Invalid {
                        what: "image",
                        name: rec.digest.clone(),
                        why: "already recorded with another size",
                    });
                }
            } else {
                tx.execute(
                    "INSERT INTO images (digest, size, format, source, created)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![rec.digest, size, rec.format, rec.source, rec.created],
                )
                .map_err(db("insert image"))?;
            }
            for name in &rec.names {
                set_name(tx, name, &rec.digest)?;
            }
            require_image(tx, &rec.digest)
        })
    }

    /// The image that `key` names: a name, a full digest, or a unique
    /// digest prefix of at least [`MIN_DIGEST_PREFIX`] hex characters, in
    /// that order.
    pub fn image(&self, key: &str) -> Result<ImageRecord, CatalogError> {
        self.read("look up image", |tx| {
            let digest = resolve(tx, key)?;
            require_image(tx, &digest)
        })
    }

    /// Every image, oldest first.
    pub fn images(&self) -> Result<Vec<ImageRecord>, CatalogError> {
        self.read("list images", |tx| {
            let mut names: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut stmt = tx
                .prepare("SELECT name, digest FROM image_names ORDER BY name")
                .map_err(db("list image names"))?;
            let rows = stmt
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(db("list image names"))?;
            for row in rows {
                let (name, digest) = row.map_err(db("list image names"))?;
                names.entry(digest).or_default().push(name);
            }
            let mut stmt = tx
                .prepare(
                    "SELECT digest, size, format, source, created FROM images
                     ORDER BY created, digest",
                )
                .map_err(db("list images"))?;
            let rows = stmt.query_map([], row_parts).map_err(db("list images"))?;
            let mut out = Vec::new();
            for row in rows {
                let parts = row.map_err(db("list images"))?;
                let names = names.remove(&parts.0).unwrap_or_default();
                out.push(from_parts(parts, names)?);
            }
            Ok(out)
        })
    }

    /// Point `name` at the image `digest` (a full digest), moving it if it
    /// pointed elsewhere.
    pub fn tag(&self, name: &str, digest: &str) -> Result<(), CatalogError> {
        check_image_name(name)?;
        check_digest(digest)?;
        self.write("tag image", |tx| {
            require_image(tx, digest)?;
            set_name(tx, name, digest)
        })
    }

    /// Remove a name; the image stays.
    pub fn untag(&self, name: &str) -> Result<(), CatalogError> {
        self.write("untag image", |tx| {
            let n = tx
                .execute("DELETE FROM image_names WHERE name = ?1", [name])
                .map_err(db("untag image"))?;
            if n == 0 {
                return Err(CatalogError::NotFound {
                    what: "image name",
                    name: name.into(),
                });
            }
            Ok(())
        })
    }

    /// Forget the image `digest` and its names. Refused with
    /// [`CatalogError::InUse`] while a volume has it as its base. Returns
    /// the record as it was.
    pub fn remove_image(&self, digest: &str) -> Result<ImageRecord, CatalogError> {
        check_digest(digest)?;
        self.write("remove image", |tx| {
            let rec = require_image(tx, digest)?;
            let mut stmt = tx
                .prepare("SELECT name FROM volumes WHERE base = ?1 ORDER BY name")
                .map_err(db("find dependent volumes"))?;
            let dependants = stmt
                .query_map([digest], |r| r.get::<_, String>(0))
                .map_err(db("find dependent volumes"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(db("find dependent volumes"))?;
            let mut dependants = dependants;
            let pooled: Option<i64> = tx
                .query_row(
                    "SELECT priority FROM pool WHERE digest = ?1",
                    [digest],
                    |r| r.get(0),
                )
                .optional()
                .map_err(db("find pool entry"))?;
            if pooled.is_some() {
                dependants.push("its pool entry (vdiskctl pool unset)".into());
            }
            if !dependants.is_empty() {
                return Err(CatalogError::InUse { dependants });
            }
            tx.execute("DELETE FROM image_names WHERE digest = ?1", [digest])
                .map_err(db("delete image names"))?;
            tx.execute("DELETE FROM images WHERE digest = ?1", [digest])
                .map_err(db("delete image"))?;
            Ok(rec)
        })
    }
}

/// An image name: a valid name that cannot be mistaken for a digest
/// prefix, so that `image()` never has to guess which one was meant.
pub fn check_image_name(name: &str) -> Result<(), CatalogError> {
    check_name(name)?;
    if name.len() >= MIN_DIGEST_PREFIX && name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(CatalogError::BadName {
            name: name.into(),
            why: "an image name of 12 or more hex digits would read as a digest",
        });
    }
    Ok(())
}

fn set_name(tx: &Transaction<'_>, name: &str, digest: &str) -> Result<(), CatalogError> {
    tx.execute(
        "INSERT INTO image_names (name, digest) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET digest = excluded.digest",
        params![name, digest],
    )
    .map_err(db("set image name"))?;
    Ok(())
}

/// The full digest `key` stands for.
fn resolve(tx: &Transaction<'_>, key: &str) -> Result<String, CatalogError> {
    let by_name: Option<String> = tx
        .query_row(
            "SELECT digest FROM image_names WHERE name = ?1",
            [key],
            |r| r.get(0),
        )
        .optional()
        .map_err(db("look up image name"))?;
    if let Some(digest) = by_name {
        return Ok(digest);
    }
    let lower = key.to_ascii_lowercase();
    if (MIN_DIGEST_PREFIX..=64).contains(&lower.len()) && is_lower_hex(&lower) {
        // Hex has no GLOB metacharacters; GLOB is case-sensitive and can
        // use the primary key's index for a prefix.
        let mut stmt = tx
            .prepare(
                "SELECT digest FROM images WHERE digest GLOB ?1 || '*' ORDER BY digest LIMIT 8",
            )
            .map_err(db("look up digest prefix"))?;
        let matches = stmt
            .query_map([&lower], |r| r.get::<_, String>(0))
            .map_err(db("look up digest prefix"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(db("look up digest prefix"))?;
        if let [one] = matches.as_slice() {
            return Ok(one.clone());
        }
        if !matches.is_empty() {
            return Err(CatalogError::Ambiguous {
                prefix: key.into(),
                matches,
            });
        }
    }
    Err(CatalogError::NotFound {
        what: "image",
        name: key.into(),
    })
}

type Parts = (String, i64, String, String, i64);

fn row_parts(r: &rusqlite::Row<'_>) -> rusqlite::Result<Parts> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn from_parts(p: Parts, names: Vec<String>) -> Result<ImageRecord, CatalogError> {
    let size = to_u64("images", &p.0, p.1)?;
    Ok(ImageRecord {
        digest: p.0,
        size,
        format: p.2,
        source: p.3,
        created: p.4,
        names,
    })
}

pub(super) fn load_image(
    tx: &Transaction<'_>,
    digest: &str,
) -> Result<Option<ImageRecord>, CatalogError> {
    let parts = tx
        .query_row(
            "SELECT digest, size, format, source, created FROM images WHERE digest = ?1",
            [digest],
            row_parts,
        )
        .optional()
        .map_err(db("read image"))?;
    let Some(parts) = parts else {
        return Ok(None);
    };
    let mut stmt = tx
        .prepare("SELECT name FROM image_names WHERE digest = ?1 ORDER BY name")
        .map_err(db("read image names"))?;
    let names = stmt
        .query_map([digest], |r| r.get::<_, String>(0))
        .map_err(db("read image names"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(db("read image names"))?;
    from_parts(parts, names).map(Some)
}

pub(super) fn require_image(
    tx: &Transaction<'_>,
    digest: &str,
) -> Result<ImageRecord, CatalogError> {
    load_image(tx, digest)?.ok_or_else(|| CatalogError::NotFound {
        what: "image",
        name: digest.into(),
    })
}
