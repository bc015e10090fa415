//! The file tree a guest has left on the disk: every directory read through its FAT chain,
//! every file's chain and size, checked for consistency before anything reaches the host
//! (QEMU's `is_consistent`). A disk in the middle of an update (an entry naming a chain
//! not yet written, two entries sharing clusters) is not consistent and is left as it is
//! until a later write completes it.

use super::layout::{ENTRY, FatType, Layout};
use super::names::{LONG_NAME, LongName, host_name_of_short, is_free};
use std::collections::HashSet;

/// A file or directory of the tree, named by its path under the exported directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Item {
    /// `/`-separated, without a leading `/`.
    pub(crate) path: String,
    pub(crate) is_dir: bool,
    /// The clusters holding it: a directory's whole chain, the ones a file's size needs.
    pub(crate) chain: Vec<u32>,
    pub(crate) size: u32,
}

impl Item {
    /// The first cluster, where it has one: what identifies it across renames.
    pub(crate) fn first(&self) -> Option<u32> {
        self.chain.first().copied()
    }
}

/// Why the tree cannot be read now.
#[derive(Debug)]
pub(crate) struct Inconsistent(pub(crate) String);

/// What the tree is read from.
pub(crate) trait Disk {
    /// The first FAT as the guest left it.
    fn fat(&self) -> &[u8];
    /// The bytes of a cluster.
    fn cluster(&mut self, cluster: u32) -> std::io::Result<Vec<u8>>;
}

/// Reads the tree in pre-order (every directory before what it holds).
///
/// # Errors
/// Where the disk is not consistent.
pub(crate) fn read(
    layout: &Layout,
    root_clusters: u32,
    disk: &mut dyn Disk,
) -> Result<Vec<Item>, Inconsistent> {
    let mut used = vec![false; layout.cluster_count as usize];
    for u in used.iter_mut().take(root_clusters as usize) {
        *u = true;
    }
    let mut reader = Reader {
        kind: layout.fat,
        first_data: root_clusters,
        cluster_count: layout.cluster_count,
        cluster_size: layout.cluster_size(),
        used,
    };
    let mut items = Vec::new();
    // Directories to read: the index of their item (None for the root) and their chain.
    let mut stack: Vec<(Option<usize>, Vec<u32>)> = vec![(None, (0..root_clusters).collect())];
    while let Some((dir, chain)) = stack.pop() {
        let mut bytes = Vec::with_capacity(chain.len() * layout.cluster_size());
        for &c in &chain {
            let data = disk
                .cluster(c)
                .map_err(|e| Inconsistent(format!("cluster {c} unreadable: {e}")))?;
            bytes.extend_from_slice(&data);
        }
        let prefix = dir.map(|d| format!("{}/", items_path(&items, d)));
        let children = reader.entries(disk.fat(), &bytes, prefix.as_deref().unwrap_or(""))?;
        let mut subdirs = Vec::new();
        for child in children {
            if child.is_dir {
                subdirs.push((items.len(), child.chain.clone()));
            }
            items.push(child);
        }
        // Reversed so that they come off the stack in the order they are listed.
        for (index, chain) in subdirs.into_iter().rev() {
            stack.push((Some(index), chain));
        }
    }
    Ok(order(items))
}

fn items_path(items: &[Item], index: usize) -> &str {
    &items[index].path
}

/// Sorts into pre-order: every directory before its contents (paths sort that way once
/// `/` sorts before any other byte of a name).
fn order(mut items: Vec<Item>) -> Vec<Item> {
    items.sort_by(|a, b| {
        let key = |s: &str| {
            s.bytes()
                .map(|b| if b == b'/' { 0 } else { b })
                .collect::<Vec<_>>()
        };
        key(&a.path).cmp(&key(&b.path))
    });
    items
}

struct Reader {
    kind: FatType,
    first_data: u32,
    cluster_count: u32,
    cluster_size: usize,
    used: Vec<bool>,
}

impl Reader {
    /// The entries of one directory's bytes.
    fn entries(
        &mut self,
        fat: &[u8],
        bytes: &[u8],
        prefix: &str,
    ) -> Result<Vec<Item>, Inconsistent> {
        let mut long = LongName::default();
        let mut names = HashSet::new();
        let mut out = Vec::new();
        for e in bytes.chunks_exact(ENTRY) {
            if e[0] == 0 {
                break;
            }
            if is_free(e) {
                long.clear();
                continue;
            }
            if e[11] == LONG_NAME {
                long.take(e);
                continue;
            }
            if e[11] & 0x08 != 0 || e[0] == b'.' {
                long.clear();
                continue;
            }
            let name = long
                .finish(e)
                .or_else(|| host_name_of_short(e))
                .filter(|n| !n.is_empty() && n != "." && n != ".." && !n.contains(['/', '\0']))
                .ok_or_else(|| Inconsistent(format!("invalid name in {prefix:?}")))?;
            if !names.insert(name.clone()) {
                return Err(Inconsistent(format!("{prefix}{name} twice")));
            }
            let is_dir = e[11] & 0x10 != 0;
            let first = u32::from(u16::from_le_bytes([e[26], e[27]]))
                | (u32::from(u16::from_le_bytes([e[20], e[21]])) << 16);
            let size = u32::from_le_bytes([e[28], e[29], e[30], e[31]]);
            let path = format!("{prefix}{name}");
            let chain = if is_dir {
                self.chain(fat, first, None, &path)?
            } else if size > 0 {
                let needed = (size as usize).div_ceil(self.cluster_size);
                self.chain(fat, first, Some(needed), &path)?
            } else {
                Vec::new()
            };
            out.push(Item {
                path,
                is_dir,
                chain,
                size: if is_dir { 0 } else { size },
            });
        }
        Ok(out)
    }

    /// The chain from `first`, marking its clusters used; `needed` clusters of it for a
    /// file (which must have that many).
    fn chain(
        &mut self,
        fat: &[u8],
        first: u32,
        needed: Option<usize>,
        path: &str,
    ) -> Result<Vec<u32>, Inconsistent> {
        let bad = |why: &str| Inconsistent(format!("{path}: {why}"));
        let mut chain = Vec::new();
        let mut c = first;
        loop {
            if c < self.first_data || c >= self.cluster_count {
                return Err(bad("cluster out of range"));
            }
            if std::mem::replace(&mut self.used[c as usize], true) {
                return Err(bad("cluster used twice"));
            }
            chain.push(c);
            let next = super::layout::get(self.kind, fat, c).ok_or_else(|| bad("past the FAT"))?;
            if self.kind.is_end(next) {
                break;
            }
            c = next;
        }
        if let Some(n) = needed {
            if chain.len() < n {
                return Err(bad("chain shorter than the size"));
            }
            chain.truncate(n);
        }
        Ok(chain)
    }
}
