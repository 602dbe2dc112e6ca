//! Release payloads for the A/B backend: the ed25519 signature is checked before a
//! byte is written; the image is downloaded over HTTPS (rustls), resuming where an
//! interrupted download stopped, and streamed into the inactive slot with constant
//! memory; then it is synced, read back and hashed, and only a matching SHA-256 lets
//! the slot be armed.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::{record::write_atomically, slot::Slot};

pub use crds::protocol::ReleaseRef;

/// Why a payload was refused or could not be staged.
#[derive(Debug, Error)]
pub enum PayloadError {
    /// No configured key verifies the signature.
    #[error(
        "the release signature does not verify with any of the {keys} configured public key(s)"
    )]
    Signature {
        /// How many keys were tried.
        keys: usize,
    },
    /// The release fields are malformed.
    #[error("malformed release: {0}")]
    Malformed(String),
    /// The image does not fit the slot.
    #[error("the payload is {size} bytes but slot {slot} holds only {capacity}")]
    TooLarge {
        /// The payload's size.
        size: u64,
        /// The slot.
        slot: String,
        /// The slot's size.
        capacity: u64,
    },
    /// What was written does not hash to the release's SHA-256.
    #[error("sha256 mismatch: the release says {expected}, the written image hashes to {actual}")]
    HashMismatch {
        /// From the release.
        expected: String,
        /// Read back from the slot.
        actual: String,
    },
    /// The download failed (it resumes on the next attempt).
    #[error("downloading {url}: {message}")]
    Download {
        /// The URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A configured public key is unusable.
    #[error("public key {key:?}: {reason}")]
    Key {
        /// The key as configured.
        key: String,
        /// Why.
        reason: String,
    },
    /// The HTTPS client (or its extra CA) cannot be set up.
    #[error("the release download client: {0}")]
    Client(String),
    /// Reading or writing the slot failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PayloadError {
    let what = what.into();
    move |source| PayloadError::Io { what, source }
}

/// Parses base64 ed25519 public keys.
pub fn parse_keys(texts: &[String]) -> Result<Vec<VerifyingKey>, PayloadError> {
    texts
        .iter()
        .map(|t| {
            let bad = |reason: String| PayloadError::Key {
                key: t.clone(),
                reason,
            };
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(t.trim())
                .map_err(|e| bad(format!("is not base64: {e}")))?;
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| bad("is not 32 bytes".into()))?;
            VerifyingKey::from_bytes(&bytes).map_err(|e| bad(e.to_string()))
        })
        .collect()
}

/// Checks the release's signature over its SHA-256 digest; returns the digest.
pub fn verify(release: &ReleaseRef, keys: &[VerifyingKey]) -> Result<[u8; 32], PayloadError> {
    let digest: [u8; 32] = hex::decode(&release.sha256)
        .ok()
        .and_then(|d| d.try_into().ok())
        .ok_or_else(|| PayloadError::Malformed("sha256 must be 64 hex digits".into()))?;
    let signature = base64::engine::general_purpose::STANDARD
        .decode(&release.signature)
        .ok()
        .and_then(|s| <[u8; 64]>::try_from(s).ok())
        .map(|s| Signature::from_bytes(&s))
        .ok_or_else(|| {
            PayloadError::Malformed("signature must be 64 base64-encoded bytes".into())
        })?;
    if keys.iter().any(|k| k.verify(&digest, &signature).is_ok()) {
        Ok(digest)
    } else {
        Err(PayloadError::Signature { keys: keys.len() })
    }
}

/// How far an interrupted staging got, kept in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Progress {
    sha256: String,
    slot: String,
    /// Bytes written and synced.
    written: u64,
}

/// Stages payloads into slots.
#[derive(Debug, Clone)]
pub struct Stager {
    /// The HTTPS client.
    pub http: reqwest::Client,
    /// Where progress is kept.
    pub progress_file: PathBuf,
    /// Synced and recorded every this many bytes (a multiple of the write size, at
    /// most [`BLOCK`], is used for the writes themselves).
    pub checkpoint: u64,
    /// How gently its threads run beside the node's workloads.
    pub pace: crate::pace::Pace,
}

/// The most bytes per write to the slot, and per read when hashing it back.
pub const BLOCK: usize = 2 << 20;

/// Buffers in flight between the download and the writer.
const BUFFERS: usize = 3;

/// The alignment of direct I/O: offsets, lengths and memory.
const DIRECT_ALIGN: usize = 4096;

impl Stager {
    /// A stager with an HTTPS client trusting the Mozilla roots built into the binary
    /// (webpki-roots) plus `extra_ca` (PEM).
    pub fn new(state_dir: &Path, extra_ca: Option<&Path>) -> Result<Stager, PayloadError> {
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("baton-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(std::time::Duration::from_secs(30))
            .read_timeout(std::time::Duration::from_secs(60));
        if let Some(path) = extra_ca {
            let pem = std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| PayloadError::Client(format!("{}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        Ok(Stager {
            http: builder
                .build()
                .map_err(|e| PayloadError::Client(e.to_string()))?,
            progress_file: state_dir.join("ab-staging.json"),
            checkpoint: 32 << 20,
            pace: crate::pace::Pace::gentle(),
        })
    }

    fn progress(&self) -> Option<Progress> {
        let text = std::fs::read_to_string(&self.progress_file).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, p: &Progress) -> Result<(), PayloadError> {
        let text = serde_json::to_vec(p).map_err(|e| PayloadError::Malformed(e.to_string()))?;
        write_atomically(&self.progress_file, &text).map_err(|e| PayloadError::Io {
            what: "saving staging progress".into(),
            source: std::io::Error::other(e.to_string()),
        })
    }

    /// Forgets any progress (the next staging starts from the beginning).
    pub fn forget(&self) {
        let _ = std::fs::remove_file(&self.progress_file);
    }

    /// Whether an earlier staging of `release` into `slot` was interrupted.
    pub fn resumable(&self, release: &ReleaseRef, slot: &str) -> bool {
        self.progress()
            .is_some_and(|p| p.sha256 == release.sha256 && p.slot == slot)
    }

    /// The size of each write: a multiple of the direct-I/O alignment, at most
    /// [`BLOCK`] and at most one checkpoint.
    fn block(&self) -> usize {
        let checkpoint = usize::try_from(self.checkpoint).unwrap_or(BLOCK);
        (checkpoint.min(BLOCK) / DIRECT_ALIGN).max(1) * DIRECT_ALIGN
    }

    /// Downloads `release` into `slot` of `device` (resuming when the last attempt at
    /// the same release and slot was interrupted), syncs, reads it back and checks its
    /// hash. The caller has verified the signature and disarmed the slot. Returns the
    /// payload's size.
    ///
    /// The slot is written and read back with direct I/O where the device allows it:
    /// staging an OS image then does not push the node's workloads out of the page
    /// cache, and the read-back hashes what the device holds, not what the cache does.
    /// The download, the writes and the read-back run on three threads, so the network,
    /// the disk and the hash overlap; the writer, the read-back and the hash run at
    /// [`Stager::pace`] (idle I/O class, nice 19, an optional byte rate they share).
    pub async fn stage(
        &self,
        release: &ReleaseRef,
        device: &Path,
        slot: &Slot,
    ) -> Result<u64, PayloadError> {
        let block = self.block();
        // Resume on a write boundary (a checkpoint always is one).
        let mut written = self
            .progress()
            .filter(|p| p.sha256 == release.sha256 && p.slot == slot.label)
            .map_or(0, |p| p.written / block as u64 * block as u64);
        let download = |message: String| PayloadError::Download {
            url: release.url.clone(),
            message,
        };
        let response = loop {
            let mut request = self.http.get(&release.url);
            if written > 0 {
                request = request.header(reqwest::header::RANGE, format!("bytes={written}-"));
            }
            let response = request.send().await.map_err(|e| download(e.to_string()))?;
            let status = response.status();
            if status == reqwest::StatusCode::OK {
                written = 0; // the server ignored the range: start over
            } else if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && written > 0 {
                written = 0; // the payload changed size under the same name: start over
                continue;
            } else if status != reqwest::StatusCode::PARTIAL_CONTENT || written == 0 {
                return Err(download(format!("HTTP {status}")));
            }
            break response;
        };
        let total = response.content_length().map(|rest| rest + written);
        if let Some(size) = total.filter(|s| *s > slot.len) {
            return Err(PayloadError::TooLarge {
                size,
                slot: slot.label.clone(),
                capacity: slot.len,
            });
        }
        let progress = Progress {
            sha256: release.sha256.clone(),
            slot: slot.label.clone(),
            written,
        };
        self.save(&progress)?;
        let (file, direct) = open_slot(device, true)?;
        // The read-back runs beside the download: each range is read back and hashed
        // once it has been synced, in order, so the check overlaps the writing.
        let limiter = std::sync::Arc::new(self.pace.limiter());
        let verifier = ReadBack::start(
            device.to_path_buf(),
            slot.offset,
            block,
            self.pace,
            std::sync::Arc::clone(&limiter),
        )?;
        verifier.synced(written);
        let (full_tx, full_rx) = tokio::sync::mpsc::channel::<Aligned>(BUFFERS);
        let (empty_tx, mut empty_rx) = tokio::sync::mpsc::channel::<Aligned>(BUFFERS);
        for _ in 0..BUFFERS {
            let _ = empty_tx.try_send(Aligned::new(block));
        }
        let writer = SlotWriter {
            stager: self.clone(),
            device: device.to_path_buf(),
            file,
            direct,
            offset: slot.offset,
            progress,
            marks: verifier.marks.clone(),
            limiter,
        };
        let writing = self
            .pace
            .spawn("baton-write", move || writer.run(full_rx, empty_tx))
            .map_err(io_err("starting the slot writer"))?;
        let received = Self::receive(
            &release.url,
            response,
            slot,
            written,
            &full_tx,
            &mut empty_rx,
        )
        .await;
        // Whatever happened, let the writer finish what it has (synced and recorded,
        // so an interrupted download resumes from there) before returning.
        drop(full_tx);
        let wrote = writing.await.map_err(|_| PayloadError::Io {
            what: "writing the slot".into(),
            source: std::io::Error::other("the writer thread panicked"),
        })?;
        received?;
        let written = wrote?;
        verifier.synced(written);
        let actual = verifier.finish().await?;
        if actual != release.sha256 {
            self.forget();
            return Err(PayloadError::HashMismatch {
                expected: release.sha256.clone(),
                actual,
            });
        }
        Ok(written)
    }

    /// Copies the response body into full buffers for the writer (the last one may be
    /// partial); refuses a body that outgrows the slot.
    async fn receive(
        url: &str,
        response: reqwest::Response,
        slot: &Slot,
        mut written: u64,
        full: &tokio::sync::mpsc::Sender<Aligned>,
        empty: &mut tokio::sync::mpsc::Receiver<Aligned>,
    ) -> Result<(), PayloadError> {
        let stopped = || PayloadError::Io {
            what: "writing the slot".into(),
            source: std::io::Error::other("the writer stopped"),
        };
        let mut current = empty.recv().await.ok_or_else(stopped)?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| PayloadError::Download {
                url: url.to_string(),
                message: e.to_string(),
            })?;
            written += chunk.len() as u64;
            if written > slot.len {
                return Err(PayloadError::TooLarge {
                    size: written,
                    slot: slot.label.clone(),
                    capacity: slot.len,
                });
            }
            let mut rest = &chunk[..];
            while !rest.is_empty() {
                let n = current.fill(rest);
                rest = &rest[n..];
                if current.is_full() {
                    full.send(current).await.map_err(|_| stopped())?;
                    current = empty.recv().await.ok_or_else(stopped)?;
                }
            }
        }
        if !current.data().is_empty() {
            full.send(current).await.map_err(|_| stopped())?;
        }
        Ok(())
    }
}

/// A buffer whose usable part starts on a [`DIRECT_ALIGN`] boundary (direct I/O needs
/// aligned memory); built from an ordinary vector, without unsafe code.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
    filled: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        Aligned {
            raw,
            start,
            len,
            filled: 0,
        }
    }

    /// Copies as much of `bytes` as fits; returns how much.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.len - self.filled);
        let at = self.start + self.filled;
        self.raw[at..at + n].copy_from_slice(&bytes[..n]);
        self.filled += n;
        n
    }

    fn is_full(&self) -> bool {
        self.filled == self.len
    }

    fn data(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.filled]
    }

    /// The whole usable part, for a read.
    fn space(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Opens `device` for direct I/O when it allows it (block devices and most local file
/// systems do), else for ordinary I/O. Returns whether the I/O is direct.
fn open_slot(device: &Path, write: bool) -> Result<(std::fs::File, bool), PayloadError> {
    use std::os::unix::fs::OpenOptionsExt;
    let what = || format!("opening {}", device.display());
    let mut options = std::fs::OpenOptions::new();
    options.read(!write).write(write);
    let direct = options
        .clone()
        .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
        .open(device);
    match direct {
        Ok(file) => Ok((file, true)),
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => options
            .open(device)
            .map(|file| (file, false))
            .map_err(io_err(what())),
        Err(e) => Err(io_err(what())(e)),
    }
}

/// The writer: a blocking task that writes full buffers at their place in the slot,
/// syncs and records progress every checkpoint, and tells the read-back what is synced.
struct SlotWriter {
    stager: Stager,
    device: PathBuf,
    file: std::fs::File,
    direct: bool,
    offset: u64,
    progress: Progress,
    marks: std::sync::mpsc::Sender<u64>,
    limiter: std::sync::Arc<crate::pace::Limiter>,
}

impl SlotWriter {
    /// Writes until the download side closes the channel; returns the bytes written.
    fn run(
        mut self,
        mut full: tokio::sync::mpsc::Receiver<Aligned>,
        empty: tokio::sync::mpsc::Sender<Aligned>,
    ) -> Result<u64, PayloadError> {
        use std::os::unix::fs::FileExt;
        let mut written = self.progress.written;
        let mut since_checkpoint = 0u64;
        while let Some(mut buffer) = full.blocking_recv() {
            let data = buffer.data();
            let at = self.offset + written;
            // Only the last buffer may end off the alignment: that tail goes through
            // the page cache.
            let aligned = if self.direct {
                data.len() / DIRECT_ALIGN * DIRECT_ALIGN
            } else {
                data.len()
            };
            for (from, len) in self.limiter.pace().pieces(aligned) {
                self.limiter.wait(len as u64);
                self.file
                    .write_all_at(&data[from..from + len], at + from as u64)
                    .map_err(io_err("writing the slot"))?;
            }
            if aligned < data.len() {
                let tail = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&self.device)
                    .map_err(io_err(format!("opening {}", self.device.display())))?;
                tail.write_all_at(&data[aligned..], at + aligned as u64)
                    .map_err(io_err("writing the slot"))?;
                tail.sync_data().map_err(io_err("syncing the slot"))?;
            }
            let len = data.len() as u64;
            written += len;
            since_checkpoint += len;
            buffer.filled = 0;
            let _ = empty.blocking_send(buffer);
            if since_checkpoint >= self.stager.checkpoint {
                self.checkpoint(written)?;
                since_checkpoint = 0;
            }
        }
        self.file.sync_all().map_err(io_err("syncing the slot"))?;
        self.progress.written = written;
        self.stager.save(&self.progress)?;
        Ok(written)
    }

    fn checkpoint(&mut self, written: u64) -> Result<(), PayloadError> {
        self.file.sync_data().map_err(io_err("syncing the slot"))?;
        self.progress.written = written;
        self.stager.save(&self.progress)?;
        let _ = self.marks.send(written);
        Ok(())
    }
}

/// The read-back: a thread that reads the slot from its start up to each synced mark,
/// and a thread beside it that hashes each block while the next one is read, so the
/// device's reads and the hash overlap. Both run at the staging's pace.
struct ReadBack {
    marks: std::sync::mpsc::Sender<u64>,
    task: tokio::sync::oneshot::Receiver<Result<String, PayloadError>>,
}

impl ReadBack {
    fn start(
        device: PathBuf,
        offset: u64,
        block: usize,
        pace: crate::pace::Pace,
        limiter: std::sync::Arc<crate::pace::Limiter>,
    ) -> Result<ReadBack, PayloadError> {
        let (marks, rx) = std::sync::mpsc::channel::<u64>();
        let task = pace
            .spawn("baton-read", move || {
                let (file, _) = open_slot(&device, false)?;
                let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<(Aligned, usize)>(BUFFERS);
                let (empty_tx, empty_rx) = std::sync::mpsc::sync_channel::<Aligned>(BUFFERS);
                for _ in 0..BUFFERS {
                    let _ = empty_tx.send(Aligned::new(block));
                }
                std::thread::scope(|scope| {
                    let hashing = std::thread::Builder::new()
                        .name("baton-hash".into())
                        .spawn_scoped(scope, move || {
                            pace.enter();
                            let mut hasher = Sha256::new();
                            for (mut buf, len) in full_rx {
                                hasher.update(&buf.space()[..len]);
                                let _ = empty_tx.send(buf);
                            }
                            hex::encode(hasher.finalize())
                        })
                        .map_err(io_err("starting the read-back's hash thread"))?;
                    let read = Self::read(&file, offset, block, &rx, &full_tx, &empty_rx, &limiter);
                    drop(full_tx);
                    let digest = hashing.join().map_err(|_| PayloadError::Io {
                        what: "hashing the slot".into(),
                        source: std::io::Error::other("the hash thread panicked"),
                    });
                    read?;
                    digest
                })
            })
            .map_err(io_err("starting the read-back"))?;
        Ok(ReadBack { marks, task })
    }

    /// Reads each range up to the next synced mark, in blocks, handing each block to
    /// the hash thread; returns when the marks end.
    fn read(
        file: &std::fs::File,
        offset: u64,
        block: usize,
        marks: &std::sync::mpsc::Receiver<u64>,
        full: &std::sync::mpsc::SyncSender<(Aligned, usize)>,
        empty: &std::sync::mpsc::Receiver<Aligned>,
        limiter: &crate::pace::Limiter,
    ) -> Result<(), PayloadError> {
        use std::os::unix::fs::FileExt;
        let stopped = || PayloadError::Io {
            what: "hashing the slot".into(),
            source: std::io::Error::other("the hash thread stopped"),
        };
        let mut hashed = 0u64;
        // Each mark is a synced length; the channel closes after the last one.
        for mark in marks {
            while hashed < mark {
                let mut buf = empty.recv().map_err(|_| stopped())?;
                let want = (mark - hashed).min(block as u64) as usize;
                // Direct reads are whole aligned blocks: read past a partial end, hash
                // only what was written.
                let len = want.div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
                let space = &mut buf.space()[..len];
                let mut got = 0;
                while got < want {
                    let piece = limiter.pace().request(len - got);
                    limiter.wait(piece as u64);
                    let n = file
                        .read_at(&mut space[got..got + piece], offset + hashed + got as u64)
                        .map_err(io_err("reading the slot back"))?;
                    if n == 0 {
                        return Err(PayloadError::Io {
                            what: "reading the slot back".into(),
                            source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
                        });
                    }
                    got += n;
                }
                full.send((buf, want)).map_err(|_| stopped())?;
                hashed += want as u64;
            }
        }
        Ok(())
    }

    fn synced(&self, upto: u64) {
        let _ = self.marks.send(upto);
    }

    async fn finish(self) -> Result<String, PayloadError> {
        drop(self.marks);
        self.task.await.map_err(|_| PayloadError::Io {
            what: "reading the slot back".into(),
            source: std::io::Error::other("the read-back thread panicked"),
        })?
    }
}

/// The bytes per read when hashing a slot back.
const READ_BACK: usize = 1 << 20;

/// Reads `len` bytes at `offset` of `device` back and hashes them.
pub fn hash_back(device: &Path, offset: u64, len: u64) -> Result<String, PayloadError> {
    let mut file =
        std::fs::File::open(device).map_err(io_err(format!("opening {}", device.display())))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(io_err("seeking to the slot"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; READ_BACK];
    let mut left = len;
    while left > 0 {
        let want = left.min(READ_BACK as u64) as usize;
        let n = file
            .read(&mut buf[..want])
            .map_err(io_err("reading the slot back"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    #[test]
    fn the_signature_over_the_digest_must_verify_with_a_configured_key() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let other = SigningKey::from_bytes(&[8; 32]);
        let digest = Sha256::digest(b"an OS image");
        let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        let release = ReleaseRef {
            url: "https://example.invalid/os.img".into(),
            sha256: hex::encode(digest),
            signature: b64(&key.sign(&digest).to_bytes()),
        };
        let keys = parse_keys(&[b64(key.verifying_key().as_bytes())]).unwrap();
        assert_eq!(
            verify(&release, &keys).unwrap().as_slice(),
            digest.as_slice()
        );
        let wrong = parse_keys(&[b64(other.verifying_key().as_bytes())]).unwrap();
        assert!(matches!(
            verify(&release, &wrong),
            Err(PayloadError::Signature { keys: 1 })
        ));
        assert!(
            parse_keys(&["not base64!".into()])
                .unwrap_err()
                .to_string()
                .contains("not base64")
        );
    }
}
