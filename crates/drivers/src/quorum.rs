//! `quorum`: a node over several children holding the same data, each write to all of
//! them, each read voted on (QEMU: block/quorum.c). A read with `read-pattern=quorum` reads
//! every child and returns what at least `vote-threshold` of them agree on, reporting the
//! others (`QUORUM_REPORT_BAD`) and, with `rewrite-corrupted`, writing the winner over them;
//! too few agreeing is `QUORUM_FAILURE` and EIO. `read-pattern=fifo` reads the children in
//! order until one succeeds. Writes and flushes succeed when `vote-threshold` children do.

use crate::error::generic;
use ferrite_block::driver::{BoxFut, Driver, Extent, ReqFlags};
use ferrite_block::{Child, DriverFactory, DriverKind, EventSink, LocalFut, Node, OpenCtx, Perm};
use ferrite_qapi::QapiEvent;
use ferrite_qobject::{QDict, QObject};
use std::cell::{Cell, RefCell};
use std::io;
use std::rc::Rc;

/// The `quorum` driver's factory.
pub(crate) struct QuorumFactory;

impl DriverFactory for QuorumFactory {
    fn name(&self) -> &'static str {
        "quorum"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Format
    }

    fn open<'a>(&'a self, ctx: &'a mut OpenCtx<'_>) -> LocalFut<'a, Box<dyn Driver>> {
        Box::pin(async move {
            let opts = ctx.opts();
            let refs = match opts.get("children") {
                Some(QObject::List(l)) => l.clone(),
                // None given is none counted (opened by a file name, say).
                None => Vec::new(),
                _ => return Err(generic("Option children is not a valid array")),
            };
            if refs.is_empty() {
                return Err(generic("Number of provided children must be 1 or more"));
            }
            // QEMU keeps it in a C `int`: what does not fit wraps.
            let threshold = opts.i64("vote-threshold")? as i32;
            if threshold < 1 {
                return Err(generic("Parameter 'vote-threshold' expects a value >= 1"));
            }
            if threshold as usize > refs.len() {
                return Err(generic("threshold may not exceed children count"));
            }
            let fifo = opts.opt_str("read-pattern") == Some("fifo");
            let mut rewrite = false;
            if !fifo {
                let blkverify = opts.bool_or("blkverify", false);
                if blkverify && (refs.len() != 2 || threshold != 2) {
                    return Err(generic(
                        "blkverify=on can only be set if there are exactly two files and \
                         vote-threshold is 2",
                    ));
                }
                rewrite = opts.bool_or("rewrite-corrupted", false);
                if rewrite && blkverify {
                    return Err(generic(
                        "rewrite-corrupted=on cannot be used with blkverify=on",
                    ));
                }
            }
            // QEMU names the node before it opens the children: it is listed before them.
            ctx.take_position_now();
            let mut children = Vec::with_capacity(refs.len());
            for (i, r) in refs.iter().enumerate() {
                children.push(ctx.open_child_ref(&format!("children.{i}"), r).await?);
            }
            let mut strong = QDict::new();
            for key in STRONG_OPTIONS {
                if let Some(v) = opts.get(key) {
                    strong.insert(key, v.clone());
                }
            }
            Ok(Box::new(Quorum {
                strong,
                next_index: Cell::new(children.len()),
                children: RefCell::new(children),
                blkverify: !fifo && opts.bool_or("blkverify", false),
                threshold: threshold as usize,
                fifo,
                rewrite,
                events: ctx.events(),
            }) as Box<dyn Driver>)
        })
    }
}

/// The options that make a quorum what it is, shown in its `json:` name as given.
const STRONG_OPTIONS: [&str; 4] = [
    "vote-threshold",
    "blkverify",
    "rewrite-corrupted",
    "read-pattern",
];

struct Quorum {
    /// Which of [`STRONG_OPTIONS`] were given, and how.
    strong: QDict,
    /// The children, in their order (`x-blockdev-change` adds and removes).
    children: RefCell<Vec<Rc<Child>>>,
    /// The number the next added child's edge gets (`children.N`).
    next_index: Cell<usize>,
    blkverify: bool,
    threshold: usize,
    fifo: bool,
    rewrite: bool,
    events: Rc<dyn EventSink>,
}

/// `QUORUM_REPORT_BAD`: a child failed or disagreed.
struct ReportBad {
    kind: &'static str,
    error: Option<String>,
    node: String,
    sector: u64,
    sectors: u64,
}

impl QapiEvent for ReportBad {
    fn name(&self) -> &'static str {
        "QUORUM_REPORT_BAD"
    }

    fn data(&self) -> Option<QDict> {
        let mut d = QDict::new().with("type", self.kind);
        d.insert_opt("error", self.error.as_deref());
        Some(
            d.with("node-name", self.node.as_str())
                .with("sector-num", self.sector)
                .with("sectors-count", self.sectors),
        )
    }
}

/// `QUORUM_FAILURE`: too few children agreed.
struct Failure {
    reference: String,
    sector: u64,
    sectors: u64,
}

impl QapiEvent for Failure {
    fn name(&self) -> &'static str {
        "QUORUM_FAILURE"
    }

    fn data(&self) -> Option<QDict> {
        Some(
            QDict::new()
                .with("reference", self.reference.as_str())
                .with("sector-num", self.sector)
                .with("sectors-count", self.sectors),
        )
    }
}

/// The sectors `offset..offset + len` covers: first and count.
fn sectors(offset: u64, len: u64) -> (u64, u64) {
    let first = offset / 512;
    (first, (offset + len).div_ceil(512) - first)
}

fn strerror(e: &io::Error) -> String {
    ferrite_qapi::os_msg(e)
}

/// The most common error among `errors` (QEMU's `quorum_vote_error`), EIO if none.
fn voted_error(errors: &[&io::Error]) -> io::Error {
    let mut best: Option<(i32, usize)> = None;
    for e in errors {
        let code = e.raw_os_error().unwrap_or(libc::EIO);
        let n = errors
            .iter()
            .filter(|x| x.raw_os_error().unwrap_or(libc::EIO) == code)
            .count();
        if best.is_none_or(|(_, m)| n > m) {
            best = Some((code, n));
        }
    }
    io::Error::from_raw_os_error(best.map_or(libc::EIO, |(c, _)| c))
}

impl Quorum {
    fn report_bad(
        &self,
        kind: &'static str,
        child: &Child,
        offset: u64,
        len: u64,
        error: Option<&io::Error>,
    ) {
        let (sector, sectors) = sectors(offset, len);
        self.events.emit(&ReportBad {
            kind,
            error: error.map(strerror),
            node: child.node().name().to_owned(),
            sector,
            sectors,
        });
    }

    fn report_failure(&self, node: &Node, offset: u64, len: u64) {
        let (sector, sectors) = sectors(offset, len);
        self.events.emit(&Failure {
            reference: node.name().to_owned(),
            sector,
            sectors,
        });
    }

    /// The children now (a request keeps the set it started with).
    fn children(&self) -> Vec<Rc<Child>> {
        self.children.borrow().clone()
    }

    async fn read_quorum(&self, node: &Node, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let children = self.children();
        let reads = children.iter().map(|c| c.read(offset, len));
        let results = ferrite_block::join::join_all(reads).await;
        for (c, r) in children.iter().zip(&results) {
            if let Err(e) = r {
                self.report_bad("read", c, offset, len as u64, Some(e));
            }
        }
        let ok: Vec<(usize, &Vec<u8>)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|d| (i, d)))
            .collect();
        if ok.len() < self.threshold {
            self.report_failure(node, offset, len as u64);
            let errors: Vec<&io::Error> = results.iter().filter_map(|r| r.as_ref().err()).collect();
            return Err(voted_error(&errors));
        }
        // Versions in the order first seen, each with the children that returned it.
        let mut versions: Vec<(&Vec<u8>, Vec<usize>)> = Vec::new();
        for (i, d) in &ok {
            match versions.iter_mut().find(|(v, _)| *v == *d) {
                Some((_, who)) => who.push(*i),
                None => versions.push((d, vec![*i])),
            }
        }
        let winner = versions
            .iter()
            .enumerate()
            .max_by(|(a_i, a), (b_i, b)| a.1.len().cmp(&b.1.len()).then(b_i.cmp(a_i)))
            .map(|(i, _)| i)
            .unwrap_or(0);
        if versions[winner].1.len() < self.threshold {
            self.report_failure(node, offset, len as u64);
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let data = versions[winner].0.clone();
        for (k, (_, who)) in versions.iter().enumerate() {
            if k == winner {
                continue;
            }
            for &i in who {
                self.report_bad("read", &children[i], offset, len as u64, None);
                if self.rewrite {
                    let _ = children[i]
                        .write(offset, data.clone(), ReqFlags::empty())
                        .await;
                }
            }
        }
        Ok(data)
    }

    async fn read_fifo(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut last = io::Error::from_raw_os_error(libc::EIO);
        for c in &self.children() {
            match c.read(offset, len).await {
                Ok(d) => return Ok(d),
                Err(e) => {
                    self.report_bad("read", c, offset, len as u64, Some(&e));
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Runs a write on every child; fine when `vote-threshold` of them succeed.
    async fn write_all<F, Fut>(
        &self,
        node: &Node,
        offset: u64,
        len: u64,
        write: F,
    ) -> io::Result<()>
    where
        F: Fn(Rc<Child>) -> Fut,
        Fut: std::future::Future<Output = io::Result<()>>,
    {
        let children = self.children();
        let results =
            ferrite_block::join::join_all(children.iter().map(|c| write(c.clone()))).await;
        let mut errors = Vec::new();
        for (c, r) in children.iter().zip(&results) {
            if let Err(e) = r {
                self.report_bad("write", c, offset, len, Some(e));
                errors.push(e);
            }
        }
        if results.len() - errors.len() < self.threshold {
            self.report_failure(node, offset, len);
            return Err(voted_error(&errors));
        }
        Ok(())
    }
}

impl Driver for Quorum {
    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn has_image_info(&self) -> bool {
        false
    }

    fn len(&self, _node: &Node) -> u64 {
        self.children.borrow().first().map_or(0, |c| c.len())
    }

    fn new_child_name(&self) -> Option<Result<String, String>> {
        if self.blkverify {
            return Some(Err(
                "Cannot add a child to a quorum in blkverify mode".into()
            ));
        }
        Some(Ok(format!("children.{}", self.next_index.get())))
    }

    fn child_added(&self, edge: Rc<Child>) {
        self.next_index.set(self.next_index.get() + 1);
        self.children.borrow_mut().push(edge);
    }

    fn child_perm(&self, _name: &str, perm: Perm, shared: Perm, _used: bool) -> (Perm, Perm) {
        // A child found wrong is written over, whoever uses the quorum (QEMU asks for the
        // write permission whenever `rewrite-corrupted` is on).
        let perm = if self.rewrite {
            perm | Perm::WRITE
        } else {
            perm
        };
        // No one else may write to or resize a child: the children would differ.
        (
            perm,
            shared & (Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED),
        )
    }

    fn child_perm_inactive(&self, _name: &str) -> Perm {
        if self.rewrite {
            Perm::WRITE
        } else {
            Perm::empty()
        }
    }

    fn can_replace_child(&self, _node: &Node, to_replace: &Rc<Node>) -> bool {
        // A child may be replaced by a node with the quorum's data (repairing a broken
        // child is what a mirror from the quorum is for), as long as nothing else uses
        // it: other users could see its data change.
        self.children
            .borrow()
            .iter()
            .any(|c| Rc::ptr_eq(&c.node(), to_replace) && to_replace.users().len() == 1)
    }

    fn check_remove_child(&self, _name: &str) -> Option<Result<(), String>> {
        if self.children.borrow().len() <= self.threshold {
            return Some(Err(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.threshold
            )));
        }
        if self.blkverify {
            return Some(Err(
                "Cannot delete a child from a quorum in blkverify mode".into()
            ));
        }
        Some(Ok(()))
    }

    fn child_removed(&self, name: &str) {
        let mut children = self.children.borrow_mut();
        children.retain(|c| c.name() != name);
        // The last child's number is given again (QEMU's next_child_index).
        if name == format!("children.{}", self.next_index.get().saturating_sub(1)) {
            self.next_index.set(self.next_index.get() - 1);
        }
    }

    fn read<'a>(&'a self, node: &'a Node, offset: u64, len: usize) -> BoxFut<'a, Vec<u8>> {
        Box::pin(async move {
            if self.fifo {
                self.read_fifo(offset, len).await
            } else {
                self.read_quorum(node, offset, len).await
            }
        })
    }

    fn write<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        data: Vec<u8>,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let len = data.len() as u64;
            let data = Rc::new(data);
            self.write_all(node, offset, len, |c| {
                let data = data.clone();
                async move { c.write(offset, data.as_ref().clone(), flags).await }
            })
            .await
        })
    }

    fn write_zeroes<'a>(
        &'a self,
        node: &'a Node,
        offset: u64,
        len: u64,
        flags: ReqFlags,
    ) -> BoxFut<'a, ()> {
        Box::pin(self.write_all(node, offset, len, move |c| async move {
            c.write_zeroes(offset, len, flags).await
        }))
    }

    fn discard<'a>(&'a self, _node: &'a Node, _offset: u64, _len: u64) -> BoxFut<'a, ()> {
        // QEMU's quorum does not pass discards on: the children would no longer agree.
        Box::pin(async { Ok(()) })
    }

    fn flush<'a>(&'a self, _node: &'a Node) -> BoxFut<'a, ()> {
        Box::pin(async move {
            let children = self.children();
            let results = ferrite_block::join::join_all(children.iter().map(|c| c.flush())).await;
            let mut errors = Vec::new();
            for (c, r) in children.iter().zip(&results) {
                if let Err(e) = r {
                    self.report_bad("flush", c, 0, 0, Some(e));
                    errors.push(e);
                }
            }
            if results.len() - errors.len() >= self.threshold {
                Ok(())
            } else {
                Err(voted_error(&errors))
            }
        })
    }

    /// Data where any child holds data, zeroes where every child reads zeroes (QEMU's
    /// `quorum_co_block_status`): the children may disagree on where an extent ends, so
    /// data runs as far as the longest says and zeroes as far as the shortest. A child
    /// whose query fails is left out.
    fn block_status<'a>(&'a self, _node: &'a Node, offset: u64, len: u64) -> BoxFut<'a, Extent> {
        Box::pin(async move {
            let children = self.children.borrow().clone();
            let (mut zero_len, mut data_len) = (len, 0);
            for c in &children {
                match c.block_status(offset, len).await {
                    Ok(e) if e.zero => zero_len = zero_len.min(e.len),
                    Ok(e) => data_len = data_len.max(e.len),
                    Err(_) => {}
                }
            }
            if data_len > 0 {
                return Ok(Extent::data(data_len));
            }
            Ok(Extent {
                len: zero_len.max(1),
                data: false,
                zero: true,
                allocated: true,
            })
        })
    }

    fn truncate<'a>(&'a self, _node: &'a Node, _size: u64) -> BoxFut<'a, ()> {
        ferrite_block::driver::unsupported()
    }

    fn strong_options(&self) -> QDict {
        self.strong.clone()
    }

    fn gathered_child_options(&self, _node: &Node, _backing_overridden: bool) -> Option<QDict> {
        // A list in the children's order: their names (`children.N`) keep the gaps of
        // children removed, which options for a new quorum cannot have.
        let children: Vec<QObject> = self
            .children
            .borrow()
            .iter()
            .map(|c| c.node().full_options().into())
            .collect();
        Some(QDict::new().with("children", children))
    }
}
