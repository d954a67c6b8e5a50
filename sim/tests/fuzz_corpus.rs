//! Replays `fuzz/corpus/tunnel` through the fuzz target's own driver.

use std::path::Path;

#[test]
fn tunnel_seeds_keep_state_bounded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/tunnel");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let data = std::fs::read(e.unwrap().path()).unwrap();
        #[allow(clippy::disallowed_methods)]
        nowconnect_sim::fuzz::drive_tunnels(std::time::Instant::now(), &data);
        n += 1;
    }
    assert!(n > 0, "empty corpus {}", dir.display());
}
