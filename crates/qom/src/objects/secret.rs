//! `secret`: a named secret value for the layers that need one (TLS, encrypted images).

use super::{UserObject, frozen};
use crate::error::{Error, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ferrite_qapi::Args;
use ferrite_qobject::QObject;
use std::any::Any;

/// A secret. The value is held decoded; the properties as given.
pub struct Secret {
    value: Vec<u8>,
    data: Option<String>,
    file: Option<String>,
    format: String,
}

impl Secret {
    pub(crate) fn create(options: &Args) -> Result<Secret> {
        let data = options.opt_str("data").map(str::to_owned);
        let file = options.opt_str("file").map(str::to_owned);
        let format = options.opt_str("format").unwrap_or("raw").to_owned();
        if options.has("keyid") || options.has("iv") {
            return Err(Error::EncryptedSecret);
        }
        let raw = match (&data, &file) {
            (Some(_), Some(_)) => {
                return Err(Error::SecretFileAndData);
            }
            (None, None) => return Err(Error::SecretNoData),
            (Some(d), None) => d.as_bytes().to_vec(),
            // The message is glib's (g_file_get_contents), curly quotes included.
            (None, Some(path)) => std::fs::read(path).map_err(|e| Error::SecretFile {
                path: path.to_owned(),
                error: e,
            })?,
        };
        let value = if format == "base64" {
            decode(&raw)?
        } else {
            raw
        };
        Ok(Secret {
            value,
            data,
            file,
            format,
        })
    }

    /// The secret's bytes.
    pub fn value(&self) -> &[u8] {
        &self.value
    }
}

fn decode(raw: &[u8]) -> Result<Vec<u8>> {
    let valid = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=');
    if !raw.iter().all(valid) {
        return Err(Error::Base64);
    }
    STANDARD.decode(raw).map_err(|_| Error::Base64)
}

impl UserObject for Secret {
    fn type_name(&self) -> &'static str {
        "secret"
    }

    fn get(&self, name: &str) -> Option<Result<QObject>> {
        let opt = |v: &Option<String>| QObject::from(v.clone().unwrap_or_default());
        Some(Ok(match name {
            "data" => opt(&self.data),
            "file" => opt(&self.file),
            "format" => QObject::from(self.format.as_str()),
            "keyid" | "iv" => QObject::from(""),
            _ => return None,
        }))
    }

    fn set(&self, name: &str, _value: &QObject) -> Option<Result<()>> {
        match name {
            "data" | "file" | "format" | "keyid" | "iv" => Some(Err(frozen())),
            _ => None,
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
