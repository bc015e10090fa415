//! Which iothread nodes run in (QEMU's AioContext of a node, `bdrv_try_change_aio_context`).
//!
//! ferrite serves every request on its one thread, but it keeps QEMU's rule of who may move
//! what, because users see it: a node and every node connected to it (children and parents,
//! transitively) are in one iothread, and moving them there asks every `BlockBackend` using
//! them. A backend whose user stays in its own iothread (a device's; an export's with
//! `fixed-iothread`) refuses ("Cannot change iothread of active block backend"); the others
//! (exports without it, drives without a device, jobs) follow the nodes.
//!
//! A new edge between nodes of different iothreads moves nothing (QEMU would try to move one
//! side): the iothread of a node that joins a graph is that of the main loop until a user
//! moves it.

use super::Graph;
use crate::backend::BlockBackend;
use crate::child::ParentRef;
use crate::error::{Error, Result};
use crate::node::Node;
use std::rc::Rc;

impl BlockBackend {
    /// The iothread the backend's user runs in (`None`: the main loop).
    pub fn iothread(&self) -> Option<String> {
        self.iothread.borrow().clone()
    }

    /// Puts the backend's user in `iothread` (a new user of a node: the node's).
    pub fn set_iothread(&self, iothread: Option<&str>) {
        *self.iothread.borrow_mut() = iothread.map(str::to_owned);
    }

    /// Makes the backend stay in its iothread when its node is moved (an export with
    /// `fixed-iothread`), or follow its node (the default).
    pub fn set_fixed_iothread(&self, fixed: bool) {
        self.fixed_iothread.set(fixed);
    }

    /// Whether the backend refuses to leave its iothread: its user said so, or it is a
    /// device's (QEMU lets a backend with a device move only with that device).
    fn stays_in_iothread(&self) -> bool {
        self.fixed_iothread.get() || self.device().is_some()
    }
}

/// The id of the `iothread` object a QOM path names (see [`Graph::resolve_iothread`]).
pub type IothreadResolver = Rc<dyn Fn(&str) -> Option<String>>;

impl Graph {
    /// Lets the graph find `iothread` objects by QOM path.
    pub fn set_iothread_resolver(&self, resolve: IothreadResolver) {
        *self.iothread_resolver.borrow_mut() = Some(resolve);
    }

    /// The id of the `iothread` object `path` names, as QEMU's `iothread_by_id` finds it: by
    /// id, by absolute or partial QOM path, or (the empty path) the only one there is.
    pub fn resolve_iothread(&self, path: &str) -> Option<String> {
        self.iothread_resolver
            .borrow()
            .as_ref()
            .and_then(|f| f(path))
    }

    /// `node` and every node connected to it through edges, either way.
    fn connected(node: &Rc<Node>) -> Vec<Rc<Node>> {
        let mut seen: Vec<Rc<Node>> = vec![node.clone()];
        let mut i = 0;
        while i < seen.len() {
            let n = seen[i].clone();
            i += 1;
            let parents = n
                .users()
                .into_iter()
                .filter_map(|c| match &*c.parent.borrow() {
                    ParentRef::Node(p) => p.upgrade(),
                    ParentRef::Root(_) => None,
                });
            let children = n.children().into_iter().map(|c| c.node());
            for m in parents.chain(children).collect::<Vec<_>>() {
                if !seen.iter().any(|s| Rc::ptr_eq(s, &m)) {
                    seen.push(m);
                }
            }
        }
        seen
    }

    /// Where `nodes`, every node connected to them and the backends using those run now,
    /// to put back if what moved them fails later ([`IothreadSnapshot::restore`]).
    pub(crate) fn iothread_snapshot<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a Rc<Node>>,
    ) -> IothreadSnapshot {
        let mut all: Vec<Rc<Node>> = Vec::new();
        for n in nodes {
            if all.iter().any(|m| Rc::ptr_eq(m, n)) {
                continue;
            }
            for m in Self::connected(n) {
                if !all.iter().any(|k| Rc::ptr_eq(k, &m)) {
                    all.push(m);
                }
            }
        }
        let backends = self
            .backends()
            .into_iter()
            .filter(|b| {
                b.node()
                    .is_some_and(|n| all.iter().any(|m| Rc::ptr_eq(m, &n)))
            })
            .map(|b| {
                let at = b.iothread();
                (b, at)
            })
            .collect();
        IothreadSnapshot {
            nodes: all
                .into_iter()
                .map(|n| {
                    let at = self.iothread_of(&n);
                    (n, at)
                })
                .collect(),
            backends,
        }
    }

    /// Puts `parent` and a new `child` in one iothread: the child moves to the parent's,
    /// else the parent to the child's (QEMU's `bdrv_attach_child_common`).
    ///
    /// # Errors
    /// [`Error::IothreadInUse`] when neither can move (the child's refusal); nothing has
    /// moved then.
    pub(crate) fn join_iothreads(&self, parent: &Rc<Node>, child: &Rc<Node>) -> Result<()> {
        let (at_parent, at_child) = (self.iothread_of(parent), self.iothread_of(child));
        if at_parent == at_child {
            return Ok(());
        }
        match self.move_to_iothread(child, at_parent.as_deref(), None) {
            Ok(()) => Ok(()),
            Err(e) => self
                .move_to_iothread(parent, at_child.as_deref(), None)
                .map_err(|_| e),
        }
    }

    /// The iothread `node` runs in (`None`: the main loop).
    pub fn iothread_of(&self, node: &Node) -> Option<String> {
        node.iothread.borrow().clone()
    }

    /// Moves `node` and the nodes connected to it into `iothread` (`None`: the main loop)
    /// for `requester`, which takes that iothread too; the other backends using them follow,
    /// unless one stays in another iothread, which refuses the move.
    ///
    /// # Errors
    /// [`Error::IothreadInUse`]; nothing has moved then.
    pub fn move_to_iothread(
        &self,
        node: &Rc<Node>,
        iothread: Option<&str>,
        requester: Option<&BlockBackend>,
    ) -> Result<()> {
        let nodes = Self::connected(node);
        let in_component = |b: &BlockBackend| {
            b.node()
                .is_some_and(|n| nodes.iter().any(|m| Rc::ptr_eq(m, &n)))
        };
        let is_requester = |b: &BlockBackend| requester.is_some_and(|r| std::ptr::eq(r, b));
        let users: Vec<Rc<BlockBackend>> = self
            .backends()
            .into_iter()
            .filter(|b| in_component(b) && !is_requester(b))
            .collect();
        let refuses = users
            .iter()
            .any(|b| b.stays_in_iothread() && b.iothread.borrow().as_deref() != iothread);
        if refuses {
            return Err(Error::IothreadInUse);
        }
        let to = iothread.map(str::to_owned);
        for n in &nodes {
            *n.iothread.borrow_mut() = to.clone();
        }
        for b in &users {
            *b.iothread.borrow_mut() = to.clone();
        }
        if let Some(r) = requester {
            *r.iothread.borrow_mut() = to;
        }
        Ok(())
    }
}

/// Nodes' and backends' iothreads as they were ([`Graph::iothread_snapshot`]).
pub(crate) struct IothreadSnapshot {
    nodes: Vec<(Rc<Node>, Option<String>)>,
    backends: Vec<(Rc<BlockBackend>, Option<String>)>,
}

impl IothreadSnapshot {
    /// Puts every node and backend back where it was (QEMU rolls a failed graph change's
    /// AioContext moves back with it).
    pub(crate) fn restore(self) {
        for (n, at) in self.nodes {
            *n.iothread.borrow_mut() = at;
        }
        for (b, at) in self.backends {
            *b.iothread.borrow_mut() = at;
        }
    }
}
