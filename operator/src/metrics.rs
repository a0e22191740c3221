//! The operator's Prometheus metrics, registered in the registry the admin endpoint serves
//! (`weft_core::admin`; `main.rs` creates it with the prefix `weft_operator`):
//!
//! | metric | labels | what |
//! |---|---|---|
//! | `reconciles_total` | `controller`, `result` (`ok`/`error`) | reconciles finished |
//! | `reconcile_errors_total` | `controller` | reconciles that failed (and will be retried) |
//! | `reconcile_duration_seconds` | `controller`, `result` | how long reconciles took |
//! | `identities_allocated_total` | | `WeftIdentity` objects this replica created |
//! | `identity_allocation_conflicts_total` | | creates refused because the number was taken |
//! | `garbage_collected_total` | `kind` (`WeftIdentity`/`WeftEndpoint`) | objects deleted by GC |
//! | `leader` | | 1 while this replica holds the lease |
//!
//! Every handle is cheap to clone and shares the underlying series.

use std::future::Future;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use kube::runtime::controller::Action;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

fn duration_histogram() -> Histogram {
    // 1 ms … ~33 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// Reconcile count, errors and duration per controller.
#[derive(Clone)]
pub struct ReconcileMetrics {
    reconciles: Family<ReconcileLabels, Counter>,
    errors: Family<ControllerLabels, Counter>,
    duration: Family<ReconcileLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for ReconcileMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconcileMetrics").finish_non_exhaustive()
    }
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
        }
    }
}

impl ReconcileMetrics {
    /// Handles registered nowhere (tests, or a caller without an admin endpoint).
    pub fn unregistered() -> Self {
        Self::default()
    }

    /// Registers the three families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "reconciles",
            "Reconciles finished, by controller and result",
            metrics.reconciles.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciles that failed and will be retried, by controller",
            metrics.errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long reconciles took, by controller and result",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Records one reconcile of `controller` that took `duration`.
    pub fn observe(&self, controller: &str, duration: Duration, ok: bool) {
        let labels = ReconcileLabels {
            controller: controller.to_owned(),
            result: if ok { "ok" } else { "error" },
        };
        self.reconciles.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        if !ok {
            self.errors
                .get_or_create(&ControllerLabels {
                    controller: controller.to_owned(),
                })
                .inc();
        }
    }

    /// Wraps a kube-runtime reconciler so that every call is counted and timed under
    /// `controller`: each controller's `run` passes its reconcile function through this, so no
    /// reconciler can forget to report.
    pub fn instrument<K, C, E, F, Fut>(
        &self,
        controller: &'static str,
        mut reconcile: F,
    ) -> impl FnMut(Arc<K>, Arc<C>) -> BoxFuture<'static, Result<Action, E>>
    where
        F: FnMut(Arc<K>, Arc<C>) -> Fut,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
    {
        let metrics = self.clone();
        move |object, ctx| {
            let metrics = metrics.clone();
            let reconciling = reconcile(object, ctx);
            async move {
                let started = Instant::now();
                let result = reconciling.await;
                metrics.observe(controller, started.elapsed(), result.is_ok());
                result
            }
            .boxed()
        }
    }

    /// How many reconciles of `controller` ended with `ok`, as counted so far (for tests).
    pub fn count(&self, controller: &str, ok: bool) -> u64 {
        self.reconciles
            .get(&ReconcileLabels {
                controller: controller.to_owned(),
                result: if ok { "ok" } else { "error" },
            })
            .map(|counter| counter.get())
            .unwrap_or(0)
    }
}

/// Identity allocation and garbage collection counters.
#[derive(Clone, Debug, Default)]
pub struct IdentityMetrics {
    pub allocated: Counter,
    pub conflicts: Counter,
    collected: Family<KindLabels, Counter>,
}

impl IdentityMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "identities_allocated",
            "WeftIdentity objects this replica created",
            metrics.allocated.clone(),
        );
        registry.register(
            "identity_allocation_conflicts",
            "WeftIdentity creates refused because another replica had taken the number",
            metrics.conflicts.clone(),
        );
        registry.register(
            "garbage_collected",
            "Objects deleted by garbage collection, by kind",
            metrics.collected.clone(),
        );
        metrics
    }

    /// Counts one object of `kind` deleted by garbage collection.
    pub fn collected(&self, kind: &'static str) {
        self.collected.get_or_create(&KindLabels { kind }).inc();
    }

    pub fn collected_count(&self, kind: &'static str) -> u64 {
        self.collected
            .get(&KindLabels { kind })
            .map(|counter| counter.get())
            .unwrap_or(0)
    }
}

/// Every metric of the operator; clone the parts each task needs.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub reconcile: ReconcileMetrics,
    pub identity: IdentityMetrics,
    /// 1 while this replica is the leader (see `leader`).
    pub leader: Gauge<i64, AtomicI64>,
}

impl Metrics {
    /// Registers every metric in `registry` (the admin endpoint's, prefixed `weft_operator`).
    pub fn register(registry: &mut Registry) -> Self {
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "leader",
            "1 while this replica holds the weft-operator lease, else 0",
            leader.clone(),
        );
        Self {
            reconcile: ReconcileMetrics::register(registry),
            identity: IdentityMetrics::register(registry),
            leader,
        }
    }

    /// Handles registered nowhere, for tests.
    pub fn unregistered() -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn reconciles_are_counted_timed_and_errors_counted_per_controller() {
        let mut registry = Registry::with_prefix("weft_operator");
        let metrics = Metrics::register(&mut registry);
        let reconcile = metrics.reconcile.clone();
        reconcile.observe("identity", Duration::from_millis(3), true);
        reconcile.observe("identity", Duration::from_millis(5), true);
        reconcile.observe("identity", Duration::from_secs(2), false);
        metrics.identity.collected("WeftIdentity");
        metrics.leader.set(1);
        assert_eq!(reconcile.count("identity", true), 2);
        assert_eq!(reconcile.count("identity", false), 1);
        assert_eq!(reconcile.count("policy", true), 0);

        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for line in [
            "weft_operator_reconciles_total{controller=\"identity\",result=\"ok\"} 2",
            "weft_operator_reconciles_total{controller=\"identity\",result=\"error\"} 1",
            "weft_operator_reconcile_errors_total{controller=\"identity\"} 1",
            "weft_operator_reconcile_duration_seconds_count{controller=\"identity\",result=\"ok\"} 2",
            "weft_operator_garbage_collected_total{kind=\"WeftIdentity\"} 1",
            "weft_operator_leader 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn an_instrumented_reconciler_reports_every_call() {
        let metrics = ReconcileMetrics::unregistered();
        let mut reconcile =
            metrics.instrument("policy", |fail: Arc<bool>, _ctx: Arc<()>| async move {
                if *fail {
                    Err("the API server refused")
                } else {
                    Ok(Action::await_change())
                }
            });
        assert!(reconcile(Arc::new(false), Arc::new(())).await.is_ok());
        assert!(reconcile(Arc::new(false), Arc::new(())).await.is_ok());
        assert!(reconcile(Arc::new(true), Arc::new(())).await.is_err());
        assert_eq!(metrics.count("policy", true), 2);
        assert_eq!(metrics.count("policy", false), 1);
    }
}
