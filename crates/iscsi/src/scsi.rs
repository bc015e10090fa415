//! The SCSI commands the node sends (SPC and SBC: their CDBs) and what the answers mean:
//! inquiry pages, capacity, mode parameters, block status, sense data as QEMU turns it into
//! an errno and as libiscsi words it.

use crate::pdu::{be32, be64};

/// Peripheral device types QEMU tells apart.
pub(crate) const TYPE_DISK: u8 = 0x00;
pub(crate) const TYPE_ROM: u8 = 0x05;

/// SCSI statuses.
pub(crate) const GOOD: u8 = 0x00;
pub(crate) const CHECK_CONDITION: u8 = 0x02;
pub(crate) const BUSY: u8 = 0x08;
pub(crate) const TASK_SET_FULL: u8 = 0x28;

/// Sense keys.
pub(crate) const NO_SENSE: u8 = 0x0;
pub(crate) const RECOVERED_ERROR: u8 = 0x1;
pub(crate) const NOT_READY: u8 = 0x2;
pub(crate) const ILLEGAL_REQUEST: u8 = 0x5;
pub(crate) const UNIT_ATTENTION: u8 = 0x6;
pub(crate) const DATA_PROTECT: u8 = 0x7;
pub(crate) const ABORTED_COMMAND: u8 = 0xb;

/// VPD pages.
pub(crate) const VPD_SUPPORTED: u8 = 0x00;
pub(crate) const VPD_BLOCK_LIMITS: u8 = 0xb0;
pub(crate) const VPD_PROVISIONING: u8 = 0xb2;

pub(crate) fn test_unit_ready() -> Vec<u8> {
    vec![0; 6]
}

pub(crate) fn inquiry(evpd: bool, page: u8, alloc: u16) -> Vec<u8> {
    let a = alloc.to_be_bytes();
    vec![0x12, u8::from(evpd), page, a[0], a[1], 0]
}

pub(crate) fn mode_sense6() -> Vec<u8> {
    // DBD set, current values, all pages, 255 bytes (QEMU's request).
    vec![0x1a, 0x08, 0x3f, 0, 255, 0]
}

pub(crate) fn read_capacity10() -> Vec<u8> {
    vec![0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

pub(crate) fn read_capacity16() -> Vec<u8> {
    let mut c = vec![0x9e, 0x10];
    c.resize(16, 0);
    c[13] = 32;
    c
}

/// READ or WRITE of `blocks` at `lba`: the 16-byte form when asked, else the 10-byte one.
pub(crate) fn rw(write: bool, sixteen: bool, lba: u64, blocks: u32, fua: bool) -> Vec<u8> {
    let flags = if fua { 0x08 } else { 0 };
    if sixteen {
        let mut c = vec![if write { 0x8a } else { 0x88 }, flags];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&blocks.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    } else {
        let mut c = vec![if write { 0x2a } else { 0x28 }, flags];
        c.extend_from_slice(&(lba as u32).to_be_bytes());
        c.push(0);
        c.extend_from_slice(&(blocks as u16).to_be_bytes());
        c.push(0);
        c
    }
}

pub(crate) fn synchronize_cache10() -> Vec<u8> {
    vec![0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// UNMAP of one range: the CDB and its parameter list.
pub(crate) fn unmap(lba: u64, blocks: u32) -> (Vec<u8>, Vec<u8>) {
    let mut list = Vec::with_capacity(24);
    list.extend_from_slice(&22u16.to_be_bytes());
    list.extend_from_slice(&16u16.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    list.extend_from_slice(&lba.to_be_bytes());
    list.extend_from_slice(&blocks.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    let len = (list.len() as u16).to_be_bytes();
    (vec![0x42, 0, 0, 0, 0, 0, 0, len[0], len[1], 0], list)
}

/// WRITE SAME (10 or 16) of `blocks` at `lba`, unmapping when asked.
pub(crate) fn write_same(sixteen: bool, lba: u64, blocks: u32, unmap: bool) -> Vec<u8> {
    let flags = if unmap { 0x08 } else { 0 };
    if sixteen {
        let mut c = vec![0x93, flags];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&blocks.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    } else {
        let mut c = vec![0x41, flags];
        c.extend_from_slice(&(lba as u32).to_be_bytes());
        c.push(0);
        c.extend_from_slice(&(blocks as u16).to_be_bytes());
        c.push(0);
        c
    }
}

/// GET LBA STATUS from `lba`, room for one descriptor (QEMU's request).
pub(crate) fn get_lba_status(lba: u64) -> Vec<u8> {
    let mut c = vec![0x9e, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&24u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

/// The standard inquiry's peripheral device type.
pub(crate) fn device_type(inquiry: &[u8]) -> Option<u8> {
    inquiry.first().map(|b| b & 0x1f)
}

/// What READ CAPACITY says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Capacity {
    pub(crate) block_size: u32,
    pub(crate) num_blocks: u64,
    pub(crate) lbpme: bool,
    pub(crate) lbprz: bool,
    pub(crate) use_16: bool,
}

pub(crate) fn capacity16(d: &[u8]) -> Option<Capacity> {
    if d.len() < 32 {
        return None;
    }
    let last = be64(d);
    Some(Capacity {
        block_size: be32(&d[8..]),
        num_blocks: last.wrapping_add(1),
        lbpme: d[14] & 0x80 != 0,
        lbprz: d[14] & 0x40 != 0,
        use_16: last > 0xffff_ffff,
    })
}

pub(crate) fn capacity10(d: &[u8]) -> Option<Capacity> {
    if d.len() < 8 {
        return None;
    }
    let last = be32(d);
    Some(Capacity {
        block_size: be32(&d[4..]),
        // An LBA of 0: a blank disk is loaded (QEMU's reading).
        num_blocks: if last == 0 { 0 } else { u64::from(last) + 1 },
        ..Capacity::default()
    })
}

/// The pages a VPD page 0 lists.
pub(crate) fn supported_pages(d: &[u8]) -> Vec<u8> {
    let n = usize::from(d.get(3).copied().unwrap_or(0));
    d.get(4..)
        .unwrap_or_default()
        .iter()
        .take(n)
        .copied()
        .collect()
}

/// The block limits VPD page (SBC's 0xb0), the fields QEMU uses.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct BlockLimits {
    pub(crate) max_xfer_len: u32,
    pub(crate) max_unmap: u32,
    pub(crate) opt_unmap_gran: u32,
    pub(crate) max_ws_len: u64,
}

pub(crate) fn block_limits(d: &[u8]) -> BlockLimits {
    let at = |i: usize| d.get(i..).map(be32).unwrap_or(0);
    BlockLimits {
        max_xfer_len: at(8),
        max_unmap: at(20),
        opt_unmap_gran: at(28),
        max_ws_len: d.get(36..).map(be64).unwrap_or(0),
    }
}

/// The logical block provisioning VPD page (SBC's 0xb2).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Provisioning {
    pub(crate) lbpu: bool,
    pub(crate) lbpws: bool,
    pub(crate) lbpws10: bool,
}

pub(crate) fn provisioning(d: &[u8]) -> Provisioning {
    let b = d.get(5).copied().unwrap_or(0);
    Provisioning {
        lbpu: b & 0x80 != 0,
        lbpws: b & 0x40 != 0,
        lbpws10: b & 0x20 != 0,
    }
}

/// MODE SENSE(6)'s device-specific parameter: (write protected, DPO and FUA supported).
pub(crate) fn mode_flags(d: &[u8]) -> Option<(bool, bool)> {
    let p = *d.get(2)?;
    Some((p & 0x80 != 0, p & 0x10 != 0))
}

/// One GET LBA STATUS descriptor: (first block, blocks, deallocated or anchored).
pub(crate) fn lba_status(d: &[u8]) -> Option<(u64, u32, bool)> {
    let desc = d.get(8..24)?;
    let provisioning = desc[12] & 0x0f;
    Some((be64(desc), be32(&desc[8..]), matches!(provisioning, 1 | 2)))
}

/// Sense data's key, ASC and ASCQ (fixed or descriptor format).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sense {
    pub(crate) key: u8,
    pub(crate) asc: u8,
    pub(crate) ascq: u8,
}

impl Sense {
    pub(crate) fn parse(s: &[u8]) -> Sense {
        match s.first().map(|b| b & 0x7f) {
            Some(0x72 | 0x73) => Sense {
                key: s.get(1).copied().unwrap_or(0) & 0x0f,
                asc: s.get(2).copied().unwrap_or(0),
                ascq: s.get(3).copied().unwrap_or(0),
            },
            Some(_) => Sense {
                key: s.get(2).copied().unwrap_or(0) & 0x0f,
                asc: s.get(12).copied().unwrap_or(0),
                ascq: s.get(13).copied().unwrap_or(0),
            },
            None => Sense::default(),
        }
    }

    fn code(self) -> u16 {
        u16::from(self.asc) << 8 | u16::from(self.ascq)
    }

    /// The errno a failed command's sense means (QEMU's `scsi_sense_to_errno`).
    pub(crate) fn errno(self) -> i32 {
        match self.key {
            NO_SENSE | RECOVERED_ERROR | UNIT_ATTENTION => return libc::EAGAIN,
            ABORTED_COMMAND => return libc::ECANCELED,
            NOT_READY | ILLEGAL_REQUEST | DATA_PROTECT => {}
            _ => return libc::EIO,
        }
        match self.code() {
            0x1a00 | 0x2000 | 0x2400 | 0x2600 => libc::EINVAL,
            0x2100 | 0x2707 => libc::ENOSPC,
            0x2500 => libc::ENOTSUP,
            0x3a00..=0x3a02 => libc::ENOMEDIUM,
            0x2700 => libc::EACCES,
            0x0401 => libc::EINPROGRESS,
            0x0402 => libc::ENOTCONN,
            _ => libc::EIO,
        }
    }

    /// libiscsi's words for it: `SENSE KEY:ILLEGAL_REQUEST(5) ASCQ:LBA_OUT_OF_RANGE(0x2100)`.
    pub(crate) fn describe(self) -> String {
        let key = match self.key {
            0x0 => "NO_SENSE",
            0x1 => "RECOVERED_ERROR",
            0x2 => "NOT_READY",
            0x3 => "MEDIUM_ERROR",
            0x4 => "HARDWARE_ERROR",
            0x5 => "ILLEGAL_REQUEST",
            0x6 => "UNIT_ATTENTION",
            0x7 => "DATA_PROTECTION",
            0x8 => "BLANK_CHECK",
            0x9 => "VENDOR_SPECIFIC",
            0xa => "COPY_ABORTED",
            0xb => "COMMAND_ABORTED",
            0xd => "OVERFLOW_COMMAND",
            0xe => "MISCOMPARE",
            _ => "(null)",
        };
        let ascq = match self.code() {
            0x041b => "SANITIZE_IN_PROGRESS",
            0x1100 => "UNRECOVERED_READ_ERROR",
            0x1a00 => "PARAMETER_LIST_LENGTH_ERROR",
            0x1d00 => "MISCOMPARE_DURING_VERIFY",
            0x2000 => "INVALID_OPERATION_CODE",
            0x2100 => "LBA_OUT_OF_RANGE",
            0x2400 => "INVALID_FIELD_IN_CDB",
            0x2500 => "LOGICAL_UNIT_NOT_SUPPORTED",
            0x2600 => "INVALID_FIELD_IN_PARAMETER_LIST",
            0x2700 => "WRITE_PROTECTED",
            0x2701 => "HARDWARE_WRITE_PROTECTED",
            0x2702 => "SOFTWARE_WRITE_PROTECTED",
            0x2900 => "BUS_RESET",
            0x2901 => "POWER_ON_OCCURED",
            0x2902 => "SCSI_BUS_RESET_OCCURED",
            0x2903 => "BUS_DEVICE_RESET_FUNCTION_OCCURED",
            0x2904 => "DEVICE_INTERNAL_RESET",
            0x2907 => "NEXUS_LOSS",
            0x2a01 => "MODE_PARAMETERS_CHANGED",
            0x2a09 => "CAPACITY_DATA_HAS_CHANGED",
            0x3a00 => "MEDIUM_NOT_PRESENT",
            0x3a01 => "MEDIUM_NOT_PRESENT-TRAY_CLOSED",
            0x3a02 => "MEDIUM_NOT_PRESENT-TRAY_OPEN",
            0x3f03 => "INQUIRY_DATA_HAS_CHANGED",
            0x3f0e => "REPORTED_LUNS_DATA_HAS_CHANGED",
            _ => "(null)",
        };
        format!(
            "SENSE KEY:{key}({}) ASCQ:{ascq}(0x{:04x})",
            self.key,
            self.code()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sense_reads_both_formats_and_maps_as_qemu() {
        let mut fixed = [0u8; 18];
        fixed[0] = 0x70;
        fixed[2] = ILLEGAL_REQUEST;
        fixed[12] = 0x21;
        let s = Sense::parse(&fixed);
        assert_eq!(s.errno(), libc::ENOSPC);
        assert_eq!(
            s.describe(),
            "SENSE KEY:ILLEGAL_REQUEST(5) ASCQ:LBA_OUT_OF_RANGE(0x2100)"
        );
        let desc = Sense::parse(&[0x72, UNIT_ATTENTION, 0x29, 0x01]);
        assert_eq!(desc.errno(), libc::EAGAIN);
        assert_eq!(Sense::parse(&[0x70, 0, 0x03]).errno(), libc::EIO);
        assert_eq!(
            Sense::parse(&[0x72, DATA_PROTECT, 0x27, 0]).errno(),
            libc::EACCES
        );
    }

    #[test]
    fn cdbs_are_laid_out_as_sbc_says() {
        assert_eq!(
            rw(false, false, 0x0102_0304, 8, false),
            [0x28, 0, 1, 2, 3, 4, 0, 0, 8, 0]
        );
        let w16 = rw(true, true, 1 << 40, 0x10000, true);
        assert_eq!((w16[0], w16[1], w16.len()), (0x8a, 0x08, 16));
        assert_eq!(be64(&w16[2..]), 1 << 40);
        assert_eq!(be32(&w16[10..]), 0x10000);
        let (cdb, list) = unmap(7, 9);
        assert_eq!((cdb[0], cdb[8], list.len()), (0x42, 24, 24));
        assert_eq!((be64(&list[8..]), be32(&list[16..])), (7, 9));
        assert_eq!(write_same(false, 1, 2, true)[..2], [0x41, 0x08]);
        assert_eq!(get_lba_status(5)[..2], [0x9e, 0x12]);
    }

    #[test]
    fn answers_parse_with_short_data_refused() {
        let mut rc16 = [0u8; 32];
        rc16[7] = 0xff;
        rc16[10] = 2; // 512
        rc16[14] = 0xc0;
        let c = capacity16(&rc16).unwrap();
        assert_eq!(
            (c.block_size, c.num_blocks, c.lbpme, c.lbprz),
            (512, 256, true, true)
        );
        assert!(capacity16(&rc16[..20]).is_none());
        assert_eq!(capacity10(&[0, 0, 0, 0, 0, 0, 2, 0]).unwrap().num_blocks, 0);
        assert_eq!(
            supported_pages(&[0, 0, 0, 2, 0xb0, 0xb2, 0xff]),
            [0xb0, 0xb2]
        );
        let mut st = [0u8; 24];
        st[19] = 0x10;
        st[20] = 1;
        assert_eq!(lba_status(&st), Some((0, 0x10, true)));
        assert_eq!(lba_status(&st[..10]), None);
    }
}
