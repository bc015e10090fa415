//! Backing chains a job holds where they are (QEMU: `bdrv_freeze_backing_chain`): while a
//! stream or commit job runs, the links between its top and its base may not be pointed
//! elsewhere (a reopen says "Cannot change frozen 'backing' link ...").

use crate::child::Child;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::node::Node;
use std::rc::Rc;

/// The links one job froze; dropping it lets them go.
#[derive(Debug)]
pub struct FrozenChain {
    links: Vec<Rc<Child>>,
}

impl Drop for FrozenChain {
    fn drop(&mut self) {
        for link in &self.links {
            link.frozen.set(link.frozen.get().saturating_sub(1));
        }
    }
}

impl Graph {
    /// Freezes the filter and backing links from `top` down to `base` (the link into `base`
    /// included, `base`'s own not; with no `base`, down to the chain's end).
    ///
    /// # Errors
    /// QEMU's texts: a link frozen already, or one pointing at a node that leaves the graph
    /// with another job.
    pub fn freeze_chain(&self, top: &Rc<Node>, base: Option<&Rc<Node>>) -> Result<FrozenChain> {
        let mut links = Vec::new();
        let mut at = top.clone();
        while base.is_none_or(|b| !Rc::ptr_eq(&at, b)) {
            let name = at.driver().filtered_child().unwrap_or("backing");
            let Some(link) = at.edge(name) else {
                break;
            };
            let below = link.node();
            if link.is_frozen() {
                return Err(Error::ChainFrozen {
                    edge: name.to_owned(),
                    parent: at.name().to_owned(),
                    child: below.name().to_owned(),
                });
            }
            if below.never_freeze() {
                return Err(Error::CannotFreeze {
                    link: name.to_owned(),
                    node: below.name().to_owned(),
                });
            }
            links.push(link);
            at = below;
        }
        for link in &links {
            link.frozen.set(link.frozen.get() + 1);
        }
        Ok(FrozenChain { links })
    }
}
