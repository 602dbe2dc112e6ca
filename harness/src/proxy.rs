//! An HTTPS proxy on loopback in front of the API server that can leave the leader's
//! renewals unanswered, as a renewal stuck on a half-open connection to a dead API
//! server of an HA control plane would be, while every other request (on a fresh
//! connection, through the load balancer to a healthy server) goes through.
//!
//! It terminates TLS with a CA of its own (clients trust [`StallProxy::ca_file`]) and
//! forwards each request with its credentials to the API server; watches stream.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Router,
    body::Body,
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::Response,
};
use futures::TryStreamExt;

use crate::error::{Error, Result, io};

/// The path suffix of the operator's leader-election Lease.
const LEADER_LEASE: &str = "/leases/baton-operator-leader";

struct Shared {
    upstream: String,
    http: reqwest::Client,
    stall_renewals: AtomicBool,
}

/// A running proxy. Dropping it stops it.
pub struct StallProxy {
    shared: Arc<Shared>,
    port: u16,
    ca_file: PathBuf,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl StallProxy {
    /// Proxies to `upstream` (`https://127.0.0.1:<port>`), whose CA is `upstream_ca`.
    pub async fn start(upstream: &str, upstream_ca: &Path) -> Result<StallProxy> {
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-proxy-")
            .tempdir()
            .map_err(io("creating the proxy's directory"))?;
        let ca_file = dir.path().join("proxy-ca.crt");
        let pem = std::fs::read(upstream_ca).map_err(io("reading the cluster CA"))?;
        let ca = reqwest::Certificate::from_pem(&pem).map_err(|e| Error::Other(e.to_string()))?;
        let http = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .map_err(|e| Error::Other(e.to_string()))?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            http,
            stall_renewals: AtomicBool::new(false),
        });
        let app = Router::new()
            .fallback(forward)
            .with_state(Arc::clone(&shared));
        let (port, task) = crate::pki::serve_https(app, &ca_file).await?;
        Ok(StallProxy {
            shared,
            port,
            ca_file,
            task,
            _dir: dir,
        })
    }

    /// The proxy's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The CA certificate (PEM) clients of the proxy trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// From now on, every update of the leader-election Lease gets no answer, ever.
    pub fn stall_leader_renewals(&self) {
        self.shared.stall_renewals.store(true, Ordering::SeqCst);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    if shared.stall_renewals.load(Ordering::SeqCst)
        && parts.method == axum::http::Method::PUT
        && path.ends_with(LEADER_LEASE)
    {
        std::future::pending::<()>().await;
    }
    let target = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map_or(path, |p| p.as_str())
    );
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return status(StatusCode::BAD_REQUEST);
    };
    let mut headers = HeaderMap::new();
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name) {
            headers.insert(name, v.clone());
        }
    }
    let Ok(method) = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()) else {
        return status(StatusCode::METHOD_NOT_ALLOWED);
    };
    let sent = shared
        .http
        .request(method, target)
        .headers(headers)
        .body(bytes)
        .send()
        .await;
    let Ok(answer) = sent else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let mut response = Response::builder().status(answer.status().as_u16());
    if let Some(v) = answer.headers().get(header::CONTENT_TYPE) {
        response = response.header(header::CONTENT_TYPE, v.clone());
    }
    let stream = answer.bytes_stream().map_err(std::io::Error::other);
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(StatusCode::BAD_GATEWAY))
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
