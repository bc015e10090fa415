//! QEMU's `SocketAddress` (flat) and `SocketAddressLegacy` (`{type, data}`), read from
//! checked arguments.

use ferrite_qapi::{Args, Error};

/// QEMU's `InetSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InetAddr {
    /// The host name or address; empty listens on every address.
    pub host: String,
    /// The port number or service name.
    pub port: String,
    /// Listening: the host and port are numbers, not names (`AI_NUMERICHOST`).
    pub numeric: bool,
    /// Listening: the last port of a range to try after `port`.
    pub to: Option<u16>,
    /// Whether IPv4 is wanted (unset: whatever the host resolves to).
    pub ipv4: Option<bool>,
    /// Whether IPv6 is wanted.
    pub ipv6: Option<bool>,
    /// Connecting: TCP keep-alive on the connection.
    pub keep_alive: bool,
    /// Multipath TCP.
    pub mptcp: bool,
}

impl InetAddr {
    /// Reads an `InetSocketAddress`'s members.
    ///
    /// # Errors
    /// A missing `host` or `port` (the schema makes that a caller's bug).
    pub fn parse(a: &Args) -> Result<InetAddr, Error> {
        Ok(InetAddr {
            host: a.str("host")?.to_owned(),
            port: a.str("port")?.to_owned(),
            numeric: a.bool_or("numeric", false),
            to: a.opt_u64("to").and_then(|t| u16::try_from(t).ok()),
            ipv4: a.opt_bool("ipv4"),
            ipv6: a.opt_bool("ipv6"),
            keep_alive: a.bool_or("keep-alive", false),
            mptcp: a.bool_or("mptcp", false),
        })
    }

    /// `host:port`, as QEMU's errors name the address.
    pub fn target(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// QEMU's `UnixSocketAddress`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAddr {
    /// The file (or, with `abstract_ns`, the name); empty listens on a new file in the
    /// temporary directory.
    pub path: String,
    /// A name in Linux's abstract namespace rather than a file.
    pub abstract_ns: bool,
    /// An abstract name's address is as long as the name (else padded to the full size).
    pub tight: bool,
}

impl UnixAddr {
    /// Reads a `UnixSocketAddress`'s members.
    ///
    /// # Errors
    /// A missing `path`.
    pub fn parse(a: &Args) -> Result<UnixAddr, Error> {
        Ok(UnixAddr {
            path: a.str("path")?.to_owned(),
            abstract_ns: a.bool_or("abstract", false),
            tight: a.bool_or("tight", true),
        })
    }
}

/// QEMU's `VsockSocketAddress`: a context id and a port, as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockAddr {
    /// The context id (2: the host).
    pub cid: String,
    /// The port.
    pub port: String,
}

impl VsockAddr {
    /// `cid:port`, as QEMU's errors name the address.
    pub fn target(&self) -> String {
        format!("{}:{}", self.cid, self.port)
    }
}

/// A socket address of a kind ferrite serves or connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SocketAddress {
    /// A TCP host and port.
    Inet(InetAddr),
    /// A unix socket.
    Unix(UnixAddr),
    /// A virtual machine socket.
    Vsock(VsockAddr),
    /// A socket the monitor holds under this name (`getfd`), or a descriptor number on the
    /// command line.
    Fd(String),
}

impl SocketAddress {
    /// Reads a flat `SocketAddress` (`{type, host, port...}`).
    ///
    /// # Errors
    /// A missing member.
    pub fn parse(a: &Args) -> Result<SocketAddress, Error> {
        Self::from_members(a.str("type")?, a)
    }

    /// Reads a `SocketAddressLegacy` (`{type, data: {host, port...}}`).
    ///
    /// # Errors
    /// A missing member.
    pub fn parse_legacy(a: &Args) -> Result<SocketAddress, Error> {
        Self::from_members(a.str("type")?, &a.dict("data").unwrap_or_default())
    }

    fn from_members(ty: &str, a: &Args) -> Result<SocketAddress, Error> {
        Ok(match ty {
            "inet" => SocketAddress::Inet(InetAddr::parse(a)?),
            "unix" => SocketAddress::Unix(UnixAddr::parse(a)?),
            "vsock" => SocketAddress::Vsock(VsockAddr {
                cid: a.str("cid")?.to_owned(),
                port: a.str("port")?.to_owned(),
            }),
            "fd" => SocketAddress::Fd(a.str("str")?.to_owned()),
            other => {
                return Err(Error::generic(format!(
                    "Parameter 'type' does not accept value '{other}'"
                )));
            }
        })
    }

    /// How QEMU's chardevs name the address: `tcp:host:port`, `unix:path` (with
    /// `,abstract=on` and `,tight=on` for an abstract name), `vsock:cid:port`, `fd:name`.
    pub fn describe(&self) -> String {
        match self {
            SocketAddress::Inet(a) => format!("tcp:{}", a.target()),
            SocketAddress::Unix(a) if a.abstract_ns => format!(
                "unix:{},abstract=on{}",
                a.path,
                if a.tight { ",tight=on" } else { "" }
            ),
            SocketAddress::Unix(a) => format!("unix:{}", a.path),
            SocketAddress::Vsock(a) => format!("vsock:{}", a.target()),
            SocketAddress::Fd(name) => format!("fd:{name}"),
        }
    }

    /// What QEMU's "Failed to connect to '...'" names.
    pub fn target(&self) -> String {
        match self {
            SocketAddress::Inet(a) => a.target(),
            SocketAddress::Unix(a) => a.path.clone(),
            SocketAddress::Vsock(a) => a.target(),
            SocketAddress::Fd(name) => name.clone(),
        }
    }
}
