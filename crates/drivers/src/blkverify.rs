//! `blkverify`: a test driver that sends every request to two children, `test` (the image
//! under test) and `raw` (a raw copy known to be right), and checks that reads agree
//! (QEMU: block/blkverify.c). The node is a filter of `raw`.
//!
//! Where QEMU prints the mismatch and exits the process, ferrite prints the same line and
//! fails the request with EIO: a daemon serving other nodes keeps running.

use ferrite_block::driver::{BoxFut, Driver, ReqFlags};
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use ferrite_qobject::QObject;
use std::io;
use std::rc::Rc;

/// The `blkverify` driver's factory.
pub(crate) struct BlkverifyFactory;

impl DriverFactory for BlkverifyFactory {
    fn name(&self) -> &'static str {
        "blkverify"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn opens_as_protocol(&self) -> bool {
        // QEMU opens it with `bdrv_file_open`, as it does protocols.
        true
    }

    fn parse_filename(&self, name: &str) -> Option<ferrite_block::Result<ferrite_qobject::QDict>> {
        // Without the `blkverify:` prefix (read as the prefix says) the name is the image
        // under test's, its format probed; the raw copy must come from elsewhere.
        let test = ferrite_qobject::QDict::new().with("filename", name);
        Some(Ok(ferrite_qobject::QDict::new().with("test", test)))
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            // A protocol driver in QEMU: the node is listed before the children it opens.
            ctx.take_position_now();
            let raw = ctx.open_child("raw").await?;
            // The image under test given by name alone (`blkverify:RAW:TEST`) is opened in
            // the format it shows, as QEMU probes such data children.
            let named = match ctx.opts().get("test") {
                Some(QObject::Dict(d)) if d.get("driver").is_none() => d
                    .get("filename")
                    .and_then(QObject::as_str)
                    .map(str::to_owned),
                _ => None,
            };
            let test = match named {
                Some(path) => {
                    let format = ctx.probe(&path).await?;
                    let read_only = ctx.settings().read_only;
                    ctx.open_image("test", &path, format, read_only).await?
                }
                None => ctx.open_child("test").await?,
            };
            Ok(Box::new(Blkverify { raw, test }) as Box<dyn Driver>)
        })
    }
}

struct Blkverify {
    raw: Rc<Child>,
    test: Rc<Child>,
}

/// Says what went wrong as QEMU says it, and fails the request.
fn mismatch(kind: &str, offset: u64, len: u64, what: String) -> io::Error {
    eprintln!("blkverify: {kind} offset={offset} bytes={len} {what}");
    io::Error::from_raw_os_error(libc::EIO)
}

fn code(r: &io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
    }
}

impl Blkverify {
    /// Both children's results agree, or the request fails.
    fn agree<T>(
        kind: &str,
        offset: u64,
        len: u64,
        test: io::Result<T>,
        raw: io::Result<T>,
    ) -> io::Result<(T, T)> {
        if code(&test) != code(&raw) {
            let what = format!("return value mismatch {} != {}", code(&test), code(&raw));
            return Err(mismatch(kind, offset, len, what));
        }
        Ok((test?, raw?))
    }
}

impl Driver for Blkverify {
    ferrite_block::forward_to_child!(self.raw; block_status);

    fn format_name(&self) -> &'static str {
        "blkverify"
    }

    /// `blkverify:RAW:TEST`, as QEMU names the node when both children have plain names.
    fn plain_filename(&self) -> Option<String> {
        Some(format!(
            "blkverify:{}:{}",
            self.raw.node().exact_filename()?,
            self.test.node().exact_filename()?
        ))
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    /// A protocol driver in QEMU, which cannot say what it occupies: no `actual-size`.
    fn knows_allocated_size(&self) -> bool {
        false
    }

    fn len(&self, _node: &Node) -> u64 {
        self.test.len()
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            let (test, raw) = tokio::join!(self.test.read(offset, len), self.raw.read(offset, len));
            let (test, raw) = Self::agree("read", offset, len as u64, test, raw)?;
            if let Some(at) = test.iter().zip(&raw).position(|(a, b)| a != b) {
                let what = format!("contents mismatch at offset {}", offset + at as u64);
                return Err(mismatch("read", offset, len as u64, what));
            }
            Ok(test)
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let (test, raw) = tokio::join!(
                self.test.write(offset, data.clone(), flags),
                self.raw.write(offset, data, flags)
            );
            Self::agree("write", offset, len, test, raw).map(drop)
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        // As in QEMU, which gives blkverify no zeroing of its own: zeroes are written as
        // data, so both children hold the same bytes.
        Box::pin(async move {
            let write_flags = flags & ReqFlags::FUA;
            ferrite_block::driver::write_zeroes_as_data(offset, len, flags, |at, zeroes| {
                self.write(node, at, zeroes, write_flags)
            })
            .await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        // Discarded data is undefined: the two could no longer be compared.
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        // QEMU flushes only the test image, assuming the raw one is safe.
        Box::pin(self.test.flush())
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("raw")
    }
}
