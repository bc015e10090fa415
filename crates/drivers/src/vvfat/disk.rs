//! The virtual disk: the generated sectors, what the guest wrote over them, and, for a
//! writable disk, the commit of each write to the host directory.
//!
//! What the guest writes is kept by sector until it reaches the host. A write that only
//! changes the data of files already on the host goes straight to them; any other write
//! (the FAT, a directory, a cluster no file holds yet) makes the tree be read again and,
//! if it is consistent, committed: files and directories created, renamed, written,
//! truncated and deleted. A file's sectors are then dropped, since the host file holds
//! them; the FAT's and directories' stay.
//!
//! Everything here may block on the host's file system, except `Disk::read_cached`; the
//! driver runs the rest off the main loop.

use super::commit;
use super::layout::{Layout, SECTOR};
use super::scan::{HostFile, Scan, Source};
use super::tree::{self, Item};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

pub(crate) struct Disk {
    layout: Layout,
    root: PathBuf,
    first_sectors: Vec<u8>,
    fat: Vec<u8>,
    dirs: Vec<Vec<u8>>,
    root_clusters: u32,
    /// What each cluster held when generated, for the directories' clusters.
    generated: Vec<Source>,
    sources: Vec<Source>,
    files: Vec<HostFile>,
    /// Sectors the guest wrote that the host does not hold.
    written: BTreeMap<u64, Box<[u8]>>,
    /// The tree the host shows.
    tree: Vec<Item>,
    /// Clusters of the tree's directories (the root's included).
    dir_clusters: Vec<bool>,
    /// A write left the tree inconsistent: the next write reads it again whatever it
    /// touches.
    pending: bool,
    writable: bool,
    /// The host file last read, kept open.
    open: std::sync::Mutex<Option<(u32, Arc<File>)>>,
    /// Files and directories changed since the last flush.
    unsynced: BTreeSet<PathBuf>,
}

/// Why a write is refused, in QEMU's words on standard error.
fn refuse(why: &str) -> io::Error {
    eprintln!("{why}");
    io::Error::from_raw_os_error(libc::EPERM)
}

impl Disk {
    pub(crate) fn new(
        layout: Layout,
        root: PathBuf,
        scan: Scan,
        writable: bool,
    ) -> Result<Disk, String> {
        let mut disk = Disk {
            root,
            first_sectors: scan.first_sectors,
            fat: scan.fat,
            dirs: scan.dirs,
            root_clusters: scan.root_clusters,
            generated: scan
                .sources
                .iter()
                .map(|s| match s {
                    Source::Dir { .. } => *s,
                    _ => Source::Free,
                })
                .collect(),
            sources: scan.sources,
            files: scan.files,
            written: BTreeMap::new(),
            tree: Vec::new(),
            dir_clusters: Vec::new(),
            pending: false,
            writable,
            open: std::sync::Mutex::new(None),
            unsynced: BTreeSet::new(),
            layout,
        };
        if writable {
            disk.tree = disk.read_tree().map_err(|e| format!("vvfat: {}", e.0))?;
            disk.dir_clusters = disk.dir_clusters_of(&disk.tree);
        }
        Ok(disk)
    }

    pub(crate) fn len(&self) -> u64 {
        self.layout.total_sectors() * SECTOR as u64
    }

    /// Reads `out.len() / 512` sectors from `sector`: a run of sectors of one host file,
    /// in order and not written over, in one read.
    pub(crate) fn read(&self, sector: u64, out: &mut [u8]) -> io::Result<()> {
        self.read_with(sector, out, false).map(|_| ())
    }

    /// [`Disk::read`] if the page cache holds every byte it needs from the host, without
    /// blocking; false (and `out` partly filled) where it does not.
    pub(crate) fn read_cached(&self, sector: u64, out: &mut [u8]) -> io::Result<bool> {
        self.read_with(sector, out, true)
    }

    fn read_with(&self, sector: u64, out: &mut [u8], nowait: bool) -> io::Result<bool> {
        let count = (out.len() / SECTOR) as u64;
        let mut i = 0;
        while i < count {
            let s = sector + i;
            let at = i as usize * SECTOR;
            let (run, complete) = match self.file_place(s) {
                Some((file, offset)) => {
                    let mut n = 1;
                    while i + n < count
                        && self.file_place(s + n) == Some((file, offset + n * SECTOR as u64))
                    {
                        n += 1;
                    }
                    let dest = &mut out[at..at + n as usize * SECTOR];
                    (n, self.read_file(file, offset, dest, nowait)?)
                }
                None => (1, self.read_sector(s, &mut out[at..at + SECTOR], nowait)?),
            };
            if !complete {
                return Ok(false);
            }
            i += run;
        }
        Ok(true)
    }

    /// The host file and offset a sector reads from, if it reads from one.
    fn file_place(&self, sector: u64) -> Option<(u32, u64)> {
        if self.written.contains_key(&sector) {
            return None;
        }
        self.file_offset(sector)
    }

    fn read_sector(&self, sector: u64, out: &mut [u8], nowait: bool) -> io::Result<bool> {
        if let Some(data) = self.written.get(&sector) {
            out.copy_from_slice(data);
            return Ok(true);
        }
        out.fill(0);
        let l = &self.layout;
        if sector < u64::from(l.first_fat) {
            let at = sector as usize * SECTOR;
            out.copy_from_slice(&self.first_sectors[at..at + SECTOR]);
        } else if sector < u64::from(l.root_dir) {
            // Both FATs read from the one table.
            let at = ((sector - u64::from(l.first_fat)) % u64::from(l.sectors_per_fat)) as usize
                * SECTOR;
            out.copy_from_slice(&self.fat[at..at + SECTOR]);
        } else if let Some((cluster, s)) = l.cluster_of(sector) {
            match self
                .sources
                .get(cluster as usize)
                .copied()
                .unwrap_or(Source::Free)
            {
                Source::Free => {}
                Source::Dir { dir, cluster: k } => {
                    let at = k as usize * l.cluster_size() + s * SECTOR;
                    if let Some(b) = self.dirs[dir as usize].get(at..at + SECTOR) {
                        out.copy_from_slice(b);
                    }
                }
                Source::File { file, pos } => {
                    let offset = u64::from(pos) * l.cluster_size() as u64 + (s * SECTOR) as u64;
                    return self.read_file(file, offset, out, nowait);
                }
            }
        }
        Ok(true)
    }

    /// Reads host file `file` at `offset` into all of `out`; past its end reads zeroes, and
    /// so does a file gone from the host (QEMU's "LATER TODO: strict"). With `nowait`, only
    /// what the page cache holds: false (`out` partly filled) if that was not all.
    fn read_file(&self, file: u32, offset: u64, out: &mut [u8], nowait: bool) -> io::Result<bool> {
        let f = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match &*open {
                Some((n, f)) if *n == file => Arc::clone(f),
                _ => match File::open(&self.files[file as usize].path) {
                    Ok(f) => {
                        let f = Arc::new(f);
                        *open = Some((file, Arc::clone(&f)));
                        f
                    }
                    Err(_) => {
                        out.fill(0);
                        return Ok(true);
                    }
                },
            }
        };
        let mut done = 0;
        while done < out.len() {
            let got = if nowait {
                match ferrite_block::io::read_cached(&f, offset + done as u64, &mut out[done..])? {
                    // The file ends: the rest reads as zeroes.
                    (n, true) => {
                        out[done + n..].fill(0);
                        return Ok(true);
                    }
                    (0, false) => return Ok(false),
                    (n, false) => n,
                }
            } else {
                match f.read_at(&mut out[done..], offset + done as u64) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            };
            if got == 0 {
                out[done..].fill(0);
                break;
            }
            done += got;
        }
        Ok(true)
    }

    /// Writes `data` (whole sectors) at `sector` and commits what it changed.
    pub(crate) fn write(&mut self, sector: u64, data: &[u8]) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EACCES));
        }
        *self.open.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        let l = &self.layout;
        let count = (data.len() / SECTOR) as u64;
        if sector == u64::from(l.boot_sector) && count == 1 {
            // Only the byte where systems mark the volume dirty may change.
            let at = sector as usize * SECTOR;
            let boot = &mut self.first_sectors[at..at + SECTOR];
            let dirty = Layout::DIRTY_BYTE;
            if boot
                .iter()
                .zip(data)
                .enumerate()
                .any(|(i, (a, b))| i != dirty && a != b)
            {
                return Err(refuse("Tried to write to protected bootsector"));
            }
            boot[dirty] = data[dirty];
            return Ok(());
        }
        if sector < u64::from(l.first_fat) {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        let clusters = self.clusters_of(sector, count);
        for &c in &clusters {
            if let Some(Source::File { file, .. }) = self.sources.get(c as usize) {
                let f = &self.files[*file as usize];
                if f.read_only {
                    return Err(refuse(&format!(
                        "Tried to write to write-protected file {}",
                        f.path.display()
                    )));
                }
            }
        }
        let metadata = (sector..sector + count).any(|s| self.layout.in_first_fat(s))
            || clusters
                .iter()
                .any(|&c| self.dir_clusters.get(c as usize).copied().unwrap_or(false));
        if self.pending || metadata {
            self.keep(sector, data);
            self.commit();
        } else {
            self.write_through(sector, data);
        }
        Ok(())
    }

    /// Keeps sectors the host does not hold (yet).
    fn keep(&mut self, sector: u64, data: &[u8]) {
        for (i, chunk) in data.chunks_exact(SECTOR).enumerate() {
            self.written.insert(sector + i as u64, chunk.into());
        }
    }

    /// Makes what reached the host durable (QEMU's driver has no flush: the guest's data
    /// stays in the host's page cache).
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        while let Some(path) = self.unsynced.pop_first() {
            match File::open(&path).and_then(|f| f.sync_all()) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    self.unsynced.insert(path);
                    return Err(e);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The data-area clusters sectors `sector..sector + count` touch.
    fn clusters_of(&self, sector: u64, count: u64) -> Vec<u32> {
        let l = &self.layout;
        let first = l.cluster_of(sector).map(|(c, _)| c);
        let last = l.cluster_of(sector + count - 1).map(|(c, _)| c);
        match (first, last) {
            (Some(a), Some(b)) => (a..=b).collect(),
            (None, Some(b)) => (0..=b).collect(),
            _ => Vec::new(),
        }
    }

    /// The sectors of `cluster` the host does not hold yet.
    fn written_in(&self, cluster: u32) -> Vec<usize> {
        let first = self.layout.first_sector_of(cluster);
        let n = u64::from(self.layout.sectors_per_cluster());
        self.written
            .range(first..first + n)
            .map(|(s, _)| (s - first) as usize)
            .collect()
    }

    /// A write that leaves the tree as it is: runs of sectors inside one file go into it
    /// at once; the rest (free clusters, past a file's end, a file that cannot be written)
    /// is kept.
    fn write_through(&mut self, sector: u64, data: &[u8]) {
        let count = (data.len() / SECTOR) as u64;
        let mut i = 0;
        while i < count {
            let Some((file, offset)) = self.inside_file(sector + i) else {
                let at = i as usize * SECTOR;
                let one = &data[at..at + SECTOR];
                // The sector a file ends in: its bytes up to the end reach the file.
                if let Some((file, offset)) = self.file_offset(sector + i) {
                    let host = &self.files[file as usize];
                    if offset < host.size {
                        let len = (host.size - offset) as usize;
                        self.write_host(file, offset, &one[..len]);
                    }
                }
                self.keep(sector + i, one);
                i += 1;
                continue;
            };
            let mut n = 1;
            while i + n < count
                && self.inside_file(sector + i + n) == Some((file, offset + n * SECTOR as u64))
            {
                n += 1;
            }
            let at = i as usize * SECTOR;
            let run = &data[at..at + n as usize * SECTOR];
            if self.write_host(file, offset, run) {
                for s in sector + i..sector + i + n {
                    self.written.remove(&s);
                }
            } else {
                self.keep(sector + i, run);
            }
            i += n;
        }
    }

    /// Writes `data` at `offset` of host file `file`; false (reported) if it failed.
    fn write_host(&mut self, file: u32, offset: u64, data: &[u8]) -> bool {
        let host = &self.files[file as usize];
        let result = std::fs::OpenOptions::new()
            .write(true)
            .open(&host.path)
            .and_then(|f| f.write_all_at(data, offset));
        self.unsynced.insert(host.path.clone());
        if let Err(e) = result {
            eprintln!("vvfat: could not write {}: {e}", host.path.display());
            return false;
        }
        true
    }

    /// The host file and offset of a sector wholly inside a file (one the file ends in or
    /// past its end has bytes the host does not store).
    fn inside_file(&self, sector: u64) -> Option<(u32, u64)> {
        self.file_offset(sector)
            .filter(|&(file, offset)| offset + SECTOR as u64 <= self.files[file as usize].size)
    }

    /// The host file and offset a sector's cluster maps it to.
    fn file_offset(&self, sector: u64) -> Option<(u32, u64)> {
        let (cluster, s) = self.layout.cluster_of(sector)?;
        match self.sources.get(cluster as usize)? {
            Source::File { file, pos } => Some((
                *file,
                u64::from(*pos) * self.layout.cluster_size() as u64 + (s * SECTOR) as u64,
            )),
            _ => None,
        }
    }

    fn read_tree(&mut self) -> Result<Vec<Item>, tree::Inconsistent> {
        let layout = self.layout.clone();
        let root_clusters = self.root_clusters;
        tree::read(&layout, root_clusters, &mut TreeView::new(self))
    }

    /// Reads the tree again and, if consistent, makes the host show it.
    fn commit(&mut self) {
        let new = match self.read_tree() {
            Ok(t) => t,
            Err(e) => {
                tracing::debug!("vvfat: not committing yet: {}", e.0);
                self.pending = true;
                return;
            }
        };
        self.pending = false;
        let plan = commit::plan(&self.layout, &self.tree, &new, &|c| self.written_in(c));
        if !plan.is_empty() {
            let mut data = Vec::new();
            for w in &plan.writes {
                for p in &w.pieces {
                    let mut b = vec![0u8; SECTOR];
                    if let Err(e) = self.read(p.sector, &mut b) {
                        eprintln!("vvfat: could not read sector {}: {e}", p.sector);
                    }
                    data.push(b);
                }
            }
            *self.open.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
            let failed = commit::apply(&self.root, &plan, &data);
            self.unsynced
                .extend(plan.changed_paths().iter().map(|p| self.root.join(p)));
            self.adopt(new, &failed);
        } else {
            self.adopt(new, &[]);
        }
    }

    /// Takes `tree` as what the host shows: each cluster now reads from the file that
    /// holds it, and sectors the host holds are forgotten (except those of files that
    /// could not be written).
    fn adopt(&mut self, tree: Vec<Item>, failed: &[String]) {
        let read_only: std::collections::HashMap<PathBuf, bool> = self
            .files
            .iter()
            .map(|f| (f.path.clone(), f.read_only))
            .collect();
        self.sources.clone_from(&self.generated);
        self.files.clear();
        let cs = self.layout.cluster_size() as u64;
        let spc = u64::from(self.layout.sectors_per_cluster());
        for item in tree.iter().filter(|i| !i.is_dir && !i.chain.is_empty()) {
            let path = self.root.join(&item.path);
            let file = self.files.len() as u32;
            self.files.push(HostFile {
                read_only: read_only.get(&path).copied().unwrap_or(false),
                path,
                size: u64::from(item.size),
            });
            let keep = failed.contains(&item.path);
            for (pos, &c) in item.chain.iter().enumerate() {
                if let Some(s) = self.sources.get_mut(c as usize) {
                    *s = Source::File {
                        file,
                        pos: pos as u32,
                    };
                }
                if !keep {
                    let first = self.layout.first_sector_of(c);
                    // Sectors wholly inside the file; the one it ends in stays.
                    let inside = (u64::from(item.size) - pos as u64 * cs) / SECTOR as u64;
                    let last = first + spc.min(inside);
                    let gone: Vec<u64> = self.written.range(first..last).map(|(s, _)| *s).collect();
                    for s in gone {
                        self.written.remove(&s);
                    }
                }
            }
        }
        self.dir_clusters = self.dir_clusters_of(&tree);
        self.tree = tree;
    }

    fn dir_clusters_of(&self, tree: &[Item]) -> Vec<bool> {
        let mut out = vec![false; self.layout.cluster_count as usize];
        for c in (0..self.root_clusters).chain(
            tree.iter()
                .filter(|i| i.is_dir)
                .flat_map(|i| i.chain.iter().copied()),
        ) {
            if let Some(b) = out.get_mut(c as usize) {
                *b = true;
            }
        }
        out
    }
}

/// The disk as the tree reader sees it: the first FAT with the guest's writes over it.
struct TreeView<'a> {
    disk: &'a mut Disk,
    fat: Vec<u8>,
}

impl<'a> TreeView<'a> {
    fn new(disk: &'a mut Disk) -> TreeView<'a> {
        let mut fat = disk.fat.clone();
        let first = u64::from(disk.layout.first_fat);
        let end = first + u64::from(disk.layout.sectors_per_fat);
        for (s, data) in disk.written.range(first..end) {
            let at = (s - first) as usize * SECTOR;
            fat[at..at + SECTOR].copy_from_slice(data);
        }
        TreeView { disk, fat }
    }
}

impl tree::Disk for TreeView<'_> {
    fn fat(&self) -> &[u8] {
        &self.fat
    }

    fn cluster(&mut self, cluster: u32) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; self.disk.layout.cluster_size()];
        let first = self.disk.layout.first_sector_of(cluster);
        self.disk.read(first, &mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vvfat::layout::FatType;
    use crate::vvfat::scan::scan;
    use std::path::Path;

    /// A scratch directory of its own under the system's temporary directory.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferrite-vvfat-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    }

    fn populate(root: &Path) {
        std::fs::create_dir_all(root.join("sub/deeper")).expect("mkdir");
        std::fs::write(root.join("file0.txt"), "Hello, world! 0\n").expect("write");
        std::fs::write(root.join("big.bin"), vec![7u8; 20000]).expect("write");
        std::fs::write(root.join("sub/deeper/inner"), "inner").expect("write");
        std::fs::write(root.join("A long name.text"), "long").expect("write");
    }

    fn disk(root: &Path, fat: FatType) -> Disk {
        let layout = Layout::new(Some(fat), false);
        let s = scan(&layout, root, b"QEMU VVFAT ").expect("scan");
        Disk::new(layout, root.to_owned(), s, true).expect("disk")
    }

    /// Every path under `root`, sorted.
    fn listing(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_owned()];
        while let Some(dir) = todo.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push(e.path());
                }
                out.push(e.path());
            }
        }
        out.sort();
        out
    }

    /// xorshift64: the same sequence on every run.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn the_generated_tree_reads_back_as_the_host_holds_it() {
        let top = scratch("tree");
        let root = top.join("dir");
        populate(&root);
        for fat in [FatType::Fat12, FatType::Fat16, FatType::Fat32] {
            let d = disk(&root, fat);
            let paths: Vec<&str> = d.tree.iter().map(|i| i.path.as_str()).collect();
            assert_eq!(
                paths,
                [
                    "A long name.text",
                    "big.bin",
                    "file0.txt",
                    "sub",
                    "sub/deeper",
                    "sub/deeper/inner"
                ]
            );
        }
        std::fs::remove_dir_all(&top).expect("cleanup");
    }

    /// Random writes over the FAT, the root directory and the first clusters, some of
    /// them sectors as they are with a few bytes changed: nothing panics, nothing outside
    /// the directory changes, and the disk keeps reading.
    #[test]
    fn scribbled_metadata_stays_inside_the_directory() {
        let top = scratch("scribble");
        let root = top.join("dir");
        let outside = top.join("outside");
        std::fs::write(&outside, "keep").expect("write");
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut changed = 0;
        for round in 0..20 {
            let _ = std::fs::remove_dir_all(&root);
            populate(&root);
            let before = listing(&root);
            let mut d = disk(
                &root,
                if round % 2 == 0 {
                    FatType::Fat16
                } else {
                    FatType::Fat12
                },
            );
            let lo = u64::from(d.layout.first_fat);
            let hi = d.layout.first_sector_of(12);
            for _ in 0..200 {
                let sector = lo + next(&mut state) % (hi - lo);
                let mut data = vec![0u8; SECTOR];
                d.read(sector, &mut data).expect("read");
                if next(&mut state) % 4 == 0 {
                    data.iter_mut().for_each(|b| *b = next(&mut state) as u8);
                } else {
                    for _ in 0..1 + next(&mut state) % 8 {
                        let at = (next(&mut state) % SECTOR as u64) as usize;
                        data[at] = next(&mut state) as u8;
                    }
                }
                let _ = d.write(sector, &data);
                let mut back = vec![0u8; SECTOR];
                d.read(sector, &mut back).expect("read back");
                assert_eq!(back, data);
            }
            let _ = d.flush();
            changed += usize::from(listing(&root) != before);
        }
        // The writes did reach the host (renames, deletions, new files).
        assert!(changed > 0);
        assert_eq!(std::fs::read_to_string(&outside).expect("outside"), "keep");
        let entries: Vec<_> = std::fs::read_dir(&top)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        std::fs::remove_dir_all(&top).expect("cleanup");
    }
}
