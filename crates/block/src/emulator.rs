//! What a system emulator's command line tells the drivers for the whole process, where QEMU
//! keeps it in globals: the machine's name and UUID (an iSCSI initiator's default name is
//! made of them) and the `-iscsi` option groups (defaults for the nodes that `iscsi://` names
//! open). A storage daemon sets none of it.

use std::sync::Mutex;

/// One `-iscsi` option group: its `id` (the target it is for) and its other options, in
/// the order given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IscsiGroup {
    /// `id=`: the IQN of the target the group is for.
    pub id: Option<String>,
    /// The group's other options.
    pub opts: Vec<(String, String)>,
}

struct Settings {
    /// `-uuid`, unless it is the nil UUID (QEMU does not tell a nil UUID from none).
    uuid: Option<String>,
    /// `-name`.
    name: Option<String>,
    iscsi: Vec<IscsiGroup>,
}

static SETTINGS: Mutex<Settings> = Mutex::new(Settings {
    uuid: None,
    name: None,
    iscsi: Vec::new(),
});

fn settings<T>(f: impl FnOnce(&mut Settings) -> T) -> T {
    // A panic while the lock was held cannot leave the plain values in it half-written.
    let mut s = SETTINGS.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut s)
}

/// The nil UUID: what `query-uuid` answers when no `-uuid` was given.
pub const NIL_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// Records the machine's `-name` and `-uuid` (lower case, as `query-uuid` shows it).
pub fn set_machine(name: Option<String>, uuid: Option<String>) {
    settings(|s| {
        s.name = name;
        s.uuid = uuid.filter(|u| u != NIL_UUID);
    });
}

/// What names the machine to the outside: its UUID when it has one, else its name (QEMU's
/// choice for the iSCSI initiator name).
pub fn machine_label() -> Option<String> {
    settings(|s| s.uuid.clone().or_else(|| s.name.clone()))
}

/// Records the `-iscsi` option groups, in the order given.
pub fn set_iscsi_groups(groups: Vec<IscsiGroup>) {
    settings(|s| s.iscsi = groups);
}

/// The options of the `-iscsi` group for `target`, or of the first group when none is for
/// it; none without groups.
pub fn iscsi_defaults(target: &str) -> Vec<(String, String)> {
    settings(|s| group_for(&s.iscsi, target))
}

fn group_for(groups: &[IscsiGroup], target: &str) -> Vec<(String, String)> {
    groups
        .iter()
        .find(|g| g.id.as_deref() == Some(target))
        .or_else(|| groups.first())
        .map(|g| g.opts.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_for_a_target_or_else_the_first() {
        let group = |id: Option<&str>, user: &str| IscsiGroup {
            id: id.map(str::to_owned),
            opts: vec![("user".into(), user.into())],
        };
        // The process-wide groups stay untouched: other tests open iSCSI names meanwhile.
        let groups = [group(None, "first"), group(Some("t"), "for-t")];
        assert_eq!(group_for(&groups, "t"), [("user".into(), "for-t".into())]);
        assert_eq!(
            group_for(&groups, "other"),
            [("user".into(), "first".into())]
        );
        assert!(group_for(&[], "t").is_empty());
    }
}
