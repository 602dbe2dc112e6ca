//! Staging a payload into an A/B slot of an image file, against `dd` of the same file to
//! the same disk, measured in the same run.
//!
//! `cargo bench -p agent --bench stage` (1 GiB; `BATON_BENCH_MIB=256` for a quicker
//! run). Staging is the whole job: HTTPS download from loopback, the write into slot B
//! with periodic syncs, the final sync, the read-back and its SHA-256. The baseline is
//! `dd if=payload of=image bs=4M seek=<slot> oflag=seek_bytes conv=notrunc,fsync`: the
//! write alone. The staging process's peak RSS is reset before each round
//! (`/proc/self/clear_refs`) and read after it (`VmHWM`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::{
    io::Write,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use agent::{
    payload::{ReleaseRef, Stager},
    slot::create_image,
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
            let server = e2e::image_server::ImageServer::start(&served)
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
    let (mut dd, mut stage, mut peaks) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = Instant::now();
        let status = Command::new("dd")
            .arg(format!("if={}", payload.display()))
            .arg(format!("of={}", image.display()))
            .args([
                "bs=4M",
                "oflag=seek_bytes",
                "conv=notrunc,fsync",
                "status=none",
            ])
            .arg(format!("seek={}", slot.offset))
            .status()
            .unwrap();
        assert!(status.success());
        dd.push(t.elapsed());

        stager.forget();
        std::fs::write("/proc/self/clear_refs", "5").unwrap();
        let t = Instant::now();
        let written = stager.stage(&release, &image, &slot).await.unwrap();
        stage.push(t.elapsed());
        peaks.push(peak_kib());
        assert_eq!(written, (mib as u64) << 20);
        eprintln!(
            "round {}: dd {:.2?}, staging {:.2?}, peak RSS {} KiB",
            round + 1,
            dd[round],
            stage[round],
            peaks[round]
        );
    }
    let (dd, stage) = (median(dd), median(stage));
    let rate = |d: Duration| mib as f64 / d.as_secs_f64();
    let peak = *peaks.iter().max().unwrap() as f64 / 1024.0;
    println!("Staging {mib} MiB into an image file, {rounds} rounds, medians:\n");
    println!("| measure | dd (baseline) | baton staging | ratio (dd time / staging time) |");
    println!("|---|---|---|---|");
    println!(
        "| time | {:.2} s ({:.0} MiB/s) | {:.2} s ({:.0} MiB/s) | {:.2} |",
        dd.as_secs_f64(),
        rate(dd),
        stage.as_secs_f64(),
        rate(stage),
        dd.as_secs_f64() / stage.as_secs_f64()
    );
    println!("| staging peak RSS | | {peak:.1} MiB | |");
}
