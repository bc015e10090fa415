//! QEMU's op blockers: a block job blocks every operation on the nodes it uses, and an
//! overlay blocks most operations on its backing file. The newest blocker speaks ("Node
//! 'x' is busy: ...").

use super::Graph;
use crate::error::{Error, Result};
use crate::node::Node;

/// The operations an op blocker may refuse (QEMU's `BlockOpType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// The source of `drive-backup` or `blockdev-backup`.
    BackupSource,
    /// The target of a backup.
    BackupTarget,
    /// `change-backing-file`.
    Change,
    /// The device a commit starts from (and HMP `commit`'s top).
    CommitSource,
    /// The nodes a commit writes into or relinks.
    CommitTarget,
    /// Deleting a node or a drive.
    DriveDel,
    /// Taking the medium out of a device.
    Eject,
    /// Putting an overlay on the node.
    ExternalSnapshot,
    /// Taking an internal snapshot.
    InternalSnapshot,
    /// Deleting an internal snapshot.
    InternalSnapshotDelete,
    /// The source of a mirror.
    MirrorSource,
    /// The target of a mirror.
    MirrorTarget,
    /// The node a mirror replaces on completion.
    Replace,
    /// `block_resize`.
    Resize,
    /// The nodes a stream copies from.
    Stream,
}

impl BlockOp {
    /// Whether an overlay lets this operation happen on its backing file: what a commit,
    /// a stream and a backup do to the chain below an overlay.
    fn allowed_on_backing_file(self) -> bool {
        matches!(
            self,
            Self::CommitTarget | Self::Stream | Self::BackupSource | Self::BackupTarget
        )
    }
}

impl Graph {
    /// Marks `node` as used by a block job: every operation on it is refused until
    /// [`Graph::unblock`].
    pub fn block(&self, node: &Node, reason: &str) {
        let at = self.next_id();
        self.blockers
            .borrow_mut()
            .push((node.name.clone(), reason.to_owned(), at));
    }

    /// Lifts one [`Graph::block`] of `node` for `reason`.
    pub fn unblock(&self, node: &Node, reason: &str) {
        let mut b = self.blockers.borrow_mut();
        if let Some(i) = b
            .iter()
            .position(|(n, r, _)| *n == node.name && r == reason)
        {
            b.remove(i);
        }
    }

    /// Whether `op` may happen on `node` now (QEMU's `bdrv_op_is_blocked`): not while a
    /// job uses the node, and, for most operations, not while it is an overlay's backing
    /// file. Of the blockers that refuse `op`, the newest speaks.
    ///
    /// # Errors
    /// QEMU's "Node 'x' is busy: ..." with that blocker's reason.
    pub fn check_op(&self, node: &Node, op: BlockOp) -> Result<()> {
        let as_backing = (!op.allowed_on_backing_file())
            .then(|| {
                node.users()
                    .iter()
                    .filter(|u| u.name() == "backing")
                    .filter_map(|u| {
                        let parent = u.parent_node()?;
                        Some((
                            format!("node is used as backing hd of '{}'", parent.name),
                            u.id,
                        ))
                    })
                    .max_by_key(|(_, at)| *at)
            })
            .flatten();
        let newest = [self.newest_job_blocker(node), as_backing]
            .into_iter()
            .flatten()
            .max_by_key(|(_, at)| *at);
        match newest {
            Some((reason, _)) => Err(Error::Busy {
                node: node.device_or_node_name(),
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The reason and age of the newest job blocker of `node`.
    fn newest_job_blocker(&self, node: &Node) -> Option<(String, u64)> {
        self.blockers
            .borrow()
            .iter()
            .rev()
            .find(|(n, _, _)| *n == node.name)
            .map(|(_, reason, at)| (reason.clone(), *at))
    }
}
