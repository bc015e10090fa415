//! Graph behaviour through the public API: naming, permissions, drain, deletion, locking.

use ferrite_block::{BlockBackend, EventSink, Graph, Perm, ReqFlags};
use ferrite_qapi::Args;
use ferrite_qobject::{QDict, from_json};
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
struct Events(RefCell<Vec<(String, QDict)>>);

impl EventSink for Events {
    fn emit(&self, event: &dyn ferrite_qapi::QapiEvent) {
        self.0
            .borrow_mut()
            .push((event.name().to_owned(), event.data().unwrap_or_default()));
    }
}

fn args(json: &str) -> Args {
    Args::new(from_json(json).unwrap().as_dict().unwrap().clone())
}

/// Adds a node that must open.
async fn add(g: &Graph, json: &str) -> Rc<ferrite_block::Node> {
    g.blockdev_add(&args(json)).await.unwrap()
}

fn graph() -> (Rc<Graph>, Rc<Events>) {
    let events = Rc::new(Events::default());
    let registry = ferrite_block::Registry::new();
    ferrite_drivers::register(&registry);
    (Graph::new(events.clone(), registry), events)
}

#[tokio::test(flavor = "current_thread")]
async fn node_names_follow_qemu_rules() {
    let (g, _) = graph();
    add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    for (j, want) in [
        (
            r#"{"driver":"null-co","node-name":"n0"}"#,
            "Duplicate nodes with node-name='n0'",
        ),
        (
            r#"{"driver":"null-co","node-name":"0n"}"#,
            "Invalid node-name: '0n'",
        ),
        (
            r#"{"driver":"null-co"}"#,
            "'node-name' must be specified for the root node",
        ),
    ] {
        assert_eq!(
            g.blockdev_add(&args(j)).await.unwrap_err().to_string(),
            want
        );
    }
}

#[tokio::test(flavor = "current_thread")]
async fn conflicting_users_are_refused_and_nothing_changes() {
    let (g, _) = graph();
    let n = add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    let writer = BlockBackend::new(
        &g,
        &n,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ,
    )
    .unwrap();
    let err = BlockBackend::new(&g, &n, Perm::WRITE, Perm::all())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("Permission conflict on node 'n0': permissions 'write'"),
        "{err}"
    );
    assert_eq!(n.users().len(), 1);
    drop(writer);
    let again = BlockBackend::new(&g, &n, Perm::WRITE, Perm::all()).unwrap();
    drop(again);
}

#[tokio::test(flavor = "current_thread")]
async fn read_only_nodes_refuse_writers() {
    let (g, _) = graph();
    let n = add(
        &g,
        r#"{"driver":"null-co","node-name":"n0","read-only":true}"#,
    )
    .await;
    let e = BlockBackend::new(&g, &n, Perm::WRITE, Perm::all()).unwrap_err();
    assert_eq!(e.to_string(), "Block node is read-only");
}

#[tokio::test(flavor = "current_thread")]
async fn children_in_use_cannot_be_deleted_and_inline_children_go_with_parents() {
    let (g, _) = graph();
    add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    add(&g, r#"{"driver":"raw","node-name":"r0","file":"n0"}"#).await;
    add(
        &g,
        r#"{"driver":"raw","node-name":"r1","file":{"driver":"null-co"}}"#,
    )
    .await;
    assert_eq!(
        g.blockdev_del("n0").await.unwrap_err().to_string(),
        "Block device n0 is in use"
    );
    let inline = g
        .nodes()
        .iter()
        .find(|n| n.name().starts_with("#block"))
        .cloned()
        .unwrap();
    assert_eq!(
        g.blockdev_del(inline.name()).await.unwrap_err().to_string(),
        format!("Node {} is not owned by the monitor", inline.name())
    );
    g.blockdev_del("r1").await.unwrap();
    assert!(g.find(inline.name()).is_none());
    g.blockdev_del("r0").await.unwrap();
    g.blockdev_del("n0").await.unwrap();
    assert!(g.nodes().is_empty());
}

#[tokio::test(flavor = "current_thread")]
async fn raw_passes_user_permissions_to_its_file() {
    let (g, _) = graph();
    add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    let r = add(&g, r#"{"driver":"raw","node-name":"r0","file":"n0"}"#).await;
    let hold = BlockBackend::new(
        &g,
        &r,
        Perm::CONSISTENT_READ | Perm::WRITE,
        Perm::CONSISTENT_READ | Perm::WRITE,
    )
    .unwrap();
    let n = g.find("n0").unwrap();
    assert_eq!(
        n.cumulative_perms(),
        (
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE
        )
    );
    drop(hold);
    assert_eq!(n.cumulative_perms().0, Perm::empty());
}

#[tokio::test(flavor = "current_thread")]
async fn drain_waits_for_requests_and_holds_root_users() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let (g, _) = graph();
            let n = add(
                &g,
                r#"{"driver":"null-co","node-name":"n0","latency-ns":20000000}"#,
            )
            .await;
            let reader = BlockBackend::new(&g, &n, Perm::CONSISTENT_READ, Perm::all()).unwrap();
            let r2 = reader.clone();
            let req = tokio::task::spawn_local(async move { r2.read(0, 512).await });
            tokio::task::yield_now().await;
            let drained = g.drain(&n).await;
            // The request in flight finished before drain returned.
            assert!(req.is_finished());
            // A root user's next request waits until the drained section ends.
            let r3 = reader.clone();
            let waiting = tokio::task::spawn_local(async move { r3.read(0, 512).await });
            tokio::task::yield_now().await;
            assert!(!waiting.is_finished());
            // The drainer itself may still do I/O.
            let own = BlockBackend::new(&g, &n, Perm::WRITE, Perm::all()).unwrap();
            own.set_queue_requests(false);
            own.write(0, vec![1; 512], ReqFlags::empty()).await.unwrap();
            drop(drained);
            waiting.await.unwrap().unwrap();
        })
        .await;
}

#[tokio::test(flavor = "current_thread")]
async fn requests_past_the_end_fail_with_einval_and_are_counted() {
    let (g, _) = graph();
    let n = add(&g, r#"{"driver":"null-co","node-name":"n0","size":4096}"#).await;
    let blk = BlockBackend::new(&g, &n, Perm::CONSISTENT_READ, Perm::all()).unwrap();
    let e = blk.read(4000, 512).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc_einval()));
    assert!(blk.read(0, 4096).await.is_ok());
}

fn libc_einval() -> i32 {
    22
}

#[tokio::test(flavor = "current_thread")]
async fn replace_moves_every_parent_at_once() {
    let (g, _) = graph();
    let n0 = add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    let n1 = add(&g, r#"{"driver":"null-co","node-name":"n1"}"#).await;
    let r0 = add(&g, r#"{"driver":"raw","node-name":"r0","file":"n0"}"#).await;
    let root = BlockBackend::new(&g, &n0, Perm::CONSISTENT_READ, Perm::all()).unwrap();
    g.replace(&n0, &n1).await.unwrap();
    assert!(std::rc::Rc::ptr_eq(&r0.child("file").unwrap(), &n1));
    assert!(std::rc::Rc::ptr_eq(&root.node().unwrap(), &n1));
    assert!(n0.users().is_empty());
    assert_eq!(n1.users().len(), 2);
    drop(root);
}

#[tokio::test(flavor = "current_thread")]
async fn replace_with_a_filter_above_keeps_the_filter_edge() {
    let (g, _) = graph();
    let n0 = add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    let root = BlockBackend::new(&g, &n0, Perm::CONSISTENT_READ, Perm::all()).unwrap();
    let f = add(&g, r#"{"driver":"raw","node-name":"f","file":"n0"}"#).await;
    g.replace(&n0, &f).await.unwrap();
    assert!(std::rc::Rc::ptr_eq(&root.node().unwrap(), &f));
    assert!(std::rc::Rc::ptr_eq(&f.child("file").unwrap(), &n0));
    // The root user's permissions now pass through the filter to n0.
    assert_eq!(n0.cumulative_perms().0, Perm::CONSISTENT_READ);
    drop(root);
}

#[tokio::test(flavor = "current_thread")]
async fn replace_that_conflicts_moves_nothing() {
    let (g, _) = graph();
    let n0 = add(&g, r#"{"driver":"null-co","node-name":"n0"}"#).await;
    let ro = add(
        &g,
        r#"{"driver":"null-co","node-name":"ro","read-only":true}"#,
    )
    .await;
    let w = BlockBackend::new(&g, &n0, Perm::WRITE, Perm::all()).unwrap();
    let e = g.replace(&n0, &ro).await.unwrap_err();
    assert_eq!(e.to_string(), "Block node is read-only");
    assert!(std::rc::Rc::ptr_eq(&w.node().unwrap(), &n0));
    assert!(ro.users().is_empty());
    assert_eq!(n0.users().len(), 1);
    drop(w);
}

#[tokio::test(flavor = "current_thread")]
async fn a_reopen_refused_for_its_permissions_leaves_every_node_in_its_iothread() {
    let (g, _) = graph();
    // `a` runs in io0, held there by a user that stays and lets nobody else write.
    let a = add(&g, r#"{"driver":"null-co","node-name":"a"}"#).await;
    let pinned =
        BlockBackend::new(&g, &a, Perm::CONSISTENT_READ, Perm::all() - Perm::WRITE).unwrap();
    pinned.set_fixed_iothread(true);
    g.move_to_iothread(&a, Some("io0"), Some(&pinned)).unwrap();
    // `p` writes to its file, in the main loop.
    add(&g, r#"{"driver":"null-co","node-name":"f"}"#).await;
    let p = add(&g, r#"{"driver":"raw","node-name":"p","file":"f"}"#).await;
    let writer = BlockBackend::new(&g, &p, Perm::WRITE, Perm::all()).unwrap();
    // Pointing p's file at `a` would take p into io0 (a cannot move), then a writer onto
    // a node whose user lets nobody write: refused, and p stays where it ran.
    let err = g
        .reopen(&[args(r#"{"driver":"raw","node-name":"p","file":"a"}"#)])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("Permission conflict on node 'a'"), "{err}");
    assert_eq!(p.child("file").unwrap().name(), "f");
    assert_eq!(g.iothread_of(&p), None);
    assert_eq!(writer.iothread(), None);
    assert_eq!(g.iothread_of(&a).as_deref(), Some("io0"));
}
