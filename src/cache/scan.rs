//! Reading an image once: hashing it, and copying it with its holes kept.
//!
//! Holes are found with SEEK_DATA/SEEK_HOLE and never read; inside data
//! extents, all-zero blocks are not written either, so the copy is at
//! least as sparse as the source. Both count as zeros in the digest.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use sha2::{Digest, Sha256};

use super::Progress;

/// Bytes read or hashed per step: large enough to amortise the syscalls,
/// small enough to report progress often.
pub(super) const CHUNK: usize = 1 << 20;

/// Zero blocks smaller than this are written anyway: 4 KiB is the page
/// and usual filesystem block size, the smallest hole a filesystem keeps.
pub(super) const ZERO_BLOCK: usize = 4096;

static ZEROS: [u8; ZERO_BLOCK] = [0; ZERO_BLOCK];

pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

pub(super) fn finish(hasher: Sha256) -> String {
    hex(&hasher.finalize())
}

fn hash_zeros(hasher: &mut Sha256, mut len: u64) {
    while len > 0 {
        let n = len.min(ZERO_BLOCK as u64);
        // n <= ZERO_BLOCK, so the cast is lossless.
        hasher.update(&ZEROS[..n as usize]);
        len -= n;
    }
}

/// Where the next data extent at or after `pos` starts (`end` if none).
fn next_data(file: &File, pos: u64, end: u64) -> io::Result<u64> {
    match rustix::fs::seek(file, SeekFrom::Data(pos)) {
        Ok(d) => Ok(d.min(end)),
        // ENXIO: no data past pos.
        Err(rustix::io::Errno::NXIO) => Ok(end),
        // A filesystem or file type without SEEK_DATA: all data.
        Err(rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => Ok(pos),
        Err(e) => Err(e.into()),
    }
}

/// Where the data extent at `pos` ends.
fn next_hole(file: &File, pos: u64, end: u64) -> io::Result<u64> {
    match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
        Ok(h) => Ok(h.min(end)),
        Err(rustix::io::Errno::NXIO | rustix::io::Errno::INVAL | rustix::io::Errno::OPNOTSUPP) => {
            Ok(end)
        }
        Err(e) => Err(e.into()),
    }
}

/// Read `src` (`size` bytes) once, hashing it, and if `dst` is given
/// write its non-zero blocks there at the same offsets and set its
/// length. Returns the sha256 as hex.
pub(super) fn scan(
    src: &File,
    size: u64,
    dst: Option<&File>,
    progress: Progress<'_>,
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    progress(0, Some(size));
    while pos < size {
        let data = next_data(src, pos, size)?;
        if data > pos {
            hash_zeros(&mut hasher, data - pos);
            pos = data;
            progress(pos, Some(size));
        }
        if pos >= size {
            break;
        }
        let hole = next_hole(src, pos, size)?;
        while pos < hole {
            let n = usize::try_from(hole - pos).map_or(CHUNK, |r| r.min(CHUNK));
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, pos)?;
            hasher.update(&*chunk);
            if let Some(dst) = dst {
                write_sparse(dst, chunk, pos)?;
            }
            pos += n as u64;
            progress(pos, Some(size));
        }
    }
    if let Some(dst) = dst {
        dst.set_len(size)?;
    }
    Ok(finish(hasher))
}

/// Write `data` at `offset`, skipping all-zero blocks (the file must read
/// as zeros there already: a fresh file or one being extended).
pub(super) fn write_sparse(dst: &File, data: &[u8], offset: u64) -> io::Result<()> {
    let mut at = 0usize;
    for block in data.chunks(ZERO_BLOCK) {
        if block.iter().any(|&b| b != 0) {
            dst.write_all_at(block, offset + at as u64)?;
        }
        at += block.len();
    }
    Ok(())
}

/// Hash the first `len` bytes of `file` into `hasher`.
pub(super) fn hash_prefix(file: &File, len: u64, hasher: &mut Sha256) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    while pos < len {
        let n = usize::try_from(len - pos).map_or(CHUNK, |r| r.min(CHUNK));
        file.read_exact_at(&mut buf[..n], pos)?;
        hasher.update(&buf[..n]);
        pos += n as u64;
    }
    Ok(())
}

/// Fill `buf` from `r` as far as it goes. Returns the bytes read and the
/// error that stopped it early, if any (EOF is not an error).
pub(super) fn fill(r: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}
