//! The block layer: the graph of nodes, their permissions, drain and accounting, the driver
//! interface and the `file`, `raw`, `null-co`/`null-aio` drivers, on an I/O backend that keeps
//! file I/O off the main thread.
//!
//! Everything here runs on the daemon's main thread (`Rc`, `RefCell`); only the I/O backends
//! use other threads, and they own nothing of the graph.
//!
//! QEMU counterparts: `block.c`, `block/io.c`, `block/file-posix.c`, `block/raw-format.c`,
//! `block/null.c`, `block/qapi.c`, `blockdev.c`.

pub mod amend;
pub mod bitmap;
pub mod bitmap_cmds;
pub mod copy;
pub mod create;
pub mod driver;
mod drivers;
mod filename;
mod graph;
mod info;
pub mod io;
mod node;
mod perm;
pub mod qmp_cmds;
pub mod snapshot_cmds;
mod stats;

pub use driver::{Extent, ReqFlags};
pub use graph::{EventSink, Graph, RootUse};
pub use node::{Child, DetectZeroes, Drained, Node, Parent, Use};
pub use perm::Perm;
