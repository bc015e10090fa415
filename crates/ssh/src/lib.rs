//! QEMU's `ssh` block driver: a node whose bytes are a file on an SSH server, read and
//! written over SFTP, with QEMU's options, host key checks, authentication and texts.
//! QEMU reaches the server through libssh; ferrite speaks SSH through `russh` and SFTP
//! itself (`sftp.rs`), with every request of a read or write under way at once.
//!
//! - `options.rs`: `BlockdevOptionsSsh`, the node's file name;
//! - `session.rs`: connection, host key check, authentication, the file opened;
//! - `known_hosts.rs`: the `known_hosts` files as libssh judges them;
//! - `config.rs`: what `~/.ssh/config` and `/etc/ssh/ssh_config` change;
//! - `sftp.rs`: the SFTP client;
//! - `driver.rs`: the node and `blockdev-create`.

mod config;
mod driver;
mod known_hosts;
mod options;
mod session;
mod sftp;

use ferrite_block::Registry;
use std::rc::Rc;

/// Registers the `ssh` driver.
pub fn register(registry: &Registry) {
    registry.register(Rc::new(driver::SshFactory));
}
