//! The `vduse-blk` export type (QEMU: `block/export/vduse-blk.c`): a kernel block device
//! through VDUSE. The options are checked as QEMU checks them; creating the device needs
//! `/dev/vduse/control`, and where the kernel has none the export is refused with QEMU's
//! text. Where the kernel has it, ferrite does not drive VDUSE yet and says so.

use crate::device::Device;
use ferrite_export::{ExportInstance, ExportSetup, ExportType, LocalFut};
use ferrite_qapi::Error;
use std::rc::Rc;

/// The virtqueue size limit (QEMU's `VIRTQUEUE_MAX_SIZE`).
const MAX_QUEUE_SIZE: u64 = 1024;
const CONTROL: &str = "/dev/vduse/control";

/// The `vduse-blk` export type.
#[derive(Default)]
pub struct VduseBlkExportType;

impl VduseBlkExportType {
    /// The type.
    pub fn new() -> Rc<VduseBlkExportType> {
        Rc::new(VduseBlkExportType)
    }

    fn check(setup: &ExportSetup<'_>) -> Result<std::convert::Infallible, Error> {
        let opts = setup.opts;
        if opts.opt_u64("num-queues") == Some(0) {
            return Err(Error::generic("num-queues must be greater than 0"));
        }
        if let Some(q) = opts.opt_u64("queue-size") {
            if q <= 2 || !q.is_power_of_two() || q > MAX_QUEUE_SIZE {
                return Err(Error::generic("queue-size is invalid"));
            }
        }
        Device::from_options(opts, setup.writable, opts.opt_str("serial").unwrap_or(""))?;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(CONTROL)
        {
            // QEMU's library prints the reason; the command fails with its own text.
            eprintln!("Failed to open {CONTROL}: {}", ferrite_qapi::os_msg(&e));
            return Err(Error::generic("failed to create vduse device"));
        }
        Err(Error::generic(
            "vduse-blk exports are not supported by ferrite yet",
        ))
    }
}

impl ExportType for VduseBlkExportType {
    fn name(&self) -> &'static str {
        "vduse-blk"
    }

    fn create<'a>(
        &'a self,
        setup: ExportSetup<'a>,
    ) -> LocalFut<'a, Result<Rc<dyn ExportInstance>, Error>> {
        Box::pin(async move { match Self::check(&setup)? {} })
    }
}
