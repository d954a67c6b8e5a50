//! `ha` of the hub's file: Redis (the shared registry) and the mesh
//! between replicas, and their checks.

use std::path::PathBuf;

use serde::Deserialize;

use super::{check_readable, default_backoff, default_mesh_handshake, default_true};
use crate::redact::{Secret, redact_url};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default)]
    pub replica_id: Option<String>,
    /// The registry's URL; shown only with its password masked.
    #[serde(default)]
    pub redis_url: Option<RedisUrl>,
    /// ACL user name for Redis (`AUTH user password`); unset: the one in
    /// `redis_url`, if any, else `default`.
    #[serde(default)]
    pub redis_username: Option<String>,
    /// File holding the Redis password (surrounding whitespace ignored),
    /// read at start.
    #[serde(default)]
    pub redis_password_file: Option<PathBuf>,
    /// Trust (and client certificate) for a `rediss://` `redis_url`.
    #[serde(default)]
    pub redis_tls: Option<RedisTls>,
    #[serde(default)]
    pub mesh: MeshConfig,
    /// Ownership lease in the registry.
    #[serde(default = "default_lease")]
    pub lease_sec: u64,
    /// How often an owner renews its leases.
    #[serde(default = "default_renew")]
    pub renew_interval_sec: u64,
    /// A registry call slower than this fails and marks the registry unhealthy.
    #[serde(default = "default_registry_timeout")]
    pub registry_timeout_ms: u64,
    /// Prefix of every Redis key.
    #[serde(default = "default_prefix")]
    pub registry_prefix: String,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            enabled: false,
            mode: default_mode(),
            replica_id: None,
            redis_url: None,
            redis_username: None,
            redis_password_file: None,
            redis_tls: None,
            mesh: MeshConfig::default(),
            lease_sec: default_lease(),
            renew_interval_sec: default_renew(),
            registry_timeout_ms: default_registry_timeout(),
            registry_prefix: default_prefix(),
        }
    }
}

/// `ha.redis_url`. `Debug` and `Display` show it with its password masked
/// ([`redact_url`]); [`RedisUrl::expose`] gives the URL itself, to connect.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> Self {
        RedisUrl(url.into())
    }

    /// The URL as configured, password included: for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password masked, for logs and errors.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }

    /// Whether the URL carries a password (`:pass@`, or `pass=` for a unix
    /// socket). Unparsable URLs count as carrying one.
    pub fn has_password(&self) -> bool {
        match redis::parse_redis_url(&self.0) {
            Some(u) => u.password().is_some() || u.query_pairs().any(|(k, _)| k == "pass"),
            None => true,
        }
    }

    /// Whether the URL names a user (`user@`, or `user=` for a unix socket).
    pub fn has_username(&self) -> bool {
        match redis::parse_redis_url(&self.0) {
            Some(u) => !u.username().is_empty() || u.query_pairs().any(|(k, _)| k == "user"),
            None => false,
        }
    }

    pub fn is_tls(&self) -> bool {
        self.0.starts_with("rediss://")
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("RedisUrl").field(&self.redacted()).finish()
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// `ha.redis_tls`: PEM files for a `rediss://` registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisTls {
    /// CAs trusted for the Redis server's certificate (only these).
    pub ca_bundle: PathBuf,
    /// Client certificate (chain) presented to Redis; with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Check the `ha.redis_*` keys together; read the password file. An error
/// names the key and the reason, never a password.
pub(super) fn check_redis(ha: &HaConfig) -> Result<Option<Secret>, (&'static str, String)> {
    let Some(url) = &ha.redis_url else {
        for (key, set) in [
            ("ha.redis_tls", ha.redis_tls.is_some()),
            ("ha.redis_username", ha.redis_username.is_some()),
            ("ha.redis_password_file", ha.redis_password_file.is_some()),
        ] {
            if set {
                return Err((key, "needs ha.redis_url".into()));
            }
        }
        return Ok(None);
    };
    let u = url.expose();
    if !(u.starts_with("redis://") || u.starts_with("rediss://") || u.starts_with("redis+unix://"))
    {
        return Err(("ha.redis_url", format!("`{url}` is not a redis:// URL")));
    }
    let Some(parsed) = redis::parse_redis_url(u) else {
        return Err(("ha.redis_url", format!("`{url}` is not a valid URL")));
    };
    if parsed.fragment().is_some() {
        return Err((
            "ha.redis_url",
            format!(
                "`{url}`: a URL fragment (`#…`) is not accepted; `#insecure` would turn certificate checks off"
            ),
        ));
    }
    if let Some(user) = &ha.redis_username {
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err((
                "ha.redis_username",
                "must be a non-empty name without spaces".into(),
            ));
        }
        if url.has_username() {
            return Err((
                "ha.redis_username",
                "ha.redis_url names a user too: keep one".into(),
            ));
        }
    }
    if let Some(tls) = &ha.redis_tls {
        if !url.is_tls() {
            return Err((
                "ha.redis_tls",
                format!("needs a rediss:// ha.redis_url, and `{url}` is not one"),
            ));
        }
        crate::tls::load_certs(&tls.ca_bundle).map_err(|r| ("ha.redis_tls.ca_bundle", r))?;
        match (&tls.cert_file, &tls.key_file) {
            (Some(cert), Some(key)) => {
                check_readable(cert).map_err(|r| ("ha.redis_tls.cert_file", r))?;
                check_readable(key).map_err(|r| ("ha.redis_tls.key_file", r))?;
            }
            (Some(_), None) => {
                return Err((
                    "ha.redis_tls.key_file",
                    "required with cert_file (set both or neither)".into(),
                ));
            }
            (None, Some(_)) => {
                return Err((
                    "ha.redis_tls.cert_file",
                    "required with key_file (set both or neither)".into(),
                ));
            }
            (None, None) => {}
        }
    }
    let Some(p) = &ha.redis_password_file else {
        return Ok(None);
    };
    if url.has_password() {
        return Err((
            "ha.redis_password_file",
            "ha.redis_url holds a password too: keep only the file".into(),
        ));
    }
    // The io error names the problem, never the contents.
    let text = std::fs::read_to_string(p).map_err(|e| {
        (
            "ha.redis_password_file",
            format!("cannot read {}: {e}", p.display()),
        )
    })?;
    let password = text.trim();
    if password.is_empty() {
        return Err((
            "ha.redis_password_file",
            format!("{} is empty", p.display()),
        ));
    }
    Ok(Some(Secret::new(password)))
}

fn default_lease() -> u64 {
    15
}
fn default_renew() -> u64 {
    5
}
fn default_registry_timeout() -> u64 {
    500
}
pub(super) fn default_control_backlog() -> usize {
    nowconnect_core::tunnel::DEFAULT_MAX_CONTROL_BACKLOG
}
fn default_prefix() -> String {
    "nowconnect:".into()
}

fn default_mode() -> String {
    "off".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    #[serde(default)]
    pub listen: Option<String>,
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default = "default_true")]
    pub require_mtls: bool,
    #[serde(default)]
    pub tls: Option<MeshTls>,
    #[serde(default = "default_queue")]
    pub send_queue_depth: usize,
    #[serde(default = "default_inflight")]
    pub per_link_max_inflight_bytes: u64,
    #[serde(default = "default_backoff")]
    pub connect_backoff_max_sec: u64,
    /// An accepted mesh connection must finish its TLS and WebSocket
    /// handshakes within this.
    #[serde(default = "default_mesh_handshake")]
    pub handshake_timeout_sec: u64,
    /// Inbound mesh connections (handshaking or established) at once; more
    /// are closed before the TLS handshake.
    #[serde(default = "default_mesh_max_links")]
    pub max_inbound_links: usize,
    /// The URL other hubs dial to reach this hub's mesh; announced in the
    /// registry so hubs find each other without listing peers.
    #[serde(default)]
    pub advertise_url: Option<String>,
    /// Replica ids served as mesh peers even when the registry does not
    /// list them (a peer is otherwise served only while it is registered).
    #[serde(default)]
    pub allowed_replicas: Vec<String>,
    /// A TLS-terminating proxy (ingress) in front of `listen` verifies the
    /// peers' client certificates and forwards each certificate in a
    /// header (`client_cert_header`); the listener then speaks plain
    /// WebSocket and serves only connections from `trusted_proxies`.
    #[serde(default)]
    pub tls_terminated_by_proxy: bool,
    /// The networks the terminating proxies connect from (CIDR, e.g.
    /// `10.0.3.0/24`, or a bare address).
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Which header carries the peer's certificate, and in which format.
    #[serde(default)]
    pub client_cert_header: Option<ClientCertHeader>,
}

/// `ha.mesh.client_cert_header`: the request header a terminating proxy
/// puts the verified client certificate in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertHeader {
    /// The header's name; default by format: `ssl-client-cert` (nginx),
    /// `x-forwarded-client-cert` (envoy).
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub format: ClientCertFormat,
}

/// How the certificate is written in `ha.mesh.client_cert_header`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertFormat {
    /// The URL-encoded PEM of nginx' `$ssl_client_escaped_cert`.
    #[default]
    Nginx,
    /// Envoy's `x-forwarded-client-cert`: the URL-encoded PEM in its
    /// `Cert="…"` element.
    Envoy,
}

impl ClientCertFormat {
    pub fn default_header(self) -> &'static str {
        match self {
            ClientCertFormat::Nginx => "ssl-client-cert",
            ClientCertFormat::Envoy => "x-forwarded-client-cert",
        }
    }
}

impl ClientCertHeader {
    /// The header name in use (lower case).
    pub fn header_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| self.format.default_header().to_string())
            .to_ascii_lowercase()
    }
}

impl MeshConfig {
    /// The header settings in use in proxy mode (the default: nginx).
    pub fn client_cert_header(&self) -> ClientCertHeader {
        self.client_cert_header.clone().unwrap_or(ClientCertHeader {
            name: None,
            format: ClientCertFormat::Nginx,
        })
    }

    /// `trusted_proxies` parsed (validated at start; were a list not to
    /// parse, no address would be trusted).
    pub fn trusted_proxies(&self) -> crate::proxy_protocol::TrustedProxies {
        crate::proxy_protocol::TrustedProxies::parse(&self.trusted_proxies).unwrap_or_default()
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            advertise_url: None,
            allowed_replicas: Vec::new(),
            listen: None,
            peers: Vec::new(),
            require_mtls: true,
            tls: None,
            send_queue_depth: default_queue(),
            per_link_max_inflight_bytes: default_inflight(),
            handshake_timeout_sec: default_mesh_handshake(),
            max_inbound_links: default_mesh_max_links(),
            connect_backoff_max_sec: default_backoff(),
            tls_terminated_by_proxy: false,
            trusted_proxies: Vec::new(),
            client_cert_header: None,
        }
    }
}

fn default_mesh_max_links() -> usize {
    64
}

fn default_queue() -> usize {
    1000
}
fn default_inflight() -> u64 {
    8 * 1024 * 1024
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshTls {
    pub ca_bundle: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// `ha.mesh.tls_terminated_by_proxy` and its companions: the proxy mode
/// needs the peers' CA (`tls`), an authenticating mesh (`require_mtls`), a
/// listener, and the proxies' networks; those keys mean nothing without it.
pub(super) fn check_proxy_mode(m: &MeshConfig) -> Result<(), (String, String)> {
    let fail = |k: &str, r: &str| Err((k.to_string(), r.to_string()));
    if !m.tls_terminated_by_proxy {
        if !m.trusted_proxies.is_empty() {
            return fail(
                "ha.mesh.trusted_proxies",
                "only used with ha.mesh.tls_terminated_by_proxy: true",
            );
        }
        if m.client_cert_header.is_some() {
            return fail(
                "ha.mesh.client_cert_header",
                "only used with ha.mesh.tls_terminated_by_proxy: true",
            );
        }
        return Ok(());
    }
    if m.listen.is_none() {
        return fail(
            "ha.mesh.tls_terminated_by_proxy",
            "needs ha.mesh.listen (the address the proxy forwards to)",
        );
    }
    if !m.require_mtls {
        return fail(
            "ha.mesh.tls_terminated_by_proxy",
            "needs ha.mesh.require_mtls: true (the forwarded client certificate is the peer's credential)",
        );
    }
    if m.tls.is_none() {
        return fail(
            "ha.mesh.tls",
            "required with ha.mesh.tls_terminated_by_proxy: ca_bundle verifies the forwarded certificates, cert_file/key_file serve this hub's own dials",
        );
    }
    if m.trusted_proxies.is_empty() {
        return fail(
            "ha.mesh.trusted_proxies",
            "required (non-empty) with ha.mesh.tls_terminated_by_proxy: the networks the TLS-terminating proxies connect from",
        );
    }
    crate::proxy_protocol::TrustedProxies::parse(&m.trusted_proxies)
        .map_err(|(i, r)| (format!("ha.mesh.trusted_proxies[{i}]"), r))?;
    if let Some(h) = &m.client_cert_header {
        let name = h.header_name();
        if tungstenite::http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.is_empty() {
            return fail(
                "ha.mesh.client_cert_header.name",
                &format!("`{name}` is not an HTTP header name"),
            );
        }
    }
    Ok(())
}
