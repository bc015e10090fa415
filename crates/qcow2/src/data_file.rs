//! Images whose data clusters live in an external data file (`data-file`): each guest
//! cluster maps to the same offset there, so allocating one takes no space in the image
//! file and no refcount; what a freed cluster gives back is a discard on the data file
//! (when the `pass-discard-*` options say so); with `data-file-raw` the data file stays a
//! valid raw image: zeroes are written there too and growing maps the new clusters.

use crate::Qcow2Driver;
use crate::format::entry::{self, COPIED, Cluster};
use crate::meta::{FreeKind, Meta};
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use std::io;
use std::rc::Rc;

impl Qcow2Driver {
    /// What an L2 entry describes, as this image reads it.
    pub(crate) fn decode(&self, e: u64) -> Cluster {
        if self.data_file.is_some() {
            entry::decode_external(e, self.cluster_bits, self.extended)
        } else {
            entry::decode(e, self.cluster_bits, self.extended)
        }
    }

    /// The external data file, if the image has one.
    pub(crate) fn data_edge(&self, node: &Node) -> Option<Rc<Child>> {
        self.data_file.as_ref().and(node.edge("data-file"))
    }

    /// Whether the data file must stay a valid raw image.
    pub(crate) fn data_file_raw(&self) -> bool {
        self.data_file.as_ref().is_some_and(|d| d.raw)
    }

    /// A data-file cluster at `host` no longer mapped: its place in the data file
    /// is discarded later ([`Self::pass_data_discards`]) if the options pass `kind` down.
    pub(crate) fn release_data_cluster(&self, m: &Meta, host: u64, kind: FreeKind) {
        let pass = match kind {
            FreeKind::Request => m.pass_discard_request,
            FreeKind::Other => m.pass_discard_other,
        };
        if pass {
            self.data_discards.borrow_mut().push(host);
        }
    }

    /// Discards, in the data file, the clusters [`Self::release_data_cluster`] collected
    /// (best effort, as QEMU's: the mapping is already gone).
    pub(crate) async fn pass_data_discards(&self, node: &Node) {
        let hosts = std::mem::take(&mut *self.data_discards.borrow_mut());
        let Some(data) = self.data_edge(node) else {
            return;
        };
        for host in hosts {
            let _ = data.discard(host, self.cs()).await;
        }
    }

    /// `data-file-raw`: zeroes go to the data file as well, before the clusters read as
    /// zeroes in the image.
    pub(crate) async fn zero_raw_data(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> io::Result<()> {
        match self.data_edge(node) {
            Some(data) if self.data_file_raw() => {
                let len = len.min(self.size.get().saturating_sub(offset));
                data.write_zeroes(offset, len, flags - ReqFlags::FUA).await
            }
            _ => Ok(()),
        }
    }

    /// Growing the image from `old` to `size` bytes: the data file grows with it, and with
    /// `data-file-raw` the new clusters are mapped to it at once (QEMU's metadata
    /// preallocation), so that the image reads what the raw file holds.
    pub(crate) async fn grow_data_file(
        &self,
        node: &Node,
        file: &Child,
        old: u64,
        size: u64,
    ) -> io::Result<()> {
        let Some(data) = self.data_edge(node) else {
            return Ok(());
        };
        if data.len() < size {
            data.truncate(size).await?;
        }
        if !self.data_file_raw() {
            return Ok(());
        }
        let cs = self.cs();
        let mut m = self.meta.lock().await;
        for gc in old.div_ceil(cs)..size.div_ceil(cs) {
            let (e, _) = m.l2_entry(file, gc).await?;
            if e != 0 {
                continue;
            }
            let (table, idx) = m.l2_for_write(file, gc).await?;
            let bitmap = if self.extended {
                entry::SUB_ALL_ALLOC
            } else {
                0
            };
            m.set_l2(table, idx, (gc * cs) | COPIED, bitmap);
        }
        m.write_back(file, true).await
    }
}
