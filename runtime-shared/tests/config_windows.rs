//! The window keys of an agent file (the hub's `tunnel.window_bytes` and
//! `tunnel.max_window_bytes` share the same check, `config::check_windows`;
//! `tests/tests/single_hub.rs` covers the hub's error end to end).

use std::path::Path;

use nowconnect_shared::config::AgentConfig;

fn agent(extra: &str) -> Result<AgentConfig, String> {
    let text = format!(
        "agent_id: a1\nhubs: ['ws://127.0.0.1:1/tunnel']\nconnectors:\n  - {{ name: echo, target: '127.0.0.1:7' }}\n{extra}"
    );
    AgentConfig::parse(Path::new("agent.yaml"), &text, Some("token".into()))
        .map_err(|e| e.to_string())
}

#[test]
fn windows_default_to_256_kib_growing_to_4_mib() {
    let t = agent("").unwrap().tunnel_config();
    assert_eq!((t.window, t.max_window), (256 * 1024, 4 * 1024 * 1024));
    let t = agent("max_window_bytes: 262144\n").unwrap().tunnel_config();
    assert_eq!(t.max_window, 256 * 1024, "equal: growth off");
}

#[test]
fn a_large_window_alone_stays_valid_and_does_not_grow() {
    // A file written before window growth, with a window above the default
    // maximum: the maximum follows the window.
    let t = agent("window_bytes: 8388608\n").unwrap().tunnel_config();
    assert_eq!((t.window, t.max_window), (8 << 20, 8 << 20));
}

#[test]
fn bad_windows_name_the_key_and_the_reason() {
    for (extra, expected) in [
        (
            "window_bytes: 1048576\nmax_window_bytes: 524288\n",
            "agent.yaml: max_window_bytes: must be at least window_bytes (1048576); equal turns window growth off",
        ),
        (
            "window_bytes: 512\n",
            "agent.yaml: window_bytes: must be between 1024 and 1073741824",
        ),
        (
            "window_bytes: 2147483648\n",
            "agent.yaml: window_bytes: must be between 1024 and 1073741824",
        ),
        (
            "max_window_bytes: 2147483648\n",
            "agent.yaml: max_window_bytes: must be at most 1073741824",
        ),
    ] {
        assert_eq!(agent(extra).err().as_deref(), Some(expected), "{extra}");
    }
}
