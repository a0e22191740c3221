//! A scripted API server for the operator's Kubernetes edge tests (the ApiServerVerifier shape
//! of kube-rs's controller-rs): a `tower_test` mock behind a real `kube::Client`. Each test takes
//! the requests one by one, asserts method, path, query and body, and answers as the API server
//! would (status codes, `Status` bodies with reasons, resourceVersions).

#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

/// A client talking to the scripted server, and the server.
pub fn mock_client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

pub struct ApiServer {
    handle: Handle,
}

/// One request as the server received it.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: Option<String>,
    /// The JSON body (`Null` without one).
    pub body: Value,
    send: Send,
}

impl ApiServer {
    /// The next request; fails the test if none comes within 10 s.
    pub async fn next(&mut self) -> Call {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .expect("a request within 10 s")
                .expect("the client is still there");
        Call::read(request, send).await
    }

    /// The next request if one comes within `wait` and the client is still there.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Call> {
        match tokio::time::timeout(wait, self.handle.next_request()).await {
            Ok(Some((request, send))) => Some(Call::read(request, send).await),
            Err(_) | Ok(None) => None,
        }
    }

    /// The next request, which must be `method` on `path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected request {} {}?{} {}",
            call.method,
            call.path,
            call.query,
            call.body
        );
        call
    }

    /// Asserts that no request arrives within `wait` (or that the client is gone).
    pub async fn expect_nothing(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.handle.next_request()).await {
            Err(_) | Ok(None) => {}
            Ok(Some((request, _))) => {
                panic!("unexpected request {} {}", request.method(), request.uri())
            }
        }
    }
}

impl Call {
    async fn read(request: Request<Body>, send: Send) -> Self {
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let query = request.uri().query().unwrap_or_default().to_owned();
        let content_type = request
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON request body")
        };
        Call {
            method,
            path,
            query,
            content_type,
            body,
            send,
        }
    }

    /// A query parameter's value.
    pub fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == key).then(|| v.to_owned())
        })
    }

    pub fn respond(self, status: u16, body: Value) {
        self.respond_bytes(status, serde_json::to_vec(&body).expect("json"));
    }

    pub fn respond_bytes(self, status: u16, body: Vec<u8>) {
        self.send.send_response(
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .expect("response"),
        );
    }

    /// Answers with a `Status` failure, as the API server does.
    pub fn fail(self, code: u16, reason: &str, message: &str) {
        self.respond(code, status(code, reason, message));
    }
}

/// A `Status` object.
pub fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": if code < 300 { "Success" } else { "Failure" },
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// `object` as the API server stores it: with uid, resourceVersion and creation time.
pub fn stored(mut object: Value, uid: &str, resource_version: &str) -> Value {
    object["metadata"]["uid"] = json!(uid);
    object["metadata"]["resourceVersion"] = json!(resource_version);
    object["metadata"]["creationTimestamp"] = json!("2026-11-02T10:00:00Z");
    object
}
