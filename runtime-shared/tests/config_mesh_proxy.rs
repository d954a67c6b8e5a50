//! The keys of a hub behind a TLS-terminating mesh proxy
//! (`ha.mesh.tls_terminated_by_proxy`, `trusted_proxies`,
//! `client_cert_header`): what they accept, and the key and reason of what
//! they refuse.

use std::path::{Path, PathBuf};

use nowconnect_shared::config::{ClientCertFormat, HubConfig};

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!(
            "nowconnect-config-mesh-proxy-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("jwt.secret"), "0123456789abcdef0123456789abcdef").unwrap();
        // Only checked readable here.
        for f in ["ca.pem", "hub.crt", "hub.key"] {
            std::fs::write(dir.join(f), "read by the hub at start").unwrap();
        }
        Files { dir }
    }

    /// A hub in active mode whose `ha.mesh` is `mesh` (indented 4) plus a
    /// listener and TLS files.
    fn hub(&self, mesh: &str, tls: bool) -> Result<HubConfig, String> {
        let p = |f: &str| self.dir.join(f).display().to_string();
        let tls = if tls {
            format!(
                "    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
                p("ca.pem"),
                p("hub.crt"),
                p("hub.key")
            )
        } else {
            String::new()
        };
        let text = format!(
            "http: {{ bind: '127.0.0.1:0' }}\ntunnel:\n  jwt:\n    hs256_secret_file: {}\nha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  mesh:\n    listen: 127.0.0.1:0\n{tls}{mesh}",
            p("jwt.secret")
        );
        HubConfig::parse(Path::new("cloud.yaml"), &text).map_err(|e| e.to_string())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn proxy_mode_takes_networks_and_both_header_formats() {
    let f = Files::new();
    let c = f
        .hub(
            "    tls_terminated_by_proxy: true\n    trusted_proxies: [10.0.3.0/24, 127.0.0.1, 'fd00::/64']\n",
            true,
        )
        .unwrap();
    let m = &c.raw.ha.mesh;
    let t = m.trusted_proxies();
    for (ip, trusted) in [
        ("10.0.3.200", true),
        ("127.0.0.1", true),
        ("fd00::9", true),
        ("10.0.4.1", false),
        ("127.0.0.2", false),
    ] {
        assert_eq!(t.trusts(ip.parse().unwrap()), trusted, "{ip}");
    }
    // Default: nginx' escaped PEM in `ssl-client-cert`.
    let h = m.client_cert_header();
    assert_eq!(
        (h.format, h.header_name().as_str()),
        (ClientCertFormat::Nginx, "ssl-client-cert")
    );
    let c = f
        .hub(
            "    tls_terminated_by_proxy: true\n    trusted_proxies: [10.0.3.0/24]\n    client_cert_header: { format: envoy }\n",
            true,
        )
        .unwrap();
    let h = c.raw.ha.mesh.client_cert_header();
    assert_eq!(
        (h.format, h.header_name().as_str()),
        (ClientCertFormat::Envoy, "x-forwarded-client-cert")
    );
    let c = f
        .hub(
            "    tls_terminated_by_proxy: true\n    trusted_proxies: [10.0.3.0/24]\n    client_cert_header: { name: X-Client-Cert, format: nginx }\n",
            true,
        )
        .unwrap();
    assert_eq!(
        c.raw.ha.mesh.client_cert_header().header_name(),
        "x-client-cert"
    );
    // Off by default.
    let c = f.hub("", true).unwrap();
    assert!(!c.raw.ha.mesh.tls_terminated_by_proxy);
}

#[test]
fn bad_proxy_settings_name_the_key_and_the_reason() {
    let f = Files::new();
    let on = "    tls_terminated_by_proxy: true\n";
    let cases: &[(&str, bool, &str, &str)] = &[
        (
            on,
            true,
            "ha.mesh.trusted_proxies: required (non-empty)",
            "no proxies",
        ),
        (
            &format!("{on}    trusted_proxies: []\n"),
            true,
            "ha.mesh.trusted_proxies: required (non-empty)",
            "empty proxies",
        ),
        (
            &format!("{on}    trusted_proxies: [10.0.0.0/8]\n"),
            false,
            "ha.mesh.tls: required with ha.mesh.tls_terminated_by_proxy",
            "no tls",
        ),
        (
            &format!("{on}    trusted_proxies: [10.0.0.0/8]\n    require_mtls: false\n"),
            true,
            "ha.mesh.tls_terminated_by_proxy: needs ha.mesh.require_mtls: true",
            "require_mtls off",
        ),
        (
            &format!("{on}    trusted_proxies: [0.0.0.0/0]\n"),
            true,
            "ha.mesh.trusted_proxies[0]: `0.0.0.0/0` trusts every address",
            "every IPv4 address",
        ),
        (
            &format!("{on}    trusted_proxies: [10.0.0.0/8, '::/0']\n"),
            true,
            "ha.mesh.trusted_proxies[1]: `::/0` trusts every address",
            "every IPv6 address",
        ),
        (
            &format!("{on}    trusted_proxies: [10.0.0.0/33]\n"),
            true,
            "ha.mesh.trusted_proxies[0]: `10.0.0.0/33` is not a network",
            "prefix too long",
        ),
        (
            &format!("{on}    trusted_proxies: [proxy.example]\n"),
            true,
            "ha.mesh.trusted_proxies[0]: `proxy.example` is not an address or a network",
            "a host name",
        ),
        (
            &format!("{on}    trusted_proxies: [10.0.0.7/8]\n"),
            true,
            "ha.mesh.trusted_proxies[0]: `10.0.0.7/8` has host bits set; the network is 10.0.0.0/8",
            "host bits",
        ),
        (
            &format!(
                "{on}    trusted_proxies: [10.0.0.0/8]\n    client_cert_header: {{ name: 'bad header' }}\n"
            ),
            true,
            "ha.mesh.client_cert_header.name: `bad header` is not an HTTP header name",
            "header name",
        ),
        (
            &format!(
                "{on}    trusted_proxies: [10.0.0.0/8]\n    client_cert_header: {{ format: haproxy }}\n"
            ),
            true,
            "ha.mesh.client_cert_header.format",
            "unknown format",
        ),
        (
            "    trusted_proxies: [10.0.0.0/8]\n",
            true,
            "ha.mesh.trusted_proxies: only used with ha.mesh.tls_terminated_by_proxy: true",
            "proxies without the mode",
        ),
        (
            "    client_cert_header: { format: envoy }\n",
            true,
            "ha.mesh.client_cert_header: only used with ha.mesh.tls_terminated_by_proxy: true",
            "header without the mode",
        ),
    ];
    for (mesh, tls, want, what) in cases {
        let e = f.hub(mesh, *tls).map(|_| ()).unwrap_err();
        assert!(e.contains(want), "{what}: got `{e}`, want `{want}`");
    }
    // Proxy mode without a mesh listener: nothing to put behind a proxy.
    let p = |x: &str| f.dir.join(x).display().to_string();
    let text = format!(
        "http: {{ bind: '127.0.0.1:0' }}\ntunnel:\n  jwt:\n    hs256_secret_file: {}\nha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  mesh:\n    peers: ['wss://hub-b:9400/mesh']\n    tls_terminated_by_proxy: true\n    trusted_proxies: [10.0.0.0/8]\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
        p("jwt.secret"),
        p("ca.pem"),
        p("hub.crt"),
        p("hub.key")
    );
    let e = HubConfig::parse(Path::new("cloud.yaml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ha.mesh.tls_terminated_by_proxy: needs ha.mesh.listen"),
        "{e}"
    );
}

/// With `require_mtls: true` (the default) a `ws://` peer is refused at
/// start: it would be an unauthenticated peer on a mesh that promises mTLS.
/// Only an explicit `require_mtls: false` takes one.
#[test]
fn a_plaintext_mesh_peer_is_refused_while_mtls_is_required() {
    let f = Files::new();
    let e = f
        .hub("    peers: ['ws://10.0.0.2:9443/mesh']\n", true)
        .unwrap_err();
    assert_eq!(
        e,
        "cloud.yaml: ha.mesh.peers[0]: a ws:// peer is not authenticated; use wss:// (ha.mesh.require_mtls is true)"
    );
    f.hub("    peers: ['wss://10.0.0.2:9443/mesh']\n", true)
        .unwrap();
    f.hub(
        "    require_mtls: false\n    peers: ['ws://10.0.0.2:9443/mesh']\n",
        false,
    )
    .unwrap();
}
