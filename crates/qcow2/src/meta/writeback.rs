//! Writing metadata back in the order crash safety needs: refcount blocks before the L2
//! tables that depend on them, tables before the frees they allow, the header last.

use super::Meta;
use super::overlap::Metadata;
use ferrite_block::Child;
use ferrite_block::driver::ReqFlags;
use std::io;

/// The debug event QEMU raises before writing a cached table back.
fn update_event(l2: bool) -> &'static str {
    if l2 {
        "l2_update"
    } else {
        "refblock_update_part"
    }
}

impl Meta {
    /// Writes a cache's dirty tables back (the L2 cache's, or the refcount blocks'); whether
    /// there were any.
    async fn write_dirty(&mut self, file: &Child, l2: bool) -> io::Result<bool> {
        let (dirty, kind) = if l2 {
            (self.l2.dirty(), Metadata::ACTIVE_L2)
        } else {
            (self.rb.dirty(), Metadata::REFCOUNT_BLOCK)
        };
        for off in &dirty {
            let cache = if l2 { &self.l2 } else { &self.rb };
            if let Some(bytes) = cache.bytes(*off) {
                self.check_write(file, *off, bytes.len() as u64, kind)
                    .await?;
                file.debug_event(update_event(l2)).await;
                file.write(*off, bytes, ReqFlags::empty()).await?;
            }
            let cache = if l2 { &mut self.l2 } else { &mut self.rb };
            cache.mark_clean(*off);
        }
        Ok(!dirty.is_empty())
    }

    /// Makes room in a cache of tables, writing a dirty victim back (L2 tables only after
    /// the refcount blocks they depend on).
    pub(super) async fn make_room(&mut self, file: &Child, l2: bool) -> io::Result<()> {
        let cache = if l2 { &self.l2 } else { &self.rb };
        if !cache.is_full() {
            return Ok(());
        }
        let Some((victim, dirty)) = cache.victim() else {
            return Ok(());
        };
        if dirty {
            if l2 {
                self.write_refblocks(file).await?;
            }
            let cache = if l2 { &self.l2 } else { &self.rb };
            if let Some(bytes) = cache.bytes(victim) {
                let kind = if l2 {
                    Metadata::ACTIVE_L2
                } else {
                    Metadata::REFCOUNT_BLOCK
                };
                self.check_write(file, victim, bytes.len() as u64, kind)
                    .await?;
                file.debug_event(update_event(l2)).await;
                file.write(victim, bytes, ReqFlags::empty()).await?;
            }
        }
        let cache = if l2 { &mut self.l2 } else { &mut self.rb };
        cache.remove(victim);
        Ok(())
    }

    pub(super) async fn write_refblocks(&mut self, file: &Child) -> io::Result<bool> {
        self.write_dirty(file, false).await
    }

    pub(super) async fn write_l2_tables(&mut self, file: &Child) -> io::Result<bool> {
        self.write_dirty(file, true).await
    }

    /// Writes every dirty table back in a safe order and applies the waiting frees; `sync`
    /// makes it durable.
    pub(crate) async fn write_back(&mut self, file: &Child, sync: bool) -> io::Result<()> {
        let rb_written = self.write_refblocks(file).await?;
        if rb_written && sync && !self.l2.dirty().is_empty() {
            file.flush().await?;
        }
        let l2_written = self.write_l2_tables(file).await?;
        if !self.pending_frees.is_empty() {
            if l2_written {
                file.flush().await?;
            }
            let frees = std::mem::take(&mut self.pending_frees);
            for (host, n, kind) in frees {
                self.drop_refs(file, host, n, kind).await?;
            }
            self.write_refblocks(file).await?;
        }
        if sync {
            file.flush().await?;
        }
        Ok(())
    }

    /// Rewrites cluster 0 from the header.
    pub(crate) async fn write_header(&mut self, file: &Child) -> io::Result<()> {
        let bytes = self
            .h
            .serialize()
            .map_err(|_| io::Error::from_raw_os_error(libc::ENOSPC))?;
        file.write(0, bytes, ReqFlags::empty()).await
    }

    /// Rewrites the header and makes it durable: a switch to new tables, after which the
    /// old ones may be freed (and their clusters discarded).
    pub(crate) async fn sync_header(&mut self, file: &Child) -> io::Result<()> {
        self.write_header(file).await?;
        file.flush().await
    }

    /// Drops clean cached tables unused since the last cleaning (`cache-clean-interval`).
    /// Forgets the cached tables already on disk: they are read again from the file the
    /// image has from now on (a reopen may give it another).
    pub(crate) fn drop_clean_tables(&mut self) {
        self.l2.drop_clean();
        self.rb.drop_clean();
    }

    pub(crate) fn drop_unused_tables(&mut self) {
        self.l2.drop_unused();
        self.rb.drop_unused();
    }
}
