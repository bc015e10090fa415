//! argv to an ordered list of options, as qemu-system's option loop sees them: `-name` or
//! `--name`, a value in the next argument for the options that take one, and a stray
//! argument taken as `-hda`. Pure: nothing is acted on here.

/// One option as given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SysOption {
    /// Its name without dashes, a short alias resolved (`M` is `machine`).
    pub(crate) name: &'static str,
    /// Its value, for options that take one.
    pub(crate) value: Option<String>,
}

impl SysOption {
    /// How the option is written in messages (`-drive if=none,id=d0`).
    pub(crate) fn describe(&self) -> String {
        match &self.value {
            Some(v) => format!("-{} {v}", self.name),
            None => format!("-{}", self.name),
        }
    }

    /// The value (empty for options without one).
    pub(crate) fn text(&self) -> &str {
        self.value.as_deref().unwrap_or("")
    }
}

/// The options understood: name and whether it takes a value. Options a machine without a
/// guest CPU has no use for are accepted and have no effect (`-m`, `-smp`, `-cpu`...).
const OPTIONS: &[(&str, bool)] = &[
    ("h", false),
    ("help", false),
    ("version", false),
    ("machine", true),
    ("accel", true),
    ("enable-kvm", false),
    ("nodefaults", false),
    ("display", true),
    ("vga", true),
    ("nographic", false),
    ("serial", true),
    ("parallel", true),
    ("monitor", true),
    ("qmp", true),
    ("qmp-pretty", true),
    ("mon", true),
    ("chardev", true),
    ("qtest", true),
    ("qtest-log", true),
    ("object", true),
    ("blockdev", true),
    ("drive", true),
    ("hda", true),
    ("hdb", true),
    ("hdc", true),
    ("hdd", true),
    ("cdrom", true),
    ("fda", true),
    ("fdb", true),
    ("device", true),
    ("global", true),
    ("set", true),
    ("S", false),
    ("snapshot", false),
    ("name", true),
    ("add-fd", true),
    ("incoming", true),
    ("loadvm", true),
    ("m", true),
    ("smp", true),
    ("cpu", true),
    ("boot", true),
    ("rtc", true),
    ("k", true),
    ("L", true),
    ("d", true),
    ("D", true),
    ("trace", true),
    ("msg", true),
    ("sandbox", true),
    ("overcommit", true),
    ("no-shutdown", false),
    ("no-reboot", false),
    ("preconfig", false),
    ("net", true),
    ("netdev", true),
    ("nic", true),
    ("usb", false),
    ("iothread", true),
    ("uuid", true),
    ("iscsi", true),
];

/// Short spellings of longer options.
const ALIASES: &[(&str, &str)] = &[("M", "machine")];

/// Splits argv (without the program name) into options.
///
/// # Errors
/// qemu-system's texts: "-x: invalid option", "-x: requires an argument".
pub(crate) fn parse_args(args: &[String]) -> Result<Vec<SysOption>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        let Some(body) = arg.strip_prefix('-').filter(|b| !b.is_empty()) else {
            // A bare argument is the first hard disk's image.
            out.push(SysOption {
                name: "hda",
                value: Some(arg.clone()),
            });
            continue;
        };
        let body = body.strip_prefix('-').unwrap_or(body);
        let body = ALIASES
            .iter()
            .find(|(a, _)| *a == body)
            .map_or(body, |(_, full)| full);
        let Some(&(name, takes)) = OPTIONS.iter().find(|(n, _)| *n == body) else {
            return Err(format!("{arg}: invalid option"));
        };
        let value = if takes {
            let Some(v) = args.get(i) else {
                return Err(format!("{arg}: requires an argument"));
            };
            i += 1;
            Some(v.clone())
        } else {
            None
        };
        out.push(SysOption { name, value });
    }
    Ok(out)
}

/// The `id=` of an option's value (QEMU's `QemuOpts` id).
fn option_id(value: &str) -> Option<String> {
    ferrite_qapi::qemu_opts::split(value)
        .into_iter()
        .find_map(|(k, v)| (k == "id").then_some(v?))
}

/// The option groups `-set` cannot change: those read as QAPI rather than `QemuOpts`.
const NOT_SETTABLE: &[&str] = &["object", "audiodev", "machine", "smp-opts", "boot-opts"];

/// Applies each `-set GROUP.ID.PROP=VALUE` to the option of group `GROUP` with `id=ID`
/// given before it, as qemu-system's option loop does: the property is added to it (a
/// later value of a property wins).
///
/// # Errors
/// The `-set` option that failed and qemu-system's text for why.
pub(crate) fn apply_sets(options: &mut [SysOption]) -> Result<(), (SysOption, String)> {
    for k in 0..options.len() {
        if options[k].name != "set" {
            continue;
        }
        let set = options[k].clone();
        let text = set.text();
        let parsed = text.split_once('=').and_then(|(path, value)| {
            let mut it = path.splitn(3, '.');
            let (g, id, prop) = (it.next()?, it.next()?, it.next()?);
            (!g.is_empty() && !id.is_empty() && !prop.is_empty()).then_some((g, id, prop, value))
        });
        let Some((group, id, prop, value)) = parsed else {
            return Err((set.clone(), format!("can't parse: \"{text}\"")));
        };
        if NOT_SETTABLE.contains(&group) {
            return Err((set.clone(), format!("-set is not supported with {group}")));
        }
        if !OPTIONS.iter().any(|(n, takes)| *n == group && *takes) {
            return Err((set.clone(), format!("There is no option group '{group}'")));
        }
        let target = options[..k]
            .iter_mut()
            .rev()
            .find(|o| o.name == group && option_id(o.text()).as_deref() == Some(id));
        let Some(target) = target else {
            return Err((set.clone(), format!("there is no {group} \"{id}\" defined")));
        };
        let old = target.text().to_owned();
        target.value = Some(format!("{old},{prop}={}", value.replace(',', ",,")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{apply_sets, parse_args};

    #[test]
    fn set_adds_a_property_to_the_option_with_that_id() {
        let mut o = parse_args(&args(&[
            "-device",
            "virtio-scsi,id=hba0",
            "-set",
            "device.hba0.iothread=io0",
        ]))
        .unwrap();
        apply_sets(&mut o).unwrap();
        assert_eq!(o[0].text(), "virtio-scsi,id=hba0,iothread=io0");
        let mut o = parse_args(&args(&["-set", "device.nope.x=1"])).unwrap();
        assert_eq!(
            apply_sets(&mut o).unwrap_err().1,
            "there is no device \"nope\" defined"
        );
        let mut o = parse_args(&args(&["-set", "device.nope"])).unwrap();
        assert_eq!(
            apply_sets(&mut o).unwrap_err().1,
            "can't parse: \"device.nope\""
        );
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn options_values_aliases_and_errors_as_qemu_system() {
        let o = parse_args(&args(&["-M", "none", "--nodefaults", "disk.img", "-S"])).unwrap();
        let names: Vec<_> = o.iter().map(|o| (o.name, o.value.as_deref())).collect();
        assert_eq!(
            names,
            [
                ("machine", Some("none")),
                ("nodefaults", None),
                ("hda", Some("disk.img")),
                ("S", None)
            ]
        );
        assert_eq!(
            parse_args(&args(&["-foo"])).unwrap_err(),
            "-foo: invalid option"
        );
        assert_eq!(
            parse_args(&args(&["-drive"])).unwrap_err(),
            "-drive: requires an argument"
        );
    }
}
