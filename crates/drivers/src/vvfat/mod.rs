//! `vvfat`: a host directory as a FAT disk (QEMU's `block/vvfat.c`), built as QEMU builds
//! it so that the guest sees the same sectors: a hard disk with an MBR (FAT16 by default,
//! FAT12 or FAT32) or a floppy, 8 KiB clusters, long and 8.3 names, host times.
//!
//! With `rw` the guest may write, and what it writes reaches the directory: new, renamed,
//! grown, truncated and deleted files and directories (see `disk.rs`). QEMU keeps the
//! guest's writes in a temporary qcow image it attaches as child `write-target`; ferrite
//! keeps them in memory only until the host files hold them, so the node has no child.

mod commit;
mod disk;
mod layout;
mod names;
mod scan;
mod tree;

use crate::error::generic;
use disk::Disk;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use ferrite_qobject::QDict;
use layout::{FatType, Layout, SECTOR};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// The options that say what the disk is (QEMU's strong runtime options).
const OPTIONS: [&str; 5] = ["dir", "fat-type", "floppy", "label", "rw"];

pub(crate) struct VvfatFactory;

impl DriverFactory for VvfatFactory {
    fn name(&self) -> &'static str {
        "vvfat"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn parse_filename(&self, _name: &str) -> Option<ferrite_block::Result<QDict>> {
        // A `fat:` name is read as its prefix says; no other name describes a directory.
        Some(Err(generic("File name string must start with 'fat:'")))
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let dir = opts
                .opt_str("dir")
                .ok_or_else(|| generic("vvfat block driver requires a 'dir' option"))?
                .to_owned();
            // QEMU keeps the number in a C `int`: only its low 32 bits count.
            let bits = opts.opt_i64("fat-type").unwrap_or(0) as i32;
            let fat = FatType::from_option(i64::from(bits));
            let floppy = opts.bool_or("floppy", false);
            let mut label = [b' '; 11];
            match opts.opt_str("label") {
                Some(l) if l.len() > 11 => {
                    return Err(generic("vvfat label cannot be longer than 11 bytes"));
                }
                Some(l) => label[..l.len()].copy_from_slice(l.as_bytes()),
                None => label[..10].copy_from_slice(b"QEMU VVFAT"),
            }
            let Some(fat) = fat else {
                return Err(generic("Valid FAT types are only 12, 16 and 32"));
            };
            if fat == Some(FatType::Fat32) {
                ferrite_block::report::warn_report(
                    "FAT32 has not been tested. You are welcome to do so!",
                );
            }
            let rw = opts.bool_or("rw", false);
            if rw {
                if ctx.settings().read_only {
                    return Err(generic(
                        "Unable to set VVFAT to 'rw' when drive is read-only",
                    ));
                }
            } else {
                ctx.apply_auto_read_only(|| ferrite_block::Error::ImageReadOnly)?;
            }
            let mut options = QDict::new();
            for key in OPTIONS {
                if let Some(v) = opts.get(key) {
                    options.insert(key, v.clone());
                }
            }
            let blocker = rw.then(|| {
                format!(
                    "The vvfat (rw) format used by node '{}' does not support live migration",
                    ctx.node_name()
                )
            });
            let layout = Layout::new(fat, floppy);
            let root = PathBuf::from(
                dir.strip_suffix('/')
                    .filter(|d| !d.is_empty())
                    .unwrap_or(&dir),
            );
            let disk = tokio::task::spawn_blocking(move || {
                let scan = scan::scan(&layout, &root, &label)?;
                Disk::new(layout, root, scan, rw)
            })
            .await
            .map_err(|e| generic(e.to_string()))?
            .map_err(generic)?;
            Ok(Box::new(VvfatDriver {
                len: disk.len(),
                disk: Arc::new(RwLock::new(disk)),
                gate: tokio::sync::RwLock::new(()),
                options,
                blocker,
            }) as Box<dyn Driver>)
        })
    }
}

struct VvfatDriver {
    len: u64,
    /// Used off the main loop, on the blocking pool: reads side by side, a write alone.
    disk: Arc<RwLock<Disk>>,
    /// Admits requests in that order (QEMU serialises all of them under one lock).
    gate: tokio::sync::RwLock<()>,
    options: QDict,
    blocker: Option<String>,
}

/// The disk behind `lock`, also after a request panicked while holding it.
fn shared(lock: &RwLock<Disk>) -> std::sync::RwLockReadGuard<'_, Disk> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn exclusive(lock: &RwLock<Disk>) -> std::sync::RwLockWriteGuard<'_, Disk> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl VvfatDriver {
    /// Runs `op` on the disk alone, in a blocking thread.
    async fn with_disk<R, F>(&self, op: F) -> io::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Disk) -> io::Result<R> + Send + 'static,
    {
        let _alone = self.gate.write().await;
        let disk = Arc::clone(&self.disk);
        tokio::task::spawn_blocking(move || op(&mut exclusive(&disk)))
            .await
            .map_err(io::Error::other)?
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        let aligned = offset % SECTOR as u64 == 0 && len % SECTOR as u64 == 0;
        if !aligned || offset + len > self.len {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(())
    }
}

impl Driver for VvfatDriver {
    fn format_name(&self) -> &'static str {
        "vvfat"
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn len(&self, _node: &Node) -> u64 {
        self.len
    }

    fn request_alignment(&self, _node: &Node) -> u64 {
        SECTOR as u64
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.check(offset, len as u64)?;
            let _beside_reads = self.gate.read().await;
            let sector = offset / SECTOR as u64;
            let mut buf = ferrite_block::io::pool::take(len);
            // What memory and the page cache hold is read here, as the file driver reads.
            if len <= ferrite_block::io::NOWAIT_MAX
                && shared(&self.disk).read_cached(sector, &mut buf)?
            {
                return Ok(buf);
            }
            let disk = Arc::clone(&self.disk);
            tokio::task::spawn_blocking(move || shared(&disk).read(sector, &mut buf).map(|()| buf))
                .await
                .map_err(io::Error::other)?
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.check(offset, data.len() as u64)?;
            self.with_disk(move |d| d.write(offset / SECTOR as u64, &data))
                .await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(ferrite_block::driver::write_zeroes_as_data(
            offset,
            len,
            flags,
            move |at, data| self.write(node, at, data, ReqFlags::empty()),
        ))
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(self.with_disk(Disk::flush))
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move { Ok(Extent::data(len)) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn strong_options(&self) -> QDict {
        self.options.clone()
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    fn migration_blocker(&self) -> Option<&str> {
        self.blocker.as_deref()
    }

    fn reopen_check(&self, node: &Node, opts: &ferrite_qapi::Args) -> ferrite_block::Result<()> {
        ferrite_block::driver::check_unchanged(
            opts,
            &ferrite_qapi::Args::new(node.options()),
            &OPTIONS,
        )
    }
}
