#![no_main]
//! A hub-side and an agent-side tunnel fed arbitrary message sequences: no
//! panic, bounded state. The driver lives in `nowconnect_sim::fuzz` so the
//! corpus replay test means the same thing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nowconnect_sim::fuzz::drive_tunnels(std::time::Instant::now(), data);
});
