//! The virtio block device an export presents, whatever carries it: the options QEMU checks
//! (`logical-block-size`, `num-queues`), its feature bits and its config space
//! (`struct virtio_blk_config`, little-endian).

use ferrite_qapi::{Args, Error};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// virtio-blk counts in 512-byte sectors.
pub(crate) const SECTOR_BITS: u32 = 9;
/// The most sectors one discard may cover (QEMU's limit, in the config space too).
pub(crate) const MAX_DISCARD_SECTORS: u32 = 32768;
/// The most sectors one write-zeroes may cover.
pub(crate) const MAX_WRITE_ZEROES_SECTORS: u32 = 32768;
/// `sizeof(struct virtio_blk_config)` with the secure-erase and zoned fields.
pub(crate) const CONFIG_LEN: usize = 96;
/// Offset of `wce`, the one field a driver may write.
pub(crate) const CONFIG_WCE: usize = 32;

const MIN_BLOCK_SIZE: u64 = 512;
const MAX_BLOCK_SIZE: u64 = 2 << 20;

/// What a virtio-blk export presents.
#[derive(Debug, Clone)]
pub(crate) struct Device {
    pub(crate) logical_block_size: u32,
    pub(crate) num_queues: u16,
    pub(crate) writable: bool,
    /// What `VIRTIO_BLK_T_GET_ID` answers.
    pub(crate) serial: String,
}

impl Device {
    /// `logical-block-size` and `num-queues` checked as QEMU checks them.
    ///
    /// # Errors
    /// QEMU's texts for a block size that is not a power of two in 512 B..2 MiB, and for no
    /// queues.
    pub(crate) fn from_options(opts: &Args, writable: bool, serial: &str) -> Result<Device, Error> {
        let size = opts.opt_u64("logical-block-size").unwrap_or(MIN_BLOCK_SIZE);
        if size != 0
            && (!(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&size) || !size.is_power_of_two())
        {
            return Err(Error::generic(format!(
                "parameter logical-block-size must be a power of 2 between {MIN_BLOCK_SIZE} and \
                 {MAX_BLOCK_SIZE}"
            )));
        }
        let num_queues = opts.opt_u64("num-queues").unwrap_or(1);
        if num_queues == 0 {
            return Err(Error::generic("num-queues must be greater than 0"));
        }
        Ok(Device {
            logical_block_size: size.max(MIN_BLOCK_SIZE) as u32,
            num_queues: num_queues as u16,
            writable,
            serial: serial.to_owned(),
        })
    }

    /// The virtio feature bits offered (QEMU's vhost-user-blk export's).
    pub(crate) fn features(&self) -> u64 {
        let mut f = [
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_CONFIG_WCE,
            VIRTIO_BLK_F_MQ,
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
        ]
        .iter()
        .fold(0u64, |acc, bit| acc | 1 << bit);
        if !self.writable {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    /// The config space for a node of `len` bytes.
    pub(crate) fn config(&self, len: u64) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(len >> SECTOR_BITS).to_le_bytes()); // capacity
        put(8, &0u32.to_le_bytes()); // size_max
        put(12, &(128u32 - 2).to_le_bytes()); // seg_max
        put(20, &self.logical_block_size.to_le_bytes()); // blk_size
        put(26, &1u16.to_le_bytes()); // min_io_size
        put(28, &1u32.to_le_bytes()); // opt_io_size
        put(34, &self.num_queues.to_le_bytes());
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes()); // max_discard_seg
        put(44, &(self.logical_block_size >> SECTOR_BITS).to_le_bytes()); // discard alignment
        put(48, &MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes()); // max_write_zeroes_seg
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(json: &str) -> Args {
        Args::new(
            ferrite_qobject::from_json(json)
                .unwrap()
                .as_dict()
                .unwrap()
                .clone(),
        )
    }

    #[test]
    fn block_sizes_and_queues_are_checked_as_qemu_checks_them() {
        for (o, err) in [
            (r#"{"logical-block-size": 1000}"#, true),
            (r#"{"logical-block-size": 256}"#, true),
            (r#"{"logical-block-size": 4194304}"#, true),
            (r#"{"logical-block-size": 4096}"#, false),
            (r#"{"logical-block-size": 0}"#, false),
            (r#"{"num-queues": 0}"#, true),
            (r#"{"num-queues": 4}"#, false),
        ] {
            assert_eq!(
                Device::from_options(&opts(o), true, "s").is_err(),
                err,
                "{o}"
            );
        }
    }

    #[test]
    fn the_config_space_says_capacity_block_size_and_limits() {
        let d = Device::from_options(
            &opts(r#"{"logical-block-size": 4096, "num-queues": 2}"#),
            true,
            "s",
        )
        .unwrap();
        let c = d.config(1 << 30);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert_eq!(d.features() & (1 << VIRTIO_BLK_F_RO), 0);
    }
}
