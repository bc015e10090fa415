//! `secret` and `secret_keyring`: named secret values for the layers that need one (TLS,
//! encrypted images), given inline, in a file or as a key of the kernel's keyrings; plain,
//! in base64, or encrypted with another secret (`keyid` and `iv`: AES-256-CBC, how libvirt
//! hands QEMU every secret).

use super::{UserObject, check_prop};
use crate::error::{Error, Result};
use ferrite_crypto::{AES_BLOCK, aes_cbc_decrypt};
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::any::Any;
use std::cell::RefCell;
use std::io;

/// The length of the key that decrypts an encrypted secret (AES-256).
const KEY_LEN: usize = 32;

/// Where a secret's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    /// `secret`: its `data`, or the contents of its `file`.
    Given {
        data: Option<String>,
        file: Option<String>,
    },
    /// `secret_keyring`: the key `serial` of the kernel's keyrings.
    Keyring { serial: i32 },
}

/// The properties, as given or as `qom-set` changed them since (QEMU lets them change; the
/// value stays the one they gave at creation).
#[derive(Debug)]
struct Props {
    source: Source,
    format: String,
    keyid: Option<String>,
    iv: Option<String>,
}

/// A secret. The value is held decoded and decrypted.
pub struct Secret {
    value: Vec<u8>,
    props: RefCell<Props>,
}

impl Secret {
    /// A `secret` or `secret_keyring` from its checked options, loaded as QEMU loads one:
    /// the bytes read, then decrypted with the secret `keyid` names (which `key` looks up)
    /// or else decoded when the format is base64.
    pub(crate) fn create(options: &Args, key: impl Fn(&str) -> Result<Vec<u8>>) -> Result<Secret> {
        let source = if options.str("qom-type")? == "secret_keyring" {
            Source::Keyring {
                serial: serial(options.i64("serial")?)?,
            }
        } else {
            Source::Given {
                data: options.opt_str("data").map(str::to_owned),
                file: options.opt_str("file").map(str::to_owned),
            }
        };
        let props = Props {
            source,
            format: options.opt_str("format").unwrap_or("raw").to_owned(),
            keyid: options.opt_str("keyid").map(str::to_owned),
            iv: options.opt_str("iv").map(str::to_owned),
        };
        let input = Input {
            bytes: props.load()?,
            measured: !matches!(props.source, Source::Given { data: Some(_), .. }),
        };
        let base64 = props.format == "base64";
        let value = match &props.keyid {
            // The object is not registered until it is loaded: naming itself finds it
            // without data, as in QEMU.
            Some(keyid) if keyid == options.str("id")? => {
                return Err(Error::SecretLookup(format!(
                    "Secret with id '{keyid}' has no data"
                )));
            }
            Some(keyid) => decrypt(&key(keyid)?, props.iv.as_deref(), &input, base64)?,
            None if base64 => decode_input(&input)?,
            None => input.bytes,
        };
        Ok(Secret {
            value,
            props: RefCell::new(props),
        })
    }

    /// The secret's bytes.
    pub fn value(&self) -> &[u8] {
        &self.value
    }

    /// The QAPI struct of the type's properties.
    fn props_type(&self) -> &'static str {
        match self.props.borrow().source {
            Source::Given { .. } => "SecretProperties",
            Source::Keyring { .. } => "SecretKeyringProperties",
        }
    }
}

impl Props {
    /// The bytes as stored, before decoding or decryption.
    fn load(&self) -> Result<Vec<u8>> {
        match &self.source {
            Source::Given {
                data: Some(_),
                file: Some(_),
            } => Err(Error::SecretFileAndData),
            Source::Given {
                data: None,
                file: None,
            } => Err(Error::SecretNoData),
            Source::Given { data: Some(d), .. } => Ok(d.as_bytes().to_vec()),
            // The message is glib's (g_file_get_contents), curly quotes included.
            Source::Given { file: Some(f), .. } => {
                std::fs::read(f).map_err(|error| Error::SecretFile {
                    path: f.clone(),
                    error,
                })
            }
            Source::Keyring { serial } => read_key(*serial).map_err(|e| Error::KeyringRead {
                serial: *serial,
                reason: match e {
                    KeyError::Os(e) => ferrite_qapi::os_msg(&e),
                    KeyError::Empty => "the key is empty".into(),
                },
            }),
        }
    }
}

/// The properties' values as QEMU checks them while it sets them, before the secret has
/// its id: a `secret_keyring`'s serial.
pub(crate) fn check_values(options: &Args) -> Result<()> {
    match options.opt_i64("serial") {
        Some(v) => serial(v).map(drop),
        None => Ok(()),
    }
}

/// A `serial` as QEMU's property takes it (the schema checked its range).
fn serial(value: i64) -> Result<i32> {
    match i32::try_from(value).unwrap_or(0) {
        0 => Err(Error::KeyringSerialZero),
        v => Ok(v),
    }
}

/// Why a key could not be read from the keyrings.
enum KeyError {
    Os(io::Error),
    /// A key without bytes: QEMU reports whatever `errno` last held.
    Empty,
}

/// The payload of the key `serial` (`keyctl read`).
fn read_key(serial: i32) -> std::result::Result<Vec<u8>, KeyError> {
    let read = |buf: &mut [u8]| -> std::result::Result<usize, KeyError> {
        let ptr = if buf.is_empty() {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr()
        };
        // SAFETY: KEYCTL_READ copies at most `buf.len()` bytes to `ptr`, which is null only
        // when that length is 0 (a query of the payload's length).
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_READ,
                libc::c_long::from(serial),
                ptr,
                buf.len(),
                0,
            )
        };
        usize::try_from(n).map_err(|_| KeyError::Os(io::Error::last_os_error()))
    };
    let len = read(&mut [])?;
    if len == 0 {
        return Err(KeyError::Empty);
    }
    let mut buf = vec![0u8; len];
    // The answer is the payload's whole length, which may have grown since: only what the
    // buffer holds was copied.
    let n = read(&mut buf)?.min(len);
    buf.truncate(n);
    Ok(buf)
}

/// `input` (base64 when `base64`) decrypted with AES-256-CBC under `key` and the base64
/// `iv`, its padding removed as QEMU removes it: the last byte says how many bytes to drop
/// (up to a block), and the others are not checked.
fn decrypt(key: &[u8], iv: Option<&str>, input: &Input, base64: bool) -> Result<Vec<u8>> {
    if key.len() != KEY_LEN {
        return Err(Error::SecretKeyLength);
    }
    let iv = decode(iv.ok_or(Error::SecretIvMissing)?.as_bytes())?;
    if iv.len() != AES_BLOCK {
        return Err(Error::SecretIvLength(iv.len()));
    }
    let mut data = if base64 {
        decode_input(input)?
    } else {
        input.bytes.clone()
    };
    if data.len() % AES_BLOCK != 0 {
        return Err(Error::CipherLength(data.len()));
    }
    // QEMU reads the padding byte before the start of an empty buffer here.
    if data.is_empty() || !aes_cbc_decrypt(key, &iv, &mut data) {
        return Err(Error::SecretCiphertextEmpty);
    }
    let pad = data[data.len() - 1];
    if usize::from(pad) > AES_BLOCK || usize::from(pad) > data.len() {
        return Err(Error::SecretPadding(pad));
    }
    data.truncate(data.len() - usize::from(pad));
    Ok(data)
}

fn decode(raw: &[u8]) -> Result<Vec<u8>> {
    ferrite_qapi::base64::decode(raw).ok_or(Error::Base64)
}

/// The secret's base64 input decoded. What a file or a key gave has a length of its own
/// and may hold NUL bytes, which QEMU looks for first; `data` is a string, read up to its
/// end, where the alphabet check refuses a NUL as any other character.
fn decode_input(input: &Input) -> Result<Vec<u8>> {
    if input.measured && input.bytes.contains(&0) {
        return Err(Error::Base64Nul);
    }
    decode(&input.bytes)
}

/// A secret's input as loaded.
struct Input {
    bytes: Vec<u8>,
    /// Read from a file or a key (not the `data` string).
    measured: bool,
}

impl UserObject for Secret {
    fn type_name(&self) -> &'static str {
        match self.props.borrow().source {
            Source::Given { .. } => "secret",
            Source::Keyring { .. } => "secret_keyring",
        }
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        let text = |v: &Option<String>| QObject::from(v.clone().unwrap_or_default());
        let props = self.props.borrow();
        Some(Ok(match (name, &props.source) {
            ("format", _) => QObject::from(props.format.as_str()),
            ("keyid", _) => text(&props.keyid),
            ("iv", _) => text(&props.iv),
            ("data", Source::Given { data, .. }) => text(data),
            ("file", Source::Given { file, .. }) => text(file),
            ("serial", Source::Keyring { serial }) => QObject::Int(i64::from(*serial)),
            _ => return None,
        }))
    }

    fn set(&self, name: &str, value: &QObject) -> Option<Result<()>> {
        let text = || value.as_str().map(str::to_owned);
        // The same properties as `get` has.
        let known = self.get(name).is_some();
        if !known {
            return None;
        }
        Some(check_prop(self.props_type(), name, value).and_then(|_| {
            let mut props = self.props.borrow_mut();
            match (name, &mut props.source) {
                ("format", _) => props.format = text().unwrap_or_default(),
                ("keyid", _) => props.keyid = text(),
                ("iv", _) => props.iv = text(),
                ("data", Source::Given { data, .. }) => *data = text(),
                ("file", Source::Given { file, .. }) => *file = text(),
                ("serial", Source::Keyring { serial: s }) => {
                    let refused = serial(value.as_i64().unwrap_or(0));
                    // As QEMU: a refused 0 is kept all the same.
                    *s = *refused.as_ref().unwrap_or(&0);
                    refused?;
                }
                _ => {}
            }
            Ok(())
        }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
