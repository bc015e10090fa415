//! The drivers: `file` (protocol), `raw` (format, with offset/size), `null-co`/`null-aio`,
//! `qcow2`, and the `copy-before-write` filter with its `snapshot-access` view.

pub(crate) mod cbw;
pub(crate) mod file;
pub(crate) mod lock;
pub(crate) mod null;
pub(crate) mod qcow2;
pub(crate) mod raw;
pub(crate) mod snapshot_access;

use ferrite_qapi::{Args, Error};
use ferrite_qobject::QObject;

/// Checks that each named option in `opts` has the value it had at open (`was`), treating an
/// absent option as its default; QEMU's text otherwise.
pub(crate) fn unchanged(opts: &Args, was: &Args, names: &[(&str, QObject)]) -> Result<(), Error> {
    for (name, default) in names {
        let now = opts.get(name).unwrap_or(default);
        let before = was.get(name).unwrap_or(default);
        if now != before {
            return Err(Error::generic(format!("Cannot change the option '{name}'")));
        }
    }
    Ok(())
}
