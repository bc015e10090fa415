//! The human monitor on a character device (`-monitor stdio`, `-mon chardev=X`): a banner,
//! the `(qemu) ` prompt, and a line editor that echoes what it reads the way QEMU's does
//! on a terminal it cannot query (each change redraws the line: cursor back over what was
//! shown, the line, clear to the end). Tests read that echo, so it is byte for byte.

use super::SystemCommands;
use ferrite_chardev::{Connection, Frontend, Reader, Writer};
use std::rc::Rc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROMPT: &str = "(qemu) ";
const CURSOR_LEFT: &[u8] = b"\x1b[D";
const CLEAR_TO_END: &[u8] = b"\x1b[K";

/// Where the editor is in an escape sequence (cursor keys and the like: read and ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Started,
    /// After `ESC [` or `ESC O`: parameters until a final letter.
    Sequence,
}

/// One line being typed.
#[derive(Debug, Default)]
pub(crate) struct LineEditor {
    line: Vec<u8>,
    /// How much of the line the terminal shows (the cursor is at its end).
    shown: usize,
    escape: Escape,
}

impl LineEditor {
    /// Takes one byte; what the terminal is to show goes to `echo`. A finished line is
    /// returned.
    pub(crate) fn feed(&mut self, byte: u8, echo: &mut Vec<u8>) -> Option<String> {
        match (self.escape, byte) {
            (Escape::Started, b'[' | b'O') => self.escape = Escape::Sequence,
            (Escape::Started, _) => self.escape = Escape::None,
            (Escape::Sequence, b'0'..=b'9' | b';') => {}
            (Escape::Sequence, _) => self.escape = Escape::None,
            (Escape::None, 0x1b) => self.escape = Escape::Started,
            (Escape::None, b'\r' | b'\n') => {
                echo.extend_from_slice(b"\r\n");
                self.shown = 0;
                let line = std::mem::take(&mut self.line);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            (Escape::None, 8 | 127) => {
                if self.line.pop().is_some() {
                    self.redraw(echo);
                }
            }
            (Escape::None, b) if b >= 32 => {
                self.line.push(b);
                self.redraw(echo);
            }
            // Other control characters (completion among them) do nothing here.
            (Escape::None, _) => {}
        }
        None
    }

    fn redraw(&mut self, echo: &mut Vec<u8>) {
        for _ in 0..self.shown {
            echo.extend_from_slice(CURSOR_LEFT);
        }
        echo.extend_from_slice(&self.line);
        echo.extend_from_slice(CLEAR_TO_END);
        self.shown = self.line.len();
    }
}

/// A connection the monitor has greeted.
struct Session {
    reader: Reader,
    writer: Writer,
}

/// Writes the banner; `None` if the other side is gone.
async fn greet(conn: Connection) -> Option<Session> {
    let mut writer = conn.writer;
    let banner = format!(
        "QEMU {} monitor - type 'help' for more information\r\n",
        crate::help::qemu_version()
    );
    writer.write_all(banner.as_bytes()).await.ok()?;
    writer.flush().await.ok()?;
    Some(Session {
        reader: conn.reader,
        writer,
    })
}

/// Serves the human monitor on `dev`'s connections until the program ends. A connection
/// that is there at once (stdio) is greeted before this returns, so the banner precedes
/// whatever start-up prints next.
pub(crate) async fn serve(dev: Frontend, cmds: Rc<SystemCommands>) {
    let d = dev.clone();
    let mut first = Box::pin(async move { d.accept().await });
    let ready = tokio::select! {
        biased;
        conn = &mut first => Some(conn),
        () = std::future::ready(()) => None,
    };
    let greeted = match ready {
        Some(Some(conn)) => Some(greet(conn).await),
        Some(None) => return,
        None => None,
    };
    tokio::task::spawn_local(async move {
        let mut session = match greeted {
            Some(s) => s,
            None => match first.await {
                Some(conn) => greet(conn).await,
                None => return,
            },
        };
        loop {
            if let Some(s) = session
                && !run_session(s, &cmds).await
            {
                return;
            }
            dev.disconnected();
            session = match dev.accept().await {
                Some(conn) => greet(conn).await,
                None => return,
            };
        }
    });
}

/// Shows the prompt once start-up is over, then reads and runs command lines until the
/// connection closes (true) or `quit` (false).
async fn run_session(mut s: Session, cmds: &SystemCommands) -> bool {
    cmds.system().machine.prompt_allowed().await;
    if s.writer.write_all(PROMPT.as_bytes()).await.is_err() {
        return true;
    }
    let _ = s.writer.flush().await;
    cmds.system().machine.prompt_is_out();
    cmds.system().machine.started().await;
    let mut editor = LineEditor::default();
    let mut buf = [0u8; 4096];
    loop {
        let n = match s.reader.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(n) => n,
        };
        let mut out = Vec::new();
        for &b in &buf[..n] {
            let Some(line) = editor.feed(b, &mut out) else {
                continue;
            };
            // The echo is out before the command runs (it may take a while).
            if s.writer.write_all(&out).await.is_err() {
                return true;
            }
            let _ = s.writer.flush().await;
            out.clear();
            out.extend_from_slice(super::run(cmds, &line, true).await.as_bytes());
            if cmds.system().machine.is_quitting() {
                let _ = s.writer.write_all(&out).await;
                let _ = s.writer.flush().await;
                return false;
            }
            out.extend_from_slice(PROMPT.as_bytes());
        }
        if s.writer.write_all(&out).await.is_err() || s.writer.flush().await.is_err() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LineEditor;

    fn typed(input: &[u8]) -> (Vec<String>, String) {
        let mut e = LineEditor::default();
        let mut echo = Vec::new();
        let lines = input.iter().filter_map(|&b| e.feed(b, &mut echo)).collect();
        (lines, String::from_utf8(echo).unwrap())
    }

    #[test]
    fn each_key_redraws_the_line() {
        let (lines, echo) = typed(b"abc\n");
        assert_eq!(lines, ["abc"]);
        assert_eq!(
            echo, "a\x1b[K\x1b[Dab\x1b[K\x1b[D\x1b[Dabc\x1b[K\r\n",
            "QEMU's echo on a terminal it cannot query"
        );
    }

    #[test]
    fn backspace_and_escapes_edit_the_line() {
        let (lines, _) = typed(b"ax\x7fb\x1b[Dc\r\n");
        assert_eq!(lines, ["abc", ""]);
        let (lines, echo) = typed(b"\x08\n");
        assert_eq!((lines, echo), (vec![String::new()], "\r\n".to_owned()));
    }
}
