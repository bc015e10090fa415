//! The QOM and user-object QMP commands (QEMU: `qom/qom-qmp-cmds.c`).

use crate::error::{Error, Result};
use crate::node::{QomNode, resolve_canonical, resolve_path};
use crate::objects::ObjectRegistry;
use crate::types::{all_props, find_type, type_list};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, QObject};
use std::rc::Rc;

fn prop_entry(name: &str, ty: &str) -> QObject {
    QObject::Dict(QDict::new().with("name", name).with("type", ty))
}

/// `qom-list`.
///
/// # Errors
/// An unknown or ambiguous path.
pub fn qmp_qom_list(root: &Rc<dyn QomNode>, args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let node = resolve_path(root, args.str("path")?)?;
    let mut out: Vec<QObject> = match find_type(&node.type_name()) {
        Some(t) => all_props(t)
            .iter()
            .map(|p| prop_entry(p.name, p.ty))
            .collect(),
        None => vec![prop_entry("type", "string")],
    };
    for (name, child) in node.children() {
        out.push(prop_entry(&name, &format!("child<{}>", child.type_name())));
    }
    Ok(out.into())
}

/// The object at `path` for `qom-get` and `qom-set`, which find nothing at an ambiguous
/// path (only `qom-list` says it is ambiguous).
fn resolve_unique(root: &Rc<dyn QomNode>, path: &str) -> Result<(Rc<dyn QomNode>, String)> {
    resolve_canonical(root, path).map_err(|e| match e {
        Error::AmbiguousPath(p) => Error::PathNotFound(p),
        other => other,
    })
}

fn prop_not_found(node: &dyn QomNode, name: &str) -> Error {
    Error::TypedPropertyNotFound {
        ty: node.type_name(),
        name: name.to_owned(),
    }
}

/// `qom-get`.
///
/// # Errors
/// An unknown path or property.
pub fn qmp_qom_get(root: &Rc<dyn QomNode>, args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let (node, path) = resolve_unique(root, args.str("path")?)?;
    let name = args.str("property")?;
    if name == "type" {
        return Ok(node.type_name().into());
    }
    // A child property reads as the child's path.
    if node.children().iter().any(|(n, _)| n == name) {
        return Ok(format!("{path}/{name}").into());
    }
    node.get(name)
        .unwrap_or_else(|| Err(prop_not_found(node.as_ref(), name)))
        .map_err(Into::into)
}

/// `qom-set`.
///
/// # Errors
/// An unknown path or property, a wrong type, or the object refusing the value.
pub fn qmp_qom_set(root: &Rc<dyn QomNode>, args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let (node, _) = resolve_unique(root, args.str("path")?)?;
    let name = args.str("property")?;
    let value = args.get("value").cloned().unwrap_or(QObject::Null);
    if name == "type" || node.children().iter().any(|(n, _)| n == name) {
        return Err(Error::ReadOnlyProperty {
            ty: node.type_name(),
            name: name.to_owned(),
        }
        .into());
    }
    node.set(name, &value)
        .unwrap_or_else(|| Err(prop_not_found(node.as_ref(), name)))
        .map_err(ferrite_qapi::Error::from)?;
    Ok(QDict::new().into())
}

/// `qom-list-types`.
pub fn qmp_qom_list_types(args: &Args) -> QObject {
    type_list(args.opt_str("implements"), args.bool_or("abstract", false))
        .into_iter()
        .map(|t| {
            let mut d = QDict::new().with("name", t.name);
            if t.is_abstract {
                d.insert("abstract", true);
            }
            d.insert_opt("parent", t.parent);
            QObject::Dict(d)
        })
        .collect::<Vec<_>>()
        .into()
}

/// `qom-list-properties`.
///
/// # Errors
/// `DeviceNotFound` "Class 'x' not found".
pub fn qmp_qom_list_properties(args: &Args) -> Result<QObject, ferrite_qapi::Error> {
    let name = args.str("typename")?;
    let ty = find_type(name).ok_or_else(|| Error::ClassNotFound(name.to_owned()))?;
    Ok(all_props(ty)
        .iter()
        .map(|p| {
            let mut d = QDict::new().with("name", p.name).with("type", p.ty);
            d.insert_opt("description", p.description);
            QObject::Dict(d)
        })
        .collect::<Vec<_>>()
        .into())
}

/// `object-add`.
///
/// # Errors
/// As [`ObjectRegistry::add`].
pub fn qmp_object_add(
    objects: &ObjectRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    objects.add(args)?;
    Ok(QDict::new().into())
}

/// `object-del`.
///
/// # Errors
/// As [`ObjectRegistry::del`].
pub fn qmp_object_del(
    objects: &ObjectRegistry,
    args: &Args,
) -> Result<QObject, ferrite_qapi::Error> {
    objects.del(args.str("id")?)?;
    Ok(QDict::new().into())
}

/// The text of `--object help` (no type) or `--object TYPE,help`.
///
/// # Errors
/// An unknown type.
pub fn object_help(type_name: Option<&str>) -> Result<String> {
    let creatable = type_name
        .and_then(find_type)
        .filter(|t| crate::types::implements(t, "user-creatable") && !t.is_abstract);
    // Like QEMU, an unknown type lists the types there are.
    match creatable.map(|t| t.name) {
        None => {
            let mut names: Vec<&str> = type_list(Some("user-creatable"), false)
                .iter()
                .map(|t| t.name)
                .collect();
            names.sort_unstable();
            let mut out = String::from("List of user creatable objects:\n");
            for n in names {
                out.push_str(&format!("  {n}\n"));
            }
            Ok(out)
        }
        Some(name) => {
            let ty = find_type(name).ok_or(Error::UnknownType)?;
            let mut props: Vec<_> = all_props(ty)
                .into_iter()
                .filter(|p| p.name != "type")
                .collect();
            props.sort_by_key(|p| p.name);
            let mut out = format!("{name} options:\n");
            for p in props {
                out.push_str(&format!("  {}=<{}>\n", p.name, p.ty));
            }
            Ok(out)
        }
    }
}
