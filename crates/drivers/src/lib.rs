//! Block drivers that are not image formats of their own: `file` (protocol: a regular file
//! or block device through the I/O backend), `raw` (format: its child's bytes, or a window
//! of them), `null-co`/`null-aio`, the `copy-before-write` filter with its
//! `snapshot-access` view, and the `copy-on-read` filter; and the image formats small
//! enough to need no crate of their own (`bochs`, `cloop`, `dmg`, `luks`, `parallels`, `qed`, `vdi`,
//! `vmdk`, `vpc`); and `vvfat`, a host directory as a FAT disk. Each registers a factory with
//! the core's registry.
//!
//! QEMU counterparts: `block/file-posix.c`, `block/raw-format.c`, `block/null.c`,
//! `block/copy-before-write.c`, `block/snapshot-access.c`, `block/copy-on-read.c`.

mod blkdebug;
mod blklogwrites;
mod blkreplay;
mod bochs;
mod ceph_conf;
pub use blkdebug::set_qtest;
mod blkverify;
mod blockmap;
pub use blockmap::create_on_file;
pub mod cbw;
mod cloop;
mod compress;
pub mod cor;
mod dmg;
mod error;
mod file;
mod lock;
mod luks;
pub use luks::amend_key_slots;
mod no_client;
mod null;
mod parallels;
mod preallocate;
mod qed;
mod quorum;
mod raw;
mod snapshot_access;
mod throttle;
mod vdi;
mod vhdx;
mod vmdk;
mod vpc;
mod vvfat;

use ferrite_block::Registry;
use std::rc::Rc;

/// Adds the drivers only a system emulator has (QEMU builds `blkreplay` into its system
/// emulators alone).
pub fn register_emulator_only(registry: &Registry) {
    registry.register(Rc::new(blkreplay::BlkreplayFactory));
}

/// Registers every driver of this crate a storage daemon has.
pub fn register(registry: &Registry) {
    registry.register(Rc::new(compress::CompressFactory));
    for flavor in [
        file::Flavor::File,
        file::Flavor::HostDevice,
        file::Flavor::HostCdrom,
    ] {
        registry.register(Rc::new(file::FileFactory { flavor }));
    }
    registry.register(Rc::new(raw::RawFactory));
    registry.register(Rc::new(null::NullFactory { aio: false }));
    registry.register(Rc::new(null::NullFactory { aio: true }));
    registry.register(Rc::new(vvfat::VvfatFactory));
    registry.register(Rc::new(dmg::DmgFactory));
    registry.register(Rc::new(cbw::CbwFactory::new()));
    registry.register(Rc::new(snapshot_access::SnapshotAccessFactory));
    registry.register(Rc::new(cor::CorFactory));
    registry.register(Rc::new(throttle::ThrottleFactory));
    registry.register(Rc::new(preallocate::PreallocateFactory));
    registry.register(Rc::new(luks::LuksFactory));
    registry.register(Rc::new(blkverify::BlkverifyFactory));
    registry.register(Rc::new(blklogwrites::BlkLogWritesFactory));
    registry.register(Rc::new(blkdebug::BlkdebugFactory));
    registry.register(Rc::new(bochs::BochsFactory));
    registry.register(Rc::new(cloop::CloopFactory));
    registry.register(Rc::new(parallels::ParallelsFactory));
    registry.register(Rc::new(qed::QedFactory));
    registry.register(Rc::new(quorum::QuorumFactory));
    registry.register(Rc::new(vdi::VdiFactory));
    registry.register(Rc::new(vhdx::VhdxFactory));
    registry.register(Rc::new(vmdk::VmdkFactory));
    registry.register(Rc::new(vpc::VpcFactory));
    for service in [
        no_client::Service::Rbd,
        no_client::Service::Gluster,
        no_client::Service::Nvme,
    ] {
        registry.register(Rc::new(no_client::NoClientFactory(service)));
    }
}
