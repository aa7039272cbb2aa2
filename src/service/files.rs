//! File helpers of the service: sparse copies, flattening an overlay, space
//! accounting.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::block::{Overlay, CLUSTER_SIZE};

/// Bytes allocated on disk by `path` (holes excluded).
pub fn allocated(path: &Path) -> io::Result<u64> {
    Ok(std::fs::metadata(path)?.blocks().saturating_mul(512))
}

/// Copy chunk size for sparse copies.
const CHUNK: usize = CLUSTER_SIZE as usize;

/// Make `dst` (an empty, writable file) a copy of `src`: a reflink where
/// the filesystem supports it, else a sparse copy that skips holes and zero
/// chunks.
/// Returns true for a reflink.
pub fn clone_or_copy(
    src: &File,
    dst: &File,
    progress: &dyn Fn(u64, Option<u64>),
) -> io::Result<bool> {
    if rustix::fs::ioctl_ficlone(dst, src).is_ok() {
        return Ok(true);
    }
    let size = src.metadata()?.len();
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        // Holes are skipped, not read (SEEK_DATA; ENXIO: no data past
        // `off`; a file system without it reads them).
        match rustix::fs::seek(src, rustix::fs::SeekFrom::Data(off)) {
            Ok(data) if data > off => {
                off = data.min(size);
                progress(off, Some(size));
                continue;
            }
            Ok(_) => {}
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {}
        }
        let n = (size - off).min(CHUNK as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        if buf[..n].iter().any(|&b| b != 0) {
            dst.write_all_at(&buf[..n], off)?;
        }
        off += n as u64;
        progress(off, Some(size));
    }
    progress(size, Some(size));
    dst.set_len(size)?;
    Ok(false)
}

/// Write the flattened content of an overlay (its allocated clusters, the
/// base elsewhere, zeros past the base) to `dst`, sparse. The overlay's
/// data file and base are read directly through `data` and `base`.
pub fn flatten_overlay(
    ov: &Overlay,
    data: &File,
    base: Option<&File>,
    dst: &File,
    progress: &dyn Fn(u64, Option<u64>),
) -> io::Result<()> {
    let size = ov.size();
    let base_size = match base {
        Some(b) => b.metadata()?.len(),
        None => 0,
    };
    let mut buf = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CLUSTER_SIZE) as usize;
        let chunk = &mut buf[..n];
        if ov.is_allocated(off / CLUSTER_SIZE) {
            data.read_exact_at(chunk, off)?;
        } else {
            chunk.fill(0);
            if let Some(b) = base {
                if off < base_size {
                    let m = (base_size - off).min(n as u64) as usize;
                    b.read_exact_at(&mut chunk[..m], off)?;
                }
            }
        }
        if chunk.iter().any(|&b| b != 0) {
            dst.write_all_at(chunk, off)?;
        }
        off += n as u64;
        progress(off, Some(size));
    }
    dst.set_len(size)?;
    Ok(())
}

/// fsync a directory so that entries made or removed in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparse_copy_skips_holes_and_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        src.set_len(64 << 20).unwrap();
        src.write_all_at(&[3u8; 100], 5 << 20).unwrap();
        src.write_all_at(&[4u8; 4096], (64 << 20) - 4096).unwrap();
        drop(src);
        let src = File::open(&src_path).unwrap();
        let dst = File::create(dir.path().join("dst")).unwrap();
        let last = std::cell::Cell::new(0);
        let reflinked = clone_or_copy(&src, &dst, &|done, _| last.set(done)).unwrap();
        if !reflinked {
            assert_eq!(last.get(), 64 << 20, "progress ends at the size");
        }
        assert_eq!(
            std::fs::read(dir.path().join("dst")).unwrap(),
            std::fs::read(&src_path).unwrap()
        );
        assert!(allocated(&dir.path().join("dst")).unwrap() <= 1 << 20);
    }
}
