//! What a command may learn of the session that sent it (QEMU's `monitor_cur()`): the file
//! descriptors the client passed on its connection and the ones the monitor keeps by name.

use std::cell::RefCell;
use std::os::fd::OwnedFd;
use std::rc::Rc;

/// Takes the descriptor the client passed last (SCM_RIGHTS), if any.
pub type FdSource = Rc<dyn Fn() -> Option<OwnedFd>>;

/// Descriptors a monitor keeps by name (`getfd`), for commands that take a name for one.
#[derive(Default)]
pub struct NamedFds {
    fds: RefCell<Vec<(String, OwnedFd)>>,
}

impl NamedFds {
    /// Keeps `fd` as `name`, closing one kept under that name before.
    pub fn insert(&self, name: &str, fd: OwnedFd) {
        let mut fds = self.fds.borrow_mut();
        match fds.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = fd,
            None => fds.push((name.to_owned(), fd)),
        }
    }

    /// Gives up the descriptor named `name` (the caller closes or keeps it).
    pub fn take(&self, name: &str) -> Option<OwnedFd> {
        let mut fds = self.fds.borrow_mut();
        let at = fds.iter().position(|(n, _)| n == name)?;
        Some(fds.remove(at).1)
    }
}

/// The session a command runs for.
#[derive(Clone)]
pub struct SessionContext {
    passed: Option<FdSource>,
    named: Rc<NamedFds>,
}

impl SessionContext {
    /// The descriptor the client passed last, taken (QEMU's `qemu_chr_fe_get_msgfd`).
    pub fn take_passed_fd(&self) -> Option<OwnedFd> {
        self.passed.as_ref().and_then(|f| f())
    }

    /// The monitor's named descriptors.
    pub fn named_fds(&self) -> &Rc<NamedFds> {
        &self.named
    }
}

tokio::task_local! {
    static CURRENT: SessionContext;
}

/// The session of the command running now; `None` outside a monitor's command (start-up).
pub fn current_session() -> Option<SessionContext> {
    CURRENT.try_with(Clone::clone).ok()
}

/// Runs `fut` as a command of the session `ctx` describes.
pub(crate) async fn in_session<F: std::future::Future>(
    passed: Option<FdSource>,
    named: Rc<NamedFds>,
    fut: F,
) -> F::Output {
    CURRENT.scope(SessionContext { passed, named }, fut).await
}
