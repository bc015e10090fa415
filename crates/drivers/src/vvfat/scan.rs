//! The disk QEMU makes of a host directory at open: every directory's entries (long
//! names, 8.3 names, times from the host), clusters handed out breadth-first in the order
//! the host lists each directory, the FAT chaining them, and where each cluster's bytes
//! come from.

use super::layout::{ENTRY, Fat, Layout};
use super::names::{LONG_NAME, checksum, fat_date_time, long_entries, short_name};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a cluster holds before the guest writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// Nothing: it reads as zeroes.
    Free,
    /// Cluster `cluster` of directory `dir`'s generated entries.
    Dir { dir: u32, cluster: u32 },
    /// Cluster `pos` of host file `file`.
    File { file: u32, pos: u32 },
}

/// A host file the disk shows.
#[derive(Clone, Debug)]
pub(crate) struct HostFile {
    pub(crate) path: PathBuf,
    /// Without any write permission on the host: the guest may not write it.
    pub(crate) read_only: bool,
    pub(crate) size: u64,
}

/// The disk as generated.
pub(crate) struct Scan {
    pub(crate) first_sectors: Vec<u8>,
    pub(crate) fat: Vec<u8>,
    pub(crate) dirs: Vec<Vec<u8>>,
    pub(crate) sources: Vec<Source>,
    pub(crate) files: Vec<HostFile>,
    /// Clusters of the root directory (from 0).
    pub(crate) root_clusters: u32,
}

/// A directory or non-empty file waiting for its clusters.
struct Pending {
    path: PathBuf,
    is_dir: bool,
    size: u64,
    read_only: bool,
    /// Its short entry: directory slot and entry index.
    entry: (usize, usize),
    /// The pending index of its directory.
    parent: usize,
}

/// Builds the disk for `root` (QEMU's `init_directories`).
///
/// # Errors
/// QEMU's texts: a directory that cannot be listed or holds a file over 2 GiB, a root with
/// too many entries, a tree too big for the FAT.
pub(crate) fn scan(layout: &Layout, root: &Path, label: &[u8; 11]) -> Result<Scan, String> {
    let mut dirs: Vec<Vec<[u8; ENTRY]>> = Vec::new();
    let mut volume = [0u8; ENTRY];
    volume[..11].copy_from_slice(label);
    volume[11] = 0x28;
    let mut pending = vec![Pending {
        path: root.to_owned(),
        is_dir: true,
        size: 0,
        read_only: false,
        entry: (0, 0),
        parent: 0,
    }];
    let mut begins: Vec<u32> = Vec::new();
    let mut fat = vec![0u8; layout.sectors_per_fat as usize * super::layout::SECTOR];
    let mut sources = vec![Source::Free; layout.cluster_count as usize];
    let mut files = Vec::new();
    let mut root_clusters = 0;
    let mut cluster = 0u32;
    let cs = layout.cluster_size() as u64;
    let mut i = 0;
    while i < pending.len() {
        let begin = cluster;
        let end;
        if pending[i].is_dir {
            let slot = dirs.len();
            dirs.push(if i == 0 { vec![volume] } else { Vec::new() });
            let parent_begin = (i > 0).then(|| begins[pending[i].parent]);
            let children = read_directory(
                layout,
                &pending[i].path,
                (i, slot),
                &mut dirs,
                begin,
                parent_begin,
            )?;
            pending.extend(children);
            end = begin + (dirs[slot].len() / layout.entries_per_cluster()) as u32;
            for (k, c) in (begin..end.min(layout.cluster_count)).enumerate() {
                sources[c as usize] = Source::Dir {
                    dir: slot as u32,
                    cluster: k as u32,
                };
            }
            if i == 0 {
                root_clusters = end;
            }
        } else {
            end = begin + 1 + ((pending[i].size - 1) / cs) as u32;
            let file = files.len() as u32;
            files.push(HostFile {
                path: pending[i].path.clone(),
                read_only: pending[i].read_only,
                size: pending[i].size,
            });
            for (k, c) in (begin..end.min(layout.cluster_count)).enumerate() {
                sources[c as usize] = Source::File {
                    file,
                    pos: k as u32,
                };
            }
        }
        begins.push(begin);
        if i > 0 {
            let (slot, index) = pending[i].entry;
            set_begin(&mut dirs[slot][index], begin);
        }
        cluster = end;
        if cluster > layout.cluster_count {
            return Err(format!(
                "Directory does not fit in FAT{} (capacity {:.2} MB)",
                layout.fat.bits(),
                (layout.total_sectors() - u64::from(layout.boot_sector)) as f64 / 2000.0
            ));
        }
        // The root directory has no chain (MS-DOS expects its FAT entries zero).
        if i > 0 {
            let mut table = Fat {
                kind: layout.fat,
                bytes: &mut fat,
            };
            for c in begin..end - 1 {
                table.set(c, c + 1);
            }
            table.set(end - 1, layout.fat.max());
        }
        i += 1;
    }
    let mut table = Fat {
        kind: layout.fat,
        bytes: &mut fat,
    };
    table.set(0, layout.fat.max());
    table.set(1, layout.fat.max());
    fat[0] = layout.media();
    Ok(Scan {
        first_sectors: layout.first_sectors(label),
        fat,
        dirs: dirs.into_iter().map(|d| d.concat()).collect(),
        sources,
        files,
        root_clusters,
    })
}

fn set_begin(e: &mut [u8; ENTRY], begin: u32) {
    e[26..28].copy_from_slice(&(begin as u16).to_le_bytes());
    e[20..22].copy_from_slice(&((begin >> 16) as u16).to_le_bytes());
}

/// Fills an entry's attributes, times and size from `meta`.
fn describe(e: &mut [u8; ENTRY], meta: &std::fs::Metadata) {
    e[11] = if meta.is_dir() { 0x10 } else { 0x20 };
    let (cdate, ctime) = fat_date_time(meta.ctime());
    let (adate, _) = fat_date_time(meta.atime());
    let (mdate, mtime) = fat_date_time(meta.mtime());
    e[14..16].copy_from_slice(&ctime.to_le_bytes());
    e[16..18].copy_from_slice(&cdate.to_le_bytes());
    e[18..20].copy_from_slice(&adate.to_le_bytes());
    e[22..24].copy_from_slice(&mtime.to_le_bytes());
    e[24..26].copy_from_slice(&mdate.to_le_bytes());
    let size = if meta.is_dir() { 0 } else { meta.len() as u32 };
    e[28..32].copy_from_slice(&size.to_le_bytes());
}

/// Lists directory `path` (pending entry `index`) into `dirs[slot]` (QEMU's
/// `read_directory`) and returns the children that need clusters.
fn read_directory(
    layout: &Layout,
    path: &Path,
    (index, slot): (usize, usize),
    dirs: &mut [Vec<[u8; ENTRY]>],
    begin: u32,
    parent_begin: Option<u32>,
) -> Result<Vec<Pending>, String> {
    let cannot = || format!("Could not read directory {}", path.display());
    let list = std::fs::read_dir(path).map_err(|_| cannot())?;
    let is_root = parent_begin.is_none();
    let entries = &mut dirs[slot];
    if let Some(parent_begin) = parent_begin {
        for (name, target, cluster) in [(".", ".", begin), ("..", "..", parent_begin)] {
            let mut e = [0u8; ENTRY];
            e[..11].copy_from_slice(&[b' '; 11]);
            e[..name.len()].copy_from_slice(name.as_bytes());
            if let Ok(meta) = std::fs::metadata(path.join(target)) {
                describe(&mut e, &meta);
                set_begin(&mut e, cluster);
            }
            entries.push(e);
        }
    }
    let mut children = Vec::new();
    for item in list {
        if is_root && entries.len() >= layout.root_entries as usize - 1 {
            eprintln!("Too many entries in root directory");
            return Err(cannot());
        }
        let Ok(item) = item else { continue };
        let os_name = item.file_name();
        let Some(name) = os_name.to_str() else {
            eprintln!("vvfat: invalid UTF-8 name: {}", os_name.to_string_lossy());
            continue;
        };
        let child = path.join(name);
        let Ok(meta) = std::fs::metadata(&child) else {
            continue;
        };
        let taken: Vec<[u8; 11]> = entries
            .iter()
            .filter(|e| e[11] != LONG_NAME)
            .map(|e| e[..11].try_into().unwrap_or([0; 11]))
            .collect();
        let Some(short) = short_name(name, &taken) else {
            return Err(cannot());
        };
        let sum = checksum(&short);
        for mut long in long_entries(name) {
            long[13] = sum;
            entries.push(long);
        }
        let mut e = [0u8; ENTRY];
        e[..11].copy_from_slice(&short);
        describe(&mut e, &meta);
        if !meta.is_dir() && meta.len() > 0x7fff_ffff {
            eprintln!("File {} is larger than 2GB", child.display());
            return Err(cannot());
        }
        entries.push(e);
        if meta.is_dir() || meta.len() > 0 {
            children.push(Pending {
                path: child,
                is_dir: meta.is_dir(),
                size: meta.len(),
                read_only: meta.mode() & 0o222 == 0,
                entry: (slot, entries.len() - 1),
                parent: index,
            });
        }
    }
    let per_cluster = layout.entries_per_cluster();
    let padded = entries.len().div_ceil(per_cluster) * per_cluster;
    entries.resize(padded, [0u8; ENTRY]);
    if is_root && layout.fat != super::layout::FatType::Fat32 {
        let root = layout.root_entries as usize;
        if entries.len() < root {
            entries.resize(root, [0u8; ENTRY]);
        }
    }
    Ok(children)
}
