//! Changing a volume's key slots (`x-blockdev-amend`; QEMU: the amend half of
//! `crypto/block-luks.c`): a password put in a slot (the master key found with the
//! password the volume is open with), or slots erased by number or by the password they
//! hold, with QEMU's checks in QEMU's order. Works on the header area as read and returns
//! the writes that make the change; the caller does the I/O.

use crate::Error;
use crate::luks::{Header, SLOTS};

/// A secret as the request names it: the looked-up password, or why the lookup failed
/// (said only where QEMU looks it up).
pub type Secret = Result<Vec<u8>, String>;

/// What `x-blockdev-amend` asks (QEMU's `QCryptoBlockAmendOptionsLUKS`).
#[derive(Debug)]
pub struct SlotChange {
    /// `state`: `active` puts a password in a slot, `inactive` erases slots.
    pub activate: bool,
    /// `keyslot`.
    pub keyslot: Option<i64>,
    /// `iter-time` (milliseconds of PBKDF2 for a new slot).
    pub iter_time: Option<u64>,
    /// `new-secret`.
    pub new_secret: Option<Secret>,
    /// `old-secret`.
    pub old_secret: Option<Secret>,
    /// Whether `secret` was given (the password that finds the master key for `active`).
    pub secret_given: bool,
    /// That password: `secret` if given, else the one the volume was opened with.
    pub unlock: Secret,
}

impl SlotChange {
    /// The change `QCryptoBlockAmendOptionsLUKS` describes: its members from `text` and
    /// `number`, its secrets from `lookup`; `opened_with`: the `key-secret` the volume is
    /// open with (what unlocks it when `secret` is not given).
    pub fn from_options(
        text: impl Fn(&str) -> Option<String>,
        number: impl Fn(&str) -> Option<i64>,
        lookup: impl Fn(&str) -> Secret,
        opened_with: Option<&str>,
    ) -> SlotChange {
        let secret_id = text("secret");
        let unlock = match secret_id.as_deref().or(opened_with) {
            Some(id) => lookup(id),
            None => Err("Parameter 'key-secret' is required for cipher".to_owned()),
        };
        SlotChange {
            activate: text("state").as_deref() == Some("active"),
            keyslot: number("keyslot"),
            iter_time: number("iter-time").and_then(|n| u64::try_from(n).ok()),
            new_secret: text("new-secret").map(|id| lookup(&id)),
            old_secret: text("old-secret").map(|id| lookup(&id)),
            secret_given: secret_id.is_some(),
            unlock,
        }
    }
}

/// Bytes to write at offsets from the start of the header area, in order.
pub type Writes = Vec<(u64, Vec<u8>)>;

const DEFAULT_ITER_TIME: u64 = 2000;

fn refuse(text: impl Into<String>) -> Error {
    Error::Refused(text.into())
}

fn secret(s: &Secret) -> Result<&[u8], Error> {
    s.as_deref().map_err(|e| refuse(e.clone()))
}

/// The writes that make `change` on the volume whose header area is `area`. Deriving keys
/// takes as long as the slots' iteration counts say: call it off the main thread.
///
/// # Errors
/// QEMU's refusals, a password that opens no slot.
pub fn amend_key_slots(area: &[u8], change: &SlotChange, force: bool) -> Result<Writes, Error> {
    let header = Header::parse(area)?;
    if change.activate {
        add_key_slot(&header, area, change, force)
    } else {
        erase_key_slots(&header, area, change, force)
    }
}

fn slot_index(keyslot: i64) -> Result<usize, Error> {
    usize::try_from(keyslot)
        .ok()
        .filter(|&s| s < SLOTS)
        .ok_or_else(|| {
            refuse(format!(
                "Invalid keyslot {keyslot} specified, must be between 0 and {}",
                SLOTS - 1
            ))
        })
}

fn add_key_slot(
    header: &Header,
    area: &[u8],
    change: &SlotChange,
    force: bool,
) -> Result<Writes, Error> {
    let Some(new_secret) = &change.new_secret else {
        return Err(refuse("'new-secret' is required to activate a keyslot"));
    };
    if change.old_secret.is_some() {
        return Err(refuse(
            "'old-secret' must not be given when activating keyslots",
        ));
    }
    let slot = match change.keyslot {
        Some(k) => slot_index(k)?,
        None => header
            .slots
            .iter()
            .position(|s| !s.active)
            .ok_or_else(|| refuse("Can't add a keyslot - all keyslots are in use"))?,
    };
    if !force && header.slots[slot].active {
        return Err(refuse(format!(
            "Refusing to overwrite active keyslot {slot} - please erase it first"
        )));
    }
    let master = header.master_key(area, secret(&change.unlock)?)?;
    let password = secret(new_secret)?;
    header.store_key(
        area,
        slot,
        password,
        &master,
        change.iter_time.unwrap_or(DEFAULT_ITER_TIME),
    )
}

fn erase_key_slots(
    header: &Header,
    area: &[u8],
    change: &SlotChange,
    force: bool,
) -> Result<Writes, Error> {
    if change.new_secret.is_some() {
        return Err(refuse(
            "'new-secret' must not be given when erasing keyslots",
        ));
    }
    if change.iter_time.is_some() {
        return Err(refuse(
            "'iter-time' must not be given when erasing keyslots",
        ));
    }
    if change.secret_given {
        return Err(refuse("'secret' must not be given when erasing keyslots"));
    }
    let old = change.old_secret.as_ref().map(secret).transpose()?;
    let active = header.slots.iter().filter(|s| s.active).count();
    let slots = match (change.keyslot, old) {
        (Some(k), old) => {
            let slot = slot_index(k)?;
            if let Some(password) = old
                && !header.slot_opens(area, slot, password)
            {
                return Err(refuse(format!(
                    "Given keyslot {slot} doesn't contain the given old password for erase \
                     operation"
                )));
            }
            if !force && !header.slots[slot].active {
                return Err(refuse(format!(
                    "Given keyslot {slot} is already erased (inactive) "
                )));
            }
            if !force && active == 1 {
                return Err(refuse(format!(
                    "Attempt to erase the only active keyslot {slot} which will erase all the \
                     data in the image irreversibly - refusing operation"
                )));
            }
            vec![slot]
        }
        (None, Some(password)) => {
            let matching: Vec<usize> = (0..SLOTS)
                .filter(|&i| header.slot_opens(area, i, password))
                .collect();
            if matching.is_empty() {
                return Err(refuse(
                    "No keyslots match given (old) password for erase operation",
                ));
            }
            if !force && matching.len() == active {
                return Err(refuse(
                    "All the active keyslots match the (old) password that was given and \
                     erasing them will erase all the data in the image irreversibly - refusing \
                     operation",
                ));
            }
            matching
        }
        (None, None) => {
            return Err(refuse(
                "To erase keyslot(s), either explicit keyslot index or the password currently \
                 contained in them must be given",
            ));
        }
    };
    let mut writes = Writes::new();
    let mut head = area[..crate::HEADER_LEN].to_vec();
    for slot in slots {
        // The slot is marked unused first, then its key material overwritten with noise.
        header.clear_slot(&mut head, slot);
        writes.push((0, head.clone()));
        let s = &header.slots[slot];
        let len = header.key_bytes * s.stripes as usize;
        writes.push((s.key_offset, crate::luks::random(len)?));
    }
    Ok(writes)
}
