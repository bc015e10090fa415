//! The `qcow2` driver's factory: opening a node (its file, data file and backing file),
//! creating images, amending them, and probing for the format.

use crate::CorruptionHook;
use crate::error::Error;
use crate::meta::Corruption;
use crate::{Qcow2Driver, new_image};
use ferrite_block::driver::Driver;
use ferrite_block::{DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::rc::Rc;

/// `BLOCK_IMAGE_CORRUPTED` through `events`.
pub(crate) fn corruption_event(events: Rc<dyn ferrite_block::EventSink>) -> CorruptionHook {
    Rc::new(move |node: &Node, c: &Corruption, fatal: bool| {
        // QEMU's qcow2 says so on standard error too, without the program's name.
        if fatal {
            eprintln!(
                "qcow2: Marking image as corrupt: {}; further corruption events will be suppressed",
                c.msg
            );
        } else {
            eprintln!(
                "qcow2: Image is corrupt: {}; further non-fatal corruption events will be suppressed",
                c.msg
            );
        }
        events.emit(&ferrite_block::BlockImageCorrupted {
            device: node.device_name(),
            node_name: node.name().to_owned(),
            msg: c.msg.clone(),
            offset: c.offset,
            size: c.size,
            fatal,
        });
    })
}

/// The `qcow2` driver's factory.
pub(crate) struct Qcow2Factory;

impl DriverFactory for Qcow2Factory {
    fn name(&self) -> &'static str {
        "qcow2"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let read_only = ctx.settings().read_only;
            let file = ctx.open_child("file").await?;
            ctx.claim_for_metadata(&file)?;
            let mut opening = Qcow2Driver::begin_open(opts, &file, read_only).await?;
            if opening.aes_encrypted() && ctx.graph().registry().for_emulator() {
                return Err(Error::AesInEmulator.into());
            }
            open_data_file(ctx, opening.data_file(), read_only).await?;
            // The password of an encrypted image, from its `secret` object.
            if let Some(id) = opts
                .dict("encrypt")
                .and_then(|e| e.opt_str("key-secret").map(str::to_owned))
            {
                opening.set_password(ctx.graph().secrets().get(&id)?);
            }
            // Opened inactive, the image is only read (as `active=off` says to `finish`).
            let inactive;
            let finish_opts = if ctx.opens_active() {
                opts
            } else {
                inactive = Args::new(opts.as_dict().clone().with("active", false));
                &inactive
            };
            let drv = opening
                .finish(finish_opts, &file, corruption_event(ctx.events()))
                .await?;
            ctx.take_position_now();
            ctx.open_backing(&file, drv.backing_filename()).await?;
            Ok(Box::new(drv) as Box<dyn Driver>)
        })
    }

    fn can_create(&self) -> bool {
        true
    }

    fn create<'a>(&'a self, graph: &'a Rc<Graph>, opts: &'a Args) -> LocalFut<'a, ()> {
        Box::pin(new_image::create(graph, opts))
    }

    fn can_amend(&self) -> bool {
        true
    }

    fn amend<'a>(
        &'a self,
        graph: &'a Graph,
        node: &'a Rc<Node>,
        opts: &'a Args,
        force: bool,
    ) -> LocalFut<'a, ()> {
        // QEMU amends only the key slots of a LUKS-encrypted image.
        Box::pin(async move {
            let Some(encrypt) = opts.dict("encrypt") else {
                return Ok(());
            };
            let drv = node
                .driver_as::<crate::Qcow2Driver>()
                .ok_or(ferrite_block::Error::CannotAmend)?;
            drv.amend_key_slots(graph, node, &encrypt, force).await
        })
    }

    /// QEMU's test: a whole header (112 bytes) with the magic and a version of 2 or more.
    fn probe(&self, head: &[u8]) -> bool {
        const HEADER_LEN: usize = 112;
        head.len() >= HEADER_LEN
            && head.starts_with(b"QFI\xfb")
            && u32::from_be_bytes([head[4], head[5], head[6], head[7]]) >= 2
    }

    fn supports_backing(&self) -> bool {
        true
    }

    /// qcow2's creation options as ferrite makes images by name (QEMU's defaults).
    fn formatting_options(&self, size: u64, backing: Option<(&str, &str)>) -> String {
        format!(
            "cluster_size=65536 extended_l2=off compression_type=zlib size={size}{} \
             lazy_refcounts=off refcount_bits=16",
            ferrite_block::backing_options(backing)
        )
    }
}

/// The external data file of an image: the `data-file` option, or the file the header
/// names (relative to the working directory, as QEMU takes it).
async fn open_data_file(
    ctx: &mut OpenCtx<'_>,
    spec: Option<crate::DataFile>,
    read_only: bool,
) -> ferrite_block::Result<()> {
    let opts = ctx.opts();
    let Some(spec) = spec else {
        if let Some(v) = opts.get("data-file").cloned() {
            // QEMU opens the child first: a name that finds nothing says so.
            ctx.open_child_ref("data-file", &v).await?;
            return Err(Error::DataFileNotExpected.into());
        }
        return Ok(());
    };
    if let Some(v) = opts.get("data-file") {
        let v = v.clone();
        return ctx.open_child_ref("data-file", &v).await.map(drop);
    }
    let name = spec.name.ok_or(Error::DataFileRequired)?;
    // A child QEMU opens for the node: its cache modes, and discards passed on.
    let file_opts = QDict::new()
        .with("driver", "file")
        .with("filename", name.as_str())
        .with("read-only", read_only)
        .with("discard", "unmap");
    let file_opts = ["cache", "force-share"]
        .into_iter()
        .filter_map(|k| opts.get(k).map(|v| (k, v.clone())))
        .fold(file_opts, |d, (k, v)| d.with(k, v));
    ctx.open_child_opts("data-file", file_opts).await.map(drop)
}
