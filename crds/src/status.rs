//! Status vocabulary shared by every kind: Kubernetes `metav1.Condition`s, with the condition
//! types kstatus-aware tools (`kubectl wait`, Argo CD, Flux) understand.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The spec was checked: `True`, or `False` with a reason naming the bad field.
pub const CONDITION_VALID: &str = "Valid";
/// The object's intent is in effect for the `observedGeneration`.
pub const CONDITION_READY: &str = "Ready";
/// Work towards the current generation is under way.
pub const CONDITION_RECONCILING: &str = "Reconciling";
/// Progress stopped and needs a person (e.g. an invalid spec).
pub const CONDITION_STALLED: &str = "Stalled";
