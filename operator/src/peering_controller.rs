//! Reconciles `ClusterPeering`: checks the peering's TLS Secret before anything connects with
//! it, and writes the status (kstatus conditions, see [`crate::conditions`], plus `Connected`)
//! only when it changed. A Secret that changes re-checks the peerings naming it.
//!
//! What a valid peering Secret holds (keys of `spec.tlsSecretRef`, in the peering's namespace
//! or else Weft's own):
//!
//! - `ca.crt`: PEM certificates, the CA bundle the remote clustermesh-apiserver's certificate
//!   must chain to. Weft's mesh uses one CA for the whole mesh (as Cilium's does), so this
//!   bundle must also contain the issuer of `tls.crt`: with a CA per cluster, put both CAs in
//!   the bundle.
//! - `tls.crt`: PEM, this cluster's client certificate first, then any intermediates. It must
//!   chain to `ca.crt`, allow client authentication (extended key usage `clientAuth`, if the
//!   extension is present), be valid now, and **name this cluster as `remote-<cluster name>`**
//!   in its subject common name or in a DNS subject alternative name. That is the name Weft's
//!   chart issues (`clustermesh-remote-cert`) and the CRD documents; one fixed form, so that a
//!   name can never mean two clusters (a bare `<name>` could collide with a cluster called
//!   `remote-<name>`).
//! - `tls.key`: PEM, the private key of `tls.crt` (PKCS#8, PKCS#1 or SEC1).
//!
//! Each failure is `Valid=False` with a reason (`SecretNotFound`, `SecretNotReadable`,
//! `BadCABundle`, `BadCertificate`, `BadPrivateKey`, `CertificateExpired`,
//! `CertificateNotYetValid`, `WrongClusterName`, `UntrustedCertificate`) and a message saying
//! what to do. The connection to the peer is not implemented yet: a valid peering is
//! `Ready=True` with `Connected=Unknown` (reason `NotImplemented`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use k8s_openapi::ByteString;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use weft_core::cluster::ClusterName;
use weft_crds::peering::ClusterPeeringStatus;
use weft_crds::ClusterPeering;
use x509_parser::extensions::GeneralName;

use crate::conditions::{self, ErrorBackoff, Extra, Finding, Outcome, Status, REPORTER};
use crate::metrics::ReconcileMetrics;

const KIND: &str = "ClusterPeering";
/// Re-check peerings this often even without events; sooner when a certificate expires or
/// becomes valid before then.
const RESYNC: Duration = Duration::from_secs(300);
/// The condition a later release sets from the mesh connection.
pub const CONDITION_CONNECTED: &str = "Connected";

/// The keys of a peering Secret.
pub const CA_KEY: &str = "ca.crt";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";

/// The name this cluster's client certificate must carry, in its CN or a DNS SAN.
pub fn client_certificate_name(cluster: &ClusterName) -> String {
    format!("remote-{}", cluster.as_str())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {secret} for ClusterPeering {peering}: {source}")]
    ReadSecret {
        peering: String,
        /// `namespace/name`.
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("writing the status of ClusterPeering {name}: {source}")]
    WriteStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// What the peering controller needs to know about the cluster it runs in.
#[derive(Clone, Debug)]
pub struct PeeringSettings {
    /// This cluster's name (`--cluster-name`): client certificates must name it.
    pub cluster_name: ClusterName,
    /// The namespace Weft runs in (`POD_NAMESPACE`): where Secrets are looked up when a
    /// peering's `tlsSecretRef` names no namespace, and the only namespace whose Secrets are
    /// watched (the chart grants Secret access there only).
    pub namespace: String,
}

/// What every reconcile needs.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub backoff: ErrorBackoff,
    pub settings: PeeringSettings,
    crypto: Arc<CryptoProvider>,
}

impl Context {
    pub fn new(client: Client, settings: PeeringSettings) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), REPORTER.into()),
            client,
            backoff: ErrorBackoff::default(),
            settings,
            crypto: Arc::new(rustls::crypto::ring::default_provider()),
        }
    }
}

/// The Secret a peering names: `(namespace, name)`.
pub fn secret_of(peering: &ClusterPeering, weft_namespace: &str) -> (String, String) {
    let reference = &peering.spec.tls_secret_ref;
    (
        reference
            .namespace
            .clone()
            .unwrap_or_else(|| weft_namespace.to_owned()),
        reference.name.clone(),
    )
}

/// The peerings that name `secret`, for re-checking them when it changes.
pub fn peerings_using(
    peerings: &Store<ClusterPeering>,
    secret: &Secret,
    weft_namespace: &str,
) -> Vec<ObjectRef<ClusterPeering>> {
    let key = (
        secret
            .namespace()
            .unwrap_or_else(|| weft_namespace.to_owned()),
        secret.name_any(),
    );
    peerings
        .state()
        .iter()
        .filter(|peering| secret_of(peering, weft_namespace) == key)
        .map(|peering| ObjectRef::from_obj(peering.as_ref()))
        .collect()
}

/// The result of checking a peering Secret's TLS material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsCheck {
    /// `Ok` when everything holds, else the first failure found.
    pub verdict: Result<(), Finding>,
    /// When the verdict changes by itself (the client certificate becomes valid or expires),
    /// in Unix seconds, if the certificate was read that far.
    pub changes_at: Option<u64>,
}

fn rfc3339(seconds: i64) -> String {
    Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| format!("{seconds} s after 1970"))
}

/// PEM certificates under `key`, each parsed as X.509; `reason` for any failure.
fn pem_certificates(
    data: &BTreeMap<String, ByteString>,
    key: &str,
    reason: &str,
    what: &str,
) -> Result<Vec<CertificateDer<'static>>, Finding> {
    let bytes = data.get(key).map(|b| b.0.as_slice()).ok_or_else(|| {
        Finding::new(
            reason,
            format!("the Secret has no {key}: put {what} there, PEM-encoded"),
        )
    })?;
    let certificates = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            Finding::new(
                reason,
                format!("{key} is not valid PEM ({error}): put {what} there, PEM-encoded"),
            )
        })?;
    if certificates.is_empty() {
        return Err(Finding::new(
            reason,
            format!(
                "{key} holds no PEM certificate (-----BEGIN CERTIFICATE-----): put {what} there"
            ),
        ));
    }
    for (index, certificate) in certificates.iter().enumerate() {
        if let Err(error) = x509_parser::parse_x509_certificate(certificate.as_ref()) {
            return Err(Finding::new(
                reason,
                format!(
                    "certificate {} in {key} is not a valid X.509 certificate ({error}): put {what} there",
                    index + 1
                ),
            ));
        }
    }
    Ok(certificates)
}

/// Checks a peering Secret's data at `now` (Unix seconds) for the cluster `cluster`; see the
/// module documentation for the rules.
pub fn check_tls(
    data: &BTreeMap<String, ByteString>,
    cluster: &ClusterName,
    now: u64,
    crypto: &Arc<CryptoProvider>,
) -> TlsCheck {
    let mut changes_at = None;
    let verdict = check_tls_inner(data, cluster, now, crypto, &mut changes_at);
    TlsCheck {
        verdict,
        changes_at,
    }
}

fn check_tls_inner(
    data: &BTreeMap<String, ByteString>,
    cluster: &ClusterName,
    now: u64,
    crypto: &Arc<CryptoProvider>,
    changes_at: &mut Option<u64>,
) -> Result<(), Finding> {
    let cas = pem_certificates(
        data,
        CA_KEY,
        "BadCABundle",
        "the CA bundle of the mesh (the remote cluster's CA)",
    )?;
    let mut roots = RootCertStore::empty();
    for (index, ca) in cas.iter().enumerate() {
        roots.add(ca.clone()).map_err(|error| {
            Finding::new(
                "BadCABundle",
                format!(
                    "certificate {} in {CA_KEY} cannot be a trust anchor ({error})",
                    index + 1
                ),
            )
        })?;
    }
    let chain = pem_certificates(
        data,
        CERT_KEY,
        "BadCertificate",
        "this cluster's client certificate (then any intermediates)",
    )?;
    let key_bytes = data.get(KEY_KEY).map(|b| b.0.as_slice()).ok_or_else(|| {
        Finding::new(
            "BadPrivateKey",
            format!(
                "the Secret has no {KEY_KEY}: put the private key of {CERT_KEY} there, PEM-encoded"
            ),
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(key_bytes).map_err(|error| {
        Finding::new(
            "BadPrivateKey",
            format!("{KEY_KEY} holds no PEM private key ({error}): put the private key of {CERT_KEY} there (PKCS#8, PKCS#1 or SEC1)"),
        )
    })?;
    CertifiedKey::from_der(chain.clone(), key, crypto).map_err(|error| {
        let message = match error {
            rustls::Error::InconsistentKeys(_) => format!(
                "{KEY_KEY} is not the private key of {CERT_KEY}: store the key the certificate was issued for"
            ),
            other => format!("{KEY_KEY} cannot be used ({other}): use an RSA, ECDSA or Ed25519 key"),
        };
        Finding::new("BadPrivateKey", message)
    })?;

    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref())
        .map_err(|error| Finding::new("BadCertificate", format!("{CERT_KEY}: {error}")))?;
    let validity = leaf.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    let now_signed = i64::try_from(now).unwrap_or(i64::MAX);
    if now_signed < not_before {
        *changes_at = u64::try_from(not_before).ok();
        return Err(Finding::new(
            "CertificateNotYetValid",
            format!(
                "{CERT_KEY} is valid only from {}: check the issuing machine's clock, or wait",
                rfc3339(not_before)
            ),
        ));
    }
    if now_signed > not_after {
        return Err(Finding::new(
            "CertificateExpired",
            format!(
                "{CERT_KEY} expired at {}: issue a new client certificate for {} and update the Secret",
                rfc3339(not_after),
                client_certificate_name(cluster)
            ),
        ));
    }
    *changes_at = u64::try_from(not_after).ok().map(|t| t.saturating_add(1));

    let expected = client_certificate_name(cluster);
    let mut names: Vec<String> = leaf
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        names.extend(
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                }),
        );
    }
    if !names.contains(&expected) {
        let presented = if names.is_empty() {
            "no name".to_owned()
        } else {
            names
                .iter()
                .map(|name| format!("{name:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(Finding::new(
            "WrongClusterName",
            format!(
                "{CERT_KEY} names {presented}, but this cluster is {:?}: its client certificate \
                 must name {expected:?} in its common name or a DNS subject alternative name",
                cluster.as_str()
            ),
        ));
    }

    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto.clone())
        .build()
        .map_err(|error| Finding::new("BadCABundle", format!("{CA_KEY}: {error}")))?;
    verifier
        .verify_client_cert(
            &chain[0],
            &chain[1..],
            UnixTime::since_unix_epoch(Duration::from_secs(now)),
        )
        .map_err(|error| match error {
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => Finding::new(
                "UntrustedCertificate",
                format!(
                    "{CERT_KEY} is not issued by a CA in {CA_KEY}: peers verify it against the \
                     mesh CA, so issue it from that CA or add its issuer to {CA_KEY}"
                ),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => Finding::new(
                "CertificateExpired",
                format!("a certificate in the chain of {CERT_KEY} has expired: renew it"),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => Finding::new(
                "CertificateNotYetValid",
                format!("a certificate in the chain of {CERT_KEY} is not valid yet"),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. },
            ) => Finding::new(
                "BadCertificate",
                format!(
                    "{CERT_KEY} may not be used for client authentication: issue it with the \
                     extended key usage clientAuth"
                ),
            ),
            other => Finding::new(
                "UntrustedCertificate",
                format!("{CERT_KEY} does not verify against {CA_KEY}: {other}"),
            ),
        })?;
    Ok(())
}

/// The conditions' inputs for a peering, from the verdict on its Secret.
pub fn outcome(verdict: &Result<(), Finding>) -> Outcome {
    match verdict {
        Ok(()) => Outcome::Ready {
            valid: "the peering and its TLS Secret are valid".into(),
            ready: Finding::new(
                "Accepted",
                "the peering's configuration is valid; the Connected condition reports the connection",
            ),
        },
        Err(invalid) => Outcome::Invalid {
            not_ready: format!("the peering cannot be used: {}", invalid.message),
            invalid: invalid.clone(),
        },
    }
}

/// `Connected`, until the mesh connection exists.
pub fn connected() -> Extra {
    Extra {
        type_: CONDITION_CONNECTED.into(),
        status: Status::Unknown,
        finding: Finding::new(
            "NotImplemented",
            "connecting to peer clusters is not implemented in this release",
        ),
    }
}

pub async fn reconcile(peering: Arc<ClusterPeering>, ctx: Arc<Context>) -> Result<Action, Error> {
    let name = peering.name_any();
    let (namespace, secret_name) = secret_of(&peering, &ctx.settings.namespace);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let now = UnixTime::now().as_secs();
    let check = match secrets.get_opt(&secret_name).await {
        Ok(Some(secret)) => {
            let check = check_tls(
                &secret.data.unwrap_or_default(),
                &ctx.settings.cluster_name,
                now,
                &ctx.crypto,
            );
            TlsCheck {
                verdict: check.verdict.map_err(|finding| {
                    Finding::new(
                        finding.reason,
                        format!("Secret {namespace}/{secret_name}: {}", finding.message),
                    )
                }),
                ..check
            }
        }
        Ok(None) => TlsCheck {
            verdict: Err(Finding::new(
                "SecretNotFound",
                format!(
                    "Secret {namespace}/{secret_name} does not exist: create it with {CA_KEY}, \
                     {CERT_KEY} and {KEY_KEY}"
                ),
            )),
            changes_at: None,
        },
        Err(kube::Error::Api(status)) if status.is_forbidden() => TlsCheck {
            verdict: Err(Finding::new(
                "SecretNotReadable",
                format!(
                    "the operator may not read Secret {namespace}/{secret_name}: keep peering \
                     Secrets in Weft's namespace {:?}, or grant the operator get on Secrets in {namespace:?}",
                    ctx.settings.namespace
                ),
            )),
            changes_at: None,
        },
        Err(source) => {
            return Err(Error::ReadSecret {
                peering: name,
                secret: format!("{namespace}/{secret_name}"),
                source,
            })
        }
    };
    let generation = peering.meta().generation;
    let outcome = outcome(&check.verdict);
    let current = peering.status.clone().unwrap_or_default();
    let api: Api<ClusterPeering> = Api::all(ctx.client.clone());
    let wrote = conditions::update_status(
        &api,
        &name,
        KIND,
        generation,
        (current.observed_generation, &current.conditions),
        &outcome,
        &[connected()],
        |observed_generation, conditions| ClusterPeeringStatus {
            observed_generation,
            conditions,
            ..ClusterPeeringStatus::default()
        },
    )
    .await
    .map_err(|source| Error::WriteStatus {
        name: name.clone(),
        source,
    })?;
    if wrote {
        conditions::warn_if_invalid(&ctx.recorder, &peering.object_ref(&()), KIND, &outcome).await;
    }
    ctx.backoff.succeeded(&ErrorBackoff::key(peering.as_ref()));
    let next = check
        .changes_at
        .map(|at| Duration::from_secs(at.saturating_sub(now).max(1)))
        .map_or(RESYNC, |until| until.min(RESYNC));
    Ok(Action::requeue(next))
}

pub fn error_policy(peering: Arc<ClusterPeering>, error: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.backoff.failed(&ErrorBackoff::key(peering.as_ref()));
    tracing::warn!(%error, retry_in = ?delay, "ClusterPeering reconcile failed");
    Action::requeue(delay)
}

/// Runs the ClusterPeering controller until the process stops.
///
/// `settings`: this cluster's name and the namespace Weft runs in (see [`PeeringSettings`]).
///
/// RBAC: `clusterpeerings` list, watch; `clusterpeerings/status` patch; `secrets` get,
/// list, watch in Weft's namespace (a Role; get also wherever a peering keeps its Secret);
/// `events` (`events.k8s.io`) create, patch.
pub async fn run(client: Client, settings: PeeringSettings, metrics: ReconcileMetrics) {
    let namespace = settings.namespace.clone();
    let ctx = Arc::new(Context::new(client.clone(), settings));
    let controller = Controller::new(
        Api::<ClusterPeering>::all(client.clone()),
        watcher::Config::default(),
    );
    let peerings = controller.store();
    controller
        .watches(
            Api::<Secret>::namespaced(client, &namespace),
            watcher::Config::default(),
            move |secret| peerings_using(&peerings, &secret, &namespace),
        )
        .run(
            metrics.instrument("clusterpeering", reconcile),
            error_policy,
            ctx,
        )
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "ClusterPeering reconcile");
            }
        })
        .await;
}
