//! Guest-to-host mapping: what a guest range is (data at a host offset, zeroes, compressed,
//! or left to the backing file), merged over contiguous clusters.

use crate::format::entry::{self, Cluster, Sub};
use crate::format::header::incompat;
use crate::meta::Meta;
use ferrite_block::Child;
use std::io;

/// Where the bytes of a guest range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The backing file (or zeroes without one): not allocated in this layer.
    Backing,
    /// Zeroes, allocated in this layer.
    Zero,
    /// Data at this host offset (of the data file).
    Data(u64),
    /// A compressed cluster: its file range; the guest range starts `skip` bytes into the
    /// decompressed cluster.
    Compressed { offset: u64, len: u64, skip: u64 },
}

/// The status of one guest cluster (or the part of it from `in_off`): its source and how
/// many bytes from `in_off` share it, up to the end of the cluster.
fn cluster_source(m: &Meta, e: u64, bm: u64, in_off: u64) -> (Source, u64) {
    let cs = m.cs();
    let ext = m.h.extended_l2();
    let whole = cs - in_off;
    let c = if m.h.incompatible & incompat::DATA_FILE != 0 {
        entry::decode_external(e, m.h.cluster_bits, ext)
    } else {
        entry::decode(e, m.h.cluster_bits, ext)
    };
    match c {
        Cluster::Compressed { offset, len } => (
            Source::Compressed {
                offset,
                len,
                skip: in_off,
            },
            whole,
        ),
        Cluster::Zero { .. } => (Source::Zero, whole),
        Cluster::Unallocated if !ext => (Source::Backing, whole),
        Cluster::Normal { host, .. } if !ext => (Source::Data(host + in_off), whole),
        c => {
            // Extended L2: the run of subclusters in the same state.
            let scs = cs / 32;
            let first = (in_off / scs) as u32;
            let state = entry::sub_state(bm, first);
            let mut last = first + 1;
            while last < 32 && entry::sub_state(bm, last) == state {
                last += 1;
            }
            let run = u64::from(last) * scs - in_off;
            let src = match (state, c) {
                (Sub::Zero, _) => Source::Zero,
                (Sub::Data, Cluster::Normal { host, .. }) => Source::Data(host + in_off),
                _ => Source::Backing,
            };
            (src, run)
        }
    }
}

impl Meta {
    /// The source of the guest range at `offset`, and how many of its `len` bytes share it
    /// (contiguous data clusters merge into one run).
    pub(crate) async fn map(
        &mut self,
        file: &Child,
        offset: u64,
        len: u64,
    ) -> io::Result<(Source, u64)> {
        let cs = self.cs();
        let mut gc = offset / cs;
        let in_off = offset % cs;
        let (e, bm) = self.l2_entry(file, gc).await?;
        self.check_entry(gc, e, bm, true)?;
        let (src, mut run) = cluster_source(self, e, bm, in_off);
        if matches!(src, Source::Compressed { .. }) {
            return Ok((src, run.min(len)));
        }
        // Extend over following clusters with the same source, and (as QEMU counts a run)
        // the same kind of entry: host clusters contiguous after one with a host cluster,
        // none after one without. A cluster that breaks the run starts the next one, and
        // gets the first cluster's checks.
        let mut host = self.entry_host(e);
        while run < len && run % cs == (cs - in_off) % cs {
            gc += 1;
            let (e, bm) = self.l2_entry(file, gc).await?;
            self.check_entry(gc, e, bm, false)?;
            let (next, n) = cluster_source(self, e, bm, 0);
            let next_host = self.entry_host(e);
            let same = match (src, next) {
                (Source::Data(a), Source::Data(b)) => b == a + run,
                (a, b) => a == b,
            } && next_host == host.map(|h| h + cs);
            if !same {
                break;
            }
            host = next_host;
            run += n;
            if n < cs {
                break;
            }
        }
        Ok((src, run.min(len)))
    }

    /// The host cluster an entry points at, if any (data, or preallocated zeroes).
    fn entry_host(&self, e: u64) -> Option<u64> {
        match entry::decode(e, self.h.cluster_bits, self.h.extended_l2()) {
            Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => Some(host),
            _ => None,
        }
    }

    /// QEMU's checks of an L2 entry on the way to guest data, each marking the image
    /// corrupt: an extended entry whose bitmap is contradictory (every entry of a run), and
    /// for the first entry, a zero flag in a v2 image, a compressed cluster with an external
    /// data file, an unaligned cluster, or one at another offset than its guest offset in
    /// an external data file. A cluster past the end of the file is no error here: it
    /// reads as zeroes, as in QEMU (writes refuse it, see `check_data_cluster`).
    fn check_entry(&mut self, gc: u64, e: u64, bm: u64, first: bool) -> io::Result<()> {
        let per = self.l2_entries();
        let l2 = self.l1.get((gc / per) as usize).copied().unwrap_or(0) & entry::OFFSET_MASK;
        let idx = gc % per;
        let ext = self.h.extended_l2();
        let c = entry::decode(e, self.h.cluster_bits, ext);
        let invalid = ext
            && match c {
                Cluster::Normal { .. } => (bm >> 32) & bm != 0,
                Cluster::Unallocated => bm & 0xffff_ffff != 0,
                _ => false,
            };
        if invalid {
            let msg =
                format!("Invalid cluster entry found  (L2 offset: {l2:#x}, L2 index: {idx:#x})");
            return Err(self.corruption(msg, None, None));
        }
        if !first {
            return Ok(());
        }
        let data_file = self.h.incompatible & incompat::DATA_FILE != 0;
        let msg = match c {
            Cluster::Zero { .. } if self.h.version < 3 => format!(
                "Zero cluster entry found in pre-v3 image (L2 offset: {l2:#x}, L2 index: {idx:#x})"
            ),
            Cluster::Compressed { .. } if data_file => format!(
                "Compressed cluster entry found in image with external data file (L2 offset: \
                 {l2:#x}, L2 index: {idx:#x})"
            ),
            Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                self.check_cluster_aligned(host, l2, idx)?;
                if data_file && host != gc * self.cs() {
                    format!(
                        "External data file host cluster offset {host:#x} does not match guest \
                         cluster offset: {:#x}, L2 index: {idx:#x})",
                        gc * self.cs()
                    )
                } else {
                    return Ok(());
                }
            }
            _ => return Ok(()),
        };
        Err(self.corruption(msg, None, None))
    }
}
