//! Reads flow events from the datapath's ring buffer as they arrive.

use std::sync::{Arc, Mutex};

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use weft_node_bpf::maps::FlowEvent;

use crate::flows::directory::Directory;
use crate::flows::enrich::{enrich, Clock, Origin};
use crate::flows::metrics::FlowMetrics;
use crate::flows::store::FlowStore;

/// Everything a flow passes through between the ring buffer and its readers.
#[derive(Clone)]
pub struct FlowPipeline {
    pub directory: Arc<Mutex<Directory>>,
    pub store: Arc<FlowStore>,
    pub metrics: FlowMetrics,
    pub origin: Origin,
    pub clock: Clock,
    /// The policy in force, to name the rule behind a policy drop.
    pub policy: Arc<Mutex<Option<weft_core::policy::compile::Compiled>>>,
}

impl FlowPipeline {
    pub fn handle(&self, record: &[u8]) {
        let Some(event) = FlowEvent::from_bytes(record) else {
            self.metrics.unreadable();
            return;
        };
        let flow = {
            let mut directory = self
                .directory
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            let policy = self
                .policy
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            enrich(
                &event,
                &mut directory,
                &self.origin,
                &self.clock,
                policy.as_ref(),
            )
        };
        self.metrics.observe(&flow);
        self.store.push(flow);
    }
}

/// Runs until the ring buffer fails; each wake-up drains every record available.
pub async fn run(ring: RingBuf<MapData>, pipeline: FlowPipeline) -> std::io::Result<()> {
    // SAFETY: the ring buffer owns its map descriptor, which stays open and unchanged until
    // the AsyncFd (and the ring buffer inside it) is dropped.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|error| std::io::Error::other(error.to_string()))?;
    loop {
        let mut ready = ring.readable_mut().await?;
        let events = ready.get_inner_mut();
        while let Some(record) = events.next() {
            pipeline.handle(&record);
        }
        ready.clear_ready();
    }
}
