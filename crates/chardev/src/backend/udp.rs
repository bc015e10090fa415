//! `udp`: datagrams to and from one remote address, one connection for life.
//!
//! Each write is sent as one datagram; each datagram received is input. As in QEMU, the
//! chardev never reports itself open, so a monitor on it sends no greeting (QEMU's monitor
//! then crashes on the first input; ferrite's answers it, as a session that has not yet
//! negotiated capabilities).

use super::log::LogFile;
use super::{Connection, Reader, Writer};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;

/// The largest datagram read.
const DATAGRAM_MAX: usize = 64 << 10;

/// An inet address of a `ChardevUdp`, as given.
struct Inet {
    host: Option<String>,
    port: String,
    ipv4: Option<bool>,
    ipv6: Option<bool>,
}

impl Inet {
    fn parse(addr: &Args) -> Result<Inet> {
        if addr.str("type")? != "inet" {
            return Err(Error::NotDatagram);
        }
        let d = addr.dict("data").unwrap_or_default();
        Ok(Inet {
            host: Some(d.str("host")?.to_owned()).filter(|h| !h.is_empty()),
            port: d.str("port")?.to_owned(),
            ipv4: d.opt_bool("ipv4"),
            ipv6: d.opt_bool("ipv6"),
        })
    }

    fn family(&self) -> Result<i32> {
        Ok(ferrite_socket::inet::family(self.ipv4, self.ipv6)?)
    }
}

/// The first address for a datagram socket.
fn first(host: Option<&str>, port: &str, family: i32, flags: i32) -> Result<std::net::SocketAddr> {
    Ok(ferrite_socket::inet::resolve(host, Some(port), family, libc::SOCK_DGRAM, flags)?[0])
}

/// A UDP chardev.
pub(crate) struct Udp {
    socket: Rc<UdpSocket>,
    handed_out: Cell<bool>,
    log: Option<LogFile>,
}

impl Udp {
    pub(crate) fn open(data: &Args, log: Option<LogFile>) -> Result<Udp> {
        let remote = Inet::parse(&data.dict("remote").unwrap_or_default())?;
        let local = data.dict("local").map(|l| Inet::parse(&l)).transpose()?;
        let flags = libc::AI_CANONNAME | libc::AI_V4MAPPED | libc::AI_ADDRCONFIG;
        let peer_host = remote.host.as_deref().unwrap_or("localhost");
        let peer_family = remote.family()?;
        if remote.port.is_empty() {
            return Err(Error::NoRemotePort);
        }
        let peer = first(Some(peer_host), &remote.port, peer_family, flags)?;
        let family = if peer.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let (local_host, local_port) = match &local {
            Some(l) => (
                l.host.as_deref(),
                Some(l.port.as_str())
                    .filter(|p| !p.is_empty())
                    .unwrap_or("0"),
            ),
            None => (None, "0"),
        };
        let bind_to = first(local_host, local_port, family, libc::AI_PASSIVE)?;
        let domain = if peer.is_ipv4() {
            rustix::net::AddressFamily::INET
        } else {
            rustix::net::AddressFamily::INET6
        };
        let sock = rustix::net::socket_with(
            domain,
            rustix::net::SocketType::DGRAM,
            rustix::net::SocketFlags::CLOEXEC | rustix::net::SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| Error::Os {
            what: "Failed to create socket".into(),
            error: e.into(),
        })?;
        let _ = rustix::net::sockopt::set_socket_reuseaddr(&sock, true);
        rustix::net::bind(&sock, &bind_to).map_err(|e| Error::Os {
            what: "Failed to bind socket".into(),
            error: e.into(),
        })?;
        let std_sock = std::net::UdpSocket::from(sock);
        std_sock.connect(peer).map_err(|e| Error::Socket {
            what: "Failed to connect to",
            target: format!("{}:{local_port}", local_host.unwrap_or("(null)")),
            error: e,
        })?;
        let socket = UdpSocket::from_std(std_sock).map_err(|e| Error::Os {
            what: "Failed to create socket".into(),
            error: e,
        })?;
        Ok(Udp {
            socket: Rc::new(socket),
            handed_out: Cell::new(false),
            log,
        })
    }

    pub(crate) fn accept(&self) -> Option<Connection> {
        if self.handed_out.replace(true) {
            return None;
        }
        let reader: Reader = Box::pin(DatagramReader {
            socket: self.socket.clone(),
            received: Received::default(),
        });
        let writer: Writer = Box::pin(DatagramWriter(self.socket.clone()));
        Some(Connection {
            reader,
            writer: LogFile::tee(self.log.clone(), writer),
            fds: None,
            opened: false,
            output_outlives_input: false,
        })
    }
}

/// Reads datagrams as a byte stream. The remote refusing (an ICMP port unreachable,
/// reported on the next call) is not an error of the stream: datagrams to nobody are lost,
/// as they are to a peer that does not answer.
struct DatagramReader {
    socket: Rc<UdpSocket>,
    /// The datagram being read.
    received: Received,
}

/// Writes each buffer as a datagram (refusals as for [`DatagramReader`]).
struct DatagramWriter(Rc<UdpSocket>);

/// A datagram received: `len` bytes of `data`, of which `at` have been read.
#[derive(Default)]
struct Received {
    data: Vec<u8>,
    len: usize,
    at: usize,
}

fn refused(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::ConnectionRefused
}

impl AsyncRead for DatagramReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let DatagramReader { socket, received } = self.get_mut();
        loop {
            let Received { data, len, at } = received;
            if *at < *len {
                let n = (*len - *at).min(buf.remaining());
                buf.put_slice(&data[*at..*at + n]);
                *at += n;
                return Poll::Ready(Ok(()));
            }
            data.resize(DATAGRAM_MAX, 0);
            let mut rb = ReadBuf::new(data);
            let r = ready!(socket.poll_recv(cx, &mut rb));
            let received = rb.filled().len();
            (*len, *at) = (0, 0);
            match r {
                Ok(()) => *len = received,
                Err(e) if refused(&e) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for DatagramWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match ready!(self.0.poll_send(cx, data)) {
            Err(e) if refused(&e) => Poll::Ready(Ok(data.len())),
            r => Poll::Ready(r),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
