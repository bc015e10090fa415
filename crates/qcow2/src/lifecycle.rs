//! Resizing the image, and writing everything back (tables, persistent bitmaps, the clean
//! header) when the node closes or becomes read-only.

use crate::Qcow2Driver;
use crate::bitmaps;
use crate::format::header::incompat;
use crate::meta::FreeKind;
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use ferrite_qapi::os_msg;
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
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "The new size must be a multiple of 512",
            ));
        }
        let has_snapshots = !self.snapshots.borrow().is_empty();
        // v2 snapshot entries may lack the size they had (QEMU refuses the same way).
        if has_snapshots && self.version < 3 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "Can't resize a v2 image which has snapshots",
            ));
        }
        if size < old {
            // Drop everything past the new end. What a snapshot shares loses the active
            // image's reference only: the snapshot's own tables keep it.
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
                drop(m);
                self.pass_data_discards(node).await;
            }
        }
        {
            let mut m = self.meta.lock().await;
            let needed = m.h.l1_needed(size);
            if needed > u64::from(m.h.l1_size) {
                m.grow_l1(file, needed).await.map_err(|e| {
                    io::Error::other(format!("Failed to grow the L1 table: {}", os_msg(&e)))
                })?;
            }
        }
        if size > old {
            self.grow_data_file(node, file, old, size).await?;
        }
        let mut m = self.meta.lock().await;
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
    /// What fails is said on standard error as QEMU says it (nobody else would learn of it
    /// at quit), and the image stays marked dirty.
    pub(crate) async fn close_impl(&self, node: &Node, file: &Child) -> io::Result<()> {
        if self.dead.get() {
            return Ok(());
        }
        if self.read_only.get() {
            // A bitmap added since the image was opened read-only cannot be stored.
            let unstorable = node
                .bitmaps()
                .iter()
                .any(|b| b.is_stored() && !b.is_inconsistent() && !b.is_read_only());
            if unstorable {
                ferrite_block::report::error_report(&format!(
                    "Lost persistent bitmaps during inactivation of node '{}': No write access",
                    node.device_or_node_name()
                ));
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        // QEMU writes its L2 table cache (the refcount blocks it depends on first) and
        // flushes the file, then its refcount block cache and flushes again.
        let tables = m.write_back(file, true).await;
        if let Err(e) = &tables {
            report_close_failure("L2 table", e);
        }
        let refblocks = match m.write_back(file, false).await {
            Ok(()) => file.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = &refblocks {
            report_close_failure("refcount block", e);
        }
        tables.and(refblocks)?;
        let node_bitmaps = node.bitmaps();
        bitmaps::store(file, &mut m, &node_bitmaps).await?;
        bitmaps::refresh_info(file, &mut m).await;
        if m.h.incompatible & incompat::DIRTY != 0 {
            m.h.incompatible &= !incompat::DIRTY;
            m.write_header(file).await?;
            file.flush().await?;
        }
        self.dirty_set.set(false);
        Ok(())
    }
}

/// QEMU's words when a cache cannot be written back at close.
fn report_close_failure(cache: &str, e: &io::Error) {
    ferrite_block::report::error_report(&format!(
        "Failed to flush the {cache} cache: {}",
        ferrite_qapi::os_msg(e)
    ));
}

impl Qcow2Driver {
    /// Re-reads the image after another process may have changed it (activation after
    /// `blockdev-set-active`): header, tables, snapshots and backing file as a fresh open
    /// finds them (QEMU: `qcow2_co_invalidate_cache`, which reopens the image too).
    pub(crate) async fn invalidate_impl(&self, node: &Node, file: &Child) -> io::Result<()> {
        // Opened again as an active image, whatever `active` it was first opened with.
        let mut options = node.options();
        options.remove("active");
        let fresh = Qcow2Driver::open(
            &ferrite_qapi::Args::new(options),
            file,
            self.read_only.get(),
            self.on_corruption.clone(),
        )
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
        if (fresh.cluster_bits, fresh.version, fresh.extended)
            != (self.cluster_bits, self.version, self.extended)
        {
            return Err(io::Error::other(
                "the image's format changed while the node was inactive",
            ));
        }
        *self.meta.lock().await = fresh.meta.into_inner();
        self.size.set(fresh.size.get());
        *self.snapshots.borrow_mut() = fresh.snapshots.take();
        *self.backing.borrow_mut() = fresh.backing.take();
        self.dirty_set.set(fresh.dirty_set.get());
        // The persistent bitmaps as the image has them now, for the node to take up.
        *self.loaded.borrow_mut() = fresh.loaded.take();
        Ok(())
    }
}
