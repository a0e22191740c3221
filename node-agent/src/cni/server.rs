//! The agent's Unix socket for `weft-cni`: one JSON request per line, one JSON response per
//! line. Requests are served one at a time, in order, because they change one node's state.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::cni::api::{Request, Response};
use crate::node::{NodeAgent, CNI_INVALID};

pub async fn serve(listener: UnixListener, agent: Arc<Mutex<NodeAgent>>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = Arc::clone(&agent);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, agent).await {
                        tracing::warn!(%error, "CNI connection failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot accept a CNI connection"),
        }
    }
}

async fn answer(stream: UnixStream, agent: Arc<Mutex<NodeAgent>>) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let mut agent = agent.lock().await;
                // Netlink and bpf syscalls are quick but blocking; keep them off the reactor.
                tokio::task::block_in_place(|| agent.handle(request))
            }
            Err(error) => Response::Error {
                code: CNI_INVALID,
                message: format!("malformed request: {error}"),
            },
        };
        let mut encoded = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        encoded.push(b'\n');
        writer.write_all(&encoded).await?;
    }
    Ok(())
}
