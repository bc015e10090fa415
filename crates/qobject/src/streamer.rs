//! Groups tokens into top-level messages and enforces QEMU's limits.
//!
//! A message ends when its braces and brackets balance (or go negative, which makes it an
//! error). Scalars at top level are messages of their own. Limits are QEMU's: 64 MiB of token
//! text and 2 Mi tokens per message, nesting depth 1024; breaking one ends the message with an
//! error and parsing carries on with whatever follows, so memory stays bounded.

use crate::lexer::{Lexer, TokenKind};
use crate::parser::parse_tokens;
use crate::utf8::lossy_from_bytes;
use crate::value::QObject;

/// A JSON syntax error, or a broken limit. `Display` gives QEMU's QMP error text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    message: String,
}

impl ParseError {
    /// A syntax error: "JSON parse error, <detail>".
    pub(crate) fn new(detail: impl std::fmt::Display) -> Self {
        ParseError {
            message: format!("JSON parse error, {detail}"),
        }
    }

    /// A broken limit: "JSON <what> limit exceeded".
    fn limit(what: &str) -> Self {
        ParseError {
            message: format!("JSON {what} limit exceeded"),
        }
    }
}

/// The limits a message must stay within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of token text in one message (and in one token).
    pub max_message_bytes: usize,
    /// Tokens in one message.
    pub max_tokens: usize,
    /// Open braces plus brackets.
    pub max_nesting: usize,
}

impl Default for Limits {
    /// QEMU's limits.
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 << 20,
            max_tokens: 2 << 20,
            max_nesting: 1024,
        }
    }
}

/// One token of the message being collected; its text lives in `Pending::text`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

#[derive(Default)]
struct Pending {
    tokens: Vec<Token>,
    text: Vec<u8>,
    braces: i64,
    brackets: i64,
}

/// A streaming JSON parser: feed it bytes as they arrive, get complete values (or errors) out.
pub struct JsonStreamer {
    lexer: Lexer,
    pending: Pending,
    limits: Limits,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer with QEMU's limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A streamer with the given limits (tests use small ones).
    pub fn with_limits(limits: Limits) -> Self {
        JsonStreamer {
            lexer: Lexer::new(limits.max_message_bytes),
            pending: Pending::default(),
            limits,
        }
    }

    /// Feeds bytes; each complete top-level value, or error, is passed to `emit` in order.
    pub fn feed(&mut self, bytes: &[u8], emit: impl FnMut(Result<QObject, ParseError>)) {
        self.lex(emit, |lexer, sink| {
            for &b in bytes {
                lexer.feed(b, sink);
            }
        });
    }

    /// Runs the lexer with a sink that turns tokens into messages for `emit`.
    fn lex<E: FnMut(Result<QObject, ParseError>)>(
        &mut self,
        mut emit: E,
        drive: impl FnOnce(&mut Lexer, &mut dyn FnMut(TokenKind, &[u8])),
    ) -> E {
        let JsonStreamer {
            lexer,
            pending,
            limits,
        } = self;
        let mut sink = |kind, text: &[u8]| on_token(pending, limits, kind, text, &mut emit);
        drive(lexer, &mut sink);
        emit
    }

    /// End of input: finishes a pending number or keyword and parses what is pending.
    pub fn finish(&mut self, emit: impl FnMut(Result<QObject, ParseError>)) {
        let mut emit = self.lex(emit, |lexer, sink| lexer.finish(sink));
        let pending = &mut self.pending;
        if !pending.tokens.is_empty() {
            let result = parse_tokens(&pending.tokens, &pending.text);
            *pending = Pending::default();
            emit(result);
        }
    }
}

fn on_token(
    p: &mut Pending,
    limits: &Limits,
    kind: TokenKind,
    text: &[u8],
    emit: &mut impl FnMut(Result<QObject, ParseError>),
) {
    match kind {
        TokenKind::LCurly => p.braces += 1,
        TokenKind::RCurly => p.braces -= 1,
        TokenKind::LSquare => p.brackets += 1,
        TokenKind::RSquare => p.brackets -= 1,
        TokenKind::Error => {
            let err = ParseError::new(format!("stray '{}'", lossy_from_bytes(text)));
            return reset_with(p, Err(err), emit);
        }
        _ => {}
    }
    let result =
        if kind == TokenKind::TooBig || p.text.len() + text.len() + 1 > limits.max_message_bytes {
            Some(Err(ParseError::limit("token size")))
        } else if p.tokens.len() + 1 > limits.max_tokens {
            Some(Err(ParseError::limit("token count")))
        } else if p.braces + p.brackets > limits.max_nesting as i64 {
            Some(Err(ParseError::limit("nesting depth")))
        } else {
            None
        };
    if let Some(err) = result {
        return reset_with(p, err, emit);
    }
    let start = p.text.len();
    p.text.extend_from_slice(text);
    p.tokens.push(Token {
        kind,
        start,
        end: p.text.len(),
    });
    let open = p.braces > 0 || p.brackets > 0;
    if open && p.braces >= 0 && p.brackets >= 0 {
        return;
    }
    let result = parse_tokens(&p.tokens, &p.text);
    reset_with(p, result, emit);
}

fn reset_with(
    p: &mut Pending,
    result: Result<QObject, ParseError>,
    emit: &mut impl FnMut(Result<QObject, ParseError>),
) {
    p.tokens.clear();
    p.text.clear();
    if p.text.capacity() > 1 << 20 {
        p.text.shrink_to(4096);
        p.tokens.shrink_to(256);
    }
    p.braces = 0;
    p.brackets = 0;
    emit(result);
}
