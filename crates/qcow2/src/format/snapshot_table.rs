//! The snapshot table (docs/interop/qcow2.txt "Snapshots"): one entry per internal
//! snapshot, each a fixed part, extra data, an ID and a name, padded to 8 bytes. Read here
//! once, with QEMU's limits, for opening, the snapshot operations and repair alike.

use super::header::{Header, MAX_L1_BYTES, MAX_SNAPSHOTS};
use super::{get_be64, read_at};
use ferrite_block::Child;
use std::io;

/// Most bytes a snapshot table may take (QEMU: `QCOW_MAX_SNAPSHOTS_SIZE`).
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One entry of the snapshot table.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub(crate) l1_offset: u64,
    pub(crate) l1_size: u32,
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) date_sec: u32,
    pub(crate) date_nsec: u32,
    pub(crate) vm_clock_nsec: u64,
    pub(crate) vm_state_size: u64,
    /// Extra data as stored (vm state size, disk size, icount, and what ferrite does not
    /// know), kept as is.
    pub(crate) extra: Vec<u8>,
}

impl Snapshot {
    /// The image's virtual size when the snapshot was taken, where its extra data records
    /// it (images of old QEMU versions do not: their snapshots have the image's size).
    pub(crate) fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| get_be64(&self.extra, 1))
    }
}

pub(crate) fn invalid() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "invalid snapshot table")
}

/// Why the snapshot table was refused, in QEMU's words.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TableError {
    #[error("Too much extra metadata in snapshot table entry {0}")]
    TooMuchExtra(u32),
    #[error("Snapshot table is too big")]
    TooBig,
    #[error("Failed to read snapshot table: {}", ferrite_qapi::os_msg(.0))]
    Read(io::Error),
}

impl From<TableError> for io::Error {
    fn from(e: TableError) -> io::Error {
        match e {
            TableError::Read(e) => e,
            _ => invalid(),
        }
    }
}

/// Most extra data a snapshot entry may have (QEMU: `QCOW_MAX_SNAPSHOT_EXTRA_DATA`).
const MAX_EXTRA: usize = 1024;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The snapshot table the header points to, and the bytes it occupies; refused (as QEMU
/// refuses it) past its limits. Open reads it with [`read_checked`] for QEMU's texts.
pub(crate) async fn read(file: &Child, h: &Header) -> io::Result<(Vec<Snapshot>, u64)> {
    Ok(read_checked(file, h).await?)
}

/// As [`read`], with QEMU's reasons for refusing the table.
pub(crate) async fn read_checked(
    file: &Child,
    h: &Header,
) -> Result<(Vec<Snapshot>, u64), TableError> {
    if h.nb_snapshots > MAX_SNAPSHOTS {
        return Err(TableError::TooBig);
    }
    let mut out = Vec::new();
    let mut at = h.snapshots_offset;
    let mut table_len = 0u64;
    for i in 0..h.nb_snapshots {
        table_len = table_len.next_multiple_of(8);
        let fixed = read_at(file, at, 40).await.map_err(TableError::Read)?;
        let id_len = usize::from(be16(&fixed, 12));
        let name_len = usize::from(be16(&fixed, 14));
        let extra_len = be32(&fixed, 36) as usize;
        if extra_len > MAX_EXTRA {
            return Err(TableError::TooMuchExtra(i));
        }
        let rest = read_at(file, at + 40, extra_len + id_len + name_len)
            .await
            .map_err(TableError::Read)?;
        let extra = rest[..extra_len].to_vec();
        let vm_state_size = if extra_len >= 8 {
            get_be64(&extra, 0)
        } else {
            u64::from(be32(&fixed, 32))
        };
        out.push(Snapshot {
            l1_offset: get_be64(&fixed, 0),
            l1_size: be32(&fixed, 8),
            id: String::from_utf8_lossy(&rest[extra_len..extra_len + id_len]).into_owned(),
            name: String::from_utf8_lossy(&rest[extra_len + id_len..]).into_owned(),
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: get_be64(&fixed, 3),
            vm_state_size,
            extra,
        });
        let entry = (40 + extra_len + id_len + name_len) as u64;
        table_len += entry;
        if table_len > MAX_TABLE_BYTES || table_len > i32::MAX as u64 {
            return Err(TableError::TooBig);
        }
        at += entry.next_multiple_of(8);
    }
    Ok((out, at - h.snapshots_offset))
}

/// The table as it is stored.
pub(crate) fn serialize(list: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in list {
        let start = b.len();
        b.extend_from_slice(&s.l1_offset.to_be_bytes());
        b.extend_from_slice(&s.l1_size.to_be_bytes());
        b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&s.date_sec.to_be_bytes());
        b.extend_from_slice(&s.date_nsec.to_be_bytes());
        b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&(s.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        b.extend_from_slice(&(s.extra.len() as u32).to_be_bytes());
        b.extend_from_slice(&s.extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(start + (b.len() - start).next_multiple_of(8), 0);
    }
    b
}

/// A snapshot's L1 table, refused past QEMU's size limit.
///
/// # Errors
/// A table bigger than an L1 table may be, or the file failing.
pub(crate) async fn read_l1(file: &Child, s: &Snapshot) -> io::Result<Vec<u64>> {
    if u64::from(s.l1_size) * 8 > MAX_L1_BYTES {
        return Err(invalid());
    }
    let raw = read_at(file, s.l1_offset, s.l1_size as usize * 8).await?;
    Ok((0..s.l1_size as usize).map(|i| get_be64(&raw, i)).collect())
}
