//! The block layer's events and where they go (the daemon's event bus).

use ferrite_qapi::QapiEvent;
use ferrite_qobject::QDict;

/// Where the block layer sends its events.
pub trait EventSink {
    /// Emits `event`.
    fn emit(&self, event: &dyn QapiEvent);
}

/// `BLOCK_WRITE_THRESHOLD`: a write went past a node's write threshold.
#[derive(Debug, Clone)]
pub struct BlockWriteThreshold {
    /// The node.
    pub node_name: String,
    /// How far past the threshold the write reached.
    pub amount_exceeded: u64,
    /// The threshold (now cleared).
    pub write_threshold: u64,
}

impl QapiEvent for BlockWriteThreshold {
    fn name(&self) -> &'static str {
        "BLOCK_WRITE_THRESHOLD"
    }

    fn data(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("node-name", self.node_name.as_str())
                .with("amount-exceeded", self.amount_exceeded)
                .with("write-threshold", self.write_threshold),
        )
    }
}

/// `BLOCK_IMAGE_CORRUPTED`: a format driver found corruption in an image.
#[derive(Debug, Clone)]
pub struct BlockImageCorrupted {
    /// The device (empty in a storage daemon).
    pub device: String,
    /// The node.
    pub node_name: String,
    /// What is wrong.
    pub msg: String,
    /// Where in the image file, if known.
    pub offset: Option<u64>,
    /// How many bytes, if known.
    pub size: Option<u64>,
    /// Whether the image was marked corrupt (it takes no more requests).
    pub fatal: bool,
}

impl QapiEvent for BlockImageCorrupted {
    fn name(&self) -> &'static str {
        "BLOCK_IMAGE_CORRUPTED"
    }

    fn data(&self) -> Option<QDict> {
        let mut d = QDict::new()
            .with("device", self.device.as_str())
            .with("node-name", self.node_name.as_str())
            .with("msg", self.msg.as_str());
        // The schema's offset and size are signed 64-bit: QEMU leaves out what does not
        // fit (a negative int64_t there), and so does this.
        let signed = |v: Option<u64>| v.filter(|&v| i64::try_from(v).is_ok());
        d.insert_opt("offset", signed(self.offset));
        d.insert_opt("size", signed(self.size));
        d.insert("fatal", self.fatal);
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_qapi::check_event;

    /// Found by the qcow2_image fuzz target: a corruption at a damaged offset past 2^63
    /// made an event the schema refuses.
    #[test]
    fn corruption_offsets_past_the_signed_range_are_left_out() {
        let e = BlockImageCorrupted {
            device: String::new(),
            node_name: "q".into(),
            msg: "m".into(),
            offset: Some(1 << 63),
            size: Some(u64::MAX),
            fatal: false,
        };
        check_event(&e).expect("valid event");
        let d = e.data().expect("data");
        assert!(d.get("offset").is_none() && d.get("size").is_none());
    }

    #[test]
    fn every_event_matches_its_schema_declaration() {
        check_event(&BlockWriteThreshold {
            node_name: "n".into(),
            amount_exceeded: 1,
            write_threshold: 2,
        })
        .unwrap();
        for (offset, size) in [(None, None), (Some(0), Some(512))] {
            check_event(&BlockImageCorrupted {
                device: String::new(),
                node_name: "n".into(),
                msg: "m".into(),
                offset,
                size,
                fatal: true,
            })
            .unwrap();
        }
    }
}
