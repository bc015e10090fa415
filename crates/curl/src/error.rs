//! Why a transfer failed, in libcurl's words (QEMU shows them after "CURL: Error opening
//! file: " when a node opens, and after "curl: " on standard error when a read fails).

use std::cell::Cell;
use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

/// Runs the transfer `f` within `limit` (none: no limit); past it, says what the transfer
/// was doing (`phase`).
pub(crate) async fn timed<T>(
    limit: Option<Duration>,
    phase: &Cell<Phase>,
    f: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    let Some(limit) = limit else {
        return f.await;
    };
    let started = Instant::now();
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(Failure::TimedOut {
            phase: phase.get(),
            after: started.elapsed(),
        }),
    }
}

/// What the transfer was doing when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Resolving,
    Connecting,
    /// Sending the request or receiving the reply: so many bytes of the body so far, of so
    /// many if the server said.
    Transferring {
        received: u64,
        total: Option<u64>,
    },
}

/// A failed transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The URL does not parse. (QEMU's message is empty here: libcurl leaves its buffer
    /// empty for a URL it refuses.)
    Malformed,
    BadPort,
    /// A scheme other than `http` and `https` (a redirection elsewhere).
    Unsupported(String),
    Resolve(String),
    ResolveProxy(String),
    /// A proxy refused the `CONNECT` tunnel with this status.
    Tunnel(u16),
    Connect {
        host: String,
        port: u16,
        after: Duration,
    },
    Tls(String),
    EmptyReply,
    /// Not an HTTP reply.
    NotHttp,
    /// An HTTP version other than 1.0 and 1.1, or no status.
    Weird,
    /// The server answered with an error status (400 and up).
    Status(u16),
    NoSize,
    NoRanges,
    /// The reply ended before its length.
    Short(u64),
    /// A ranged reply that is not the range asked for.
    WrongRange,
    TooManyRedirects(u32),
    TimedOut {
        phase: Phase,
        after: Duration,
    },
    /// FTP: the greeting was not 220.
    Greeting(u16),
    /// FTP: the login was refused.
    AccessDenied(u16),
    /// FTP: a directory of the path could not be entered.
    Cwd,
    /// FTP: `SIZE` found no file.
    NoFile,
    /// FTP: neither `EPSV` nor `PASV` gave a data port.
    NoPassive,
    /// FTP: `REST` was refused.
    Rest,
    /// FTP: `RETR` was refused with this code.
    Retr(u16),
    Send(String),
    Recv(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Malformed => f.write_str("URL using bad/illegal format or missing URL"),
            Failure::BadPort => {
                f.write_str("Port number was not a decimal number between 0 and 65535")
            }
            Failure::Unsupported(s) => {
                write!(f, "Protocol \"{s}\" not supported or disabled in libcurl")
            }
            Failure::Resolve(host) => write!(f, "Could not resolve host: {host}"),
            Failure::ResolveProxy(host) => write!(f, "Could not resolve proxy: {host}"),
            Failure::Tunnel(code) => write!(f, "CONNECT tunnel failed, response {code}"),
            Failure::Connect { host, port, after } => write!(
                f,
                "Failed to connect to {host} port {port} after {} ms: Couldn't connect to server",
                after.as_millis()
            ),
            Failure::Tls(text) => f.write_str(text),
            Failure::EmptyReply => f.write_str("Empty reply from server"),
            Failure::NotHttp => f.write_str("Received HTTP/0.9 when not allowed"),
            Failure::Weird => f.write_str("Unsupported HTTP version in response"),
            Failure::Status(code) => write!(f, "The requested URL returned error: {code}"),
            Failure::NoSize => f.write_str("Server didn't report file size."),
            Failure::NoRanges => f.write_str("Server does not support 'range' (byte ranges)."),
            Failure::Short(left) => {
                write!(f, "transfer closed with {left} bytes remaining to read")
            }
            Failure::WrongRange => {
                f.write_str("Server replied with another range than the one asked for")
            }
            Failure::TooManyRedirects(n) => write!(f, "Maximum ({n}) redirects followed"),
            Failure::TimedOut { phase, after } => {
                let ms = after.as_millis();
                match phase {
                    Phase::Resolving => write!(f, "Resolving timed out after {ms} milliseconds"),
                    Phase::Connecting => {
                        write!(f, "Connection timed out after {ms} milliseconds")
                    }
                    Phase::Transferring {
                        received,
                        total: Some(total),
                    } => write!(
                        f,
                        "Operation timed out after {ms} milliseconds with {received} out of \
                         {total} bytes received"
                    ),
                    Phase::Transferring {
                        received,
                        total: None,
                    } => write!(
                        f,
                        "Operation timed out after {ms} milliseconds with {received} bytes \
                         received"
                    ),
                }
            }
            Failure::Greeting(code) => write!(
                f,
                "Got a {code:03} ftp-server response when 220 was expected"
            ),
            Failure::AccessDenied(code) => write!(f, "Access denied: {code:03}"),
            Failure::Cwd => f.write_str("Server denied you to change to the given directory"),
            Failure::NoFile => f.write_str("The file does not exist"),
            Failure::NoPassive => f.write_str("Failed EPSV and PASV: no data connection"),
            Failure::Rest => f.write_str("Couldn't use REST"),
            Failure::Retr(code) => write!(f, "RETR response: {code:03}"),
            Failure::Send(e) => write!(f, "Send failure: {e}"),
            Failure::Recv(e) => write!(f, "Recv failure: {e}"),
        }
    }
}
