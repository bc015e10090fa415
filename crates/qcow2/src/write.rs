//! The write path: writes to allocated clusters in place, allocating writes with
//! copy-on-write of the untouched parts (from a backing file or a snapshot's shared
//! cluster), subcluster writes with extended L2, and the dirty bit of lazy refcounts.

use crate::MAX_PENDING_FREES;
use crate::Qcow2Driver;
use crate::format::entry::{self, COPIED, Cluster, SUB_ALL_ALLOC};
use crate::format::header::incompat;
use crate::meta::{FreeKind, Meta};
use ferrite_block::Child;
use ferrite_block::Node;
use ferrite_block::driver::ReqFlags;
use std::io;

/// An encrypted image's unit.
const SECTOR: u64 = ferrite_crypto::SECTOR as u64;

impl Qcow2Driver {
    /// Writes `data` (owned: a request that maps to one run of clusters goes to the file
    /// as it is, without a copy).
    pub(crate) async fn write_impl(
        &self,
        node: &Node,
        file: &Child,
        offset: u64,
        data: Vec<u8>,
    ) -> io::Result<()> {
        let cs = self.cs();
        let len = data.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let _claim = self
            .claims
            .claim(offset / cs, (offset + len - 1) / cs)
            .await;
        // An encrypted image stores whole sectors: a request that starts or ends inside one
        // rewrites the sectors around it (they stay in the clusters claimed).
        let (offset, mut data) = match &self.crypto {
            Some(_) if offset % SECTOR != 0 || len % SECTOR != 0 => {
                let start = offset / SECTOR * SECTOR;
                let end = (offset + len).next_multiple_of(SECTOR);
                let mut around = self
                    .read_guest(node, file, start, (end - start) as usize)
                    .await?;
                let at = (offset - start) as usize;
                around[at..at + data.len()].copy_from_slice(&data);
                (start, around)
            }
            _ => (offset, data),
        };
        let len = data.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let off = offset + pos;
            let gc = off / cs;
            let in_off = off % cs;
            // One hold of the metadata lock maps the whole run this step writes.
            let mut m = self.meta.lock().await;
            let (e, bm) = m.l2_entry(file, gc).await?;
            let kind = self.decode(e);
            let n = (cs - in_off).min(len - pos);
            // Extended L2: subclusters are written and allocated one cluster at a time.
            if self.extended
                && matches!(
                    kind,
                    Cluster::Normal { copied: true, .. } | Cluster::Unallocated
                )
            {
                drop(m);
                let piece = &data[pos as usize..(pos + n) as usize];
                match kind {
                    Cluster::Normal { host, .. } => {
                        self.write_subclusters(node, file, gc, host, bm, in_off, piece)
                            .await?
                    }
                    _ => {
                        self.write_new_subclusters(node, file, gc, in_off, piece)
                            .await?
                    }
                }
                pos += n;
                continue;
            }
            match kind {
                Cluster::Normal { host, copied: true } => {
                    // In place; extend over following clusters mapped contiguously.
                    let mut run = n;
                    while pos + run < len {
                        let (e2, _) = m.l2_entry(file, gc + run.div_ceil(cs)).await?;
                        match self.decode(e2) {
                            Cluster::Normal {
                                host: h2,
                                copied: true,
                            } if h2 == host + (in_off + run) => {}
                            _ => break,
                        }
                        run += cs.min(len - pos - run);
                    }
                    m.check_data_cluster(file, gc, host)?;
                    let data_file = self.data_edge(node);
                    if data_file.is_none() {
                        m.check_data(file, host + in_off, run).await?;
                    }
                    drop(m);
                    let mut part = if pos == 0 && run == len {
                        std::mem::take(&mut data)
                    } else {
                        data[pos as usize..(pos + run) as usize].to_vec()
                    };
                    if let Some(c) = &self.crypto {
                        c.cipher.encrypt(&mut part, (host + in_off) / SECTOR);
                    }
                    file.debug_event("write_aio").await;
                    data_file
                        .as_deref()
                        .unwrap_or(file)
                        .write(host + in_off, part, ReqFlags::empty())
                        .await?;
                    pos += run;
                }
                _ => {
                    // Allocate: this cluster and following ones of its L2 table that also
                    // need it (QEMU allocates one table's worth at a time, after getting
                    // that table ready).
                    let mut clusters = 1u64;
                    let per = m.l2_entries();
                    if !self.extended {
                        while pos + (cs - in_off) + (clusters - 1) * cs < len
                            && (gc + clusters) % per != 0
                        {
                            let (e2, _) = m.l2_entry(file, gc + clusters).await?;
                            if matches!(self.decode(e2), Cluster::Normal { copied: true, .. }) {
                                break;
                            }
                            clusters += 1;
                            if clusters * cs >= 32 << 20 {
                                break;
                            }
                        }
                    }
                    drop(m);
                    let end = (gc + clusters) * cs;
                    let n = end.min(offset + len) - off;
                    if pos == 0 && n == len && in_off == 0 && n == clusters * cs {
                        // Whole new clusters: nothing old to keep, the request is the data.
                        let host = self.new_clusters(node, file, gc, clusters, 0..len).await?;
                        self.write_new_clusters(
                            node,
                            file,
                            gc,
                            clusters,
                            host,
                            std::mem::take(&mut data),
                            0..len,
                        )
                        .await?;
                    } else {
                        self.write_allocating(
                            node,
                            file,
                            gc,
                            clusters,
                            in_off,
                            &data[pos as usize..(pos + n) as usize],
                        )
                        .await?;
                    }
                    pos += n;
                }
            }
        }
        Ok(())
    }

    /// Writes `data` at `in_off` of guest cluster `gc` and on into `clusters` clusters that
    /// all get new host clusters, filling what the data does not cover from the old content.
    pub(crate) async fn write_allocating(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        clusters: u64,
        in_off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.mark_dirty_once(file).await?;
        let cs = self.cs();
        let start = gc * cs;
        let total = clusters * cs;
        let data_end = in_off + data.len() as u64;
        // As QEMU: the clusters first, then the old content to keep around the data (from
        // a backing file, compressed data or a shared cluster).
        let host = self
            .new_clusters(node, file, gc, clusters, in_off..data_end)
            .await?;
        let buf = match self
            .with_old_around(node, file, start, total, in_off, data)
            .await
        {
            Ok(buf) => buf,
            Err(e) => {
                self.give_back(node, file, host, clusters).await;
                return Err(e);
            }
        };
        self.write_new_clusters(node, file, gc, clusters, host, buf, in_off..data_end)
            .await
    }

    /// Host clusters for `clusters` guest clusters from `gc` that get new ones (the guest's
    /// data at `data` in them): their L2 table made ready first, as QEMU does, then the
    /// clusters allocated; in an external data file, each guest cluster's own place.
    async fn new_clusters(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        clusters: u64,
        data: std::ops::Range<u64>,
    ) -> io::Result<u64> {
        self.mark_dirty_once(file).await?;
        let cs = self.cs();
        if self.data_edge(node).is_some() {
            return Ok(gc * cs);
        }
        let mut m = self.meta.lock().await;
        m.l2_for_write(file, gc).await?;
        let host = m.alloc(file, clusters).await?;
        // Damaged refcounts can hand out a cluster that holds metadata. The guest's data
        // first, as QEMU checks it (its range is what the corruption event reports).
        m.check_data(file, host + data.start, data.end - data.start)
            .await?;
        m.check_data(file, host, clusters * cs).await?;
        Ok(host)
    }

    /// Gives back `clusters` clusters at `host` that [`Qcow2Driver::new_clusters`] handed
    /// out for a write that failed (nothing maps them; nothing to give back in a data
    /// file, where each guest cluster has its own place).
    async fn give_back(&self, node: &Node, file: &Child, host: u64, clusters: u64) {
        if self.data_edge(node).is_none() {
            let mut m = self.meta.lock().await;
            m.free_now(file, host, clusters, FreeKind::Other).await;
        }
    }

    /// Writes `buf` (exactly `clusters` clusters, the guest's data at `data` in it) into
    /// the new host clusters at `host` and maps guest clusters from `gc` on to them.
    #[allow(clippy::too_many_arguments)]
    async fn write_new_clusters(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        clusters: u64,
        host: u64,
        buf: Vec<u8>,
        data: std::ops::Range<u64>,
    ) -> io::Result<()> {
        let cs = self.cs();
        let data_file = self.data_edge(node);
        let mut buf = buf;
        if let Some(c) = &self.crypto {
            c.cipher.encrypt(&mut buf, host / SECTOR);
        }
        file.debug_event("write_aio").await;
        if data.start > 0 || data.end < clusters * cs {
            // The old content around the data goes in the same write.
            file.debug_event("cow_write").await;
        }
        let written = data_file
            .as_deref()
            .unwrap_or(file)
            .write(host, buf, ReqFlags::empty())
            .await;
        if written.is_err() {
            self.give_back(node, file, host, clusters).await;
        }
        written?;
        let mut m = self.meta.lock().await;
        for k in 0..clusters {
            let (table, idx) = m.l2_for_write(file, gc + k).await?;
            let (old, _) = m.l2_entry(file, gc + k).await?;
            let bitmap = if self.extended { SUB_ALL_ALLOC } else { 0 };
            m.set_l2(table, idx, (host + k * cs) | COPIED, bitmap);
            // In a data file the old cluster, if any, is the one just written.
            if data_file.is_none() {
                self.release_old(&mut m, old, FreeKind::Other);
            }
        }
        self.maybe_write_back(file, &mut m).await
    }

    /// `len` guest bytes from `at`: `data` at `data_at` in them, the rest the old content
    /// (zeroes where it is known to read as zeroes). A pooled buffer, every byte written.
    async fn with_old_around(
        &self,
        node: &Node,
        file: &Child,
        at: u64,
        len: u64,
        data_at: u64,
        data: &[u8],
    ) -> io::Result<Vec<u8>> {
        let data_end = data_at + data.len() as u64;
        let mut buf = ferrite_block::io::pool::take(len as usize);
        if data_at > 0 || data_end < len {
            file.debug_event("cow_read").await;
        }
        for (from, to) in [(0, data_at), (data_end, len)] {
            if from >= to {
                continue;
            }
            let part = &mut buf[from as usize..to as usize];
            if self.known_zero(node, file, at + from, to - from).await? {
                part.fill(0);
            } else {
                let old = self
                    .read_guest(node, file, at + from, (to - from) as usize)
                    .await?;
                part.copy_from_slice(&old);
            }
        }
        buf[data_at as usize..data_end as usize].copy_from_slice(data);
        Ok(buf)
    }

    /// Extended L2: writes `data` at `in_off` of guest cluster `gc`, which has no host
    /// cluster yet, into a new one. Only the subclusters it touches are filled (their
    /// untouched parts from the old content) and become allocated; the others keep what
    /// they were (unallocated or zero), as QEMU leaves them.
    async fn write_new_subclusters(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        in_off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        self.mark_dirty_once(file).await?;
        let cs = self.cs();
        let scs = cs / 32;
        let end = in_off + data.len() as u64;
        let (first, last) = (in_off / scs, end.div_ceil(scs));
        let (from, to) = (first * scs, last * scs);
        let start = gc * cs;
        let data_file = self.data_edge(node);
        let host = if data_file.is_some() {
            start
        } else {
            let mut m = self.meta.lock().await;
            m.l2_for_write(file, gc).await?;
            let host = m.alloc(file, 1).await?;
            m.check_data(file, host + in_off, data.len() as u64).await?;
            m.check_data(file, host + from, to - from).await?;
            host
        };
        let old_around = self
            .with_old_around(node, file, start + from, to - from, in_off - from, data)
            .await;
        let written = match old_around {
            Ok(buf) => {
                file.debug_event("write_aio").await;
                if from < in_off || end < to {
                    file.debug_event("cow_write").await;
                }
                data_file
                    .as_deref()
                    .unwrap_or(file)
                    .write(host + from, buf, ReqFlags::empty())
                    .await
            }
            Err(e) => Err(e),
        };
        if written.is_err() {
            self.give_back(node, file, host, 1).await;
        }
        written?;
        let mut m = self.meta.lock().await;
        let (table, idx) = m.l2_for_write(file, gc).await?;
        let (_, bm) = m.l2_entry(file, gc).await?;
        let bitmap = entry::sub_set(bm, first as u32, last as u32, entry::Sub::Data);
        m.set_l2(table, idx, host | COPIED, bitmap);
        self.maybe_write_back(file, &mut m).await
    }

    /// Drops this layer's reference to what an L2 entry pointed to.
    pub(crate) fn release_old(&self, m: &mut Meta, old: u64, kind: FreeKind) {
        let cs = self.cs();
        match self.decode(old) {
            Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) }
                if self.data_file.is_some() =>
            {
                self.release_data_cluster(m, host, kind);
            }
            Cluster::Normal { host, .. } | Cluster::Zero { host: Some(host) } => {
                m.free(host, 1, kind);
            }
            Cluster::Compressed { offset, len } => {
                let (first, n) = entry::compressed_clusters(offset, len, cs);
                m.free(first, n, kind);
            }
            _ => {}
        }
    }

    pub(crate) async fn maybe_write_back(&self, file: &Child, m: &mut Meta) -> io::Result<()> {
        if m.frees_pending() >= MAX_PENDING_FREES {
            m.write_back(file, false).await?;
        }
        Ok(())
    }

    /// Extended L2: writes into an allocated cluster whose touched subclusters may not all
    /// be allocated yet; partial subclusters are completed from the old content.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn write_subclusters(
        &self,
        node: &Node,
        file: &Child,
        gc: u64,
        host: u64,
        bm: u64,
        in_off: u64,
        data: &[u8],
    ) -> io::Result<()> {
        let cs = self.cs();
        let scs = cs / 32;
        let end = in_off + data.len() as u64;
        let first = (in_off / scs) as u32;
        let last = (end.div_ceil(scs)) as u32;
        let all_data = (first..last).all(|i| entry::sub_state(bm, i) == entry::Sub::Data);
        let data_file = self.data_edge(node);
        {
            let mut m = self.meta.lock().await;
            m.check_data_cluster(file, gc, host)?;
            if data_file.is_none() {
                m.check_data(file, host + in_off, data.len() as u64).await?;
            }
        }
        let dst = data_file.as_deref().unwrap_or(file);
        if all_data {
            file.debug_event("write_aio").await;
            return dst
                .write(host + in_off, data.to_vec(), ReqFlags::empty())
                .await;
        }
        let from = u64::from(first) * scs;
        let to = u64::from(last) * scs;
        let mut buf = vec![0u8; (to - from) as usize];
        let start = gc * cs;
        if from < in_off {
            let old = self
                .read_guest(node, file, start + from, (in_off - from) as usize)
                .await?;
            buf[..old.len()].copy_from_slice(&old);
        }
        if end < to {
            let old = self
                .read_guest(node, file, start + end, (to - end) as usize)
                .await?;
            let at = (end - from) as usize;
            buf[at..].copy_from_slice(&old);
        }
        buf[(in_off - from) as usize..(end - from) as usize].copy_from_slice(data);
        file.debug_event("write_aio").await;
        dst.write(host + from, buf, ReqFlags::empty()).await?;
        let mut m = self.meta.lock().await;
        let (table, idx) = m.l2_for_write(file, gc).await?;
        let (e, bm) = m.l2_entry(file, gc).await?;
        m.set_l2(
            table,
            idx,
            e,
            entry::sub_set(bm, first, last, entry::Sub::Data),
        );
        Ok(())
    }

    /// With lazy refcounts, the dirty bit goes on disk before the first data cluster is
    /// allocated (where QEMU defers refcount updates).
    pub(crate) async fn mark_dirty_once(&self, file: &Child) -> io::Result<()> {
        if !self.lazy_refcounts || self.dirty_set.get() {
            return Ok(());
        }
        let mut m = self.meta.lock().await;
        if m.h.incompatible & incompat::DIRTY == 0 {
            m.h.incompatible |= incompat::DIRTY;
            m.write_header(file).await?;
            file.flush().await?;
        }
        self.dirty_set.set(true);
        Ok(())
    }
}
