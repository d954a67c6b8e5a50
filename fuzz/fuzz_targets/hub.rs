#![no_main]
//! See `nowconnect_sim::fuzz::drive_hub`: the driver lives there so the
//! corpus replay test in the normal suite means the same thing.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nowconnect_sim::fuzz::drive_hub(std::time::Instant::now(), data);
});
