//! What the host directory must do to show the tree the guest wrote: the difference
//! between the tree last committed and the one read now, as host operations.
//!
//! A file or directory keeps its identity through its first cluster (a rename moves the
//! entry, not the data), else through its path. A file's bytes are written where the
//! guest wrote them or where its chain now runs through other clusters, and nowhere else.
//! Every byte to write is read from the disk before the host changes at all, since a
//! cluster not yet written by the guest reads from the host file it came from.

use super::tree::Item;
use std::collections::HashMap;
use std::path::Path;

/// Bytes of a file to write: `len` bytes at `offset` in it, from `sector` of the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) offset: u64,
    pub(crate) sector: u64,
    pub(crate) len: usize,
}

/// A file to write, created where it is new.
#[derive(Debug, Default)]
pub(crate) struct FileWrite {
    pub(crate) path: String,
    pub(crate) size: u64,
    pub(crate) pieces: Vec<Piece>,
}

/// A step that moves the tree, in an order that has every directory before its contents.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Move {
    Rename { from: String, to: String },
    Mkdir(String),
}

/// The host operations of one commit, run in this order.
#[derive(Debug, Default)]
pub(crate) struct Plan {
    pub(crate) unlinks: Vec<String>,
    pub(crate) moves: Vec<Move>,
    pub(crate) writes: Vec<FileWrite>,
    /// Deepest first, at their paths after the moves.
    pub(crate) rmdirs: Vec<String>,
}

impl Plan {
    /// What a flush must sync once the plan ran: the files written and the directories
    /// whose entries changed.
    pub(crate) fn changed_paths(&self) -> Vec<String> {
        let parent = |p: &str| {
            p.rsplit_once('/')
                .map_or(String::new(), |(d, _)| d.to_owned())
        };
        let mut out: Vec<String> = self
            .unlinks
            .iter()
            .chain(&self.rmdirs)
            .map(|p| parent(p))
            .collect();
        for m in &self.moves {
            match m {
                Move::Rename { from, to } => out.extend([parent(from), parent(to)]),
                Move::Mkdir(p) => out.extend([parent(p), p.clone()]),
            }
        }
        for w in &self.writes {
            out.extend([parent(&w.path), w.path.clone()]);
        }
        out.sort();
        out.dedup();
        out
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.unlinks.is_empty()
            && self.moves.is_empty()
            && self.writes.is_empty()
            && self.rmdirs.is_empty()
    }
}

/// The plan that takes the host from `old` to `new`. `written(cluster)` lists the
/// sectors of a cluster the guest wrote since they last reached the host.
pub(crate) fn plan(
    layout: &super::layout::Layout,
    old: &[Item],
    new: &[Item],
    written: &dyn Fn(u32) -> Vec<usize>,
) -> Plan {
    let cs = layout.cluster_size() as u64;
    let sector = super::layout::SECTOR as u64;
    let matches = match_items(old, new);
    let mut plan = Plan::default();
    let mut taken = vec![false; old.len()];
    for m in matches.iter().flatten() {
        taken[*m] = true;
    }
    for (o, item) in old.iter().enumerate() {
        if !taken[o] && !item.is_dir {
            plan.unlinks.push(item.path.clone());
        }
    }
    // Renames done so far, as (from, to) of where things are on the host.
    let mut moved: Vec<(String, String)> = Vec::new();
    for (item, m) in new.iter().zip(&matches) {
        let before = m.map(|o| &old[o]);
        match before {
            Some(b) => {
                let now = current(&moved, &b.path);
                if now != item.path {
                    plan.moves.push(Move::Rename {
                        from: now.clone(),
                        to: item.path.clone(),
                    });
                    moved.push((now, item.path.clone()));
                }
            }
            None if item.is_dir => plan.moves.push(Move::Mkdir(item.path.clone())),
            None => {}
        }
        if item.is_dir {
            continue;
        }
        let size = u64::from(item.size);
        let mut pieces = Vec::new();
        for (k, &c) in item.chain.iter().enumerate() {
            let at = k as u64 * cs;
            let first = layout.first_sector_of(c);
            let same = before.is_some_and(|b| b.chain.get(k) == Some(&c));
            let spans: Vec<(u64, u64)> = if same {
                written(c)
                    .into_iter()
                    .map(|s| (at + s as u64 * sector, first + s as u64))
                    .collect()
            } else {
                (0..cs / sector)
                    .map(|s| (at + s * sector, first + s))
                    .collect()
            };
            for (offset, sector_no) in spans {
                if offset < size {
                    pieces.push(Piece {
                        offset,
                        sector: sector_no,
                        len: (size - offset).min(sector) as usize,
                    });
                }
            }
        }
        let resized = before.is_none_or(|b| b.size != item.size);
        if resized || !pieces.is_empty() {
            plan.writes.push(FileWrite {
                path: item.path.clone(),
                size,
                pieces,
            });
        }
    }
    for (o, item) in old.iter().enumerate().rev() {
        if !taken[o] && item.is_dir {
            plan.rmdirs.push(current(&moved, &item.path));
        }
    }
    plan
}

/// Where `path` is after the renames in `moved`.
fn current(moved: &[(String, String)], path: &str) -> String {
    let mut p = path.to_owned();
    for (from, to) in moved {
        if p == *from {
            p.clone_from(to);
        } else if let Some(rest) = p
            .strip_prefix(from.as_str())
            .and_then(|r| r.strip_prefix('/'))
        {
            p = format!("{to}/{rest}");
        }
    }
    p
}

/// For each new item, the old one it is: the same first cluster and kind, else the same
/// path and kind.
fn match_items(old: &[Item], new: &[Item]) -> Vec<Option<usize>> {
    let by_first: HashMap<u32, usize> = old
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.first().map(|f| (f, i)))
        .collect();
    let by_path: HashMap<&str, usize> = old
        .iter()
        .enumerate()
        .map(|(i, o)| (o.path.as_str(), i))
        .collect();
    let mut taken = vec![false; old.len()];
    let mut out: Vec<Option<usize>> = new
        .iter()
        .map(|n| {
            let o = *by_first.get(&n.first()?)?;
            (old[o].is_dir == n.is_dir && !std::mem::replace(&mut taken[o], true)).then_some(o)
        })
        .collect();
    for (n, slot) in new.iter().zip(out.iter_mut()) {
        if slot.is_none() {
            if let Some(&o) = by_path.get(n.path.as_str()) {
                if old[o].is_dir == n.is_dir && !taken[o] {
                    taken[o] = true;
                    *slot = Some(o);
                }
            }
        }
    }
    out
}

/// Runs `plan` under `root`, the pieces' bytes in `data` (in the plan's order). Failures
/// are reported and the rest goes on; the paths of files not written in full come back.
pub(crate) fn apply(root: &Path, plan: &Plan, data: &[Vec<u8>]) -> Vec<String> {
    use std::os::unix::fs::FileExt;
    let warn = |what: &str, path: &str, e: std::io::Error| {
        eprintln!("vvfat: could not {what} {}: {e}", root.join(path).display());
    };
    let mut failed = Vec::new();
    for p in &plan.unlinks {
        if let Err(e) = std::fs::remove_file(root.join(p)) {
            warn("delete", p, e);
        }
    }
    for m in &plan.moves {
        match m {
            Move::Rename { from, to } => {
                let target = root.join(to);
                // Never replace what the host has there (a swap of two names, or a file
                // made on the host since).
                if target.symlink_metadata().is_ok() {
                    warn("rename to", to, std::io::ErrorKind::AlreadyExists.into());
                } else if let Err(e) = std::fs::rename(root.join(from), target) {
                    warn("rename", from, e);
                }
            }
            Move::Mkdir(p) => {
                if let Err(e) = std::fs::create_dir(root.join(p)) {
                    warn("create directory", p, e);
                }
            }
        }
    }
    let mut bytes = data.iter();
    for w in &plan.writes {
        let result = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(root.join(&w.path))
            .and_then(|f| {
                for piece in &w.pieces {
                    let b = bytes.next().map_or(&[][..], Vec::as_slice);
                    f.write_all_at(&b[..piece.len.min(b.len())], piece.offset)?;
                }
                f.set_len(w.size)
            });
        if let Err(e) = result {
            warn("write", &w.path, e);
            failed.push(w.path.clone());
        }
    }
    for p in &plan.rmdirs {
        if let Err(e) = std::fs::remove_dir(root.join(p)) {
            warn("delete directory", p, e);
        }
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vvfat::layout::Layout;

    fn file(path: &str, chain: &[u32], size: u32) -> Item {
        Item {
            path: path.into(),
            is_dir: false,
            chain: chain.to_vec(),
            size,
        }
    }

    fn dir(path: &str, first: u32) -> Item {
        Item {
            path: path.into(),
            is_dir: true,
            chain: vec![first],
            size: 0,
        }
    }

    #[test]
    fn renames_follow_the_first_cluster() {
        let l = Layout::new(None, false);
        let old = [dir("d", 2), file("d/a", &[3], 10), file("b", &[4], 5)];
        let new = [dir("e", 2), file("e/c", &[3], 10), file("b", &[4], 5)];
        let p = plan(&l, &old, &new, &|_| vec![]);
        assert_eq!(
            p.moves,
            [
                Move::Rename {
                    from: "d".into(),
                    to: "e".into()
                },
                Move::Rename {
                    from: "e/a".into(),
                    to: "e/c".into()
                }
            ]
        );
        assert!(p.writes.is_empty() && p.unlinks.is_empty() && p.rmdirs.is_empty());
    }

    #[test]
    fn only_written_or_moved_bytes_are_written() {
        let l = Layout::new(None, false);
        let old = [file("a", &[2, 3], 10000)];
        let new = [file("a", &[2, 7, 8], 20000)];
        let p = plan(&l, &old, &new, &|c| if c == 2 { vec![1] } else { vec![] });
        let w = &p.writes[0];
        assert_eq!(w.size, 20000);
        assert_eq!(
            w.pieces[0],
            Piece {
                offset: 512,
                sector: l.first_sector_of(2) + 1,
                len: 512
            }
        );
        // Clusters 7 and 8 in full, the last one cut at the size.
        assert_eq!(w.pieces.len(), 1 + 16 + 8);
        assert_eq!(
            w.pieces.last().map(|p| p.len),
            Some(20000 - 8192 * 2 - 7 * 512)
        );
    }

    #[test]
    fn deletions_and_creations() {
        let l = Layout::new(None, false);
        let old = [dir("d", 2), file("d/x", &[3], 1), file("y", &[], 0)];
        let new = [file("y", &[5], 3), dir("z", 6)];
        let p = plan(&l, &old, &new, &|_| vec![]);
        assert_eq!(p.unlinks, ["d/x"]);
        assert_eq!(p.rmdirs, ["d"]);
        assert_eq!(p.moves, [Move::Mkdir("z".into())]);
        assert_eq!(p.writes[0].path, "y");
        assert_eq!(p.writes[0].pieces.len(), 1);
    }
}
