//! The command line: `parse` turns argv into ordered options without acting on them;
//! `keyval` reads QEMU's option syntax; `help` holds the texts of `-h` and `-V`.

pub(crate) mod help;
pub mod keyval;
pub(crate) mod parse;
