//! virtio-blk feature bits and the device configuration space.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// virtio-blk and transport feature bits (virtio 1.2, 5.2.3 and 6).
pub mod feature {
    pub const SIZE_MAX: u32 = 1;
    pub const SEG_MAX: u32 = 2;
    pub const RO: u32 = 5;
    pub const BLK_SIZE: u32 = 6;
    pub const FLUSH: u32 = 9;
    pub const TOPOLOGY: u32 = 10;
    pub const CONFIG_WCE: u32 = 11;
    pub const MQ: u32 = 12;
    pub const DISCARD: u32 = 13;
    pub const WRITE_ZEROES: u32 = 14;
    pub const INDIRECT_DESC: u32 = 28;
    pub const EVENT_IDX: u32 = 29;
    pub const VERSION_1: u32 = 32;
}

/// Size of the config space we serve: the virtio 1.2 struct up to and
/// including the secure-erase and zoned fields, all zero past
/// `write_zeroes_may_unmap`. Frontends ask for the size their features
/// imply; anything past what we fill reads as zero.
pub const CONFIG_SPACE_SIZE: usize = 96;

/// Offset of the `writeback` byte, the only field a driver may write
/// (with CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// Largest single data segment we advertise (SIZE_MAX). 1 MiB keeps one
/// segment inside what a frontend maps contiguously, and is far above
/// what Linux builds from 4 KiB pages.
pub const SIZE_MAX: u32 = 1 << 20;

/// Discard and write-zeroes limits. 2 GiB in sectors per segment keeps one
/// fallocate call short enough not to stall a queue for long; 16 segments
/// lets Linux merge neighbouring discards into one request.
pub const MAX_DISCARD_SECTORS: u32 = (2 << 30) / 512 - 1;
pub const MAX_DISCARD_SEG: u32 = 16;
pub const MAX_WRITE_ZEROES_SECTORS: u32 = MAX_DISCARD_SECTORS;
pub const MAX_WRITE_ZEROES_SEG: u32 = 16;

/// The length of the GET_ID answer (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = 20;

/// Everything the guest can learn about the device.
#[derive(Debug)]
pub struct DeviceConfig {
    /// Disk size in bytes (a multiple of 512); grows while the device is
    /// in use (`set_size`), never shrinks.
    pub size: AtomicU64,
    pub num_queues: u16,
    pub queue_size: u16,
    pub readonly: bool,
    /// Logical block size the guest should use: 512 or 4096.
    pub block_size: u32,
    /// GET_ID answer, at most 20 bytes.
    pub serial: Vec<u8>,
    /// Write-back cache on (the default). Cleared when the driver writes 0
    /// to `writeback` (write-through: writes are durable on completion).
    pub writeback: AtomicBool,
}

impl DeviceConfig {
    /// SEG_MAX: the header and the status take two descriptors of a chain
    /// as long as the queue.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    pub fn sectors(&self) -> u64 {
        self.size() / 512
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The disk grew: requests up to `size` are accepted from now on, and
    /// the config space says so (the VMM re-reads it on a config-change
    /// notification or QMP `device-sync-config`).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    pub fn features(&self) -> u64 {
        let mut bits = [
            feature::SIZE_MAX,
            feature::SEG_MAX,
            feature::BLK_SIZE,
            feature::FLUSH,
            feature::TOPOLOGY,
            feature::CONFIG_WCE,
            feature::MQ,
            feature::INDIRECT_DESC,
            feature::EVENT_IDX,
            feature::VERSION_1,
        ]
        .to_vec();
        if self.readonly {
            bits.push(feature::RO);
        } else {
            bits.extend([feature::DISCARD, feature::WRITE_ZEROES]);
        }
        bits.iter().fold(0u64, |acc, b| acc | 1 << b)
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// A new driver starts with the write cache on, whatever the last one
    /// chose (as QEMU's own virtio-blk does on reset).
    pub fn reset(&self) {
        self.writeback.store(true, Ordering::Relaxed);
    }

    /// The whole config space, little-endian, as virtio 1.2 lays it out.
    pub fn space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.sectors().to_le_bytes()); // capacity, in 512-byte sectors
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // 16..20: geometry, not offered.
        put(20, &self.block_size.to_le_bytes());
        // topology: physical_block_exp 0, alignment_offset 0,
        // min_io_size 1 block, opt_io_size 0 (no preference).
        put(24, &[0, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(WRITEBACK_OFFSET, &[u8::from(self.writeback())]);
        put(34, &self.num_queues.to_le_bytes());
        let align = self.block_size / 512;
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEG.to_le_bytes());
        put(44, &align.to_le_bytes());
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &MAX_WRITE_ZEROES_SEG.to_le_bytes());
        put(56, &[1]); // write_zeroes_may_unmap
        c
    }

    /// `size` bytes of config space from `offset`, zero past its end: the
    /// frontend's read always gets exactly what it asked for.
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.space();
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SPACE_SIZE);
        let end = (offset as usize)
            .saturating_add(size as usize)
            .min(CONFIG_SPACE_SIZE);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    /// A driver write to config space. Only `writeback` is writable;
    /// anything else is refused.
    pub fn write(&self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        if offset as usize == WRITEBACK_OFFSET && data.len() == 1 && data[0] <= 1 {
            self.writeback.store(data[0] == 1, Ordering::Relaxed);
            Ok(())
        } else {
            Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "config space write of {len} bytes at offset {offset}: only the writeback byte is writable"
    )]
    ReadOnlyField { offset: u32, len: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(readonly: bool) -> DeviceConfig {
        DeviceConfig {
            size: AtomicU64::new(1 << 30),
            num_queues: 4,
            queue_size: 256,
            readonly,
            block_size: 4096,
            serial: b"abc".to_vec(),
            writeback: AtomicBool::new(true),
        }
    }

    #[test]
    fn space_layout_matches_virtio_1_2() {
        let c = cfg(false).space();
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn features_follow_readonly() {
        let rw = cfg(false).features();
        let ro = cfg(true).features();
        assert_eq!(rw & (1 << feature::RO), 0);
        assert_ne!(rw & (1 << feature::DISCARD), 0);
        assert_ne!(ro & (1 << feature::RO), 0);
        assert_eq!(ro & (1 << feature::DISCARD), 0);
        assert_eq!(ro & (1 << feature::WRITE_ZEROES), 0);
        for f in [
            feature::VERSION_1,
            feature::EVENT_IDX,
            feature::INDIRECT_DESC,
            feature::MQ,
        ] {
            assert_ne!(rw & (1 << f), 0);
        }
    }

    #[test]
    fn reads_past_the_end_are_zero_padded() {
        let c = cfg(false);
        assert_eq!(c.read(0, 8), c.space()[0..8].to_vec());
        assert_eq!(
            c.read(90, 20),
            [c.space()[90..96].to_vec(), vec![0; 14]].concat()
        );
        assert_eq!(c.read(1000, 4), vec![0; 4]);
        assert_eq!(c.read(u32::MAX, 4), vec![0; 4]);
    }

    #[test]
    fn only_writeback_is_writable() {
        let c = cfg(false);
        c.write(WRITEBACK_OFFSET as u32, &[0]).unwrap();
        assert!(!c.writeback());
        c.reset();
        assert!(c.writeback());
        c.write(WRITEBACK_OFFSET as u32, &[0]).unwrap();
        assert_eq!(c.space()[WRITEBACK_OFFSET], 0);
        assert!(c.write(0, &[1; 8]).is_err());
        assert!(c.write(WRITEBACK_OFFSET as u32, &[7]).is_err());
    }
}
