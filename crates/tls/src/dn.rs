//! A distinguished name as GnuTLS writes it for QEMU (`gnutls_x509_crt_get_dn`): the relative
//! names in the certificate's order (not RFC 4514's reversed one), `,` between them, `+`
//! inside one, attributes by their short names (others by OID with the value's DER in hex),
//! special characters escaped as RFC 4514 does. Authorization lists match these strings, so
//! they must be GnuTLS's to the byte: `C=GB,O=Example,CN=laptop`.

use x509_parser::der_parser::asn1_rs::ToDer;
use x509_parser::prelude::*;

/// GnuTLS's short name of an attribute type.
fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.17" => "postalCode",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

/// RFC 4514's escaping of a value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attribute(atv: &AttributeTypeAndValue<'_>) -> String {
    let oid = atv.attr_type().to_id_string();
    match (short_name(&oid), atv.as_str()) {
        (Some(name), Ok(value)) => format!("{name}={}", escape(value)),
        (name, _) => {
            let der = atv.attr_value().to_der_vec().unwrap_or_default();
            format!("{}=#{}", name.unwrap_or(&oid), hex(&der))
        }
    }
}

/// `name` as GnuTLS writes it.
pub(crate) fn format(name: &X509Name<'_>) -> String {
    name.iter()
        .map(|rdn| rdn.iter().map(attribute).collect::<Vec<_>>().join("+"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_as_rfc_4514() {
        assert_eq!(escape("R'lyeh"), "R'lyeh");
        assert_eq!(escape("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape("#x "), "\\#x\\ ");
    }
}
