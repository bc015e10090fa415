//! NBD exports: a node made available to NBD clients under a name.

use ferrite_block::bitmap::DirtyBitmap;
use ferrite_block::{BlockBackend, Node};
use std::cell::Cell;
use std::rc::Rc;
use tokio::sync::Notify;

/// One export.
pub struct Export {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) description: Option<String>,
    /// The node when the export was made; `blk` follows it if the graph replaces it.
    pub(crate) initial_node: Rc<Node>,
    /// The export's way to its node; detached when the export is removed.
    pub(crate) blk: Rc<BlockBackend>,
    pub(crate) writable: bool,
    pub(crate) writethrough: bool,
    pub(crate) allocation_depth: bool,
    /// Whether clients are told they may spread requests over several connections.
    pub(crate) multi_conn: bool,
    /// Bitmaps offered as `qemu:dirty-bitmap:NAME` contexts (held busy while exported).
    pub(crate) bitmaps: Vec<Rc<DirtyBitmap>>,
    pub(crate) clients: Cell<usize>,
    pub(crate) shutting_down: Cell<bool>,
    /// Tells the clients to hang up (hard removal, server stop).
    pub(crate) kick: Notify,
    /// Signalled when the last client left.
    pub(crate) idle: Notify,
}

impl Export {
    /// The export id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The NBD export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The exported node (it changes if the graph replaces the node under the export).
    pub fn node(&self) -> Rc<Node> {
        self.blk.node().unwrap_or_else(|| self.initial_node.clone())
    }

    pub(crate) fn client_joined(&self) {
        self.clients.set(self.clients.get() + 1);
    }

    pub(crate) fn client_left(&self) {
        let n = self.clients.get().saturating_sub(1);
        self.clients.set(n);
        if n == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Disconnects every client and waits until they are gone.
    pub(crate) async fn disconnect_all(&self) {
        self.shutting_down.set(true);
        while self.clients.get() > 0 {
            let idle = self.idle.notified();
            self.kick.notify_waiters();
            idle.await;
        }
    }
}
