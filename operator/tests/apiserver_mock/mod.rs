//! A scripted Kubernetes API server for the controllers' scenario tests: a kube `Client` over
//! a `tower_test` mock, and helpers that take each request in order, so a test asserts the
//! method, URI and body of every request and answers as the API server would.

#![allow(dead_code)]

use std::time::Duration;

use http::{Method, Request, Response};
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client whose every request arrives at the returned handle.
pub fn client() -> (Client, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

/// One request, read, waiting for its answer.
pub struct Exchange {
    pub method: Method,
    pub uri: String,
    pub content_type: Option<String>,
    /// The JSON body, or `Null` when there is none.
    pub body: Value,
    send: tower_test::mock::SendResponse<Response<Body>>,
}

/// The next request; fails the test if none comes within 10 seconds.
pub async fn next(handle: &mut Handle) -> Exchange {
    let (request, send) = tokio::time::timeout(Duration::from_secs(10), handle.next_request())
        .await
        .expect("a request within 10 s")
        .expect("the client is still there");
    let method = request.method().clone();
    let uri = request.uri().to_string();
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
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    Exchange {
        method,
        uri,
        content_type,
        body,
        send,
    }
}

/// Asserts that no request arrives (or that the client is gone without sending one).
pub async fn no_more_requests(handle: &mut Handle) {
    let next = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    if let Ok(Some((request, _))) = next {
        panic!("unexpected request: {} {}", request.method(), request.uri());
    }
}

impl Exchange {
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
        self.send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
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
        self.send.send_response(
            Response::builder()
                .status(200)
                .body(Body::from(bytes))
                .expect("response"),
        );
    }

    /// Answers a status apply as the API server does: the object with the applied status.
    pub fn respond_with_status(self, mut object: Value) {
        object["status"] = self.body["status"].clone();
        self.respond(200, object);
    }

    pub fn respond_not_found(self, resource: &str, name: &str) {
        self.respond(
            404,
            failure(404, "NotFound", &format!("{resource} \"{name}\" not found")),
        );
    }

    pub fn respond_conflict(self) {
        self.respond(
            409,
            failure(
                409,
                "Conflict",
                "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again",
            ),
        );
    }
}

/// A `metav1.Status` failure body.
pub fn failure(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// Answers an Event publication (events.k8s.io/v1) and returns the Event sent.
pub async fn expect_event(handle: &mut Handle, namespace: &str) -> Value {
    let exchange = next(handle).await.expect_request(
        Method::POST,
        &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events?"),
    );
    let event = exchange.body.clone();
    exchange.respond(201, event.clone());
    event
}
