//! The workload every sandbox pod runs on its declared container ports: HTTP answers say which
//! pod, node and cluster answered (and who asked); other TCP ports and UDP ports echo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::service::service_fn;
use hyper::Response;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};

use crate::manifests::PodPort;

/// Who answered, as the HTTP body says it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub pod: String,
    pub namespace: String,
    pub node: String,
    pub cluster: String,
}

/// An HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EchoReply {
    #[serde(flatten)]
    pub identity: Identity,
    /// The client's address as the pod saw it.
    pub client: String,
}

/// Serves every port until the process ends; fails if a port cannot be bound. Once every port
/// is bound, `ready_file` is created, so whoever started the server knows it can take traffic.
pub async fn serve(
    identity: Identity,
    ports: Vec<PodPort>,
    ready_file: Option<std::path::PathBuf>,
) -> std::io::Result<()> {
    let identity = Arc::new(identity);
    let mut tasks = Vec::new();
    for port in ports {
        let address = SocketAddr::from(([0, 0, 0, 0], port.port));
        if port.protocol == "UDP" {
            let socket = UdpSocket::bind(address).await?;
            tasks.push(tokio::spawn(echo_udp(socket)));
        } else {
            let listener = TcpListener::bind(address).await?;
            if port.is_http() {
                tasks.push(tokio::spawn(serve_http(listener, Arc::clone(&identity))));
            } else {
                tasks.push(tokio::spawn(echo_tcp(listener)));
            }
        }
    }
    if let Some(path) = ready_file {
        std::fs::write(path, b"ready\n")?;
    }
    for task in tasks {
        let _ = task.await;
    }
    Ok(())
}

async fn serve_http(listener: TcpListener, identity: Arc<Identity>) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            continue;
        };
        let identity = Arc::clone(&identity);
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let reply = EchoReply {
                    identity: (*identity).clone(),
                    client: client.to_string(),
                };
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn echo_tcp(listener: TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(read) => {
                        if stream.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
}

async fn echo_udp(socket: UdpSocket) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if let Ok((read, peer)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..read], peer).await;
        }
    }
}
