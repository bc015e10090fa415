//! Turns one message's tokens into a value, with QEMU's error texts. The first error wins.

use crate::lexer::TokenKind;
use crate::streamer::{ParseError, Token};
use crate::utf8::{decode_one, is_valid_codepoint};
use crate::value::{QDict, QObject};

struct Parser<'a> {
    tokens: &'a [Token],
    text: &'a [u8],
    pos: usize,
}

type PResult<T> = Result<T, ParseError>;

/// Parses a complete message. The streamer hands over exactly one value's tokens, or an
/// unbalanced sequence, which fails.
pub(crate) fn parse_tokens(tokens: &[Token], text: &[u8]) -> PResult<QObject> {
    let mut p = Parser {
        tokens,
        text,
        pos: 0,
    };
    p.value()
}

fn premature() -> ParseError {
    ParseError::new("premature EOI")
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.peek();
        self.pos += 1;
        t
    }

    fn text_of(&self, t: Token) -> &'a [u8] {
        &self.text[t.start..t.end]
    }

    fn value(&mut self) -> PResult<QObject> {
        let t = self.peek().ok_or_else(premature)?;
        match t.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::String => {
                self.pos += 1;
                self.string(t).map(QObject::String)
            }
            TokenKind::Integer => {
                self.pos += 1;
                Ok(integer(self.text_of(t)))
            }
            TokenKind::Float => {
                self.pos += 1;
                Ok(QObject::Double(double(self.text_of(t))))
            }
            TokenKind::Keyword => {
                self.pos += 1;
                match self.text_of(t) {
                    b"true" => Ok(QObject::Bool(true)),
                    b"false" => Ok(QObject::Bool(false)),
                    b"null" => Ok(QObject::Null),
                    other => Err(ParseError::new(format_args!(
                        "invalid keyword '{}'",
                        String::from_utf8_lossy(other)
                    ))),
                }
            }
            _ => Err(ParseError::new("expecting value")),
        }
    }

    fn object(&mut self) -> PResult<QObject> {
        self.pos += 1; // '{'
        let mut dict = QDict::new();
        if self.peek().ok_or_else(premature)?.kind == TokenKind::RCurly {
            self.pos += 1;
            return Ok(QObject::Dict(dict));
        }
        loop {
            self.pair(&mut dict)?;
            let t = self.next().ok_or_else(premature)?;
            match t.kind {
                TokenKind::RCurly => return Ok(QObject::Dict(dict)),
                TokenKind::Comma => {}
                _ => return Err(ParseError::new("expected separator in dict")),
            }
        }
    }

    fn pair(&mut self, dict: &mut QDict) -> PResult<()> {
        self.peek().ok_or_else(premature)?;
        let QObject::String(key) = self.value()? else {
            return Err(ParseError::new("key is not a string in object"));
        };
        let colon = self.next().ok_or_else(premature)?;
        if colon.kind != TokenKind::Colon {
            return Err(ParseError::new("missing : in object pair"));
        }
        let value = self.value()?;
        if dict.contains_key(&key) {
            return Err(ParseError::new("duplicate key"));
        }
        dict.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> PResult<QObject> {
        self.pos += 1; // '['
        let mut list = Vec::new();
        if self.peek().ok_or_else(premature)?.kind == TokenKind::RSquare {
            self.pos += 1;
            return Ok(QObject::List(list));
        }
        loop {
            list.push(self.value()?);
            let t = self.next().ok_or_else(premature)?;
            match t.kind {
                TokenKind::RSquare => return Ok(QObject::List(list)),
                TokenKind::Comma => {}
                _ => return Err(ParseError::new("expected separator in list")),
            }
        }
    }

    /// Decodes a string token: its quotes, escapes and UTF-8.
    fn string(&self, t: Token) -> PResult<String> {
        let raw = self.text_of(t);
        // The lexer guarantees an opening and a closing quote.
        let body = &raw[1..raw.len() - 1];
        let mut out = String::with_capacity(body.len());
        let mut i = 0;
        while i < body.len() {
            let b = body[i];
            if b == b'\\' {
                let esc_start = i;
                i += 1;
                let c = body.get(i).copied().unwrap_or(0);
                i += 1;
                let simple = match c {
                    b'"' => Some('"'),
                    b'\'' => Some('\''),
                    b'\\' => Some('\\'),
                    b'/' => Some('/'),
                    b'b' => Some('\u{8}'),
                    b'f' => Some('\u{c}'),
                    b'n' => Some('\n'),
                    b'r' => Some('\r'),
                    b't' => Some('\t'),
                    b'u' => None,
                    _ => return Err(ParseError::new("invalid escape sequence in string")),
                };
                if let Some(ch) = simple {
                    out.push(ch);
                    continue;
                }
                let mut cp = hex4(body.get(i..));
                i += 4;
                if let Some(lead) = cp.filter(|c| (0xD800..=0xDBFF).contains(c))
                    && body.get(i) == Some(&b'\\')
                    && body.get(i + 1) == Some(&b'u')
                {
                    cp = match hex4(body.get(i + 2..)) {
                        Some(trail @ 0xDC00..=0xDFFF) => {
                            i += 6;
                            Some(0x10000 + ((lead & 0x3FF) << 10) + (trail & 0x3FF))
                        }
                        _ => None,
                    };
                }
                match cp
                    .filter(|&c| is_valid_codepoint(c))
                    .and_then(char::from_u32)
                {
                    Some(ch) => out.push(ch),
                    None => {
                        let end = i.min(body.len());
                        return Err(ParseError::new(format_args!(
                            "{} is not a valid Unicode character",
                            String::from_utf8_lossy(&body[esc_start..end])
                        )));
                    }
                }
            } else {
                let (cp, used) = decode_one(&body[i..]);
                match cp.and_then(char::from_u32) {
                    Some(ch) => out.push(ch),
                    None => return Err(ParseError::new("invalid UTF-8 sequence in string")),
                }
                i += used;
            }
        }
        Ok(out)
    }
}

fn hex4(s: Option<&[u8]>) -> Option<u32> {
    let s = s?.get(..4)?;
    let text = std::str::from_utf8(s).ok()?;
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(text, 16).ok()
}

/// An integer token: `i64` if it fits, else `u64` if non-negative, else a double.
fn integer(text: &[u8]) -> QObject {
    let s = std::str::from_utf8(text).unwrap_or("0");
    if let Ok(i) = s.parse::<i64>() {
        QObject::Int(i)
    } else if let Ok(u) = s.parse::<u64>() {
        QObject::UInt(u)
    } else {
        QObject::Double(double(text))
    }
}

fn double(text: &[u8]) -> f64 {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(0.0)
}
