//! Mounting a FUSE file system over the mount point, and clearing a dead one a killed
//! daemon left there.

use crate::kernel::{Forwarder, MAX_READ, Op};
use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use std::io;
use tokio::sync::mpsc::UnboundedSender;

/// Mounts the export's file system at `mountpoint` (QEMU's mount options: `max_read`,
/// `default_permissions`, and `allow_other` when asked) and starts the thread that reads
/// the kernel's requests. Dropping the session unmounts it; the thread ends when the
/// kernel closes the connection.
pub(crate) fn mount(
    mountpoint: &str,
    allow_other: bool,
    ops: UnboundedSender<Op>,
) -> io::Result<BackgroundSession> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("/dev/fuse".into()),
        MountOption::CUSTOM(format!("max_read={MAX_READ}")),
        MountOption::DefaultPermissions,
    ];
    config.acl = if allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    Session::new(Forwarder { ops }, mountpoint, &config)?.spawn()
}

/// Detaches the mount lazily, as QEMU's export does: the mount point is free at once even
/// while a file on it is still open (a plain unmount, fuser's way as root, fails with EBUSY
/// then, and the mount outlives the daemon as a dead one). Without the privilege, fuser's
/// own unmount on drop goes through `fusermount -u -z`, which is lazy too.
pub(crate) fn detach(mountpoint: &str) {
    if let Err(error) = umount_lazily(mountpoint) {
        tracing::debug!(mountpoint, %error, "lazy unmount");
    }
}

/// `umount2(mountpoint, MNT_DETACH)`.
fn umount_lazily(mountpoint: &str) -> io::Result<()> {
    let path = std::ffi::CString::new(mountpoint)
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `stat` of the mount point; a FUSE mount whose daemon died (the kernel answers
/// ENOTCONN) is detached first, so that a daemon killed with its exports mounted does not
/// keep the next one from exporting there.
pub(crate) fn stat_clearing_dead_mount(mountpoint: &str) -> io::Result<std::fs::Metadata> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!(mountpoint, "detaching a dead FUSE mount");
            umount_lazily(mountpoint).map_err(|_| e)?;
            std::fs::metadata(mountpoint)
        }
        r => r,
    }
}
