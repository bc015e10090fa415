//! GnuTLS priority strings: the `priority` of QEMU's TLS credentials (`NORMAL`,
//! `SECURE256:+SECURE128:-VERS-TLS1.0`, `@SYSTEM`, ...), read as GnuTLS 3.7 reads them.
//!
//! QEMU accepts any string when the object is made and hands it to GnuTLS when a session
//! starts; a string GnuTLS refuses fails that session with GnuTLS's words. So ferrite parses
//! the string at the same moment, with the same verdicts: a syntax error ("The request is
//! invalid."), or a string that leaves no protocol or no cipher suite ("No or insufficient
//! priorities were set."). What it allows then narrows what ferrite's TLS offers and accepts
//! (`Priority::allows`). The algorithm lists of the keywords, the names GnuTLS knows and the
//! consistency rules were learnt from `gnutls-cli --priority ... --list`, which the tests
//! compare against.

use std::fmt;

/// The priority of sessions whose credentials name none: QEMU's build default
/// (`CONFIG_TLS_PRIORITY`).
pub(crate) const DEFAULT: &str = "NORMAL";

/// Why GnuTLS refuses a priority string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PriorityError {
    /// `GNUTLS_E_INVALID_REQUEST`: a syntax error or an unknown name.
    Invalid,
    /// `GNUTLS_E_NO_PRIORITIES_WERE_SET`: nothing is left to negotiate.
    Insufficient,
}

impl fmt::Display for PriorityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PriorityError::Invalid => "The request is invalid.",
            PriorityError::Insufficient => "No or insufficient priorities were set.",
        })
    }
}

/// The kinds of algorithm a priority string lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Protocol versions (`VERS-TLS1.3`), named without the prefix.
    Version,
    /// Bulk ciphers (`AES-128-GCM`).
    Cipher,
    /// Record MACs (`SHA1`, `AEAD`).
    Mac,
    /// Key exchanges of TLS 1.2 and before (`ECDHE-RSA`).
    Kx,
    /// Groups (`GROUP-X25519`), named without the prefix.
    Group,
    /// Signature algorithms (`SIGN-RSA-SHA256`), named without the prefix.
    Sign,
}

const KINDS: usize = 6;

/// What a priority string allows, each list in its order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priority {
    lists: [Vec<&'static str>; KINDS],
    /// The string starts with `SUITEB192`, whose profile refuses P-256 signatures.
    suite_b_192: bool,
    /// How strong the peer's certificates must be.
    profile: Profile,
}

const VERSIONS: &[&str] = &[
    "TLS1.0", "TLS1.1", "TLS1.2", "TLS1.3", "DTLS0.9", "DTLS1.0", "DTLS1.2",
];
const ALL_VERSIONS: &[&str] = &["TLS1.3", "TLS1.2", "TLS1.1", "TLS1.0", "DTLS1.2", "DTLS1.0"];
const TLS_VERSIONS: &[&str] = &["TLS1.3", "TLS1.2", "TLS1.1", "TLS1.0"];
const DTLS_VERSIONS: &[&str] = &["DTLS1.2", "DTLS1.0"];
const ALL_DTLS_VERSIONS: &[&str] = &["DTLS1.2", "DTLS1.0", "DTLS0.9"];

const CIPHERS: &[&str] = &[
    "AES-256-CBC",
    "AES-192-CBC",
    "AES-128-CBC",
    "AES-128-GCM",
    "AES-192-GCM",
    "AES-256-GCM",
    "AES-128-CCM",
    "AES-256-CCM",
    "AES-128-CCM-8",
    "AES-256-CCM-8",
    "ARCFOUR-128",
    "ESTREAM-SALSA20-256",
    "SALSA20-256",
    "CHACHA20-32",
    "CHACHA20-64",
    "CAMELLIA-256-CBC",
    "CAMELLIA-192-CBC",
    "CAMELLIA-128-CBC",
    "CHACHA20-POLY1305",
    "CAMELLIA-128-GCM",
    "CAMELLIA-256-GCM",
    "GOST28147-TC26Z-CFB",
    "GOST28147-CPA-CFB",
    "GOST28147-CPB-CFB",
    "GOST28147-CPC-CFB",
    "GOST28147-CPD-CFB",
    "AES-128-CFB8",
    "AES-192-CFB8",
    "AES-256-CFB8",
    "AES-128-XTS",
    "AES-256-XTS",
    "AES-128-SIV",
    "AES-256-SIV",
    "GOST28147-TC26Z-CNT",
    "MAGMA-CTR-ACPKM",
    "KUZNYECHIK-CTR-ACPKM",
    "3DES-CBC",
    "DES-CBC",
    "RC2-40",
    "NULL",
];

const MACS: &[&str] = &[
    "SHA1",
    "SHA256",
    "SHA384",
    "SHA512",
    "SHA224",
    "UMAC-96",
    "UMAC-128",
    "AEAD",
    "MD5",
    "GOSTR341194",
    "STREEBOG-256",
    "STREEBOG-512",
    "AES-CMAC-128",
    "AES-CMAC-256",
    "AES-GMAC-128",
    "AES-GMAC-192",
    "AES-GMAC-256",
    "GOST28147-TC26Z-IMIT",
    "OMAC-MAGMA",
    "OMAC-KUZNYECHIK",
];

const KXS: &[&str] = &[
    "ECDHE-RSA",
    "ECDHE-ECDSA",
    "RSA",
    "DHE-RSA",
    "DHE-DSS",
    "PSK",
    "RSA-PSK",
    "DHE-PSK",
    "ECDHE-PSK",
    "SRP-DSS",
    "SRP-RSA",
    "SRP",
    "ANON-DH",
    "ANON-ECDH",
    "VKO-GOST-12",
];

/// Key exchanges with which GnuTLS leaves TLS 1.3 out.
const KX_WITHOUT_TLS13: &[&str] = &["SRP", "SRP-RSA", "SRP-DSS", "RSA-PSK"];

/// Every group GnuTLS knows: the GOST curves, the seven curves of the `EC` family, the
/// finite fields; the last ten are `NORMAL`'s.
const ALL_GROUPS: &[&str] = &[
    "GC256A",
    "GC256B",
    "GC256C",
    "GC256D",
    "GC512A",
    "GC512B",
    "GC512C",
    "SECP192R1",
    "SECP224R1",
    "SECP256R1",
    "SECP384R1",
    "SECP521R1",
    "X25519",
    "X448",
    "FFDHE2048",
    "FFDHE3072",
    "FFDHE4096",
    "FFDHE6144",
    "FFDHE8192",
];
const GOST_GROUPS: &[&str] = ALL_GROUPS.split_at(7).0;
const EC_GROUPS: &[&str] = ALL_GROUPS.split_at(14).0;
const EC_FAMILY: &[&str] = EC_GROUPS.split_at(7).1;
const DH_GROUPS: &[&str] = ALL_GROUPS.split_at(14).1;
const NORMAL_GROUPS: &[&str] = ALL_GROUPS.split_at(9).1;
const NORMAL_EC_GROUPS: &[&str] = EC_GROUPS.split_at(9).1;

/// Every signature algorithm GnuTLS knows: first those TLS has code points for, then the
/// 23 it has none for (listing only these is listing none).
const SIGNS: &[&str] = &[
    "RSA-SHA256",
    "RSA-SHA384",
    "RSA-SHA512",
    "RSA-PSS-SHA256",
    "RSA-PSS-RSAE-SHA256",
    "RSA-PSS-SHA384",
    "RSA-PSS-RSAE-SHA384",
    "RSA-PSS-SHA512",
    "RSA-PSS-RSAE-SHA512",
    "EDDSA-ED25519",
    "EDDSA-ED448",
    "ECDSA-SHA256",
    "ECDSA-SHA384",
    "ECDSA-SHA512",
    "ECDSA-SECP256R1-SHA256",
    "ECDSA-SECP384R1-SHA384",
    "ECDSA-SECP521R1-SHA512",
    "RSA-SHA1",
    "DSA-SHA1",
    "ECDSA-SHA1",
    "GOSTR341012-512",
    "GOSTR341012-256",
    "RSA-RAW",
    "RSA-MD5",
    "RSA-MD2",
    "RSA-RMD160",
    "RSA-SHA224",
    "DSA-SHA224",
    "ECDSA-SHA224",
    "GOSTR341001",
    "ECDSA-SHA3-224",
    "ECDSA-SHA3-256",
    "ECDSA-SHA3-384",
    "ECDSA-SHA3-512",
    "RSA-SHA3-224",
    "RSA-SHA3-256",
    "RSA-SHA3-384",
    "RSA-SHA3-512",
    "DSA-SHA3-224",
    "DSA-SHA3-256",
    "DSA-SHA3-384",
    "DSA-SHA3-512",
    "DSA-SHA256",
    "DSA-SHA384",
    "DSA-SHA512",
];
const NOT_IN_TLS: &[&str] = SIGNS.split_at(22).1;

/// The signature algorithms of `SECURE128`, then of `SECURE256` (its last 11).
const SECURE_SIGNS: &[&str] = NORMAL_SIGNS.split_at(17).0;
const HIGH_SIGNS: &[&str] = SECURE_SIGNS.split_at(6).1;
/// The signature algorithms of `NORMAL`: those of `SECURE128`, then SHA-1's.
const NORMAL_SIGNS: [&str; 19] = [
    "RSA-SHA256",
    "RSA-PSS-SHA256",
    "RSA-PSS-RSAE-SHA256",
    "ECDSA-SHA256",
    "ECDSA-SECP256R1-SHA256",
    "EDDSA-ED25519",
    "RSA-SHA384",
    "RSA-PSS-SHA384",
    "RSA-PSS-RSAE-SHA384",
    "ECDSA-SHA384",
    "ECDSA-SECP384R1-SHA384",
    "EDDSA-ED448",
    "RSA-SHA512",
    "RSA-PSS-SHA512",
    "RSA-PSS-RSAE-SHA512",
    "ECDSA-SHA512",
    "ECDSA-SECP521R1-SHA512",
    "RSA-SHA1",
    "ECDSA-SHA1",
];

const NORMAL_CIPHERS: &[&str] = &[
    "AES-256-GCM",
    "CHACHA20-POLY1305",
    "AES-256-CCM",
    "AES-256-CBC",
    "AES-128-GCM",
    "AES-128-CCM",
    "AES-128-CBC",
];
const NORMAL_MACS: &[&str] = &["SHA1", "AEAD"];
const NORMAL_KX: &[&str] = &["ECDHE-ECDSA", "ECDHE-RSA", "RSA", "DHE-RSA"];

/// A keyword's lists: versions, ciphers, MACs, key exchanges, groups, signatures.
struct Level {
    names: &'static [&'static str],
    /// The certificate verification profile it sets.
    profile: Profile,
    lists: [&'static [&'static str]; KINDS],
}

const LEVELS: &[Level] = &[
    Level {
        names: &["NORMAL", "LEGACY"],
        profile: Profile::Low,
        lists: [
            ALL_VERSIONS,
            NORMAL_CIPHERS,
            NORMAL_MACS,
            NORMAL_KX,
            NORMAL_GROUPS,
            &NORMAL_SIGNS,
        ],
    },
    Level {
        names: &["PFS"],
        profile: Profile::Low,
        lists: [
            ALL_VERSIONS,
            NORMAL_CIPHERS,
            NORMAL_MACS,
            &["ECDHE-ECDSA", "ECDHE-RSA", "DHE-RSA"],
            NORMAL_GROUPS,
            &NORMAL_SIGNS,
        ],
    },
    Level {
        names: &["PERFORMANCE"],
        profile: Profile::Low,
        lists: [
            ALL_VERSIONS,
            &[
                "AES-128-GCM",
                "AES-256-GCM",
                "CHACHA20-POLY1305",
                "AES-128-CCM",
                "AES-256-CCM",
                "AES-128-CBC",
                "AES-256-CBC",
            ],
            NORMAL_MACS,
            &["RSA", "ECDHE-ECDSA", "ECDHE-RSA", "DHE-RSA"],
            NORMAL_GROUPS,
            &NORMAL_SIGNS,
        ],
    },
    Level {
        names: &["SECURE128", "SECURE"],
        profile: Profile::Low,
        lists: [
            ALL_VERSIONS,
            &[
                "AES-256-GCM",
                "CHACHA20-POLY1305",
                "AES-256-CBC",
                "AES-256-CCM",
                "AES-128-GCM",
                "AES-128-CBC",
                "AES-128-CCM",
            ],
            NORMAL_MACS,
            NORMAL_KX,
            NORMAL_GROUPS,
            SECURE_SIGNS,
        ],
    },
    Level {
        names: &["SECURE192", "SECURE256"],
        profile: Profile::High,
        lists: [
            ALL_VERSIONS,
            &[
                "AES-256-GCM",
                "CHACHA20-POLY1305",
                "AES-256-CBC",
                "AES-256-CCM",
            ],
            &["AEAD"],
            NORMAL_KX,
            &["SECP384R1", "SECP521R1", "FFDHE8192"],
            HIGH_SIGNS,
        ],
    },
    Level {
        names: &["SUITEB128"],
        profile: Profile::SuiteB128,
        lists: [
            &["TLS1.2"],
            &["AES-256-GCM", "AES-128-GCM"],
            &["AEAD"],
            &["ECDHE-ECDSA"],
            &["SECP256R1", "SECP384R1"],
            &[
                "ECDSA-SHA256",
                "ECDSA-SECP256R1-SHA256",
                "ECDSA-SHA384",
                "ECDSA-SECP384R1-SHA384",
            ],
        ],
    },
    Level {
        names: &["SUITEB192"],
        profile: Profile::SuiteB192,
        lists: [
            &["TLS1.2"],
            &["AES-256-GCM"],
            &["AEAD"],
            &["ECDHE-ECDSA"],
            &["SECP384R1"],
            &["ECDSA-SHA384", "ECDSA-SECP384R1-SHA384"],
        ],
    },
    Level {
        names: &["NONE"],
        profile: Profile::Low,
        lists: [&[], &[], &[], &[], &[], &[]],
    },
];

/// GnuTLS's certificate verification profiles: how strong the keys of a peer's chain must
/// be (QEMU's "The certificate uses an insecure algorithm" when one is not). Set by the
/// first keyword or a `%PROFILE_...` flag; a later keyword lowers it to its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `%PROFILE_VERY_WEAK`.
    VeryWeak,
    /// `%PROFILE_LOW` (80 bits), `NORMAL`'s and `SECURE128`'s.
    Low,
    /// `%PROFILE_LEGACY` (96 bits).
    Legacy,
    /// `%PROFILE_MEDIUM` (112 bits).
    Medium,
    /// `%PROFILE_HIGH` (128 bits), `SECURE192`'s and `SECURE256`'s.
    High,
    /// `%PROFILE_ULTRA` (192 bits).
    Ultra,
    /// `%PROFILE_FUTURE` (256 bits).
    Future,
    /// Suite B at 128 bits: keys on P-256 or P-384 only.
    SuiteB128,
    /// Suite B at 192 bits: keys on P-384 only.
    SuiteB192,
}

/// A certificate's public key, as a profile judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublicKey {
    /// RSA or DSA, by modulus bits.
    FiniteField(u32),
    /// An elliptic curve (EdDSA's too), by its size in bits.
    Curve(u32),
    /// A kind GnuTLS's profiles do not weigh here.
    Other,
}

const PROFILES: &[(&str, Profile)] = &[
    ("PROFILE_VERY_WEAK", Profile::VeryWeak),
    ("PROFILE_LOW", Profile::Low),
    ("PROFILE_LEGACY", Profile::Legacy),
    ("PROFILE_MEDIUM", Profile::Medium),
    ("PROFILE_HIGH", Profile::High),
    ("PROFILE_ULTRA", Profile::Ultra),
    ("PROFILE_FUTURE", Profile::Future),
    ("PROFILE_SUITEB128", Profile::SuiteB128),
    ("PROFILE_SUITEB192", Profile::SuiteB192),
];

impl Profile {
    /// How much security it asks for (Suite B's as much as the level of its bits).
    fn strength(self) -> u8 {
        match self {
            Profile::VeryWeak => 1,
            Profile::Low => 2,
            Profile::Legacy => 3,
            Profile::Medium => 4,
            Profile::High | Profile::SuiteB128 => 5,
            Profile::Ultra | Profile::SuiteB192 => 6,
            Profile::Future => 7,
        }
    }

    /// Whether a certificate with `key` is strong enough (GnuTLS's sizes for each level:
    /// RSA 1008, 1776, 2048, 3072, 7680 and 15360 bits; curves 160 to 512).
    pub(crate) fn accepts(self, key: PublicKey) -> bool {
        let (finite_field, curve) = match self {
            Profile::VeryWeak => (767, 128),
            Profile::Low => (1008, 160),
            Profile::Legacy => (1776, 192),
            Profile::Medium => (2048, 224),
            Profile::High => (3072, 256),
            Profile::Ultra => (7680, 384),
            Profile::Future => (15360, 512),
            Profile::SuiteB128 => return matches!(key, PublicKey::Curve(256 | 384)),
            Profile::SuiteB192 => return matches!(key, PublicKey::Curve(384)),
        };
        match key {
            PublicKey::FiniteField(bits) => bits >= finite_field,
            PublicKey::Curve(bits) => bits >= curve,
            PublicKey::Other => true,
        }
    }
}

/// The `%` flags GnuTLS knows besides the profiles (they change nothing ferrite
/// negotiates).
const FLAGS: &[&str] = &[
    "COMPAT",
    "DUMBFW",
    "NO_EXTENSIONS",
    "NO_TICKETS",
    "NO_TICKETS_TLS12",
    "NO_SESSION_HASH",
    "FORCE_SESSION_HASH",
    "NO_ETM",
    "FORCE_ETM",
    "STATELESS_COMPRESSION",
    "SERVER_PRECEDENCE",
    "SSL3_RECORD_VERSION",
    "LATEST_RECORD_VERSION",
    "NEW_PADDING",
    "DISABLE_SAFE_RENEGOTIATION",
    "UNSAFE_RENEGOTIATION",
    "PARTIAL_RENEGOTIATION",
    "SAFE_RENEGOTIATION",
    "DISABLE_WILDCARDS",
    "NO_STATUS_REQUEST",
    "ALLOW_SMALL_RECORDS",
    "FALLBACK_SCSV",
    "NO_SHUFFLE_EXTENSIONS",
    "VERIFY_ALLOW_SIGN_RSA_MD5",
    "VERIFY_ALLOW_X509_V1_CA_CRT",
    "VERIFY_DISABLE_CRL_CHECKS",
    "VERIFY_ALLOW_SIGN_WITH_SHA1",
    "VERIFY_ALLOW_BROKEN",
];

/// The cipher suites of TLS 1.2 and before that GnuTLS has: by key exchange, the cipher and
/// MAC of each (`CIPHER/MAC`, as `gnutls-cli --list` names them).
const SUITES: &[(&[&str], &str)] = &[
    (
        &["ECDHE-RSA"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA384 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA384 \
         CAMELLIA-128-CBC/SHA256 CHACHA20-POLY1305/AEAD CAMELLIA-128-GCM/AEAD \
         CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1 NULL/SHA1",
    ),
    (
        &["ECDHE-ECDSA"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA384 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD AES-128-CCM/AEAD AES-256-CCM/AEAD \
         AES-128-CCM-8/AEAD AES-256-CCM-8/AEAD ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA384 \
         CAMELLIA-128-CBC/SHA256 CHACHA20-POLY1305/AEAD CAMELLIA-128-GCM/AEAD \
         CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1 NULL/SHA1",
    ),
    (
        &["RSA"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA256 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD AES-128-CCM/AEAD AES-256-CCM/AEAD \
         AES-128-CCM-8/AEAD AES-256-CCM-8/AEAD ARCFOUR-128/SHA1 ARCFOUR-128/MD5 \
         CAMELLIA-256-CBC/SHA1 CAMELLIA-256-CBC/SHA256 CAMELLIA-128-CBC/SHA1 \
         CAMELLIA-128-CBC/SHA256 CAMELLIA-128-GCM/AEAD CAMELLIA-256-GCM/AEAD \
         3DES-CBC/SHA1 NULL/SHA1 NULL/SHA256 NULL/MD5",
    ),
    (
        &["DHE-RSA"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA256 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD AES-128-CCM/AEAD AES-256-CCM/AEAD \
         AES-128-CCM-8/AEAD AES-256-CCM-8/AEAD CAMELLIA-256-CBC/SHA1 \
         CAMELLIA-256-CBC/SHA256 CAMELLIA-128-CBC/SHA1 CAMELLIA-128-CBC/SHA256 \
         CHACHA20-POLY1305/AEAD CAMELLIA-128-GCM/AEAD CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1",
    ),
    (
        &["DHE-DSS"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA256 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA1 \
         CAMELLIA-256-CBC/SHA256 CAMELLIA-128-CBC/SHA1 CAMELLIA-128-CBC/SHA256 \
         CAMELLIA-128-GCM/AEAD CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1",
    ),
    (
        &["PSK", "DHE-PSK"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA384 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD AES-128-CCM/AEAD AES-256-CCM/AEAD \
         AES-128-CCM-8/AEAD AES-256-CCM-8/AEAD ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA384 \
         CAMELLIA-128-CBC/SHA256 CHACHA20-POLY1305/AEAD CAMELLIA-128-GCM/AEAD \
         CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1 NULL/SHA1 NULL/SHA256 NULL/SHA384",
    ),
    (
        &["RSA-PSK"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA384 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA384 \
         CAMELLIA-128-CBC/SHA256 CHACHA20-POLY1305/AEAD CAMELLIA-128-GCM/AEAD \
         CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1 NULL/SHA1 NULL/SHA256 NULL/SHA384",
    ),
    (
        &["ECDHE-PSK"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA384 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         ARCFOUR-128/SHA1 CAMELLIA-256-CBC/SHA384 CAMELLIA-128-CBC/SHA256 \
         CHACHA20-POLY1305/AEAD 3DES-CBC/SHA1 NULL/SHA1 NULL/SHA256 NULL/SHA384",
    ),
    (
        &["SRP-DSS", "SRP-RSA", "SRP"],
        "AES-256-CBC/SHA1 AES-128-CBC/SHA1 3DES-CBC/SHA1",
    ),
    (
        &["ANON-DH"],
        "AES-256-CBC/SHA1 AES-256-CBC/SHA256 AES-128-CBC/SHA1 AES-128-CBC/SHA256 \
         AES-128-GCM/AEAD AES-256-GCM/AEAD ARCFOUR-128/MD5 CAMELLIA-256-CBC/SHA1 \
         CAMELLIA-256-CBC/SHA256 CAMELLIA-128-CBC/SHA1 CAMELLIA-128-CBC/SHA256 \
         CAMELLIA-128-GCM/AEAD CAMELLIA-256-GCM/AEAD 3DES-CBC/SHA1",
    ),
    (
        &["ANON-ECDH"],
        "AES-256-CBC/SHA1 AES-128-CBC/SHA1 ARCFOUR-128/SHA1 3DES-CBC/SHA1 NULL/SHA1",
    ),
    (&["VKO-GOST-12"], "GOST28147-TC26Z-CNT/GOST28147-TC26Z-IMIT"),
];

/// The ciphers TLS 1.3 has suites for.
const TLS13_CIPHERS: &[&str] = &[
    "AES-256-GCM",
    "CHACHA20-POLY1305",
    "AES-128-GCM",
    "AES-128-CCM",
    "AES-128-CCM-8",
];

/// What one element of the string does.
enum Step {
    /// Names of a kind: the ones a `+` adds, and the ones a `-` removes (for the `...-ALL`
    /// names, every one GnuTLS knows of the kind or family, not only those a `+` adds).
    Names(Kind, &'static [&'static str], &'static [&'static str]),
    /// One name of a kind.
    Name(Kind, &'static str),
    /// Adds a keyword's algorithms (all but its versions).
    Level(&'static Level),
    /// Known to GnuTLS, changes nothing ferrite negotiates.
    Nothing,
}

/// The entry of `table` spelt `name` (any case).
fn known(table: &[&'static str], name: &str) -> Option<&'static str> {
    table.iter().copied().find(|t| t.eq_ignore_ascii_case(name))
}

fn level(name: &str) -> Option<&'static Level> {
    LEVELS
        .iter()
        .find(|l| l.names.iter().any(|n| n.eq_ignore_ascii_case(name)))
}

/// `name` with `prefix` (any case) taken off.
fn strip<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let head = name.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &name[prefix.len()..])
}

/// What the name after a `+`, `-` or `!` means.
fn modifier(name: &str) -> Option<Step> {
    let one = |kind, table, n| known(table, n).map(|x| Step::Name(kind, x));
    if let Some(v) = strip(name, "VERS-") {
        return match v.to_ascii_uppercase().as_str() {
            "ALL" => Some(Step::Names(Kind::Version, ALL_VERSIONS, VERSIONS)),
            "TLS-ALL" => Some(Step::Names(Kind::Version, TLS_VERSIONS, TLS_VERSIONS)),
            "DTLS-ALL" => Some(Step::Names(Kind::Version, DTLS_VERSIONS, ALL_DTLS_VERSIONS)),
            "SSL3.0" => Some(Step::Nothing),
            _ => one(Kind::Version, VERSIONS, v),
        };
    }
    if strip(name, "COMP-").is_some() {
        return Some(Step::Nothing);
    }
    if let Some(c) = strip(name, "CTYPE-") {
        let c = strip(c, "CLI-").or_else(|| strip(c, "SRV-")).unwrap_or(c);
        return ["ALL", "X509", "X.509", "OPENPGP", "RAWPK"]
            .iter()
            .any(|t| t.eq_ignore_ascii_case(c))
            .then_some(Step::Nothing);
    }
    if let Some(g) = strip(name, "GROUP-") {
        return match g.to_ascii_uppercase().as_str() {
            "ALL" => Some(Step::Names(Kind::Group, NORMAL_GROUPS, ALL_GROUPS)),
            "EC-ALL" => Some(Step::Names(Kind::Group, NORMAL_EC_GROUPS, EC_FAMILY)),
            "DH-ALL" => Some(Step::Names(Kind::Group, DH_GROUPS, DH_GROUPS)),
            "GOST-ALL" => Some(Step::Names(Kind::Group, GOST_GROUPS, GOST_GROUPS)),
            _ => one(Kind::Group, ALL_GROUPS, g),
        };
    }
    if let Some(c) = strip(name, "CURVE-") {
        return if c.eq_ignore_ascii_case("ALL") {
            Some(Step::Names(Kind::Group, NORMAL_GROUPS, ALL_GROUPS))
        } else {
            one(Kind::Group, EC_GROUPS, c)
        };
    }
    if let Some(s) = strip(name, "SIGN-") {
        return if s.eq_ignore_ascii_case("ALL") {
            Some(Step::Names(Kind::Sign, &NORMAL_SIGNS, SIGNS))
        } else {
            one(Kind::Sign, SIGNS, s)
        };
    }
    for (prefix, kind, normal, every) in [
        ("MAC-", Kind::Mac, NORMAL_MACS, MACS),
        ("CIPHER-", Kind::Cipher, NORMAL_CIPHERS, CIPHERS),
        ("KX-", Kind::Kx, NORMAL_KX, KXS),
    ] {
        if let Some(rest) = strip(name, prefix) {
            // GnuTLS takes any other name after these prefixes, and ignores it.
            return if rest.eq_ignore_ascii_case("ALL") {
                Some(Step::Names(kind, normal, every))
            } else {
                Some(Step::Nothing)
            };
        }
    }
    if name.eq_ignore_ascii_case("RSA-EXPORT") {
        return Some(Step::Nothing);
    }
    one(Kind::Mac, MACS, name)
        .or_else(|| one(Kind::Cipher, CIPHERS, name))
        .or_else(|| one(Kind::Kx, KXS, name))
}

impl Priority {
    /// Parses `s` as GnuTLS's `gnutls_priority_init` does.
    ///
    /// # Errors
    /// GnuTLS's verdict on a string it refuses.
    pub fn parse(s: &str) -> Result<Priority, PriorityError> {
        let first = s.split(':').next().unwrap_or_default().trim_start();
        if let Some(names) = first.strip_prefix('@') {
            let rest = &s[s.find(':').unwrap_or(s.len())..];
            let found = system_priority(names).ok_or(PriorityError::Invalid)?;
            if found.trim_start().starts_with('@') {
                return Err(PriorityError::Invalid);
            }
            return Priority::parse(&format!("{found}{rest}"));
        }
        let mut p = Priority {
            lists: Default::default(),
            suite_b_192: false,
            profile: Profile::Low,
        };
        for (i, token) in s.split(':').enumerate() {
            let token = token.trim_start();
            let (op, name) = match token.as_bytes().first() {
                None => return Err(PriorityError::Invalid),
                Some(b'%') => {
                    let flag = &token[1..];
                    if let Some(&(_, profile)) = PROFILES.iter().find(|(n, _)| *n == flag) {
                        p.profile = profile;
                    } else if !FLAGS.contains(&flag) {
                        return Err(PriorityError::Invalid);
                    }
                    continue;
                }
                Some(b'+') => (true, &token[1..]),
                Some(b'-' | b'!') => (false, &token[1..]),
                Some(_) => {
                    let l = level(token).ok_or(PriorityError::Invalid)?;
                    if i == 0 {
                        p.lists = l.lists.map(<[_]>::to_vec);
                        p.suite_b_192 = l.names[0] == "SUITEB192";
                        p.profile = l.profile;
                    } else if l.names[0] == "NONE" {
                        return Err(PriorityError::Invalid);
                    } else {
                        p.add_level(l);
                    }
                    continue;
                }
            };
            let step = match level(name) {
                Some(l) if op && l.names[0] != "NONE" => Step::Level(l),
                Some(_) => return Err(PriorityError::Invalid),
                None => modifier(name).ok_or(PriorityError::Invalid)?,
            };
            match step {
                Step::Names(kind, added, _) if op => p.add(kind, added),
                Step::Names(kind, _, removed) => {
                    p.lists[kind as usize].retain(|x| !removed.contains(x))
                }
                Step::Name(kind, n) if op => p.add(kind, &[n]),
                Step::Name(kind, n) => p.lists[kind as usize].retain(|x| *x != n),
                Step::Level(l) => p.add_level(l),
                Step::Nothing => {}
            }
        }
        p.settle()?;
        Ok(p)
    }

    /// A keyword after the first element: its algorithms join the lists, its versions do
    /// not, and its profile counts if it asks for less.
    fn add_level(&mut self, l: &Level) {
        if l.profile.strength() < self.profile.strength() {
            self.profile = l.profile;
        }
        for (list, more) in self.lists.iter_mut().zip(l.lists).skip(1) {
            append(list, more);
        }
    }

    /// Adds `names` of `kind` after those already there.
    fn add(&mut self, kind: Kind, names: &[&'static str]) {
        append(&mut self.lists[kind as usize], names);
    }

    /// GnuTLS's consistency rules: versions the other lists cannot serve go, and a string
    /// that leaves no version or no cipher suite is refused.
    fn settle(&mut self) -> Result<(), PriorityError> {
        let has = |p: &Priority, kind: Kind, n: &str| p.lists[kind as usize].contains(&n);
        let drop = |p: &mut Priority, versions: &[&str]| {
            p.lists[Kind::Version as usize].retain(|v| !versions.contains(v));
        };
        // Suite B's 192-bit profile takes no P-256 signature.
        let refused = |s: &&str| {
            NOT_IN_TLS.contains(s) || (self.suite_b_192 && *s == "ECDSA-SECP256R1-SHA256")
        };
        if self.lists[Kind::Sign as usize].iter().all(refused) {
            drop(self, &["TLS1.2", "TLS1.3", "DTLS1.2"]);
        }
        if KX_WITHOUT_TLS13.iter().any(|k| has(self, Kind::Kx, k))
            || has(self, Kind::Cipher, "NULL")
        {
            drop(self, &["TLS1.3"]);
        }
        if !has(self, Kind::Version, "TLS1.2")
            && (has(self, Kind::Version, "TLS1.1") || has(self, Kind::Version, "TLS1.0"))
        {
            drop(self, &["TLS1.3"]);
        }
        if self.lists[Kind::Version as usize].is_empty() {
            return Err(PriorityError::Insufficient);
        }
        let tls13_suites = has(self, Kind::Mac, "AEAD")
            && TLS13_CIPHERS.iter().any(|c| has(self, Kind::Cipher, c));
        let with_older = self.lists[Kind::Version as usize]
            .iter()
            .any(|v| *v != "TLS1.3");
        let older_suites = with_older
            && SUITES.iter().any(|&(kxs, pairs)| {
                kxs.iter().any(|kx| has(self, Kind::Kx, kx))
                    && pairs.split_whitespace().any(|pair| {
                        pair.split_once('/').is_some_and(|(c, m)| {
                            has(self, Kind::Cipher, c) && has(self, Kind::Mac, m)
                        })
                    })
            });
        if !tls13_suites && !older_suites {
            return Err(PriorityError::Insufficient);
        }
        // Without groups TLS 1.3 has only pre-shared keys to agree on.
        let psk = ["PSK", "DHE-PSK", "ECDHE-PSK"]
            .iter()
            .any(|k| has(self, Kind::Kx, k));
        if self.lists[Kind::Group as usize].is_empty() && !psk {
            drop(self, &["TLS1.3"]);
        }
        Ok(())
    }

    /// How strong the peer's certificates must be.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The names of `kind` allowed, in order of preference.
    pub fn list(&self, kind: Kind) -> &[&'static str] {
        &self.lists[kind as usize]
    }

    /// Whether `name` of `kind` is allowed (names as GnuTLS spells them, without prefix).
    pub fn allows(&self, kind: Kind, name: &str) -> bool {
        self.list(kind).contains(&name)
    }
}

/// Appends those of `names` not in `list` yet.
fn append(list: &mut Vec<&'static str>, names: &[&'static str]) {
    for n in names {
        if !list.contains(n) {
            list.push(n);
        }
    }
}

/// The string a system-wide priority keyword names (`@SYSTEM`, `@QEMU,SYSTEM`: the first
/// found wins), from GnuTLS's configuration file's `[priorities]` section.
fn system_priority(names: &str) -> Option<String> {
    let path = std::env::var("GNUTLS_SYSTEM_PRIORITY_FILE")
        .unwrap_or_else(|_| "/etc/gnutls/config".to_owned());
    let text = std::fs::read_to_string(path).ok()?;
    let mut entries = Vec::new();
    let mut in_priorities = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_priorities = line.eq_ignore_ascii_case("[priorities]");
        } else if in_priorities
            && !line.starts_with('#')
            && let Some((k, v)) = line.split_once('=')
        {
            entries.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    names.split(',').find_map(|n| {
        entries
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n.trim()))
            .map(|(_, v)| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::{Kind, Priority, PriorityError, Profile, PublicKey};

    #[test]
    fn profiles_as_gnutls_sets_them_and_weighs_keys() {
        let profile = |s| Priority::parse(s).expect("valid").profile();
        assert_eq!(profile("NORMAL"), Profile::Low);
        assert_eq!(profile("SECURE192"), Profile::High);
        assert_eq!(profile("SECURE256:+SECURE128"), Profile::Low);
        assert_eq!(profile("SECURE192:%PROFILE_LOW"), Profile::Low);
        assert_eq!(profile("NORMAL:%PROFILE_ULTRA:+SECURE192"), Profile::High);
        assert_eq!(profile("NORMAL:%PROFILE_HIGH:+SECURE256"), Profile::High);
        let high = Profile::High;
        assert!(!high.accepts(PublicKey::FiniteField(2048)));
        assert!(high.accepts(PublicKey::FiniteField(3072)) && high.accepts(PublicKey::Curve(256)));
        assert!(Profile::Legacy.accepts(PublicKey::FiniteField(1800)));
        assert!(!Profile::Medium.accepts(PublicKey::FiniteField(1800)));
        assert!(!Profile::SuiteB128.accepts(PublicKey::FiniteField(15360)));
        assert!(!Profile::SuiteB192.accepts(PublicKey::Curve(256)));
    }

    fn verdict(s: &str) -> Result<Vec<&'static str>, PriorityError> {
        Priority::parse(s).map(|p| p.list(Kind::Version).to_vec())
    }

    #[test]
    fn keywords_and_modifiers_as_gnutls_reads_them() {
        let all = vec!["TLS1.3", "TLS1.2", "TLS1.1", "TLS1.0", "DTLS1.2", "DTLS1.0"];
        assert_eq!(verdict("NORMAL"), Ok(all.clone()));
        assert_eq!(verdict(" normal"), Ok(all.clone()));
        assert_eq!(
            verdict("NORMAL:-VERS-TLS-ALL:+VERS-TLS1.2"),
            Ok(vec!["DTLS1.2", "DTLS1.0", "TLS1.2"])
        );
        assert_eq!(
            verdict("NORMAL:-SIGN-ALL"),
            Ok(vec!["TLS1.1", "TLS1.0", "DTLS1.0"])
        );
        assert_eq!(
            verdict("NORMAL:-VERS-ALL:+VERS-TLS1.0:+VERS-TLS1.3"),
            Ok(vec!["TLS1.0"])
        );
        assert_eq!(
            verdict("NORMAL:-VERS-ALL:+VERS-TLS1.3:-GROUP-ALL"),
            Ok(vec![])
        );
        for bad in [
            "",
            "NORMAL:",
            "FOO",
            "NORMAL:NONE",
            "NORMAL:-SECURE256",
            "NORMAL:%compat",
        ] {
            assert_eq!(verdict(bad), Err(PriorityError::Invalid), "{bad:?}");
        }
        for thin in [
            "NONE",
            "NORMAL:-VERS-ALL",
            "NORMAL:-CIPHER-ALL",
            "+VERS-TLS1.2",
        ] {
            assert_eq!(verdict(thin), Err(PriorityError::Insufficient), "{thin:?}");
        }
        let p = Priority::parse("SECURE256:+SECURE128").expect("valid");
        assert_eq!(p.list(Kind::Mac), ["AEAD", "SHA1"]);
        assert!(p.allows(Kind::Cipher, "AES-128-GCM"));
    }
}
