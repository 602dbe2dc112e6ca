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
use ed25519_dalek::{Signer, SigningKey};
use harness::image_server::ImageServer;
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
        Machine::on(payload_len, |image| {
            create_image(image, LABELS, SLOT).unwrap();
        })
        .await
    }

    /// A machine whose disk `build` creates.
    async fn on(payload_len: usize, build: impl FnOnce(&Path)) -> (Machine, ReleaseRef) {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        build(&image);
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

// === A real Flatcar disk: its layout, with cgpt as the reference ===

/// Flatcar's partition types.
const EFI: &str = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b";
const BIOS: &str = "21686148-6449-6e6f-744e-656564454649";
const USR: &str = "5dfbf5f4-2848-4bac-aa5e-0d9a20b745a6";
const OEM: &str = "c95dc21a-df0e-4340-8d7b-26cbfa9a03e0";
const RESIZE: &str = "3884dd41-8582-4404-b9a8-e9b84f2df50e";

fn run(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (the README's test command installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Flatcar's real layout (`build_library/disk_layout.json`), scaled down: its entry
/// numbers with the gaps at 5 (ROOT-C) and 8, its type GUIDs, names and the fixed USR
/// partition GUIDs, attribute bits on other entries (EFI "required", BIOS-BOOT "legacy
/// BIOS bootable"), and USR-A booted and proven (priority 1, successful).
fn flatcar_disk(image: &Path, usr_first: [&str; 2]) {
    let img = image.to_str().unwrap();
    run("truncate", &["-s", "80M", img]);
    run("sgdisk", &["--clear", img]);
    let usr = |n: &str, label: &str, uuid: &str| {
        vec![
            format!("--new={n}:0:+{}M", SLOT >> 20),
            format!("--typecode={n}:{USR}"),
            format!("--change-name={n}:{label}"),
            format!("--partition-guid={n}:{uuid}"),
        ]
    };
    let mut args: Vec<String> = vec![
        "--new=1:2048:+4M".into(),
        format!("--typecode=1:{EFI}"),
        "--change-name=1:EFI-SYSTEM".into(),
        "--attributes=1:set:0".into(),
        "--new=2:0:+1M".into(),
        format!("--typecode=2:{BIOS}"),
        "--change-name=2:BIOS-BOOT".into(),
        "--attributes=2:set:2".into(),
    ];
    args.extend(usr(
        "3",
        usr_first[0],
        "7130c94a-213a-4e5a-8e26-6cce9662f132",
    ));
    args.extend(usr(
        "4",
        usr_first[1],
        "e03dd35c-7c2d-4a47-b3fe-27f15780a57c",
    ));
    args.extend([
        "--new=6:0:+4M".into(),
        format!("--typecode=6:{OEM}"),
        "--change-name=6:OEM".into(),
        "--new=7:0:+2M".into(),
        format!("--typecode=7:{OEM}"),
        "--change-name=7:OEM-CONFIG".into(),
        "--attributes=7:set:60".into(),
        "--new=9:0:0".into(),
        format!("--typecode=9:{RESIZE}"),
        "--change-name=9:ROOT".into(),
        img.into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("sgdisk", &args);
    let a = if usr_first[0] == "USR-A" { "3" } else { "4" };
    run(
        "cgpt",
        &["add", "-i", a, "-P", "1", "-T", "0", "-S", "1", img],
    );
}

/// What cgpt reads back for entry `n`: (priority, tries, successful).
fn cgpt_bits(image: &Path, n: u32) -> Attributes {
    let img = image.to_str().unwrap();
    let field = |flag: &str| -> u8 {
        run("cgpt", &["show", "-i", &n.to_string(), flag, img])
            .trim()
            .parse()
            .unwrap()
    };
    Attributes {
        priority: field("-P"),
        tries: field("-T"),
        successful: field("-S") == 1,
    }
}

/// GRUB's gptprio.next, written here from its rules, over what cgpt reads back: every
/// /usr-typed entry in table order; bootable with tries or successful, and only above
/// the best priority so far (starting at 0).
fn grub_choice(image: &Path) -> Option<u32> {
    let img = image.to_str().unwrap();
    let mut best = (0u8, None);
    for n in 1..=9u32 {
        let t = std::process::Command::new("cgpt")
            .args(["show", "-i", &n.to_string(), "-t", img])
            .output()
            .unwrap();
        let t = String::from_utf8_lossy(&t.stdout)
            .trim()
            .to_ascii_lowercase();
        if t != USR {
            continue;
        }
        let a = cgpt_bits(image, n);
        if (a.tries > 0 || a.successful) && a.priority > best.0 {
            best = (a.priority, Some(n));
        }
    }
    best.1
}

/// Both GPT headers and entry arrays, byte for byte: (primary header LBA, primary
/// array, backup array, backup header LBA).
fn tables(image: &Path) -> Vec<u8> {
    let disk = std::fs::read(image).unwrap();
    let last = disk.len() - 512;
    [
        &disk[512..1024],
        &disk[1024..1024 + 128 * 128],
        &disk[last - 128 * 128..last],
        &disk[last..],
    ]
    .concat()
}

/// The offsets in [`tables`] that a write of slot attributes may change: the two
/// header CRCs and the two array CRCs, and the attribute fields of entries 3 and 4.
fn allowed(offset: usize) -> bool {
    let header = |o: usize| (16..20).contains(&o) || (88..92).contains(&o);
    let entry = |o: usize| {
        let (n, within) = (o / 128 + 1, o % 128);
        (n == 3 || n == 4) && (48..56).contains(&within)
    };
    let array = 128 * 128;
    match offset {
        o if o < 512 => header(o),
        o if o < 512 + array => entry(o - 512),
        o if o < 512 + 2 * array => entry(o - 512 - array),
        o => header(o - 512 - 2 * array),
    }
}

/// Checks that between `before` and now only allowed bytes changed, and that the rest
/// of the disk (every partition's data but USR-B's, which staging writes) is intact.
fn only_attributes_changed(
    step: &str,
    image: &Path,
    before: &(Vec<u8>, Vec<u8>),
) -> (Vec<u8>, Vec<u8>) {
    let now_tables = tables(image);
    let changed: Vec<usize> = (0..now_tables.len())
        .filter(|o| now_tables[*o] != before.0[*o])
        .collect();
    let stray: Vec<usize> = changed.iter().copied().filter(|o| !allowed(*o)).collect();
    assert!(
        stray.is_empty(),
        "{step}: {} bytes outside the slot attributes and CRCs changed, first at {:?}",
        stray.len(),
        &stray[..stray.len().min(16)]
    );
    let verify = run("sgdisk", &["--verify", image.to_str().unwrap()]);
    assert!(verify.contains("No problems found"), "{step}: {verify}");
    let outside = outside_usr_b(image);
    assert!(outside == before.1, "{step}: data outside USR-B changed");
    (now_tables, outside)
}

/// Every byte of the disk except USR-B's data and the two tables.
fn outside_usr_b(image: &Path) -> Vec<u8> {
    let disk = std::fs::read(image).unwrap();
    let b = Slots::open(image, LABELS).unwrap().slots[1].clone();
    let last = disk.len() - 512 - 128 * 128;
    [
        &disk[..512],
        &disk[1024 + 128 * 128..b.offset as usize],
        &disk[(b.offset + b.len) as usize..last],
    ]
    .concat()
}

/// cgpt reads back the bits baton meant, and GRUB's rules over them choose the boot
/// baton's model chooses.
fn cgpt_agrees(step: &str, image: &Path) {
    let slots = Slots::open(image, LABELS).unwrap();
    for s in &slots.slots {
        assert_eq!(
            cgpt_bits(image, s.number),
            s.attributes,
            "{step}: {}",
            s.label
        );
    }
    let entries = agent::gptprio::entries(image).unwrap();
    assert_eq!(
        agent::gptprio::next(&entries).map(|e| e.number),
        grub_choice(image),
        "{step}: the next boot"
    );
}

#[tokio::test]
async fn every_lifecycle_step_on_flatcars_layout_changes_only_the_slot_bits() {
    let (mut m, release) = Machine::on(5 << 20, |image| flatcar_disk(image, LABELS)).await;
    let d = wanted(&release);
    let layout = run("sgdisk", &["--print", m.image.to_str().unwrap()]);
    let mut before = (tables(&m.image), outside_usr_b(&m.image));
    cgpt_agrees("fresh", &m.image);

    m.ab.stage(&d).await.unwrap();
    before = only_attributes_changed("stage and arm", &m.image, &before);
    cgpt_agrees("stage and arm", &m.image);
    assert_eq!(
        cgpt_bits(&m.image, 4),
        Attributes {
            priority: 2,
            tries: 1,
            successful: false
        }
    );
    assert_eq!(m.slots().slots[1].number, 4, "USR-B is still entry 4");

    // A good boot of the new slot: its try is used, then it is committed.
    m.reboot();
    before = only_attributes_changed("boot of USR-B", &m.image, &before);
    cgpt_agrees("boot of USR-B", &m.image);
    m.ab.commit().await.unwrap();
    before = only_attributes_changed("commit", &m.image, &before);
    cgpt_agrees("commit", &m.image);

    // The manual rollback, then its boot.
    assert_eq!(m.ab.rollback().unwrap(), "USR-A");
    before = only_attributes_changed("manual rollback", &m.image, &before);
    cgpt_agrees("manual rollback", &m.image);
    m.reboot();
    before = only_attributes_changed("boot after the rollback", &m.image, &before);
    cgpt_agrees("boot after the rollback", &m.image);

    // A bad boot: armed again, the new slot fails once and the old one boots.
    m.ab.stage(&d).await.unwrap();
    before = only_attributes_changed("stage again", &m.image, &before);
    std::fs::write(m.dir.path().join("fail-next-boot"), "").unwrap();
    m.reboot();
    only_attributes_changed("failed boot", &m.image, &before);
    cgpt_agrees("failed boot", &m.image);
    assert_eq!(
        std::fs::read_to_string(m.dir.path().join("booted-slot")).unwrap(),
        "USR-A"
    );

    // The table still reads as it did: same numbers, names, types and GUIDs.
    let after = run("sgdisk", &["--print", m.image.to_str().unwrap()]);
    assert_eq!(after, layout, "the partition table's listing is unchanged");
}

#[test]
fn states_that_cgpt_writes_are_read_as_grub_would_read_them() {
    let dir = tempfile::tempdir().unwrap();
    // (priorities, tries, successful) for entries 3 and 4, including states baton never
    // writes itself.
    let rows: [([u8; 2], [u8; 2], [u8; 2]); 6] = [
        ([1, 2], [0, 1], [1, 0]),
        ([2, 2], [0, 3], [1, 0]),
        ([1, 1], [3, 0], [1, 1]),
        ([0, 0], [0, 0], [1, 1]),
        ([3, 2], [0, 2], [0, 1]),
        ([15, 14], [15, 0], [1, 1]),
    ];
    for order in [LABELS, ["USR-B", "USR-A"]] {
        for (p, t, s) in rows {
            let image = dir.path().join("disk.img");
            let _ = std::fs::remove_file(&image);
            flatcar_disk(&image, order);
            let img = image.to_str().unwrap();
            for (i, n) in ["3", "4"].iter().enumerate() {
                run(
                    "cgpt",
                    &[
                        "add",
                        "-i",
                        n,
                        "-P",
                        &p[i].to_string(),
                        "-T",
                        &t[i].to_string(),
                        "-S",
                        &s[i].to_string(),
                        img,
                    ],
                );
            }
            let step = format!("{order:?} P{p:?} T{t:?} S{s:?}");
            cgpt_agrees(&step, &image);
            let slots = Slots::open(&image, LABELS).unwrap();
            let by_entry = |n: u32| slots.slots.iter().find(|s| s.number == n).unwrap();
            for (i, n) in [3u32, 4].iter().enumerate() {
                assert_eq!(
                    by_entry(*n).attributes,
                    Attributes {
                        priority: p[i],
                        tries: t[i],
                        successful: s[i] == 1
                    },
                    "{step}"
                );
            }
        }
    }
}

/// The staging threads seen from outside while a rate-limited staging runs: each one's
/// name, I/O priority class (3: idle) and nice value, from `ioprio_get` and
/// `/proc/self/task/<tid>/stat`.
fn staging_threads() -> Vec<(String, u16, i64)> {
    let mut seen = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let name = comm.trim().to_string();
        if !name.starts_with("baton-") {
            continue;
        }
        let tid: i32 = task.file_name().to_string_lossy().parse().unwrap();
        let Ok(prio) = ioprio::get_priority(ioprio::Target::Process(ioprio::Pid::from_raw(tid)))
        else {
            continue; // it just ended
        };
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Field 19 is the nice value; the fields after the ")" that ends comm start at 3.
        let Some(nice) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        seen.push((name, prio.inner() >> 13, nice));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_runs_in_the_idle_io_class_at_nice_19_and_within_its_rate() {
    let mib = 12u64;
    let (mut m, release) = Machine::new((mib << 20) as usize).await;
    let rate = 4u64 << 20;
    m.ab.stager.pace.rate = Some(rate);
    let d = wanted(&release);
    let started = std::time::Instant::now();
    let watch = tokio::spawn(async {
        let mut seen = std::collections::BTreeMap::new();
        loop {
            for (name, class, nice) in staging_threads() {
                seen.insert(name, (class, nice));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            if seen.len() >= 3 {
                return seen;
            }
        }
    });
    m.ab.stage(&d).await.unwrap();
    let took = started.elapsed();
    let seen = tokio::time::timeout(std::time::Duration::from_secs(1), watch)
        .await
        .expect("the writer, the read-back and the hash thread were all seen while staging")
        .unwrap();
    for name in ["baton-write", "baton-read", "baton-hash"] {
        assert_eq!(seen.get(name), Some(&(3, 19)), "{name}: {seen:?}");
    }
    // Writes and read-back share the rate: 2 × 12 MiB at 4 MiB/s with one second's
    // burst cannot take less than 5 s.
    let floor = (2 * (mib << 20) - rate) as f64 / rate as f64;
    assert!(
        took.as_secs_f64() >= floor,
        "{took:?} for {} MiB at {} MiB/s",
        2 * mib,
        rate >> 20
    );
    let b = m.slots().slots[1].clone();
    assert_eq!(
        hash_back(&m.image, b.offset, mib << 20).unwrap(),
        release.sha256
    );
}
