//! `weftctl observe`: flows from agents' Observe APIs, merged in time order.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Endpoint as ChannelEndpoint, Uri};
use weft_api::observer::observer_client::ObserverClient;
use weft_api::observer::{Endpoint, Flow, FlowFilter, GetFlowsRequest, ObservationPoint, Verdict};

#[derive(Debug, clap::Args)]
pub struct ObserveArgs {
    /// An agent's Observe socket (repeatable); default: every node of the running sandbox.
    #[arg(long = "server")]
    servers: Vec<PathBuf>,
    /// The sandbox whose nodes to read; the only one running when omitted.
    #[arg(long)]
    sandbox: Option<String>,
    /// How many recent flows to show (per agent before merging, then overall).
    #[arg(long, default_value_t = 20)]
    last: u64,
    /// Keep printing new flows as they happen.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Flows from or to this pod (`name` or `namespace/name`); repeatable.
    #[arg(long)]
    pod: Vec<String>,
    /// Flows from or to pods of this namespace; repeatable.
    #[arg(short = 'n', long)]
    namespace: Vec<String>,
    /// Flows from or to pods with this label (`key=value` or `key`); repeatable.
    #[arg(short = 'l', long)]
    label: Vec<String>,
    /// Flows from or to this IP address; repeatable.
    #[arg(long)]
    ip: Vec<String>,
    /// Flows from or to this port; repeatable.
    #[arg(long)]
    port: Vec<u32>,
    /// TCP, UDP or ICMP; repeatable.
    #[arg(long)]
    protocol: Vec<String>,
    /// FORWARDED or DROPPED; repeatable.
    #[arg(long, value_parser = ["FORWARDED", "DROPPED"])]
    verdict: Vec<String>,
    /// Output: a table, or JSON lines with Hubble's field names.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
}

pub fn run(args: &ObserveArgs) -> anyhow::Result<ExitCode> {
    let servers = if args.servers.is_empty() {
        let sandbox = weft_sandbox::Sandbox::load(args.sandbox.as_deref())
            .context("no --server given and no sandbox to read from")?;
        sandbox
            .observe_sockets()
            .into_iter()
            .map(|(_, path)| path)
            .collect()
    } else {
        args.servers.clone()
    };
    let filter = FlowFilter {
        pod: args.pod.clone(),
        namespace: args.namespace.clone(),
        label: args.label.clone(),
        ip: args.ip.clone(),
        port: args.port.clone(),
        protocol: args.protocol.clone(),
        verdict: args
            .verdict
            .iter()
            .filter_map(|v| Verdict::from_str_name(v))
            .map(|v| v as i32)
            .collect(),
    };
    let request = GetFlowsRequest {
        number: args.last,
        follow: args.follow,
        filter: Some(filter),
    };
    let json = args.output == "json";
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let mut streams = Vec::new();
        for server in &servers {
            let mut client = connect(server.clone()).await?;
            let stream = client
                .get_flows(request.clone())
                .await
                .with_context(|| format!("asking {} for flows", server.display()))?
                .into_inner();
            streams.push(stream);
        }
        if args.follow {
            if !json {
                print_header();
            }
            let mut merged = futures::stream::select_all(streams);
            while let Some(flow) = merged.next().await {
                print_flow(&flow?, json);
            }
        } else {
            let mut flows = Vec::new();
            for mut stream in streams {
                while let Some(flow) = stream.next().await {
                    flows.push(flow?);
                }
            }
            flows.sort_by_key(|flow| flow.time_unix_nano);
            let skip = flows
                .len()
                .saturating_sub(usize::try_from(args.last).unwrap_or(usize::MAX));
            if !json {
                print_header();
            }
            for flow in &flows[skip..] {
                print_flow(flow, json);
            }
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn connect(path: PathBuf) -> anyhow::Result<ObserverClient<tonic::transport::Channel>> {
    if !path.exists() {
        bail!(
            "no Observe API at {}: is the agent running?",
            path.display()
        );
    }
    let socket = path.clone();
    // The URI is required by tonic but unused: the connector dials the Unix socket.
    let channel = ChannelEndpoint::try_from("http://agent.invalid")?
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .with_context(|| format!("connecting to {}", path.display()))?;
    Ok(ObserverClient::new(channel))
}

fn print_header() {
    println!(
        "{:<15} {:<34} {:<34} {:<14} {:<10} SUMMARY",
        "TIME", "SOURCE", "DESTINATION", "TYPE", "VERDICT"
    );
}

fn end_name(end: Option<&Endpoint>, ip: &str, port: u32) -> String {
    let port = if port > 0 {
        format!(":{port}")
    } else {
        String::new()
    };
    match end {
        Some(end) if !end.pod_name.is_empty() => {
            format!("{}/{}{port}", end.namespace, end.pod_name)
        }
        _ => format!("{ip}{port}"),
    }
}

fn observation(flow: &Flow) -> &'static str {
    match ObservationPoint::try_from(flow.observation_point) {
        Ok(ObservationPoint::FromEndpoint) => "from-endpoint",
        Ok(ObservationPoint::ToEndpoint) => "to-endpoint",
        Ok(ObservationPoint::ToOverlay) => "to-overlay",
        Ok(ObservationPoint::FromNetwork) => "from-network",
        _ => "unknown",
    }
}

fn verdict(flow: &Flow) -> &'static str {
    Verdict::try_from(flow.verdict)
        .map(|v| v.as_str_name())
        .unwrap_or("VERDICT_UNKNOWN")
}

fn summary(flow: &Flow) -> String {
    let mut summary = if flow.protocol == "TCP" {
        format!("TCP Flags: {}", flow.tcp_flags.join(", "))
    } else {
        flow.protocol.clone()
    };
    if Verdict::try_from(flow.verdict) == Ok(Verdict::Dropped) {
        summary.push_str(&format!(" (drop: {})", flow.drop_reason_desc));
        if !flow.denied_by.is_empty() {
            summary.push_str(&format!(" by {}", flow.denied_by.join("; ")));
        }
    }
    summary
}

fn time_of(flow: &Flow) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(u64::try_from(flow.time_unix_nano).unwrap_or(0))
}

fn print_flow(flow: &Flow, json: bool) {
    if json {
        println!("{}", hubble_json(flow));
        return;
    }
    let time = humantime::format_rfc3339_millis(time_of(flow)).to_string();
    println!(
        "{:<15} {:<34} {:<34} {:<14} {:<10} {}",
        time.get(11..23).unwrap_or(&time),
        end_name(flow.source.as_ref(), &flow.source_ip, flow.source_port),
        end_name(
            flow.destination.as_ref(),
            &flow.destination_ip,
            flow.destination_port
        ),
        observation(flow),
        verdict(flow),
        summary(flow)
    );
}

/// One flow as a JSON line, with the field names `hubble observe -o json` uses.
fn hubble_json(flow: &Flow) -> serde_json::Value {
    let time = humantime::format_rfc3339_nanos(time_of(flow)).to_string();
    let end = |end: Option<&Endpoint>| {
        end.map(|end| {
            serde_json::json!({
                "identity": end.identity, "cluster_name": end.cluster_name,
                "namespace": end.namespace, "pod_name": end.pod_name, "labels": end.labels,
                "node_name": end.node_name,
            })
        })
    };
    let l4 = match flow.protocol.as_str() {
        "TCP" => serde_json::json!({"TCP": {
            "source_port": flow.source_port, "destination_port": flow.destination_port,
            "flags": flow.tcp_flags.iter().map(|f| (f.clone(), serde_json::Value::Bool(true))).collect::<serde_json::Map<_, _>>(),
        }}),
        "UDP" => serde_json::json!({"UDP": {
            "source_port": flow.source_port, "destination_port": flow.destination_port,
        }}),
        other => serde_json::json!({ other: {} }),
    };
    let mut body = serde_json::json!({
        "time": time,
        "verdict": verdict(flow),
        "IP": {"source": flow.source_ip, "destination": flow.destination_ip, "ipVersion": "IPv4"},
        "l4": l4,
        "source": end(flow.source.as_ref()),
        "destination": end(flow.destination.as_ref()),
        "node_name": flow.node_name,
        "trace_observation_point": ObservationPoint::try_from(flow.observation_point)
            .map(|p| p.as_str_name()).unwrap_or("OBSERVATION_POINT_UNKNOWN"),
        "Summary": summary(flow),
    });
    if !flow.allowed_by.is_empty() {
        let key = match ObservationPoint::try_from(flow.observation_point) {
            Ok(ObservationPoint::FromEndpoint) => "egress_allowed_by",
            _ => "ingress_allowed_by",
        };
        body[key] = flow.allowed_by.clone().into();
    }
    if Verdict::try_from(flow.verdict) == Ok(Verdict::Dropped) {
        body["drop_reason"] = flow.drop_reason.into();
        body["drop_reason_desc"] = flow.drop_reason_desc.clone().into();
        if !flow.denied_by.is_empty() {
            let key = match ObservationPoint::try_from(flow.observation_point) {
                Ok(ObservationPoint::FromEndpoint) => "egress_denied_by",
                _ => "ingress_denied_by",
            };
            body[key] = flow.denied_by.clone().into();
        }
    }
    serde_json::json!({"flow": body, "node_name": flow.node_name, "time": time})
}
