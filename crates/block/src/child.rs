//! Edges of the block graph (QEMU: `BdrvChild`, `BdrvChildClass`).
//!
//! An edge is one parent's use of one node: a format node using its `file`, an overlay its
//! `backing`, or a root user (a [`BlockBackend`](crate::BlockBackend), a block job) using the
//! node it works on. The parent owns the edge (`Rc<Child>`); the node keeps a weak list of
//! the edges that point at it. An edge carries what its parent takes and shares, and whether
//! its parent was quiesced through it by a drained section of the node.
//!
//! Drivers reach their children's data through their edges ([`Child::read`] and the other
//! request methods); root users through a `BlockBackend`. Nothing else issues I/O.

use crate::driver::{Extent, ReqFlags};
use crate::node::Node;
use crate::perm::Perm;
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::{Rc, Weak};

/// What a root parent is, for `x-debug-query-block-graph` (QAPI `XDbgBlockGraphNodeType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VertexKind {
    /// A `BlockBackend`.
    BlockBackend,
    /// A block job.
    BlockJob,
}

/// A root parent's vertex in the debug graph: its kind, its name, and an identity shared
/// by every edge of the same parent (a job has several).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vertex {
    /// The kind of parent.
    pub kind: VertexKind,
    /// The name shown (a job's ID; empty for an unnamed `BlockBackend`).
    pub name: String,
    /// Identity of the parent object (edges with equal keys belong to one vertex).
    pub key: usize,
    /// Creation order of the parent, for listing.
    pub order: u64,
}

/// The parent side of a root edge (QEMU: `BdrvChildClass` of a `BlockBackend` or a job).
///
/// Drained sections reach root parents through these callbacks: a `BlockBackend` holds back
/// new requests, a job pauses at its next pause point.
pub trait RootParent {
    /// How error messages name this user ("an unnamed block device", "backup job 'j'").
    fn description(&self) -> String;
    /// A node below started a drained section: issue no new requests until the end.
    fn drained_begin(&self);
    /// A drained section below ended.
    fn drained_end(&self);
    /// Whether the parent still has work in flight that the drain must wait for.
    fn drained_poll(&self) -> bool;
    /// How the debug graph shows this parent.
    fn vertex(&self) -> Vertex;
    /// Whether the edge stays at its node when the node is replaced (QEMU's `stay_at_node`:
    /// a job keeps working on the nodes it named, a `BlockBackend` follows the graph).
    fn stays_at_node(&self) -> bool {
        false
    }
    /// The node goes inactive: a user that may stay on it gives up its permissions
    /// (QEMU's `inactivate` of a parent); `false` refuses the inactivation.
    fn inactivate(&self) -> bool {
        true
    }
    /// The node is active again: the user takes its permissions back.
    ///
    /// # Errors
    /// A permission conflict.
    fn activate(&self) -> crate::Result<()> {
        Ok(())
    }
}

/// Who owns an edge.
#[derive(Clone)]
pub enum ParentRef {
    /// A node using this one as its named child.
    Node(Weak<Node>),
    /// A root user.
    Root(Weak<dyn RootParent>),
}

/// Who uses a node, as queries and error messages describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parent {
    /// Node `parent` uses this node as its child `child`.
    Node {
        /// The parent's node name.
        parent: String,
        /// The edge name (`file`, `backing`).
        child: String,
    },
    /// A root user, with its description (`an unnamed block device`).
    Root(String),
}

/// An edge from a parent to a child node.
///
/// # Invariants
/// - The edge is in its parent's children (or held by its root parent) and, by a weak
///   reference, in its node's users, from `Graph::attach_*` until `Graph::detach_edge`.
/// - `perm`/`shared` change only through the graph's permission update, which checks them
///   against every other user of the node first.
/// - `quiesced_parent` is true exactly while the parent has been told `drained_begin`
///   through this edge and not yet `drained_end`.
pub struct Child {
    name: String,
    pub(crate) node: RefCell<Rc<Node>>,
    pub(crate) parent: RefCell<ParentRef>,
    pub(crate) perm: Cell<Perm>,
    pub(crate) shared: Cell<Perm>,
    pub(crate) quiesced_parent: Cell<bool>,
    /// How many jobs hold the link where it is (QEMU's `frozen`): it may not be pointed
    /// elsewhere until they let go.
    pub(crate) frozen: Cell<u32>,
    /// Creation order, for listings.
    pub(crate) id: u64,
}

impl std::fmt::Debug for Child {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Child({} -> {})", self.name, self.node.borrow().name())
    }
}

impl Child {
    pub(crate) fn new(name: &str, node: &Rc<Node>, parent: ParentRef, id: u64) -> Rc<Child> {
        Rc::new(Child {
            name: name.to_owned(),
            node: RefCell::new(node.clone()),
            parent: RefCell::new(parent),
            perm: Cell::new(Perm::empty()),
            shared: Cell::new(Perm::all()),
            quiesced_parent: Cell::new(false),
            frozen: Cell::new(0),
            id,
        })
    }

    /// Whether a job holds the link where it is (see [`crate::graph::FrozenChain`]).
    pub fn is_frozen(&self) -> bool {
        self.frozen.get() > 0
    }

    /// The edge name (`file`, `backing`, `root`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node the edge points at now.
    pub fn node(&self) -> Rc<Node> {
        self.node.borrow().clone()
    }

    /// The edge's creation number (edges are listed in this order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// What the parent takes.
    pub fn perm(&self) -> Perm {
        self.perm.get()
    }

    /// What the parent lets others take.
    pub fn shared(&self) -> Perm {
        self.shared.get()
    }

    /// The parent node, for a node's edge.
    pub fn parent_node(&self) -> Option<Rc<Node>> {
        match &*self.parent.borrow() {
            ParentRef::Node(p) => p.upgrade(),
            ParentRef::Root(_) => None,
        }
    }

    /// The root parent, for a root user's edge.
    pub fn root_parent(&self) -> Option<Rc<dyn RootParent>> {
        match &*self.parent.borrow() {
            ParentRef::Root(r) => r.upgrade(),
            ParentRef::Node(_) => None,
        }
    }

    /// Whether a root user owns this edge.
    pub fn is_root(&self) -> bool {
        matches!(*self.parent.borrow(), ParentRef::Root(_))
    }

    /// Who uses the node through this edge.
    pub fn parent(&self) -> Parent {
        match &*self.parent.borrow() {
            ParentRef::Node(p) => Parent::Node {
                parent: p.upgrade().map(|p| p.name().to_owned()).unwrap_or_default(),
                child: self.name.clone(),
            },
            ParentRef::Root(r) => {
                Parent::Root(r.upgrade().map(|r| r.description()).unwrap_or_default())
            }
        }
    }

    /// The parent as QEMU's permission errors name it (`bdrv_child_user_desc`).
    pub(crate) fn user_desc(&self) -> String {
        let node = self.node.borrow().name().to_owned();
        match &*self.parent.borrow() {
            ParentRef::Node(p) => format!(
                "node '{}' (uses node '{node}' as '{}' child)",
                p.upgrade().map(|p| p.name().to_owned()).unwrap_or_default(),
                self.name
            ),
            ParentRef::Root(r) => format!(
                "{} (uses node '{node}' as '{}' child)",
                r.upgrade()
                    .map_or_else(|| "an unnamed block device".to_owned(), |r| r.description()),
                self.name
            ),
        }
    }

    /// Tells the parent that a drained section began below (QEMU:
    /// `bdrv_parent_drained_begin_single`).
    pub(crate) fn parent_drained_begin(&self) {
        debug_assert!(!self.quiesced_parent.get());
        self.quiesced_parent.set(true);
        match self.parent_ref() {
            ParentRef::Node(p) => {
                if let Some(p) = p.upgrade() {
                    p.drained_begin();
                }
            }
            ParentRef::Root(r) => {
                if let Some(r) = r.upgrade() {
                    r.drained_begin();
                }
            }
        }
    }

    /// Tells the parent that the drained section ended, if it was told it began.
    pub(crate) fn parent_drained_end(&self) {
        if !self.quiesced_parent.replace(false) {
            return;
        }
        match self.parent_ref() {
            ParentRef::Node(p) => {
                if let Some(p) = p.upgrade() {
                    p.drained_end();
                }
            }
            ParentRef::Root(r) => {
                if let Some(r) = r.upgrade() {
                    r.drained_end();
                }
            }
        }
    }

    /// Whether the parent still has work in flight.
    pub(crate) fn parent_drained_poll(&self) -> bool {
        match self.parent_ref() {
            ParentRef::Node(p) => p.upgrade().is_some_and(|p| p.drain_poll()),
            ParentRef::Root(r) => r.upgrade().is_some_and(|r| r.drained_poll()),
        }
    }

    /// The parent reference, copied out so that callbacks may change the graph.
    fn parent_ref(&self) -> ParentRef {
        self.parent.borrow().clone()
    }

    /// The child node's size in bytes.
    pub fn len(&self) -> u64 {
        self.node().len()
    }

    /// Whether the child node has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes at `offset` of the child. What lies past the child's end reads as
    /// zeroes, as in QEMU's block layer: an image's last cluster may be only partly in its
    /// file, and metadata may point past the end (QEMU returns zeroes there, not an error).
    ///
    /// # Errors
    /// As [`Node`]'s request checks and the driver's.
    pub async fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let node = self.node();
        let size = node.len();
        if offset.saturating_add(len as u64) <= size {
            return node.read(offset, len).await;
        }
        let inside = size.saturating_sub(offset).min(len as u64) as usize;
        let mut buf = if inside > 0 {
            node.read(offset, inside).await?
        } else {
            Vec::new()
        };
        buf.resize(len, 0);
        Ok(buf)
    }

    /// Reads `dest.len()` bytes at `offset` of the child into `dest`; as [`Child::read`],
    /// bytes past its end read as zero.
    ///
    /// # Errors
    /// As [`Node`]'s request checks and the driver's.
    pub async fn read_into(&self, offset: u64, dest: &crate::io::ForeignBuf) -> io::Result<()> {
        let node = self.node();
        let inside = node.len().saturating_sub(offset).min(dest.len() as u64) as usize;
        if inside == dest.len() {
            return node.read_into(offset, dest).await;
        }
        if inside > 0 {
            node.read_into(offset, &dest.slice(0, inside)).await?;
        }
        dest.zero_from(inside);
        Ok(())
    }

    /// Raises debug event `event` on the child (QEMU's `BLKDBG_EVENT`): nothing happens
    /// unless the child is a blkdebug node.
    pub async fn debug_event(&self, event: &str) {
        self.node().debug_event(event).await;
    }

    /// Writes `data` at `offset` of the child.
    ///
    /// # Errors
    /// As [`Node`]'s request checks and the driver's.
    pub async fn write(&self, offset: u64, data: Vec<u8>, flags: ReqFlags) -> io::Result<()> {
        self.node().write(offset, data, flags).await
    }

    /// Makes a range of the child read as zeroes.
    ///
    /// # Errors
    /// As [`Child::write`]; ENOTSUP for `NO_FALLBACK` when zeroing would be slow.
    pub async fn write_zeroes(&self, offset: u64, len: u64, flags: ReqFlags) -> io::Result<()> {
        self.node().write_zeroes(offset, len, flags).await
    }

    /// Writes whole clusters compressed where the child's format can.
    ///
    /// # Errors
    /// As [`Child::write`].
    pub async fn write_compressed(&self, offset: u64, data: Vec<u8>) -> io::Result<()> {
        self.node().write_compressed(offset, data).await
    }

    /// Discards a range of the child (a no-op unless it has `discard=unmap`).
    ///
    /// # Errors
    /// As [`Child::write`].
    pub async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.node().discard(offset, len).await
    }

    /// Flushes the child.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn flush(&self) -> io::Result<()> {
        self.node().flush().await
    }

    /// The extent of the child at `offset`, at most `len` long.
    ///
    /// # Errors
    /// EINVAL out of bounds; the driver's error.
    pub async fn block_status(&self, offset: u64, len: u64) -> io::Result<Extent> {
        self.node().block_status(offset, len).await
    }

    /// Changes the child's size.
    ///
    /// # Errors
    /// The driver's error.
    pub async fn truncate(&self, size: u64) -> io::Result<()> {
        self.node().truncate(size).await
    }

    /// Changes the child's size, the added part allocated as `prealloc` says.
    ///
    /// # Errors
    /// The driver's error (ENOTSUP where it cannot preallocate).
    pub async fn truncate_prealloc(
        &self,
        size: u64,
        prealloc: crate::driver::Prealloc,
    ) -> io::Result<()> {
        self.node().truncate_prealloc(size, prealloc).await
    }
}
