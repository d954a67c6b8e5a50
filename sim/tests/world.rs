//! Seeded runs of the simulated world. A failure prints the command that
//! replays it. `NC_SIM_SEEDS=N` runs N seeds (soak); `NC_SIM_SEED=S` replays one.

use std::time::{Duration, Instant};

use nowconnect_sim::world::{Outcome, World};

#[allow(clippy::disallowed_methods)]
fn origin() -> Instant {
    // Arbitrary origin of the virtual clock; only offsets from it are used.
    Instant::now()
}

/// Chaos for 2 s of simulated time, then heal; every flow must end complete
/// or reset with a reason, and fresh flows must all complete within 10 s.
fn run(seed: u64) -> Result<Outcome, String> {
    let start = origin();
    let mut w = World::new(seed, start, 1 + (seed % 3) as usize);
    w.start_clients(40, Duration::from_millis(1500));
    w.run_until(start + Duration::from_secs(2))
        .map_err(|v| v.0)?;
    w.heal();
    w.run_until(start + Duration::from_secs(8))
        .map_err(|v| v.0)?;
    if w.open_clients() > 0 {
        return Err(format!(
            "{} flows neither completed nor reset 6 s after healing",
            w.open_clients()
        ));
    }
    let first = w.next_client_id();
    w.start_clients(10, Duration::from_millis(100));
    w.run_until(start + Duration::from_secs(18))
        .map_err(|v| v.0)?;
    let (ok, all) = w.completed_since(first);
    if ok != all {
        return Err(format!(
            "liveness: only {ok} of {all} new flows completed within 10 s after healing"
        ));
    }
    Ok(w.outcome.clone())
}

fn check(seed: u64) -> Outcome {
    run(seed).unwrap_or_else(|e| {
        panic!("seed {seed}: {e}\nreplay: NC_SIM_SEED={seed} cargo test --release -p nowconnect-sim --test world -- replay --nocapture")
    })
}

#[test]
fn ci_seed_budget() {
    let n: u64 = std::env::var("NC_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mut total = Outcome::default();
    for seed in 0..n {
        let o = check(seed);
        total.events += o.events;
        total.flows_started += o.flows_started;
        total.flows_completed += o.flows_completed;
        total.tunnel_resets += o.tunnel_resets;
        total.target_refusals += o.target_refusals;
        total.client_resets += o.client_resets;
        total.half_closes += o.half_closes;
        total.slow_readers += o.slow_readers;
        total.bytes_echoed += o.bytes_echoed;
        for (k, v) in o.flows_reset {
            *total.flows_reset.entry(k).or_default() += v;
        }
        for (k, v) in o.flows_refused {
            *total.flows_refused.entry(k).or_default() += v;
        }
    }
    println!(
        "simulated {n} seeds: {} events; faults: {} tunnel resets, {} target refusals, {} client resets, {} half-closes, {} slow readers",
        total.events,
        total.tunnel_resets,
        total.target_refusals,
        total.client_resets,
        total.half_closes,
        total.slow_readers
    );
    println!(
        "flows: {} started, {} completed, reset {:?}, refused {:?}; {} bytes echoed",
        total.flows_started,
        total.flows_completed,
        total.flows_reset,
        total.flows_refused,
        total.bytes_echoed
    );
    // The run must exercise what it claims.
    assert!(
        total.flows_completed > 0
            && total.tunnel_resets > 0
            && total.target_refusals > 0
            && total.client_resets > 0
    );
    assert!(
        total.flows_reset.contains_key("link_lost")
            && total.flows_reset.contains_key("target_unreachable")
    );
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    let a = check(7);
    let b = check(7);
    assert_eq!(a, b);
    assert_ne!(check(8).trace_hash, a.trace_hash);
}

#[test]
fn a_planted_credit_bug_is_caught_within_the_ci_budget() {
    use nowconnect_core::mux::PlantedBug;
    let start = origin();
    let caught = (0..200).find_map(|seed| {
        let mut w = World::with_bug(seed, start, 1, PlantedBug::DoubleCreditGrant);
        w.start_clients(40, Duration::from_millis(1500));
        let r = w.run_until(start + Duration::from_secs(4));
        r.err().map(|v| (seed, v.0))
    });
    let (seed, why) =
        caught.expect("the simulation did not catch a sender that overruns the credit window");
    println!("planted bug caught at seed {seed}: {why}");
    assert!(why.contains("credit_overrun"), "{why}");
}

#[test]
fn replay() {
    let seed = std::env::var("NC_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    println!("{:?}", check(seed));
}
