//! `healthCheckNodePort`s: for a LoadBalancer Service with `externalTrafficPolicy: Local`, every
//! node answers on that port whether it has a backend of the service, so the load balancer sends
//! traffic only to nodes that can serve it (as kube-proxy does, and with its answer: 200 and
//! the count of local endpoints, or 503 when there are none).
//!
//! The service engine publishes what each port should answer; a listener per port follows it.
//! Ports appear and go with their services; a port that cannot be bound is logged once and
//! tried again when the services change.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What one health-check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// Backends of the service on this node that take new connections.
    pub local_endpoints: usize,
}

/// Every health-check port of the node, by port.
pub type HealthChecks = BTreeMap<u16, HealthCheck>;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer<'a> {
    service: ServiceName<'a>,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

#[derive(Serialize)]
struct ServiceName<'a> {
    namespace: &'a str,
    name: &'a str,
}

/// The answer for `check`: kube-proxy's body and status.
fn answer(check: &HealthCheck) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(&Answer {
        service: ServiceName {
            namespace: &check.namespace,
            name: &check.name,
        },
        local_endpoints: check.local_endpoints,
        service_proxy_healthy: true,
    })
    .unwrap_or_default();
    let status = if check.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Serves the health-check ports that `desired` names, on every address of the node, until
/// the agent stops.
pub async fn serve(mut desired: watch::Receiver<HealthChecks>) {
    let mut listening: BTreeMap<u16, JoinHandle<()>> = BTreeMap::new();
    loop {
        let ports: Vec<u16> = desired.borrow_and_update().keys().copied().collect();
        listening.retain(|port, task| {
            let keep = ports.contains(port);
            if !keep {
                task.abort();
            }
            keep
        });
        for port in ports {
            if listening.contains_key(&port) {
                continue;
            }
            let address = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            match TcpListener::bind(address).await {
                Ok(listener) => {
                    tracing::info!(port, "serving a service's health check");
                    listening.insert(port, tokio::spawn(listen(listener, port, desired.clone())));
                }
                Err(error) => tracing::warn!(
                    port,
                    %error,
                    "cannot serve a service's health check port; load balancers will take this node for one without backends"
                ),
            }
        }
        if desired.changed().await.is_err() {
            break;
        }
    }
    for task in listening.into_values() {
        task.abort();
    }
}

async fn listen(listener: TcpListener, port: u16, desired: watch::Receiver<HealthChecks>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::debug!(port, %error, "health check port failed to accept");
                continue;
            }
        };
        let desired = desired.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let response = match desired.borrow().get(&port) {
                    Some(check) => answer(check),
                    None => {
                        let mut gone = Response::new(Full::new(Bytes::new()));
                        *gone.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                        gone
                    }
                };
                async move { Ok::<_, Infallible>(response) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response<Full<Bytes>>) -> serde_json::Value {
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        serde_json::from_slice(&bytes).expect("JSON")
    }

    #[tokio::test]
    async fn a_node_with_local_endpoints_answers_200_and_one_without_503() {
        let mut check = HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2,
        };
        let healthy = answer(&check);
        assert_eq!(healthy.status(), StatusCode::OK);
        assert_eq!(
            body(healthy).await,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        check.local_endpoints = 0;
        let empty = answer(&check);
        assert_eq!(empty.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body(empty).await["localEndpoints"], 0);
    }
}
