//! `throttle`: a filter whose reads and writes wait for their throttle group's limits
//! (QEMU: block/throttle.c). Zeroing and discards count as writes; flushes and block status
//! pass freely. Draining the node lets queued requests go, so that a drain does not wait on
//! the limits.

use crate::error::{Error, generic};
use ferrite_block::driver::{BoxFut, Driver, ReqFlags};
use ferrite_block::throttle::{Direction, GroupMember};
use ferrite_block::{Child, DriverFactory, DriverKind, Graph, LocalFut, Node, OpenCtx};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::RefCell;
use std::rc::{Rc, Weak};

/// The `throttle` driver's factory.
pub(crate) struct ThrottleFactory;

fn join(graph: &Graph, group: &str) -> ferrite_block::Result<Rc<GroupMember>> {
    graph
        .throttle_groups()
        .join(group)
        .map(Rc::new)
        .ok_or_else(|| Error::NoThrottleGroup(group.to_owned()).into())
}

impl DriverFactory for ThrottleFactory {
    fn name(&self) -> &'static str {
        "throttle"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let file = ctx.open_child("file").await?;
            let member = join(ctx.graph(), group_name(ctx.opts())?)?;
            Ok(Box::new(ThrottleDriver {
                file,
                member: RefCell::new(member),
                graph: Rc::downgrade(&ctx.graph().rc()),
            }) as Box<dyn Driver>)
        })
    }
}

struct ThrottleDriver {
    file: Rc<Child>,
    member: RefCell<Rc<GroupMember>>,
    /// Where other groups are found on a reopen.
    graph: Weak<Graph>,
}

impl ThrottleDriver {
    /// The member of `group` the node would be after a reopen: the current one, or a new
    /// one when the group changes.
    fn member_for(&self, group: &str) -> ferrite_block::Result<Rc<GroupMember>> {
        let current = self.member.borrow().clone();
        if group == current.group().name() {
            return Ok(current);
        }
        match self.graph.upgrade() {
            Some(graph) => join(&graph, group),
            None => Err(Error::NoThrottleGroup(group.to_owned()).into()),
        }
    }

    /// Waits for leave to run a request of `bytes` in `dir`.
    async fn admit(&self, dir: Direction, bytes: u64) {
        let member = self.member.borrow().clone();
        member.intercept(dir, bytes).await;
    }
}

impl Driver for ThrottleDriver {
    ferrite_block::forward_to_child!(self.file; len, flush, block_status, truncate);

    fn format_name(&self) -> &'static str {
        "throttle"
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.admit(Direction::Read, len as u64).await;
            self.file.read(offset, len).await
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
            self.admit(Direction::Write, data.len() as u64).await;
            self.file.write(offset, data, flags).await
        })
    }

    fn write_compressed<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.admit(Direction::Write, data.len() as u64).await;
            self.file.write_compressed(offset, data).await
        })
    }

    fn can_write_compressed(&self) -> bool {
        true
    }

    fn write_zeroes<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.admit(Direction::Write, len).await;
            self.file.write_zeroes(offset, len, flags).await
        })
    }

    fn discard<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.admit(Direction::Write, len).await;
            self.file.discard(offset, len).await
        })
    }

    fn filtered_child(&self) -> Option<&'static str> {
        Some("file")
    }

    fn strong_options(&self) -> QDict {
        QDict::new().with("throttle-group", self.member.borrow().group().name())
    }

    fn drained_begin(&self) {
        self.member.borrow().drained_begin();
    }

    fn drained_end(&self) {
        self.member.borrow().drained_end();
    }

    fn reopen_check(&self, _node: &Node, opts: &Args) -> ferrite_block::Result<()> {
        // A reopen may move the node to another group, which must exist.
        self.member_for(group_name(opts)?).map(drop)
    }

    fn reopen_apply(
        &self,
        _node: &Node,
        opts: &Args,
        _read_only: bool,
    ) -> ferrite_block::Result<()> {
        let member = self.member_for(group_name(opts)?)?;
        *self.member.borrow_mut() = member;
        Ok(())
    }
}

/// The group a throttle node is to join. Required by the schema, so missing only where no
/// schema asked for it first (an image opened by its file name).
fn group_name(opts: &Args) -> ferrite_block::Result<&str> {
    opts.opt_str("throttle-group")
        .ok_or_else(|| generic("Please specify a throttle group"))
}
