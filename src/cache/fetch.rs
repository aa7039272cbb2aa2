//! `fetch`: download an image by URL, resumably, verified by its sha256
//! before it enters the cache.
//!
//! Data goes to `tmp/<sha256>.part`. If that file exists (an earlier fetch
//! was interrupted), its bytes are hashed again and the transfer asks for
//! the rest with `Range: bytes=N-`; a `200` answer means the server starts
//! over, and so does the part. A transfer that stops early keeps the part
//! for the next try; a digest that does not match deletes it. Nothing
//! reaches `images/` or the catalog before the digest matched.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use sha2::{Digest, Sha256};

use super::files::{io_err, TempFile};
use super::scan::{self, CHUNK};
use super::source::{redact, Opened, Url};
use super::{qcow2, CacheError, ImageCache, Progress, PART_SUFFIX};
use crate::catalog::{self, CatalogError, ImageRecord};

impl ImageCache {
    /// Fetch `url` (`http://`, `https://` or `file://`), check that its
    /// sha256 is `sha256`, and add it to the cache (under `name`). A qcow2
    /// download is converted to raw once verified; the image's digest is
    /// then that of the raw content.
    pub fn fetch(
        &self,
        url: &str,
        sha256: &str,
        name: Option<&str>,
        progress: Progress<'_>,
    ) -> Result<ImageRecord, CacheError> {
        let want = sha256.to_ascii_lowercase();
        catalog::check_digest(&want)?;
        if let Some(name) = name {
            catalog::check_image_name(name)?;
        }
        let parsed = Url::parse(url)?;
        let shown = redact(url);

        // Content-addressed: the content is here already.
        match self.catalog.image(&want) {
            Ok(rec) if rec.digest == want && self.path(&want).exists() => {
                let mut rec = rec;
                rec.names = name.map(|n| vec![n.to_string()]).unwrap_or_default();
                return Ok(self.catalog.put_image(&rec)?);
            }
            Ok(_) | Err(CatalogError::NotFound { .. }) => {}
            Err(e) => return Err(e.into()),
        }

        let part_path = self.tmp_dir().join(format!("{want}{PART_SUFFIX}"));
        let part = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&part_path)
            .map_err(|e| io_err("open", &part_path, e))?;
        // One fetch per digest at a time, across processes too. The lock
        // goes with the file descriptor.
        rustix::fs::flock(&part, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                if e == rustix::io::Errno::WOULDBLOCK {
                    CacheError::Busy {
                        digest: want.clone(),
                    }
                } else {
                    io_err("lock", &part_path, e.into())
                }
            },
        )?;
        let part_io = |op, e| io_err(op, &part_path, e);
        let (have, hasher) = match self.download(&parsed, &shown, &part, &part_path, progress) {
            Ok(done) => done,
            Err(e) => {
                // Keep a part worth resuming; an empty one is only litter.
                if part.metadata().is_ok_and(|m| m.len() == 0) {
                    let _ = std::fs::remove_file(&part_path);
                }
                return Err(e);
            }
        };

        // The part is whole (or as whole as the source says): verify.
        let tmp = TempFile::adopt(part_path.clone());
        let got = scan::finish(hasher);
        if got != want {
            // `tmp` is dropped: the part is deleted.
            return Err(CacheError::DigestMismatch {
                url: shown,
                expected: want,
                got,
                size: have,
            });
        }
        part.sync_all().map_err(|e| part_io("fsync", e))?;
        if qcow2::is_qcow2(&part, &part_path)? {
            drop(part);
            let rec = self.import_qcow2(tmp.path(), &shown, name, progress)?;
            return Ok(rec);
        }
        drop(part);
        self.commit(tmp, &want, have, &shown, name)
    }

    /// Bring the part to the source's full length. Returns its length and
    /// the hasher that has seen all of it.
    fn download(
        &self,
        parsed: &Url,
        shown: &str,
        part: &File,
        part_path: &Path,
        progress: Progress<'_>,
    ) -> Result<(u64, Sha256), CacheError> {
        let part_io = |op, e| io_err(op, part_path, e);
        let mut have = part.metadata().map_err(|e| part_io("stat", e))?.len();
        let mut hasher = Sha256::new();
        if have > 0 {
            log::info!("{shown}: resuming after {have} bytes");
            scan::hash_prefix(part, have, &mut hasher).map_err(|e| part_io("read", e))?;
        }

        let mut restarted = false;
        loop {
            match self.http.open(parsed, have)? {
                Opened::Complete => break,
                Opened::StartOver if !restarted && have > 0 => {
                    restarted = true;
                    part.set_len(0).map_err(|e| part_io("truncate", e))?;
                    have = 0;
                    hasher = Sha256::new();
                }
                Opened::StartOver => {
                    return Err(CacheError::BadResponse {
                        url: shown.to_string(),
                        why: "the server does not serve the range asked for".into(),
                    })
                }
                Opened::Stream {
                    offset,
                    total,
                    mut reader,
                } => {
                    if offset != have {
                        // offset is 0: the source starts over.
                        log::info!("{shown}: the server sends everything again");
                        part.set_len(0).map_err(|e| part_io("truncate", e))?;
                        have = 0;
                        hasher = Sha256::new();
                    }
                    stream(&mut *reader, part, &mut have, &mut hasher, total, progress).map_err(
                        |failure| match failure {
                            Failure::Source(source) => CacheError::Interrupted {
                                url: shown.to_string(),
                                got: have,
                                expected: total,
                                source,
                            },
                            Failure::Part(e) => part_io("write", e),
                        },
                    )?;
                    if let Some(total) = total {
                        if have < total {
                            return Err(CacheError::Interrupted {
                                url: shown.to_string(),
                                got: have,
                                expected: Some(total),
                                source: io::ErrorKind::UnexpectedEof.into(),
                            });
                        }
                    }
                    break;
                }
            }
        }
        Ok((have, hasher))
    }
}

enum Failure {
    /// Reading the source failed: the transfer was interrupted.
    Source(io::Error),
    /// Writing the part failed.
    Part(io::Error),
}

/// Copy `reader` to the end of `part` (at `*have`), hashing and counting
/// as it goes. Every byte read is written before an error is returned,
/// so that `*have` bytes of the part are always the source's first bytes.
fn stream(
    reader: &mut dyn io::Read,
    part: &File,
    have: &mut u64,
    hasher: &mut Sha256,
    total: Option<u64>,
    progress: Progress<'_>,
) -> Result<(), Failure> {
    let mut buf = vec![0u8; CHUNK];
    progress(*have, total);
    loop {
        let (n, err) = scan::fill(reader, &mut buf);
        if n > 0 {
            let data = &buf[..n];
            hasher.update(data);
            scan::write_sparse(part, data, *have).map_err(Failure::Part)?;
            *have += n as u64;
            // A trailing zero block was skipped: the length must still
            // say how much arrived, for resume.
            part.set_len(*have).map_err(Failure::Part)?;
            progress(*have, total);
        }
        if let Some(e) = err {
            return Err(Failure::Source(e));
        }
        if n < buf.len() {
            return Ok(());
        }
    }
}
