//! `blkreplay`: the filter QEMU's record/replay puts above a drive so that its requests
//! complete in a recorded order (QEMU: block/blkreplay.c). ferrite's machine runs no guest
//! and records nothing, which is QEMU's replay mode `none`: every request goes to the
//! `image` child as it comes. Only the system front end has it, as only QEMU's system
//! emulators do.

use ferrite_block::driver::{BoxFut, Driver, Extent};
use ferrite_block::{Child, DriverFactory, DriverKind, LocalFut, Node, OpenCtx};
use std::rc::Rc;

/// The `blkreplay` driver's factory.
pub(crate) struct BlkreplayFactory;

impl DriverFactory for BlkreplayFactory {
    fn name(&self) -> &'static str {
        "blkreplay"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let image = ctx.open_child("image").await?;
            Ok(Box::new(BlkreplayDriver { image }) as Box<dyn Driver>)
        })
    }
}

struct BlkreplayDriver {
    image: Rc<Child>,
}

impl Driver for BlkreplayDriver {
    ferrite_block::forward_to_child!(self.image; len, read, write, write_zeroes, discard, flush);

    fn format_name(&self) -> &'static str {
        "blkreplay"
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("image")
    }

    // QEMU's filter asks its child nothing here: all of it is data.
    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        let end = self.image.len().max(offset);
        Box::pin(async move { Ok(Extent::data(len.min(end - offset))) })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }
}
