//! Zero and discard: zero clusters (or subclusters) written to L2, clusters given back to
//! the refcounts, and discards passed down to the file when the options say so.

use crate::Qcow2Driver;
use crate::enotsup;
use crate::format::entry::{self, COPIED, Cluster, SUB_ALL_ZERO, ZERO};
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
        let zero_clusters = self.version >= 3 || self.extended;
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
                self.zero_clusters(file, gc, last, flags).await?;
                pos = ((last + 1) * cs).min(end);
                continue;
            }
            // A partial cluster: nothing to do if it already reads as zeroes.
            if self.known_zero(node, file, pos, c_end - pos).await? {
                pos = c_end;
                continue;
            }
            if flags.contains(ReqFlags::NO_FALLBACK) {
                return Err(enotsup());
            }
            self.write_impl(node, file, pos, vec![0u8; (c_end - pos) as usize])
                .await?;
            pos = c_end;
        }
        Ok(())
    }

    pub(crate) async fn zero_clusters(
        &self,
        file: &Child,
        first: u64,
        last: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        let _claim = self.claims.claim(first, last).await;
        let unmap = flags.contains(ReqFlags::MAY_UNMAP) && !self.discard_no_unref;
        let mut m = self.meta.lock().await;
        for gc in first..=last {
            let (old, _) = m.l2_entry(file, gc).await?;
            let kind = entry::decode(old, self.cluster_bits, self.extended);
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
        self.maybe_write_back(file, &mut m).await
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
            let kind = entry::decode(old, self.cluster_bits, self.extended);
            let allocated = !matches!(kind, Cluster::Unallocated | Cluster::Zero { host: None })
                || (self.extended && obm != 0);
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
                (0, 0)
            };
            if e == old && bm == obm {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            m.set_l2(table, idx, e, bm);
            self.release_old(&mut m, old, FreeKind::Request);
        }
        self.maybe_write_back(file, &mut m).await
    }
}
