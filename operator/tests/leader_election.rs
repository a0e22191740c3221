//! Leader election on a coordination.k8s.io/v1 Lease against a scripted API server.

mod apiserver_mock;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use weft_operator::leader::{LeaderElectionConfig, LeaderElector};
use weft_operator::metrics::Metrics;

use apiserver_mock::{client, stored, ApiServer};

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-operator";

fn config(identity: &str) -> LeaderElectionConfig {
    LeaderElectionConfig::new("weft-system", identity)
}

fn lease(holder: Option<&str>, resource_version: &str, transitions: i32, renew: &str) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-11-02T09:00:00.000000Z",
        "renewTime": renew,
        "leaseTransitions": transitions,
    });
    if let Some(holder) = holder {
        spec["holderIdentity"] = json!(holder);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "weft-operator", "namespace": "weft-system",
                     "uid": "lease-uid", "resourceVersion": resource_version},
        "spec": spec,
    })
}

/// Acquires an absent lease: GET 404, then POST.
async fn acquire(elector: &mut LeaderElector, server: &mut ApiServer) -> Value {
    let round = async {
        server.expect(Method::GET, LEASE).await.fail(
            404,
            "NotFound",
            "leases.coordination.k8s.io \"weft-operator\" not found",
        );
        let call = server.expect(Method::POST, LEASES).await;
        let created = stored(call.body.clone(), "lease-uid", "1");
        call.respond(201, created.clone());
        created
    };
    let (leader, created) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(leader.expect("round"), "an absent lease is ours");
    created
}

#[tokio::test]
async fn an_absent_lease_is_acquired_with_a_post() {
    let (client, mut server) = client();
    let metrics = Metrics::unregistered();
    let mut elector = LeaderElector::new(client, config("operator-a")).with_metrics(&metrics);
    let mut leadership = elector.subscribe();
    assert!(!*leadership.borrow_and_update());

    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .fail(404, "NotFound", "not found");
        let call = server.expect(Method::POST, LEASES).await;
        assert_eq!(call.param("fieldManager").as_deref(), Some("weft-operator"));
        let body = &call.body;
        assert_eq!(body["metadata"]["name"], "weft-operator");
        assert_eq!(body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(body["spec"]["leaseTransitions"], 0);
        assert!(body["spec"]["acquireTime"].is_string());
        assert_eq!(body["spec"]["acquireTime"], body["spec"]["renewTime"]);
        assert!(body["metadata"].get("resourceVersion").is_none());
        let created = stored(call.body.clone(), "lease-uid", "1");
        call.respond(201, created);
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(leader.expect("round"));
    assert!(elector.is_leader());
    assert!(leadership.has_changed().expect("sender alive"));
    assert!(*leadership.borrow_and_update());
    assert_eq!(metrics.leader.get(), 1);
}

#[tokio::test]
async fn the_leader_renews_with_a_put_carrying_the_resource_version() {
    let (client, mut server) = client();
    let mut elector = LeaderElector::new(client, config("operator-a"));
    let created = acquire(&mut elector, &mut server).await;

    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .respond(200, created.clone());
        let call = server.expect(Method::PUT, LEASE).await;
        let body = &call.body;
        assert_eq!(
            body["metadata"]["resourceVersion"], "1",
            "optimistic concurrency"
        );
        assert_eq!(body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(
            body["spec"]["leaseTransitions"], 0,
            "same holder: no transition"
        );
        assert_eq!(
            body["spec"]["acquireTime"], created["spec"]["acquireTime"],
            "acquireTime kept on renewal"
        );
        assert!(body["spec"]["renewTime"].is_string());
        let renewed = stored(call.body.clone(), "lease-uid", "2");
        call.respond(200, renewed);
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(leader.expect("round"));
    assert!(elector.is_leader());
}

#[tokio::test]
async fn a_409_on_renewal_means_not_leader() {
    let (client, mut server) = client();
    let metrics = Metrics::unregistered();
    let mut elector = LeaderElector::new(client, config("operator-a")).with_metrics(&metrics);
    let mut leadership = elector.subscribe();
    let created = acquire(&mut elector, &mut server).await;
    assert!(*leadership.borrow_and_update());

    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .respond(200, created.clone());
        server.expect(Method::PUT, LEASE).await.fail(
            409,
            "Conflict",
            "Operation cannot be fulfilled on leases.coordination.k8s.io \"weft-operator\": the object has been modified; please apply your changes to the latest version and try again",
        );
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(!leader.expect("a conflict is an answer, not an error"));
    assert!(!elector.is_leader());
    assert!(leadership.has_changed().expect("sender alive"));
    assert!(!*leadership.borrow_and_update());
    assert_eq!(metrics.leader.get(), 0);
}

#[tokio::test]
async fn a_foreign_lease_is_respected_until_it_expires_then_taken_over() {
    let (client, mut server) = client();
    let mut config = config("operator-a");
    config.lease_duration = Duration::from_millis(400);
    let mut elector = LeaderElector::new(client, config);
    // Held by b, who renews no more. Its renewTime is far in the past, yet only what this
    // replica has seen counts: it must see the lease unchanged for the lease's duration.
    let mut foreign = lease(Some("operator-b"), "7", 2, "2020-01-01T00:00:00.000000Z");
    foreign["spec"]["leaseDurationSeconds"] = json!(1);

    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .respond(200, foreign.clone());
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(!leader.expect("round"), "b's lease is live when first seen");
    server.expect_nothing(Duration::from_millis(50)).await;

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .respond(200, foreign.clone());
        let call = server.expect(Method::PUT, LEASE).await;
        let body = &call.body;
        assert_eq!(body["metadata"]["resourceVersion"], "7");
        assert_eq!(body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(
            body["spec"]["leaseTransitions"], 3,
            "a new holder: one more transition"
        );
        assert_ne!(
            body["spec"]["acquireTime"], foreign["spec"]["acquireTime"],
            "acquireTime is the takeover's"
        );
        assert_eq!(body["spec"]["acquireTime"], body["spec"]["renewTime"]);
        let taken = stored(call.body.clone(), "lease-uid", "8");
        call.respond(200, taken);
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(
        leader.expect("round"),
        "unchanged for its duration: expired"
    );
}

#[tokio::test]
async fn a_lease_that_keeps_being_renewed_is_never_taken() {
    let (client, mut server) = client();
    let mut config = config("operator-a");
    config.lease_duration = Duration::from_millis(300);
    let mut elector = LeaderElector::new(client, config);
    for (round, rv) in ["7", "8", "9"].into_iter().enumerate() {
        let mut renewed = lease(
            Some("operator-b"),
            rv,
            2,
            &format!("2026-11-02T09:00:0{round}.000000Z"),
        );
        renewed["spec"]["leaseDurationSeconds"] = json!(1);
        let answer = async {
            server
                .expect(Method::GET, LEASE)
                .await
                .respond(200, renewed);
        };
        let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), answer);
        assert!(!leader.expect("round"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    server.expect_nothing(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn a_leader_whose_renewal_hangs_steps_down_at_the_renew_deadline() {
    let (client, mut server) = client();
    let mut config = config("operator-a");
    config.renew_deadline = Duration::from_millis(300);
    let mut elector = LeaderElector::new(client, config);
    acquire(&mut elector, &mut server).await;
    // The API server takes the GET and never answers.
    let started = std::time::Instant::now();
    let hold = async {
        let call = server.expect(Method::GET, LEASE).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(call);
    };
    let stepped = async {
        let leader = elector.step().await;
        (leader, started.elapsed())
    };
    let ((leader, took), ()) = tokio::join!(stepped, hold);
    assert!(!leader, "stepped down");
    assert!(
        took < Duration::from_secs(1),
        "at the renew deadline, not later: {took:?}"
    );
    assert!(!elector.is_leader());
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let (client, mut server) = client();
    let mut elector = LeaderElector::new(client, config("operator-a"));
    let released = lease(None, "9", 4, "2026-11-02T09:00:00.000000Z");
    let round = async {
        server
            .expect(Method::GET, LEASE)
            .await
            .respond(200, released.clone());
        let call = server.expect(Method::PUT, LEASE).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "9");
        assert_eq!(call.body["spec"]["holderIdentity"], "operator-a");
        assert_eq!(call.body["spec"]["leaseTransitions"], 5);
        let taken = stored(call.body.clone(), "lease-uid", "10");
        call.respond(200, taken);
    };
    let (leader, ()) = tokio::join!(elector.try_acquire_or_renew(), round);
    assert!(leader.expect("round"));
}

#[tokio::test]
async fn release_gives_the_lease_up() {
    let (client, mut server) = client();
    let mut elector = LeaderElector::new(client, config("operator-a"));
    acquire(&mut elector, &mut server).await;
    let answer = async {
        let call = server.expect(Method::PUT, LEASE).await;
        assert_eq!(call.body["metadata"]["resourceVersion"], "1");
        assert!(
            call.body["spec"].get("holderIdentity").is_none(),
            "no holder"
        );
        assert_eq!(call.body["spec"]["leaseDurationSeconds"], 1);
        assert_eq!(call.body["spec"]["leaseTransitions"], 0);
        let released = stored(call.body.clone(), "lease-uid", "2");
        call.respond(200, released);
    };
    let (released, ()) = tokio::join!(elector.release(), answer);
    released.expect("release");
    assert!(!elector.is_leader());
    // Not leading any more: nothing to release.
    elector.release().await.expect("release");
    server.expect_nothing(Duration::from_millis(50)).await;
}

/// Drops count as "stopped".
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn run_while_leader_runs_the_work_only_while_leading() {
    let (client, mut server) = client();
    let mut config = config("operator-a");
    config.retry_period = Duration::from_millis(50);
    let elector = LeaderElector::new(client, config);
    let mut leadership = elector.subscribe();
    let started = Arc::new(AtomicUsize::new(0));
    let stopped = Arc::new(AtomicUsize::new(0));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn({
        let started = Arc::clone(&started);
        let stopped = Arc::clone(&stopped);
        elector.run_while_leader(
            move || {
                started.fetch_add(1, Ordering::SeqCst);
                let guard = Running(Arc::clone(&stopped));
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                }
            },
            async move {
                let _ = stop_rx.await;
            },
        )
    });

    // Round 1: acquired; the work starts.
    server
        .expect(Method::GET, LEASE)
        .await
        .fail(404, "NotFound", "not found");
    let call = server.expect(Method::POST, LEASES).await;
    let created = stored(call.body.clone(), "lease-uid", "1");
    call.respond(201, created.clone());
    leadership.wait_for(|leader| *leader).await.expect("leader");
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(started.load(Ordering::SeqCst), 1);

    // Round 2: another replica wrote the lease; the work is stopped.
    server
        .expect(Method::GET, LEASE)
        .await
        .respond(200, created);
    server
        .expect(Method::PUT, LEASE)
        .await
        .fail(409, "Conflict", "the object has been modified");
    leadership
        .wait_for(|leader| !*leader)
        .await
        .expect("follower");
    for _ in 0..50 {
        if stopped.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(stopped.load(Ordering::SeqCst), 1, "the work was dropped");

    // Shut down as a follower: answer rounds until it stops; nothing to release.
    let _ = stop_tx.send(());
    let held = lease(Some("operator-b"), "2", 1, "2026-11-02T09:00:00.000000Z");
    let finished = async {
        while let Some(call) = server.next_within(Duration::from_millis(300)).await {
            assert_eq!(call.method, Method::GET, "a follower only reads");
            call.respond(200, held.clone());
        }
    };
    let (done, ()) = tokio::join!(run, finished);
    done.expect("run_while_leader ended");
    assert_eq!(started.load(Ordering::SeqCst), 1);
}
