//! Global services: a Service of the same namespace and name in several clusters, whose
//! backends each cluster shares with the others (what the mesh will carry; the sandbox copies
//! them between clusters' agents' services for now).

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::Value;

// The same names the agent reads (`weft_crds::service_model`), so the two never disagree.
pub use weft_crds::service_model::{CLUSTER_ID_LABEL, GLOBAL_ANNOTATIONS, SHARED_ANNOTATIONS};
/// Label of a remote slice: the cluster its endpoints live in.
pub const CLUSTER_LABEL: &str = "weft.io/cluster";

/// How a Service takes part in the mesh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// This cluster's backends only.
    Local,
    /// Merged with the same Service of other clusters; `shared` says whether this cluster's
    /// backends are offered to them.
    Global { shared: bool },
}

impl Scope {
    pub fn is_global(self) -> bool {
        matches!(self, Self::Global { .. })
    }

    pub fn is_shared(self) -> bool {
        matches!(self, Self::Global { shared: true })
    }
}

/// Whether a Service is global, read as the agents read it: a GlobalService of its namespace
/// in `global_services` naming it (`spec.serviceName`) decides (`spec.shared`, default true);
/// else the first of the annotations present does (`"true"`/`"false"`, any case). Unset, a
/// Service is local, and a global one is shared.
pub fn scope(service: &Service, global_services: &[&Value]) -> Scope {
    let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
    let name = service.metadata.name.as_deref().unwrap_or_default();
    let naming = global_services.iter().find(|global| {
        global
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            == namespace
            && global.pointer("/spec/serviceName").and_then(Value::as_str) == Some(name)
    });
    if let Some(global) = naming {
        return Scope::Global {
            shared: global.pointer("/spec/shared").and_then(Value::as_bool) != Some(false),
        };
    }
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let flag = |keys: [&str; 3]| {
        keys.iter()
            .find_map(|key| annotations.get(*key))
            .map(|value| value.trim().to_ascii_lowercase())
    };
    match flag(GLOBAL_ANNOTATIONS).as_deref() {
        Some("true") => Scope::Global {
            shared: flag(SHARED_ANNOTATIONS).as_deref() != Some("false"),
        },
        _ => Scope::Local,
    }
}

/// A cluster's slices as another cluster receives them: named `<service>-<cluster>` (then
/// `-2`, … when the Service has several), labelled with the cluster's name and ID.
pub fn remote_copies(
    slices: &[EndpointSlice],
    cluster: &str,
    cluster_id: u16,
) -> Vec<EndpointSlice> {
    slices
        .iter()
        .enumerate()
        .map(|(index, slice)| {
            let mut copy = slice.clone();
            let labels = copy.metadata.labels.get_or_insert_with(Default::default);
            let service = labels
                .get(super::slices::SERVICE_NAME_LABEL)
                .cloned()
                .unwrap_or_default();
            labels.insert(CLUSTER_LABEL.into(), cluster.into());
            labels.insert(CLUSTER_ID_LABEL.into(), cluster_id.to_string());
            copy.metadata.name = Some(match index {
                0 => format!("{service}-{cluster}"),
                n => format!("{service}-{cluster}-{}", n + 1),
            });
            copy
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(annotations: Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "model", "namespace": "ml", "annotations": annotations},
            "spec": {}
        }))
        .expect("service")
    }

    #[test]
    fn annotations_and_global_services_make_a_service_global_and_say_whether_it_is_shared() {
        let none: [&Value; 0] = [];
        assert_eq!(scope(&service(json!({})), &none), Scope::Local);
        assert_eq!(
            scope(&service(json!({"weft.io/global": "false"})), &none),
            Scope::Local
        );
        assert_eq!(
            scope(&service(json!({"weft.io/global": "true"})), &none),
            Scope::Global { shared: true }
        );
        assert_eq!(
            scope(
                &service(
                    json!({"service.cilium.io/global": "true", "service.cilium.io/shared": "false"})
                ),
                &none
            ),
            Scope::Global { shared: false }
        );
        let names = json!({"kind": "GlobalService", "metadata": {"name": "g", "namespace": "ml"}, "spec": {"serviceName": "model"}});
        let private = json!({"kind": "GlobalService", "metadata": {"name": "g", "namespace": "ml"}, "spec": {"serviceName": "model", "shared": false}});
        let elsewhere = json!({"kind": "GlobalService", "metadata": {"name": "g", "namespace": "other"}, "spec": {"serviceName": "model"}});
        assert_eq!(
            scope(&service(json!({})), &[&names]),
            Scope::Global { shared: true }
        );
        assert_eq!(
            scope(&service(json!({"weft.io/global": "true"})), &[&private]),
            Scope::Global { shared: false }
        );
        // A GlobalService decides over annotations; Weft's annotation over Cilium's.
        assert_eq!(
            scope(&service(json!({"weft.io/shared": "false"})), &[&names]),
            Scope::Global { shared: true }
        );
        assert_eq!(
            scope(
                &service(json!({"weft.io/global": "false", "service.cilium.io/global": "true"})),
                &none
            ),
            Scope::Local
        );
        assert_eq!(
            scope(&service(json!({"io.cilium/global-service": "True"})), &none),
            Scope::Global { shared: true }
        );
        assert_eq!(scope(&service(json!({})), &[&elsewhere]), Scope::Local);
    }
}
