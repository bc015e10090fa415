//! `ftp` and `ftps` (implicit TLS, the control and data connections both secured): a
//! session per transfer, its commands in libcurl's order, so that servers see what they see
//! from QEMU. The size comes from `SIZE`; a range is `REST` and `RETR` in passive mode
//! (`EPSV`, else `PASV` with the control connection's address), the data connection closed
//! and the transfer aborted (`ABOR`) once the range has arrived.

use crate::conn::{Stream, dial};
use crate::error::{Failure, Phase};
use crate::url::{Scheme, Url};
use ferrite_block::io::pool;
use ferrite_qapi::os_msg;
use ferrite_tls::WebTls;
use std::cell::Cell;
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// libcurl's password for anonymous logins.
const ANONYMOUS_PASSWORD: &str = "ftp@example.com";
/// The longest reply line read.
const MAX_LINE: u64 = 8 << 10;
/// How long the end of a session (ABOR, QUIT) is waited for.
const TAIL: Duration = Duration::from_secs(1);
/// The most read from the data connection into one piece.
const PIECE: usize = 256 << 10;

/// How a node reaches its FTP server.
pub(crate) struct FtpClient {
    url: Url,
    user: String,
    password: String,
    /// The path's directories (entered one by one) and the file's name, decoded.
    dirs: Vec<String>,
    file: String,
    tls: WebTls,
}

/// A logged-in control connection.
struct Control {
    io: BufReader<Stream>,
    /// The server's address: passive data connections go there.
    peer: IpAddr,
}

impl FtpClient {
    /// A client of `url`, logging in as the user given (else the URL's, else anonymous).
    pub(crate) fn new(
        url: Url,
        user: Option<String>,
        password: Option<String>,
        tls: WebTls,
    ) -> FtpClient {
        let user = user.or_else(|| url.user.clone());
        let password = password
            .or_else(|| url.password.clone())
            .unwrap_or_else(|| match user {
                Some(_) => String::new(),
                None => ANONYMOUS_PASSWORD.to_owned(),
            });
        let path = url.target.split(['?', ';']).next().unwrap_or("/");
        let mut parts: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(crate::url::decode)
            .collect();
        let file = parts.pop().unwrap_or_default();
        FtpClient {
            user: user.unwrap_or_else(|| "anonymous".to_owned()),
            password,
            dirs: parts.into_iter().filter(|d| !d.is_empty()).collect(),
            file,
            url,
            tls,
        }
    }

    /// The file's size, by `SIZE`.
    pub(crate) async fn probe(&self, phase: &Cell<Phase>) -> Result<u64, Failure> {
        let mut c = self.login(phase).await?;
        let size = async {
            c.command("TYPE I").await?;
            let (code, text) = c.command(&format!("SIZE {}", self.file)).await?;
            let size = match code {
                213 => text.trim().parse().map_err(|_| Failure::NoSize)?,
                _ => return Err(Failure::NoFile),
            };
            c.command("REST 0").await?;
            Ok(size)
        }
        .await;
        c.quit().await;
        size
    }

    /// The bytes `start..=last`, given to `sink` piece by piece as they arrive.
    pub(crate) async fn fetch(
        &self,
        start: u64,
        last: u64,
        phase: &Cell<Phase>,
        sink: &mut dyn FnMut(Vec<u8>) -> u64,
    ) -> Result<(), Failure> {
        let mut c = self.login(phase).await?;
        let port = c.passive().await?;
        c.command("TYPE I").await?;
        c.command(&format!("SIZE {}", self.file)).await?;
        if start > 0 {
            let (code, _) = c.command(&format!("REST {start}")).await?;
            if code != 350 {
                return Err(Failure::Rest);
            }
        }
        // The data connection is made, and secured, before RETR (as libcurl does).
        let data = dial(&c.peer.to_string(), port, phase, false).await?;
        let mut data = match self.url.scheme {
            Scheme::Ftps => Stream::secure(data, &self.tls, &self.url.host).await?,
            _ => Stream::Plain(data),
        };
        let (code, _) = c.command(&format!("RETR {}", self.file)).await?;
        if !matches!(code, 125 | 150) {
            return Err(Failure::Retr(code));
        }
        let want = last - start + 1;
        let mut got = 0u64;
        phase.set(Phase::Transferring {
            received: 0,
            total: Some(want),
        });
        while got < want {
            let mut piece = pool::take((want - got).min(PIECE as u64) as usize);
            let n = data
                .read(&mut piece)
                .await
                .map_err(|e| Failure::Recv(os_msg(&e)))?;
            if n == 0 {
                pool::give(piece);
                return Err(Failure::Short(want - got));
            }
            piece.truncate(n);
            got += n as u64;
            phase.set(Phase::Transferring {
                received: got,
                total: Some(want),
            });
            if sink(piece) == 0 {
                break;
            }
        }
        drop(data);
        // The rest of the file is not wanted: the transfer is aborted, as libcurl does.
        c.abort().await;
        c.quit().await;
        Ok(())
    }

    /// Connects (securing the connection for `ftps`), logs in, protects the data
    /// connections (`ftps`) and enters the path's directories.
    async fn login(&self, phase: &Cell<Phase>) -> Result<Control, Failure> {
        let tcp = dial(&self.url.host, self.url.port, phase, false).await?;
        let peer = tcp.peer_addr().map_err(|e| Failure::Recv(os_msg(&e)))?.ip();
        let stream = match self.url.scheme {
            Scheme::Ftps => Stream::secure(tcp, &self.tls, &self.url.host).await?,
            _ => Stream::Plain(tcp),
        };
        phase.set(Phase::Transferring {
            received: 0,
            total: None,
        });
        let mut c = Control {
            io: BufReader::new(stream),
            peer,
        };
        let (code, _) = c.reply().await?;
        if code / 100 != 2 {
            return Err(Failure::Greeting(code));
        }
        let (code, _) = c.command(&format!("USER {}", self.user)).await?;
        match code {
            230 => {}
            331 | 332 => {
                let (code, _) = c.command(&format!("PASS {}", self.password)).await?;
                if code / 100 != 2 {
                    return Err(Failure::AccessDenied(code));
                }
            }
            other => return Err(Failure::AccessDenied(other)),
        }
        if self.url.scheme == Scheme::Ftps {
            c.command("PBSZ 0").await?;
            c.command("PROT P").await?;
        }
        c.command("PWD").await?;
        for dir in &self.dirs {
            let (code, _) = c.command(&format!("CWD {dir}")).await?;
            if code / 100 != 2 {
                c.quit().await;
                return Err(Failure::Cwd);
            }
        }
        Ok(c)
    }
}

impl Control {
    /// Sends a command line.
    async fn send(&mut self, line: &str) -> Result<(), Failure> {
        let w = self.io.get_mut();
        w.write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(|e| Failure::Send(os_msg(&e)))?;
        w.flush().await.map_err(|e| Failure::Send(os_msg(&e)))
    }

    /// Sends a command and reads its reply.
    async fn command(&mut self, line: &str) -> Result<(u16, String), Failure> {
        self.send(line).await?;
        self.reply().await
    }

    /// A reply: its code and the text of its last line (a multi-line reply ends with the
    /// line that repeats the code followed by a space).
    async fn reply(&mut self) -> Result<(u16, String), Failure> {
        let mut first: Option<u16> = None;
        loop {
            let mut raw = Vec::new();
            let n = (&mut self.io)
                .take(MAX_LINE)
                .read_until(b'\n', &mut raw)
                .await
                .map_err(|e| Failure::Recv(os_msg(&e)))?;
            if n == 0 {
                return Err(Failure::EmptyReply);
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let code = line
                .get(..3)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (100..600).contains(c));
            let last = line.as_bytes().get(3) != Some(&b'-');
            match (first, code) {
                (None, None) => return Err(Failure::NotHttp),
                (None, Some(c)) if last => return Ok((c, line[3..].trim().to_owned())),
                (None, Some(c)) => first = Some(c),
                (Some(f), Some(c)) if c == f && last => {
                    return Ok((c, line[3..].trim().to_owned()));
                }
                _ => {}
            }
        }
    }

    /// The data port the server listens on: `EPSV`'s, else `PASV`'s (whose address is
    /// not used, as libcurl does not: the control connection's is).
    async fn passive(&mut self) -> Result<u16, Failure> {
        let (code, text) = self.command("EPSV").await?;
        if code == 229 {
            let port = text
                .split('|')
                .filter_map(|p| p.parse::<u16>().ok())
                .next_back();
            return port.ok_or(Failure::NoPassive);
        }
        let (code, text) = self.command("PASV").await?;
        if code != 227 {
            return Err(Failure::NoPassive);
        }
        let inner = text
            .split_once('(')
            .and_then(|(_, r)| r.split_once(')'))
            .map_or(text.as_str(), |(i, _)| i);
        let numbers: Vec<u16> = inner
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        match numbers[..] {
            [_, _, _, _, hi, lo] if hi < 256 && lo < 256 => Ok(hi << 8 | lo),
            _ => Err(Failure::NoPassive),
        }
    }

    /// Aborts the transfer, reading replies up to the first that is not the transfer's
    /// being cut short (426, 451), for a moment at most.
    async fn abort(&mut self) {
        let replies = async {
            self.send("ABOR").await?;
            loop {
                let (code, _) = self.reply().await?;
                if code / 100 != 1 && code != 426 && code != 451 {
                    return Ok::<(), Failure>(());
                }
            }
        };
        let _ = tokio::time::timeout(TAIL, replies).await;
    }

    /// Ends the session, waiting a moment for its reply (a connection dropped with replies
    /// unread is reset, and the server may then not see the QUIT).
    async fn quit(&mut self) {
        let _ = tokio::time::timeout(TAIL, self.command("QUIT")).await;
    }
}
