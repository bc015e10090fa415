//! What queries show of an image: `ImageInfoSpecificQCow2` and `SnapshotInfo`.

use crate::Qcow2Driver;
use crate::format::header::{compat, incompat};
use ferrite_qobject::{QDict, QObject};

/// `SnapshotInfo` of an internal snapshot.
pub(crate) fn snapshot_info(s: &crate::format::snapshot_table::Snapshot) -> QDict {
    QDict::new()
        .with("id", s.id.as_str())
        .with("name", s.name.as_str())
        .with("vm-state-size", s.vm_state_size)
        .with("date-sec", u64::from(s.date_sec))
        .with("date-nsec", u64::from(s.date_nsec))
        .with("vm-clock-sec", s.vm_clock_nsec / 1_000_000_000)
        .with("vm-clock-nsec", s.vm_clock_nsec % 1_000_000_000)
}

/// `Qcow2BitmapInfo` of each bitmap in the directory, in QEMU's member order.
fn bitmap_list(info: &[(String, u64, u32)]) -> Vec<QObject> {
    use crate::format::bitmap_dir::{AUTO, IN_USE};
    info.iter()
        .map(|(name, granularity, flags)| {
            let mut names: Vec<QObject> = Vec::new();
            if flags & IN_USE != 0 {
                names.push("in-use".into());
            }
            if flags & AUTO != 0 {
                names.push("auto".into());
            }
            QDict::new()
                .with("flags", names)
                .with("name", name.as_str())
                .with("granularity", *granularity)
                .into()
        })
        .collect()
}

impl Qcow2Driver {
    /// `ImageInfoSpecificQCow2`.
    pub(crate) fn format_specific_info(&self) -> Option<QDict> {
        let m = self.meta.try_lock().ok()?;
        let h = &m.h;
        let mut d = QDict::new();
        if h.version >= 3 {
            d.insert("compat", "1.1");
            d.insert(
                "compression-type",
                if h.compression_type == 1 {
                    "zstd"
                } else {
                    "zlib"
                },
            );
            d.insert("lazy-refcounts", h.compatible & compat::LAZY_REFCOUNTS != 0);
            if !m.bitmap_info.is_empty() {
                d.insert("bitmaps", bitmap_list(&m.bitmap_info));
            }
            d.insert("refcount-bits", 1u64 << h.refcount_order);
            if let Some(df) = &self.data_file {
                if let Some(name) = &df.name {
                    d.insert("data-file", name.as_str());
                }
                d.insert("data-file-raw", df.raw);
            }
            if let Some(c) = &self.crypto {
                let mut e = QDict::new().with("format", "luks");
                for (k, v) in c.header().info().iter() {
                    e.insert(k, v.clone());
                }
                d.insert("encrypt", e);
            }
            d.insert("corrupt", h.incompatible & incompat::CORRUPT != 0);
            d.insert("extended-l2", h.extended_l2());
        } else {
            d.insert("compat", "0.10");
            d.insert("compression-type", "zlib");
            d.insert("refcount-bits", 16u64);
        }
        Some(QDict::new().with("type", "qcow2").with("data", d))
    }
}
