//! Part of `make bench`: Weft's services against kube-proxy's iptables mode, with 10, 1,000
//! and 10,000 ClusterIP services. New connections per second and the median latency of
//! connect + one-byte request, to the last service (the end of kube-proxy's linear
//! `KUBE-SERVICES` chain), from a non-forking client; medians of ROUNDS × SECONDS, baseline and
//! Weft alternating.
//!
//! `WEFT_BENCH_ONLY_BASELINE=1` measures the iptables baseline alone.
//! `WEFT_BENCH_IPTABLES=legacy|nft` picks the iptables backend (default: the host's
//! `iptables-restore`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_e2e::kube_proxy::{
    restore_version, service_name, service_vip, KubeProxyBaseline, ECHO_PORT, NAMESPACE,
    SERVICE_PORT,
};
use weft_e2e::measure::{
    connect_rate_and_latency_in, median, prepare_short_connections, run_client_task_if_asked,
    wait_until_connectable_in,
};
use weft_e2e::sandbox::TestSandbox;
use weft_sandbox::default_bin_dir;

const COUNTS: [usize; 3] = [10, 1_000, 10_000];
const ROUNDS: usize = 3;
const SECONDS: u64 = 3;
const REACHABLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Medians over the rounds: connections per second and latency in microseconds.
#[derive(Clone, Copy)]
struct Measured {
    rate: f64,
    latency_us: f64,
}

struct Row {
    services: usize,
    rules_load: Duration,
    iptables: Measured,
    weft: Option<(Measured, Duration)>,
}

fn measure_rounds(rounds: Vec<(f64, Duration)>) -> Measured {
    Measured {
        rate: median(rounds.iter().map(|(rate, _)| *rate).collect()),
        latency_us: median(
            rounds
                .iter()
                .map(|(_, latency)| latency.as_secs_f64() * 1e6)
                .collect(),
        ),
    }
}

/// N Service objects, `svc-0` … `svc-<N-1>`, each with its cluster IP set, selecting the
/// server pod.
fn services_manifest(count: usize) -> String {
    (0..count)
        .map(|index| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {}, namespace: {NAMESPACE}}}\nspec:\n  type: ClusterIP\n  clusterIP: {}\n  selector: {{app: server}}\n  ports: [{{name: http, port: {SERVICE_PORT}, targetPort: {ECHO_PORT}, protocol: TCP}}]\n",
                service_name(index),
                service_vip(index)
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Applies `count` services to the sandbox and waits until the last answers from the client
/// pod; how long that took from the apply.
fn apply_services(sandbox: &TestSandbox, count: usize) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("services.yaml");
    std::fs::write(&file, services_manifest(count)).expect("write services");
    let client = sandbox.pod("client");
    let target = SocketAddr::from((service_vip(count - 1), SERVICE_PORT));
    let started = Instant::now();
    weft_sandbox::Sandbox::load(Some(&sandbox.name))
        .expect("state")
        .apply(None, &file)
        .expect("apply services");
    wait_until_connectable_in(
        &client.netns,
        client.cgroup.as_deref(),
        target,
        REACHABLE_TIMEOUT,
    )
    .unwrap_or_else(|error| panic!("Weft did not make {count} services reachable: {error}"));
    started.elapsed()
}

fn main() {
    run_client_task_if_asked();
    // `cargo bench` passes --bench; there is nothing to filter.
    let only_baseline = std::env::var("WEFT_BENCH_ONLY_BASELINE").is_ok_and(|v| v == "1");
    let restore = match std::env::var("WEFT_BENCH_IPTABLES").as_deref() {
        Ok("legacy") => "iptables-legacy-restore",
        Ok("nft") => "iptables-nft-restore",
        _ => "iptables-restore",
    };
    let bin_dir = default_bin_dir();

    let sandbox = (!only_baseline).then(|| {
        let pods = "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: bench, labels: {app: client}}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: x, ports: [{name: echo, containerPort: 9000}]}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: server, namespace: bench, labels: {app: server}}\nspec:\n  nodeName: n1\n  containers: [{name: c, image: x, ports: [{name: echo, containerPort: 9000}]}]\n";
        let sandbox = TestSandbox::up(
            "- {name: bench, id: 1, podCIDR: 10.1.0.0/16, serviceCIDR: 10.96.0.0/16, routingMode: native, nodes: [n1], manifests: [pods.yaml]}\n",
            &[("pods.yaml", pods)],
        );
        prepare_short_connections(&sandbox.pod("client").netns).expect("client pod sysctls");
        sandbox
    });

    let mut rows = Vec::new();
    for count in COUNTS {
        let baseline = KubeProxyBaseline::build(count, restore, &bin_dir)
            .unwrap_or_else(|error| panic!("iptables baseline with {count} services: {error}"));
        prepare_short_connections(baseline.client_netns()).expect("baseline client sysctls");
        let weft_ready = sandbox.as_ref().map(|s| apply_services(s, count));
        let (mut iptables, mut weft) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            iptables.push(
                connect_rate_and_latency_in(
                    baseline.client_netns(),
                    None,
                    baseline.target(),
                    SECONDS,
                )
                .expect("iptables baseline measurement"),
            );
            if let Some(sandbox) = &sandbox {
                let client = sandbox.pod("client");
                let target = SocketAddr::from((service_vip(count - 1), SERVICE_PORT));
                weft.push(
                    connect_rate_and_latency_in(
                        &client.netns,
                        client.cgroup.as_deref(),
                        target,
                        SECONDS,
                    )
                    .expect("Weft measurement"),
                );
            }
        }
        rows.push(Row {
            services: count,
            rules_load: baseline.load_time,
            iptables: measure_rounds(iptables),
            weft: weft_ready.map(|ready| (measure_rounds(weft), ready)),
        });
    }
    drop(sandbox);
    report(&rows, restore);
}

fn report(rows: &[Row], restore: &str) {
    println!(
        "\nservices vs kube-proxy (iptables, {}): new connection + 1-byte request to the last service, medians of {ROUNDS} x {SECONDS} s",
        restore_version(restore)
    );
    println!(
        "{:>8} {:>14} {:>12} {:>11} {:>9} {:>11} {:>12} {:>13}",
        "services",
        "iptables c/s",
        "weft c/s",
        "weft/ipt",
        "ipt µs",
        "weft µs",
        "rules load",
        "weft ready"
    );
    for row in rows {
        let (weft_rate, ratio, weft_latency, ready) = match row.weft {
            Some((weft, ready)) => (
                format!("{:.0}", weft.rate),
                format!("{:.2}x", weft.rate / row.iptables.rate),
                format!("{:.1}", weft.latency_us),
                format!("{:.2} s", ready.as_secs_f64()),
            ),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:>8} {:>14.0} {weft_rate:>12} {ratio:>11} {:>9.1} {weft_latency:>11} {:>10.2} s {ready:>13}",
            row.services, row.iptables.rate, row.iptables.latency_us, row.rules_load.as_secs_f64()
        );
    }
    let (first, last) = (&rows[0], &rows[rows.len() - 1]);
    println!(
        "iptables at {} / iptables at {}: {:.2}x",
        last.services,
        first.services,
        last.iptables.rate / first.iptables.rate
    );
    let verdict = |value: f64, target: f64| {
        if value >= target {
            "target met"
        } else {
            "target missed"
        }
    };
    if let (Some((weft_last, ready)), Some((weft_first, _))) = (last.weft, first.weft) {
        let versus = weft_last.rate / last.iptables.rate;
        let flat = weft_last.rate / weft_first.rate;
        println!(
            "Weft/iptables at {}: {versus:.2}x (target >= 2x): {}",
            last.services,
            verdict(versus, 2.0)
        );
        println!(
            "Weft at {} / Weft at {}: {flat:.2}x (target >= 0.9x): {}",
            last.services,
            first.services,
            verdict(flat, 0.9)
        );
        println!(
            "Weft made {} services reachable {:.2} s after the apply",
            last.services,
            ready.as_secs_f64()
        );
    } else {
        println!("Weft not measured (WEFT_BENCH_ONLY_BASELINE=1)");
    }
}
