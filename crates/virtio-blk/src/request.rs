//! One virtio-blk request answered from the export's `BlockBackend`, as QEMU's handler
//! answers it: range checks in sectors against the logical block size, reads and writes,
//! flush, the serial for `GET_ID`, and one-segment discard and write-zeroes.

use crate::device::{Device, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_BITS};
use ferrite_block::io::ForeignBuf;
use ferrite_block::{BlockBackend, ReqFlags};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

/// `VIRTIO_BLK_T_BARRIER`, a legacy flag QEMU ignores.
const T_BARRIER: u32 = 0x8000_0000;
/// The largest request the block layer takes, in sectors (QEMU's `BDRV_REQUEST_MAX_SECTORS`).
const MAX_REQUEST_SECTORS: u64 = (i32::MAX as u64) >> SECTOR_BITS;

/// A request as the driver put it in the queue.
#[derive(Debug)]
pub(crate) struct Request {
    /// `virtio_blk_outhdr.type`.
    pub(crate) kind: u32,
    /// `virtio_blk_outhdr.sector`.
    pub(crate) sector: u64,
    /// What the driver gave after the header: the data of a write, a discard's segment.
    pub(crate) payload: Vec<u8>,
    /// Room the driver left for data before the status byte.
    pub(crate) in_len: usize,
    /// That room as memory a read may fill directly (the guest's RAM), when it can be
    /// reached that way; otherwise a read's data comes back in [`Outcome::data`].
    pub(crate) room: Option<ForeignBuf>,
}

/// How a request ended: what to copy to the driver before the status byte, and the status.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Outcome {
    pub(crate) data: Vec<u8>,
    pub(crate) status: u8,
}

impl Request {
    /// A request from its 16-byte header (`virtio_blk_outhdr`) and what followed it.
    pub(crate) fn new(header: &[u8; 16], payload: Vec<u8>, in_len: usize) -> Request {
        let [k0, k1, k2, k3, _, _, _, _, s @ ..] = *header;
        Request {
            kind: u32::from_le_bytes([k0, k1, k2, k3]),
            sector: u64::from_le_bytes(s),
            payload,
            in_len,
            room: None,
        }
    }
}

fn status(s: u32) -> Outcome {
    Outcome {
        data: Vec::new(),
        status: s as u8,
    }
}

/// Whether `size` bytes at `sector` are whole sectors, aligned to the logical block size,
/// and inside the node.
fn range_ok(blk: &BlockBackend, dev: &Device, sector: u64, size: u64) -> bool {
    if size % (1 << SECTOR_BITS) != 0 {
        return false;
    }
    let sectors = size >> SECTOR_BITS;
    let total = blk.len() >> SECTOR_BITS;
    sectors <= MAX_REQUEST_SECTORS
        && sector
            .checked_shl(SECTOR_BITS)
            .is_some_and(|b| b % u64::from(dev.logical_block_size) == 0)
        && sector <= total
        && sectors <= total - sector
}

/// Answers `req`.
pub(crate) async fn process(blk: &BlockBackend, dev: &Device, req: Request) -> Outcome {
    match req.kind & !T_BARRIER {
        VIRTIO_BLK_T_IN => {
            let len = req.in_len as u64;
            if !range_ok(blk, dev, req.sector, len) {
                return status(VIRTIO_BLK_S_IOERR);
            }
            let offset = req.sector << SECTOR_BITS;
            if let Some(room) = &req.room {
                let r = blk.read_into(offset, room).await;
                return status(if r.is_ok() {
                    VIRTIO_BLK_S_OK
                } else {
                    VIRTIO_BLK_S_IOERR
                });
            }
            match blk.read(offset, req.in_len).await {
                Ok(data) => Outcome {
                    data,
                    status: VIRTIO_BLK_S_OK as u8,
                },
                Err(_) => status(VIRTIO_BLK_S_IOERR),
            }
        }
        VIRTIO_BLK_T_OUT => {
            let len = req.payload.len() as u64;
            if !dev.writable || !range_ok(blk, dev, req.sector, len) {
                return status(VIRTIO_BLK_S_IOERR);
            }
            let r = blk
                .write(req.sector << SECTOR_BITS, req.payload, ReqFlags::empty())
                .await;
            status(if r.is_ok() {
                VIRTIO_BLK_S_OK
            } else {
                VIRTIO_BLK_S_IOERR
            })
        }
        VIRTIO_BLK_T_FLUSH => status(if blk.flush().await.is_ok() {
            VIRTIO_BLK_S_OK
        } else {
            VIRTIO_BLK_S_IOERR
        }),
        VIRTIO_BLK_T_GET_ID => {
            let mut id = dev.serial.clone().into_bytes();
            id.push(0);
            id.truncate(req.in_len.min(VIRTIO_BLK_ID_BYTES as usize));
            Outcome {
                data: id,
                status: VIRTIO_BLK_S_OK as u8,
            }
        }
        kind @ (VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES) => {
            if !dev.writable {
                return status(VIRTIO_BLK_S_IOERR);
            }
            status(discard_or_zero(blk, dev, kind, &req.payload).await)
        }
        _ => status(VIRTIO_BLK_S_UNSUPP),
    }
}

/// One `virtio_blk_discard_write_zeroes` segment (only one is supported, as in QEMU).
async fn discard_or_zero(blk: &BlockBackend, dev: &Device, kind: u32, seg: &[u8]) -> u32 {
    if seg.len() > 16 {
        return VIRTIO_BLK_S_UNSUPP;
    }
    if seg.len() < 16 {
        return VIRTIO_BLK_S_IOERR;
    }
    let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
    let sectors = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
    let max = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
        MAX_WRITE_ZEROES_SECTORS
    } else {
        MAX_DISCARD_SECTORS
    };
    if sectors > max {
        return VIRTIO_BLK_S_IOERR;
    }
    let bytes = u64::from(sectors) << SECTOR_BITS;
    if !range_ok(blk, dev, sector, bytes) {
        return VIRTIO_BLK_S_IOERR;
    }
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return VIRTIO_BLK_S_UNSUPP;
    }
    let offset = sector << SECTOR_BITS;
    let r = if kind == VIRTIO_BLK_T_WRITE_ZEROES {
        let mut f = ReqFlags::empty();
        if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            f |= ReqFlags::MAY_UNMAP;
        }
        blk.write_zeroes(offset, bytes, f).await
    } else {
        if flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return VIRTIO_BLK_S_UNSUPP;
        }
        blk.discard(offset, bytes).await
    };
    if r.is_ok() {
        VIRTIO_BLK_S_OK
    } else {
        VIRTIO_BLK_S_IOERR
    }
}
