//! Local mode's source: the `weft.state.v1.AgentState` service on a Unix socket, through which
//! the sandbox sends this agent the changes to its tables (as the watches do in a cluster).
//! A request is applied as one step; a change that does not decode refuses the whole request
//! and changes nothing (the sender learns why and the state in force stays).

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use weft_api::state::agent_state_server::{AgentState, AgentStateServer};
use weft_api::state::{ApplyReply, ApplyRequest};
use weft_core::state::{Decoded, EncodedChange, TableName};

use crate::state::{ClusterState, LOCAL_SOURCE};

/// The largest request taken (tonic's default is 4 MiB).
const MAX_REQUEST: usize = 256 << 20;

pub struct LocalSource {
    state: ClusterState,
}

#[tonic::async_trait]
impl AgentState for LocalSource {
    async fn apply(&self, request: Request<ApplyRequest>) -> Result<Response<ApplyReply>, Status> {
        let request = request.into_inner();
        // Every change decodes before any applies: a bad one leaves the state as it was.
        let changes = request
            .changes
            .iter()
            .map(|change| {
                let table = TableName::parse(&change.table).ok_or_else(|| {
                    Status::invalid_argument(format!("no table {:?}", change.table))
                })?;
                Decoded::decode(&EncodedChange {
                    table,
                    key: change.key.clone(),
                    value: change.row.clone(),
                })
                .map_err(|error| {
                    tracing::warn!(%error, "refused changes from the local source; the state in force stays");
                    Status::invalid_argument(error.to_string())
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let (changed, revision) = self.state.change(|tables| {
            let changed = tables.apply(LOCAL_SOURCE, changes, request.complete);
            if request.synced {
                tables.mark_synced(LOCAL_SOURCE);
            }
            (changed as u64, tables.revision())
        });
        if changed > 0 {
            tracing::debug!(changed, revision, "state changed by the local source");
        }
        Ok(Response::new(ApplyReply { revision, changed }))
    }
}

/// Serves the local source on `listener` until the agent stops.
pub async fn serve(listener: UnixListener, state: ClusterState) {
    let served = tonic::transport::Server::builder()
        // A complete listing of a large cluster is one request.
        .add_service(
            AgentStateServer::new(LocalSource { state }).max_decoding_message_size(MAX_REQUEST),
        )
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the local state source stopped: the agent no longer learns of changes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::state::Change;
    use weft_core::state::EndpointMeta;

    fn upsert(ip: &str, identity: u32) -> Change {
        let row = EndpointMeta {
            ip: ip.parse().expect("ip"),
            identity,
            ..EndpointMeta::default()
        };
        let change = EncodedChange::upsert(&row);
        Change {
            table: change.table.as_str().to_owned(),
            key: change.key,
            row: change.value,
        }
    }

    #[tokio::test]
    async fn a_request_applies_whole_or_not_at_all_and_a_listing_marks_the_source_synced() {
        let state = ClusterState::new(vec![LOCAL_SOURCE.into()]);
        let source = LocalSource {
            state: state.clone(),
        };
        let reply = source
            .apply(Request::new(ApplyRequest {
                changes: vec![upsert("10.1.0.5", 300), upsert("10.1.0.6", 300)],
                complete: true,
                synced: true,
            }))
            .await
            .expect("applied")
            .into_inner();
        assert_eq!(reply.changed, 2);
        assert!(state.synced());

        // One bad row refuses the request: the good one before it is not applied either.
        let garbage = Change {
            table: "endpoints".into(),
            key: "10.1.0.7".into(),
            row: Some(b"{not json".to_vec()),
        };
        let refused = source
            .apply(Request::new(ApplyRequest {
                changes: vec![upsert("10.1.0.5", 999), garbage],
                complete: false,
                synced: false,
            }))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let unknown_table = Change {
            table: "secrets".into(),
            ..upsert("10.1.0.8", 1)
        };
        assert!(source
            .apply(Request::new(ApplyRequest {
                changes: vec![unknown_table],
                complete: false,
                synced: false,
            }))
            .await
            .is_err());
        let identity = state
            .read()
            .endpoints
            .get(&"10.1.0.5".parse().unwrap())
            .map(|row| row.identity);
        assert_eq!(identity, Some(300), "the state in force stays");

        // A row sent again as it is changes nothing.
        let reply = source
            .apply(Request::new(ApplyRequest {
                changes: vec![upsert("10.1.0.6", 300)],
                complete: false,
                synced: false,
            }))
            .await
            .expect("applied")
            .into_inner();
        assert_eq!(reply.changed, 0);
    }
}
