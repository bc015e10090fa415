//! Character devices ("chardevs"): named byte-stream backends that a frontend (today, a QMP
//! monitor) reads and writes through.
//!
//! Owns the backends (`socket` listening or connecting on unix/tcp or an inherited fd,
//! `stdio`, `file`, `pipe`, `serial`, `parallel`, `pty`, `udp`, `null`, `ringbuf`/`memory`,
//! and `mux` and `hub`, which are made of other chardevs), the registry of chardevs by id,
//! the translation of `--chardev` options into `ChardevBackend`, and the chardev QMP
//! commands. It does not know what a frontend does with the bytes.
//!
//! A frontend attaches ([`Chardev::attach_frontend`]) and calls [`Frontend::accept`] for each
//! [`Connection`]: a listening socket yields one client at a time (others wait in the
//! backlog, as in QEMU), a `pty` one each time its terminal is opened, a mux a share of each
//! of its base's, other backends one connection for their lifetime.
//!
//! QEMU counterparts: `chardev/`, `qapi/char.json`.

mod backend;
mod error;
mod opts;
pub mod qmp_cmds;
mod registry;

pub use backend::{Connection, PassedFds, Reader, Writer};
pub use error::{Error, Result};
pub use opts::{ChardevOpts, ChardevSpec, backend_from_opts, deprecations};
pub use registry::{Chardev, ChardevRegistry, Frontend, Origin};
