//! Fakes for tests of the core and of the layers above it (feature `test-utils`): a memory
//! driver that counts the requests reaching it, and an event sink that records.

use crate::driver::{BoxFut, Driver, Extent, ReqFlags};
use crate::events::EventSink;
use crate::node::Node;
use crate::open::OpenCtx;
use crate::registry::{DriverFactory, DriverKind, LocalFut};
use ferrite_qapi::Args;
use ferrite_qobject::QDict;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Duration;

/// Requests that reached a [`CountingFactory`] node.
#[derive(Debug, Default)]
pub struct Counts {
    /// Reads.
    pub reads: Cell<u64>,
    /// Writes (and write-zeroes).
    pub writes: Cell<u64>,
}

impl Counts {
    /// Reads and writes together.
    pub fn total(&self) -> u64 {
        self.reads.get() + self.writes.get()
    }
}

/// The `counting` driver: a memory disk of `size` bytes (default 64 MiB) answering each
/// request after `latency-ns`, and each write after `write-ns-per-kib` more per KiB (a
/// device whose writes cost their size), counting what reaches it in the shared [`Counts`].
pub struct CountingFactory {
    /// The counters every node of this factory adds to.
    pub counts: Rc<Counts>,
}

impl CountingFactory {
    /// A factory and its counters.
    pub fn new() -> (Rc<Self>, Rc<Counts>) {
        let counts = Rc::new(Counts::default());
        (
            Rc::new(CountingFactory {
                counts: counts.clone(),
            }),
            counts,
        )
    }
}

impl DriverFactory for CountingFactory {
    fn name(&self) -> &'static str {
        "counting"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let size = opts.opt_u64("size").unwrap_or(64 << 20);
            Ok(Box::new(Counting {
                data: RefCell::new(vec![0; size as usize]),
                latency: Duration::from_nanos(opts.opt_u64("latency-ns").unwrap_or(0)),
                write_per_kib: Duration::from_nanos(opts.opt_u64("write-ns-per-kib").unwrap_or(0)),
                counts: self.counts.clone(),
            }) as Box<dyn Driver>)
        })
    }
}

struct Counting {
    data: RefCell<Vec<u8>>,
    latency: Duration,
    write_per_kib: Duration,
    counts: Rc<Counts>,
}

impl Counting {
    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

impl Driver for Counting {
    fn format_name(&self) -> &'static str {
        "counting"
    }

    fn len(&self, _node: &Node) -> u64 {
        self.data.borrow().len() as u64
    }

    fn read<'a>(&'a self, _node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            self.counts.reads.set(self.counts.reads.get() + 1);
            self.delay().await;
            let o = offset as usize;
            Ok(self.data.borrow()[o..o + len].to_vec())
        })
    }

    fn write<'a>(
        &'a self,
        _node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        _flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.counts.writes.set(self.counts.writes.get() + 1);
            self.delay().await;
            let kib = u32::try_from(data.len() / 1024).unwrap_or(u32::MAX);
            if !self.write_per_kib.is_zero() {
                tokio::time::sleep(self.write_per_kib * kib).await;
            }
            let o = offset as usize;
            self.data.borrow_mut()[o..o + data.len()].copy_from_slice(&data);
            Ok(())
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        self.write(node, offset, vec![0; len as usize], flags)
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    fn block_status<'a>(&'a self, _node: &'a Node, _offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            Ok(Extent {
                len,
                data: true,
                zero: false,
                allocated: true,
            })
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, size: u64) -> BoxFut<'a, ()> {
        Box::pin(async move {
            self.data.borrow_mut().resize(size as usize, 0);
            Ok(())
        })
    }

    fn reopen_check(&self, _node: &Node, _opts: &Args) -> crate::Result<()> {
        Ok(())
    }

    fn can_grow(&self) -> bool {
        false
    }
}

/// An event sink that keeps every event.
#[derive(Default)]
pub struct RecordedEvents(RefCell<Vec<(String, QDict)>>);

impl RecordedEvents {
    /// The events so far, oldest first.
    pub fn take(&self) -> Vec<(String, QDict)> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl EventSink for RecordedEvents {
    fn emit(&self, event: &dyn ferrite_qapi::QapiEvent) {
        if let Err(e) = ferrite_qapi::check_event(event) {
            panic!("an emitted event does not match the schema: {e}");
        }
        self.0
            .borrow_mut()
            .push((event.name().to_owned(), event.data().unwrap_or_default()));
    }
}
