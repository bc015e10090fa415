//! `pr-manager-helper`: the connection to a `qemu-pr-helper`, which does the SCSI persistent
//! reservation commands a guest's passed-through disk sends on behalf of a process that may
//! not. A storage daemon has no guest to send them: the object connects and takes the
//! helper's greeting as QEMU does, and `file`/`host_device` nodes may name it.

use super::{UserObject, check_prop};
use crate::error::{Error, Result};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use ferrite_socket::UnixAddr;
use std::any::Any;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// How long the helper may take to greet. QEMU waits for ever, and its monitor with it;
/// ferrite's main loop waits this long at most.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);

/// A `pr-manager-helper` object: its helper's path and the connection to it.
pub(crate) struct PrManagerHelper {
    /// Where the helper listens (QEMU lets it change, for the next connection).
    path: RefCell<String>,
    /// Kept open for the object's life, as QEMU keeps it.
    _helper: UnixStream,
}

impl PrManagerHelper {
    /// Connects to the helper, reads its greeting (four bytes of feature flags) and answers
    /// with ferrite's own (none).
    ///
    /// # Errors
    /// "Failed to connect to 'path': ...", a helper that hangs up before its greeting
    /// (QEMU's "Unexpected end-of-file before all data were read") or before the answer
    /// ("Unable to write to socket: Broken pipe"), or none that greets.
    pub(crate) fn create(options: &Args) -> Result<PrManagerHelper> {
        let path = options.str("path")?.to_owned();
        let addr = UnixAddr {
            path: path.clone(),
            abstract_ns: false,
            tight: false,
        };
        let mut helper =
            ferrite_socket::unix::connect(&addr).map_err(|e| Error::PrHelper(e.to_string()))?;
        let mut flags = [0u8; 4];
        let greeted = helper
            .set_read_timeout(Some(HANDSHAKE_WAIT))
            .and_then(|()| helper.read_exact(&mut flags));
        match greeted {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Error::PrHelper(
                    "Unexpected end-of-file before all data were read".into(),
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Error::PrHelper(format!(
                    "The persistent reservation helper at '{path}' sent no greeting within {} s",
                    HANDSHAKE_WAIT.as_secs()
                )));
            }
            Err(e) => {
                return Err(Error::PrHelper(format!(
                    "Failed to read from the persistent reservation helper: {}",
                    ferrite_qapi::os_msg(&e)
                )));
            }
        }
        helper.write_all(&[0; 4]).map_err(|e| {
            Error::PrHelper(format!(
                "Unable to write to socket: {}",
                ferrite_qapi::os_msg(&e)
            ))
        })?;
        let _ = helper.set_read_timeout(None);
        Ok(PrManagerHelper {
            path: RefCell::new(path),
            _helper: helper,
        })
    }
}

impl UserObject for PrManagerHelper {
    fn type_name(&self) -> &'static str {
        "pr-manager-helper"
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        (name == "path").then(|| Ok(QObject::String(self.path.borrow().clone())))
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        (name == "path").then(|| {
            let v = check_prop("PrManagerHelperProperties", name, value)?;
            *self.path.borrow_mut() = v.as_str().unwrap_or_default().to_owned();
            Ok(())
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
