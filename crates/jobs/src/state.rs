//! Job states, the transitions between them and the verbs each state accepts (QEMU's
//! `JobStatus`, `JobVerb` and job.c's two tables).

ferrite_qapi::qapi_enum! {
    /// A job's state (`JobStatus`).
    pub enum Status "JobStatus" {
        /// Never visible.
        Undefined = "undefined",
        /// Exists, not started.
        Created = "created",
        /// Doing its work.
        Running = "running",
        /// Paused while running.
        Paused = "paused",
        /// Can be completed (mirror, active commit).
        Ready = "ready",
        /// Paused while ready.
        Standby = "standby",
        /// Done, waiting for the other jobs of its transaction.
        Waiting = "waiting",
        /// Done; the finalize step is still to run.
        Pending = "pending",
        /// Failing or cancelled.
        Aborting = "aborting",
        /// All done; waiting for dismiss.
        Concluded = "concluded",
        /// Being torn down.
        Null = "null",
    }
}

impl Status {
    /// Whether the state machine allows going from `self` to `to`.
    pub fn can_become(self, to: Status) -> bool {
        use Status::*;
        matches!(
            (self, to),
            (Undefined, Created)
                | (Created, Running | Aborting | Null)
                | (Running, Paused | Ready | Waiting | Aborting)
                | (Paused, Running)
                | (Ready, Standby | Waiting | Aborting)
                | (Standby, Ready)
                | (Waiting, Pending | Aborting)
                | (Pending, Aborting | Concluded)
                | (Aborting, Aborting | Concluded)
                | (Concluded, Null)
        )
    }

    /// Whether the state accepts `verb`.
    pub fn accepts(self, verb: Verb) -> bool {
        use Status::*;
        use Verb::*;
        match verb {
            Cancel => matches!(
                self,
                Created | Running | Paused | Ready | Standby | Waiting | Pending
            ),
            Pause | Resume | SetSpeed | Change => {
                matches!(self, Created | Running | Paused | Ready | Standby)
            }
            Complete => matches!(self, Ready | Standby),
            Finalize => self == Pending,
            Dismiss => self == Concluded,
        }
    }
}

ferrite_qapi::qapi_enum! {
    /// A user command on a job (`JobVerb`; not in the storage daemon's schema).
    pub enum Verb "JobVerb" {
        /// `job-cancel`, `block-job-cancel`.
        Cancel = "cancel",
        /// `job-pause`.
        Pause = "pause",
        /// `job-resume`.
        Resume = "resume",
        /// `block-job-set-speed`.
        SetSpeed = "set-speed",
        /// `block-job-change`.
        Change = "change",
        /// `job-complete`.
        Complete = "complete",
        /// `job-finalize`.
        Finalize = "finalize",
        /// `job-dismiss`.
        Dismiss = "dismiss",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Status; 11] = [
        Status::Undefined,
        Status::Created,
        Status::Running,
        Status::Paused,
        Status::Ready,
        Status::Standby,
        Status::Waiting,
        Status::Pending,
        Status::Aborting,
        Status::Concluded,
        Status::Null,
    ];

    #[test]
    fn transition_table_has_qemus_shape() {
        let count: usize = ALL
            .iter()
            .map(|a| ALL.iter().filter(|b| a.can_become(**b)).count())
            .sum();
        // The number of allowed transitions in job.c's table.
        assert_eq!(count, 20);
        assert!(!Status::Null.can_become(Status::Created));
        assert!(Status::Aborting.can_become(Status::Aborting));
    }

    #[test]
    fn nothing_accepts_verbs_in_undefined_or_null_or_aborting() {
        for v in [
            Verb::Cancel,
            Verb::Pause,
            Verb::Resume,
            Verb::SetSpeed,
            Verb::Change,
            Verb::Complete,
            Verb::Finalize,
            Verb::Dismiss,
        ] {
            assert!(!Status::Undefined.accepts(v));
            assert!(!Status::Null.accepts(v));
            assert!(!Status::Aborting.accepts(v));
        }
    }
}
