//! The events of block exports.

use ferrite_qapi::QapiEvent;
use ferrite_qobject::QDict;

/// `BLOCK_EXPORT_DELETED`: an export is gone (its clients disconnected, its node released).
#[derive(Debug, Clone)]
pub struct BlockExportDeleted {
    /// The export's ID.
    pub id: String,
}

impl QapiEvent for BlockExportDeleted {
    fn name(&self) -> &'static str {
        "BLOCK_EXPORT_DELETED"
    }

    fn data(&self) -> Option<QDict> {
        Some(QDict::new().with("id", self.id.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_matches_its_schema_declaration() {
        ferrite_qapi::check_event(&BlockExportDeleted { id: "e".into() }).unwrap();
    }
}
