//! Resizing the image, and writing everything back (tables, persistent bitmaps, the clean
//! header) when the node closes or becomes read-only.

use crate::Qcow2Driver;
use crate::bitmaps;
use crate::enotsup;
use crate::format::header::incompat;
use crate::meta::FreeKind;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use std::io;

impl Qcow2Driver {
    pub(crate) async fn truncate_impl(
        &self,
        node: &Node,
        file: &Child,
        size: u64,
    ) -> io::Result<()> {
        let old = self.size.get();
        if size % 512 != 0 {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if size < old {
            if !self.snapshots.borrow().is_empty() {
                return Err(enotsup());
            }
            // Drop everything past the new end.
            let cs = self.cs();
            let from = size.div_ceil(cs) * cs;
            if size % cs != 0 {
                let tail = (size.div_ceil(cs) * cs).min(old) - size;
                self.zero_impl(node, file, size, tail, ReqFlags::empty())
                    .await?;
            }
            if from < old {
                let _claim = self.claims.claim(from / cs, old.div_ceil(cs) - 1).await;
                let mut m = self.meta.lock().await;
                for gc in from / cs..old.div_ceil(cs) {
                    let (e, bm) = m.l2_entry(file, gc).await?;
                    if e == 0 && bm == 0 {
                        continue;
                    }
                    let (table, idx) = m.l2_for_write(file, gc).await?;
                    m.set_l2(table, idx, 0, 0);
                    self.release_old(&mut m, e, FreeKind::Other);
                }
            }
        }
        let mut m = self.meta.lock().await;
        let needed = m.h.l1_needed(size);
        if needed > u64::from(m.h.l1_size) {
            m.grow_l1(file, needed).await?;
        }
        m.h.size = size;
        m.write_back(file, true).await?;
        m.write_header(file).await?;
        file.flush().await?;
        drop(m);
        self.size.set(size);
        // The new area reads as zeroes even where a longer backing file has data.
        if let Some(b) = node.child("backing")
            && size > old
            && b.len() > old
        {
            let end = size.min(b.len());
            self.zero_impl(node, file, old, end - old, ReqFlags::empty())
                .await?;
        }
        Ok(())
    }

    /// Writes everything back, stores the persistent bitmaps and marks the image clean.
    pub(crate) async fn close_impl(&self, node: &Node, file: &Child) -> io::Result<()> {
        if self.read_only.get() || self.dead.get() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        m.write_back(file, true).await?;
        let node_bitmaps = node.bitmaps();
        bitmaps::store(file, &mut m, &node_bitmaps).await?;
        if m.h.incompatible & incompat::DIRTY != 0 {
            m.h.incompatible &= !incompat::DIRTY;
            m.write_header(file).await?;
            file.flush().await?;
        }
        self.dirty_set.set(false);
        Ok(())
    }
}
