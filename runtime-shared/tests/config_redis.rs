//! The Redis keys of a hub file (`ha.redis_url`, `ha.redis_tls`,
//! `ha.redis_username`, `ha.redis_password_file`): what they accept, the
//! error naming the key and the reason for what they do not, and passwords
//! that never appear in an error or in `Debug` output.

use std::path::{Path, PathBuf};

use nowconnect_shared::config::HubConfig;

const SECRET: &str = "S3cret-do-not-print";

struct Files {
    dir: PathBuf,
}

impl Files {
    fn new() -> Files {
        let dir = std::env::temp_dir().join(format!(
            "nowconnect-config-redis-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("jwt.secret"), "0123456789abcdef0123456789abcdef").unwrap();
        // Any PEM certificate does for a CA bundle here: the check reads it.
        std::fs::write(dir.join("ca.pem"), CA_PEM).unwrap();
        std::fs::write(dir.join("client.crt"), CA_PEM).unwrap();
        std::fs::write(dir.join("client.key"), "not read by the config check").unwrap();
        std::fs::write(dir.join("password"), format!("  {SECRET}\n")).unwrap();
        std::fs::write(dir.join("empty"), " \n\t\n").unwrap();
        Files { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn hub(&self, ha: &str) -> Result<HubConfig, String> {
        let text = format!(
            "http: {{ bind: '127.0.0.1:0' }}\ntunnel:\n  jwt:\n    hs256_secret_file: {}\nha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n{ha}",
            self.path("jwt.secret")
        );
        HubConfig::parse(Path::new("cloud.yaml"), &text).map_err(|e| e.to_string())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A self-signed certificate (CN=test-ca); only read as PEM here.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBejCCASGgAwIBAgIUNFJg47g+U+AqEapT8UKi6XwrRP0wCgYIKoZIzj0EAwIw
EjEQMA4GA1UEAwwHdGVzdC1jYTAgFw0yNjEyMDUxOTA4MTNaGA8yMTI2MTExMTE5
MDgxM1owEjEQMA4GA1UEAwwHdGVzdC1jYTBZMBMGByqGSM49AgEGCCqGSM49AwEH
A0IABGnfj3T6hhMIETwpAX6XfTqNK7nUm1LKt3rWVNtBoEpJVOwaknHk1UQ7Pfby
4BAi0190LE2YTHoEnWrjokvG/bajUzBRMB0GA1UdDgQWBBQdRV0hx5NrUhtiuNYz
j5csu7/gtzAfBgNVHSMEGDAWgBQdRV0hx5NrUhtiuNYzj5csu7/gtzAPBgNVHRMB
Af8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCICEXA2czAmDLzW+GLIBSkGF87IsB
GvVgY41ymxTtSQ5oAiAYuML2QIpP9/BzJ7aGJ69msOO3pI1ayuqFGPhSIM78tQ==
-----END CERTIFICATE-----
";

#[test]
fn tls_a_user_and_a_password_file_are_accepted_and_the_password_is_read_trimmed() {
    let f = Files::new();
    let cfg = f
        .hub(&format!(
            "  redis_url: rediss://redis.example:6380/0\n  redis_username: nowconnect\n  redis_password_file: {}\n  redis_tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
            f.path("password"),
            f.path("ca.pem"),
            f.path("client.crt"),
            f.path("client.key")
        ))
        .unwrap();
    assert_eq!(cfg.redis_password.as_ref().unwrap().expose(), SECRET);
    assert_eq!(cfg.raw.ha.redis_username.as_deref(), Some("nowconnect"));
    let debug = format!("{cfg:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(debug.contains("redis.example:6380"), "{debug}");

    // rediss:// without ha.redis_tls: valid (the system's roots are trusted).
    assert!(
        f.hub("  redis_url: rediss://redis.example:6380/0\n")
            .is_ok()
    );
}

#[test]
fn a_password_in_the_url_still_works_and_is_masked_in_debug_output() {
    let f = Files::new();
    let cfg = f
        .hub(&format!(
            "  redis_url: 'rediss://nowconnect:{SECRET}@redis.example:6380/0'\n"
        ))
        .unwrap();
    let url = cfg.raw.ha.redis_url.as_ref().unwrap();
    assert!(url.has_password());
    assert!(url.expose().contains(SECRET));
    assert_eq!(
        url.to_string(),
        "rediss://nowconnect:***@redis.example:6380/0"
    );
    let debug = format!("{cfg:?}");
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(
        debug.contains("rediss://nowconnect:***@redis.example:6380/0"),
        "{debug}"
    );
}

#[test]
fn bad_redis_settings_name_the_key_and_the_reason() {
    let f = Files::new();
    let ca = f.path("ca.pem");
    let missing = f.path("missing");
    for (ha, expected) in [
        (
            format!("  redis_url: redis://127.0.0.1:6379/0\n  redis_tls: {{ ca_bundle: {ca} }}\n"),
            "cloud.yaml: ha.redis_tls: needs a rediss:// ha.redis_url, and `redis://127.0.0.1:6379/0` is not one".to_string(),
        ),
        (
            format!("  redis_tls: {{ ca_bundle: {ca} }}\n"),
            "cloud.yaml: ha.redis_tls: needs ha.redis_url".to_string(),
        ),
        (
            format!(
                "  redis_url: rediss://h:6380\n  redis_tls: {{ ca_bundle: {ca}, cert_file: {} }}\n",
                f.path("client.crt")
            ),
            "cloud.yaml: ha.redis_tls.key_file: required with cert_file (set both or neither)".to_string(),
        ),
        (
            format!(
                "  redis_url: rediss://h:6380\n  redis_tls: {{ ca_bundle: {ca}, key_file: {} }}\n",
                f.path("client.key")
            ),
            "cloud.yaml: ha.redis_tls.cert_file: required with key_file (set both or neither)".to_string(),
        ),
        (
            format!("  redis_url: rediss://h:6380\n  redis_tls: {{ ca_bundle: {} }}\n", f.path("client.key")),
            format!("cloud.yaml: ha.redis_tls.ca_bundle: {}: no PEM certificate found", f.path("client.key")),
        ),
        (
            format!("  redis_url: rediss://h:6380\n  redis_password_file: {missing}\n"),
            format!("cloud.yaml: ha.redis_password_file: cannot read {missing}: No such file or directory (os error 2)"),
        ),
        (
            format!("  redis_url: rediss://h:6380\n  redis_password_file: {}\n", f.path("empty")),
            format!("cloud.yaml: ha.redis_password_file: {} is empty", f.path("empty")),
        ),
        (
            "  redis_url: 'rediss://h:6380/0#insecure'\n".to_string(),
            "cloud.yaml: ha.redis_url: `rediss://h:6380/0#insecure`: a URL fragment (`#…`) is not accepted; `#insecure` would turn certificate checks off".to_string(),
        ),
        (
            "  redis_url: rediss://u@h:6380\n  redis_username: nowconnect\n".to_string(),
            "cloud.yaml: ha.redis_username: ha.redis_url names a user too: keep one".to_string(),
        ),
        (
            "  redis_url: rediss://h:6380\n  redis_username: 'two words'\n".to_string(),
            "cloud.yaml: ha.redis_username: must be a non-empty name without spaces".to_string(),
        ),
    ] {
        assert_eq!(f.hub(&ha).err().as_deref(), Some(expected.as_str()), "{ha}");
    }
}

#[test]
fn errors_about_a_url_or_a_password_file_never_show_the_password() {
    let f = Files::new();
    for (ha, expected) in [
        (
            format!("  redis_url: 'http://:{SECRET}@h:6379'\n"),
            "cloud.yaml: ha.redis_url: `http://:***@h:6379` is not a redis:// URL".to_string(),
        ),
        (
            format!("  redis_url: 'redis://:{SECRET}@h:6379'\n  redis_tls: {{ ca_bundle: {} }}\n", f.path("ca.pem")),
            "cloud.yaml: ha.redis_tls: needs a rediss:// ha.redis_url, and `redis://:***@h:6379` is not one".to_string(),
        ),
        (
            format!(
                "  redis_url: 'rediss://u:{SECRET}@h:6380'\n  redis_password_file: {}\n",
                f.path("password")
            ),
            "cloud.yaml: ha.redis_password_file: ha.redis_url holds a password too: keep only the file".to_string(),
        ),
    ] {
        let e = f.hub(&ha).err().unwrap();
        assert_eq!(e, expected);
        assert!(!e.contains(SECRET));
    }
}
