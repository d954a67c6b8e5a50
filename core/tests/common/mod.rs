#![allow(dead_code)]
use std::sync::OnceLock;
use std::time::Instant;

/// The origin of a test's virtual clock. Tests only add durations to it; the
/// value itself never matters, and the core never reads the clock.
pub fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    #[allow(clippy::disallowed_methods)]
    *ORIGIN.get_or_init(Instant::now)
}
