//! Parsing and validating one virtio-blk request. No I/O happens here: a
//! descriptor chain becomes a [`Request`] (what to do, and where in guest
//! memory) or a [`ParseError`] whose [`status`](ParseError::status) the
//! worker writes back. The guest is untrusted: every length, address,
//! sector and type is checked, and arithmetic on them is checked.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64};

use super::config::{self, DeviceConfig};

/// Request types (virtio 1.2, 5.2.6).
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status bytes.
pub mod status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: u32 = 16;
const SEGMENT_LEN: u32 = 16;
/// The unmap flag of a write-zeroes segment.
const WZ_UNMAP: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct Segment {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}
// SAFETY: Segment is repr(C), made only of integer fields, with no padding
// (8 + 4 + 4 bytes): every bit pattern is a valid value.
unsafe impl ByteValued for Segment {}

/// A piece of guest memory that a request reads or fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A byte range of the disk for discard and write-zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
    pub unmap: bool,
}

/// What a valid request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read `len` bytes at `offset` into `data`.
    Read {
        offset: u64,
    },
    /// Write `data` at `offset`.
    Write {
        offset: u64,
    },
    Flush,
    /// Fill `data` with the serial.
    GetId,
    Discard(Vec<Range>),
    WriteZeroes(Vec<Range>),
}

/// A validated request, ready for the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub kind: Kind,
    /// Guest memory of the data: device-readable for writes,
    /// device-writable for reads and GET_ID.
    pub data: Vec<Region>,
    pub data_len: u32,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("descriptor chain has no device-writable status byte")]
    NoStatus,
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("descriptor chain longer than {0} descriptors")]
    TooManyDescriptors(usize),
    #[error("request header shorter than 16 bytes")]
    ShortHeader,
    #[error("descriptor points outside guest memory")]
    BadAddress,
    #[error("data buffer has the wrong direction for request type {0}")]
    WrongDirection(u32),
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u32),
    #[error("sectors {sector}+{sectors} lie outside the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("discard/write-zeroes payload of {0} bytes is not a whole number of segments")]
    BadSegmentPayload(u32),
    #[error("{count} discard/write-zeroes segments, more than the {max} advertised")]
    TooManySegments { count: u32, max: u32 },
    #[error("discard/write-zeroes segment of {0} sectors is larger than advertised")]
    SegmentTooLarge(u32),
    #[error("unsupported flags {0:#x} in a discard/write-zeroes segment")]
    UnsupportedSegmentFlags(u32),
}

impl ParseError {
    /// The virtio status the driver receives. Exhaustive on purpose: a new
    /// variant must decide.
    pub fn status(&self) -> u8 {
        match self {
            ParseError::NoStatus
            | ParseError::ReadableAfterWritable
            | ParseError::TooManyDescriptors(_)
            | ParseError::ShortHeader
            | ParseError::BadAddress
            | ParseError::WrongDirection(_)
            | ParseError::UnalignedLength(_)
            | ParseError::OutOfRange { .. }
            | ParseError::ReadOnly
            | ParseError::BadSegmentPayload(_)
            | ParseError::TooManySegments { .. }
            | ParseError::SegmentTooLarge(_) => status::IOERR,
            ParseError::UnsupportedType(_) | ParseError::UnsupportedSegmentFlags(_) => {
                status::UNSUPP
            }
        }
    }
}

/// A refused request: the error, and where its status goes if the chain
/// had a place for one.
#[derive(Debug)]
pub struct Refused {
    pub head: u16,
    pub error: ParseError,
    pub status: Option<GuestAddress>,
}

/// Turn a descriptor chain into a request.
pub fn parse<M>(chain: DescriptorChain<M>, cfg: &DeviceConfig) -> Result<Request, Refused>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head = chain.head_index();
    let mem = chain.memory();
    // The header and status add two descriptors to the data's seg_max.
    let max_desc = cfg.seg_max() as usize + 2;
    let mut readable: Vec<Region> = Vec::new();
    let mut writable: Vec<Region> = Vec::new();
    let mut layout_error = None;
    // The chain iterator is bounded by the queue (or indirect table) size
    // and stops at loops, so walking it whole is bounded too: the status
    // byte is at its end even when the chain is too long.
    for (n, desc) in chain.clone().enumerate() {
        if n >= max_desc {
            layout_error = Some(ParseError::TooManyDescriptors(max_desc));
        }
        if desc.len() == 0 {
            continue;
        }
        let r = Region {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(r);
        } else if !writable.is_empty() {
            layout_error = Some(ParseError::ReadableAfterWritable);
        } else {
            readable.push(r);
        }
    }
    // The status byte is the last byte of the last writable descriptor.
    let status = match writable.last_mut() {
        Some(last) => {
            last.len -= 1;
            let addr = last.addr.checked_add(u64::from(last.len));
            if last.len == 0 {
                writable.pop();
            }
            addr
        }
        None => None,
    };
    let status = match status {
        Some(a) if mem.check_range(a, 1, vm_memory::Permissions::Write) => a,
        _ => {
            return Err(Refused {
                head,
                error: ParseError::NoStatus,
                status: None,
            })
        }
    };
    let refuse = |error| Refused {
        head,
        error,
        status: Some(status),
    };
    if let Some(e) = layout_error {
        return Err(refuse(e));
    }

    let mut header = [0u8; HEADER_LEN as usize];
    let out_data =
        split_front(&readable, HEADER_LEN).ok_or_else(|| refuse(ParseError::ShortHeader))?;
    gather(mem, &readable, &mut header).map_err(refuse)?;
    let ty = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));

    let req = |kind, data: Vec<Region>| {
        let data_len = data.iter().map(|r| r.len).sum();
        Request {
            head,
            kind,
            data,
            data_len,
            status,
        }
    };
    let in_data = writable;
    match ty {
        req_type::IN | req_type::OUT => {
            let (data, other) = if ty == req_type::IN {
                (in_data, out_data)
            } else {
                (out_data, in_data)
            };
            if !other.is_empty() {
                return Err(refuse(ParseError::WrongDirection(ty)));
            }
            if ty == req_type::OUT && cfg.readonly {
                return Err(refuse(ParseError::ReadOnly));
            }
            let len =
                total_len(&data).ok_or_else(|| refuse(ParseError::UnalignedLength(u32::MAX)))?;
            if len % SECTOR_SIZE as u32 != 0 {
                return Err(refuse(ParseError::UnalignedLength(len)));
            }
            let offset = check_range(sector, u64::from(len) / SECTOR_SIZE, cfg).map_err(refuse)?;
            check_regions(mem, &data).map_err(refuse)?;
            let kind = if ty == req_type::IN {
                Kind::Read { offset }
            } else {
                Kind::Write { offset }
            };
            Ok(req(kind, data))
        }
        req_type::FLUSH => Ok(req(Kind::Flush, Vec::new())),
        req_type::GET_ID => {
            if !out_data.is_empty() || in_data.is_empty() {
                return Err(refuse(ParseError::WrongDirection(ty)));
            }
            check_regions(mem, &in_data).map_err(refuse)?;
            Ok(req(Kind::GetId, in_data))
        }
        req_type::DISCARD | req_type::WRITE_ZEROES => {
            if !in_data.is_empty() {
                return Err(refuse(ParseError::WrongDirection(ty)));
            }
            if cfg.readonly {
                return Err(refuse(ParseError::ReadOnly));
            }
            let ranges = parse_segments(mem, &out_data, ty, cfg).map_err(refuse)?;
            let kind = if ty == req_type::DISCARD {
                Kind::Discard(ranges)
            } else {
                Kind::WriteZeroes(ranges)
            };
            Ok(req(kind, Vec::new()))
        }
        other => Err(refuse(ParseError::UnsupportedType(other))),
    }
}

fn total_len(regions: &[Region]) -> Option<u32> {
    regions
        .iter()
        .try_fold(0u32, |acc, r| acc.checked_add(r.len))
}

/// Sector range inside the disk, as a byte offset.
fn check_range(sector: u64, sectors: u64, cfg: &DeviceConfig) -> Result<u64, ParseError> {
    let capacity = cfg.sectors();
    let out = ParseError::OutOfRange {
        sector,
        sectors,
        capacity,
    };
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => sector.checked_mul(SECTOR_SIZE).ok_or(out),
        _ => Err(out),
    }
}

/// Every region lies inside guest memory.
fn check_regions<M: GuestMemory + ?Sized>(mem: &M, regions: &[Region]) -> Result<(), ParseError> {
    for r in regions {
        if !mem.check_range(r.addr, r.len as usize, vm_memory::Permissions::ReadWrite) {
            return Err(ParseError::BadAddress);
        }
    }
    Ok(())
}

/// The regions after the first `skip` bytes, or `None` if there are fewer.
fn split_front(regions: &[Region], mut skip: u32) -> Option<Vec<Region>> {
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        if skip >= r.len {
            skip -= r.len;
        } else {
            out.push(Region {
                addr: r.addr.checked_add(u64::from(skip))?,
                len: r.len - skip,
            });
            skip = 0;
        }
    }
    (skip == 0).then_some(out)
}

/// Copy the first `buf.len()` bytes of the regions out of guest memory.
fn gather<M: GuestMemory + ?Sized>(
    mem: &M,
    regions: &[Region],
    buf: &mut [u8],
) -> Result<(), ParseError> {
    let mut filled = 0;
    for r in regions {
        if filled == buf.len() {
            break;
        }
        let n = (r.len as usize).min(buf.len() - filled);
        mem.read_slice(&mut buf[filled..filled + n], r.addr)
            .map_err(|_| ParseError::BadAddress)?;
        filled += n;
    }
    if filled == buf.len() {
        Ok(())
    } else {
        Err(ParseError::ShortHeader)
    }
}

fn parse_segments<M: GuestMemory + ?Sized>(
    mem: &M,
    data: &[Region],
    ty: u32,
    cfg: &DeviceConfig,
) -> Result<Vec<Range>, ParseError> {
    let len = total_len(data).ok_or(ParseError::BadSegmentPayload(u32::MAX))?;
    let (max_seg, max_sectors) = if ty == req_type::DISCARD {
        (config::MAX_DISCARD_SEG, config::MAX_DISCARD_SECTORS)
    } else {
        (
            config::MAX_WRITE_ZEROES_SEG,
            config::MAX_WRITE_ZEROES_SECTORS,
        )
    };
    if len == 0 || len % SEGMENT_LEN != 0 {
        return Err(ParseError::BadSegmentPayload(len));
    }
    let count = len / SEGMENT_LEN;
    if count > max_seg {
        return Err(ParseError::TooManySegments {
            count,
            max: max_seg,
        });
    }
    let mut bytes = vec![0u8; len as usize];
    gather(mem, data, &mut bytes).map_err(|_| ParseError::BadAddress)?;
    let mut ranges = Vec::with_capacity(count as usize);
    for chunk in bytes.chunks_exact(SEGMENT_LEN as usize) {
        let seg = Segment::from_slice(chunk).copied().unwrap_or_default();
        let (sector, sectors, flags) = (
            seg.sector.to_native(),
            seg.num_sectors.to_native(),
            seg.flags.to_native(),
        );
        let allowed = if ty == req_type::DISCARD { 0 } else { WZ_UNMAP };
        if flags & !allowed != 0 {
            return Err(ParseError::UnsupportedSegmentFlags(flags));
        }
        if sectors > max_sectors {
            return Err(ParseError::SegmentTooLarge(sectors));
        }
        let offset = check_range(sector, u64::from(sectors), cfg)?;
        ranges.push(Range {
            offset,
            len: u64::from(sectors) * SECTOR_SIZE,
            unmap: ty == req_type::DISCARD || flags & WZ_UNMAP != 0,
        });
    }
    Ok(ranges)
}

/// The GET_ID answer for a buffer of `len` bytes: the serial, NUL-padded
/// to 20 bytes, cut to the buffer.
pub fn id_bytes(serial: &[u8], len: usize) -> Vec<u8> {
    let mut id = [0u8; config::ID_BYTES];
    let n = serial.len().min(config::ID_BYTES);
    id[..n].copy_from_slice(&serial[..n]);
    id[..len.min(config::ID_BYTES)].to_vec()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
