//! Kubernetes objects read from a cluster's manifest files: Namespaces and Pods drive the
//! sandbox; other kinds (Services, Weft CRDs) are kept for the components that use them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        path: PathBuf,
        source: Box<serde_saphyr::Error>,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A container port the pod's echo server listens on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPort {
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub name: Option<String>,
    /// `hostPort`: the port also taken on the pod's node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// `hostIP`: the node address the host port is on; every address when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<std::net::Ipv4Addr>,
}

/// What the sandbox needs of a Pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxPod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub ports: Vec<PodPort>,
}

#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Namespace → its labels (they are part of its pods' identities).
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub pods: Vec<SandboxPod>,
    /// Every other object, as read (Services, policies, …).
    pub others: Vec<Value>,
}

impl Manifests {
    /// Reads files, and `*.yaml`/`*.yml` files of directories (sorted, not recursive).
    pub fn read(paths: &[PathBuf]) -> Result<Self, ManifestError> {
        let mut manifests = Self::default();
        for path in paths {
            for file in files(path)? {
                manifests.add_file(&file)?;
            }
        }
        Ok(manifests)
    }

    pub fn add_file(&mut self, path: &Path) -> Result<(), ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        // The parser's default budget (1,024 documents, 250,000 nodes) guards against hostile
        // input; these are the user's own files, and a file of thousands of Services is a
        // fair test of a load balancer.
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_documents: 200_000,
                max_nodes: 20_000_000,
            },
        };
        let documents: Vec<Value> = serde_saphyr::from_multiple_with_options(&text, options)
            .map_err(|source| ManifestError::Yaml {
                path: path.to_owned(),
                source: Box::new(source),
            })?;
        for document in documents.into_iter().filter(|doc| !doc.is_null()) {
            self.add(document)
                .map_err(|message| ManifestError::Invalid {
                    path: path.to_owned(),
                    message,
                })?;
        }
        Ok(())
    }

    fn add(&mut self, document: Value) -> Result<(), String> {
        match document.get("kind").and_then(Value::as_str) {
            Some("Namespace") => {
                let name = document
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .ok_or("a Namespace needs metadata.name")?;
                let labels = document
                    .pointer("/metadata/labels")
                    .cloned()
                    .map(serde_json::from_value::<BTreeMap<String, String>>)
                    .transpose()
                    .map_err(|e| format!("namespace {name}: labels must be strings: {e}"))?
                    .unwrap_or_default();
                self.namespaces.insert(name.to_owned(), labels);
            }
            Some("Pod") => self.pods.push(sandbox_pod(document)?),
            Some(_) => self.others.push(document),
            None => return Err("an object without kind".into()),
        }
        Ok(())
    }
}

fn sandbox_pod(document: Value) -> Result<SandboxPod, String> {
    let pod: Pod = serde_json::from_value(document).map_err(|e| format!("not a valid Pod: {e}"))?;
    let name = pod
        .metadata
        .name
        .clone()
        .ok_or("a Pod needs metadata.name")?;
    let spec = pod.spec.ok_or_else(|| format!("pod {name} has no spec"))?;
    let node = spec.node_name.clone().ok_or_else(|| {
        format!("pod {name} has no spec.nodeName: the sandbox has no scheduler, so say which node runs it")
    })?;
    let ports =
        spec.containers
            .iter()
            .flat_map(|container| container.ports.iter().flatten())
            .map(|port| {
                let number = u16::try_from(port.container_port)
                    .ok()
                    .filter(|number| *number > 0)
                    .ok_or_else(|| {
                        format!(
                            "pod {name}: containerPort {} is out of range",
                            port.container_port
                        )
                    })?;
                let host_port = match port.host_port {
                    None | Some(0) => None,
                    Some(host_port) => Some(u16::try_from(host_port).map_err(|_| {
                        format!("pod {name}: hostPort {host_port} is out of range")
                    })?),
                };
                let host_ip =
                    match port.host_ip.as_deref() {
                        None | Some("") | Some("0.0.0.0") => None,
                        Some(ip) => Some(ip.parse().map_err(|_| {
                            format!("pod {name}: hostIP {ip} is not an IPv4 address")
                        })?),
                    };
                Ok(PodPort {
                    port: number,
                    protocol: port.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    name: port.name.clone(),
                    host_port,
                    host_ip,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
    Ok(SandboxPod {
        namespace: pod.metadata.namespace.unwrap_or_else(|| "default".into()),
        name,
        node,
        labels: pod.metadata.labels.unwrap_or_default(),
        ports,
    })
}

fn files(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    if !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|file| {
            matches!(
                file.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            )
        })
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_namespaces_and_other_kinds_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("app.yaml");
        std::fs::write(
            &file,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: retail}}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: {app: web}\nspec:\n  nodeName: n1\n  containers:\n  - name: web\n    image: weft/echo\n    ports:\n    - {name: http, containerPort: 8080}\n    - {containerPort: 5353, protocol: UDP}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {ports: [{port: 80}]}\n",
        )
        .expect("write");
        let manifests = Manifests::read(&[dir.path().to_owned()]).expect("read");
        assert_eq!(
            manifests
                .namespaces
                .get("shop")
                .and_then(|labels| labels.get("team")),
            Some(&"retail".to_owned())
        );
        assert_eq!(manifests.others.len(), 1);
        let pod = &manifests.pods[0];
        assert_eq!(
            (pod.namespace.as_str(), pod.name.as_str(), pod.node.as_str()),
            ("shop", "web", "n1")
        );
        assert_eq!(pod.ports[0].name.as_deref(), Some("http"));
        assert_eq!(pod.ports[1].protocol, "UDP");
    }

    #[test]
    fn a_pod_without_a_node_is_refused_with_the_reason() {
        let mut manifests = Manifests::default();
        let pod: Value = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "lost"},
            "spec": {"containers": [{"name": "c"}]}
        });
        let error = manifests.add(pod).expect_err("no node");
        assert!(error.contains("spec.nodeName"), "{error}");
    }
}
