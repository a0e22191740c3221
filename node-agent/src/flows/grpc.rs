//! The Observe API: the agent's flows over gRPC on a Unix socket.

use std::pin::Pin;
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use weft_api::observer::observer_server::{Observer, ObserverServer};
use weft_api::observer::{Flow, GetFlowsRequest};

use crate::flows::filter::matches;
use crate::flows::store::FlowStore;

/// How many buffered flows a request gets when it does not say.
pub const DEFAULT_NUMBER: usize = 20;

pub struct ObserverService {
    store: Arc<FlowStore>,
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<Flow, Status>> + Send>>;

#[tonic::async_trait]
impl Observer for ObserverService {
    type GetFlowsStream = FlowStream;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let request = request.into_inner();
        let filter = request.filter.unwrap_or_default();
        let number = match usize::try_from(request.number) {
            Ok(0) | Err(_) => DEFAULT_NUMBER,
            Ok(number) => number,
        };
        // Subscribe before reading the buffer, so no flow falls between the two.
        let mut follower = request.follow.then(|| self.store.follow());
        let backlog = self.store.last(number, &filter);
        let (sender, receiver) = mpsc::channel(256);
        tokio::spawn(async move {
            for flow in backlog {
                if sender.send(Ok(flow)).await.is_err() {
                    return;
                }
            }
            let Some(follower) = follower.as_mut() else {
                return;
            };
            loop {
                match follower.recv().await {
                    Ok(flow) if matches(&filter, &flow) => {
                        if sender.send(Ok(flow)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "an Observe client fell behind; flows were skipped");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

pub async fn serve(
    listener: UnixListener,
    store: Arc<FlowStore>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ObserverServer::new(ObserverService { store }))
        .serve_with_incoming(UnixListenerStream::new(listener))
        .await
}
