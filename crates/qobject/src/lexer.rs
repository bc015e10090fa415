//! Splits bytes into JSON tokens, one byte at a time, with QEMU's error recovery.
//!
//! The grammar is RFC 8259's plus single-quoted strings. Validation inside strings (escapes,
//! UTF-8) is the parser's job; the lexer only finds where a string ends. After a byte no token
//! can continue with, the lexer reports the bytes so far as an error token and skips input up
//! to the next structural character, ASCII control character other than TAB, or 0xFE/0xFF:
//! that is how a client resynchronises (qemu-behaviour.md §1.1).

/// What a finished token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Comma,
    Colon,
    String,
    Integer,
    Float,
    Keyword,
    /// Bytes that fit no token; the text holds them, offending byte included.
    Error,
    /// A token that grew past the size limit; it ends the message with an error.
    TooBig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    String { quote: u8 },
    Escape { quote: u8 },
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// What one byte does in one state.
enum Step {
    /// Append the byte and move to the state.
    Take(State),
    /// Append the byte and finish a token.
    Finish(TokenKind),
    /// Finish a token without the byte, then look at the byte again from `Start`.
    FinishBefore(TokenKind),
    /// Drop the byte (white space, skipped input).
    Skip,
    /// Leave recovery and look at the byte again from `Start`.
    Resync,
    /// Append the byte and report the whole text as an error token.
    Fail,
}

/// The byte-at-a-time tokenizer. Token text accumulates in an internal buffer; each finished
/// token is handed to the caller's sink together with its text.
pub(crate) struct Lexer {
    state: State,
    token: Vec<u8>,
    max_token: usize,
}

fn is_structural(b: u8) -> bool {
    matches!(b, b'{' | b'}' | b'[' | b']' | b',' | b':')
}

fn structural_kind(b: u8) -> TokenKind {
    match b {
        b'{' => TokenKind::LCurly,
        b'}' => TokenKind::RCurly,
        b'[' => TokenKind::LSquare,
        b']' => TokenKind::RSquare,
        b',' => TokenKind::Comma,
        _ => TokenKind::Colon,
    }
}

impl Lexer {
    pub(crate) fn new(max_token: usize) -> Self {
        Lexer {
            state: State::Start,
            token: Vec::new(),
            max_token,
        }
    }

    fn step(state: State, b: u8) -> Step {
        use State as S;
        match state {
            S::Start => match b {
                b' ' | b'\t' | b'\r' | b'\n' => Step::Skip,
                b'"' | b'\'' => Step::Take(S::String { quote: b }),
                b'0' => Step::Take(S::Zero),
                b'1'..=b'9' => Step::Take(S::Digits),
                b'-' => Step::Take(S::Sign),
                b'a'..=b'z' => Step::Take(S::Keyword),
                _ if is_structural(b) => Step::Finish(structural_kind(b)),
                _ => Step::Fail,
            },
            S::Recovery => {
                if (b < 0x20 && b != b'\t') || b >= 0xFE || is_structural(b) {
                    Step::Resync
                } else {
                    Step::Skip
                }
            }
            S::String { quote } => match b {
                _ if b == quote => Step::Finish(TokenKind::String),
                b'\\' => Step::Take(S::Escape { quote }),
                0x20..=0xFD => Step::Take(state),
                _ => Step::Fail,
            },
            S::Escape { quote } => match b {
                0x20..=0xFD => Step::Take(S::String { quote }),
                _ => Step::Fail,
            },
            S::Zero => match b {
                b'0'..=b'9' => Step::Fail,
                b'.' => Step::Take(S::Mantissa),
                _ => Step::FinishBefore(TokenKind::Integer),
            },
            S::Sign => match b {
                b'0' => Step::Take(S::Zero),
                b'1'..=b'9' => Step::Take(S::Digits),
                _ => Step::Fail,
            },
            S::Digits => match b {
                b'0'..=b'9' => Step::Take(S::Digits),
                b'e' | b'E' => Step::Take(S::ExpE),
                b'.' => Step::Take(S::Mantissa),
                _ => Step::FinishBefore(TokenKind::Integer),
            },
            S::Mantissa => match b {
                b'0'..=b'9' => Step::Take(S::MantissaDigits),
                _ => Step::Fail,
            },
            S::MantissaDigits => match b {
                b'0'..=b'9' => Step::Take(S::MantissaDigits),
                b'e' | b'E' => Step::Take(S::ExpE),
                _ => Step::FinishBefore(TokenKind::Float),
            },
            S::ExpE => match b {
                b'+' | b'-' => Step::Take(S::ExpSign),
                b'0'..=b'9' => Step::Take(S::ExpDigits),
                _ => Step::Fail,
            },
            S::ExpSign => match b {
                b'0'..=b'9' => Step::Take(S::ExpDigits),
                _ => Step::Fail,
            },
            S::ExpDigits => match b {
                b'0'..=b'9' => Step::Take(S::ExpDigits),
                _ => Step::FinishBefore(TokenKind::Float),
            },
            S::Keyword => match b {
                b'a'..=b'z' => Step::Take(S::Keyword),
                _ => Step::FinishBefore(TokenKind::Keyword),
            },
        }
    }

    /// Feeds one byte; finished tokens go to `sink`.
    pub(crate) fn feed(&mut self, b: u8, sink: &mut dyn FnMut(TokenKind, &[u8])) {
        loop {
            match Self::step(self.state, b) {
                Step::Take(next) => {
                    self.token.push(b);
                    self.state = next;
                }
                Step::Finish(kind) => {
                    self.token.push(b);
                    self.emit(kind, sink);
                }
                Step::FinishBefore(kind) => {
                    self.emit(kind, sink);
                    continue;
                }
                Step::Skip => {}
                Step::Resync => {
                    self.state = State::Start;
                    continue;
                }
                Step::Fail => {
                    self.token.push(b);
                    sink(TokenKind::Error, &self.token);
                    self.token.clear();
                    self.state = State::Recovery;
                }
            }
            break;
        }
        if self.token.len() > self.max_token {
            sink(TokenKind::TooBig, &self.token);
            self.token.clear();
            self.token.shrink_to(4096);
            self.state = State::Start;
        }
    }

    fn emit(&mut self, kind: TokenKind, sink: &mut dyn FnMut(TokenKind, &[u8])) {
        sink(kind, &self.token);
        self.token.clear();
        self.state = State::Start;
    }

    /// End of input: a number or keyword still open is finished (a string is not).
    pub(crate) fn finish(&mut self, sink: &mut dyn FnMut(TokenKind, &[u8])) {
        let kind = match self.state {
            State::Zero | State::Digits => Some(TokenKind::Integer),
            State::MantissaDigits | State::ExpDigits => Some(TokenKind::Float),
            State::Keyword => Some(TokenKind::Keyword),
            _ => None,
        };
        if let Some(kind) = kind {
            self.emit(kind, sink);
        }
        self.token.clear();
        self.state = State::Start;
    }
}
