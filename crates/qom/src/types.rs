//! The QOM type hierarchy ferrite has, for `qom-list-types` and `qom-list-properties`.

use crate::node::PropInfo;

/// A QOM type.
pub struct TypeInfo {
    /// Type name.
    pub name: &'static str,
    /// Parent type.
    pub parent: Option<&'static str>,
    /// Whether it cannot be instantiated.
    pub is_abstract: bool,
    /// Interfaces it implements (beyond what its parents implement).
    pub interfaces: &'static [&'static str],
    /// Its own properties (parents' come on top).
    pub props: &'static [PropInfo],
}

const fn t(
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    interfaces: &'static [&'static str],
    props: &'static [PropInfo],
) -> TypeInfo {
    TypeInfo {
        name,
        parent,
        is_abstract,
        interfaces,
        props,
    }
}

const fn p(name: &'static str, ty: &'static str) -> PropInfo {
    PropInfo {
        name,
        ty,
        description: None,
    }
}

const UC: &[&str] = &["user-creatable"];

const EVENT_LOOP_PROPS: &[PropInfo] = &[
    p("aio-max-batch", "int"),
    p("thread-pool-min", "int"),
    p("thread-pool-max", "int"),
];
const IOTHREAD_PROPS: &[PropInfo] = &[
    p("poll-max-ns", "int"),
    p("poll-grow", "int"),
    p("poll-shrink", "int"),
];
// In the order QEMU lists them.
const SECRET_COMMON_PROPS: &[PropInfo] = &[
    p("iv", "string"),
    p("keyid", "string"),
    p("format", "QCryptoSecretFormat"),
];
const SECRET_PROPS: &[PropInfo] = &[p("file", "string"), p("data", "string")];
const SECRET_KEYRING_PROPS: &[PropInfo] = &[p("serial", "int32_t")];
// In the order QEMU lists them.
const TLS_CREDS_PROPS: &[PropInfo] = &[
    p("endpoint", "QCryptoTLSCredsEndpoint"),
    p("dir", "string"),
    p("verify-peer", "bool"),
    p("priority", "string"),
];
const TLS_CREDS_X509_PROPS: &[PropInfo] = &[p("sanity-check", "bool"), p("passwordid", "string")];
const TLS_CREDS_PSK_PROPS: &[PropInfo] = &[p("username", "string")];
const AUTHZ_SIMPLE_PROPS: &[PropInfo] = &[p("identity", "string")];
const AUTHZ_LIST_PROPS: &[PropInfo] = &[
    p("policy", "QAuthZListPolicy"),
    p("rules", "QAuthZListRule"),
];
const AUTHZ_LIST_FILE_PROPS: &[PropInfo] = &[p("filename", "string"), p("refresh", "bool")];
const THREAD_CONTEXT_PROPS: &[PropInfo] = &[
    p("thread-id", "int"),
    p("node-affinity", "int"),
    p("cpu-affinity", "int"),
];
const PR_MANAGER_HELPER_PROPS: &[PropInfo] = &[p("path", "string")];
const SOCKET_PROPS: &[PropInfo] = &[p("connected", "bool"), p("addr", "SocketAddress")];

/// Every type, parents before children.
static TYPES: &[TypeInfo] = &[
    t("object", None, true, &[], &[]),
    t("interface", None, true, &[], &[]),
    t("user-creatable", Some("interface"), true, &[], &[]),
    t("container", Some("object"), false, &[], &[]),
    t(
        "event-loop-base",
        Some("object"),
        true,
        UC,
        EVENT_LOOP_PROPS,
    ),
    t(
        "iothread",
        Some("event-loop-base"),
        false,
        &[],
        IOTHREAD_PROPS,
    ),
    t("main-loop", Some("event-loop-base"), false, &[], &[]),
    t(
        "secret_common",
        Some("object"),
        true,
        UC,
        SECRET_COMMON_PROPS,
    ),
    t("secret", Some("secret_common"), false, &[], SECRET_PROPS),
    t(
        "secret_keyring",
        Some("secret_common"),
        false,
        &[],
        SECRET_KEYRING_PROPS,
    ),
    t(
        "throttle-group",
        Some("object"),
        false,
        UC,
        crate::objects::throttle::PROPS,
    ),
    t("tls-creds", Some("object"), true, &[], TLS_CREDS_PROPS),
    t(
        "tls-creds-x509",
        Some("tls-creds"),
        false,
        UC,
        TLS_CREDS_X509_PROPS,
    ),
    t("tls-creds-anon", Some("tls-creds"), false, UC, &[]),
    t(
        "tls-creds-psk",
        Some("tls-creds"),
        false,
        UC,
        TLS_CREDS_PSK_PROPS,
    ),
    t("authz", Some("object"), true, &[], &[]),
    t("authz-simple", Some("authz"), false, UC, AUTHZ_SIMPLE_PROPS),
    t("authz-list", Some("authz"), false, UC, AUTHZ_LIST_PROPS),
    t(
        "authz-list-file",
        Some("authz"),
        false,
        UC,
        AUTHZ_LIST_FILE_PROPS,
    ),
    t(
        "thread-context",
        Some("object"),
        false,
        UC,
        THREAD_CONTEXT_PROPS,
    ),
    t("pr-manager", Some("object"), true, UC, &[]),
    t(
        "pr-manager-helper",
        Some("pr-manager"),
        false,
        &[],
        PR_MANAGER_HELPER_PROPS,
    ),
    t("chardev", Some("object"), true, &[], &[]),
    t("chardev-fd", Some("chardev"), true, &[], &[]),
    t("chardev-file", Some("chardev-fd"), false, &[], &[]),
    t("chardev-pipe", Some("chardev-fd"), false, &[], &[]),
    t("chardev-stdio", Some("chardev-fd"), false, &[], &[]),
    t("chardev-serial", Some("chardev-fd"), false, &[], &[]),
    t("chardev-parallel", Some("chardev"), false, &[], &[]),
    t("chardev-pty", Some("chardev"), false, &[], &[]),
    t("chardev-udp", Some("chardev"), false, &[], &[]),
    t("chardev-mux", Some("chardev"), false, &[], &[]),
    t("chardev-hub", Some("chardev"), false, &[], &[]),
    t("chardev-null", Some("chardev"), false, &[], &[]),
    t("chardev-ringbuf", Some("chardev"), false, &[], &[]),
    t("chardev-memory", Some("chardev-ringbuf"), false, &[], &[]),
    t("chardev-socket", Some("chardev"), false, &[], SOCKET_PROPS),
];

/// A type by name.
pub fn find_type(name: &str) -> Option<&'static TypeInfo> {
    TYPES.iter().find(|t| t.name == name)
}

/// Whether `ty` is `ancestor` or derives from it or implements it as an interface.
pub(crate) fn implements(ty: &TypeInfo, ancestor: &str) -> bool {
    let mut cur = Some(ty);
    while let Some(t) = cur {
        if t.name == ancestor || t.interfaces.contains(&ancestor) {
            return true;
        }
        cur = t.parent.and_then(find_type);
    }
    false
}

/// All properties of an instance of `ty`: `type` first, then the ancestors' and its own.
pub(crate) fn all_props(ty: &TypeInfo) -> Vec<PropInfo> {
    let mut chain = Vec::new();
    let mut cur = Some(ty);
    while let Some(t) = cur {
        chain.push(t);
        cur = t.parent.and_then(find_type);
    }
    let mut props = vec![p("type", "string")];
    for t in chain.iter().rev() {
        props.extend(t.props.iter().cloned());
    }
    props
}

/// The types `qom-list-types` lists.
pub fn type_list(
    implements_filter: Option<&str>,
    include_abstract: bool,
) -> Vec<&'static TypeInfo> {
    TYPES
        .iter()
        .filter(|t| t.name != "interface" && t.name != "user-creatable")
        .filter(|t| include_abstract || !t.is_abstract)
        .filter(|t| implements_filter.is_none_or(|i| implements(t, i)))
        .collect()
}
