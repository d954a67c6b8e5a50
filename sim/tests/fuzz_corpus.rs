//! Replays the committed seeds of `fuzz/corpus/<target>` through each fuzz
//! target's own driver, so the normal suite checks what the fuzzers check.

use std::path::Path;
use std::time::Instant;

fn replay(target: &str, drive: fn(Instant, &[u8])) {
    replay_part(target, drive, 0, 1);
}

/// Every `parts`-th seed of the corpus, from the `part`-th (in name
/// order): a large corpus replayed by several tests, which run in parallel.
fn replay_part(target: &str, drive: fn(Instant, &[u8]), part: usize, parts: usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let mut n = 0;
    for path in paths.into_iter().skip(part).step_by(parts) {
        let data = std::fs::read(&path).unwrap();
        #[allow(clippy::disallowed_methods)]
        let origin = Instant::now();
        let r = std::panic::catch_unwind(|| drive(origin, &data));
        assert!(r.is_ok(), "{target}: seed {} fails", path.display());
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}

#[test]
fn tunnel_seeds_keep_state_bounded() {
    replay("tunnel", nowconnect_sim::fuzz::drive_tunnels);
}

#[test]
fn hub_seeds_keep_the_hub_consistent() {
    replay("hub", nowconnect_sim::fuzz::drive_hub);
}

#[test]
fn agent_seeds_keep_the_agent_consistent() {
    replay("agent", nowconnect_sim::fuzz::drive_agent);
}

#[test]
fn agent_seeds_keep_the_whole_agent_consistent() {
    replay("agent", nowconnect_sim::fuzz::drive_agent_node);
}

/// Beyond the corpus: 3,000 seeded random inputs through the whole agent.
#[test]
fn random_inputs_keep_the_whole_agent_consistent() {
    let mut rng = nowconnect_core::rng::Rng::new(20);
    for _ in 0..3000 {
        let len = 1 + rng.below(400) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        nowconnect_sim::fuzz::drive_agent_node(std::time::Instant::now(), &data);
    }
}

// The world corpus (about 1,500 seeds, each a whole simulated cluster) in
// two halves, one per core.
#[test]
fn world_seeds_hold_every_invariant() {
    replay_part("world", nowconnect_sim::fuzz::drive_world, 0, 2);
}

#[test]
fn world_seeds_hold_every_invariant_second_half() {
    replay_part("world", nowconnect_sim::fuzz::drive_world, 1, 2);
}
