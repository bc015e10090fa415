//! The block commands and the jobs they start, through the public API, on fake drivers.

mod cbw;
mod drain;
mod stack;

use ferrite_block::testing::{CountingFactory, Counts, RecordedEvents};
use ferrite_block::{Graph, Registry};
use ferrite_jobs::JobManager;
use ferrite_qapi::Args;
use ferrite_qobject::from_json;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A graph with the crate drivers and the `counting` one, a job manager, and the events.
pub(crate) struct World {
    pub(crate) graph: Rc<Graph>,
    pub(crate) jobs: Rc<JobManager>,
    pub(crate) events: Rc<RecordedEvents>,
    pub(crate) counts: Rc<Counts>,
}

impl World {
    pub(crate) fn new() -> World {
        let events = Rc::new(RecordedEvents::default());
        let registry = Registry::new();
        ferrite_drivers::register(&registry);
        let (counting, counts) = CountingFactory::new();
        registry.register(counting);
        World {
            graph: Graph::new(events.clone(), registry),
            jobs: JobManager::new(events.clone()),
            events,
            counts,
        }
    }

    pub(crate) async fn add(&self, json: &str) {
        self.graph
            .blockdev_add(&args(json))
            .await
            .expect("blockdev-add");
    }

    /// The statuses `JOB_STATUS_CHANGE` announced since the last call.
    pub(crate) fn statuses(&self) -> Vec<String> {
        self.events
            .take()
            .into_iter()
            .filter(|(name, _)| name == "JOB_STATUS_CHANGE")
            .filter_map(|(_, d)| d.get("status").and_then(|s| s.as_str()).map(str::to_owned))
            .collect()
    }
}

pub(crate) fn args(json: &str) -> Args {
    Args::new(
        from_json(json)
            .expect("json")
            .as_dict()
            .expect("dict")
            .clone(),
    )
}

/// Polls `cond` (yielding to the other tasks) until it holds or `timeout` passes.
pub(crate) async fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}
