//! `null-co` and `null-aio`: a device of a given size that discards writes and reads zeroes
//! (or leaves read buffers unset with `read-zeroes=off`; ferrite returns zeroes anyway).

use crate::error::Error;
use ferrite_block::Node;
use ferrite_block::OpenCtx;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{DriverFactory, DriverKind, LocalFut};
use ferrite_qapi::Args;
use std::cell::Cell;
use std::time::Duration;

/// QEMU's default null device size: 1 GiB.
const DEFAULT_SIZE: i64 = 1 << 30;

pub(crate) struct NullDriver {
    aio: bool,
    size: Cell<u64>,
    latency: Duration,
    read_zeroes: bool,
    /// The options given, for `json:` file names.
    options: ferrite_qobject::QDict,
}

/// The factory of `null-co` (`aio` false) or `null-aio`.
pub(crate) struct NullFactory {
    pub(crate) aio: bool,
}

impl DriverFactory for NullFactory {
    fn name(&self) -> &'static str {
        if self.aio { "null-aio" } else { "null-co" }
    }

    fn check_filename(&self, name: &str) -> ferrite_block::Result<()> {
        let only = format!("{}://", self.name());
        if name == only {
            return Ok(());
        }
        Err(Error::NullFilename(only).into())
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let mut json = ferrite_qobject::QDict::new();
            for key in ["size", "read-zeroes"] {
                if let Some(v) = opts.get(key) {
                    json.insert(key, v.clone());
                }
            }
            Ok(Box::new(NullDriver::open(opts, self.aio, &json)?) as Box<dyn Driver>)
        })
    }
}

impl NullDriver {
    pub(crate) fn open(
        args: &Args,
        aio: bool,
        json_options: &ferrite_qobject::QDict,
    ) -> ferrite_block::Result<Self> {
        let size = args.opt_i64("size").unwrap_or(DEFAULT_SIZE);
        let size = u64::try_from(size).map_err(|_| Error::NegativeNullSize)?;
        // An unsigned member QEMU keeps in a signed one: from 2^63 on it is negative there.
        let latency = args.opt_u64("latency-ns").unwrap_or(0);
        if i64::try_from(latency).is_err() {
            return Err(Error::InvalidLatency.into());
        }
        Ok(NullDriver {
            aio,
            size: Cell::new(size),
            latency: Duration::from_nanos(latency),
            read_zeroes: args.bool_or("read-zeroes", false),
            options: json_options.clone(),
        })
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl Driver for NullDriver {
    fn format_name(&self) -> &'static str {
        if self.aio { "null-aio" } else { "null-co" }
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn len(&self, _node: &Node) -> u64 {
        self.size.get()
    }

    fn read<'a>(&'a self, _node: &'a Node, _offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.delay().await;
            Ok(vec![0u8; len])
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        _offset: u64,
        _len: u64,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.delay().await;
            Ok(())
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        // QEMU reports zeroes only when read-zeroes is on; otherwise the contents are
        // unspecified data.
        let zero = self.read_zeroes;
        Box::pin(async move {
            Ok(Extent {
                len,
                data: !zero,
                zero,
                allocated: true,
            })
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn strong_options(&self) -> ferrite_qobject::QDict {
        self.options.clone()
    }

    fn filename_is_option(&self) -> bool {
        false
    }

    /// Without options that change what it reads, QEMU names it `null-co://`.
    fn plain_filename(&self) -> Option<String> {
        self.options
            .is_empty()
            .then(|| format!("{}://", if self.aio { "null-aio" } else { "null-co" }))
    }

    fn reopen_check(&self, node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        ferrite_block::driver::check_unchanged(
            opts,
            &Args::new(node.options()),
            &["size", "latency-ns", "read-zeroes"],
        )
    }

    fn can_fast_zero(&self) -> bool {
        true
    }
}
