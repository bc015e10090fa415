//! The object tree: nodes, containers and path resolution.

use crate::error::{Error, Result};
use ferrite_qobject::QObject;
use std::cell::RefCell;
use std::rc::Rc;

/// A property as `qom-list` and `qom-list-properties` describe it.
#[derive(Debug, Clone)]
pub struct PropInfo {
    /// Property name.
    pub name: &'static str,
    /// Its type, in QOM's words (`int`, `string`, `child<secret>`, a QAPI type name).
    pub ty: &'static str,
    /// Optional description.
    pub description: Option<&'static str>,
}

/// An object in the tree.
pub trait QomNode {
    /// Its QOM type name.
    fn type_name(&self) -> String;

    /// Its children, by name.
    fn children(&self) -> Children {
        Vec::new()
    }

    /// Reads a property other than `type`; `None` if there is no such property.
    fn get(&self, _name: &str) -> Option<Result<QObject>> {
        None
    }

    /// Writes a property; `None` if there is no such property.
    fn set(&self, _name: &str, _value: &QObject) -> Option<Result<()>> {
        None
    }
}

/// A node's children, by name.
pub type Children = Vec<(String, Rc<dyn QomNode>)>;

/// A node whose children are given by a function (the daemon's view of some registry).
pub struct Container {
    children: RefCell<Children>,
    dynamic: Option<Box<dyn Fn() -> Children>>,
}

impl Container {
    /// A container with fixed children.
    pub fn new(children: Children) -> Self {
        Container {
            children: RefCell::new(children),
            dynamic: None,
        }
    }

    /// A container whose children are listed afresh on every look-up.
    pub fn dynamic(f: impl Fn() -> Children + 'static) -> Self {
        Container {
            children: RefCell::new(Vec::new()),
            dynamic: Some(Box::new(f)),
        }
    }
}

impl QomNode for Container {
    fn type_name(&self) -> String {
        "container".into()
    }

    fn children(&self) -> Children {
        match &self.dynamic {
            Some(f) => f(),
            None => self.children.borrow().clone(),
        }
    }
}

fn not_found(path: &str) -> Error {
    Error::PathNotFound(path.to_owned())
}

/// Resolves an absolute path (`/objects/tg0`) or a partial one (`tg0`, matched by its end
/// anywhere in the tree, which must be unique).
///
/// # Errors
/// `DeviceNotFound` "Device 'p' not found", or "Path 'p' is ambiguous".
pub fn resolve_path(root: &Rc<dyn QomNode>, path: &str) -> Result<Rc<dyn QomNode>> {
    resolve_canonical(root, path).map(|(node, _)| node)
}

/// [`resolve_path`], with the object's absolute path (QEMU's canonical path).
pub(crate) fn resolve_canonical(
    root: &Rc<dyn QomNode>,
    path: &str,
) -> Result<(Rc<dyn QomNode>, String)> {
    if let Some(abs) = path.strip_prefix('/') {
        let mut cur = root.clone();
        let mut canonical = String::new();
        for part in abs.split('/').filter(|p| !p.is_empty()) {
            let next = cur
                .children()
                .into_iter()
                .find(|(n, _)| n == part)
                .map(|(_, c)| c)
                .ok_or_else(|| not_found(path))?;
            cur = next;
            canonical = format!("{canonical}/{part}");
        }
        return Ok((cur, canonical));
    }
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        // An empty partial path matches every object.
        return Err(Error::AmbiguousPath(path.to_owned()));
    }
    let mut found = Vec::new();
    find_partial(root, &parts, &mut Vec::new(), &mut found);
    match found.len() {
        0 => Err(not_found(path)),
        1 => Ok(found.remove(0)),
        _ => Err(Error::AmbiguousPath(path.to_owned())),
    }
}

fn find_partial(
    node: &Rc<dyn QomNode>,
    parts: &[&str],
    trail: &mut Vec<String>,
    found: &mut Vec<(Rc<dyn QomNode>, String)>,
) {
    for (name, child) in node.children() {
        trail.push(name);
        if trail.len() >= parts.len() {
            let tail = &trail[trail.len() - parts.len()..];
            if tail.iter().zip(parts).all(|(a, b)| a == b) {
                found.push((child.clone(), format!("/{}", trail.join("/"))));
            }
        }
        find_partial(&child, parts, trail, found);
        trail.pop();
    }
}
