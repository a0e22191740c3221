//! The agent's recent flows: a bounded buffer (oldest dropped first) plus a broadcast for
//! clients following new flows.

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::broadcast;
use weft_api::observer::{Flow, FlowFilter};

use crate::flows::filter::matches;

pub struct FlowStore {
    recent: Mutex<VecDeque<Flow>>,
    capacity: usize,
    followers: broadcast::Sender<Flow>,
}

impl FlowStore {
    pub fn new(capacity: usize) -> Self {
        let (followers, _) = broadcast::channel(capacity.max(16));
        Self {
            recent: Mutex::new(VecDeque::with_capacity(capacity)),
            capacity,
            followers,
        }
    }

    pub fn push(&self, flow: Flow) {
        {
            let mut recent = self
                .recent
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(flow.clone());
        }
        // No follower is not an error.
        let _ = self.followers.send(flow);
    }

    /// The newest `number` flows that match, oldest first.
    pub fn last(&self, number: usize, filter: &FlowFilter) -> Vec<Flow> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let mut picked: Vec<Flow> = recent
            .iter()
            .rev()
            .filter(|flow| matches(filter, flow))
            .take(number)
            .cloned()
            .collect();
        picked.reverse();
        picked
    }

    pub fn follow(&self) -> broadcast::Receiver<Flow> {
        self.followers.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(port: u32) -> Flow {
        Flow {
            destination_port: port,
            ..Default::default()
        }
    }

    #[test]
    fn the_buffer_keeps_the_newest_flows_in_order() {
        let store = FlowStore::new(3);
        for port in 1..=5 {
            store.push(flow(port));
        }
        let ports: Vec<u32> = store
            .last(10, &FlowFilter::default())
            .iter()
            .map(|f| f.destination_port)
            .collect();
        assert_eq!(ports, vec![3, 4, 5]);
        let last_two: Vec<u32> = store
            .last(2, &FlowFilter::default())
            .iter()
            .map(|f| f.destination_port)
            .collect();
        assert_eq!(last_two, vec![4, 5]);
        let filtered = store.last(
            10,
            &FlowFilter {
                port: vec![4],
                ..Default::default()
            },
        );
        assert_eq!(filtered.len(), 1);
    }

    #[tokio::test]
    async fn followers_see_new_flows() {
        let store = FlowStore::new(8);
        let mut follower = store.follow();
        store.push(flow(7));
        assert_eq!(
            follower.recv().await.map(|f| f.destination_port).ok(),
            Some(7)
        );
    }
}
