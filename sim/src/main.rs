//! `cargo run --release -p sim -- --seeds N` explores N scenarios;
//! `--seed S --trace` replays one and prints its whole trace. A failure prints its
//! seed, the property, the shrunk scenario and its trace, and exits 1.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;

use sim::{run, scenario::Scenario, shrink};

/// Deterministic simulation of baton under faults and admin actions.
#[derive(Debug, Parser)]
#[command(name = "sim")]
struct Args {
    /// Explore this many scenarios (seeds `first-seed..first-seed+N`).
    #[arg(long, default_value_t = 10_000)]
    seeds: u64,
    /// The first seed explored.
    #[arg(long, default_value_t = 1)]
    first_seed: u64,
    /// Replay this one seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Print the whole trace of the replayed seed.
    #[arg(long)]
    trace: bool,
    /// Fail unless the exploration took at least this many steps in all.
    #[arg(long, default_value_t = 0)]
    min_steps: u64,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    jobs: Option<usize>,
    /// Stop exploring at the first broken property (to measure how fast one is found).
    #[arg(long)]
    until_found: bool,
    /// Runs tried while shrinking a failure.
    #[arg(long, default_value_t = 300)]
    shrink_trials: usize,
}

fn main() {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        std::process::exit(replay(seed, args.trace));
    }
    std::process::exit(explore(&args));
}

fn replay(seed: u64, full: bool) -> i32 {
    let scenario = Scenario::generate(seed);
    println!(
        "seed {seed}: {} nodes, {} policies, {} events, faults until {}s",
        scenario.nodes,
        scenario.policies.len(),
        scenario.events.len(),
        scenario.quiet_at.as_secs()
    );
    for (at, e) in &scenario.events {
        println!("  at {:>5}s {e:?}", at.as_secs());
    }
    let out = run::run(&scenario, full);
    for entry in &out.trace {
        println!("{entry}");
    }
    println!(
        "{} steps, {} trace entries, ended at {}s virtual",
        out.steps,
        out.trace_len,
        out.ended_at.as_secs()
    );
    match out.violation {
        Some(v) => {
            println!(
                "VIOLATION {} at {:.3}s: {}",
                v.property,
                v.at.as_secs_f64(),
                v.message
            );
            1
        }
        None => {
            println!("no property broken");
            0
        }
    }
}

fn explore(args: &Args) -> i32 {
    let started = Instant::now();
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let next = AtomicU64::new(args.first_seed);
    let last = args.first_seed + args.seeds;
    let steps = AtomicU64::new(0);
    let virtual_ms = AtomicU64::new(0);
    let found = std::sync::atomic::AtomicBool::new(false);
    let tried = AtomicU64::new(0);
    let mut failures: Vec<(u64, run::Outcome)> = Vec::new();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| {
                    let mut failed = Vec::new();
                    loop {
                        if args.until_found && found.load(Ordering::SeqCst) {
                            return failed;
                        }
                        let seed = next.fetch_add(1, Ordering::SeqCst);
                        if seed >= last {
                            return failed;
                        }
                        tried.fetch_add(1, Ordering::Relaxed);
                        let out = run::run(&Scenario::generate(seed), false);
                        steps.fetch_add(out.steps, Ordering::Relaxed);
                        virtual_ms.fetch_add(out.ended_at.as_millis() as u64, Ordering::Relaxed);
                        if out.violation.is_some() {
                            found.store(true, Ordering::SeqCst);
                            failed.push((seed, out));
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            if let Ok(f) = w.join() {
                failures.extend(f);
            }
        }
    });
    failures.sort_by_key(|(seed, _)| *seed);
    let elapsed = started.elapsed();
    let steps = steps.load(Ordering::Relaxed);
    let tried = tried.load(Ordering::Relaxed);
    println!(
        "explored {tried} scenarios (of seeds {}..{}), {} steps, {:.0} virtual hours, in {:.1}s on {jobs} thread(s) ({:.0} steps/s)",
        args.first_seed,
        last,
        steps,
        Duration::from_millis(virtual_ms.load(Ordering::Relaxed)).as_secs_f64() / 3600.0,
        elapsed.as_secs_f64(),
        steps as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    let mut code = 0;
    if steps < args.min_steps {
        println!(
            "FAILED: {steps} steps, fewer than the required {}",
            args.min_steps
        );
        code = 1;
    }
    if let Some((seed, out)) = failures.first() {
        code = 1;
        let v = out.violation.clone().unwrap_or_else(unreachable_violation);
        println!(
            "{} scenario(s) broke a property; the first:",
            failures.len()
        );
        println!(
            "VIOLATION {} in seed {seed} at {:.3}s: {}",
            v.property,
            v.at.as_secs_f64(),
            v.message
        );
        let (small, shrunk) =
            shrink::shrink(&Scenario::generate(*seed), v.property, args.shrink_trials);
        println!(
            "shrunk to {} event(s), faults until {}s, {} trace entries:",
            small.events.len(),
            small.quiet_at.as_secs(),
            shrunk.trace_len
        );
        for (at, e) in &small.events {
            println!("  at {:>5}s {e:?}", at.as_secs());
        }
        println!("last trace entries:");
        for entry in &shrunk.trace {
            println!("{entry}");
        }
        println!(
            "FOUND property={} seed={seed} scenarios={tried} seconds={:.1} shrunk_events={} shrunk_trace={}",
            v.property,
            elapsed.as_secs_f64(),
            small.events.len(),
            shrunk.trace_len
        );
        println!("replay: cargo run --release -p sim -- --seed {seed} --trace");
        for (seed, out) in failures.iter().skip(1).take(20) {
            if let Some(v) = &out.violation {
                println!("also seed {seed}: {} {}", v.property, v.message);
            }
        }
    }
    code
}

#[allow(clippy::panic)]
fn unreachable_violation() -> sim::check::Violation {
    panic!("a failure has a violation")
}
