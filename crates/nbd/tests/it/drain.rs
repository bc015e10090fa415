//! A drained node holds back an NBD client's writes: none reaches the node while the
//! section lasts, none is answered, and all go on after it.

use crate::{Client, args};
use ferrite_block::testing::{CountingFactory, RecordedEvents};
use ferrite_block::{Graph, Registry};
use ferrite_export::Exports;
use ferrite_nbd::NbdService;
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

#[tokio::test(flavor = "current_thread")]
async fn no_write_of_an_nbd_client_reaches_a_drained_node() {
    let local = tokio::task::LocalSet::new();
    local
        .run_until(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let sock = dir.path().join("nbd.sock");
            let sock = sock.to_str().expect("path");
            let events = Rc::new(RecordedEvents::default());
            let registry = Registry::new();
            let (counting, counts) = CountingFactory::new();
            registry.register(counting);
            let graph = Graph::new(events.clone(), registry);
            let node = graph
                .blockdev_add(&args(
                    r#"{"driver":"counting","node-name":"n0","size":1048576,"latency-ns":500000}"#,
                ))
                .await
                .expect("add");
            let exports = Exports::new(graph.clone(), events.clone());
            let nbd = NbdService::new(graph.clone(), &exports);
            nbd.start(&args(&format!(
                r#"{{"addr":{{"type":"unix","path":"{sock}"}}}}"#
            )))
            .expect("server");
            exports
                .add(&args(
                    r#"{"type":"nbd","id":"e0","node-name":"n0","writable":true}"#,
                ))
                .await
                .expect("export");

            let answered = Rc::new(Cell::new(0u64));
            let a = answered.clone();
            let sock_path = sock.to_owned();
            let writer = tokio::task::spawn_local(async move {
                let mut c = Client::connect(&sock_path, "n0").await.expect("connect");
                let mut i = 0u64;
                loop {
                    let r = c.write((i % 256) * 4096, &[i as u8; 4096]).await;
                    match r {
                        Ok(0) => a.set(a.get() + 1),
                        _ => return,
                    }
                    i += 1;
                }
            });
            while answered.get() < 20 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let drained = graph.drain(&node).await;
            assert_eq!(node.in_flight(), 0);
            let writes = counts.writes.get();
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                counts.writes.get(),
                writes,
                "a write reached the drained node"
            );
            // Only writes that were done before the drain held have been answered.
            let replies = answered.get();
            assert!(replies <= writes, "{replies} replies for {writes} writes");
            drop(drained);
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(answered.get() > replies + 10, "the client did not go on");
            writer.abort();
        })
        .await;
}
