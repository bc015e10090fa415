//! iSCSI protocol data units (RFC 7143, section 11): the 48-byte basic header segment, the
//! data segment padded to four bytes, and the CRC32C header digest.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The basic header segment's length.
pub(crate) const BHS: usize = 48;

/// Initiator opcodes.
pub(crate) const NOP_OUT: u8 = 0x00;
pub(crate) const SCSI_COMMAND: u8 = 0x01;
pub(crate) const LOGIN_REQUEST: u8 = 0x03;
pub(crate) const DATA_OUT: u8 = 0x05;
pub(crate) const LOGOUT_REQUEST: u8 = 0x06;

/// Target opcodes.
pub(crate) const NOP_IN: u8 = 0x20;
pub(crate) const SCSI_RESPONSE: u8 = 0x21;
pub(crate) const LOGIN_RESPONSE: u8 = 0x23;
pub(crate) const DATA_IN: u8 = 0x25;
pub(crate) const LOGOUT_RESPONSE: u8 = 0x26;
pub(crate) const R2T: u8 = 0x31;
pub(crate) const ASYNC_MESSAGE: u8 = 0x32;
pub(crate) const REJECT: u8 = 0x3f;

/// The immediate-delivery bit of byte 0.
pub(crate) const IMMEDIATE: u8 = 0x40;
/// The final bit of byte 1.
pub(crate) const FINAL: u8 = 0x80;
/// A tag that names no task.
pub(crate) const NO_TAG: u32 = 0xffff_ffff;

/// The largest data segment ferrite accepts from a target (what it declares as its
/// `MaxRecvDataSegmentLength`).
pub(crate) const MAX_RECV: usize = 256 << 10;

/// A basic header segment being built.
#[derive(Clone)]
pub(crate) struct Header(pub(crate) [u8; BHS]);

impl Header {
    /// A header of `opcode` (with [`IMMEDIATE`] or'ed in when wanted) and byte 1.
    pub(crate) fn new(opcode: u8, flags: u8) -> Header {
        let mut h = [0u8; BHS];
        h[0] = opcode;
        h[1] = flags;
        Header(h)
    }

    pub(crate) fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// The data segment's length (bytes 5-7).
    pub(crate) fn set_data_len(&mut self, len: usize) -> &mut Self {
        let len = len as u32;
        self.0[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        self
    }

    /// The header as sent: with its digest when the connection uses one.
    pub(crate) fn wire(&self, digest: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(BHS + 4);
        out.extend_from_slice(&self.0);
        if digest {
            out.extend_from_slice(&crc32c(&self.0).to_le_bytes());
        }
        out
    }
}

/// A received PDU: its header and data segment (padding dropped).
pub(crate) struct Pdu {
    pub(crate) bhs: [u8; BHS],
    pub(crate) data: Vec<u8>,
}

impl Pdu {
    pub(crate) fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    pub(crate) fn u32_at(&self, at: usize) -> u32 {
        be32(&self.bhs[at..])
    }
}

/// The big-endian `u32` at the start of `b` (zero-padded when short).
pub(crate) fn be32(b: &[u8]) -> u32 {
    let mut v = [0u8; 4];
    let n = b.len().min(4);
    v[..n].copy_from_slice(&b[..n]);
    u32::from_be_bytes(v)
}

/// The big-endian `u64` at the start of `b` (zero-padded when short).
pub(crate) fn be64(b: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = b.len().min(8);
    v[..n].copy_from_slice(&b[..n]);
    u64::from_be_bytes(v)
}

/// The data segment length a header announces.
pub(crate) fn data_len(bhs: &[u8; BHS]) -> usize {
    (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7])
}

/// Padding that brings `len` to a multiple of four.
pub(crate) fn padding(len: usize) -> usize {
    (4 - len % 4) % 4
}

fn protocol_error(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reads one PDU's header (checking its digest) and the length of its data segment; the
/// caller reads the data (a read's data goes straight into its buffer).
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
    digest: bool,
) -> io::Result<[u8; BHS]> {
    let mut bhs = [0u8; BHS];
    r.read_exact(&mut bhs).await?;
    let ahs = usize::from(bhs[4]) * 4;
    let mut skipped = vec![0u8; ahs];
    r.read_exact(&mut skipped).await?;
    if digest {
        let mut d = [0u8; 4];
        r.read_exact(&mut d).await?;
        let mut whole = bhs.to_vec();
        whole.extend_from_slice(&skipped);
        if crc32c(&whole) != u32::from_le_bytes(d) {
            return Err(protocol_error("header digest error"));
        }
    }
    if data_len(&bhs) > MAX_RECV {
        return Err(protocol_error("data segment larger than announced"));
    }
    Ok(bhs)
}

/// Reads a whole PDU.
pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(r: &mut R, digest: bool) -> io::Result<Pdu> {
    let bhs = read_header(r, digest).await?;
    let len = data_len(&bhs);
    let mut data = vec![0u8; len + padding(len)];
    r.read_exact(&mut data).await?;
    data.truncate(len);
    Ok(Pdu { bhs, data })
}

/// CRC32C (Castagnoli), as iSCSI's digests use it.
pub(crate) fn crc32c(data: &[u8]) -> u32 {
    const fn table() -> [u32; 256] {
        let mut t = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    }
    static TABLE: [u32; 256] = table();
    let mut crc = !0u32;
    for &b in data {
        crc = TABLE[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers: `a` comes before `b`.
pub(crate) fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < 0x8000_0000
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_matches_the_standard_check_value() {
        // RFC 3720, B.4: 32 bytes of zeroes.
        assert_eq!(super::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn sequence_numbers_wrap() {
        assert!(super::sn_lt(1, 2));
        assert!(super::sn_lt(0xffff_fffe, 3));
        assert!(!super::sn_lt(3, 0xffff_fffe));
        assert!(!super::sn_lt(5, 5));
    }
}
