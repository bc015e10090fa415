//! The QAPI enums of jobs (qapi/job.json, qapi/block-core.json) as Rust enums.

ferrite_qapi::qapi_enum! {
    /// What kind of job a job is (`JobType`).
    pub enum JobType "JobType" {
        /// `block-commit`.
        Commit = "commit",
        /// `block-stream`.
        Stream = "stream",
        /// `blockdev-mirror`, `drive-mirror`.
        Mirror = "mirror",
        /// `blockdev-backup`, `drive-backup`.
        Backup = "backup",
        /// `blockdev-create`.
        Create = "create",
        /// `x-blockdev-amend`.
        Amend = "amend",
        /// Loading a VM snapshot.
        SnapshotLoad = "snapshot-load",
        /// Saving a VM snapshot.
        SnapshotSave = "snapshot-save",
        /// Deleting a VM snapshot.
        SnapshotDelete = "snapshot-delete",
    }
}

ferrite_qapi::qapi_enum! {
    /// What a block job copies (`MirrorSyncMode`).
    pub enum MirrorSyncMode "MirrorSyncMode" {
        /// What the top layer allocates.
        Top = "top",
        /// Everything.
        Full = "full",
        /// Nothing in the background (only what writes are about to change).
        None = "none",
        /// What a bitmap marks, the bitmap synced on success.
        Incremental = "incremental",
        /// What a bitmap marks.
        Bitmap = "bitmap",
    }
}

ferrite_qapi::qapi_enum! {
    /// What happens to a backup's bitmap at the end (`BitmapSyncMode`).
    pub enum BitmapSyncMode "BitmapSyncMode" {
        /// Synced if the job succeeds.
        OnSuccess = "on-success",
        /// Never synced.
        Never = "never",
        /// Always synced.
        Always = "always",
    }
}

ferrite_qapi::qapi_enum! {
    /// What a job did about an I/O error (`BlockErrorAction`, in `BLOCK_JOB_ERROR`).
    pub enum BlockErrorAction "BlockErrorAction" {
        /// Went on.
        Ignore = "ignore",
        /// Failed.
        Report = "report",
        /// Paused.
        Stop = "stop",
    }
}

ferrite_qapi::qapi_enum! {
    /// Which side of a copy failed (`IoOperationType`, in `BLOCK_JOB_ERROR`).
    pub enum IoOperationType "IoOperationType" {
        /// Reading the source.
        Read = "read",
        /// Writing the target.
        Write = "write",
    }
}

ferrite_qapi::qapi_enum! {
    /// How a mirror keeps up with writes (`MirrorCopyMode`).
    pub enum MirrorCopyMode "MirrorCopyMode" {
        /// Writes mark the bitmap; the job copies them later.
        Background = "background",
        /// A write completes only once it is on the target too.
        WriteBlocking = "write-blocking",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Status;
    use ferrite_qapi::check_enum;

    #[test]
    fn every_enum_has_the_schemas_values() {
        check_enum::<JobType>().unwrap();
        check_enum::<MirrorSyncMode>().unwrap();
        check_enum::<BitmapSyncMode>().unwrap();
        check_enum::<BlockErrorAction>().unwrap();
        check_enum::<IoOperationType>().unwrap();
        check_enum::<MirrorCopyMode>().unwrap();
        check_enum::<Status>().unwrap();
    }
}
