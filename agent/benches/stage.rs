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
//!
//! Then, on the same disk, a workload's read latency: `fio` random 4 KiB reads with
//! direct I/O at queue depth 1 from a 1 GiB file, alone and beside each disturbance
//! (baton staging with its defaults, unpaced, and rate-limited; `dd` with direct I/O and
//! through the page cache). `BATON_BENCH_PART=stage|workload` runs one part only.
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

    let part = std::env::var("BATON_BENCH_PART").unwrap_or_default();
    if part != "stage" {
        bench.workload(dir.path()).await;
    }
    if part == "workload" {
        return;
    }
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

/// A workload's read latency over one measurement, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
    iops: f64,
}

/// What runs beside the workload.
#[derive(Debug, Clone, Copy)]
enum Disturbance {
    Nothing,
    Staging(agent::pace::Pace),
    Dd(&'static str),
}

impl Disturbance {
    fn label(&self) -> String {
        use agent::pace::{IoClass, Pace};
        match self {
            Disturbance::Nothing => "the workload alone (baseline)".into(),
            Disturbance::Staging(p) if *p == Pace::gentle() => {
                "baton staging, defaults (idle I/O class, nice 19)".into()
            }
            Disturbance::Staging(p) if *p == Pace::unpaced() => {
                "baton staging, unpaced (the agent's own priority)".into()
            }
            Disturbance::Staging(p) => format!(
                "baton staging, {}, nice {}, `--stage-rate-limit {}`",
                match p.io {
                    IoClass::Idle => "idle I/O class",
                    IoClass::BestEffort => "best-effort I/O class",
                    IoClass::Inherit => "own I/O class",
                },
                p.nice,
                p.rate.unwrap_or(0) >> 20
            ),
            Disturbance::Dd(flag) if flag.contains("direct") => {
                "`dd oflag=direct conv=fsync`".into()
            }
            Disturbance::Dd(_) => "`dd conv=fsync` (through the page cache)".into(),
        }
    }
}

/// The workload: `fio` random 4 KiB reads, direct I/O, queue depth 1, from a 1 GiB
/// file on the bench's disk, until it is told to stop.
struct Workload {
    file: PathBuf,
    out: PathBuf,
}

impl Workload {
    /// Lays the file out (so the measured runs only read).
    fn prepare(dir: &Path) -> Workload {
        let w = Workload {
            file: dir.join("workload.dat"),
            out: dir.join("fio.json"),
        };
        let status = Command::new("fio")
            .args(w.args())
            .arg("--create_only=1")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("fio is installed (Debian's fio; the test command installs it)");
        assert!(status.success());
        w
    }

    fn args(&self) -> Vec<String> {
        [
            "--name=workload",
            "--rw=randread",
            "--bs=4k",
            "--direct=1",
            "--ioengine=psync",
            "--iodepth=1",
            "--size=1G",
            "--time_based",
            "--runtime=600",
            "--percentile_list=50:99:99.9",
            "--output-format=json",
        ]
        .into_iter()
        .map(String::from)
        .chain([
            format!("--filename={}", self.file.display()),
            format!("--output={}", self.out.display()),
        ])
        .collect()
    }

    fn start(&self) -> std::process::Child {
        let _ = std::fs::remove_file(&self.out);
        Command::new("fio")
            .args(self.args())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Stops it (SIGINT: fio ends its jobs and writes its report) and reads the report.
    fn stop(&self, mut child: std::process::Child) -> Latency {
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
        // fio exits non-zero when interrupted; its report is complete all the same.
        child.wait().unwrap();
        let text = std::fs::read_to_string(&self.out).unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&text[text.find('{').unwrap()..]).expect("fio's JSON report");
        let read = &report["jobs"][0]["read"];
        let pct = |p: &str| read["clat_ns"]["percentile"][p].as_f64().unwrap() / 1000.0;
        Latency {
            p50: pct("50.000000"),
            p99: pct("99.000000"),
            p999: pct("99.900000"),
            iops: read["iops"].as_f64().unwrap(),
        }
    }
}

impl Bench {
    /// The workload's latency alone and beside each disturbance, `rounds` times in turn;
    /// medians. The workload runs 0.5 s before each disturbance and stops as it ends.
    async fn workload(&self, dir: &Path) {
        use agent::pace::Pace;
        let workload = Workload::prepare(dir);
        let gentle = Pace {
            piece: std::env::var("BATON_BENCH_PIECE_KIB")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .map_or(Pace::gentle().piece, |k| (k > 0).then_some(k << 10)),
            ..Pace::gentle()
        };
        let rows = [
            Disturbance::Nothing,
            Disturbance::Staging(gentle),
            Disturbance::Staging(Pace::unpaced()),
            Disturbance::Staging(Pace {
                rate: Some(100 << 20),
                ..gentle
            }),
            Disturbance::Dd("seek_bytes,direct"),
            Disturbance::Dd("seek_bytes"),
        ];
        let mut measured: Vec<Vec<(Latency, Duration)>> = vec![Vec::new(); rows.len()];
        for round in 0..self.rounds {
            for (i, row) in rows.iter().enumerate() {
                let fio = workload.start();
                tokio::time::sleep(Duration::from_millis(500)).await;
                let t = Instant::now();
                match row {
                    Disturbance::Nothing => tokio::time::sleep(Duration::from_secs(10)).await,
                    Disturbance::Staging(pace) => {
                        let stager = Stager {
                            pace: *pace,
                            ..self.stager.clone()
                        };
                        stager.forget();
                        stager
                            .stage(&self.release, &self.image, &self.slot)
                            .await
                            .unwrap();
                    }
                    Disturbance::Dd(flag) => {
                        self.dd(flag);
                    }
                }
                let took = t.elapsed();
                let latency = workload.stop(fio);
                eprintln!(
                    "workload round {}: {}: {took:.2?}, {latency:?}",
                    round + 1,
                    row.label()
                );
                measured[i].push((latency, took));
            }
        }
        let med = |v: &[(Latency, Duration)], f: fn(&Latency) -> f64| {
            let mut x: Vec<f64> = v.iter().map(|(l, _)| f(l)).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        let alone = med(&measured[0], |l| l.p99);
        println!(
            "A workload's random 4 KiB reads (fio, direct I/O, queue depth 1) beside each writer of {} MiB, {} rounds, medians:\n",
            self.mib, self.rounds
        );
        println!(
            "| beside the workload | its duration | read p50 | read p99 | read p99.9 | reads/s | p99 / alone (target ≤ 1.5 for baton) |"
        );
        println!("|---|---|---|---|---|---|---|");
        for (row, m) in rows.iter().zip(&measured) {
            let took = median(m.iter().map(|(_, d)| *d).collect());
            let p99 = med(m, |l| l.p99);
            println!(
                "| {} | {} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} | **{:.2}** |",
                row.label(),
                if matches!(row, Disturbance::Nothing) {
                    "—".to_string()
                } else {
                    format!("{:.2} s", took.as_secs_f64())
                },
                med(m, |l| l.p50),
                p99,
                med(m, |l| l.p999),
                med(m, |l| l.iops),
                p99 / alone
            );
        }
        println!();
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
