//! The agent's `http` key: absent, nothing is served; `bind` takes an
//! address; anything else is refused naming the file, the key and the
//! reason. `tests/tests/agent_http.rs` checks the same end to end.

use std::path::Path;

use nowconnect_shared::config::AgentConfig;

fn agent(extra: &str) -> Result<AgentConfig, String> {
    let text = format!(
        "agent_id: a1\nhubs: ['ws://127.0.0.1:1/tunnel']\nconnectors:\n  - {{ name: echo, target: '127.0.0.1:7' }}\n{extra}"
    );
    AgentConfig::parse(Path::new("premise.yaml"), &text, Some("token".into()))
        .map_err(|e| e.to_string())
}

#[test]
fn without_http_nothing_is_served() {
    assert_eq!(agent("").unwrap().http_bind, None);
}

#[test]
fn http_bind_takes_an_address_port_0_included() {
    let cfg = agent("http: { bind: '127.0.0.1:9180' }\n").unwrap();
    assert_eq!(cfg.http_bind, Some("127.0.0.1:9180".parse().unwrap()));
    let cfg = agent("http:\n  bind: '[::1]:0'\n").unwrap();
    assert_eq!(cfg.http_bind, Some("[::1]:0".parse().unwrap()));
}

#[test]
fn a_bad_address_or_an_unknown_key_is_refused_naming_the_key() {
    let e = agent("http: { bind: nonsense }\n").unwrap_err();
    assert!(
        e.starts_with("premise.yaml: http.bind: `nonsense` is not an address"),
        "{e}"
    );
    let e = agent("http: { bind: '127.0.0.1:0', ops_bind: '127.0.0.1:0' }\n").unwrap_err();
    assert!(e.contains("premise.yaml") && e.contains("ops_bind"), "{e}");
    let e = agent("http: {}\n").unwrap_err();
    assert!(e.contains("premise.yaml") && e.contains("bind"), "{e}");
}
