//! Parser tests: one well-formed request of each type, then every way a
//! guest can get a chain wrong.

use std::sync::atomic::AtomicBool;

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::vhost::config::DeviceConfig;

const W: u16 = 2; // VRING_DESC_F_WRITE
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x100_0000;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn cfg(readonly: bool) -> DeviceConfig {
    DeviceConfig {
        size: std::sync::atomic::AtomicU64::new(1 << 20), // 2048 sectors
        num_queues: 1,
        queue_size: 16,
        readonly,
        block_size: 512,
        serial: b"serial-1".to_vec(),
        writeback: AtomicBool::new(true),
    }
}

fn header(mem: &GuestMemoryMmap, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn run(
    mem: &GuestMemoryMmap,
    cfg: &DeviceConfig,
    descs: &[RawDescriptor],
) -> Result<Request, Refused> {
    let q = MockSplitQueue::new(mem, 16);
    let chain = q.build_desc_chain(descs).unwrap();
    parse(chain, cfg)
}

fn refused(r: Result<Request, Refused>) -> ParseError {
    r.expect_err("request should be refused").error
}

#[test]
fn read_request() {
    let m = mem();
    header(&m, req_type::IN, 8);
    let r = run(
        &m,
        &cfg(false),
        &[d(HDR, 16, 0), d(DATA, 4096, W), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(r.kind, Kind::Read { offset: 4096 });
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(DATA),
            len: 4096
        }]
    );
    assert_eq!(r.data_len, 4096);
    assert_eq!(r.status, GuestAddress(STATUS));
}

#[test]
fn write_request_with_scatter_gather() {
    let m = mem();
    header(&m, req_type::OUT, 0);
    let r = run(
        &m,
        &cfg(false),
        &[
            d(HDR, 16, 0),
            d(DATA, 512, 0),
            d(DATA + 0x1000, 1024, 0),
            d(STATUS, 1, W),
        ],
    )
    .unwrap();
    assert_eq!(r.kind, Kind::Write { offset: 0 });
    assert_eq!(r.data.len(), 2);
    assert_eq!(r.data_len, 1536);
}

#[test]
fn header_and_data_in_one_descriptor_and_status_inside_data() {
    // Any layout is legal (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
    let m = mem();
    header(&m, req_type::OUT, 1);
    m.write_slice(&[0u8; 16], GuestAddress(HDR + 16)).unwrap();
    let r = run(&m, &cfg(false), &[d(HDR, 16 + 512, 0), d(STATUS, 1, W)]).unwrap();
    assert_eq!(r.kind, Kind::Write { offset: 512 });
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(HDR + 16),
            len: 512
        }]
    );

    header(&m, req_type::IN, 0);
    let r = run(&m, &cfg(false), &[d(HDR, 16, 0), d(DATA, 513, W)]).unwrap();
    assert_eq!(
        r.data,
        vec![Region {
            addr: GuestAddress(DATA),
            len: 512
        }]
    );
    assert_eq!(r.status, GuestAddress(DATA + 512));
}

#[test]
fn flush_and_get_id() {
    let m = mem();
    header(&m, req_type::FLUSH, 0);
    assert_eq!(
        run(&m, &cfg(true), &[d(HDR, 16, 0), d(STATUS, 1, W)])
            .unwrap()
            .kind,
        Kind::Flush
    );
    header(&m, req_type::GET_ID, 0);
    let r = run(
        &m,
        &cfg(false),
        &[d(HDR, 16, 0), d(DATA, 20, W), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(r.kind, Kind::GetId);
    assert_eq!(
        id_bytes(b"serial-1", 20),
        b"serial-1\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    assert_eq!(id_bytes(b"abc", 2), b"ab");
}

fn segments(m: &GuestMemoryMmap, segs: &[(u64, u32, u32)]) -> u32 {
    let mut bytes = Vec::new();
    for (sector, n, flags) in segs {
        bytes.extend(sector.to_le_bytes());
        bytes.extend(n.to_le_bytes());
        bytes.extend(flags.to_le_bytes());
    }
    m.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    bytes.len() as u32
}

#[test]
fn discard_and_write_zeroes_segments() {
    let m = mem();
    let len = segments(&m, &[(0, 8, 0), (100, 16, 0)]);
    header(&m, req_type::DISCARD, 0);
    let r = run(
        &m,
        &cfg(false),
        &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(
        r.kind,
        Kind::Discard(vec![
            Range {
                offset: 0,
                len: 4096,
                unmap: true
            },
            Range {
                offset: 51200,
                len: 8192,
                unmap: true
            }
        ])
    );
    let len = segments(&m, &[(8, 8, 1), (16, 8, 0)]);
    header(&m, req_type::WRITE_ZEROES, 0);
    let r = run(
        &m,
        &cfg(false),
        &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)],
    )
    .unwrap();
    assert_eq!(
        r.kind,
        Kind::WriteZeroes(vec![
            Range {
                offset: 4096,
                len: 4096,
                unmap: true
            },
            Range {
                offset: 8192,
                len: 4096,
                unmap: false
            }
        ])
    );
}

#[test]
fn bad_segments() {
    let m = mem();
    let c = cfg(false);
    let check = |ty, segs: &[(u64, u32, u32)], want: ParseError| {
        let len = segments(&m, segs);
        header(&m, ty, 0);
        let err = refused(run(
            &m,
            &c,
            &[d(HDR, 16, 0), d(DATA, len, 0), d(STATUS, 1, W)],
        ));
        assert_eq!(err, want);
        err.status()
    };
    assert_eq!(
        check(
            req_type::DISCARD,
            &[(0, 8, 1)],
            ParseError::UnsupportedSegmentFlags(1)
        ),
        status::UNSUPP
    );
    assert_eq!(
        check(
            req_type::WRITE_ZEROES,
            &[(0, 8, 2)],
            ParseError::UnsupportedSegmentFlags(2)
        ),
        status::UNSUPP
    );
    assert_eq!(
        check(
            req_type::DISCARD,
            &[(2047, 2, 0)],
            ParseError::OutOfRange {
                sector: 2047,
                sectors: 2,
                capacity: 2048
            }
        ),
        status::IOERR
    );
    assert_eq!(
        check(
            req_type::DISCARD,
            &[(u64::MAX, 1, 0)],
            ParseError::OutOfRange {
                sector: u64::MAX,
                sectors: 1,
                capacity: 2048
            }
        ),
        status::IOERR
    );
    check(
        req_type::DISCARD,
        &[(0, u32::MAX, 0)],
        ParseError::SegmentTooLarge(u32::MAX),
    );
    let many: Vec<_> = (0..17).map(|i| (i * 8, 8, 0)).collect();
    check(
        req_type::DISCARD,
        &many,
        ParseError::TooManySegments { count: 17, max: 16 },
    );
    // A payload that is not a whole number of segments.
    header(&m, req_type::DISCARD, 0);
    assert_eq!(
        refused(run(
            &m,
            &c,
            &[d(HDR, 16, 0), d(DATA, 15, 0), d(STATUS, 1, W)]
        )),
        ParseError::BadSegmentPayload(15)
    );
    assert_eq!(
        refused(run(&m, &c, &[d(HDR, 16, 0), d(STATUS, 1, W)])),
        ParseError::BadSegmentPayload(0)
    );
}

#[test]
fn every_bad_chain_gets_the_right_status() {
    let m = mem();
    let rw = cfg(false);
    let ro = cfg(true);
    let cases: Vec<(u32, u64, &DeviceConfig, Vec<RawDescriptor>, ParseError)> = vec![
        // No writable descriptor at all: nowhere to put a status.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 512, 0)],
            ParseError::NoStatus,
        ),
        // Status outside guest memory.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(MEM_SIZE as u64 + 10, 1, W)],
            ParseError::NoStatus,
        ),
        // Header too short.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(HDR, 8, 0), d(STATUS, 1, W)],
            ParseError::ShortHeader,
        ),
        // Header outside guest memory.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(u64::MAX - 8, 16, 0), d(STATUS, 1, W)],
            ParseError::BadAddress,
        ),
        // Readable after writable.
        (
            req_type::OUT,
            0,
            &rw,
            vec![
                d(HDR, 16, 0),
                d(DATA, 512, W),
                d(DATA, 512, 0),
                d(STATUS, 1, W),
            ],
            ParseError::ReadableAfterWritable,
        ),
        // Read with a device-readable data buffer.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
            ParseError::WrongDirection(0),
        ),
        // Write with a device-writable data buffer.
        (
            req_type::OUT,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
            ParseError::WrongDirection(1),
        ),
        // Lengths not a multiple of 512.
        (
            req_type::IN,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 511, W), d(STATUS, 1, W)],
            ParseError::UnalignedLength(511),
        ),
        (
            req_type::OUT,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 100, 0), d(STATUS, 1, W)],
            ParseError::UnalignedLength(100),
        ),
        // Past the end, straddling the end, and overflowing sector arithmetic.
        (
            req_type::IN,
            2048,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
            ParseError::OutOfRange {
                sector: 2048,
                sectors: 1,
                capacity: 2048,
            },
        ),
        (
            req_type::OUT,
            2047,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 1024, 0), d(STATUS, 1, W)],
            ParseError::OutOfRange {
                sector: 2047,
                sectors: 2,
                capacity: 2048,
            },
        ),
        (
            req_type::IN,
            u64::MAX,
            &rw,
            vec![d(HDR, 16, 0), d(DATA, 512, W), d(STATUS, 1, W)],
            ParseError::OutOfRange {
                sector: u64::MAX,
                sectors: 1,
                capacity: 2048,
            },
        ),
        (
            req_type::IN,
            u64::MAX / 512 + 1,
            &rw,
            vec![d(HDR, 16, 0), d(STATUS, 1, W)],
            ParseError::OutOfRange {
                sector: u64::MAX / 512 + 1,
                sectors: 0,
                capacity: 2048,
            },
        ),
        // Data outside guest memory.
        (
            req_type::IN,
            0,
            &rw,
            vec![
                d(HDR, 16, 0),
                d(MEM_SIZE as u64 - 512, 1024, W),
                d(STATUS, 1, W),
            ],
            ParseError::BadAddress,
        ),
        // Writes, discards and write-zeroes to a read-only disk.
        (
            req_type::OUT,
            0,
            &ro,
            vec![d(HDR, 16, 0), d(DATA, 512, 0), d(STATUS, 1, W)],
            ParseError::ReadOnly,
        ),
        (
            req_type::DISCARD,
            0,
            &ro,
            vec![d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            ParseError::ReadOnly,
        ),
        (
            req_type::WRITE_ZEROES,
            0,
            &ro,
            vec![d(HDR, 16, 0), d(DATA, 16, 0), d(STATUS, 1, W)],
            ParseError::ReadOnly,
        ),
        // Unknown types, and types we do not offer.
        (
            99,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(STATUS, 1, W)],
            ParseError::UnsupportedType(99),
        ),
        (
            14,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(STATUS, 1, W)],
            ParseError::UnsupportedType(14),
        ),
        // GET_ID with nowhere to write the id.
        (
            req_type::GET_ID,
            0,
            &rw,
            vec![d(HDR, 16, 0), d(STATUS, 1, W)],
            ParseError::WrongDirection(8),
        ),
    ];
    for (i, (ty, sector, c, descs, want)) in cases.into_iter().enumerate() {
        header(&m, ty, sector);
        let r = run(&m, c, &descs);
        let got = refused(r);
        assert_eq!(got, want, "case {i}");
        let expect = if matches!(want, ParseError::UnsupportedType(_)) {
            status::UNSUPP
        } else {
            status::IOERR
        };
        assert_eq!(got.status(), expect, "case {i}");
    }
}

#[test]
fn too_many_descriptors() {
    let m = mem();
    header(&m, req_type::OUT, 0);
    // queue_size 16 gives seg_max 14: 1 header + 15 data + 1 status is one
    // too many.
    let mut descs = vec![d(HDR, 16, 0)];
    descs.extend((0..15).map(|i| d(DATA + i * 512, 512, 0)));
    descs.push(d(STATUS, 1, W));
    let q = MockSplitQueue::new(&m, 32);
    let chain = q.build_desc_chain(&descs).unwrap();
    assert_eq!(
        parse(chain, &cfg(false)).unwrap_err().error,
        ParseError::TooManyDescriptors(16)
    );
}

#[test]
fn refusal_keeps_the_status_address() {
    let m = mem();
    header(&m, 99, 0);
    let r = run(&m, &cfg(false), &[d(HDR, 16, 0), d(STATUS, 1, W)]).unwrap_err();
    assert_eq!(r.status, Some(GuestAddress(STATUS)));
    header(&m, req_type::IN, 0);
    let r = run(&m, &cfg(false), &[d(HDR, 16, 0)]).unwrap_err();
    assert_eq!(r.status, None);
}
