//! The qcow2 header (cluster 0): the fixed fields, the header extensions and the backing file
//! name; parsing with QEMU's checks and texts, and writing it back whole.

use crate::error::HeaderError;

pub(crate) const MAGIC: u32 = 0x5146_49fb;
const V2_HEADER_LEN: u32 = 72;
const V3_HEADER_LEN: u32 = 104;
/// What `qemu-img create` writes for v3 (with the compression type byte and padding).
pub(crate) const V3_HEADER_LEN_CURRENT: u32 = 112;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_BITMAPS: u32 = 0x2385_2875;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
pub(crate) mod incompat {
    pub(crate) const DIRTY: u64 = 1 << 0;
    pub(crate) const CORRUPT: u64 = 1 << 1;
    pub(crate) const DATA_FILE: u64 = 1 << 2;
    pub(crate) const COMPRESSION: u64 = 1 << 3;
    pub(crate) const EXTENDED_L2: u64 = 1 << 4;
    pub(crate) const KNOWN: u64 = 0x1f;
}
/// Compatible feature bits.
pub(crate) mod compat {
    pub(crate) const LAZY_REFCOUNTS: u64 = 1 << 0;
}
/// Autoclear feature bits.
pub(crate) mod autoclear {
    pub(crate) const BITMAPS: u64 = 1 << 0;
    pub(crate) const DATA_FILE_RAW: u64 = 1 << 1;
    pub(crate) const KNOWN: u64 = BITMAPS | DATA_FILE_RAW;
}

/// The features QEMU names in the feature name table, in its order.
const FEATURE_NAMES: [(u8, u8, &str); 8] = [
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// One header extension, kept as read so unknown ones survive a rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Extension {
    pub(crate) kind: u32,
    pub(crate) data: Vec<u8>,
}

/// The header of an open image.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) cluster_bits: u32,
    pub(crate) size: u64,
    pub(crate) crypt_method: u32,
    pub(crate) l1_size: u32,
    pub(crate) l1_table_offset: u64,
    pub(crate) refcount_table_offset: u64,
    pub(crate) refcount_table_clusters: u32,
    pub(crate) nb_snapshots: u32,
    pub(crate) snapshots_offset: u64,
    pub(crate) incompatible: u64,
    pub(crate) compatible: u64,
    pub(crate) autoclear: u64,
    pub(crate) refcount_order: u32,
    pub(crate) header_length: u32,
    pub(crate) compression_type: u8,
    /// Header bytes past the fields we know (from a newer writer), kept verbatim.
    pub(crate) unknown_tail: Vec<u8>,
    /// The extensions in file order, known and unknown, without the end marker.
    pub(crate) extensions: Vec<Extension>,
    pub(crate) backing_file: Option<String>,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

/// QEMU's upper limits on table sizes.
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;

impl Header {
    /// Bytes needed to parse the fixed part (before the cluster size is known).
    pub(crate) const PROBE_LEN: usize = 512;

    /// The cluster size.
    pub(crate) fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Whether L2 entries are 128 bits with subcluster bitmaps.
    pub(crate) fn extended_l2(&self) -> bool {
        self.incompatible & incompat::EXTENDED_L2 != 0
    }

    /// Cluster size from the first bytes of a file, to know how much of cluster 0 to read.
    pub(crate) fn probe_cluster_bits(b: &[u8]) -> Result<u32, HeaderError> {
        if b.len() < V2_HEADER_LEN as usize || be32(b, 0) != MAGIC {
            return Err(HeaderError::NotQcow2);
        }
        let version = be32(b, 4);
        if !(2..=3).contains(&version) {
            return Err(HeaderError::Version(version));
        }
        let bits = be32(b, 20);
        if !(9..=21).contains(&bits) {
            return Err(HeaderError::ClusterBits(bits));
        }
        Ok(bits)
    }

    /// Parses cluster 0 (zeroes past the end of the file) whole: [`Header::parse_fixed`],
    /// then [`Header::parse_tail`].
    #[cfg(test)]
    pub(crate) fn parse(b: &[u8], writable: bool) -> Result<Header, HeaderError> {
        let mut h = Header::parse_fixed(b, writable)?;
        h.parse_tail(b)?;
        Ok(h)
    }

    /// The fixed fields of cluster 0 `b`, with QEMU's checks in QEMU's order up to the
    /// tables' sizes; `writable`: whether the image is opened read-write (a corrupt image
    /// is refused then). Extensions and the backing file name come after the options are
    /// checked ([`Header::parse_tail`]). Tables past the end of the file are no error here,
    /// as in QEMU (they read as zeroes); writing to them in place is refused.
    pub(crate) fn parse_fixed(b: &[u8], writable: bool) -> Result<Header, HeaderError> {
        let cluster_bits = Header::probe_cluster_bits(b)?;
        let cs = 1u64 << cluster_bits;
        let version = be32(b, 4);
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(b, 24),
            crypt_method: be32(b, 32),
            l1_size: be32(b, 36),
            l1_table_offset: be64(b, 40),
            refcount_table_offset: be64(b, 48),
            refcount_table_clusters: be32(b, 56),
            nb_snapshots: be32(b, 60),
            snapshots_offset: be64(b, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            unknown_tail: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if version == 3 {
            h.incompatible = be64(b, 72);
            h.compatible = be64(b, 80);
            h.autoclear = be64(b, 88);
            h.refcount_order = be32(b, 96);
            h.header_length = be32(b, 100);
            if h.header_length < V3_HEADER_LEN {
                return Err(HeaderError::TooShort);
            }
        }
        if u64::from(h.header_length) > cs || h.header_length as usize > b.len() {
            return Err(HeaderError::TooLong);
        }
        if h.header_length > V3_HEADER_LEN {
            h.compression_type = b[104];
        }
        if h.header_length > V3_HEADER_LEN_CURRENT {
            h.unknown_tail = b[V3_HEADER_LEN_CURRENT as usize..h.header_length as usize].to_vec();
        }
        if be64(b, 8) > cs {
            return Err(HeaderError::BackingOffset);
        }
        match h.compression_type {
            0 if h.incompatible & incompat::COMPRESSION != 0 => {
                return Err(HeaderError::CompressionBitSet);
            }
            1 if h.incompatible & incompat::COMPRESSION == 0 => {
                return Err(HeaderError::CompressionBitUnset);
            }
            0 | 1 => {}
            t => return Err(HeaderError::CompressionType(t)),
        }
        let unknown = h.incompatible & !incompat::KNOWN;
        if unknown != 0 {
            // Named from the image's own feature table where it has one (QEMU reads the
            // extensions for it, ignoring their errors).
            let (start, end) = (u64::from(h.header_length), h.extensions_end(b));
            let table = extensions(b, start, end)
                .into_iter()
                .filter_map(Result::ok)
                .find(|e| e.kind == EXT_FEATURE_TABLE);
            return Err(HeaderError::UnknownFeatures(unsupported_features(
                unknown,
                table.as_ref().map_or(&[], |t| t.data.as_slice()),
            )));
        }
        if h.incompatible & incompat::CORRUPT != 0 && writable {
            return Err(HeaderError::Corrupt);
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(HeaderError::SubclusterSize(cs / 32));
        }
        if h.refcount_order > 6 {
            return Err(HeaderError::RefcountWidth);
        }
        if h.refcount_table_clusters == 0 {
            return Err(HeaderError::NoReftable);
        }
        let reftable = Table {
            offset: h.refcount_table_offset,
            entries: u64::from(h.refcount_table_clusters),
            entry_len: cs,
            max_bytes: MAX_REFTABLE_BYTES,
        };
        reftable.check(
            cs,
            HeaderError::ReftableTooLarge,
            HeaderError::ReftableOffset,
        )?;
        let snapshots = Table {
            offset: h.snapshots_offset,
            entries: u64::from(h.nb_snapshots),
            entry_len: SNAPSHOT_HEADER_LEN,
            max_bytes: SNAPSHOT_HEADER_LEN * u64::from(MAX_SNAPSHOTS),
        };
        snapshots.check(
            cs,
            HeaderError::SnapshotTableTooLarge,
            HeaderError::SnapshotTableOffset,
        )?;
        let l1 = Table {
            offset: h.l1_table_offset,
            entries: u64::from(h.l1_size),
            entry_len: 8,
            max_bytes: MAX_L1_BYTES,
        };
        l1.check(cs, HeaderError::L1TooLarge, HeaderError::L1Offset)?;
        let needed = h.l1_needed(h.size);
        if needed > i32::MAX as u64 {
            return Err(HeaderError::TooBig);
        }
        if u64::from(h.l1_size) < needed {
            return Err(HeaderError::L1TooSmall);
        }
        Ok(h)
    }

    /// Where the extensions end: at the backing file name, or the end of cluster 0.
    fn extensions_end(&self, b: &[u8]) -> u64 {
        match be64(b, 8) {
            0 => self.cluster_size(),
            off => off,
        }
    }

    /// The header extensions and the backing file name, after [`Header::parse_fixed`].
    pub(crate) fn parse_tail(&mut self, b: &[u8]) -> Result<(), HeaderError> {
        let (start, end) = (u64::from(self.header_length), self.extensions_end(b));
        for e in extensions(b, start, end) {
            // Each extension is checked as it is met, as QEMU reads them.
            let e = e?;
            match e.kind {
                EXT_BACKING_FORMAT if e.data.len() >= MAX_BACKING_FORMAT => {
                    return Err(HeaderError::BackingFormatTooLong(e.data.len()));
                }
                EXT_CRYPTO if self.crypt_method != 2 => return Err(HeaderError::CryptoUnexpected),
                EXT_BITMAPS => {
                    super::bitmap_dir::check_extension(&e.data, self)?;
                }
                _ => {}
            }
            // A later extension of a kind replaces an earlier one, as QEMU reads them.
            self.extensions.retain(|x| x.kind != e.kind);
            self.extensions.push(e);
        }
        let backing_offset = be64(b, 8);
        let backing_size = u64::from(be32(b, 16));
        if backing_offset != 0 {
            if backing_size > 1023.min(self.cluster_size() - backing_offset) {
                return Err(HeaderError::BackingNameTooLong);
            }
            let raw = b
                .get(backing_offset as usize..(backing_offset + backing_size) as usize)
                .unwrap_or_default();
            // A C string: a NUL ends it, and an empty name is no backing file.
            let name = raw.split(|&c| c == 0).next().unwrap_or_default();
            if !name.is_empty() {
                self.backing_file = Some(String::from_utf8_lossy(name).into_owned());
            }
        }
        Ok(())
    }

    /// L1 entries needed for `size` bytes.
    pub(crate) fn l1_needed(&self, size: u64) -> u64 {
        // QEMU's size_to_l1, whose rounding wraps for sizes near 2^64 (the block layer then
        // refuses such a size as too large).
        let shift =
            self.cluster_bits + (self.cluster_size() / self.l2_entry_size()).trailing_zeros();
        size.wrapping_add((1u64 << shift) - 1) >> shift
    }

    /// Bytes per L2 entry.
    pub(crate) fn l2_entry_size(&self) -> u64 {
        if self.extended_l2() { 16 } else { 8 }
    }

    /// The extension of type `kind`.
    pub(crate) fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Sets (or with `None` removes) the extension of type `kind`, keeping QEMU's order for a
    /// new one.
    pub(crate) fn set_extension(&mut self, kind: u32, data: Option<Vec<u8>>) {
        match data {
            None => self.extensions.retain(|e| e.kind != kind),
            Some(d) => {
                if let Some(e) = self.extensions.iter_mut().find(|e| e.kind == kind) {
                    e.data = d;
                    return;
                }
                let rank = |k: u32| match k {
                    EXT_BACKING_FORMAT => 0,
                    EXT_DATA_FILE => 1,
                    EXT_CRYPTO => 2,
                    EXT_FEATURE_TABLE => 3,
                    EXT_BITMAPS => 4,
                    _ => 5,
                };
                let at = self
                    .extensions
                    .iter()
                    .position(|e| rank(e.kind) > rank(kind))
                    .unwrap_or(self.extensions.len());
                self.extensions.insert(at, Extension { kind, data: d });
            }
        }
    }

    /// The backing format named in the header.
    pub(crate) fn backing_format(&self) -> Option<String> {
        self.extension(EXT_BACKING_FORMAT)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The external data file named in the header.
    pub(crate) fn data_file_name(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE)
            .map(|d| String::from_utf8_lossy(d).into_owned())
    }

    /// The feature name table QEMU writes (every known feature).
    pub(crate) fn feature_table() -> Vec<u8> {
        let mut t = Vec::with_capacity(FEATURE_NAMES.len() * 48);
        for (kind, bit, name) in FEATURE_NAMES {
            let mut e = [0u8; 48];
            e[0] = kind;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            t.extend_from_slice(&e);
        }
        t
    }

    /// Cluster 0 as it should be on disk: header, extensions, end marker, backing file name.
    ///
    /// # Errors
    /// The whole does not fit in one cluster.
    pub(crate) fn serialize(&self) -> Result<Vec<u8>, HeaderError> {
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(&MAGIC.to_be_bytes());
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&[0; 12]); // backing offset and size, filled in below
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
            if self.header_length > V3_HEADER_LEN {
                let mut extra = [0u8; 8];
                extra[0] = self.compression_type;
                b.extend_from_slice(&extra);
                b.extend_from_slice(&self.unknown_tail);
            }
            b.resize(self.header_length as usize, 0);
        }
        for e in &self.extensions {
            push_extension(&mut b, e.kind, &e.data);
        }
        push_extension(&mut b, EXT_END, &[]);
        if let Some(name) = &self.backing_file {
            let at = b.len() as u64;
            b[8..16].copy_from_slice(&at.to_be_bytes());
            b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(HeaderError::DoesNotFit);
        }
        Ok(b)
    }
}

fn push_extension(b: &mut Vec<u8>, kind: u32, data: &[u8]) {
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b.resize(b.len().next_multiple_of(8), 0);
}

/// A table the header places: QEMU's `qcow2_validate_table`.
struct Table {
    offset: u64,
    entries: u64,
    entry_len: u64,
    max_bytes: u64,
}

impl Table {
    /// Not more entries than QEMU allows; aligned to a cluster, and ending before 2^63.
    fn check(
        &self,
        cs: u64,
        too_large: HeaderError,
        bad_offset: HeaderError,
    ) -> Result<(), HeaderError> {
        if self.entries > self.max_bytes / self.entry_len {
            return Err(too_large);
        }
        let bytes = self.entries * self.entry_len;
        if (i64::MAX as u64) - bytes < self.offset || self.offset % cs != 0 {
            return Err(bad_offset);
        }
        Ok(())
    }
}

/// The bytes of a snapshot table entry's fixed part (QEMU: `QCowSnapshotHeader`).
const SNAPSHOT_HEADER_LEN: u64 = 40;
/// A backing format name must be shorter than this (QEMU's `backing_format` buffer).
const MAX_BACKING_FORMAT: usize = 16;

/// The header extensions from `start` to `end` of cluster 0 `b` (zeroes past its end), as
/// QEMU walks them: each header must leave room for its data before `end`, else "Header
/// extension too large"; the end marker stops the walk.
fn extensions(b: &[u8], start: u64, end: u64) -> Vec<Result<Extension, HeaderError>> {
    let byte_at = |i: u64| b.get(i as usize).copied().unwrap_or(0);
    let word = |at: u64| {
        u32::from_be_bytes([
            byte_at(at),
            byte_at(at + 1),
            byte_at(at + 2),
            byte_at(at + 3),
        ])
    };
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let kind = word(at);
        let len = u64::from(word(at + 4));
        at += 8;
        if at > end || len > end - at {
            out.push(Err(HeaderError::ExtensionTooLarge));
            break;
        }
        if kind == EXT_END {
            break;
        }
        let data = (at..at + len).map(byte_at).collect();
        out.push(Ok(Extension { kind, data }));
        at += len.next_multiple_of(8);
    }
    out
}

/// QEMU's list of unsupported incompatible features: the names the image's feature table
/// gives, in its order, then what is left as one hexadecimal mask.
fn unsupported_features(mut mask: u64, table: &[u8]) -> String {
    // A last entry cut short reads as if padded with zeroes, as QEMU's copy is.
    let mut table = table.to_vec();
    table.resize(table.len().next_multiple_of(48), 0);
    let mut names: Vec<String> = Vec::new();
    for e in table.chunks_exact(48) {
        let name = &e[2..];
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        if name.is_empty() {
            break;
        }
        let bit = 1u64.checked_shl(u32::from(e[1])).unwrap_or(0);
        if e[0] == 0 && mask & bit != 0 {
            names.push(String::from_utf8_lossy(name).into_owned());
            mask &= !bit;
        }
    }
    if mask != 0 {
        names.push(format!("Unknown incompatible feature: {mask:x}"));
    }
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Header {
        Header {
            version: 3,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 0x30000,
            refcount_table_offset: 0x10000,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V3_HEADER_LEN_CURRENT,
            compression_type: 0,
            unknown_tail: Vec::new(),
            extensions: vec![Extension {
                kind: EXT_FEATURE_TABLE,
                data: Header::feature_table(),
            }],
            backing_file: Some("base.img".into()),
        }
    }

    #[test]
    fn round_trip() {
        let mut h = minimal();
        h.set_extension(EXT_BACKING_FORMAT, Some(b"raw".to_vec()));
        let b = h.serialize().unwrap();
        let p = Header::parse(&b, true).unwrap();
        assert_eq!(p.extensions, h.extensions);
        assert_eq!(p.extensions[0].kind, EXT_BACKING_FORMAT);
        assert_eq!(p.backing_file.as_deref(), Some("base.img"));
        assert_eq!(p.backing_format().as_deref(), Some("raw"));
        assert_eq!(p.serialize().unwrap(), b);
    }

    #[test]
    fn refuses_what_qemu_refuses() {
        let b = minimal().serialize().unwrap();
        let e = |off: usize, v: &[u8]| {
            let mut m = b.clone();
            m[off..off + v.len()].copy_from_slice(v);
            Header::parse(&m, true).unwrap_err().to_string()
        };
        assert_eq!(e(4, &4u32.to_be_bytes()), "Unsupported qcow2 version 4");
        assert_eq!(e(20, &8u32.to_be_bytes()), "Unsupported cluster size: 2^8");
        assert_eq!(
            e(72, &0x80u64.to_be_bytes()),
            "Unsupported qcow2 feature(s): Unknown incompatible feature: 80"
        );
        assert_eq!(e(36, &0u32.to_be_bytes()), "L1 table is too small");
        assert_eq!(e(0, b"QFI\0"), "Image is not in qcow2 format");
    }
}
