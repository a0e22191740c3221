//! Which flows a client asked for. Every field of the filter that is set must match; within a
//! field any value may match; pod, namespace, label, IP and port match either end.

use weft_api::observer::{Endpoint, Flow, FlowFilter};

pub fn matches(filter: &FlowFilter, flow: &Flow) -> bool {
    let ends = [flow.source.as_ref(), flow.destination.as_ref()];
    let any_end = |test: &dyn Fn(&Endpoint) -> bool| ends.iter().flatten().any(|end| test(end));
    (filter.pod.is_empty()
        || filter.pod.iter().any(|wanted| {
            any_end(&|end| match wanted.split_once('/') {
                Some((namespace, pod)) => end.namespace == namespace && end.pod_name == pod,
                None => end.pod_name == *wanted,
            })
        }))
        && (filter.namespace.is_empty()
            || filter
                .namespace
                .iter()
                .any(|wanted| any_end(&|end| end.namespace == *wanted)))
        && (filter.label.is_empty()
            || filter.label.iter().any(|wanted| {
                any_end(&|end| {
                    end.labels.iter().any(|label| {
                        label == wanted
                            || label.split_once('=').is_some_and(|(key, _)| key == wanted)
                    })
                })
            }))
        && (filter.ip.is_empty()
            || filter
                .ip
                .iter()
                .any(|ip| *ip == flow.source_ip || *ip == flow.destination_ip))
        && (filter.port.is_empty()
            || filter
                .port
                .iter()
                .any(|port| *port == flow.source_port || *port == flow.destination_port))
        && (filter.protocol.is_empty()
            || filter
                .protocol
                .iter()
                .any(|protocol| protocol.eq_ignore_ascii_case(&flow.protocol)))
        && (filter.verdict.is_empty() || filter.verdict.contains(&flow.verdict))
}

#[cfg(test)]
mod tests {
    use weft_api::observer::Verdict;

    use super::*;

    fn end(namespace: &str, pod: &str, labels: &[&str]) -> Option<Endpoint> {
        Some(Endpoint {
            namespace: namespace.into(),
            pod_name: pod.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ..Default::default()
        })
    }

    fn flow() -> Flow {
        Flow {
            source: end("training", "trainer-0", &["app=trainer"]),
            destination: end("inference", "model", &["app=model", "gpu"]),
            source_ip: "10.1.1.2".into(),
            destination_ip: "10.1.2.1".into(),
            source_port: 40000,
            destination_port: 8080,
            protocol: "TCP".into(),
            verdict: Verdict::Forwarded as i32,
            ..Default::default()
        }
    }

    #[test]
    fn an_empty_filter_matches_everything() {
        assert!(matches(&FlowFilter::default(), &flow()));
    }

    #[test]
    fn pods_namespaces_labels_ips_and_ports_match_either_end() {
        let cases = [
            FlowFilter {
                pod: vec!["model".into()],
                ..Default::default()
            },
            FlowFilter {
                pod: vec!["training/trainer-0".into()],
                ..Default::default()
            },
            FlowFilter {
                namespace: vec!["inference".into()],
                ..Default::default()
            },
            FlowFilter {
                label: vec!["app=trainer".into()],
                ..Default::default()
            },
            FlowFilter {
                label: vec!["gpu".into()],
                ..Default::default()
            },
            FlowFilter {
                ip: vec!["10.1.2.1".into()],
                ..Default::default()
            },
            FlowFilter {
                port: vec![8080],
                ..Default::default()
            },
            FlowFilter {
                protocol: vec!["tcp".into()],
                ..Default::default()
            },
        ];
        for filter in cases {
            assert!(matches(&filter, &flow()), "{filter:?}");
        }
    }

    #[test]
    fn every_set_field_must_match() {
        let misses = [
            FlowFilter {
                pod: vec!["inference/trainer-0".into()],
                ..Default::default()
            },
            FlowFilter {
                label: vec!["app=web".into()],
                ..Default::default()
            },
            FlowFilter {
                protocol: vec!["UDP".into()],
                ..Default::default()
            },
            FlowFilter {
                verdict: vec![Verdict::Dropped as i32],
                ..Default::default()
            },
            FlowFilter {
                namespace: vec!["training".into()],
                port: vec![53],
                ..Default::default()
            },
        ];
        for filter in misses {
            assert!(!matches(&filter, &flow()), "{filter:?}");
        }
    }
}
