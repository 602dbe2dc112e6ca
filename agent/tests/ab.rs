//! The native A/B backend on GPT disk images the tests create, with payloads served over
//! HTTPS on loopback: staging and arming, a boot of the new slot then commit, a failed
//! boot then rollback, an interrupted write, and every refusal (hash, signature, size,
//! labels) leaving the booted slot and its bits untouched.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use agent::{
    backend::{
        Backend, Desired,
        ab::{Ab, BootedFrom, simulated_reboot},
    },
    lifecycle::Update,
    payload::{ReleaseRef, Stager, hash_back},
    slot::{Attributes, Slots, create_image},
};
use base64::Engine;
use crds::protocol::Version;
use e2e::image_server::ImageServer;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

const SLOT: u64 = 16 << 20;
const LABELS: [&str; 2] = ["USR-A", "USR-B"];

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn key() -> SigningKey {
    SigningKey::from_bytes(&[42; 32])
}

/// A payload of `len` pseudo-random bytes, and its release signed by `signer`.
fn payload(
    dir: &Path,
    name: &str,
    len: usize,
    signer: &SigningKey,
    url: &str,
) -> (PathBuf, ReleaseRef) {
    let mut bytes = Vec::with_capacity(len);
    let mut x: u32 = 0x1234_5678;
    while bytes.len() < len {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes.truncate(len);
    let path = dir.join(name);
    std::fs::write(&path, &bytes).unwrap();
    let digest = Sha256::digest(&bytes);
    let release = ReleaseRef {
        url: url.to_string(),
        sha256: hex::encode(digest),
        signature: b64(&signer.sign(&digest).to_bytes()),
    };
    (path, release)
}

struct Machine {
    dir: tempfile::TempDir,
    image: PathBuf,
    server: ImageServer,
    ab: Ab,
}

impl Machine {
    async fn new(payload_len: usize) -> (Machine, ReleaseRef) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        create_image(&image, LABELS, SLOT).unwrap();
        let placeholder = dir.path().join("none");
        std::fs::write(&placeholder, b"").unwrap();
        let server = ImageServer::start(&placeholder).await.unwrap();
        let (path, release) = payload(dir.path(), "os-2.img", payload_len, &key(), &server.url());
        server.set_image(&path);
        std::fs::write(dir.path().join("booted-slot"), "USR-A").unwrap();
        let mut stager = Stager::new(dir.path(), Some(server.ca_file())).unwrap();
        stager.checkpoint = 1 << 20;
        let ab = Ab {
            device: image.clone(),
            labels: LABELS.map(String::from),
            booted: BootedFrom::File(dir.path().join("booted-slot")),
            keys: vec![key().verifying_key()],
            stager,
            versions_file: dir.path().join("ab-versions.json"),
            os_release: dir.path().join("os-release"),
        };
        std::fs::write(dir.path().join("os-release"), "VERSION_ID=1.0.0\n").unwrap();
        (
            Machine {
                dir,
                image,
                server,
                ab,
            },
            release,
        )
    }

    fn slots(&self) -> Slots {
        Slots::open(&self.image, LABELS).unwrap()
    }

    fn attributes(&self) -> [Attributes; 2] {
        let s = self.slots();
        [s.slots[0].attributes, s.slots[1].attributes]
    }

    fn booted_a_untouched(&self) {
        assert_eq!(
            self.attributes()[0],
            Attributes {
                priority: 1,
                tries: 0,
                successful: true
            },
            "the booted slot's bits never change"
        );
    }

    fn reboot(&self) {
        simulated_reboot(self.dir.path(), &self.image, LABELS).unwrap();
    }
}

fn wanted(release: &ReleaseRef) -> Desired {
    Desired {
        version: Version::new("2.0.0").unwrap(),
        release: Some(release.clone()),
    }
}

#[tokio::test]
async fn staging_arms_the_new_slot_whose_boot_is_then_committed() {
    let (mut m, release) = Machine::new(5 << 20).await;
    let d = wanted(&release);
    let s = m.ab.status(Some(&d)).await.unwrap();
    assert_eq!(
        (
            s.current_version.unwrap().as_str(),
            s.slot.unwrap().as_str()
        ),
        ("1.0.0", "USR-A")
    );
    assert_eq!(s.update, Update::Available(d.version.clone()));
    m.ab.stage(&d).await.unwrap();
    assert_eq!(
        m.attributes()[1],
        Attributes {
            priority: 2,
            tries: 1,
            successful: false
        }
    );
    m.booted_a_untouched();
    let b = m.slots().slots[1].clone();
    assert_eq!(
        hash_back(&m.image, b.offset, 5 << 20).unwrap(),
        release.sha256
    );
    let s = m.ab.status(Some(&d)).await.unwrap();
    assert!(matches!(s.update, Update::Staged { .. }), "{:?}", s.update);

    // The simulated bootloader boots B (using its one try); the agent commits it.
    m.reboot();
    let s = m.ab.status(Some(&d)).await.unwrap();
    assert_eq!(
        (
            s.current_version.unwrap().as_str(),
            s.slot.unwrap().as_str()
        ),
        ("2.0.0", "USR-B")
    );
    assert_eq!(s.update, Update::Idle);
    m.ab.commit().await.unwrap();
    assert_eq!(
        m.attributes()[1],
        Attributes {
            priority: 2,
            tries: 0,
            successful: true
        }
    );
    m.reboot();
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("booted-slot")).unwrap(),
        "USR-B",
        "proven, it keeps booting"
    );

    // The manual rollback: A, still proven, boots next.
    assert_eq!(m.ab.rollback().unwrap(), "USR-A");
    m.reboot();
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("booted-slot")).unwrap(),
        "USR-A"
    );
}

#[tokio::test]
async fn a_failed_boot_of_the_new_slot_falls_back_to_the_old_one() {
    let (mut m, release) = Machine::new(2 << 20).await;
    m.ab.stage(&wanted(&release)).await.unwrap();
    std::fs::write(m.dir.path().join("fail-next-boot"), "").unwrap();
    m.reboot();
    let s = m.ab.status(None).await.unwrap();
    assert_eq!(
        (
            s.current_version.unwrap().as_str(),
            s.slot.unwrap().as_str()
        ),
        ("1.0.0", "USR-A")
    );
    assert_eq!(
        m.attributes()[1],
        Attributes {
            priority: 2,
            tries: 0,
            successful: false
        },
        "B's try is spent"
    );
    assert_eq!(s.update, Update::Idle, "nothing armed any more");
    m.booted_a_untouched();
}

#[tokio::test]
async fn an_interrupted_write_leaves_the_booted_slot_alone_and_resumes() {
    let (mut m, release) = Machine::new(6 << 20).await;
    let d = wanted(&release);
    m.server.cut_next_after(3 << 20);
    let e = m.ab.stage(&d).await.unwrap_err().to_string();
    assert!(e.contains("downloading"), "{e}");
    m.booted_a_untouched();
    assert_eq!(
        m.attributes()[1].priority,
        0,
        "a half-written slot is never bootable"
    );
    // The retry resumes where the last checkpoint was synced.
    m.ab.stage(&d).await.unwrap();
    let requests = m.server.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests[1] >= 1 << 20 && requests[1] <= 3 << 20,
        "resumed from a checkpoint: {requests:?}"
    );
    let b = m.slots().slots[1].clone();
    assert_eq!(
        hash_back(&m.image, b.offset, 6 << 20).unwrap(),
        release.sha256
    );
    assert_eq!(
        m.attributes()[1],
        Attributes {
            priority: 2,
            tries: 1,
            successful: false
        }
    );

    // Power lost mid-write, with the progress file torn: staging starts over cleanly.
    let (mut m, release) = Machine::new(4 << 20).await;
    let d = wanted(&release);
    m.server.cut_next_after(2 << 20);
    assert!(m.ab.stage(&d).await.is_err());
    let progress = m.dir.path().join("ab-staging.json");
    let torn = std::fs::read(&progress).unwrap();
    std::fs::write(&progress, &torn[..torn.len() / 2]).unwrap();
    m.ab.stage(&d).await.unwrap();
    assert_eq!(*m.server.requests().last().unwrap(), 0, "started over");
    m.booted_a_untouched();
    assert_eq!(m.attributes()[1].tries, 1);
}

#[tokio::test]
async fn bad_payloads_are_refused_with_a_clear_error_and_the_booted_slot_untouched() {
    // A corrupted image: it does not hash to the signed digest.
    let (mut m, release) = Machine::new(2 << 20).await;
    let (corrupt, _) = payload(m.dir.path(), "corrupt.img", 2 << 20, &key(), "");
    let mut bytes = std::fs::read(&corrupt).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    m.server.set_image(&corrupt);
    let e = m.ab.stage(&wanted(&release)).await.unwrap_err().to_string();
    assert!(e.contains("sha256 mismatch: the release says"), "{e}");
    m.booted_a_untouched();
    assert_eq!(m.attributes()[1].priority, 0, "not armed");

    // A signature by a key the agent does not trust: refused before any download.
    let (mut m, _) = Machine::new(1 << 20).await;
    let (_, forged) = payload(
        m.dir.path(),
        "forged.img",
        1 << 20,
        &SigningKey::from_bytes(&[9; 32]),
        &m.server.url(),
    );
    let e = m.ab.stage(&wanted(&forged)).await.unwrap_err().to_string();
    assert!(
        e.contains(
            "the release signature does not verify with any of the 1 configured public key(s)"
        ),
        "{e}"
    );
    assert!(m.server.requests().is_empty(), "nothing downloaded");
    m.booted_a_untouched();

    // Larger than the slot: refused before writing.
    let (mut m, _) = Machine::new(1 << 20).await;
    let (big, release) = payload(
        m.dir.path(),
        "big.img",
        (SLOT + 4096) as usize,
        &key(),
        &m.server.url(),
    );
    m.server.set_image(&big);
    let e = m.ab.stage(&wanted(&release)).await.unwrap_err().to_string();
    assert!(
        e.contains(&format!(
            "the payload is {} bytes but slot USR-B holds only {SLOT}",
            SLOT + 4096
        )),
        "{e}"
    );
    m.booted_a_untouched();

    // Wrong labels: a clear error naming what the disk has.
    let (mut m, release) = Machine::new(1 << 20).await;
    m.ab.labels = ["ROOT-A".into(), "ROOT-B".into()];
    let e = m.ab.stage(&wanted(&release)).await.unwrap_err().to_string();
    assert!(
        e.contains("0 partitions labelled \"ROOT-A\" (partitions: USR-A, USR-B)"),
        "{e}"
    );
    m.booted_a_untouched();
}
