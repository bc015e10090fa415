//! The export commands every type shares (QEMU: `block/export/export.c`).

use crate::exports::{Exports, RemoveMode};
use ferrite_qapi::{Args, Error};
use ferrite_qobject::{QDict, QObject};

/// `block-export-add`.
///
/// # Errors
/// As [`Exports::add`].
pub async fn qmp_block_export_add(exports: &Exports, args: &Args) -> Result<QObject, Error> {
    exports.add(args).await?;
    Ok(QDict::new().into())
}

/// `block-export-del`.
///
/// # Errors
/// As [`Exports::del`].
pub async fn qmp_block_export_del(exports: &Exports, args: &Args) -> Result<QObject, Error> {
    exports
        .del(args.str("id")?, RemoveMode::parse(args.opt_str("mode")))
        .await?;
    Ok(QDict::new().into())
}

/// `query-block-exports`.
pub fn qmp_query_block_exports(exports: &Exports) -> QObject {
    exports
        .query()
        .into_iter()
        .map(QObject::Dict)
        .collect::<Vec<_>>()
        .into()
}
