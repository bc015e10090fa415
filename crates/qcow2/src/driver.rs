//! The driver interface of an open image: each request checks the image is alive, runs its
//! path (`read.rs`, `write.rs`, `zero.rs`...), and turns corruption found on the way into
//! `BLOCK_IMAGE_CORRUPTED` (and, for a writable image, a corrupt mark and no more requests).

use crate::Qcow2Driver;
use crate::format::header::{self, incompat};
use crate::info::snapshot_info;
use crate::open::prepare_for_writing;
use crate::snapshot;
use ferrite_block::Node;
use ferrite_block::Perm;
use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::driver::{BoxFut, Driver, Extent, NewSnapshot, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;
use std::time::Instant;

impl Driver for Qcow2Driver {
    fn answers_info(&self, _node: &Node) -> bool {
        true
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size.get()
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.read_guest(node, &file, offset, len).await;
            self.check(node, &file, r).await
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.write_impl(node, &file, offset, data).await;
            let r = self.check(node, &file, r).await;
            if r.is_ok() && flags.contains(ReqFlags::FUA) {
                return self.flush(node).await;
            }
            r
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.zero_impl(node, &file, offset, len, flags).await;
            let r = self.check(node, &file, r).await;
            if r.is_ok() && flags.contains(ReqFlags::FUA) {
                return self.flush(node).await;
            }
            r
        })
    }

    fn discard<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.discard_impl(node, &file, offset, len, false).await;
            self.check(node, &file, r).await
        })
    }

    fn make_empty<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self
                .discard_impl(node, &file, 0, self.size.get(), true)
                .await;
            self.check(node, &file, r).await
        })
    }

    fn flush<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            if self.read_only.get() {
                return Ok(());
            }
            // The data before the metadata that points to it.
            if let Some(data) = self.data_edge(node) {
                data.flush().await?;
            }
            let mut m = self.meta.lock().await;
            m.write_back(&file, true).await
        })
    }

    fn block_status<'a>(&'a self, node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(self.block_status_impl(node, offset, len))
    }

    fn truncate<'a>(&'a self, node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let r = self.truncate_impl(node, &file, size).await;
            self.check(node, &file, r).await
        })
    }

    fn truncate_prealloc<'a>(
        &'a self,
        node: &'a Node,
        size: u64,
        _prealloc: ferrite_block::driver::Prealloc,
    ) -> BoxFut<'a, ()> {
        // QEMU allocates the added clusters for `falloc`; ferrite grows the image without
        // them: the new part reads as zeroes either way, only the file's use differs.
        self.truncate(node, size)
    }

    fn prepare_writable<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let was_dirty = m.h.incompatible & incompat::DIRTY != 0;
            let r = prepare_for_writing(&file, &mut m, was_dirty)
                .await
                .map_err(|e| match e {
                    crate::error::Error::RepairDirty(e)
                    | crate::error::Error::UpdateBitmapDirectory(e)
                    | crate::error::Error::UpdateHeader(e) => e,
                    other => std::io::Error::other(other.to_string()),
                });
            crate::bitmaps::refresh_info(&file, &mut m).await;
            self.dirty_set.set(m.h.incompatible & incompat::DIRTY != 0);
            r
        })
    }

    fn invalidate_cache<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = Self::file(node)?;
            let r = self.invalidate_impl(node, &file).await;
            // An image that cannot be read again is given up, as QEMU's driver gives it up.
            if r.is_err() {
                self.dead.set(true);
            }
            r
        })
    }

    fn dirty_flag(&self) -> bool {
        // Set in the header by the first allocation under lazy refcounts (QEMU's
        // `is_dirty`), until the image is closed clean; or found set by an open that did
        // not repair it (read-only), until a reopen for writing repairs it.
        self.dirty_set.get()
    }

    fn is_ejected(&self) -> bool {
        self.dead.get()
    }

    fn close<'a>(&'a self, node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let file = Self::file(node)?;
            self.close_impl(node, &file).await
        })
    }

    fn child_perm(&self, name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        if name == "backing" {
            return Perm::for_backing(perm, shared);
        }
        let mut p = perm | Perm::CONSISTENT_READ;
        if !self.read_only.get() {
            p |= Perm::WRITE | Perm::RESIZE;
        }
        (p, shared - (Perm::WRITE | Perm::RESIZE))
    }

    fn mutable_options(&self) -> &'static [&'static str] {
        &[
            "lazy-refcounts",
            "pass-discard-request",
            "pass-discard-snapshot",
            "pass-discard-other",
            "discard-no-unref",
            "overlap-check",
            "overlap-check.template",
            "overlap-check.main-header",
            "overlap-check.active-l1",
            "overlap-check.active-l2",
            "overlap-check.refcount-table",
            "overlap-check.refcount-block",
            "overlap-check.snapshot-table",
            "overlap-check.inactive-l1",
            "overlap-check.inactive-l2",
            "overlap-check.bitmap-directory",
            "cache-size",
            "l2-cache-size",
            "l2-cache-entry-size",
            "refcount-cache-size",
            "cache-clean-interval",
        ]
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        let same = |key: &str| match (opts.get(key), node.child(key)) {
            (Some(QObject::String(name)), Some(c)) => c.name() == name,
            (None, _) => key != "file",
            (Some(QObject::Null), None) => true,
            _ => false,
        };
        if !same("file") {
            return Err(ferrite_block::Error::CannotChange("file".into()));
        }
        let entry = if self.extended { 16 } else { 8 };
        crate::open::cache_sizes(opts, 1 << self.cluster_bits, entry, self.size.get())?;
        crate::open::clean_interval(opts)?;
        Ok(())
    }

    fn reopen_apply(&self, node: &Node, opts: &Args, read_only: bool) -> ferrite_block::Result<()> {
        self.read_only.set(read_only);
        // The persistent bitmaps, written back before a reopen to read-only, stay as they
        // are until the image is writable again (QEMU's reopen of qcow2 bitmaps).
        for b in node.bitmaps().iter().filter(|b| b.is_persistent()) {
            b.set_read_only(read_only);
        }
        // Reopens happen drained: nothing holds the metadata.
        if let Ok(mut m) = self.meta.try_lock() {
            m.overlap_check = crate::open::overlap_check(opts);
            // QEMU starts with new caches at each reopen.
            m.drop_clean_tables();
        }
        Ok(())
    }

    fn format_specific(&self) -> Option<QDict> {
        self.format_specific_info()
    }

    fn is_encrypted(&self) -> bool {
        self.crypto.is_some()
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }

    fn compressed_cluster_size(&self) -> Option<u64> {
        Some(self.cs())
    }

    fn snapshots_info(&self) -> Vec<QDict> {
        self.snapshots.borrow().iter().map(snapshot_info).collect()
    }

    fn snapshot_create<'a>(&'a self, node: &'a Node, snap: &'a NewSnapshot) -> BoxFut<'a, QDict> {
        Box::pin(async move {
            self.alive()?;
            self.no_data_file()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let r = snapshot::create(&file, &mut m, snap).await;
            drop(m);
            let s = self.check(node, &file, r).await?;
            self.snapshots.borrow_mut().push(s.clone());
            // The snapshot keeps the VM state; the active image needs it no more, and
            // keeping it would make the next one copy it (QEMU drops it too).
            if snap.vm_state_size > 0 {
                let len = snap.vm_state_size.next_multiple_of(self.cs());
                let r = self
                    .discard_impl(node, &file, self.vm_state_offset(), len, false)
                    .await;
                let _ = self.check(node, &file, r).await;
            }
            Ok(snapshot_info(&s))
        })
    }

    fn snapshot_goto<'a>(&'a self, node: &'a Node, id_or_name: &'a str) -> BoxFut<'a, bool> {
        Box::pin(async move {
            self.alive()?;
            self.no_data_file()?;
            let file = Self::file(node)?;
            let size = {
                let list = self.snapshots.borrow();
                list.iter()
                    .find(|s| s.id == id_or_name)
                    .or_else(|| list.iter().find(|s| s.name == id_or_name))
                    .map(|s| s.disk_size())
            };
            let Some(size) = size else {
                return Ok(false);
            };
            if let Some(size) = size.filter(|s| *s != self.size.get()) {
                let r = self.truncate_impl(node, &file, size).await;
                self.check(node, &file, r).await?;
            }
            let mut m = self.meta.lock().await;
            let r = snapshot::goto(&file, &mut m, id_or_name).await;
            drop(m);
            Ok(self.check(node, &file, r).await?.is_some())
        })
    }

    fn save_vmstate<'a>(&'a self, node: &'a Node, pos: u64, data: Vec<u8>) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let at = self.vm_state_at(pos, data.len())?;
            file.debug_event("vmstate_save").await;
            let r = self.write_impl(node, &file, at, data).await;
            self.check(node, &file, r).await
        })
    }

    fn load_vmstate<'a>(&'a self, node: &'a Node, pos: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let at = self.vm_state_at(pos, len)?;
            file.debug_event("vmstate_load").await;
            let r = self.read_guest(node, &file, at, len).await;
            self.check(node, &file, r).await
        })
    }

    fn snapshot_delete<'a>(
        &'a self,
        node: &'a Node,
        id: Option<&'a str>,
        name: Option<&'a str>,
    ) -> BoxFut<'a, Option<QDict>> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            let r = snapshot::delete(&file, &mut m, id, name).await;
            drop(m);
            let gone = self.check(node, &file, r).await?;
            if let Some(s) = &gone {
                self.snapshots.borrow_mut().retain(|x| x.id != s.id);
            }
            Ok(gone.as_ref().map(snapshot_info))
        })
    }

    fn take_initial_bitmaps(&self) -> Vec<Rc<DirtyBitmap>> {
        std::mem::take(&mut *self.loaded.borrow_mut())
    }

    fn supports_persistent_bitmaps(&self) -> bool {
        true
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn writes_file_when_writable(&self) -> bool {
        true
    }

    fn remove_stored_bitmap<'a>(&'a self, node: &'a Node, name: &'a str) -> BoxFut<'a, ()> {
        Box::pin(async move {
            if self.read_only.get() {
                return Ok(());
            }
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            crate::bitmaps::remove_entry(&file, &mut m, name).await
        })
    }

    fn supports_internal_snapshots(&self) -> bool {
        true
    }

    fn can_store_bitmap(&self, name: &str, _granularity: u64) -> Result<(), String> {
        if self.version < 3 {
            return Err("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        // The bitmap directory's limit on names (docs/interop/qcow2.txt).
        const MAX_NAME: usize = 1023;
        if name.len() > MAX_NAME {
            return Err(format!(
                "Name length exceeds maximum ({MAX_NAME} characters)"
            ));
        }
        Ok(())
    }

    fn is_passthrough(&self) -> bool {
        // The secret that unlocks an encrypted image makes it more than its file.
        self.key_secret.is_none()
    }

    fn strong_options(&self) -> QDict {
        let mut d = QDict::new();
        d.insert_opt("encrypt.key-secret", self.key_secret.as_deref());
        d
    }

    fn backing_filename(&self) -> Option<(String, Option<String>)> {
        self.backing.borrow().clone()
    }

    fn change_backing_file<'a>(
        &'a self,
        node: &'a Node,
        name: Option<String>,
        format: Option<String>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            let file = Self::file(node)?;
            let mut m = self.meta.lock().await;
            m.h.backing_file = name.clone();
            m.h.set_extension(
                header::EXT_BACKING_FORMAT,
                format
                    .clone()
                    .filter(|_| name.is_some())
                    .map(String::into_bytes),
            );
            m.write_header(&file).await?;
            file.flush().await?;
            *self.backing.borrow_mut() = name.map(|n| (n, format));
            Ok(())
        })
    }

    fn write_compressed<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.alive()?;
            if self.crypto.is_some() || self.data_file.is_some() {
                // QEMU: compression mixes with neither encryption nor a data file.
                return Err(std::io::Error::from_raw_os_error(libc::ENOTSUP));
            }
            let file = Self::file(node)?;
            let r = self.write_compressed_impl(node, &file, offset, &data).await;
            self.check(node, &file, r).await
        })
    }

    fn clean_caches(&self, now: Instant) {
        let interval = self.clean_interval;
        if interval.is_zero() || now.duration_since(self.last_clean.get()) < interval {
            return;
        }
        // Busy metadata is in use anyway; try again at the next tick.
        if let Ok(mut m) = self.meta.try_lock() {
            m.drop_unused_tables();
            self.last_clean.set(now);
        }
    }
}
