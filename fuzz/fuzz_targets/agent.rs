#![no_main]
//! See `nowconnect_sim::fuzz::drive_agent` (the control machine) and
//! `drive_agent_node` (the whole agent), fed the same bytes: the drivers live
//! there so the corpus replay test in the normal suite means the same thing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = std::time::Instant::now();
    nowconnect_sim::fuzz::drive_agent(origin, data);
    nowconnect_sim::fuzz::drive_agent_node(origin, data);
});
