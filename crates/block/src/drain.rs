//! Drained sections (QEMU: `bdrv_drained_begin`/`bdrv_drained_end`, block/io.c).
//!
//! Draining a node quiesces everything that could send it requests: its parents, through
//! every edge that points at it, and theirs in turn, up to the root users. A `BlockBackend`
//! holds back new requests, a block job pauses at its next pause point. The drain then waits
//! until the node and every quiesced parent has nothing in flight and every job is idle.
//!
//! The counters follow the edges: a parent attached to a drained node is quiesced at once,
//! one detached from it is released (see `Graph`'s edge operations), so graph changes made
//! under a drain keep the whole new neighbourhood quiet.
//!
//! Waiting uses one notification per thread, raised whenever anything that a drain polls
//! becomes idle; a drain re-checks its condition after each.

use crate::node::Node;
use std::rc::Rc;
use tokio::sync::Notify;

thread_local! {
    static PROGRESS: Rc<Notify> = Rc::new(Notify::new());
}

/// Tells waiting drains to look again: a request finished, a job went idle.
pub fn notify_progress() {
    PROGRESS.with(|p| p.notify_waiters());
}

fn progress() -> Rc<Notify> {
    PROGRESS.with(Rc::clone)
}

/// A drained section of a node: its parents (and theirs, up to the root users) issue no new
/// requests until it is dropped. The holder itself may still issue requests below it.
#[must_use = "the node stays quiesced only while this is held"]
pub struct Drained(Rc<Node>, Vec<Rc<Node>>);

impl Drained {
    /// The section of a node whose `drained_begin` was just called.
    pub(crate) fn holding(node: Rc<Node>) -> Drained {
        Drained(node, Vec::new())
    }

    /// The drained node.
    pub fn node(&self) -> &Rc<Node> {
        &self.0
    }
}

impl std::fmt::Debug for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Drained({})", self.0.name())
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        self.0.drained_end();
        for n in self.1.iter().rev() {
            n.driver().drained_end();
        }
    }
}

/// The nodes below `node` (each once), whose drivers are told of the drain: requests held
/// below it by their own limits (a throttle filter's queue) must go on, or the drain would
/// wait for the limits (for ever on a clock a test moves; QEMU's graph changes drain every
/// node, which releases them too).
fn release_below(node: &Rc<Node>) -> Vec<Rc<Node>> {
    let mut seen: Vec<Rc<Node>> = Vec::new();
    let mut todo: Vec<Rc<Node>> = node.children().iter().map(|c| c.node()).collect();
    while let Some(n) = todo.pop() {
        if seen.iter().any(|s| Rc::ptr_eq(s, &n)) {
            continue;
        }
        todo.extend(n.children().iter().map(|c| c.node()));
        n.driver().drained_begin();
        seen.push(n);
    }
    seen
}

/// Begins a drained section of `node` and waits until it holds: nothing in flight on the
/// node or any quiesced parent, every job above idle.
pub async fn drain(node: &Rc<Node>) -> Drained {
    node.drained_begin();
    let held = Drained(node.clone(), release_below(node));
    poll_until_quiet(node).await;
    held
}

/// Waits until `node` and its quiesced parents have nothing in flight.
pub(crate) async fn poll_until_quiet(node: &Node) {
    let progress = progress();
    loop {
        let changed = progress.notified();
        if !node.drain_poll() {
            return;
        }
        changed.await;
    }
}
