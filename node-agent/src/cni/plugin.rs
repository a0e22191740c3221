//! The `weft-cni` plugin (CNI spec 1.0.0): the runtime runs it in the node's namespace with
//! `CNI_*` variables and the network configuration on stdin. It asks the agent for an address,
//! wires the veth pair, and registers the endpoint; the agent answers only when the endpoint's
//! datapath is in place, so ADD returns with the pod reachable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cni::api::{PodRef, Registration, Request, Response};
use crate::cni::client::{AgentClient, ClientError};
use crate::netlink::{self, PodWiring};

pub const SUPPORTED_VERSIONS: &[&str] = &["1.0.0"];
/// Where the agent listens unless the network configuration says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weft/cni.sock";
/// How long the plugin waits for each answer of the agent; the agent's
/// `--endpoint-ready-timeout` must stay below it, so that ADD fails with the agent's reason.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Well-known CNI error codes (spec 1.0.0, "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

/// The plugin's entry of the network configuration list.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub sandbox: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gateway: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub interface: Option<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub gw: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionResult {
    pub cni_version: String,
    pub supported_versions: Vec<String>,
}

/// A CNI error: printed as JSON on stdout, with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(rename_all = "camelCase")]
#[error("{msg}: {details}")]
pub struct CniError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: &str, details: impl Into<String>) -> Self {
        Self {
            cni_version: SUPPORTED_VERSIONS[0].to_owned(),
            code,
            msg: msg.to_owned(),
            details: details.into(),
        }
    }
}

impl From<ClientError> for CniError {
    fn from(error: ClientError) -> Self {
        Self::new(
            code::TRY_AGAIN_LATER,
            "the Weft agent is unavailable",
            error.to_string(),
        )
    }
}

impl From<netlink::NetlinkError> for CniError {
    fn from(error: netlink::NetlinkError) -> Self {
        Self::new(code::IO_FAILURE, "wiring the pod failed", error.to_string())
    }
}

/// The invocation, from the `CNI_*` variables.
#[derive(Clone, Debug, Default)]
pub struct Invocation {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            command: lookup("CNI_COMMAND").unwrap_or_default(),
            container_id: lookup("CNI_CONTAINERID").unwrap_or_default(),
            netns: lookup("CNI_NETNS").unwrap_or_default(),
            ifname: lookup("CNI_IFNAME").unwrap_or_default(),
            args: parse_cni_args(&lookup("CNI_ARGS").unwrap_or_default()),
        }
    }

    fn require(&self, names: &[(&str, &str)]) -> Result<(), CniError> {
        let missing: Vec<&str> = names
            .iter()
            .filter(|(_, value)| value.is_empty())
            .map(|(name, _)| *name)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                code::INVALID_ENVIRONMENT,
                "required CNI environment variables are missing",
                missing.join(", "),
            ))
        }
    }

    fn pod(&self) -> PodRef {
        PodRef {
            namespace: self
                .args
                .get("K8S_POD_NAMESPACE")
                .cloned()
                .unwrap_or_default(),
            name: self.args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        }
    }
}

/// `K8S_POD_NAMESPACE=a;K8S_POD_NAME=b;IgnoreUnknown=1`, in any order; unknown keys kept.
pub fn parse_cni_args(args: &str) -> BTreeMap<String, String> {
    args.split(';')
        .filter_map(|pair| pair.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

/// Interface names derived from the container ID: unique per container (plugins for different
/// containers run concurrently) and within the 15-byte limit.
pub fn veth_names(container_id: &str) -> (String, String) {
    let short: String = container_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    (format!("wc{short}"), format!("wt{short}"))
}

/// Runs one command; `Ok(Some(json))` is printed on stdout.
pub fn run(invocation: &Invocation, stdin: &str) -> Result<Option<String>, CniError> {
    let conf: NetConf = serde_json::from_str(stdin).map_err(|error| {
        CniError::new(
            code::DECODE_FAILURE,
            "cannot decode the network configuration",
            error.to_string(),
        )
    })?;
    if invocation.command == "VERSION" {
        let version = VersionResult {
            cni_version: conf.cni_version,
            supported_versions: SUPPORTED_VERSIONS.iter().map(|v| v.to_string()).collect(),
        };
        return Ok(Some(serde_json::to_string(&version).unwrap_or_default()));
    }
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            "incompatible CNI version",
            format!(
                "{} requested; weft-cni supports {}",
                conf.cni_version,
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let socket = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_SOCKET));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|error| {
            CniError::new(
                code::IO_FAILURE,
                "cannot start the plugin's runtime",
                error.to_string(),
            )
        })?;
    match invocation.command.as_str() {
        "ADD" => {
            invocation.require(&[
                ("CNI_CONTAINERID", &invocation.container_id),
                ("CNI_NETNS", &invocation.netns),
                ("CNI_IFNAME", &invocation.ifname),
            ])?;
            runtime.block_on(add(invocation, &conf, &socket)).map(Some)
        }
        "DEL" => {
            invocation.require(&[
                ("CNI_CONTAINERID", &invocation.container_id),
                ("CNI_IFNAME", &invocation.ifname),
            ])?;
            runtime.block_on(del(invocation, &socket)).map(|()| None)
        }
        "CHECK" => {
            invocation.require(&[
                ("CNI_CONTAINERID", &invocation.container_id),
                ("CNI_NETNS", &invocation.netns),
                ("CNI_IFNAME", &invocation.ifname),
            ])?;
            runtime.block_on(check(invocation, &socket)).map(|()| None)
        }
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "unknown CNI_COMMAND",
            format!("{other:?}; expected ADD, DEL, CHECK or VERSION"),
        )),
    }
}

fn agent_error(code: u32, message: String) -> CniError {
    CniError::new(code, "the Weft agent refused the request", message)
}

async fn add(invocation: &Invocation, conf: &NetConf, socket: &Path) -> Result<String, CniError> {
    let mut agent = AgentClient::connect(socket, AGENT_TIMEOUT)?;
    let pod = invocation.pod();
    let (ip, gateway, mtu) = match agent.call(&Request::Allocate {
        container_id: invocation.container_id.clone(),
        pod: pod.clone(),
    })? {
        Response::Allocated { ip, gateway, mtu } => (ip, gateway, mtu),
        Response::Error { code, message } => return Err(agent_error(code, message)),
        other => {
            return Err(agent_error(
                code::IO_FAILURE,
                format!("unexpected answer {other:?}"),
            ))
        }
    };
    let (host_veth, temporary_peer) = veth_names(&invocation.container_id);
    let wired = netlink::wire_pod(&PodWiring {
        host_veth: &host_veth,
        temporary_peer: &temporary_peer,
        ifname: &invocation.ifname,
        netns: Path::new(&invocation.netns),
        ip,
        gateway,
        mtu,
    })
    .await?;
    match agent.call(&Request::Register(Registration {
        container_id: invocation.container_id.clone(),
        pod,
        ip,
        host_veth: host_veth.clone(),
        host_ifindex: wired.host_ifindex,
        host_mac: wired.host_mac,
        ifname: invocation.ifname.clone(),
        pod_mac: wired.pod_mac,
        netns: invocation.netns.clone(),
    }))? {
        Response::Registered => {}
        Response::Error { code, message } => {
            // The agent undid its part (the pod never became ready): nothing of this attempt
            // stays wired when the runtime retries.
            let message = match netlink::unwire_pod(&host_veth).await {
                Ok(()) => message,
                Err(error) => format!("{message} (and removing veth {host_veth} failed: {error})"),
            };
            return Err(agent_error(code, message));
        }
        other => {
            return Err(agent_error(
                code::IO_FAILURE,
                format!("unexpected answer {other:?}"),
            ))
        }
    }
    let result = CniResult {
        cni_version: conf.cni_version.clone(),
        interfaces: vec![
            Interface {
                name: host_veth,
                mac: Some(format_mac(&wired.host_mac)),
                sandbox: None,
            },
            Interface {
                name: invocation.ifname.clone(),
                mac: Some(format_mac(&wired.pod_mac)),
                sandbox: Some(invocation.netns.clone()),
            },
        ],
        ips: vec![IpConfig {
            address: format!("{ip}/32"),
            gateway: Some(gateway.to_string()),
            interface: Some(1),
        }],
        routes: vec![Route {
            dst: "0.0.0.0/0".into(),
            gw: Some(gateway.to_string()),
        }],
        dns: Dns::default(),
    };
    serde_json::to_string(&result).map_err(|error| {
        CniError::new(
            code::IO_FAILURE,
            "cannot encode the result",
            error.to_string(),
        )
    })
}

/// Idempotent: the agent forgets the endpoint and frees its address, then the veth goes (if
/// the pod's namespace is already gone, so is the veth).
async fn del(invocation: &Invocation, socket: &Path) -> Result<(), CniError> {
    let mut agent = AgentClient::connect(socket, AGENT_TIMEOUT)?;
    let host_veth = match agent.call(&Request::Release {
        container_id: invocation.container_id.clone(),
    })? {
        Response::Released { host_veth, .. } => host_veth,
        Response::Error { code, message } => return Err(agent_error(code, message)),
        other => {
            return Err(agent_error(
                code::IO_FAILURE,
                format!("unexpected answer {other:?}"),
            ))
        }
    };
    let host_veth = host_veth.unwrap_or_else(|| veth_names(&invocation.container_id).0);
    netlink::unwire_pod(&host_veth).await?;
    Ok(())
}

async fn check(invocation: &Invocation, socket: &Path) -> Result<(), CniError> {
    let mut agent = AgentClient::connect(socket, AGENT_TIMEOUT)?;
    let (ip, host_veth) = match agent.call(&Request::Check {
        container_id: invocation.container_id.clone(),
    })? {
        Response::Checked { ip, host_veth } => (ip, host_veth),
        Response::Error { code, message } => return Err(agent_error(code, message)),
        other => {
            return Err(agent_error(
                code::IO_FAILURE,
                format!("unexpected answer {other:?}"),
            ))
        }
    };
    let node = netlink::handle_here()?;
    if netlink::link_by_name(&node, &host_veth).await?.is_none() {
        return Err(CniError::new(
            code::IO_FAILURE,
            "the endpoint is broken",
            format!("host veth {host_veth} is missing"),
        ));
    }
    let pod = netlink::handle_in(Path::new(&invocation.netns)).await?;
    if netlink::link_by_name(&pod, &invocation.ifname)
        .await?
        .is_none()
    {
        return Err(CniError::new(
            code::IO_FAILURE,
            "the endpoint is broken",
            format!(
                "{} is missing in {} (expected {ip})",
                invocation.ifname, invocation.netns
            ),
        ));
    }
    Ok(())
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|byte| format!("{byte:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cni_args_are_parsed_in_any_order() {
        let args =
            parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=trainer-0;K8S_POD_NAMESPACE=training");
        let invocation = Invocation {
            args,
            ..Default::default()
        };
        assert_eq!(
            invocation.pod(),
            PodRef {
                namespace: "training".into(),
                name: "trainer-0".into()
            }
        );
    }

    #[test]
    fn veth_names_fit_and_differ_per_container() {
        let (host, peer) = veth_names("0123456789abcdef0123");
        assert_eq!(
            (host.as_str(), peer.as_str()),
            ("wc0123456789ab", "wt0123456789ab")
        );
        assert!(host.len() <= 15);
        assert_ne!(veth_names("aaaaaaaaaaaa1").0, veth_names("bbbbbbbbbbbb1").0);
    }

    #[test]
    fn version_lists_what_is_supported_and_old_versions_are_refused() {
        let invocation = Invocation {
            command: "VERSION".into(),
            ..Default::default()
        };
        let out = run(&invocation, r#"{"cniVersion":"0.4.0"}"#)
            .expect("version")
            .expect("json");
        assert_eq!(
            out,
            r#"{"cniVersion":"0.4.0","supportedVersions":["1.0.0"]}"#
        );
        let add = Invocation {
            command: "ADD".into(),
            ..Default::default()
        };
        let error = run(
            &add,
            r#"{"cniVersion":"0.4.0","name":"weft","type":"weft-cni"}"#,
        )
        .expect_err("0.4.0");
        assert_eq!(error.code, code::INCOMPATIBLE_VERSION);
    }

    #[test]
    fn missing_environment_is_named() {
        let add = Invocation {
            command: "ADD".into(),
            container_id: "abc".into(),
            ..Default::default()
        };
        let error = run(
            &add,
            r#"{"cniVersion":"1.0.0","name":"weft","type":"weft-cni"}"#,
        )
        .expect_err("env");
        assert_eq!(error.code, code::INVALID_ENVIRONMENT);
        assert_eq!(error.details, "CNI_NETNS, CNI_IFNAME");
    }

    #[test]
    fn an_absent_agent_means_try_again_later() {
        let dir = tempfile::tempdir().expect("tempdir");
        let add = Invocation {
            command: "DEL".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
            ..Default::default()
        };
        let conf = format!(
            r#"{{"cniVersion":"1.0.0","name":"weft","type":"weft-cni","agentSocket":"{}"}}"#,
            dir.path().join("absent.sock").display()
        );
        let error = run(&add, &conf).expect_err("no agent");
        assert_eq!(error.code, code::TRY_AGAIN_LATER);
    }
}
