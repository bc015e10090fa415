//! The drivers: `file` (protocol), `raw` (format, with offset/size), `null-co`/`null-aio`.

pub(crate) mod file;
pub(crate) mod lock;
pub(crate) mod null;
pub(crate) mod raw;
