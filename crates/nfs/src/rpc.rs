//! ONC RPC version 2 (RFC 5531) over TCP: calls with AUTH_UNIX credentials in record
//! marking, sent whole by one writer task; one reader task hands each reply to the call
//! waiting for its transaction id. Many calls are under way on a connection at once.

use crate::xdr::{Dec, Enc};
use bytes::{Bytes, BytesMut};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpSocket;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

/// The largest reply taken: a READ of the most the client asks for with its header;
/// anything longer is a broken server.
const MAX_RECORD: usize = 4 << 20;

/// The writer's buffer: calls smaller are gathered in it, larger payloads go straight out.
const WRITE_BUFFER: usize = 256 << 10;

/// The last fragment of a record (RFC 5531, 11).
const LAST_FRAGMENT: u32 = 1 << 31;

const AUTH_NONE: u32 = 0;
const AUTH_UNIX: u32 = 1;

/// Whom calls are made as (AUTH_UNIX) and how the connection is made.
#[derive(Clone, Debug)]
pub(crate) struct Caller {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// TCP_SYNCNT: how many SYNs a connect sends before it gives up.
    pub(crate) syn_count: Option<i32>,
}

/// A call that got no result.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The connection ended first (the call may be sent again on a new one).
    Lost(io::Error),
    /// The server answered that it would not run the call, in libnfs's words.
    Refused(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Lost(e) => write!(f, "{e}"),
            CallError::Refused(s) => f.write_str(s),
        }
    }
}

struct State {
    pending: RefCell<HashMap<u32, oneshot::Sender<Result<Dec, CallError>>>>,
    next_xid: Cell<u32>,
    alive: Cell<bool>,
    cred: Vec<u8>,
    out: mpsc::UnboundedSender<(Bytes, Option<Bytes>)>,
}

/// A connection to one RPC server.
pub(crate) struct Rpc {
    state: Rc<State>,
    tasks: [tokio::task::JoinHandle<()>; 2],
    /// Where it is connected.
    pub(crate) addr: SocketAddr,
}

fn ended() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "RPC connection ended")
}

/// The AUTH_UNIX credential: no stamp, the machine name, the ids, no other groups.
fn auth_unix(uid: u32, gid: u32) -> Vec<u8> {
    let mut body = Enc::default();
    body.u32(0).opaque(b"ferrite").u32(uid).u32(gid).u32(0);
    let mut e = Enc::default();
    e.u32(AUTH_UNIX).opaque(&body.0);
    e.0
}

/// The TCP ports /etc/services names: a reserved port a service may want is not taken
/// as a source port (libnfs does the same).
fn well_known_ports() -> &'static std::collections::HashSet<u16> {
    static PORTS: std::sync::OnceLock<std::collections::HashSet<u16>> = std::sync::OnceLock::new();
    PORTS.get_or_init(|| {
        let text = std::fs::read_to_string("/etc/services").unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split('#').next()?.split_whitespace().nth(1))
            .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
            .collect()
    })
}

/// A socket for `addr`, bound to a reserved port (512 to 1023) when the process may:
/// servers that export `secure` (Linux's default) take calls only from such ports.
fn socket(addr: SocketAddr, caller: &Caller) -> io::Result<TcpSocket> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(n) = caller.syn_count {
        set_syn_count(&s, n);
    }
    let start = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u16 % 400);
    let known = well_known_ports();
    for i in 0..512u16 {
        let port = 512 + (start + i) % 512;
        if known.contains(&port) {
            continue;
        }
        let local = SocketAddr::new(
            if addr.is_ipv4() {
                std::net::Ipv4Addr::UNSPECIFIED.into()
            } else {
                std::net::Ipv6Addr::UNSPECIFIED.into()
            },
            port,
        );
        match s.bind(local) {
            Ok(()) => break,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => break,
            Err(_) => {}
        }
    }
    Ok(s)
}

/// Sets TCP_SYNCNT; a value the kernel refuses leaves its default, as in libnfs.
fn set_syn_count(s: &TcpSocket, n: i32) {
    use std::os::fd::AsRawFd;
    let value: libc::c_int = n;
    // SAFETY: the descriptor is the socket's own and open for the call; the option's
    // value is a c_int that outlives the call, and its size is the one given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_SYNCNT,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(syn_count = n, "TCP_SYNCNT refused");
    }
}

impl Rpc {
    /// Connects to `addr`.
    ///
    /// # Errors
    /// The connection cannot be made.
    pub(crate) async fn connect(addr: SocketAddr, caller: &Caller) -> io::Result<Rpc> {
        let stream = socket(addr, caller)?.connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        let (out, queue) = mpsc::unbounded_channel();
        let state = Rc::new(State {
            pending: RefCell::default(),
            next_xid: Cell::new(start_xid()),
            alive: Cell::new(true),
            cred: auth_unix(caller.uid, caller.gid),
            out,
        });
        let writer = tokio::task::spawn_local(write_loop(w, queue, state.clone()));
        let reader = tokio::task::spawn_local(read_loop(r, state.clone()));
        Ok(Rpc {
            state,
            tasks: [writer, reader],
            addr,
        })
    }

    /// Calls procedure `proc` of program `prog` version `vers` with the encoded `args`
    /// and then `data` (a write's bytes, sent without a copy; XDR-padded here), and waits
    /// for the result.
    ///
    /// # Errors
    /// The connection ended, or the server refused the call.
    pub(crate) async fn call(
        &self,
        (prog, vers, proc): (u32, u32, u32),
        args: &[u8],
        data: Option<Bytes>,
    ) -> Result<Dec, CallError> {
        let s = &self.state;
        if !s.alive.get() {
            return Err(CallError::Lost(ended()));
        }
        let xid = s.xid();
        let data_len = data.as_ref().map_or(0, |d| d.len().next_multiple_of(4));
        let mut m = Enc(Vec::with_capacity(64 + s.cred.len() + args.len()));
        m.u32(0) // the record mark, set below
            .u32(xid)
            .u32(0) // CALL
            .u32(2)
            .u32(prog)
            .u32(vers)
            .u32(proc);
        m.0.extend_from_slice(&s.cred);
        m.u32(AUTH_NONE).u32(0);
        m.0.extend_from_slice(args);
        let len = (m.0.len() - 4 + data_len) as u32;
        m.0[..4].copy_from_slice(&(LAST_FRAGMENT | len).to_be_bytes());
        if let Some(d) = &data {
            // The opaque's padding goes with its bytes.
            if d.len() % 4 != 0 {
                let mut padded = BytesMut::with_capacity(data_len);
                padded.extend_from_slice(d);
                padded.resize(data_len, 0);
                return self.send(xid, m, Some(padded.freeze())).await;
            }
        }
        self.send(xid, m, data).await
    }

    async fn send(&self, xid: u32, m: Enc, data: Option<Bytes>) -> Result<Dec, CallError> {
        let s = &self.state;
        let (tx, rx) = oneshot::channel();
        s.pending.borrow_mut().insert(xid, tx);
        if s.out.send((Bytes::from(m.0), data)).is_err() {
            s.pending.borrow_mut().remove(&xid);
            return Err(CallError::Lost(ended()));
        }
        rx.await.unwrap_or_else(|_| Err(CallError::Lost(ended())))
    }

    /// Ends the connection now; calls waiting fail as lost.
    pub(crate) fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
        self.state.end(&ended());
    }
}

impl Drop for Rpc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A transaction id to start from that another client of the server is unlikely to use.
fn start_xid() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    t ^ std::process::id().rotate_left(16)
}

impl State {
    fn xid(&self) -> u32 {
        let mut xid = self.next_xid.get();
        while self.pending.borrow().contains_key(&xid) {
            xid = xid.wrapping_add(1);
        }
        self.next_xid.set(xid.wrapping_add(1));
        xid
    }

    fn end(&self, why: &io::Error) {
        self.alive.set(false);
        let pending: Vec<_> = self.pending.borrow_mut().drain().map(|(_, t)| t).collect();
        for tx in pending {
            let _ = tx.send(Err(CallError::Lost(io::Error::new(
                why.kind(),
                why.to_string(),
            ))));
        }
    }

    /// A reply: the result goes to its call.
    fn reply(&self, record: Bytes) -> io::Result<()> {
        let garbage = |_| io::Error::new(io::ErrorKind::InvalidData, "malformed RPC reply");
        let mut d = Dec::new(record);
        let xid = d.u32().map_err(garbage)?;
        if d.u32().map_err(garbage)? != 1 {
            // A call from the server (NFSv3 has none to a client): not ours.
            return Ok(());
        }
        let result = reply_body(&mut d).map_err(garbage)?;
        let Some(tx) = self.pending.borrow_mut().remove(&xid) else {
            return Ok(());
        };
        let _ = tx.send(result.map(|()| d));
        Ok(())
    }
}

/// After the xid and message type: `d` left at the results, or the refusal in words.
fn reply_body(d: &mut Dec) -> Result<Result<(), CallError>, crate::xdr::Garbage> {
    let refused = |s: String| Ok(Err(CallError::Refused(s)));
    match d.u32()? {
        0 => {
            // MSG_ACCEPTED: the verifier, then how.
            d.u32()?;
            d.opaque(400)?;
            match d.u32()? {
                0 => Ok(Ok(())),
                1 => refused("RPC error: program unavailable".into()),
                2 => {
                    let (low, high) = (d.u32()?, d.u32()?);
                    refused(format!(
                        "RPC error: program version mismatch (server supports {low}-{high})"
                    ))
                }
                3 => refused("RPC error: procedure unavailable".into()),
                4 => refused("RPC error: garbage arguments".into()),
                5 => refused("RPC error: system error".into()),
                n => refused(format!("RPC error: unknown accept status {n}")),
            }
        }
        1 => match d.u32()? {
            0 => refused("RPC error: RPC version mismatch".into()),
            1 => {
                let stat = d.u32()?;
                refused(format!("RPC error: authentication failed ({stat})"))
            }
            n => refused(format!("RPC error: unknown reject status {n}")),
        },
        _ => Err(crate::xdr::Garbage),
    }
}

async fn write_loop(
    w: OwnedWriteHalf,
    mut queue: mpsc::UnboundedReceiver<(Bytes, Option<Bytes>)>,
    state: Rc<State>,
) {
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, w);
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let sent: io::Result<()> = async {
            while let Some((head, data)) = next.take() {
                match data {
                    // A large payload goes out with its header in one system call.
                    Some(d) if d.len() >= WRITE_BUFFER => {
                        w.flush().await?;
                        write_both(w.get_mut(), &head, &d).await?;
                    }
                    Some(d) => {
                        w.write_all(&head).await?;
                        w.write_all(&d).await?;
                    }
                    None => w.write_all(&head).await?,
                }
                next = queue.try_recv().ok();
            }
            w.flush().await
        }
        .await;
        if let Err(e) = sent {
            state.end(&e);
            return;
        }
    }
}

/// Writes `a` then `b`, gathered.
async fn write_both(w: &mut OwnedWriteHalf, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() || !b.is_empty() {
        let n = w
            .write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])
            .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    Ok(())
}

async fn read_loop(r: OwnedReadHalf, state: Rc<State>) {
    let mut r = BufReader::with_capacity(256 << 10, r);
    let why = loop {
        match read_record(&mut r).await {
            Ok(record) => {
                if let Err(e) = state.reply(record) {
                    break e;
                }
            }
            Err(e) => break e,
        }
    };
    tracing::debug!(error = %why, "RPC connection ended");
    state.end(&why);
}

/// One record: its fragments joined, in a pooled buffer (a READ's megabyte is not
/// allocated, faulted in and freed for each reply).
async fn read_record(r: &mut BufReader<OwnedReadHalf>) -> io::Result<Bytes> {
    let mut record: Option<Vec<u8>> = None;
    loop {
        let mark = r.read_u32().await?;
        let len = (mark & !LAST_FRAGMENT) as usize;
        let at = record.as_ref().map_or(0, Vec::len);
        if at + len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "RPC record too long",
            ));
        }
        let buf = match record.take() {
            None => ferrite_block::io::pool::take(len),
            Some(mut joined) => {
                joined.resize(at + len, 0);
                joined
            }
        };
        // The buffer goes back to the pool also when the read fails.
        let mut buf = ferrite_block::io::pool::Pooled(buf);
        r.read_exact(&mut buf.0[at..]).await?;
        let buf = std::mem::take(&mut buf.0);
        if mark & LAST_FRAGMENT != 0 {
            return Ok(Bytes::from_owner(ferrite_block::io::pool::Pooled(buf)));
        }
        record = Some(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(stat: u32, tail: &[u32]) -> Dec {
        let mut e = Enc::default();
        e.u32(0).u32(AUTH_NONE).opaque(&[]).u32(stat);
        for v in tail {
            e.u32(*v);
        }
        Dec::new(Bytes::from(e.0))
    }

    #[test]
    fn replies_say_where_results_start_or_why_not() {
        let mut d = accepted(0, &[7, 8]);
        assert!(matches!(reply_body(&mut d), Ok(Ok(_))));
        assert_eq!(d.u32(), Ok(7));
        let mut d = accepted(2, &[3, 4]);
        match reply_body(&mut d) {
            Ok(Err(CallError::Refused(s))) => assert!(s.contains("3-4"), "{s}"),
            other => panic!("{other:?}"),
        }
        let mut e = Enc::default();
        e.u32(1).u32(1).u32(5);
        let mut d = Dec::new(Bytes::from(e.0));
        assert!(matches!(reply_body(&mut d), Ok(Err(CallError::Refused(_)))));
        let mut e = Enc::default();
        e.u32(9);
        let mut d = Dec::new(Bytes::from(e.0));
        assert!(reply_body(&mut d).is_err());
    }

    #[test]
    fn credentials_are_auth_unix() {
        let c = auth_unix(1000, 100);
        let mut d = Dec::new(Bytes::from(c));
        assert_eq!(d.u32(), Ok(AUTH_UNIX));
        let body = d.opaque(400).unwrap();
        let mut b = Dec::new(body);
        assert_eq!(b.u32(), Ok(0));
        assert_eq!(b.opaque(255).as_deref(), Ok(&b"ferrite"[..]));
        assert_eq!((b.u32(), b.u32(), b.u32()), (Ok(1000), Ok(100), Ok(0)));
    }
}
