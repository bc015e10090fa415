//! `ringbuf` and `memory`: a fixed-size buffer keeping the newest bytes the frontend wrote.

use super::{Connection, NoInput};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

const DEFAULT_SIZE: i64 = 65536;

/// The ring: at most `size` bytes; writing more drops the oldest.
pub(crate) struct Ring {
    buf: Rc<RefCell<VecDeque<u8>>>,
    size: usize,
    memory: bool,
}

impl Ring {
    pub(crate) fn new(data: &Args, memory: bool) -> Result<Ring> {
        let size = data.opt_i64("size").unwrap_or(DEFAULT_SIZE);
        let size = usize::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .ok_or(Error::RingbufSize)?;
        Ok(Ring {
            buf: Rc::default(),
            size,
            memory,
        })
    }

    pub(crate) fn kind(&self) -> &'static str {
        if self.memory { "memory" } else { "ringbuf" }
    }

    /// Appends bytes, dropping the oldest beyond the size.
    pub(crate) fn write(&self, data: &[u8]) {
        push(&mut self.buf.borrow_mut(), self.size, data);
    }

    /// Removes and returns up to `max` of the oldest bytes.
    pub(crate) fn read(&self, max: usize) -> Vec<u8> {
        let mut buf = self.buf.borrow_mut();
        let n = max.min(buf.len());
        buf.drain(..n).collect()
    }

    pub(crate) fn connect(&self) -> Option<Connection> {
        Some(Connection {
            reader: Box::pin(NoInput),
            writer: Box::pin(RingWriter {
                buf: self.buf.clone(),
                size: self.size,
            }),
            fds: None,
            opened: true,
            output_outlives_input: false,
        })
    }
}

fn push(buf: &mut VecDeque<u8>, size: usize, data: &[u8]) {
    let data = &data[data.len().saturating_sub(size)..];
    let overflow = (buf.len() + data.len()).saturating_sub(size);
    buf.drain(..overflow);
    buf.extend(data);
}

struct RingWriter {
    buf: Rc<RefCell<VecDeque<u8>>>,
    size: usize,
}

impl AsyncWrite for RingWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        push(&mut self.buf.borrow_mut(), self.size, data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_bytes() {
        let mut b = VecDeque::new();
        push(&mut b, 8, b"hello world");
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), b"lo world");
        push(&mut b, 8, b"!!");
        assert_eq!(b.iter().copied().collect::<Vec<_>>(), b" world!!");
    }
}
