//! Job states, the transitions between them and the verbs each state accepts (QEMU's
//! `JobStatus`, `JobVerb` and job.c's two tables).

/// A job's state (`JobStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    Null,
}

impl Status {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Undefined => "undefined",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Ready => "ready",
            Status::Standby => "standby",
            Status::Waiting => "waiting",
            Status::Pending => "pending",
            Status::Aborting => "aborting",
            Status::Concluded => "concluded",
            Status::Null => "null",
        }
    }

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

/// A user command on a job (`JobVerb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Cancel,
    Pause,
    Resume,
    SetSpeed,
    Change,
    Complete,
    Finalize,
    Dismiss,
}

impl Verb {
    /// The QAPI name.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Cancel => "cancel",
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::SetSpeed => "set-speed",
            Verb::Change => "change",
            Verb::Complete => "complete",
            Verb::Finalize => "finalize",
            Verb::Dismiss => "dismiss",
        }
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
