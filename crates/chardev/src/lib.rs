//! Character devices ("chardevs"): named byte-stream backends that a frontend (today, a QMP
//! monitor) reads and writes through.
//!
//! Owns the backends (`socket` listening or connecting on unix/tcp or an inherited fd,
//! `stdio`, `file`, `pipe`, `null`, `ringbuf`/`memory`), the registry of chardevs by id, the
//! translation of `--chardev` options into `ChardevBackend`, and the chardev QMP commands. It
//! does not know what a frontend does with the bytes.
//!
//! A frontend calls [`Chardev::accept`] for each [`Connection`]: a listening socket yields one
//! client at a time (others wait in the backlog, as in QEMU), other backends yield one
//! connection for their lifetime.
//!
//! QEMU counterparts: `chardev/`, `qapi/char.json`.

mod backend;
mod error;
mod opts;
pub mod qmp_cmds;
mod registry;

pub use backend::{Connection, PassedFds, Reader, Writer};
pub use error::{Error, Result};
pub use opts::{ChardevOpts, backend_from_opts};
pub use registry::{Chardev, ChardevRegistry, Origin};
