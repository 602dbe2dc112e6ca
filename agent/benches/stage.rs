//! Staging a payload into an A/B slot of an image file, against `dd` of the same file to
//! the same disk, measured in the same run.
//!
//! `cargo bench -p agent --bench stage` (1 GiB; `BATON_BENCH_MIB=256` for a quicker
//! run). Staging is the whole job: HTTPS download from loopback, the write into slot B
//! with periodic syncs, the final sync, the read-back and its SHA-256. The baselines
//! are the write alone, `dd if=payload of=image bs=4M seek=<slot> conv=notrunc,fsync`
//! with `oflag=seek_bytes,direct` (direct I/O, as the agent writes) and with
//! `oflag=seek_bytes` (through the page cache). The staging process's peak RSS is reset before each round
//! (`/proc/self/clear_refs`) and read after it (`VmHWM`).
//!
//! Two floors are measured in the same run on the unthrottled disk: the HTTPS download
//! alone (bytes discarded) and the SHA-256 of the payload alone (in memory). Staging
//! cannot finish before either, so `dd direct / max(floors)` is the highest ratio any
//! staging that downloads and checks the payload could reach on this machine.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agent::{
    payload::{ReleaseRef, Stager},
    slot::{Slot, create_image},
};
use sha2::{Digest, Sha256};

fn peak_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Writes `mib` MiB of pseudo-random bytes with a 1 MiB buffer; returns the SHA-256.
fn make_payload(path: &Path, mib: usize) -> String {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut hasher = Sha256::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        hasher.update(&buf);
        file.write_all(&buf).unwrap();
    }
    file.into_inner().unwrap().sync_all().unwrap();
    hex::encode(hasher.finalize())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mib: usize = std::env::var("BATON_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rounds = 3;
    let dir = tempfile::Builder::new()
        .prefix("baton-bench-stage-")
        .tempdir()
        .unwrap();
    let payload = dir.path().join("payload.img");
    let sha256 = make_payload(&payload, mib);
    let image = dir.path().join("disk.img");
    let slots = create_image(
        &image,
        ["USR-A", "USR-B"],
        ((mib as u64) << 20) + (16 << 20),
    )
    .unwrap();
    let slot = slots.slots[1].clone();
    // The server runs on a thread of its own, as a remote mirror would: its TLS and file
    // reads are not the agent's work.
    let (tx, rx) = std::sync::mpsc::channel();
    let served = payload.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let server = harness::image_server::ImageServer::start(&served)
                .await
                .unwrap();
            tx.send((server.url(), server.ca_file().to_path_buf()))
                .unwrap();
            std::future::pending::<()>().await;
            drop(server);
        });
    });
    let (url, ca) = rx.recv().unwrap();
    let release = ReleaseRef {
        url,
        sha256: sha256.clone(),
        signature: String::new(), // the backend checks it before staging; not measured
    };
    let stager = Stager::new(dir.path(), Some(&ca)).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap())
        .build()
        .unwrap();
    let bench = Bench {
        payload,
        image,
        slot,
        release,
        stager,
        http,
        mib,
        rounds,
    };
    let disk = whole_disk(&bench.image);
    let speeds: Vec<u64> = std::env::var("BATON_BENCH_DISK_MIBPS")
        .unwrap_or_else(|_| "500,125".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();

    let unthrottled = bench.run(true).await;
    let floors = bench.floors().await;
    let mut rows = vec![("this machine's disk, as is".to_string(), unthrottled)];
    for mibps in speeds {
        let label = format!("the same disk limited to {mibps} MiB/s (read and write)");
        match Throttle::apply(disk, mibps << 20) {
            Ok(throttle) => {
                let measured = bench.run(false).await;
                drop(throttle);
                rows.push((label, measured));
            }
            Err(why) => eprintln!("skipped {label}: {why}"),
        }
    }
    println!("Staging {mib} MiB into an image file, {rounds} rounds each, medians:\n");
    println!(
        "| disk | `dd oflag=direct conv=fsync` (baseline) | `dd conv=fsync` | baton staging | ratio (dd direct / staging) | staging peak RSS |"
    );
    println!("|---|---|---|---|---|---|");
    let rate = |d: Duration| {
        format!(
            "{:.2} s ({:.0} MiB/s)",
            d.as_secs_f64(),
            mib as f64 / d.as_secs_f64()
        )
    };
    let dd_direct = rows[0].1.dd_direct;
    for (label, m) in rows {
        println!(
            "| {label} | {} | {} | {} | **{:.2}** | {:.1} MiB |",
            rate(m.dd_direct),
            m.dd.map_or("—".into(), rate),
            rate(m.stage),
            m.dd_direct.as_secs_f64() / m.stage.as_secs_f64(),
            m.peak_kib as f64 / 1024.0
        );
    }
    let floor = floors.download.max(floors.sha256);
    println!("\nFloors on this machine's CPU, same run (medians):\n");
    println!(
        "| HTTPS download alone | SHA-256 alone | dd direct | highest reachable ratio (dd direct / slower floor) |"
    );
    println!("|---|---|---|---|");
    println!(
        "| {} | {} | {} | {:.2} |",
        rate(floors.download),
        rate(floors.sha256),
        rate(dd_direct),
        dd_direct.as_secs_f64() / floor.as_secs_f64()
    );
}

/// The time of the work staging cannot skip, each part alone.
struct Floors {
    download: Duration,
    sha256: Duration,
}

/// Medians of one configuration.
struct Measured {
    dd_direct: Duration,
    dd: Option<Duration>,
    stage: Duration,
    peak_kib: u64,
}

struct Bench {
    payload: PathBuf,
    image: PathBuf,
    slot: Slot,
    release: ReleaseRef,
    stager: Stager,
    http: reqwest::Client,
    mib: usize,
    rounds: usize,
}

impl Bench {
    fn dd(&self, oflag: &str) -> Duration {
        let t = Instant::now();
        let status = Command::new("dd")
            .arg(format!("if={}", self.payload.display()))
            .arg(format!("of={}", self.image.display()))
            .args([
                "bs=4M",
                &format!("oflag={oflag}"),
                "conv=notrunc,fsync",
                "status=none",
            ])
            .arg(format!("seek={}", self.slot.offset))
            .status()
            .unwrap();
        assert!(status.success());
        t.elapsed()
    }

    /// `rounds` of the download alone (same server, bytes discarded) and the SHA-256 of
    /// the payload alone (from memory).
    async fn floors(&self) -> Floors {
        use futures::StreamExt;
        let (mut download, mut sha256) = (Vec::new(), Vec::new());
        let block = vec![0x5au8; 2 << 20];
        for _ in 0..self.rounds {
            let t = Instant::now();
            let response = self.http.get(&self.release.url).send().await.unwrap();
            let mut body = response.bytes_stream();
            let mut got = 0u64;
            while let Some(chunk) = body.next().await {
                got += chunk.unwrap().len() as u64;
            }
            download.push(t.elapsed());
            assert_eq!(got, (self.mib as u64) << 20);
            let t = Instant::now();
            let mut hasher = Sha256::new();
            for _ in 0..self.mib / 2 {
                hasher.update(&block);
            }
            std::hint::black_box(hasher.finalize());
            sha256.push(t.elapsed());
        }
        eprintln!("floors: download {download:.2?}, SHA-256 {sha256:.2?}");
        Floors {
            download: median(download),
            sha256: median(sha256),
        }
    }

    /// `rounds` of: dd with direct I/O (as the agent writes), dd through the page
    /// cache (when `buffered`: a throttle does not bound page-cache writeback
    /// reliably), then staging.
    async fn run(&self, buffered: bool) -> Measured {
        let (mut dd_direct, mut dd, mut stage, mut peak) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for round in 0..self.rounds {
            dd_direct.push(self.dd("seek_bytes,direct"));
            if buffered {
                dd.push(self.dd("seek_bytes"));
            }
            self.stager.forget();
            std::fs::write("/proc/self/clear_refs", "5").unwrap();
            let t = Instant::now();
            let written = self
                .stager
                .stage(&self.release, &self.image, &self.slot)
                .await
                .unwrap();
            stage.push(t.elapsed());
            let round_peak = peak_kib();
            peak = peak.max(round_peak);
            assert_eq!(written, (self.mib as u64) << 20);
            eprintln!(
                "round {}: dd direct {:.2?}, dd {:?}, staging {:.2?}, peak RSS {round_peak} KiB",
                round + 1,
                dd_direct[round],
                dd.get(round),
                stage[round],
            );
        }
        Measured {
            dd_direct: median(dd_direct),
            dd: (!dd.is_empty()).then(|| median(dd)),
            stage: median(stage),
            peak_kib: peak,
        }
    }
}

/// The whole disk (major, minor) holding `path`: block throttles apply to disks, not
/// partitions.
fn whole_disk(path: &Path) -> (u32, u32) {
    let dev = rustix::fs::stat(path).unwrap().st_dev;
    let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists()
        && let Ok(parent) = std::fs::read_to_string(sys.join("../dev"))
        && let Some((a, b)) = parent.trim().split_once(':')
    {
        return (a.parse().unwrap(), b.parse().unwrap());
    }
    (major, minor)
}

/// This process (and the `dd`s it starts) in a cgroup-v1 blkio group limited to `bps`
/// for reads and writes of one disk, as on a slower device; back out when dropped.
/// Needs root and the v1 blkio controller; on other machines the throttled rows are
/// skipped with the reason.
struct Throttle {
    group: PathBuf,
}

impl Throttle {
    const ROOT: &str = "/sys/fs/cgroup/blkio";

    fn apply(disk: (u32, u32), bps: u64) -> Result<Throttle, String> {
        let root = Path::new(Self::ROOT);
        if !root.join("blkio.throttle.write_bps_device").exists() {
            return Err("no cgroup-v1 blkio controller at /sys/fs/cgroup/blkio".into());
        }
        let group = root.join(format!("baton-bench-{}", std::process::id()));
        std::fs::create_dir_all(&group)
            .map_err(|e| format!("creating {}: {e}", group.display()))?;
        let rule = format!("{}:{} {bps}", disk.0, disk.1);
        for file in [
            "blkio.throttle.write_bps_device",
            "blkio.throttle.read_bps_device",
        ] {
            std::fs::write(group.join(file), &rule).map_err(|e| format!("{file}: {e}"))?;
        }
        std::fs::write(group.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| format!("joining {}: {e}", group.display()))?;
        Ok(Throttle { group })
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        let _ = std::fs::write(
            Path::new(Self::ROOT).join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = std::fs::remove_dir(&self.group);
    }
}
