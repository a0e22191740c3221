//! The CRD manifests, generated from the Rust types.

use std::path::{Path, PathBuf};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{
    BandwidthClass, ClusterPeering, GlobalService, WeftClusterwideNetworkPolicy, WeftEndpoint,
    WeftIdentity, WeftNetworkPolicy,
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot render CRD {name} as YAML: {source}")]
    Render {
        name: String,
        source: serde_saphyr::SerializeError,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Every Weft CRD, in a fixed order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![
        WeftNetworkPolicy::crd(),
        WeftClusterwideNetworkPolicy::crd(),
        GlobalService::crd(),
        BandwidthClass::crd(),
        ClusterPeering::crd(),
        WeftIdentity::crd(),
        WeftEndpoint::crd(),
    ]
}

/// The file a CRD is written to: `<group>_<plural>.yaml`, as kubebuilder names them.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}_{}.yaml", crd.spec.group, crd.spec.names.plural)
}

const HEADER: &str =
    "# Generated from the Rust types in crds/src by `weftctl crds --out-dir`. Do not edit.\n";

/// One CRD as the YAML document written to its file.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, ManifestError> {
    let body = serde_saphyr::to_string(crd).map_err(|source| ManifestError::Render {
        name: crd.metadata.name.clone().unwrap_or_default(),
        source,
    })?;
    Ok(format!("{HEADER}{body}"))
}

/// All CRDs as one multi-document YAML stream, for `kubectl apply -f -`.
pub fn render_all() -> Result<String, ManifestError> {
    let documents = all().iter().map(render).collect::<Result<Vec<_>, _>>()?;
    Ok(documents.join("---\n"))
}

/// Writes one file per CRD into `dir` and returns the paths written.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    std::fs::create_dir_all(dir).map_err(|source| ManifestError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    for crd in all() {
        let path = dir.join(file_name(&crd));
        std::fs::write(&path, render(&crd)?).map_err(|source| ManifestError::Write {
            path: path.clone(),
            source,
        })?;
        written.push(path);
    }
    Ok(written)
}
