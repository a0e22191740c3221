//! A scripted Kubernetes API server for the operator's tests (the ApiServerVerifier shape of
//! kube-rs's controller-rs): a `tower_test` mock behind a real `kube::Client`. Each test takes
//! the requests one by one, asserts method, path, query and body, and answers as the API server
//! would (status codes, `Status` bodies with reasons, resourceVersions, watch events).

#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type SendResponse = tower_test::mock::SendResponse<Response<Body>>;

/// A client whose every request arrives at the returned server.
pub fn client() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), ApiServer { handle })
}

/// The server side: hands out the client's requests in order.
pub struct ApiServer {
    handle: Handle,
}

/// One request as the server received it, waiting for its answer.
pub struct Exchange {
    pub method: Method,
    /// The whole URI as sent: path and query (`/apis/...?&force=true&fieldManager=...`).
    pub uri: String,
    pub path: String,
    /// The query without the `?` (empty without one).
    pub query: String,
    pub content_type: Option<String>,
    /// The JSON body, or `Null` when there is none.
    pub body: Value,
    send: SendResponse,
}

impl ApiServer {
    /// The next request; fails the test if none comes within 10 s.
    pub async fn next(&mut self) -> Exchange {
        let (request, send) =
            tokio::time::timeout(Duration::from_secs(10), self.handle.next_request())
                .await
                .expect("a request within 10 s")
                .expect("the client is still there");
        Exchange::read(request, send).await
    }

    /// The next request if one comes within `wait` and the client is still there.
    pub async fn next_within(&mut self, wait: Duration) -> Option<Exchange> {
        match tokio::time::timeout(wait, self.handle.next_request()).await {
            Ok(Some((request, send))) => Some(Exchange::read(request, send).await),
            Err(_) | Ok(None) => None,
        }
    }

    /// The next request, which must be `method` on `path` (the query is not compared).
    pub async fn expect(&mut self, method: Method, path: &str) -> Exchange {
        let exchange = self.next().await;
        assert_eq!(
            (&exchange.method, exchange.path.as_str()),
            (&method, path),
            "unexpected request {} {} {}",
            exchange.method,
            exchange.uri,
            exchange.body
        );
        exchange
    }

    /// Asserts that no request arrives within `wait` (or that the client is gone without
    /// sending one).
    pub async fn expect_nothing(&mut self, wait: Duration) {
        match tokio::time::timeout(wait, self.handle.next_request()).await {
            Err(_) | Ok(None) => {}
            Ok(Some((request, _))) => {
                panic!("unexpected request: {} {}", request.method(), request.uri())
            }
        }
    }

    /// Asserts that no request arrives within 200 ms (or that the client is gone).
    pub async fn no_more_requests(&mut self) {
        self.expect_nothing(Duration::from_millis(200)).await;
    }

    /// Answers an Event publication (events.k8s.io/v1) in `namespace` and returns the Event
    /// sent.
    pub async fn expect_event(&mut self, namespace: &str) -> Value {
        let exchange = self.next().await.expect_request(
            Method::POST,
            &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events?"),
        );
        let event = exchange.body.clone();
        exchange.respond(201, event.clone());
        event
    }
}

impl Exchange {
    async fn read(request: Request<Body>, send: SendResponse) -> Self {
        let method = request.method().clone();
        let uri = request.uri().to_string();
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
        Exchange {
            method,
            uri,
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

    /// Asserts the method and the whole URI (path and query).
    pub fn expect_request(self, method: Method, uri: &str) -> Self {
        assert_eq!((&self.method, self.uri.as_str()), (&method, uri), "request");
        self
    }

    /// Asserts a server-side apply body.
    pub fn expect_apply(self) -> Self {
        assert_eq!(
            self.content_type.as_deref(),
            Some("application/apply-patch+yaml"),
            "server-side apply"
        );
        self
    }

    /// The condition of `type_` in the body's `status.conditions`.
    pub fn condition(&self, type_: &str) -> &Value {
        self.body["status"]["conditions"]
            .as_array()
            .expect("status.conditions")
            .iter()
            .find(|c| c["type"] == type_)
            .unwrap_or_else(|| panic!("no {type_} condition in {}", self.body))
    }

    /// Asserts `type_` has `status` and `reason`.
    pub fn expect_condition(self, type_: &str, status: &str, reason: &str) -> Self {
        let condition = self.condition(type_);
        assert_eq!(
            (condition["status"].as_str(), condition["reason"].as_str()),
            (Some(status), Some(reason)),
            "{type_}: {condition}"
        );
        self
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

    /// Answers with a body of newline-separated JSON watch events.
    pub fn respond_watch(self, events: &[Value]) {
        let mut bytes = Vec::new();
        for event in events {
            bytes.extend(serde_json::to_vec(event).expect("json"));
            bytes.push(b'\n');
        }
        self.respond_bytes(200, bytes);
    }

    /// Answers a status apply as the API server does: the object with the applied status.
    pub fn respond_with_status(self, mut object: Value) {
        object["status"] = self.body["status"].clone();
        self.respond(200, object);
    }

    /// Answers with a `Status` failure, as the API server does.
    pub fn fail(self, code: u16, reason: &str, message: &str) {
        self.respond(code, status(code, reason, message));
    }

    pub fn respond_not_found(self, resource: &str, name: &str) {
        self.fail(404, "NotFound", &format!("{resource} \"{name}\" not found"));
    }

    pub fn respond_conflict(self) {
        self.fail(
            409,
            "Conflict",
            "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
        );
    }
}

/// A `metav1.Status` object: `Success` below 300, `Failure` from there on.
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
