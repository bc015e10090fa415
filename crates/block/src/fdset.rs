//! File descriptor sets (`-add-fd`, `add-fd`): descriptors a management process hands over so
//! that the program opens `/dev/fdset/N` without having the right to open the file itself.
//!
//! One table for the process, as QEMU has: the monitor fills it, the `file` driver opens from
//! it. Opening takes a duplicate of the set's first descriptor whose access mode and O_DIRECT
//! match; a set stays listed while a duplicate of it is open, even after its own descriptors
//! were removed.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard};

/// The prefix that names a set instead of a file.
pub const PREFIX: &str = "/dev/fdset/";

/// A descriptor in a set, with what the user said it is.
struct Member {
    fd: OwnedFd,
    opaque: Option<String>,
}

#[derive(Default)]
struct Set {
    /// Oldest first.
    members: Vec<Member>,
    /// The numbers of duplicates handed out and still open.
    dups: Vec<RawFd>,
}

static SETS: Mutex<BTreeMap<i64, Set>> = Mutex::new(BTreeMap::new());

fn sets() -> MutexGuard<'static, BTreeMap<i64, Set>> {
    // A panic elsewhere while holding the lock leaves the table itself consistent.
    SETS.lock().unwrap_or_else(|p| p.into_inner())
}

/// One set as `query-fdsets` shows it.
pub struct SetInfo {
    /// The set's number.
    pub id: i64,
    /// Its descriptors (number and opaque text), oldest first.
    pub fds: Vec<(RawFd, Option<String>)>,
}

/// Adds `fd` to set `id` (or to the lowest free number); returns the set's number and the
/// descriptor's.
///
/// # Errors
/// QEMU's text for a negative set number.
pub fn add(fd: OwnedFd, id: Option<i64>, opaque: Option<&str>) -> Result<(i64, RawFd), String> {
    let mut sets = sets();
    let id = match id {
        Some(id) if id < 0 => {
            return Err("Parameter 'fdset-id' expects a non-negative value".to_owned());
        }
        Some(id) => id,
        None => (0..).find(|n| !sets.contains_key(n)).unwrap_or(0),
    };
    let raw = fd.as_raw_fd();
    sets.entry(id).or_default().members.push(Member {
        fd,
        opaque: opaque.map(str::to_owned),
    });
    Ok((id, raw))
}

/// Removes descriptor `fd` of set `id`, or all of the set's descriptors.
///
/// # Errors
/// QEMU's "File descriptor named '...' not found".
pub fn remove(id: i64, fd: Option<i64>) -> Result<(), String> {
    let mut sets = sets();
    let not_found = || {
        let name = match fd {
            Some(fd) => format!("fdset-id:{id}, fd:{fd}"),
            None => format!("fdset-id:{id}"),
        };
        format!("File descriptor named '{name}' not found")
    };
    let set = sets.get_mut(&id).ok_or_else(not_found)?;
    match fd {
        Some(fd) => {
            let at = set
                .members
                .iter()
                .position(|m| i64::from(m.fd.as_raw_fd()) == fd)
                .ok_or_else(not_found)?;
            set.members.remove(at);
        }
        None => set.members.clear(),
    }
    if set.members.is_empty() && set.dups.is_empty() {
        sets.remove(&id);
    }
    Ok(())
}

/// Every set, in `query-fdsets` order (highest number first).
pub fn query() -> Vec<SetInfo> {
    sets()
        .iter()
        .rev()
        .map(|(&id, set)| SetInfo {
            id,
            fds: set
                .members
                .iter()
                .map(|m| (m.fd.as_raw_fd(), m.opaque.clone()))
                .collect(),
        })
        .collect()
}

/// A duplicate handed out by [`open`]; the set forgets it when this is dropped.
#[derive(Debug)]
pub struct Dup(RawFd);

impl Drop for Dup {
    fn drop(&mut self) {
        let mut sets = sets();
        let mut emptied = None;
        for (&id, set) in sets.iter_mut() {
            if let Some(at) = set.dups.iter().position(|&d| d == self.0) {
                set.dups.remove(at);
                if set.dups.is_empty() && set.members.is_empty() {
                    emptied = Some(id);
                }
                break;
            }
        }
        if let Some(id) = emptied {
            sets.remove(&id);
        }
    }
}

/// Why a set could not give a descriptor: QEMU's text, and the errno its callers see.
#[derive(Debug)]
pub struct OpenError {
    /// The errno (EINVAL, ENOENT, EACCES...).
    pub errno: i32,
    /// The message, complete.
    pub text: String,
}

/// Opens `path` if it names a set (`None` otherwise): a duplicate of the set's first
/// descriptor whose access mode and O_DIRECT are those of `flags`.
pub fn open(path: &str, flags: i32) -> Option<Result<(File, Dup), OpenError>> {
    let num = path.strip_prefix(PREFIX)?;
    Some(open_set(path, num, flags))
}

fn open_set(path: &str, num: &str, flags: i32) -> Result<(File, Dup), OpenError> {
    let fail = |errno, text: String| OpenError { errno, text };
    let id: i64 = num
        .parse()
        .ok()
        .filter(|&n: &i64| n >= 0 && !num.starts_with('+'))
        .ok_or_else(|| fail(libc::EINVAL, format!("Could not parse fdset {path}")))?;
    let mut sets = sets();
    let set = sets.get_mut(&id).ok_or_else(|| {
        fail(
            libc::ENOENT,
            format!("Failed to find fdset /dev/fdset/{id}"),
        )
    })?;
    let mask = libc::O_ACCMODE | libc::O_DIRECT;
    let mut found = None;
    for m in &set.members {
        let fd = m.fd.as_raw_fd();
        // SAFETY: F_GETFL reads the status flags of a descriptor the set owns (open).
        let got = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if got == -1 {
            return Err(fail(
                libc::EBADF,
                format!("Failed to read file status flags for fd={fd}"),
            ));
        }
        if got & mask == flags & mask {
            found = Some(m);
            break;
        }
    }
    let m = found.ok_or_else(|| {
        fail(
            libc::EACCES,
            format!("Failed to find file descriptor with matching flags=0x{flags:x}"),
        )
    })?;
    let dup = m.fd.try_clone().map_err(|e| {
        fail(
            e.raw_os_error().unwrap_or(libc::EIO),
            format!(
                "Failed to dup() given file descriptor fd={}",
                m.fd.as_raw_fd()
            ),
        )
    })?;
    let raw = dup.as_raw_fd();
    set.dups.push(raw);
    Ok((File::from(dup), Dup(raw)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek};

    fn temp_with(data: &[u8], write: bool) -> (tempfile::NamedTempFile, OwnedFd) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut t, data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(t.path())
            .unwrap();
        (t, OwnedFd::from(f))
    }

    #[test]
    fn sets_match_access_mode_and_outlive_removal_while_duplicated() {
        // Numbers far from other tests' (the table is the process's).
        let (_a, ro) = temp_with(b"read-only", false);
        let (_b, rw) = temp_with(b"read-write", true);
        assert_eq!(add(ro, Some(1001), Some("ro")).unwrap().0, 1001);
        let (_, rw_num) = add(rw, Some(1001), Some("rw")).unwrap();
        let (mut f, dup) = open("/dev/fdset/1001", libc::O_RDWR).unwrap().unwrap();
        let mut s = String::new();
        f.rewind().unwrap();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "read-write");
        let e = open("/dev/fdset/1001", libc::O_RDWR | libc::O_DIRECT)
            .unwrap()
            .unwrap_err();
        assert_eq!(e.errno, libc::EACCES);
        assert_eq!(
            e.text,
            "Failed to find file descriptor with matching flags=0x4002"
        );

        remove(1001, None).unwrap();
        let info = query();
        let set = info
            .iter()
            .find(|s| s.id == 1001)
            .expect("kept while duplicated");
        assert!(set.fds.is_empty());
        drop(dup);
        assert!(query().iter().all(|s| s.id != 1001));
        assert_eq!(
            remove(1001, Some(i64::from(rw_num))).unwrap_err(),
            format!("File descriptor named 'fdset-id:1001, fd:{rw_num}' not found")
        );
        assert_eq!(
            open("/dev/fdset/x1", 0).unwrap().unwrap_err().text,
            "Could not parse fdset /dev/fdset/x1"
        );
        assert!(open("/tmp/x", 0).is_none());
    }
}
