//! The agent's Unix socket for `weft-cni`: one JSON request per line, one JSON response per
//! line. Requests are served one at a time, in order, because they change one node's state.
//!
//! A registration (the last step of CNI ADD) is answered only once the pod's identity is
//! resolved and its policy is in the maps: until then the datapath holds the pod to what an
//! initialising endpoint may do, and a pod that ran before its policy would be unisolated.
//! The agent's lock is not held while it waits, so other pods and the sync loop go on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

use crate::cni::api::{Request, Response};
use crate::node::{NodeAgent, Readiness, CNI_INVALID, CNI_TRY_AGAIN_LATER};

/// How often a waiting registration looks again at the sources of identities and policy.
const READINESS_POLL: Duration = Duration::from_millis(25);

/// `ready_timeout`: how long a registration waits for its pod's identity and policy.
pub async fn serve(listener: UnixListener, agent: Arc<Mutex<NodeAgent>>, ready_timeout: Duration) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let agent = Arc::clone(&agent);
                tokio::spawn(async move {
                    if let Err(error) = answer(stream, agent, ready_timeout).await {
                        tracing::warn!(%error, "CNI connection failed");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "cannot accept a CNI connection"),
        }
    }
}

async fn answer(
    stream: UnixStream,
    agent: Arc<Mutex<NodeAgent>>,
    ready_timeout: Duration,
) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut lines = BufReader::new(reader).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                let registering = match &request {
                    Request::Register(registration) => Some(registration.container_id.clone()),
                    _ => None,
                };
                let response = {
                    let mut agent = agent.lock().await;
                    // Netlink and bpf syscalls are quick but blocking; keep them off the reactor.
                    tokio::task::block_in_place(|| agent.handle(request))
                };
                match (registering, response) {
                    (Some(container_id), Response::Registered) => {
                        until_in_force(&agent, &container_id, ready_timeout).await
                    }
                    (_, response) => response,
                }
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

/// Answers a registration once its endpoint is in force, or undoes it and fails with the
/// reason after `timeout` ("try again later": the runtime retries ADD).
async fn until_in_force(
    agent: &Arc<Mutex<NodeAgent>>,
    container_id: &str,
    timeout: Duration,
) -> Response {
    let deadline = Instant::now() + timeout;
    loop {
        let mut agent = agent.lock().await;
        let waiting = match tokio::task::block_in_place(|| agent.endpoint_readiness(container_id)) {
            Ok(Readiness::InForce) => return Response::Registered,
            Ok(Readiness::Waiting(why)) => why,
            Err(error) => error.to_string(),
        };
        if Instant::now() >= deadline {
            tokio::task::block_in_place(|| agent.abandon(container_id));
            tracing::warn!(container_id, reason = %waiting, ?timeout, "endpoint never became ready; ADD fails");
            return Response::Error {
                code: CNI_TRY_AGAIN_LATER,
                message: format!(
                    "the pod's policy is not in place after {}: {waiting}",
                    humantime::format_duration(timeout)
                ),
            };
        }
        drop(agent);
        tokio::time::sleep(READINESS_POLL).await;
    }
}
