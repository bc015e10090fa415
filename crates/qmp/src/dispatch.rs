//! The interface between a session and the commands it runs.

use ferrite_qapi::{Args, Error};
use ferrite_qobject::QObject;
use std::future::Future;
use std::pin::Pin;

/// What a command returns, asynchronously.
pub type CommandFuture<'a> = Pin<Box<dyn Future<Output = Result<QObject, Error>> + 'a>>;

/// The daemon's commands. The session has already checked that `name` is in the schema and
/// that `args` match its argument type.
pub trait Commands {
    /// Runs command `name`.
    fn run<'a>(&'a self, name: &'a str, args: Args) -> CommandFuture<'a>;
}
