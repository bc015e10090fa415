//! Zero and discard: zero clusters (or subclusters) written to L2, clusters given back to
//! the refcounts, and discards passed down to the file when the options say so.

use crate::Qcow2Driver;
use crate::enotsup;
use crate::format::entry::{self, COPIED, Cluster, SUB_ALL_ZERO, Sub, ZERO};
use crate::meta::FreeKind;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use std::io;

impl Qcow2Driver {
    pub(crate) async fn zero_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let cs = self.cs();
        // v2 has no zero flag; without a backing file an unallocated cluster reads as
        // zeroes, so whole clusters are discarded instead (as QEMU does).
        // (Not with discard-no-unref, whose v2 discards leave the data in place.)
        let v2_discard = self.version < 3
            && !self.extended
            && !self.discard_no_unref
            && node.child("backing").is_none();
        let zero_clusters = self.version >= 3 || self.extended || v2_discard;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos / cs;
            let c_end = ((gc + 1) * cs).min(end);
            let whole = pos % cs == 0 && (c_end % cs == 0 || c_end == self.size.get());
            if whole && zero_clusters {
                // Every whole cluster from here at once.
                let mut last = gc;
                while (last + 2) * cs <= end {
                    last += 1;
                }
                if c_end == self.size.get() && c_end % cs != 0 {
                    last = gc;
                }
                self.zero_whole(node, file, gc, last, flags, v2_discard)
                    .await?;
                pos = ((last + 1) * cs).min(end);
                continue;
            }
            if self.extended {
                self.zero_in_cluster(node, file, pos, c_end, flags).await?;
                pos = c_end;
                continue;
            }
            // A partial cluster whose other bytes read as zeroes becomes a zero cluster
            // where it holds no data (QEMU's rule: the map shows it allocated as zeroes).
            if zero_clusters && self.rest_is_zero(node, file, pos, c_end, cs).await? {
                self.zero_whole(node, file, gc, gc, flags, v2_discard)
                    .await?;
                pos = c_end;
                continue;
            }
            // Otherwise nothing to do if it already reads as zeroes.
            if self.known_zero(node, file, pos, c_end - pos).await? {
                pos = c_end;
                continue;
            }
            self.write_zeroes_as_data(node, file, pos, c_end, flags)
                .await?;
            pos = c_end;
        }
        Ok(())
    }

    /// Clusters `first..=last` made to read as zeroes: zero clusters, or (`discard`, v2
    /// without a backing file) unallocated ones.
    async fn zero_whole(
        &self,
        node: &Node,
        file: &Child,
        first: u64,
        last: u64,
        flags: ReqFlags,
        discard: bool,
    ) -> io::Result<()> {
        if !discard {
            return self.zero_clusters(node, file, first, last, flags).await;
        }
        let cs = self.cs();
        let end = ((last + 1) * cs).min(self.size.get());
        self.discard_impl(node, file, first * cs, end - first * cs, false)
            .await
    }

    /// Whether the `unit` (a cluster, or a subcluster of an extended entry) around
    /// `from..to` holds no data and reads as zeroes outside that range.
    async fn rest_is_zero(
        &self,
        node: &Node,
        file: &Child,
        from: u64,
        to: u64,
        unit: u64,
    ) -> io::Result<bool> {
        let cs = self.cs();
        let start = from / unit * unit;
        let end = (start + unit).min(self.size.get());
        let (e, bm) = self.meta.lock().await.l2_entry(file, start / cs).await?;
        let no_data = match self.decode(e) {
            Cluster::Compressed { .. } => false,
            _ if self.extended => matches!(
                entry::sub_state(bm, ((start % cs) / unit) as u32),
                Sub::Unallocated | Sub::Zero
            ),
            c => matches!(c, Cluster::Unallocated | Cluster::Zero { .. }),
        };
        if !no_data {
            return Ok(false);
        }
        for (a, b) in [(start, from), (to, end)] {
            if a < b && !self.known_zero(node, file, a, b - a).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Extended L2: zeroes `from..to` inside one cluster, whole subclusters by their
    /// bitmap bits, a partial one as well where the rest of it reads as zeroes and it
    /// holds no data (QEMU's rule), by writing zeroes otherwise.
    async fn zero_in_cluster(
        &self,
        node: &Node,
        file: &Child,
        from: u64,
        to: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let scs = self.cs() / 32;
        let size = self.size.get();
        let mut pos = from;
        while pos < to {
            let sc_start = pos / scs * scs;
            let sc_end = (sc_start + scs).min(size);
            let piece_end = sc_end.min(to);
            let whole = pos == sc_start && piece_end == sc_end;
            let flagged = (whole || self.rest_is_zero(node, file, pos, piece_end, scs).await?)
                && self
                    .zero_subclusters(node, file, sc_start, sc_end, flags)
                    .await?;
            if !flagged {
                self.write_zeroes_as_data(node, file, pos, piece_end, flags)
                    .await?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    /// Zeroes written as data, where no zero flag can say it.
    async fn write_zeroes_as_data(
        &self,
        node: &Node,
        file: &Child,
        from: u64,
        to: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        if flags.contains(ReqFlags::NO_FALLBACK) {
            return Err(enotsup());
        }
        self.write_impl(node, file, from, vec![0u8; (to - from) as usize])
            .await
    }

    /// Extended L2: marks the subclusters of `start..end` (in one cluster) as zeroes;
    /// `false` for a compressed cluster, which has no subclusters.
    async fn zero_subclusters(
        &self,
        node: &Node,
        file: &Child,
        start: u64,
        end: u64,
        flags: ReqFlags,
    ) -> io::Result<bool> {
        let cs = self.cs();
        let scs = cs / 32;
        let gc = start / cs;
        let _claim = self.claims.claim(gc, gc).await;
        let mut m = self.meta.lock().await;
        let (e, _) = m.l2_entry(file, gc).await?;
        if matches!(self.decode(e), Cluster::Compressed { .. }) {
            return Ok(false);
        }
        drop(m);
        self.zero_raw_data(node, start, end - start, flags).await?;
        let mut m = self.meta.lock().await;
        let (e, bm2) = m.l2_entry(file, gc).await?;
        let first = ((start % cs) / scs) as u32;
        let last = (end - gc * cs).div_ceil(scs) as u32;
        let new = entry::sub_set(bm2, first, last, Sub::Zero);
        if new != bm2 {
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, new);
        }
        self.maybe_write_back(file, &mut m).await?;
        Ok(true)
    }

    pub(crate) async fn zero_clusters(
        &self,
        node: &Node,
        file: &Child,
        first: u64,
        last: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let _claim = self.claims.claim(first, last).await;
        let cs = self.cs();
        self.zero_raw_data(node, first * cs, (last + 1 - first) * cs, flags)
            .await?;
        let unmap = flags.contains(ReqFlags::MAY_UNMAP) && !self.discard_no_unref;
        let mut m = self.meta.lock().await;
        for gc in first..=last {
            let (old, _) = m.l2_entry(file, gc).await?;
            let kind = self.decode(old);
            let keep = match kind {
                Cluster::Normal { host, copied: true } if !unmap => Some(host),
                Cluster::Zero { host: Some(host) } if !unmap => Some(host),
                _ => None,
            };
            let (e, bm) = match (self.extended, keep) {
                (true, Some(h)) => (h | COPIED, SUB_ALL_ZERO),
                (true, None) => (0, SUB_ALL_ZERO),
                (false, Some(h)) => (h | COPIED | ZERO, 0),
                (false, None) => (ZERO, 0),
            };
            if e == old && (!self.extended || bm == m.l2_entry(file, gc).await?.1) {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, bm);
            if keep.is_none() {
                self.release_old(&mut m, old, FreeKind::Request);
            }
        }
        self.maybe_write_back(file, &mut m).await?;
        drop(m);
        self.pass_data_discards(node).await;
        Ok(())
    }

    /// Discards whole clusters: they read as zeroes where a backing file or an allocation
    /// would show otherwise, or (`full`, emptying the image) become unallocated.
    pub(crate) async fn discard_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        len: u64,
        full: bool,
    ) -> io::Result<()> {
        let cs = self.cs();
        // Only whole clusters (and the partial last one of the image) are discarded.
        let first = offset.div_ceil(cs);
        let end = offset + len;
        let last_excl = if end == self.size.get() {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last_excl {
            return Ok(());
        }
        let has_backing = node.child("backing").is_some();
        if has_backing && self.version < 3 && !full {
            // v2 has no zero clusters: discarding would expose the backing file's data,
            // so QEMU leaves such clusters alone.
            return Ok(());
        }
        let _claim = self.claims.claim(first, last_excl - 1).await;
        let mut m = self.meta.lock().await;
        for gc in first..last_excl {
            let (old, obm) = m.l2_entry(file, gc).await?;
            let kind = self.decode(old);
            // As QEMU counts it: an extended entry without a host cluster is unallocated,
            // whatever its zero bits say.
            let allocated = !matches!(kind, Cluster::Unallocated | Cluster::Zero { host: None });
            if self.discard_no_unref
                && !full
                && let Cluster::Normal { host, copied: true } | Cluster::Zero { host: Some(host) } =
                    kind
            {
                let (table, idx) = m.l2_for_write(file, gc).await?;
                if self.extended {
                    m.set_l2(table, idx, host | COPIED, SUB_ALL_ZERO);
                } else if self.version >= 3 {
                    m.set_l2(table, idx, host | COPIED | ZERO, 0);
                }
                continue;
            }
            let (e, bm) = if full {
                (0, 0)
            } else if has_backing || allocated {
                if self.extended {
                    (0, SUB_ALL_ZERO)
                } else if self.version >= 3 {
                    (ZERO, 0)
                } else {
                    (0, 0)
                }
            } else {
                // Already reads as zeroes, nothing to give back: left as it is (a zero
                // cluster stays one, as in QEMU).
                (old, obm)
            };
            if e == old && bm == obm {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, bm);
            self.release_old(&mut m, old, FreeKind::Request);
        }
        self.maybe_write_back(file, &mut m).await?;
        drop(m);
        self.pass_data_discards(node).await;
        Ok(())
    }
}
