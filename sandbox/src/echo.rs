//! The workload every sandbox pod runs on its declared container ports: on TCP, an HTTP request
//! gets an answer saying which pod, node and cluster answered (and who asked), anything else is
//! echoed; UDP datagrams are echoed.

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
use tokio::net::{TcpListener, TcpStream, UdpSocket};

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
            tasks.push(tokio::spawn(serve_tcp(listener, Arc::clone(&identity))));
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

/// Request methods that mark a connection as HTTP.
const HTTP_METHODS: &[&[u8]] = &[
    b"GET ",
    b"HEAD ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"OPTIONS ",
    b"PATCH ",
];

/// Every TCP port speaks both: a connection that opens with an HTTP request gets an HTTP
/// answer, anything else is echoed.
async fn serve_tcp(listener: TcpListener, identity: Arc<Identity>) {
    loop {
        let Ok((stream, client)) = listener.accept().await else {
            continue;
        };
        let identity = Arc::clone(&identity);
        tokio::spawn(async move {
            if opens_with_http(&stream).await {
                answer_http(stream, client, identity).await;
            } else {
                echo(stream).await;
            }
        });
    }
}

/// Looks at the first bytes without consuming them; waits briefly while they could still be
/// the start of a method.
async fn opens_with_http(stream: &TcpStream) -> bool {
    let mut head = [0u8; 8];
    for _ in 0..10 {
        let Ok(seen) = stream.peek(&mut head).await else {
            return false;
        };
        let head = &head[..seen];
        if HTTP_METHODS.iter().any(|method| head.starts_with(method)) {
            return true;
        }
        let could_become = HTTP_METHODS
            .iter()
            .any(|method| seen < method.len() && method.starts_with(head));
        if seen == 0 || !could_become {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    false
}

async fn answer_http(stream: TcpStream, client: SocketAddr, identity: Arc<Identity>) {
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
}

async fn echo(mut stream: TcpStream) {
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
}

async fn echo_udp(socket: UdpSocket) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if let Ok((read, peer)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..read], peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn start(ports: Vec<u16>) {
        let identity = Identity {
            pod: "web".into(),
            namespace: "shop".into(),
            node: "n1".into(),
            cluster: "c1".into(),
        };
        let ports = ports
            .into_iter()
            .map(|port| PodPort {
                port,
                protocol: "TCP".into(),
                name: None,
                host_port: None,
                host_ip: None,
            })
            .collect();
        tokio::spawn(serve(identity, ports, None));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    #[tokio::test]
    async fn one_tcp_port_answers_http_and_echoes_anything_else() {
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            probe.local_addr().expect("addr").port()
        };
        start(vec![port]).await;

        let mut http = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        http.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut answer = String::new();
        http.read_to_string(&mut answer).await.expect("read");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("\"pod\":\"web\"") && answer.contains("\"cluster\":\"c1\""),
            "{answer}"
        );

        let mut raw = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        raw.write_all(b"hello").await.expect("send");
        let mut echoed = [0u8; 5];
        raw.read_exact(&mut echoed).await.expect("echo");
        assert_eq!(&echoed, b"hello");

        // A message that starts like a method but is not one is echoed too.
        let mut tricky = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        tricky.write_all(b"GEX").await.expect("send");
        let mut back = [0u8; 3];
        tricky.read_exact(&mut back).await.expect("echo");
        assert_eq!(&back, b"GEX");
    }
}
