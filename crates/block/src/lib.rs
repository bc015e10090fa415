//! The block layer: the graph of nodes, their edges and permissions, drained sections,
//! `BlockBackend`, dirty bitmaps and accounting, the driver interface and registry, and the
//! I/O backends that keep file I/O off the main thread.
//!
//! Everything here runs on the daemon's main thread (`Rc`, `RefCell`); only the I/O backends
//! use other threads, and they own nothing of the graph.
//!
//! QEMU counterparts: `block.c`, `block/io.c`, `block/block-backend.c`, `block/qapi.c`,
//! `blockdev.c`.

mod backend;
pub mod bitmap;
mod child;
pub mod clock;
pub mod copy;
pub mod create;
mod drain;
pub mod driver;
pub mod emulator;
mod error;
mod events;
pub mod fdset;
pub mod filename;
mod graph;
pub mod io;
pub mod join;
mod node;
mod open;
mod open_backing;
mod perm;
pub mod region;
mod registry;
pub mod report;
mod request;
pub mod secrets;
pub mod stats;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod throttle;
pub mod units;

pub use backend::{BackendOwner, BlockBackend, IoStatus, Medium, OnError, RootState};
pub use child::{Child, Parent, ParentRef, RootParent, Vertex, VertexKind};
pub use drain::{Drained, drain, notify_progress};
pub use driver::{Extent, ReqFlags};
pub use error::{Error, Result};
pub use events::{BlockImageCorrupted, BlockWriteThreshold, EventSink};
pub use graph::{BlockOp, FrozenChain, Graph, IothreadResolver, ObjectTypeLookup, TargetFormat};
pub use node::{DetectZeroes, Node, NodeSettings};
pub use open::{MAX_LENGTH, OpenCtx, check_visited_whole};
pub use open_backing::BackingName;
pub use perm::Perm;
pub use registry::{DriverFactory, DriverKind, LocalFut, NameCreation, Registry, backing_options};
pub use request::MAX_REQUEST;
