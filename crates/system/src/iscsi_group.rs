//! `-iscsi [id=TARGET,]user=...,password=...,header-digest=...,initiator-name=...,timeout=N`:
//! defaults for the iSCSI nodes that `iscsi://` names open, for one target or, without
//! `id`, for any. Checked as qemu-system checks the group while it reads its command line
//! (every value is text but `timeout`, a number); the iscsi driver reads the values only
//! when a node opens.

use ferrite_block::emulator::IscsiGroup;

/// The group's options.
const KEYS: [&str; 6] = [
    "user",
    "password",
    "password-secret",
    "header-digest",
    "initiator-name",
    "timeout",
];

/// The group `text` stands for, `earlier` being those given before it; deprecated
/// spellings go to `warnings`.
///
/// # Errors
/// qemu-system's texts, without the option's name.
pub(crate) fn parse(
    text: &str,
    earlier: &[IscsiGroup],
    warnings: &mut Vec<String>,
) -> Result<IscsiGroup, String> {
    let mut group = IscsiGroup::default();
    for (key, value) in ferrite_qapi::qemu_opts::split(text) {
        let (key, value) = match value {
            Some(v) => (key, v),
            // A bare key is a boolean, `noKEY` one that is off: deprecated spellings.
            None => {
                let (name, v, warning) = ferrite_qapi::qemu_opts::short_form_boolean(&key);
                warnings.push(warning);
                (name, v.to_owned())
            }
        };
        if key == "id" {
            if !ferrite_qapi::id_wellformed(&value) {
                return Err(
                    "Parameter 'id' expects an identifier\nIdentifiers consist of \
                            letters, digits, '-', '.', '_', starting with a letter."
                        .to_owned(),
                );
            }
            group.id = Some(value);
            continue;
        }
        if !KEYS.contains(&key.as_str()) {
            return Err(format!("Invalid parameter '{key}'"));
        }
        if key == "timeout" && ferrite_qapi::visit::parse_c_integer(&value).is_none() {
            return Err("Parameter 'timeout' expects a number".to_owned());
        }
        // A later value of an option wins.
        group.opts.retain(|(k, _)| *k != key);
        group.opts.push((key, value));
    }
    if let Some(id) = &group.id
        && earlier.iter().any(|g| g.id.as_ref() == Some(id))
    {
        return Err(format!("Duplicate ID '{id}' for iscsi"));
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_alone(text: &str) -> Result<IscsiGroup, String> {
        parse(text, &[], &mut Vec::new())
    }

    #[test]
    fn groups_parse_as_qemu_system_reads_them() {
        let g = parse_alone("id=t,user=u,password=a,,b,timeout=0x10,user=v").unwrap();
        assert_eq!(g.id.as_deref(), Some("t"));
        assert_eq!(
            g.opts,
            [
                ("password".to_owned(), "a,b".to_owned()),
                ("timeout".to_owned(), "0x10".to_owned()),
                ("user".to_owned(), "v".to_owned()),
            ]
        );
        let mut warnings = Vec::new();
        let g = parse("user", &[], &mut warnings).unwrap();
        assert_eq!(g.opts, [("user".to_owned(), "on".to_owned())]);
        assert_eq!(
            warnings,
            ["short-form boolean option 'user' deprecated\nPlease use user=on instead"]
        );
    }

    #[test]
    fn bad_groups_are_refused_with_qemu_system_texts() {
        assert_eq!(parse_alone("foo=1").unwrap_err(), "Invalid parameter 'foo'");
        assert_eq!(
            parse_alone("timeout=abc").unwrap_err(),
            "Parameter 'timeout' expects a number"
        );
        assert!(
            parse_alone("id=iqn.2026-12.org.x:t")
                .unwrap_err()
                .starts_with("Parameter 'id' expects an identifier\n")
        );
        let first = parse_alone("id=a").unwrap();
        assert_eq!(
            parse("id=a,user=u", &[first], &mut Vec::new()).unwrap_err(),
            "Duplicate ID 'a' for iscsi"
        );
    }
}
