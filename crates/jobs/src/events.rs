//! The events of jobs (qapi/job.json, qapi/block-core.json), as typed values.

use crate::state::Status;
use crate::types::{BlockErrorAction, IoOperationType, JobType};
use ferrite_qapi::QapiEvent;
use ferrite_qobject::QDict;

/// `JOB_STATUS_CHANGE`: a job changed state.
#[derive(Debug, Clone)]
pub struct JobStatusChange {
    /// The job.
    pub id: String,
    /// Its new state.
    pub status: Status,
}

impl QapiEvent for JobStatusChange {
    fn name(&self) -> &'static str {
        "JOB_STATUS_CHANGE"
    }

    fn data(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("id", self.id.as_str())
                .with("status", self.status.as_str()),
        )
    }
}

/// What `BLOCK_JOB_COMPLETED`, `_CANCELLED` and `_READY` say of a block job.
#[derive(Debug, Clone)]
pub struct BlockJobProgress {
    /// The job type.
    pub kind: JobType,
    /// The job ID (called `device` in these events).
    pub device: String,
    /// Bytes the job has to do (estimate).
    pub len: u64,
    /// Bytes done.
    pub offset: u64,
    /// The rate limit.
    pub speed: u64,
}

impl BlockJobProgress {
    fn dict(&self) -> QDict {
        QDict::new()
            .with("device", self.device.as_str())
            .with("len", self.len)
            .with("offset", self.offset)
            .with("speed", self.speed)
            .with("type", self.kind.as_str())
    }
}

/// `BLOCK_JOB_COMPLETED`: a block job ended, successfully or with `error`.
#[derive(Debug, Clone)]
pub struct BlockJobCompleted {
    /// Where the job got.
    pub progress: BlockJobProgress,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl QapiEvent for BlockJobCompleted {
    fn name(&self) -> &'static str {
        "BLOCK_JOB_COMPLETED"
    }

    fn data(&self) -> Option<QDict> {
        let mut d = self.progress.dict();
        d.insert_opt("error", self.error.as_deref());
        Some(d)
    }
}

/// `BLOCK_JOB_CANCELLED`: a block job was cancelled.
#[derive(Debug, Clone)]
pub struct BlockJobCancelled(pub BlockJobProgress);

impl QapiEvent for BlockJobCancelled {
    fn name(&self) -> &'static str {
        "BLOCK_JOB_CANCELLED"
    }

    fn data(&self) -> Option<QDict> {
        Some(self.0.dict())
    }
}

/// `BLOCK_JOB_READY`: a block job can be completed.
#[derive(Debug, Clone)]
pub struct BlockJobReady(pub BlockJobProgress);

impl QapiEvent for BlockJobReady {
    fn name(&self) -> &'static str {
        "BLOCK_JOB_READY"
    }

    fn data(&self) -> Option<QDict> {
        Some(self.0.dict())
    }
}

/// `BLOCK_JOB_PENDING`: a block job waits for `job-finalize`.
#[derive(Debug, Clone)]
pub struct BlockJobPending {
    /// The job type.
    pub kind: JobType,
    /// The job ID.
    pub id: String,
}

impl QapiEvent for BlockJobPending {
    fn name(&self) -> &'static str {
        "BLOCK_JOB_PENDING"
    }

    fn data(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("type", self.kind.as_str())
                .with("id", self.id.as_str()),
        )
    }
}

/// `BLOCK_JOB_ERROR`: a block job's request failed, and what the job did about it.
#[derive(Debug, Clone)]
pub struct BlockJobError {
    /// The job ID.
    pub device: String,
    /// Which side failed.
    pub operation: IoOperationType,
    /// What the job did.
    pub action: BlockErrorAction,
}

impl QapiEvent for BlockJobError {
    fn name(&self) -> &'static str {
        "BLOCK_JOB_ERROR"
    }

    fn data(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("device", self.device.as_str())
                .with("operation", self.operation.as_str())
                .with("action", self.action.as_str()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_qapi::{QapiEnum, check_event};

    fn progress(kind: JobType) -> BlockJobProgress {
        BlockJobProgress {
            kind,
            device: "j".into(),
            len: 2,
            offset: 1,
            speed: 0,
        }
    }

    #[test]
    fn every_event_matches_its_schema_declaration() {
        for &status in Status::ALL {
            check_event(&JobStatusChange {
                id: "j".into(),
                status,
            })
            .unwrap();
        }
        for &kind in JobType::ALL {
            for error in [None, Some("failed".to_owned())] {
                check_event(&BlockJobCompleted {
                    progress: progress(kind),
                    error,
                })
                .unwrap();
            }
            check_event(&BlockJobCancelled(progress(kind))).unwrap();
            check_event(&BlockJobReady(progress(kind))).unwrap();
            check_event(&BlockJobPending {
                kind,
                id: "j".into(),
            })
            .unwrap();
        }
        for &operation in IoOperationType::ALL {
            for &action in BlockErrorAction::ALL {
                check_event(&BlockJobError {
                    device: "j".into(),
                    operation,
                    action,
                })
                .unwrap();
            }
        }
    }
}
