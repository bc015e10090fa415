//! The schema: every QMP command, event and type ferrite implements, declared once.
//!
//! Declarations live in `crates/qapi/schema/*.qapi`, written in ferrite's schema language:
//!
//! ```text
//! # comment
//! enum JobStatus { created, running, ... }                # values; `name @feature` marks one
//! struct VersionInfo { qemu: VersionTriple, package: str } # `name?: type` is optional
//! struct Sub base Parent { extra: int }                   # members of Parent come first
//! union ObjectOptions base { qom-type: ObjectType, id: str } tag qom-type {
//!     secret: SecretProperties                            # a named or an inline `{...}` struct
//! }
//! alternate BlockdevRef { BlockdevOptions | str }
//! command query-version -> VersionInfo @allow-oob         # args: `{...}` or a struct/union name
//! event BLOCK_EXPORT_DELETED { id: str }
//! ```
//!
//! Builtin types: `str`, `int`, `int8`..`int64`, `uint8`..`uint64`, `size`, `number`,
//! `bool`, `null`, `any`; `[T]` is an array. Features (`@deprecated`, `@unstable`) follow the
//! thing they mark. The schema is compiled in and checked when first used (and by a unit test),
//! so a mistake in it is caught before any client sees it.

mod parse;

use indexmap::IndexMap;
use std::sync::OnceLock;

/// A builtin scalar type, with the range QEMU checks it against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// A string.
    Str,
    /// Signed integers of a width.
    Int(IntWidth),
    /// Unsigned integers of a width.
    UInt(IntWidth),
    /// A byte count (`uint64` that accepts size suffixes on the command line).
    Size,
    /// Any number.
    Number,
    /// A boolean.
    Bool,
    /// JSON null.
    Null,
    /// Any value.
    Any,
}

/// Integer widths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntWidth {
    /// 8 bits
    W8,
    /// 16 bits
    W16,
    /// 32 bits
    W32,
    /// 64 bits
    W64,
}

impl Builtin {
    fn from_name(name: &str) -> Option<Builtin> {
        use IntWidth::*;
        Some(match name {
            "str" => Builtin::Str,
            "int" | "int64" => Builtin::Int(W64),
            "int8" => Builtin::Int(W8),
            "int16" => Builtin::Int(W16),
            "int32" => Builtin::Int(W32),
            "uint8" => Builtin::UInt(W8),
            "uint16" => Builtin::UInt(W16),
            "uint32" => Builtin::UInt(W32),
            "uint64" => Builtin::UInt(W64),
            "size" => Builtin::Size,
            "number" => Builtin::Number,
            "bool" => Builtin::Bool,
            "null" => Builtin::Null,
            "any" => Builtin::Any,
            _ => return None,
        })
    }

    /// The builtin's name in introspection, where every integer type is `int`.
    pub fn introspection_name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int(_) | Builtin::UInt(_) | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    /// The builtin's `json-type` in introspection.
    pub fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int(_) | Builtin::UInt(_) | Builtin::Size => "int",
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }
}

/// A reference to a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeRef {
    /// A builtin.
    Builtin(Builtin),
    /// A declared enum, struct, union or alternate.
    Named(String),
    /// An array of the element type.
    Array(Box<TypeRef>),
}

/// A struct or union member.
#[derive(Debug, Clone)]
pub struct Member {
    /// Member name on the wire.
    pub name: String,
    /// Its type.
    pub ty: TypeRef,
    /// Whether it may be absent.
    pub optional: bool,
    /// Features such as `deprecated`.
    pub features: Vec<String>,
}

/// An enum value.
#[derive(Debug, Clone)]
pub struct EnumValue {
    /// The value.
    pub name: String,
    /// Its features.
    pub features: Vec<String>,
}

/// A declared type.
#[derive(Debug, Clone)]
pub enum TypeDef {
    /// A string enumeration.
    Enum(Vec<EnumValue>),
    /// An object with fixed members (base members already flattened in, first).
    Struct(Vec<Member>),
    /// A flat union: common members, one of which (`tag`, an enum) selects a variant struct.
    Union {
        /// The common members.
        base: Vec<Member>,
        /// The discriminator member.
        tag: String,
        /// Tag value to variant struct name; values without an entry add no members.
        cases: IndexMap<String, String>,
    },
    /// A value that may be one of several types, told apart by its JSON type.
    Alternate(Vec<TypeRef>),
}

/// A QMP command.
#[derive(Debug, Clone)]
pub struct Command {
    /// The command name.
    pub name: String,
    /// The argument type (a struct or union), if it takes arguments.
    pub args: Option<String>,
    /// The return type, if it returns something other than `{}`.
    pub ret: Option<TypeRef>,
    /// Features (`deprecated`, `unstable`).
    pub features: Vec<String>,
    /// Whether `exec-oob` may run it.
    pub allow_oob: bool,
    /// Whether its handler takes the arguments unchecked, the declared members included
    /// (QEMU's `'gen': false` commands, such as `device_add`).
    pub open_args: bool,
}

/// A QMP event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The event name.
    pub name: String,
    /// The data type, if the event carries data.
    pub data: Option<String>,
    /// Features.
    pub features: Vec<String>,
}

/// The whole schema.
#[derive(Debug, Default)]
pub struct Schema {
    types: IndexMap<String, TypeDef>,
    commands: IndexMap<String, Command>,
    events: IndexMap<String, Event>,
}

/// The schema source files, in the order they are read.
const SOURCES: &[(&str, &str)] = &[
    ("control.qapi", include_str!("../../schema/control.qapi")),
    (
        "introspect.qapi",
        include_str!("../../schema/introspect.qapi"),
    ),
    ("char.qapi", include_str!("../../schema/char.qapi")),
    ("qom.qapi", include_str!("../../schema/qom.qapi")),
    ("block.qapi", include_str!("../../schema/block.qapi")),
    (
        "block-export.qapi",
        include_str!("../../schema/block-export.qapi"),
    ),
    ("job.qapi", include_str!("../../schema/job.qapi")),
];

/// What only a qemu-system front end has (the machine, its devices, HMP), read after
/// [`SOURCES`] when [`use_system_schema`] was called.
const SYSTEM_SOURCES: &[(&str, &str)] =
    &[("machine.qapi", include_str!("../../schema/machine.qapi"))];

/// Whether [`schema`] includes [`SYSTEM_SOURCES`].
static SYSTEM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`schema`] the qemu-system front end's: the daemon's and the machine's. To be
/// called before the schema is first used; returns whether that was still the case.
pub fn use_system_schema() -> bool {
    SYSTEM.store(true, std::sync::atomic::Ordering::SeqCst);
    SCHEMA.get().is_none()
}

static SCHEMA: OnceLock<Schema> = OnceLock::new();

/// The program's schema (the daemon's, or the system front end's), parsed and checked on
/// first use.
///
/// # Panics
/// If the compiled-in schema is malformed; the `schema_loads` unit test keeps that from
/// reaching a build.
pub fn schema() -> &'static Schema {
    SCHEMA.get_or_init(|| {
        let mut sources = SOURCES.to_vec();
        if SYSTEM.load(std::sync::atomic::Ordering::SeqCst) {
            sources.extend_from_slice(SYSTEM_SOURCES);
        }
        match Schema::from_sources(&sources) {
            Ok(s) => s,
            Err(e) => panic!("the compiled-in QAPI schema is invalid: {e}"),
        }
    })
}

impl Schema {
    /// Parses and checks schema sources (`(file name, text)` pairs).
    ///
    /// # Errors
    /// A syntax error, a duplicate or unknown name, or an ill-formed union or alternate.
    pub fn from_sources(sources: &[(&str, &str)]) -> Result<Schema, String> {
        let mut schema = Schema::default();
        for (file, text) in sources {
            parse::parse_into(&mut schema, text).map_err(|e| format!("{file}: {e}"))?;
        }
        schema.check()?;
        Ok(schema)
    }

    /// A declared type.
    pub fn type_def(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    /// A command by name.
    pub fn command(&self, name: &str) -> Option<&Command> {
        self.commands.get(name)
    }

    /// Every command, in declaration order.
    pub fn commands(&self) -> impl Iterator<Item = &Command> {
        self.commands.values()
    }

    /// An event by name.
    pub fn event(&self, name: &str) -> Option<&Event> {
        self.events.get(name)
    }

    /// Every event, in declaration order.
    pub fn events(&self) -> impl Iterator<Item = &Event> {
        self.events.values()
    }

    /// The values of an enum type (empty for any other type).
    pub fn enum_values(&self, name: &str) -> Vec<&str> {
        match self.types.get(name) {
            Some(TypeDef::Enum(values)) => values.iter().map(|v| v.name.as_str()).collect(),
            _ => Vec::new(),
        }
    }

    /// The members of a struct type, base members first (empty for any other type).
    pub fn struct_members(&self, name: &str) -> &[Member] {
        match self.types.get(name) {
            Some(TypeDef::Struct(m)) => m,
            _ => &[],
        }
    }

    fn add_type(&mut self, name: String, def: TypeDef) -> Result<(), String> {
        if self.types.contains_key(&name) || Builtin::from_name(&name).is_some() {
            return Err(format!("type '{name}' is declared twice"));
        }
        self.types.insert(name, def);
        Ok(())
    }

    fn check_ref(&self, ty: &TypeRef, context: &str) -> Result<(), String> {
        match ty {
            TypeRef::Builtin(_) => Ok(()),
            TypeRef::Array(inner) => self.check_ref(inner, context),
            TypeRef::Named(n) if self.types.contains_key(n) => Ok(()),
            TypeRef::Named(n) => Err(format!("{context}: unknown type '{n}'")),
        }
    }

    fn is_object(&self, name: &str) -> bool {
        matches!(
            self.types.get(name),
            Some(TypeDef::Struct(_) | TypeDef::Union { .. })
        )
    }

    fn check(&self) -> Result<(), String> {
        for (name, def) in &self.types {
            match def {
                TypeDef::Enum(_) => {}
                TypeDef::Struct(members) => {
                    for m in members {
                        self.check_ref(&m.ty, name)?;
                    }
                }
                TypeDef::Union { base, tag, cases } => {
                    for m in base {
                        self.check_ref(&m.ty, name)?;
                    }
                    let tag_member = base
                        .iter()
                        .find(|m| &m.name == tag)
                        .ok_or_else(|| format!("{name}: tag '{tag}' is not a base member"))?;
                    let TypeRef::Named(tag_type) = &tag_member.ty else {
                        return Err(format!("{name}: tag '{tag}' is not an enum"));
                    };
                    let values = self.enum_values(tag_type);
                    for (case, ty) in cases {
                        if !values.contains(&case.as_str()) {
                            return Err(format!("{name}: case '{case}' is not a tag value"));
                        }
                        if !matches!(self.types.get(ty), Some(TypeDef::Struct(_))) {
                            return Err(format!("{name}: case '{case}' is not a struct"));
                        }
                    }
                }
                TypeDef::Alternate(members) => {
                    for m in members {
                        self.check_ref(m, name)?;
                    }
                }
            }
        }
        for c in self.commands.values() {
            if let Some(args) = &c.args
                && !self.is_object(args)
            {
                return Err(format!("command {}: arguments must be a struct", c.name));
            }
            if let Some(ret) = &c.ret {
                self.check_ref(ret, &c.name)?;
            }
        }
        for e in self.events.values() {
            if let Some(data) = &e.data
                && !self.is_object(data)
            {
                return Err(format!("event {}: data must be a struct", e.name));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_loads() {
        let s = Schema::from_sources(SOURCES).unwrap();
        assert!(s.command("qmp_capabilities").is_some());
        assert!(s.command("query-qmp-schema").is_some());
        assert!(s.command("stop").is_none());
        let all = [SOURCES, SYSTEM_SOURCES].concat();
        let s = Schema::from_sources(&all).unwrap();
        assert!(s.command("stop").is_some());
        assert!(s.command("device_add").is_some_and(|c| c.open_args));
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Schema::from_sources(&[("t", "struct A { b: Nope }")]).unwrap_err();
        assert_eq!(e, "A: unknown type 'Nope'");
        let e = Schema::from_sources(&[("t", "struct A { b: int }\nenum A { x }")]).unwrap_err();
        assert!(e.contains("declared twice"), "{e}");
    }
}
