//! NFS version 3 (RFC 1813): the procedures the node calls, their arguments and results,
//! and the status codes with libnfs's names and errnos. Also the MOUNT protocol's
//! (version 3) two calls and the portmapper's lookup of a program's port.

use crate::xdr::{Dec, Enc, Garbage};
use bytes::Bytes;

pub(crate) const NFS_PROGRAM: u32 = 100_003;
pub(crate) const NFS_V3: u32 = 3;
pub(crate) const MOUNT_PROGRAM: u32 = 100_005;
pub(crate) const MOUNT_V3: u32 = 3;
pub(crate) const PORTMAP_PROGRAM: u32 = 100_000;
/// The portmapper's well-known port.
pub(crate) const PORTMAP_PORT: u16 = 111;

/// The largest file handle NFSv3 has.
const FHSIZE3: usize = 64;

pub(crate) const GETATTR: u32 = 1;
pub(crate) const SETATTR: u32 = 2;
pub(crate) const LOOKUP: u32 = 3;
pub(crate) const ACCESS: u32 = 4;
pub(crate) const READLINK: u32 = 5;
pub(crate) const READ: u32 = 6;
pub(crate) const WRITE: u32 = 7;
pub(crate) const CREATE: u32 = 8;
pub(crate) const FSINFO: u32 = 19;
pub(crate) const COMMIT: u32 = 21;

pub(crate) const ACCESS_READ: u32 = 0x01;
pub(crate) const ACCESS_MODIFY: u32 = 0x04;
pub(crate) const ACCESS_EXECUTE: u32 = 0x20;

/// File types (`ftype3`).
pub(crate) const NF3LNK: u32 = 5;

/// `stable_how`: the server may keep the data in memory until a COMMIT.
pub(crate) const UNSTABLE: u32 = 0;

/// A file handle.
pub(crate) type Fh = Bytes;

/// An NFS status other than NFS3_OK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Status(pub(crate) u32);

impl Status {
    /// libnfs's name for it.
    pub(crate) fn name(self) -> &'static str {
        match self.0 {
            1 => "NFS3ERR_PERM",
            2 => "NFS3ERR_NOENT",
            5 => "NFS3ERR_IO",
            6 => "NFS3ERR_NXIO",
            13 => "NFS3ERR_ACCES",
            17 => "NFS3ERR_EXIST",
            18 => "NFS3ERR_XDEV",
            19 => "NFS3ERR_NODEV",
            20 => "NFS3ERR_NOTDIR",
            21 => "NFS3ERR_ISDIR",
            22 => "NFS3ERR_INVAL",
            27 => "NFS3ERR_FBIG",
            28 => "NFS3ERR_NOSPC",
            30 => "NFS3ERR_ROFS",
            31 => "NFS3ERR_MLINK",
            63 => "NFS3ERR_NAMETOOLONG",
            66 => "NFS3ERR_NOTEMPTY",
            69 => "NFS3ERR_DQUOT",
            70 => "NFS3ERR_STALE",
            71 => "NFS3ERR_REMOTE",
            10001 => "NFS3ERR_BADHANDLE",
            10002 => "NFS3ERR_NOT_SYNC",
            10003 => "NFS3ERR_BAD_COOKIE",
            10004 => "NFS3ERR_NOTSUPP",
            10005 => "NFS3ERR_TOOSMALL",
            10006 => "NFS3ERR_SERVERFAULT",
            10007 => "NFS3ERR_BADTYPE",
            10008 => "NFS3ERR_JUKEBOX",
            _ => "unknown nfs error",
        }
    }

    /// libnfs's errno for it (positive).
    pub(crate) fn errno(self) -> i32 {
        match self.0 {
            1 => libc::EPERM,
            2 => libc::ENOENT,
            6 => libc::ENXIO,
            13 => libc::EACCES,
            17 => libc::EEXIST,
            18 => libc::EXDEV,
            19 => libc::ENODEV,
            20 => libc::ENOTDIR,
            21 => libc::EISDIR,
            22 | 10004 | 10007 => libc::EINVAL,
            27 => libc::EFBIG,
            28 => libc::ENOSPC,
            30 => libc::EROFS,
            31 => libc::EMLINK,
            63 => libc::ENAMETOOLONG,
            66 => libc::ENOTEMPTY,
            70 => libc::ESTALE,
            10008 => libc::EAGAIN,
            5 | 71 | 10001..=10003 | 10005 | 10006 => libc::EIO,
            _ => libc::ERANGE,
        }
    }
}

impl std::fmt::Display for Status {
    /// As libnfs prints it: `NFS3ERR_NOENT(-2)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}(-{})", self.name(), self.errno())
    }
}

/// What the node needs of a file's attributes (`fattr3`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Attr {
    pub(crate) kind: u32,
    pub(crate) size: u64,
    /// Bytes the file takes on the server.
    pub(crate) used: u64,
}

fn fattr3(d: &mut Dec) -> Result<Attr, Garbage> {
    let kind = d.u32()?;
    for _ in 0..4 {
        d.u32()?; // mode, nlink, uid, gid
    }
    let size = d.u64()?;
    let used = d.u64()?;
    d.skip(8 + 8 + 8 + 3 * 8)?; // rdev, fsid, fileid, times
    Ok(Attr { kind, size, used })
}

fn post_op_attr(d: &mut Dec) -> Result<Option<Attr>, Garbage> {
    if d.bool()? {
        Ok(Some(fattr3(d)?))
    } else {
        Ok(None)
    }
}

fn wcc_data(d: &mut Dec) -> Result<Option<Attr>, Garbage> {
    if d.bool()? {
        d.skip(8 + 8 + 8)?; // size, mtime, ctime before
    }
    post_op_attr(d)
}

/// The status at the head of every result: `Ok(())` for NFS3_OK.
fn status(d: &mut Dec) -> Result<Result<(), Status>, Garbage> {
    Ok(match d.u32()? {
        0 => Ok(()),
        n => Err(Status(n)),
    })
}

/// A result: what came back, or the status the server failed it with.
pub(crate) type Res<T> = Result<Result<T, Status>, Garbage>;

pub(crate) fn fh_args(fh: &[u8]) -> Enc {
    let mut e = Enc::default();
    e.opaque(fh);
    e
}

pub(crate) fn getattr_res(d: &mut Dec) -> Res<Attr> {
    if let Err(s) = status(d)? {
        return Ok(Err(s));
    }
    Ok(Ok(fattr3(d)?))
}

/// The stable_how a FUA write asks: on stable storage before the answer.
pub(crate) const FILE_SYNC: u32 = 2;

/// SETATTR of the size alone.
pub(crate) fn setattr_size_args(fh: &[u8], size: u64) -> Enc {
    let mut e = fh_args(fh);
    // mode, uid, gid not set; size set; times left; no guard.
    e.bool(false).bool(false).bool(false).bool(true).u64(size);
    e.u32(0).u32(0).bool(false);
    e
}

/// A result of only the file's wcc data: its attributes after.
pub(crate) fn wcc_res(d: &mut Dec) -> Res<Option<Attr>> {
    let st = status(d)?;
    let after = wcc_data(d)?;
    Ok(st.map(|()| after))
}

pub(crate) fn lookup_args(dir: &[u8], name: &str) -> Enc {
    let mut e = fh_args(dir);
    e.opaque(name.as_bytes());
    e
}

/// LOOKUP: the object's handle and attributes (when the server sends them).
pub(crate) fn lookup_res(d: &mut Dec) -> Res<(Fh, Option<Attr>)> {
    if let Err(s) = status(d)? {
        return Ok(Err(s));
    }
    let fh = d.opaque(FHSIZE3)?;
    Ok(Ok((fh, post_op_attr(d)?)))
}

pub(crate) fn access_args(fh: &[u8], access: u32) -> Enc {
    let mut e = fh_args(fh);
    e.u32(access);
    e
}

pub(crate) fn access_res(d: &mut Dec) -> Res<u32> {
    let st = status(d)?;
    post_op_attr(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    Ok(Ok(d.u32()?))
}

pub(crate) fn readlink_res(d: &mut Dec) -> Res<String> {
    let st = status(d)?;
    post_op_attr(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    let path = d.opaque(4096)?;
    Ok(Ok(String::from_utf8_lossy(&path).into_owned()))
}

pub(crate) fn read_args(fh: &[u8], offset: u64, count: u32) -> Enc {
    let mut e = fh_args(fh);
    e.u64(offset).u32(count);
    e
}

/// READ: the bytes, whether they end at the end of the file, the file's attributes.
pub(crate) fn read_res(d: &mut Dec, asked: usize) -> Res<(Bytes, bool, Option<Attr>)> {
    let st = status(d)?;
    let attr = post_op_attr(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    let count = d.u32()? as usize;
    let eof = d.bool()?;
    let data = d.opaque(asked)?;
    if data.len() != count {
        return Err(Garbage);
    }
    Ok(Ok((data, eof, attr)))
}

/// WRITE's arguments up to the data's length; the bytes follow (see `Rpc::call`).
pub(crate) fn write_args(fh: &[u8], offset: u64, len: u32, stable: u32) -> Enc {
    let mut e = fh_args(fh);
    e.u64(offset).u32(len).u32(stable).u32(len);
    e
}

/// A server's write verifier: it changes when the server restarts, and with it goes what
/// it had not committed.
pub(crate) type Verifier = [u8; 8];

fn verifier(d: &mut Dec) -> Result<Verifier, Garbage> {
    Ok((u64::from(d.u32()?) << 32 | u64::from(d.u32()?)).to_be_bytes())
}

/// What a WRITE did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Written {
    /// How many bytes the server took.
    pub(crate) count: u32,
    /// Whether they are on stable storage (FILE_SYNC or DATA_SYNC), not only in memory.
    pub(crate) stable: bool,
    pub(crate) verifier: Verifier,
    /// The file's attributes after.
    pub(crate) after: Option<Attr>,
}

pub(crate) fn write_res(d: &mut Dec) -> Res<Written> {
    let st = status(d)?;
    let after = wcc_data(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    let count = d.u32()?;
    let stable = d.u32()? != UNSTABLE;
    let verifier = verifier(d)?;
    Ok(Ok(Written {
        count,
        stable,
        verifier,
        after,
    }))
}

/// COMMIT: the file's attributes after, and the verifier the writes it covers must have.
pub(crate) fn commit_res(d: &mut Dec) -> Res<(Option<Attr>, Verifier)> {
    let st = status(d)?;
    let after = wcc_data(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    Ok(Ok((after, verifier(d)?)))
}

/// CREATE, UNCHECKED (an existing file is kept) or GUARDED, with the file's mode.
pub(crate) fn create_args(dir: &[u8], name: &str, mode: u32) -> Enc {
    let mut e = lookup_args(dir, name);
    e.u32(0).bool(true).u32(mode);
    // uid, gid, size not set; times left.
    e.bool(false).bool(false).bool(false).u32(0).u32(0);
    e
}

pub(crate) fn create_res(d: &mut Dec) -> Res<()> {
    wcc_res_after(d, |d| {
        if d.bool()? {
            d.opaque(FHSIZE3)?;
        }
        post_op_attr(d)?;
        Ok(())
    })
}

/// A result whose success carries `ok` before the directory's wcc data, failure only
/// the wcc data.
fn wcc_res_after(d: &mut Dec, ok: impl FnOnce(&mut Dec) -> Result<(), Garbage>) -> Res<()> {
    let st = status(d)?;
    if st.is_ok() {
        ok(d)?;
    }
    wcc_data(d)?;
    Ok(st)
}

/// What FSINFO says of transfer sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FsInfo {
    pub(crate) rtmax: u32,
    pub(crate) wtmax: u32,
}

pub(crate) fn fsinfo_res(d: &mut Dec) -> Res<FsInfo> {
    let st = status(d)?;
    post_op_attr(d)?;
    if let Err(s) = st {
        return Ok(Err(s));
    }
    let rtmax = d.u32()?;
    d.u32()?; // rtpref
    d.u32()?; // rtmult
    let wtmax = d.u32()?;
    Ok(Ok(FsInfo { rtmax, wtmax }))
}

pub(crate) fn commit_args(fh: &[u8]) -> Enc {
    let mut e = fh_args(fh);
    e.u64(0).u32(0);
    e
}

/// A MOUNT status other than MNT3_OK, as libnfs names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MountStatus(pub(crate) u32);

impl MountStatus {
    pub(crate) fn name(self) -> &'static str {
        match self.0 {
            1 => "MNT3ERR_PERM",
            2 => "MNT3ERR_NOENT",
            5 => "MNT3ERR_IO",
            13 => "MNT3ERR_ACCES",
            20 => "MNT3ERR_NOTDIR",
            22 => "MNT3ERR_INVAL",
            63 => "MNT3ERR_NAMETOOLONG",
            10004 => "MNT3ERR_NOTSUPP",
            10006 => "MNT3ERR_SERVERFAULT",
            _ => "unknown mount stat",
        }
    }

    /// libnfs's errno (positive; MNT3ERR_NOENT is EPERM there too).
    pub(crate) fn errno(self) -> i32 {
        match self.0 {
            1 | 2 => libc::EPERM,
            5 | 10006 => libc::EIO,
            13 => libc::EACCES,
            20 => libc::ENOTDIR,
            22 | 10004 => libc::EINVAL,
            63 => libc::E2BIG,
            _ => libc::ERANGE,
        }
    }
}

pub(crate) const MOUNTPROC3_MNT: u32 = 1;
pub(crate) const MOUNTPROC3_UMNT: u32 = 3;

pub(crate) fn dirpath_args(path: &str) -> Enc {
    let mut e = Enc::default();
    e.opaque(path.as_bytes());
    e
}

/// MNT: the export's root handle.
pub(crate) fn mnt_res(d: &mut Dec) -> Result<Result<Fh, MountStatus>, Garbage> {
    match d.u32()? {
        0 => Ok(Ok(d.opaque(FHSIZE3)?)),
        n => Ok(Err(MountStatus(n))),
    }
}

pub(crate) const PMAPPROC_GETPORT: u32 = 3;
pub(crate) const RPCBPROC_GETADDR: u32 = 3;

/// The portmapper's (version 2) question for a program's TCP port.
pub(crate) fn getport_args(prog: u32, vers: u32) -> Enc {
    let mut e = Enc::default();
    e.u32(prog).u32(vers).u32(libc::IPPROTO_TCP as u32).u32(0);
    e
}

/// rpcbind's (version 3) question for a program's address, as libnfs asks it over IPv6
/// (every string empty).
pub(crate) fn getaddr_args(prog: u32, vers: u32) -> Enc {
    let mut e = Enc::default();
    e.u32(prog).u32(vers).opaque(b"").opaque(b"").opaque(b"");
    e
}

/// The port in a universal address (`h1.h2.h3.h4.p1.p2`, `::1.8.1`); 0 when there is
/// none.
pub(crate) fn universal_port(addr: &str) -> u16 {
    let mut parts = addr.rsplitn(3, '.');
    let (Some(lo), Some(hi), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return 0;
    };
    match (hi.parse::<u16>(), lo.parse::<u16>()) {
        (Ok(hi), Ok(lo)) if hi < 256 && lo < 256 => hi * 256 + lo,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_print_as_libnfs_prints_them() {
        assert_eq!(Status(2).to_string(), "NFS3ERR_NOENT(-2)");
        assert_eq!(Status(10008).to_string(), "NFS3ERR_JUKEBOX(-11)");
        assert_eq!(Status(4).to_string(), "unknown nfs error(-34)");
        assert_eq!(MountStatus(13).name(), "MNT3ERR_ACCES");
        assert_eq!(MountStatus(2).errno(), libc::EPERM);
    }

    #[test]
    fn universal_addresses_give_their_port() {
        assert_eq!(universal_port("::1.8.1"), 2049);
        assert_eq!(universal_port("127.0.0.1.0.111"), 111);
        assert_eq!(universal_port(""), 0);
        assert_eq!(universal_port("1.2.300.1"), 0);
    }

    #[test]
    fn attributes_are_read_from_their_84_bytes() {
        let mut e = Enc::default();
        e.u32(0).bool(true).u32(1);
        for _ in 0..4 {
            e.u32(0);
        }
        e.u64(4096).u64(512);
        e.0.extend_from_slice(&[0; 48]);
        let mut d = Dec::new(Bytes::from(e.0));
        let a = status_then_attr(&mut d);
        assert_eq!(
            a,
            Ok(Ok(Some(Attr {
                kind: 1,
                size: 4096,
                used: 512
            })))
        );
        assert_eq!(d.rest(), 0);
    }

    fn status_then_attr(d: &mut Dec) -> Res<Option<Attr>> {
        if let Err(s) = status(d)? {
            return Ok(Err(s));
        }
        Ok(Ok(post_op_attr(d)?))
    }

    proptest::proptest! {
        #[test]
        fn any_answer_is_read_or_refused(bytes in proptest::collection::vec(0u8..=255, 0..400)) {
            let d = || Dec::new(Bytes::from(bytes.clone()));
            let _ = getattr_res(&mut d());
            let _ = wcc_res(&mut d());
            let _ = lookup_res(&mut d());
            let _ = access_res(&mut d());
            let _ = readlink_res(&mut d());
            let _ = read_res(&mut d(), 1 << 20);
            let _ = write_res(&mut d());
            let _ = commit_res(&mut d());
            let _ = create_res(&mut d());
            let _ = fsinfo_res(&mut d());
            let _ = mnt_res(&mut d());
        }
    }

    #[test]
    fn short_or_overlong_reads_are_garbage() {
        let mut e = Enc::default();
        e.u32(0).bool(false).u32(8).bool(true).opaque(&[1; 4]);
        assert_eq!(
            read_res(&mut Dec::new(Bytes::from(e.0.clone())), 16),
            Err(Garbage)
        );
        let mut e = Enc::default();
        e.u32(0).bool(false).u32(8).bool(false).opaque(&[1; 8]);
        assert_eq!(
            read_res(&mut Dec::new(Bytes::from(e.0.clone())), 4),
            Err(Garbage)
        );
        let (data, eof, _) = read_res(&mut Dec::new(Bytes::from(e.0)), 8)
            .unwrap()
            .unwrap();
        assert_eq!((data.len(), eof), (8, false));
    }
}
