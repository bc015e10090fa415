//! `query-qmp-schema`: the schema in QEMU's introspection format.
//!
//! Commands and events keep their names; every other type is named by a decimal string in the
//! order it is first reached, as QEMU masks them, so clients cannot come to depend on type
//! names. Only types reachable from a command or event appear.

use crate::schema::{Builtin, Member, Schema, TypeDef, TypeRef};
use ferrite_qobject::{QDict, QObject};
use indexmap::IndexMap;

/// What an introspection entry describes.
#[derive(Clone)]
enum Entry {
    Builtin(Builtin),
    Named(String),
    Array(TypeRef),
    Empty,
}

#[derive(Default)]
struct Introspector {
    /// Type key to its name in the output.
    names: IndexMap<String, String>,
    pending: Vec<(String, Entry)>,
    next: usize,
}

const EMPTY_KEY: &str = "q_empty";

impl Introspector {
    fn key(ty: &TypeRef) -> String {
        match ty {
            TypeRef::Builtin(b) => b.introspection_name().to_owned(),
            TypeRef::Named(n) => n.clone(),
            TypeRef::Array(e) => format!("[{}]", Self::key(e)),
        }
    }

    fn name_of(&mut self, ty: &TypeRef) -> String {
        let key = Self::key(ty);
        if let Some(n) = self.names.get(&key) {
            return n.clone();
        }
        let (name, entry) = match ty {
            TypeRef::Builtin(b) => (b.introspection_name().to_owned(), Entry::Builtin(*b)),
            TypeRef::Named(n) => (self.fresh(), Entry::Named(n.clone())),
            TypeRef::Array(e) => (
                format!("[{}]", self.name_of(e)),
                Entry::Array((**e).clone()),
            ),
        };
        self.names.insert(key, name.clone());
        self.pending.push((name.clone(), entry));
        name
    }

    fn empty(&mut self) -> String {
        if let Some(n) = self.names.get(EMPTY_KEY) {
            return n.clone();
        }
        let name = self.fresh();
        self.names.insert(EMPTY_KEY.to_owned(), name.clone());
        self.pending.push((name.clone(), Entry::Empty));
        name
    }

    fn fresh(&mut self) -> String {
        let n = self.next.to_string();
        self.next += 1;
        n
    }

    fn object_or_empty(&mut self, name: Option<&String>) -> String {
        match name {
            Some(n) => self.name_of(&TypeRef::Named(n.clone())),
            None => self.empty(),
        }
    }

    fn members(&mut self, members: &[Member]) -> QObject {
        members
            .iter()
            .map(|m| {
                let mut d = QDict::new()
                    .with("name", m.name.as_str())
                    .with("type", self.name_of(&m.ty));
                if m.optional {
                    d.insert("default", QObject::Null);
                }
                with_features(&mut d, &m.features);
                QObject::Dict(d)
            })
            .collect::<Vec<_>>()
            .into()
    }

    fn describe(&mut self, schema: &Schema, name: &str, entry: Entry) -> QDict {
        let mut d = QDict::new().with("name", name);
        match entry {
            Entry::Builtin(b) => {
                d.insert("meta-type", "builtin");
                d.insert("json-type", b.json_type());
            }
            Entry::Array(elem) => {
                d.insert("meta-type", "array");
                d.insert("element-type", self.name_of(&elem));
            }
            Entry::Empty => {
                d.insert("meta-type", "object");
                d.insert("members", QObject::List(Vec::new()));
            }
            Entry::Named(type_name) => match schema.type_def(&type_name) {
                Some(TypeDef::Enum(values)) => {
                    d.insert("meta-type", "enum");
                    let members: Vec<QObject> = values
                        .iter()
                        .map(|v| {
                            let mut m = QDict::new().with("name", v.name.as_str());
                            with_features(&mut m, &v.features);
                            QObject::Dict(m)
                        })
                        .collect();
                    d.insert("members", members);
                    let names: Vec<QObject> = values
                        .iter()
                        .map(|v| QObject::from(v.name.as_str()))
                        .collect();
                    d.insert("values", names);
                }
                Some(TypeDef::Struct(members)) => {
                    d.insert("meta-type", "object");
                    let m = self.members(members);
                    d.insert("members", m);
                }
                Some(TypeDef::Union { base, tag, cases }) => {
                    d.insert("meta-type", "object");
                    let m = self.members(base);
                    d.insert("members", m);
                    d.insert("tag", tag.as_str());
                    let tag_type = base
                        .iter()
                        .find(|m| &m.name == tag)
                        .and_then(|m| match &m.ty {
                            TypeRef::Named(n) => Some(n.clone()),
                            _ => None,
                        })
                        .unwrap_or_default();
                    let variants: Vec<QObject> = schema
                        .enum_values(&tag_type)
                        .into_iter()
                        .map(|case| {
                            let ty = self.object_or_empty(cases.get(case));
                            QObject::Dict(QDict::new().with("case", case).with("type", ty))
                        })
                        .collect();
                    d.insert("variants", variants);
                }
                Some(TypeDef::Alternate(choices)) => {
                    d.insert("meta-type", "alternate");
                    let members: Vec<QObject> = choices
                        .iter()
                        .map(|c| QObject::Dict(QDict::new().with("type", self.name_of(c))))
                        .collect();
                    d.insert("members", members);
                }
                None => {
                    d.insert("meta-type", "object");
                    d.insert("members", QObject::List(Vec::new()));
                }
            },
        }
        d
    }
}

fn with_features(d: &mut QDict, features: &[String]) {
    if !features.is_empty() {
        let f: Vec<QObject> = features.iter().map(|f| QObject::from(f.as_str())).collect();
        d.insert("features", f);
    }
}

/// The `query-qmp-schema` result for `schema`.
pub fn schema_info(schema: &Schema) -> QObject {
    let mut intro = Introspector::default();
    let mut out = Vec::new();
    for c in schema.commands() {
        let mut d = QDict::new()
            .with("name", c.name.as_str())
            .with("meta-type", "command");
        d.insert("arg-type", intro.object_or_empty(c.args.as_ref()));
        let ret = match &c.ret {
            Some(t) => intro.name_of(t),
            None => intro.empty(),
        };
        d.insert("ret-type", ret);
        if c.allow_oob {
            d.insert("allow-oob", true);
        }
        with_features(&mut d, &c.features);
        out.push(QObject::Dict(d));
    }
    for e in schema.events() {
        let mut d = QDict::new()
            .with("name", e.name.as_str())
            .with("meta-type", "event");
        d.insert("arg-type", intro.object_or_empty(e.data.as_ref()));
        with_features(&mut d, &e.features);
        out.push(QObject::Dict(d));
    }
    let mut done = 0;
    while done < intro.pending.len() {
        let (name, entry) = intro.pending[done].clone();
        let d = intro.describe(schema, &name, entry);
        out.push(QObject::Dict(d));
        done += 1;
    }
    QObject::List(out)
}
