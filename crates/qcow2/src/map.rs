//! Guest-to-host mapping: what a guest range is (data at a host offset, zeroes, compressed,
//! or left to the backing file), merged over contiguous clusters.

use crate::format::entry::{self, COPIED, Cluster, Sub};
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
    let c = match entry::decode(e, m.h.cluster_bits, ext) {
        // Offset 0 is a real data cluster in an external data file; COPIED tells it from
        // an unallocated entry there (every data-file cluster has refcount 1).
        Cluster::Unallocated if e & COPIED != 0 && m.h.incompatible & incompat::DATA_FILE != 0 => {
            Cluster::Normal {
                host: 0,
                copied: true,
            }
        }
        c => c,
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
        let (src, mut run) = cluster_source(self, e, bm, in_off);
        if let Source::Data(h) = src {
            self.check_data_cluster(file, gc, h - in_off)?;
        }
        if matches!(src, Source::Compressed { .. }) {
            return Ok((src, run.min(len)));
        }
        // Extend over following clusters with the same source.
        while run < len && run % cs == (cs - in_off) % cs {
            gc += 1;
            let (e, bm) = self.l2_entry(file, gc).await?;
            let (next, n) = cluster_source(self, e, bm, 0);
            let same = match (src, next) {
                (Source::Data(a), Source::Data(b)) => b == a + run,
                (a, b) => a == b,
            };
            if !same {
                break;
            }
            if let Source::Data(h) = next {
                self.check_data_cluster(file, gc, h)?;
            }
            run += n;
            if n < cs {
                break;
            }
        }
        Ok((src, run.min(len)))
    }
}
