//! A mounted export, as libnfs mounts one: the program ports from the server's
//! portmapper, the export's root handle from its MOUNT daemon, the transfer sizes from
//! FSINFO; paths looked up component by component (symbolic links followed inside the
//! export); reads and writes split at the server's sizes and sent at once. The texts of
//! failures are libnfs's, as QEMU passes them on.
//!
//! Once mounted, a lost connection to the NFS server is made again (once a second while
//! the server is away) and the calls under way sent anew, as libnfs reconnects.

use crate::nfs3::{self, Attr, Fh, FsInfo, MountStatus, Status};
use crate::rpc::{CallError, Caller, Rpc};
use crate::uncommitted::{Covered, Uncommitted};
use crate::xdr::{Dec, Enc, Garbage};
use bytes::Bytes;
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

/// The most a READ or WRITE asks for, whatever the server allows (libnfs's).
const MAX_XFER: u32 = 1 << 20;
/// The least a server must allow (NFSv2's size; libnfs refuses less).
const MIN_XFER: u32 = 8192;
/// How many symbolic links one lookup follows.
const MAX_LINKS: u32 = 40;
/// How often a call goes again on a connection made again before it fails: a server
/// that takes connections and breaks them at each call fails the request (libnfs tries
/// for ever). Time waiting for a server that is away does not count.
const MAX_RESENDS: u32 = 7;

/// Why a call failed.
#[derive(Debug)]
pub(crate) enum Failed {
    /// The server answered with this status.
    Status(Status),
    /// The server would not run the call (RPC-level), or answered nonsense: libnfs's
    /// words.
    Rpc(String),
    /// The connection ended (and is not made again: the node is opening or closing).
    Lost,
}

impl Failed {
    /// The errno a request fails with: the status's, EIO for the rest.
    pub(crate) fn errno(&self) -> i32 {
        match self {
            Failed::Status(s) => s.errno(),
            _ => libc::EIO,
        }
    }
}

impl From<Garbage> for Failed {
    fn from(_: Garbage) -> Failed {
        Failed::Rpc("RPC error: malformed reply".into())
    }
}

/// The text of a failure after what failed (`NFS: Lookup of /x failed with `).
fn with_status(what: String, f: Failed) -> String {
    match f {
        Failed::Status(s) => format!("{what} {s}"),
        Failed::Rpc(s) => s,
        Failed::Lost => "nfs_service failed".to_owned(),
    }
}

/// The export mounted and the connection to its NFS server.
pub(crate) struct Client {
    rpc: RefCell<Rc<Rpc>>,
    reconnecting: tokio::sync::Mutex<()>,
    caller: Caller,
    /// The server as the options name it, and where it was found.
    host: String,
    ip: IpAddr,
    pub(crate) export: String,
    pub(crate) root: Fh,
    pub(crate) fsinfo: FsInfo,
    /// The file's attributes as the last answer that carried them said.
    attr: Cell<Option<Attr>>,
    /// Writes the server holds in memory, kept until a COMMIT.
    uncommitted: Uncommitted,
    /// Writes hold it shared; sending writes again after a server restart holds it alone.
    gate: tokio::sync::RwLock<()>,
    /// Whether the node finished opening: connections lost before fail the open.
    opened: Cell<bool>,
    closed: Cell<bool>,
}

/// Where `host` is, as libnfs resolves it (the first address).
async fn resolve(host: &str) -> Result<IpAddr, String> {
    let refused = || {
        format!(
            "nfs_mount_async failed. Failed to start connection. Failed to start connection. \
             Invalid address:{host}. Can not resolv into IPv4/v6 structure."
        )
    };
    if host.is_empty() {
        return Err(refused());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(ip);
    }
    match tokio::net::lookup_host((host, 0)).await {
        Ok(mut addrs) => addrs.next().map(|a| a.ip()).ok_or_else(refused),
        Err(_) => Err(refused()),
    }
}

/// A call on a connection of its own (portmapper, MOUNT): a lost connection is libnfs's
/// "nfs_service failed".
async fn call_once(rpc: &Rpc, prog: (u32, u32, u32), args: &Enc) -> Result<Dec, String> {
    rpc.call(prog, &args.0, None).await.map_err(|e| match e {
        CallError::Lost(_) => "nfs_service failed".to_owned(),
        CallError::Refused(s) => format!("mount_cb: {s}"),
    })
}

/// Connects to program `prog` version `vers` on `ip`, at the port its portmapper gives.
async fn connect_program(
    host: &str,
    ip: IpAddr,
    (prog, vers): (u32, u32),
    caller: &Caller,
) -> Result<Rpc, String> {
    let lost = |_| "nfs_service failed".to_owned();
    let pm = Rpc::connect(SocketAddr::new(ip, nfs3::PORTMAP_PORT), caller)
        .await
        .map_err(lost)?;
    let port = if ip.is_ipv4() {
        let mut d = call_once(
            &pm,
            (nfs3::PORTMAP_PROGRAM, 2, nfs3::PMAPPROC_GETPORT),
            &nfs3::getport_args(prog, vers),
        )
        .await?;
        u16::try_from(d.u32().unwrap_or(0)).unwrap_or(0)
    } else {
        let mut d = call_once(
            &pm,
            (nfs3::PORTMAP_PROGRAM, 3, nfs3::RPCBPROC_GETADDR),
            &nfs3::getaddr_args(prog, vers),
        )
        .await?;
        let addr = d.opaque(256).unwrap_or_default();
        nfs3::universal_port(&String::from_utf8_lossy(&addr))
    };
    drop(pm);
    if port == 0 {
        return Err(format!(
            "mount_cb: RPC error. Program is not available on {host}"
        ));
    }
    Rpc::connect(SocketAddr::new(ip, port), caller)
        .await
        .map_err(lost)
}

/// The text of a MOUNT refusal, errno and all.
fn mount_refused(s: MountStatus) -> String {
    let errno = s.errno();
    format!(
        "mount_cb: RPC error: Mount failed with error {}({}) {}({errno})",
        s.name(),
        s.0,
        std::io::Error::from_raw_os_error(errno)
            .to_string()
            .split(" (os error")
            .next()
            .unwrap_or_default()
    )
}

impl Client {
    /// Mounts `export` of `host`.
    ///
    /// # Errors
    /// libnfs's text for what failed (QEMU puts "Failed to mount nfs share: " before it).
    pub(crate) async fn mount(host: &str, export: &str, caller: Caller) -> Result<Client, String> {
        let ip = resolve(host).await?;
        let mountd =
            connect_program(host, ip, (nfs3::MOUNT_PROGRAM, nfs3::MOUNT_V3), &caller).await?;
        let mut d = call_once(
            &mountd,
            (nfs3::MOUNT_PROGRAM, nfs3::MOUNT_V3, nfs3::MOUNTPROC3_MNT),
            &nfs3::dirpath_args(export),
        )
        .await?;
        let root = match nfs3::mnt_res(&mut d) {
            Ok(Ok(fh)) => fh,
            Ok(Err(s)) => return Err(mount_refused(s)),
            Err(_) => return Err("mount_cb: RPC error: malformed reply".to_owned()),
        };
        drop(mountd);
        let rpc = connect_program(host, ip, (nfs3::NFS_PROGRAM, nfs3::NFS_V3), &caller).await?;
        let client = Client {
            rpc: RefCell::new(Rc::new(rpc)),
            reconnecting: tokio::sync::Mutex::new(()),
            caller,
            host: host.to_owned(),
            ip,
            export: export.to_owned(),
            root,
            fsinfo: FsInfo { rtmax: 0, wtmax: 0 },
            attr: Cell::new(None),
            uncommitted: Uncommitted::default(),
            gate: tokio::sync::RwLock::new(()),
            opened: Cell::new(false),
            closed: Cell::new(false),
        };
        let fsinfo = client
            .fsinfo()
            .await
            .map_err(|e| format!("mount_cb: {e}"))?;
        Ok(Client { fsinfo, ..client })
    }

    /// FSINFO of the export's root, its transfer sizes capped (libnfs's checks).
    async fn fsinfo(&self) -> Result<FsInfo, String> {
        let what = format!("NFS: FSINFO of {} failed with", self.export);
        let mut d = self
            .call(nfs3::FSINFO, &nfs3::fh_args(&self.root), None)
            .await
            .map_err(|f| with_status(what.clone(), f))?;
        let mut info = nfs3::fsinfo_res(&mut d)
            .map_err(Failed::from)
            .and_then(|r| r.map_err(Failed::Status))
            .map_err(|f| with_status(what, f))?;
        if info.rtmax < MIN_XFER {
            return Err(format!("server max rsize of {}", info.rtmax));
        }
        if info.wtmax < MIN_XFER {
            return Err(format!("server max wsize of {}", info.wtmax));
        }
        info.rtmax = info.rtmax.min(MAX_XFER);
        info.wtmax = info.wtmax.min(MAX_XFER);
        tracing::debug!(rtmax = info.rtmax, wtmax = info.wtmax, "NFS transfer sizes");
        Ok(info)
    }

    /// From now on a lost connection is made again.
    pub(crate) fn opened(&self) {
        self.opened.set(true);
    }

    /// Calls NFS procedure `proc`; a lost connection is made again and the call sent
    /// anew once the node is open.
    pub(crate) async fn call(
        &self,
        proc: u32,
        args: &Enc,
        data: Option<Bytes>,
    ) -> Result<Dec, Failed> {
        let mut resent = 0;
        loop {
            let rpc = self.rpc.borrow().clone();
            match rpc
                .call(
                    (nfs3::NFS_PROGRAM, nfs3::NFS_V3, proc),
                    &args.0,
                    data.clone(),
                )
                .await
            {
                Ok(d) => return Ok(d),
                Err(CallError::Refused(s)) => return Err(Failed::Rpc(s)),
                Err(CallError::Lost(e)) => {
                    tracing::debug!(error = %e, "NFS connection lost");
                    if !self.opened.get() || self.closed.get() || resent == MAX_RESENDS {
                        return Err(Failed::Lost);
                    }
                    resent += 1;
                    self.reconnect(&rpc).await?;
                }
            }
        }
    }

    /// Connects to the NFS server again unless someone already replaced `failed`; tries
    /// each second until the server answers, the node closing ends it.
    async fn reconnect(&self, failed: &Rc<Rpc>) -> Result<(), Failed> {
        let _one = self.reconnecting.lock().await;
        if !Rc::ptr_eq(&self.rpc.borrow(), failed) {
            return Ok(());
        }
        failed.kill();
        loop {
            if self.closed.get() {
                return Err(Failed::Lost);
            }
            match Rpc::connect(failed.addr, &self.caller).await {
                Ok(rpc) => {
                    tracing::info!(server = %self.host, "NFS connection made again");
                    self.rpc.replace(Rc::new(rpc));
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, "NFS reconnect failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// A call whose result is read by `parse`: its status or garbage as a failure.
    async fn run<T>(
        &self,
        proc: u32,
        args: &Enc,
        parse: impl FnOnce(&mut Dec) -> nfs3::Res<T>,
    ) -> Result<T, Failed> {
        let mut d = self.call(proc, args, None).await?;
        parse(&mut d)?.map_err(Failed::Status)
    }

    /// The handle of `path` (relative to the export), symbolic links followed, and what
    /// LOOKUP said of it.
    ///
    /// # Errors
    /// libnfs's text.
    pub(crate) async fn lookup(&self, path: &str) -> Result<(Fh, Option<Attr>), String> {
        let mut path = normalize(path)?;
        let mut links = 0;
        'again: loop {
            let mut fh = self.root.clone();
            let mut attr = None;
            let parts: Vec<String> = path
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect();
            for (i, name) in parts.iter().enumerate() {
                let (next, a) = self
                    .run(
                        nfs3::LOOKUP,
                        &nfs3::lookup_args(&fh, name),
                        nfs3::lookup_res,
                    )
                    .await
                    .map_err(|f| with_status(format!("NFS: Lookup of {path} failed with"), f))?;
                if a.is_some_and(|a| a.kind == nfs3::NF3LNK) {
                    links += 1;
                    if links > MAX_LINKS {
                        return Err("Too many levels of symbolic links".to_owned());
                    }
                    let target = self
                        .run(nfs3::READLINK, &nfs3::fh_args(&next), nfs3::readlink_res)
                        .await
                        .map_err(|f| {
                            with_status(format!("NFS: READLINK of {path} failed with"), f)
                        })?;
                    let rest = parts[i + 1..].join("/");
                    let parent = parts[..i].join("/");
                    path = self.link_target(&parent, &target, &rest)?;
                    continue 'again;
                }
                fh = next;
                attr = a;
            }
            return Ok((fh, attr));
        }
    }

    /// The path a symbolic link in `parent` pointing at `target` leads to, with `rest`
    /// after it; absolute targets must lie in the export (libnfs's rule).
    fn link_target(&self, parent: &str, target: &str, rest: &str) -> Result<String, String> {
        let joined = if let Some(abs) = target.strip_prefix('/') {
            let inside = format!("/{abs}");
            let Some(tail) = inside.strip_prefix(self.export.trim_end_matches('/')) else {
                return Err("Symbolic link points outside export".to_owned());
            };
            if !tail.is_empty() && !tail.starts_with('/') {
                return Err("Symbolic link points outside export".to_owned());
            }
            format!("{tail}/{rest}")
        } else {
            format!("/{parent}/{target}/{rest}")
        };
        normalize(&joined).map_err(|_| "Symbolic link resolves to invalid path".to_owned())
    }

    /// libnfs's open: the path looked up, then ACCESS must grant exactly what the mode
    /// needs.
    ///
    /// # Errors
    /// libnfs's text (QEMU puts "Failed to open file : open call failed with" around it).
    pub(crate) async fn open(&self, path: &str, writable: bool) -> Result<Fh, String> {
        let (fh, _) = self.lookup(path).await?;
        let want = if writable {
            nfs3::ACCESS_READ | nfs3::ACCESS_MODIFY
        } else {
            nfs3::ACCESS_READ
        };
        let shown = normalize(path).unwrap_or_default();
        let got = self
            .run(
                nfs3::ACCESS,
                &nfs3::access_args(&fh, want),
                nfs3::access_res,
            )
            .await
            .map_err(|f| with_status(format!("NFS: ACCESS of {shown} failed with"), f))?;
        if got != want {
            let bits = |a: u32| {
                format!(
                    "{}{}{}",
                    if a & nfs3::ACCESS_READ != 0 { 'r' } else { '-' },
                    if a & nfs3::ACCESS_MODIFY != 0 {
                        'w'
                    } else {
                        '-'
                    },
                    if a & nfs3::ACCESS_EXECUTE != 0 {
                        'x'
                    } else {
                        '-'
                    },
                )
            };
            return Err(format!(
                "NFS: ACCESS denied. Required access {}. Allowed access {}",
                bits(want),
                bits(got)
            ));
        }
        Ok(fh)
    }

    /// libnfs's `creat` with `mode`: the file made in its directory (kept if it is there),
    /// then looked up.
    ///
    /// # Errors
    /// libnfs's text (QEMU puts "Failed to create file: creat call failed with" around it).
    pub(crate) async fn create(&self, path: &str, mode: u32) -> Result<Fh, String> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let (dir_fh, _) = self.lookup(if dir.is_empty() { "/" } else { dir }).await?;
        let what = format!("NFS: CREATE of {dir}/{name} failed with");
        self.run(
            nfs3::CREATE,
            &nfs3::create_args(&dir_fh, name, mode),
            nfs3::create_res,
        )
        .await
        .map_err(|f| with_status(what.clone(), f))?;
        let (fh, _) = self
            .run(
                nfs3::LOOKUP,
                &nfs3::lookup_args(&dir_fh, name),
                nfs3::lookup_res,
            )
            .await
            .map_err(|f| with_status(what, f))?;
        Ok(fh)
    }

    /// The file's attributes as the last answer about it said (READ, WRITE, COMMIT,
    /// SETATTR and GETATTR answers carry them).
    pub(crate) fn last_attr(&self) -> Option<Attr> {
        self.attr.get()
    }

    fn saw(&self, attr: Option<Attr>) {
        if attr.is_some() {
            self.attr.set(attr);
        }
    }

    pub(crate) async fn getattr(&self, fh: &Fh) -> Result<Attr, Failed> {
        let a = self
            .run(nfs3::GETATTR, &nfs3::fh_args(fh), nfs3::getattr_res)
            .await?;
        self.saw(Some(a));
        Ok(a)
    }

    pub(crate) async fn set_size(&self, fh: &Fh, size: u64) -> Result<(), Failed> {
        let after = self
            .run(
                nfs3::SETATTR,
                &nfs3::setattr_size_args(fh, size),
                nfs3::wcc_res,
            )
            .await?;
        self.saw(after);
        Ok(())
    }

    /// COMMIT: the writes answered so far are on stable storage. When its verifier shows
    /// the server restarted since some of them, they are written again, stable.
    ///
    /// # Errors
    /// The COMMIT's failure, or writes lost that were not kept.
    pub(crate) async fn commit(&self, fh: &Fh) -> Result<(), Failed> {
        let covered = self.uncommitted.take();
        let (after, verifier) = match self
            .run(nfs3::COMMIT, &nfs3::commit_args(fh), nfs3::commit_res)
            .await
        {
            Ok(r) => r,
            Err(f) => {
                self.uncommitted.put_back(covered);
                return Err(f);
            }
        };
        self.saw(after);
        tracing::trace!(verifier = ?verifier, writes = covered.held.len(), "NFS commit answered");
        if covered.all_under(&verifier) {
            return Ok(());
        }
        self.write_again(fh, covered, &verifier).await
    }

    /// The server restarted before it committed `covered`: they, and the writes answered
    /// since (none runs meanwhile), are written again in the order they were answered,
    /// each on stable storage before its answer.
    async fn write_again(
        &self,
        fh: &Fh,
        covered: Covered,
        verifier: &nfs3::Verifier,
    ) -> Result<(), Failed> {
        let _alone = self.gate.write().await;
        let newer = self.uncommitted.take();
        tracing::warn!(
            server = %self.host,
            writes = covered.held.len() + newer.held.len(),
            "NFS server restarted before committing: writing again"
        );
        for h in covered.held.iter().chain(&newer.held) {
            self.write_piece(fh, h.offset, h.data.clone(), nfs3::FILE_SYNC)
                .await
                .map_err(|(_, text)| Failed::Rpc(text))?;
        }
        if covered.lost_unkept(verifier) || newer.lost_unkept(verifier) {
            return Err(Failed::Rpc(
                "NFS: the server restarted before it committed writes too many to keep; \
                 they are lost"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Reads into `out` from `offset`: one READ per piece of the server's size, all at
    /// once, short answers asked again for the rest. How many bytes there were before the
    /// end of the file.
    ///
    /// # Errors
    /// The first failure, in libnfs's words.
    pub(crate) async fn read(&self, fh: &Fh, offset: u64, out: &mut [u8]) -> Result<usize, String> {
        let piece = self.fsinfo.rtmax as usize;
        let reads = out.chunks_mut(piece).enumerate().map(|(i, buf)| {
            let at = offset + (i * piece) as u64;
            self.read_piece(fh, at, buf)
        });
        let mut end = 0;
        for (i, r) in ferrite_block::join::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            let got = r?;
            if got > 0 {
                end = i * piece + got;
            }
        }
        Ok(end)
    }

    /// One piece: READs until it is full or the file ends.
    async fn read_piece(&self, fh: &Fh, offset: u64, buf: &mut [u8]) -> Result<usize, String> {
        let mut done = 0;
        while done < buf.len() {
            let want = buf.len() - done;
            let (data, eof, attr) = self
                .run(
                    nfs3::READ,
                    &nfs3::read_args(fh, offset + done as u64, want as u32),
                    |d| nfs3::read_res(d, want),
                )
                .await
                .map_err(|f| with_status("NFS: Read failed with".to_owned(), f))?;
            self.saw(attr);
            buf[done..done + data.len()].copy_from_slice(&data);
            done += data.len();
            if eof {
                break;
            }
            if data.is_empty() {
                return Err("NFS: Read failed. No bytes read and not at EOF!".to_owned());
            }
        }
        Ok(done)
    }

    /// Writes `data` at `offset`: one WRITE per piece of the server's size, all at once,
    /// short answers sent again for the rest; `stable` as the request needs it.
    ///
    /// # Errors
    /// The first failure, in libnfs's words, with its errno.
    pub(crate) async fn write(
        &self,
        fh: &Fh,
        offset: u64,
        data: Bytes,
        stable: u32,
    ) -> Result<(), (i32, String)> {
        let _shared = self.gate.read().await;
        let piece = self.fsinfo.wtmax as usize;
        let writes = (0..data.len()).step_by(piece.max(1)).map(|at| {
            let end = (at + piece).min(data.len());
            self.write_piece(fh, offset + at as u64, data.slice(at..end), stable)
        });
        for r in ferrite_block::join::join_all(writes).await {
            r?;
        }
        Ok(())
    }

    async fn write_piece(
        &self,
        fh: &Fh,
        offset: u64,
        mut data: Bytes,
        stable: u32,
    ) -> Result<(), (i32, String)> {
        let mut at = offset;
        while !data.is_empty() {
            let len = data.len() as u32;
            let mut d = self
                .call(
                    nfs3::WRITE,
                    &nfs3::write_args(fh, at, len, stable),
                    Some(data.clone()),
                )
                .await
                .map_err(|f| (f.errno(), with_status(String::new(), f)))?;
            let w = nfs3::write_res(&mut d)
                .map_err(|g| (libc::EIO, with_status(String::new(), g.into())))?
                .map_err(|s| (s.errno(), format!("NFS: Write failed with {s}")))?;
            self.saw(w.after);
            tracing::trace!(stable = w.stable, verifier = ?w.verifier, "NFS write answered");
            if w.count == 0 {
                return Err((libc::EIO, "NFS: Write failed. No bytes written!".to_owned()));
            }
            let count = (w.count as usize).min(data.len());
            if !w.stable {
                self.uncommitted.took(at, data.slice(..count), w.verifier);
            }
            data = data.slice(count..);
            at += count as u64;
        }
        Ok(())
    }

    /// Unmounts (best effort: the server forgets the client), and ends the connection.
    pub(crate) async fn close(&self) {
        self.closed.set(true);
        self.rpc.borrow().kill();
        let umount = async {
            let rpc = connect_program(
                &self.host,
                self.ip,
                (nfs3::MOUNT_PROGRAM, nfs3::MOUNT_V3),
                &self.caller,
            )
            .await?;
            call_once(
                &rpc,
                (nfs3::MOUNT_PROGRAM, nfs3::MOUNT_V3, nfs3::MOUNTPROC3_UMNT),
                &nfs3::dirpath_args(&self.export),
            )
            .await
            .map(|_| ())
        };
        if tokio::time::timeout(Duration::from_secs(1), umount)
            .await
            .is_err()
        {
            tracing::debug!("NFS unmount took too long");
        }
    }
}

/// A path as libnfs normalizes it: `/` first, no empty or `.` components, `..` taking
/// the one before (not past the root).
///
/// # Errors
/// libnfs's text for a path above the root.
pub(crate) fn normalize(path: &str) -> Result<String, String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("Absolute path starts with '/../' during normalization".to_owned());
                }
            }
            p => parts.push(p),
        }
    }
    Ok(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_normalize_as_libnfs_normalizes_them() {
        assert_eq!(normalize("/a.raw").as_deref(), Ok("/a.raw"));
        assert_eq!(normalize("//a/./b/").as_deref(), Ok("/a/b"));
        assert_eq!(normalize("/a/../b").as_deref(), Ok("/b"));
        assert_eq!(normalize("/").as_deref(), Ok("/"));
        assert!(normalize("/../a").is_err());
    }

    #[test]
    fn mount_refusals_carry_errno_and_its_text() {
        assert_eq!(
            mount_refused(MountStatus(13)),
            "mount_cb: RPC error: Mount failed with error MNT3ERR_ACCES(13) Permission denied(13)"
        );
    }
}
