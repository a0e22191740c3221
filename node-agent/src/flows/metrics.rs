//! Flow metrics on the agent's admin endpoint.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use weft_api::observer::{Flow, ObservationPoint, Verdict};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub verdict: String,
    pub protocol: String,
    pub observation_point: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    pub reason: String,
}

#[derive(Clone, Default)]
pub struct FlowMetrics {
    flows: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    lost: Counter,
}

impl FlowMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "flows_processed",
            "Flows reported by the datapath, by verdict, protocol and observation point",
            self.flows.clone(),
        );
        registry.register(
            "drops",
            "Packets dropped by the datapath, by reason",
            self.drops.clone(),
        );
        registry.register(
            "flow_events_unreadable",
            "Ring buffer records that were not flow events",
            self.lost.clone(),
        );
    }

    pub fn observe(&self, flow: &Flow) {
        let verdict = Verdict::try_from(flow.verdict).unwrap_or(Verdict::Unknown);
        let point =
            ObservationPoint::try_from(flow.observation_point).unwrap_or(ObservationPoint::Unknown);
        self.flows
            .get_or_create(&FlowLabels {
                verdict: verdict.as_str_name().to_owned(),
                protocol: flow.protocol.clone(),
                observation_point: point.as_str_name().to_owned(),
            })
            .inc();
        if verdict == Verdict::Dropped {
            self.drops
                .get_or_create(&DropLabels {
                    reason: flow.drop_reason_desc.clone(),
                })
                .inc();
        }
    }

    pub fn unreadable(&self) {
        self.lost.inc();
    }
}
