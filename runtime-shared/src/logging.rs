//! Log setup: text (default) or JSON lines, filter from `RUST_LOG` or config.
//! Security events (refused tokens, fencing, refused peers) use the stable
//! target `nowconnect::security`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(format: Option<&str>, level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    // Colour only on a terminal: log files and journald get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if format == Some("json") {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}
