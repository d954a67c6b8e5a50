//! The hub's `http.tls` and `http.ops_bind` keys: what they accept, and the
//! error naming the key and the reason for what they do not.

use std::path::{Path, PathBuf};

use nowconnect_shared::config::HubConfig;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

struct Dir(PathBuf);

impl Dir {
    fn new() -> Dir {
        let d = std::env::temp_dir().join(format!(
            "nowconnect-config-http-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("jwt.secret"), "0123456789abcdef0123456789abcdef").unwrap();
        Dir(d)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// A hub file with `http` as the http section's body and `rest` after.
    fn hub(&self, http: &str, rest: &str) -> Result<HubConfig, String> {
        let text = format!(
            "http:\n  bind: '127.0.0.1:8080'\n{http}tunnel:\n  jwt:\n    hs256_secret_file: {}\n{rest}",
            self.0.join("jwt.secret").display()
        );
        HubConfig::parse(Path::new("cloud.yaml"), &text).map_err(|e| e.to_string())
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tls(cert: &str, key: &str) -> String {
    format!("  tls: {{ cert_file: '{cert}', key_file: '{key}' }}\n")
}

#[test]
fn a_certificate_with_its_key_is_taken_with_alpn_http1_and_the_key_is_a_secret_file() {
    let d = Dir::new();
    let cfg = d
        .hub(&tls(&fixture("http-a.crt"), &fixture("http-a.key")), "")
        .unwrap();
    let server = cfg.http_tls.as_ref().expect("http.tls built");
    assert_eq!(server.alpn_protocols, vec![b"http/1.1".to_vec()]);
    let secrets = cfg.secret_files();
    assert!(
        secrets
            .iter()
            .any(|(k, p)| *k == "http.tls.key_file" && p.ends_with("http-a.key")),
        "{secrets:?}"
    );
    // Without the key: no TLS, no ops port, as before.
    let plain = d.hub("", "").unwrap();
    assert!(plain.http_tls.is_none() && plain.ops_bind.is_none());
}

#[test]
fn bad_tls_files_name_the_key_and_the_reason() {
    let d = Dir::new();
    let not_pem = d.file("not-pem", "this is no PEM\n");
    let missing = d.0.join("missing.crt").display().to_string();
    let cases = [
        // A key that is not the certificate's.
        (
            tls(&fixture("http-a.crt"), &fixture("http-b.key")),
            "cloud.yaml: http.tls.cert_file:",
            "http-b.key",
        ),
        (
            tls(&missing, &fixture("http-a.key")),
            "cloud.yaml: http.tls.cert_file:",
            "missing.crt",
        ),
        (
            tls(&not_pem, &fixture("http-a.key")),
            "cloud.yaml: http.tls.cert_file:",
            "no PEM certificate",
        ),
        (
            tls(&fixture("http-a.crt"), &not_pem),
            "cloud.yaml: http.tls.key_file:",
            "not-pem",
        ),
        (
            tls(&fixture("http-a.crt"), &missing),
            "cloud.yaml: http.tls.key_file:",
            "missing.crt",
        ),
        (
            format!("  tls: {{ cert_file: '{}' }}\n", fixture("http-a.crt")),
            "cloud.yaml: http.tls:",
            "missing field `key_file`",
        ),
    ];
    for (http, key, reason) in cases {
        let e = d
            .hub(&http, "")
            .err()
            .unwrap_or_else(|| panic!("accepted: {http}"));
        assert!(e.starts_with(key), "{http}: {e}");
        assert!(e.contains(reason), "{http}: {e}");
    }
}

#[test]
fn the_ops_port_must_be_an_address_of_its_own() {
    let d = Dir::new();
    let ok = d.hub("  ops_bind: '127.0.0.1:9090'\n", "").unwrap();
    assert_eq!(ok.ops_bind, Some("127.0.0.1:9090".parse().unwrap()));
    // Ephemeral ports never collide.
    assert!(
        d.hub(
            "  ops_bind: '127.0.0.1:0'\n",
            "listeners:\n  - { name: l1, bind: '127.0.0.1:0', connector: c }\n"
        )
        .is_ok()
    );
    let cases = [
        ("  ops_bind: 'localhost:9090'\n", "", "is not an address"),
        ("  ops_bind: '127.0.0.1:8080'\n", "", "is http.bind too"),
        (
            "  ops_bind: '127.0.0.1:9090'\n",
            "listeners:\n  - { name: l1, bind: '127.0.0.1:9090', connector: c }\n",
            "is listeners[0].bind too",
        ),
        (
            "  ops_bind: '127.0.0.1:9090'\n",
            "ha:\n  mesh:\n    listen: '127.0.0.1:9090'\n",
            "is ha.mesh.listen too",
        ),
    ];
    for (http, rest, reason) in cases {
        let e = d
            .hub(http, rest)
            .err()
            .unwrap_or_else(|| panic!("accepted: {http}{rest}"));
        assert!(e.starts_with("cloud.yaml: http.ops_bind:"), "{e}");
        assert!(e.contains(reason), "{http}{rest}: {e}");
    }
}

/// DESIGN.md's example `cloud.yaml` without its `http` section (the
/// original design's minimal file, which has none; `tunnel` added, since
/// tunnels always need a key): it parses, and `/tunnel`, `/healthz`,
/// `/readyz` and `/metrics` are served on the documented default.
#[test]
fn the_designs_minimal_cloud_yaml_without_http_binds_the_default_loopback_8080() {
    let d = Dir::new();
    let (crt, key) = (fixture("http-a.crt"), fixture("http-a.key"));
    let text = format!(
        "tunnel:
  jwt:
    audience: nowconnect
    hs256_secret_file: {secret}
listeners:
  - {{ name: l1, bind: '0.0.0.0:389', connector: 'ldap' }}
ha:
  enabled: true
  mode: active
  replica_id: hub-a
  redis_url: redis://127.0.0.1:6379/0
  mesh:
    listen: 0.0.0.0:9400
    peers: [\"wss://hub-b.example:9400/mesh\"]
    require_mtls: true
    tls: {{ ca_bundle: '{crt}', cert_file: '{crt}', key_file: '{key}' }}
    send_queue_depth: 1000
    per_link_max_inflight_bytes: 8388608
    connect_backoff_max_sec: 30
",
        secret = d.0.join("jwt.secret").display()
    );
    let cfg = HubConfig::parse(Path::new("cloud.yaml"), &text).unwrap();
    assert_eq!(cfg.http_bind, "127.0.0.1:8080".parse().unwrap());
    assert!(cfg.ops_bind.is_none() && cfg.http_tls.is_none());
    assert_eq!(cfg.raw.http.header_timeout_sec, 10);
    // An `http` section without `bind` takes the same default.
    let no_bind = HubConfig::parse(
        Path::new("cloud.yaml"),
        &format!(
            "http:\n  header_timeout_sec: 3\ntunnel:\n  jwt:\n    hs256_secret_file: {}\n",
            d.0.join("jwt.secret").display()
        ),
    )
    .unwrap();
    assert_eq!(no_bind.http_bind, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(no_bind.raw.http.header_timeout_sec, 3);
}
