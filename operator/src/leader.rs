//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics, so that
//! only one operator replica reconciles at a time.
//!
//! - Every `retry_period` a replica reads the Lease (GET). If it is absent the replica creates
//!   it (POST; a 409 means another replica created it first). If another replica holds it and
//!   it has not expired the replica waits. Otherwise it writes itself in as holder (PUT carrying
//!   the resourceVersion it read, so of two replicas writing at once one gets 409 and backs off):
//!   `holderIdentity`, `leaseDurationSeconds`, `renewTime` = now, and when the holder changes
//!   `acquireTime` = now and `leaseTransitions` + 1.
//! - **Expiry is judged on the local clock**, as client-go does: a foreign lease is expired
//!   once this replica has seen it unchanged for its `leaseDurationSeconds`, never by comparing
//!   the holder's `renewTime` with our wall clock (clocks of two nodes may differ). So a freshly
//!   started replica waits one lease duration before taking over a lease it found held. A lease
//!   without holder (released) is free at once.
//! - The leader renews every `retry_period`. A 409 on renewal means someone else wrote the Lease:
//!   leadership is lost at once. Other errors are retried; if no renewal succeeded for
//!   `renew_deadline` (shorter than the lease duration, so nobody else can have taken over yet)
//!   leadership is given up.
//! - On shutdown the leader releases the lease (PUT without holder, duration 1 s), so the next
//!   replica takes over without waiting for expiry.
//!
//! Use [`LeaderElector::run_while_leader`] to run the controllers only while leader (they are
//! dropped, stopping their watches, when leadership is lost, and started again when it is
//! regained), or [`LeaderElector::subscribe`] + [`LeaderElector::run`] to follow `is_leader`.
//!
//! RBAC: `coordination.k8s.io` `leases` get, create, update in the lease's namespace.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::Metrics;

/// The Lease's name.
pub const LEASE_NAME: &str = "weft-operator";
/// Whose writes these are.
pub const FIELD_MANAGER: &str = "weft-operator";

/// How leader election is run. The defaults are client-go's (15 s, 10 s, 2 s).
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease (the operator's own, e.g. from the downward API).
    pub namespace: String,
    /// Name of the Lease: [`LEASE_NAME`].
    pub lease_name: String,
    /// This replica, unique among replicas: the pod name (downward API `metadata.name`).
    pub identity: String,
    /// How long others wait, after the lease last changed, before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps leading without a successful renewal. Less than
    /// `lease_duration`.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: LEASE_NAME.to_owned(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading Lease {namespace}/{name}: {source}")]
    Read {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing Lease {namespace}/{name}: {source}")]
    Write {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// The lease record last seen, and when it was first seen in that state (local clock).
struct Observed {
    spec: LeaseSpec,
    since: Instant,
}

/// Takes part in leader election for one replica. See the module comment.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaderElectionConfig,
    observed: Option<Observed>,
    /// The Lease as this replica last wrote it while leader (for release).
    written: Option<Lease>,
    /// When this replica last acquired or renewed successfully.
    renewed: Option<Instant>,
    is_leader: watch::Sender<bool>,
    gauge: Option<Gauge>,
}

fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409)
}

fn holder(spec: &LeaseSpec) -> Option<&str> {
    spec.holder_identity.as_deref().filter(|h| !h.is_empty())
}

impl LeaderElector {
    /// - `client`: the operator's client.
    /// - `config`: `LeaderElectionConfig::new(namespace, pod_name)`, defaults otherwise.
    pub fn new(client: Client, config: LeaderElectionConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            written: None,
            renewed: None,
            is_leader: watch::Sender::new(false),
            gauge: None,
        }
    }

    /// Reports leadership in `metrics.leader` (1/0) too.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        metrics.leader.set(0);
        self.gauge = Some(metrics.leader.clone());
        self
    }

    /// Follows leadership: `true` while this replica is the leader.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.is_leader.subscribe()
    }

    pub fn is_leader(&self) -> bool {
        *self.is_leader.borrow()
    }

    pub fn config(&self) -> &LeaderElectionConfig {
        &self.config
    }

    fn set_leader(&mut self, leader: bool) {
        if !leader {
            self.renewed = None;
            self.written = None;
        }
        if let Some(gauge) = &self.gauge {
            gauge.set(i64::from(leader));
        }
        let was = self.is_leader.send_replace(leader);
        if was != leader {
            tracing::info!(
                identity = %self.config.identity,
                lease = %format!("{}/{}", self.config.namespace, self.config.lease_name),
                leader,
                "leadership changed"
            );
        }
    }

    fn read_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Read {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
            source,
        }
    }

    fn write_error(&self, source: kube::Error) -> LeaderError {
        LeaderError::Write {
            namespace: self.config.namespace.clone(),
            name: self.config.lease_name.clone(),
            source,
        }
    }

    fn duration_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// One round: acquires or renews the lease if it may. Returns whether this replica leads
    /// now. A transient error is returned; leadership then lasts until `renew_deadline` after
    /// the last successful renewal (see [`Self::step`]).
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaderError> {
        let now = Instant::now();
        let wall = MicroTime(Timestamp::now());
        let current = self
            .api
            .get_opt(&self.config.lease_name)
            .await
            .map_err(|e| self.read_error(e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.duration_seconds()),
                    acquire_time: Some(wall.clone()),
                    renew_time: Some(wall),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            let params = PostParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PostParams::default()
            };
            return match self.api.create(&params, &lease).await {
                Ok(created) => {
                    self.observe(&created, now);
                    self.written = Some(created);
                    self.renewed = Some(now);
                    self.set_leader(true);
                    Ok(true)
                }
                Err(error) if is_conflict(&error) => {
                    self.set_leader(false);
                    Ok(false)
                }
                Err(error) => Err(self.write_error(error)),
            };
        };
        self.observe(&lease, now);
        let spec = lease.spec.clone().unwrap_or_default();
        let ours = holder(&spec) == Some(self.config.identity.as_str());
        if let Some(other) = holder(&spec).filter(|_| !ours) {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.config.lease_duration);
            let since = self.observed.as_ref().map_or(now, |o| o.since);
            if now < since + duration {
                tracing::debug!(holder = other, "the lease is held by another replica");
                self.set_leader(false);
                return Ok(false);
            }
            tracing::info!(
                holder = other,
                "the lease expired without renewal; taking it over"
            );
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(self.duration_seconds()),
            acquire_time: if ours {
                spec.acquire_time.clone().or_else(|| Some(wall.clone()))
            } else {
                Some(wall.clone())
            },
            renew_time: Some(wall),
            lease_transitions: Some(if ours {
                transitions
            } else {
                transitions.saturating_add(1)
            }),
            ..spec
        });
        lease.metadata.managed_fields = None;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        // `lease` carries the resourceVersion read above: a write in between gives 409.
        match self
            .api
            .replace(&self.config.lease_name, &params, &lease)
            .await
        {
            Ok(written) => {
                self.observe(&written, now);
                self.written = Some(written);
                self.renewed = Some(now);
                self.set_leader(true);
                Ok(true)
            }
            Err(error) if is_conflict(&error) => {
                tracing::info!("the lease changed under us (409): another replica leads");
                self.set_leader(false);
                Ok(false)
            }
            Err(error) => Err(self.write_error(error)),
        }
    }

    fn observe(&mut self, lease: &Lease, now: Instant) {
        let spec = lease.spec.clone().unwrap_or_default();
        let changed = self.observed.as_ref().is_none_or(|o| o.spec != spec);
        if changed {
            self.observed = Some(Observed { spec, since: now });
        }
    }

    /// One round as the run loops do it: errors are logged, and a leader that could not renew
    /// for `renew_deadline` steps down. Returns whether this replica leads.
    ///
    /// A round that hangs (an API server not answering) is cut short: a leader's at its renew
    /// deadline, so it steps down before anyone else may take the lease over; a follower's after
    /// `renew_deadline`.
    pub async fn step(&mut self) -> bool {
        let deadline = match self.renewed.filter(|_| self.is_leader()) {
            Some(renewed) => renewed + self.config.renew_deadline,
            None => Instant::now() + self.config.renew_deadline,
        };
        match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
            Ok(Ok(leader)) => return leader,
            Ok(Err(error)) => tracing::warn!(%error, "leader election round failed"),
            Err(_) => tracing::warn!("leader election round timed out"),
        }
        let expired = self
            .renewed
            .is_none_or(|at| at.elapsed() >= self.config.renew_deadline);
        if self.is_leader() && expired {
            tracing::warn!("no renewal within the renew deadline: stepping down");
            self.set_leader(false);
        }
        self.is_leader()
    }

    /// Gives the lease up if this replica holds it (PUT with no holder and a 1 s duration, as
    /// client-go does), so another replica takes over at once. A 409 means it was not ours any
    /// more; either way this replica no longer leads.
    pub async fn release(&mut self) -> Result<(), LeaderError> {
        let written = self.written.take();
        self.set_leader(false);
        let Some(mut lease) = written else {
            return Ok(());
        };
        let now = MicroTime(Timestamp::now());
        let transitions = lease.spec.as_ref().and_then(|s| s.lease_transitions);
        lease.spec = Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        });
        lease.metadata.managed_fields = None;
        let params = PostParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match self
            .api
            .replace(&self.config.lease_name, &params, &lease)
            .await
        {
            Ok(_) => {
                tracing::info!("released the lease");
                Ok(())
            }
            Err(error) if is_conflict(&error) => Ok(()),
            Err(error) => Err(self.write_error(error)),
        }
    }

    /// Takes part in the election every `retry_period` until `shutdown` resolves, then releases
    /// the lease. Follow leadership with [`Self::subscribe`] (taken before calling this).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(self.config.retry_period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticks.tick() => {
                    self.step().await;
                }
            }
        }
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "releasing the lease");
        }
    }

    /// Runs the future `work()` returns while this replica leads, until `shutdown` resolves.
    /// When leadership is lost the future is dropped (aborted) before anything else happens;
    /// when it is regained `work()` is called again. If the work ends by itself while leading,
    /// it is started again at the next round. On shutdown the work is stopped first, then the
    /// lease released.
    ///
    /// ```ignore
    /// let elector = LeaderElector::new(client.clone(), LeaderElectionConfig::new(ns, pod_name))
    ///     .with_metrics(&metrics);
    /// elector.run_while_leader(
    ///     || identity_controller::run(client.clone(), config.clone(), metrics.clone()),
    ///     shutdown_signal(),
    /// ).await;
    /// ```
    pub async fn run_while_leader<F, W>(mut self, mut work: F, shutdown: impl Future<Output = ()>)
    where
        F: FnMut() -> W,
        W: Future<Output = ()> + Send + 'static,
    {
        tokio::pin!(shutdown);
        let mut ticks = tokio::time::interval(self.config.retry_period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut running: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticks.tick() => {
                    let leader = self.step().await;
                    if !leader {
                        if let Some(task) = running.take() {
                            tracing::warn!("leadership lost: stopping the controllers");
                            task.abort();
                            let _ = task.await;
                        }
                    } else if running.as_ref().is_none_or(|task| task.is_finished()) {
                        tracing::info!("leading: starting the controllers");
                        running = Some(tokio::spawn(work()));
                    }
                }
            }
        }
        if let Some(task) = running.take() {
            task.abort();
            let _ = task.await;
        }
        if let Err(error) = self.release().await {
            tracing::warn!(%error, "releasing the lease");
        }
    }
}
