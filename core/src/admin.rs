//! The admin endpoint every Weft daemon serves on its own port, apart from its data and API
//! ports (as ztunnel does): `/healthz` (the process is alive), `/readyz` (it has finished
//! starting and may take work) and `/metrics` (Prometheus text format).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::CONTENT_TYPE;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Whether the component may take work; flipped once its start-up (cache sync, map adoption)
/// is done, and back when it loses what it needs (e.g. leadership).
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on admin address {addr}: {source}; pick a free port with --admin-addr")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct AdminServer {
    listener: TcpListener,
    readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
}

impl AdminServer {
    /// Binds now, so a port conflict fails start-up instead of surfacing later.
    pub async fn bind(
        addr: SocketAddr,
        readiness: Readiness,
        registry: Arc<Mutex<Registry>>,
    ) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { addr, source })?;
        Ok(Self {
            listener,
            readiness,
            registry,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped or aborted.
    pub async fn serve(self) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin endpoint failed to accept a connection");
                    continue;
                }
            };
            let readiness = self.readiness.clone();
            let registry = Arc::clone(&self.registry);
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let response = respond(&request, &readiness, &registry);
                    async move { Ok::<_, Infallible>(response) }
                });
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(%error, %peer, "admin connection ended with an error");
                }
            });
        }
    }
}

fn respond(
    request: &Request<Incoming>,
    readiness: &Readiness,
    registry: &Mutex<Registry>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET is served here\n");
    }
    match request.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" if readiness.is_ready() => text(StatusCode::OK, "ready\n"),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/metrics" => {
            let mut body = String::new();
            let encoded = match registry.lock() {
                Ok(registry) => prometheus_client::encoding::text::encode(&mut body, &registry),
                // A panic while registering metrics must not take the health endpoint down.
                Err(poisoned) => {
                    prometheus_client::encoding::text::encode(&mut body, &poisoned.into_inner())
                }
            };
            match encoded {
                Ok(()) => Response::builder()
                    .header(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "encoding\n")),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "metrics could not be encoded\n",
                ),
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /healthz, /readyz or /metrics\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn health_readiness_and_metrics_answer_as_a_probe_expects() {
        let readiness = Readiness::default();
        let mut registry = Registry::default();
        let reconciles = Counter::<u64>::default();
        registry.register("reconciles", "Reconciliations run", reconciles.clone());
        reconciles.inc_by(3);
        let server = AdminServer::bind(
            "127.0.0.1:0".parse().expect("addr"),
            readiness.clone(),
            Arc::new(Mutex::new(registry)),
        )
        .await
        .expect("bind");
        let addr = server.local_addr().expect("local addr");
        let task = tokio::spawn(server.serve());

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        readiness.set_ready(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.contains("reconciles_total 3"), "{metrics}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        task.abort();
    }

    #[tokio::test]
    async fn a_taken_port_is_a_clear_error() {
        let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = first.local_addr().expect("addr");
        let error = AdminServer::bind(addr, Readiness::default(), Default::default())
            .await
            .err()
            .expect("second bind must fail")
            .to_string();
        assert!(error.contains("--admin-addr"), "{error}");
    }
}
