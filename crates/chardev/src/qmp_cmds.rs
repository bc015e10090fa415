//! The chardev QMP commands (QEMU: `chardev/char.c`, `chardev/char-ringbuf.c`).

use crate::error::{Error, Result};
use crate::registry::{ChardevRegistry, Origin};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject, lossy_from_bytes};

fn backend_args(args: &Args) -> Args {
    args.dict("backend").unwrap_or_default()
}

/// `chardev-add`.
///
/// # Errors
/// A duplicate id, or the backend failing to open (prefixed as QEMU prefixes it).
pub fn qmp_chardev_add(reg: &ChardevRegistry, args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let id = args.str("id")?;
    if reg.get(id).is_some() {
        return Err(Error::Exists(id.to_owned()).into());
    }
    add(reg, id, args)
}

fn add(reg: &ChardevRegistry, id: &str, args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let dev = reg.add(id, &backend_args(args), Origin::Qmp).map_err(|e| {
        ferrite_qapi::Error::from(e).prepend(format!("Failed to add chardev '{id}': "))
    })?;
    Ok(chardev_return(&dev))
}

/// `ChardevReturn`: the terminal of a `pty`.
fn chardev_return(dev: &crate::Chardev) -> QObject {
    let mut ret = QDict::new();
    if let Some(pty) = dev.with_backend(|b| b.pty_device().map(str::to_owned)) {
        ret.insert("pty", pty);
    }
    ret.into()
}

/// `chardev-change`: without a frontend, a remove and an add.
///
/// # Errors
/// Unknown id, a mux or hub, a frontend that cannot follow, or the new backend failing to
/// open (the chardev is then gone, as in QEMU).
pub fn qmp_chardev_change(
    reg: &ChardevRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    let id = args.str("id")?;
    reg.remove_for_change(id)?;
    add(reg, id, args)
}

/// `chardev-remove`.
///
/// # Errors
/// Unknown id, or a frontend attached.
pub fn qmp_chardev_remove(
    reg: &ChardevRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    reg.remove(args.str("id")?)?;
    Ok(QDict::new().into())
}

/// `chardev-send-break`: no frontend of a storage daemon reacts to a break, so it only checks
/// that the chardev exists.
///
/// # Errors
/// Unknown id.
pub fn qmp_chardev_send_break(
    reg: &ChardevRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    let id = args.str("id")?;
    reg.get(id).ok_or_else(|| Error::NotFound(id.to_owned()))?;
    Ok(QDict::new().into())
}

/// `query-chardev`.
pub fn qmp_query_chardev(reg: &ChardevRegistry) -> QObject {
    reg.all()
        .iter()
        .map(|d| {
            QObject::Dict(
                QDict::new()
                    .with("label", d.id())
                    .with("filename", d.filename())
                    .with("frontend-open", d.frontend_open()),
            )
        })
        .collect::<Vec<_>>()
        .into()
}

/// `query-chardev-backends`: the backends that have a driver, in the order qsd lists them
/// (its walk of a hash table of types).
pub fn qmp_query_chardev_backends() -> QObject {
    crate::opts::QUERY_ORDER
        .iter()
        .map(|&k| QObject::Dict(QDict::new().with("name", k)))
        .collect::<Vec<_>>()
        .into()
}

fn ring_dev<'a>(
    reg: &ChardevRegistry,
    args: &'a Args,
) -> Result<(std::rc::Rc<crate::Chardev>, &'a str)> {
    let id = args.str("device")?;
    let dev = reg
        .get(id)
        .ok_or_else(|| Error::DeviceNotFound(id.to_owned()))?;
    if !dev.with_backend(|b| b.ring().is_some()) {
        return Err(Error::NotRingbuf(id.to_owned()));
    }
    Ok((dev, id))
}

/// `ringbuf-write`.
///
/// # Errors
/// Unknown or non-ring device, invalid base64.
pub fn qmp_ringbuf_write(
    reg: &ChardevRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    let (dev, _) = ring_dev(reg, args)?;
    let data = args.str("data")?;
    let bytes = match args.opt_str("format") {
        Some("base64") => decode_base64(data)?,
        _ => data.as_bytes().to_vec(),
    };
    dev.with_backend(|b| b.ring().map(|r| r.write(&bytes)));
    Ok(QDict::new().into())
}

/// `ringbuf-read`: removes and returns up to `size` of the oldest bytes.
///
/// # Errors
/// Unknown or non-ring device, negative size.
pub fn qmp_ringbuf_read(
    reg: &ChardevRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    let (dev, _) = ring_dev(reg, args)?;
    let size = args.i64("size")?;
    let size = usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or(Error::ReadSize)?;
    let bytes = dev.with_backend(|b| b.ring().map(|r| r.read(size)).unwrap_or_default());
    Ok(match args.opt_str("format") {
        Some("base64") => QObject::from(STANDARD.encode(&bytes)),
        // QEMU hands the bytes over as a C string: text after a NUL byte is lost, and invalid
        // UTF-8 becomes U+FFFD.
        _ => {
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            QObject::from(lossy_from_bytes(&bytes[..end]))
        }
    })
}

/// Decodes base64 as QEMU's `qbase64_decode` accepts it.
fn decode_base64(data: &str) -> Result<Vec<u8>> {
    ferrite_qapi::base64::decode(data.as_bytes()).ok_or(Error::Base64)
}
