//! An HTTPS server for OS images on loopback, for the A/B backend's tests and
//! benchmark: TLS with a CA of its own (the agent is given the CA file), `Range`
//! requests for resumed downloads, and a switch that cuts the next response short, as
//! a dropped connection would.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::Response,
    routing::get,
};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::{Result, io};

/// Chunk size of the streamed body.
const CHUNK: usize = 256 << 10;

struct Shared {
    image: Mutex<PathBuf>,
    /// 0: serve everything; otherwise the next response stops after this many bytes.
    cut_after: AtomicU64,
    /// Each request's range start (0 without a Range header).
    requests: Mutex<Vec<u64>>,
}

/// A running image server. Dropping it stops it.
pub struct ImageServer {
    shared: Arc<Shared>,
    port: u16,
    ca_file: PathBuf,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for ImageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageServer")
            .field("port", &self.port)
            .finish()
    }
}

impl ImageServer {
    /// Serves `image` at `https://127.0.0.1:<port>/image`.
    pub async fn start(image: &Path) -> Result<ImageServer> {
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e-images-")
            .tempdir()
            .map_err(io("creating the image server's directory"))?;
        let ca_file = dir.path().join("images-ca.crt");
        let shared = Arc::new(Shared {
            image: Mutex::new(image.to_path_buf()),
            cut_after: AtomicU64::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/image", get(serve))
            .with_state(Arc::clone(&shared));
        let (port, task) = crate::pki::serve_https(app, &ca_file).await?;
        Ok(ImageServer {
            shared,
            port,
            ca_file,
            task,
            _dir: dir,
        })
    }

    /// The image's URL.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/image", self.port)
    }

    /// The CA certificate (PEM) to trust.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Serves another file from now on.
    pub fn set_image(&self, image: &Path) {
        *self
            .shared
            .image
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = image.to_path_buf();
    }

    /// Cuts the next response short after `bytes`.
    pub fn cut_next_after(&self, bytes: u64) {
        self.shared.cut_after.store(bytes, Ordering::SeqCst);
    }

    /// Each request's range start so far.
    pub fn requests(&self) -> Vec<u64> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let path = shared
        .image
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Ok(mut file) = tokio::fs::File::open(&path).await else {
        return status(StatusCode::NOT_FOUND);
    };
    let size = match file.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return status(StatusCode::INTERNAL_SERVER_ERROR),
    };
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    shared
        .requests
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(start.unwrap_or(0));
    let from = start.unwrap_or(0).min(size);
    if file.seek(std::io::SeekFrom::Start(from)).await.is_err() {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    }
    let cut = shared.cut_after.swap(0, Ordering::SeqCst);
    let limit = if cut > 0 { cut } else { u64::MAX };
    let stream = futures::stream::unfold((file, 0u64), move |(mut file, sent)| async move {
        if sent >= limit {
            let cut: std::io::Error = std::io::Error::other("connection cut by the test");
            return Some((Err(cut), (file, u64::MAX)));
        }
        if sent == u64::MAX {
            return None;
        }
        let mut buf = vec![0u8; CHUNK.min((limit - sent) as usize)];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), (file, sent + n as u64)))
            }
            Err(e) => Some((Err(e), (file, u64::MAX))),
        }
    })
    .boxed();
    let mut response = Response::builder()
        .header(header::CONTENT_LENGTH, size - from)
        .header(header::ACCEPT_RANGES, "bytes");
    response = if start.is_some() {
        response.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {from}-{}/{size}", size.saturating_sub(1)),
        )
    } else {
        response.status(StatusCode::OK)
    };
    response
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| status(StatusCode::INTERNAL_SERVER_ERROR))
}

fn status(code: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = code;
    r
}
