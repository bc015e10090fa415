//! The devices a machine gets without being asked (QEMU's default devices): an empty CD-ROM
//! drive at IDE index 2, an empty floppy drive at index 0 on the PC, and a parallel port.
//! `-nodefaults` leaves them all out; naming a device of the same kind with `-device` or
//! `-global` leaves out that kind's default, and `-parallel` the port.

use crate::cli::SysOption;
use crate::machine::Board;
use ferrite_storage_daemon::front_end::keyval;

/// Which default devices the machine gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Defaults {
    pub(crate) cdrom: bool,
    pub(crate) floppy: bool,
    pub(crate) parallel: bool,
}

/// The `-drive` text of the default CD-ROM drive.
pub(crate) const CDROM: &str = "if=ide,index=2,media=cdrom";
/// The `-drive` text of the default floppy drive.
pub(crate) const FLOPPY: &str = "if=floppy,index=0";

/// The model a `-device` or `-global` option is about.
fn driver_of(o: &SysOption) -> Option<String> {
    match o.name {
        "device" => keyval::parse(o.text(), Some("driver"))
            .ok()?
            .value
            .get("driver")?
            .as_str()
            .map(str::to_owned),
        "global" => parse_global(o.text()).ok().map(|(d, _, _)| d),
        _ => None,
    }
}

impl Defaults {
    /// The defaults `options` leave for a machine with `board`.
    pub(crate) fn of(options: &[SysOption], board: Board) -> Defaults {
        let given = |name: &str| options.iter().any(|o| o.name == name);
        if given("nodefaults") || board == Board::None {
            return Defaults {
                cdrom: false,
                floppy: false,
                parallel: false,
            };
        }
        let named: Vec<String> = options.iter().filter_map(driver_of).collect();
        let named_any = |models: &[&str]| named.iter().any(|n| models.contains(&n.as_str()));
        Defaults {
            cdrom: !named_any(&["ide-cd", "ide-hd", "scsi-cd", "scsi-hd"]),
            floppy: board.has_floppy() && !named_any(&["isa-fdc", "floppy"]),
            parallel: !given("parallel") && !named_any(&["isa-parallel"]),
        }
    }
}

/// Whether the machine has a parallel port: the default one, or one `-parallel` asks for.
pub(crate) fn has_parallel(options: &[SysOption], defaults: Defaults) -> bool {
    defaults.parallel
        || options
            .iter()
            .any(|o| o.name == "parallel" && o.text() != "none")
}

/// `-global DRIVER.PROPERTY=VALUE`, or `-global driver=D,property=P,value=V`.
///
/// # Errors
/// QEMU's texts for a missing part.
pub(crate) fn parse_global(text: &str) -> Result<(String, String, String), String> {
    if let Some((key, value)) = text.split_once('=')
        && let Some((driver, property)) = key.split_once('.')
        && !driver.is_empty()
        && !property.is_empty()
    {
        return Ok((driver.into(), property.into(), value.into()));
    }
    let parsed = keyval::parse(text, None).map_err(|e| e.cli_text())?;
    let part = |name: &str| {
        parsed
            .value
            .get(name)
            .and_then(|v| v.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("Parameter '{name}' is missing"))
    };
    Ok((part("driver")?, part("property")?, part("value")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt(name: &'static str, value: &str) -> SysOption {
        SysOption {
            name,
            value: Some(value.into()),
        }
    }

    #[test]
    fn devices_of_a_kind_leave_out_its_default() {
        let all = Defaults {
            cdrom: true,
            floppy: true,
            parallel: true,
        };
        assert_eq!(Defaults::of(&[], Board::Pc), all);
        assert!(!Defaults::of(&[], Board::Q35).floppy);
        assert!(!Defaults::of(&[opt("device", "floppy")], Board::Pc).floppy);
        assert!(!Defaults::of(&[opt("global", "floppy.drive=none0")], Board::Pc).floppy);
        assert!(!Defaults::of(&[opt("device", "driver=ide-hd,drive=x")], Board::Pc).cdrom);
        assert!(!Defaults::of(&[opt("parallel", "none")], Board::Pc).parallel);
        let none = SysOption {
            name: "nodefaults",
            value: None,
        };
        assert!(!Defaults::of(&[none], Board::Pc).cdrom);
    }

    #[test]
    fn globals_take_both_spellings() {
        assert_eq!(
            parse_global("floppy.drive=none0").unwrap(),
            ("floppy".into(), "drive".into(), "none0".into())
        );
        assert_eq!(
            parse_global("driver=floppy,property=drive-type,value=144").unwrap(),
            ("floppy".into(), "drive-type".into(), "144".into())
        );
        assert!(parse_global("floppy").is_err());
    }
}
