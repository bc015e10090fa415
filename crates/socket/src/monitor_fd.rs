//! Descriptors a socket address of type `fd` names (QEMU's `socket_get_fd`): in a monitor
//! command, a name the monitor keeps (`getfd`), taken from it; on the command line, the
//! number of a descriptor the process inherited. Either way it must be a socket.
//!
//! The monitor installs the lookup of its names ([`set_lookup`]); this layer knows nothing of
//! monitors otherwise.

use std::cell::RefCell;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::rc::Rc;

/// Takes the descriptor the monitor running the current command keeps under a name, or
/// says why it cannot (in QEMU's words); `None` outside a monitor command.
pub type Lookup = Rc<dyn Fn(&str) -> Option<Result<OwnedFd, String>>>;

thread_local! {
    static LOOKUP: RefCell<Option<Lookup>> = const { RefCell::new(None) };
}

/// Makes `lookup` resolve descriptor names on this thread.
pub fn set_lookup(lookup: Lookup) {
    LOOKUP.with(|l| *l.borrow_mut() = Some(lookup));
}

/// The socket `name` stands for, now owned by the caller; the error in QEMU's words.
///
/// # Errors
/// An unknown name, a number that is not one, or a descriptor that is not a socket.
pub fn take_socket(name: &str) -> Result<OwnedFd, String> {
    let lookup = LOOKUP.with(|l| l.borrow().clone());
    let fd = match lookup.and_then(|f| f(name)) {
        Some(found) => found?,
        None => {
            let fd: i32 = name
                .parse()
                .map_err(|_| format!("Unable to parse FD number {name}"))?;
            // SAFETY: fcntl(F_GETFD) only asks whether the number is an open descriptor.
            if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                return Err(format!("File descriptor '{name}' is not a socket"));
            }
            // SAFETY: the descriptor is open, and naming it on the command line hands it to
            // the caller (QEMU's socket closes it with the connection, too).
            unsafe { OwnedFd::from_raw_fd(fd) }
        }
    };
    // SAFETY: fstat writes into the zeroed stat buffer it is given and nothing else.
    let is_socket = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd.as_raw_fd(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
    };
    if !is_socket {
        return Err(format!("File descriptor '{name}' is not a socket"));
    }
    Ok(fd)
}
