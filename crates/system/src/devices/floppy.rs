//! What a floppy drive decides as it is plugged in (QEMU: `floppy_drive_realize`): its unit
//! on the controller's bus, its block sizes, and its drive type, picked from the inserted
//! diskette's size when the type is `auto`.

use super::generic;
use ferrite_qapi::Error;

/// Drives a floppy controller takes.
pub(crate) const UNITS: u32 = 2;

/// The type a controller gives a drive it cannot match to a diskette (its `fallback`).
const FALLBACK: &str = "288";

/// The diskette formats a drive type reads, in the order QEMU's controller tries them:
/// (drive type, sectors per track, tracks, heads). The first whose size is the diskette's
/// decides the type of an `auto` drive.
const FORMATS: &[(&str, u64, u64, u64)] = &[
    // 1.44 MB 3.5" disks, and their extended formats
    ("144", 18, 80, 2),
    ("144", 20, 80, 2),
    ("144", 21, 80, 2),
    ("144", 21, 82, 2),
    ("144", 21, 83, 2),
    ("144", 22, 80, 2),
    ("144", 23, 80, 2),
    ("144", 24, 80, 2),
    // 2.88 MB 3.5"
    ("288", 36, 80, 2),
    ("288", 39, 80, 2),
    ("288", 40, 80, 2),
    ("288", 44, 80, 2),
    ("288", 48, 80, 2),
    // 720 kB 3.5"
    ("144", 9, 80, 2),
    ("144", 10, 80, 2),
    ("144", 10, 82, 2),
    ("144", 10, 83, 2),
    ("144", 13, 80, 2),
    ("144", 14, 80, 2),
    // 1.2 MB 5.25"
    ("120", 15, 80, 2),
    ("120", 18, 80, 2),
    ("120", 18, 82, 2),
    ("120", 18, 83, 2),
    ("120", 20, 80, 2),
    // 720 kB 5.25"
    ("120", 9, 80, 2),
    ("120", 11, 80, 2),
    // 360 kB 5.25"
    ("120", 9, 40, 2),
    ("120", 9, 40, 1),
    ("120", 10, 41, 2),
    ("120", 10, 42, 2),
    // 320 kB 5.25"
    ("120", 8, 40, 2),
    ("120", 8, 40, 1),
    // 360 kB 3.5" (after the 5.25" one of the same size)
    ("144", 9, 80, 1),
];

/// The drive types `drive-type` takes.
const TYPES: &[&str] = &["auto", "120", "144", "288", "none"];

/// Checks a `drive-type` value.
///
/// # Errors
/// QEMU's text for a value that is not a drive type.
pub(crate) fn parse_type(v: &str) -> Result<&'static str, Error> {
    TYPES.iter().find(|t| **t == v).copied().ok_or_else(|| {
        generic(format!(
            "Parameter 'drive-type' does not accept value '{v}'"
        ))
    })
}

/// The type a drive of type `wanted` has with a diskette of `len` bytes in it (`None`:
/// empty): `auto` becomes the type of the first format of the diskette's size, else the
/// controller's fallback; any other type stays.
pub(crate) fn pick_type(wanted: &'static str, len: Option<u64>) -> &'static str {
    if wanted != "auto" {
        return wanted;
    }
    let Some(sectors) = len.map(|l| l / 512) else {
        return FALLBACK;
    };
    FORMATS
        .iter()
        .find(|(_, sect, tracks, heads)| sect * tracks * heads == sectors)
        .map_or(FALLBACK, |(t, ..)| t)
}

/// The unit a drive takes: `unit` if given, else the first free one.
///
/// # Errors
/// QEMU's texts for a unit beyond the bus's and for a unit in use.
pub(crate) fn unit(given: Option<&str>, used: impl Fn(u32) -> bool) -> Result<u32, Error> {
    let unit = match given {
        Some(u) => u
            .parse::<u32>()
            .map_err(|_| generic("Parameter 'unit' expects uint32_t"))?,
        None => (0..UNITS).find(|u| !used(*u)).unwrap_or(UNITS),
    };
    if unit >= UNITS {
        return Err(generic(format!(
            "Can't create floppy unit {unit}, bus supports only {UNITS} units"
        )));
    }
    if used(unit) {
        return Err(generic(format!("Floppy unit {unit} is in use")));
    }
    Ok(unit)
}

/// A floppy drive's sectors are 512 bytes, logical and physical.
///
/// # Errors
/// QEMU's text for any other size.
pub(crate) fn check_block_sizes(logical: u64, physical: u64) -> Result<(), Error> {
    if logical != 512 || physical != 512 {
        return Err(generic(
            "Physical and logical block size must be 512 for floppy",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_auto_drive_takes_the_type_of_its_diskette() {
        assert_eq!(pick_type("auto", Some(1_474_560)), "144");
        assert_eq!(pick_type("auto", Some(737_280)), "144");
        assert_eq!(pick_type("auto", Some(2_949_120)), "288");
        assert_eq!(pick_type("auto", Some(1_228_800)), "120");
        assert_eq!(pick_type("auto", Some(368_640)), "120");
        assert_eq!(pick_type("auto", Some(12345)), "288");
        assert_eq!(pick_type("auto", None), "288");
        assert_eq!(pick_type("120", Some(737_280)), "120");
    }

    #[test]
    fn units_are_taken_in_turn_and_checked() {
        assert_eq!(unit(None, |_| false).unwrap(), 0);
        assert_eq!(unit(None, |u| u == 0).unwrap(), 1);
        assert_eq!(
            unit(None, |_| true).unwrap_err().desc,
            "Can't create floppy unit 2, bus supports only 2 units"
        );
        assert_eq!(
            unit(Some("1"), |u| u == 1).unwrap_err().desc,
            "Floppy unit 1 is in use"
        );
    }
}
