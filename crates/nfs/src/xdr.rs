//! XDR (RFC 4506): the big-endian, four-byte-aligned encoding every RPC message is in.

use bytes::Bytes;

/// An XDR message being written.
#[derive(Default)]
pub(crate) struct Enc(pub(crate) Vec<u8>);

impl Enc {
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn bool(&mut self, v: bool) -> &mut Self {
        self.u32(u32::from(v))
    }

    /// Variable-length opaque data (or a string): its length, then the bytes padded to
    /// four.
    pub(crate) fn opaque(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
        self.0.resize(self.0.len().next_multiple_of(4), 0);
        self
    }
}

/// Why a message could not be read: it ended early or said something impossible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Garbage;

impl std::fmt::Display for Garbage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("malformed XDR")
    }
}

/// An XDR message being read.
pub(crate) struct Dec {
    buf: Bytes,
    at: usize,
}

impl Dec {
    pub(crate) fn new(buf: Bytes) -> Dec {
        Dec { buf, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], Garbage> {
        let end = self.at.checked_add(n).ok_or(Garbage)?;
        let s = self.buf.get(self.at..end).ok_or(Garbage)?;
        self.at = end;
        Ok(s)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Garbage> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Garbage> {
        Ok((u64::from(self.u32()?) << 32) | u64::from(self.u32()?))
    }

    pub(crate) fn bool(&mut self) -> Result<bool, Garbage> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Garbage),
        }
    }

    /// Variable-length opaque data of at most `max` bytes, without copying.
    pub(crate) fn opaque(&mut self, max: usize) -> Result<Bytes, Garbage> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(Garbage);
        }
        let start = self.at;
        self.take(n.next_multiple_of(4))?;
        Ok(self.buf.slice(start..start + n))
    }

    /// `n` bytes of fixed-length opaque data, skipped.
    pub(crate) fn skip(&mut self, n: usize) -> Result<(), Garbage> {
        self.take(n.next_multiple_of(4)).map(|_| ())
    }

    /// What is left unread.
    #[cfg(test)]
    pub(crate) fn rest(&self) -> usize {
        self.buf.len() - self.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_data_is_padded_and_read_back() {
        let mut e = Enc::default();
        e.u32(7).opaque(b"abcde").u64(1 << 40).bool(true);
        assert_eq!(e.0.len(), 4 + 4 + 8 + 8 + 4);
        let mut d = Dec::new(Bytes::from(e.0));
        assert_eq!(d.u32(), Ok(7));
        assert_eq!(d.opaque(5).as_deref(), Ok(&b"abcde"[..]));
        assert_eq!(d.u64(), Ok(1 << 40));
        assert_eq!(d.bool(), Ok(true));
        assert_eq!(d.rest(), 0);
        assert_eq!(d.u32(), Err(Garbage));
    }

    #[test]
    fn lengths_past_the_message_or_the_limit_are_refused() {
        let mut e = Enc::default();
        e.u32(0xffff_fff0);
        assert_eq!(
            Dec::new(Bytes::from(e.0.clone())).opaque(usize::MAX),
            Err(Garbage)
        );
        assert_eq!(Dec::new(Bytes::from(e.0)).opaque(64), Err(Garbage));
        let mut e = Enc::default();
        e.u32(2);
        assert_eq!(Dec::new(Bytes::from(e.0)).bool(), Err(Garbage));
    }
}
