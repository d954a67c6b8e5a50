//! Hub (`cloud.yaml`) and agent (`premise.yaml`) configuration: parsed with
//! serde-saphyr, unknown keys refused, every value validated at start. Every
//! error names the file, the key path and the reason.
//!
//! `docs/configuration.md` documents each key and its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nowconnect_core::Limits;
use nowconnect_core::routing::Mode;
use serde::Deserialize;

use crate::redact::{Secret, redact_url};

#[derive(Debug, thiserror::Error)]
#[error("{file}: {key}: {reason}")]
pub struct ConfigError {
    pub file: String,
    pub key: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.display().to_string(),
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Parse YAML into `T`, naming the key path of any error.
pub fn parse_yaml<T: for<'de> Deserialize<'de>>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let mut path = String::new();
    let res: Result<T, serde_saphyr::Error> =
        serde_saphyr::with_deserializer_from_str(text, |de| {
            serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
                path = e.path().to_string();
                <serde_saphyr::Error as serde::de::Error>::custom(e.into_inner().to_string())
            })
        });
    res.map_err(|e| {
        let key = if path.is_empty() || path == "." {
            "(document)".to_string()
        } else {
            path.clone()
        };
        // Keep the first line of the parser's message: the rest is a snippet.
        let reason = e
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid YAML")
            .to_string();
        ConfigError::new(file, key, reason)
    })
}

/// Most executor threads a process may be given (`worker_threads`).
pub const MAX_WORKER_THREADS: usize = 1024;

fn check_worker_threads(n: usize) -> Result<(), String> {
    if n > MAX_WORKER_THREADS {
        return Err(format!(
            "{n} is more than {MAX_WORKER_THREADS}; 0 means one per CPU"
        ));
    }
    Ok(())
}

/// A hub's or an agent's configuration, loaded before the binary starts its
/// runtime: `worker_threads` sizes the runtime.
pub enum Service {
    Hub(Box<HubConfig>),
    Agent(Box<AgentConfig>),
}

impl Service {
    /// Executor threads asked for; 0: the runtime's default.
    pub fn worker_threads(&self) -> usize {
        match self {
            Service::Hub(c) => c.raw.worker_threads,
            Service::Agent(c) => c.raw.worker_threads,
        }
    }
}

pub fn read_file(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file)
        .map_err(|e| ConfigError::new(file, "(file)", format!("cannot read: {e}")))
}

// ---------------------------------------------------------------- hub

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    pub http: HttpConfig,
    pub tunnel: TunnelSection,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub ha: HaConfig,
    #[serde(default)]
    pub limits: HubLimits,
    #[serde(default = "default_grace")]
    pub shutdown_grace_sec: u64,
    /// After SIGTERM the listeners keep taking clients this long (while
    /// `/readyz` already says `draining`), so load balancers stop sending
    /// before connections are refused. Part of the grace period.
    #[serde(default)]
    pub shutdown_delay_sec: u64,
    #[serde(default)]
    pub reload: ReloadConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Executor threads of this process; 0 (the default): the runtime's
    /// own default, one per CPU. Read at start; a reload does not change it.
    #[serde(default)]
    pub worker_threads: usize,
}

/// What makes the hub re-read its configuration besides SIGHUP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Check the configuration file, the JWT key files and the mesh
    /// certificate files this often; any change reloads. 0: SIGHUP only.
    #[serde(default = "default_watch")]
    pub watch_interval_sec: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch_interval_sec: default_watch(),
        }
    }
}

fn default_watch() -> u64 {
    5
}

fn default_grace() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    pub bind: String,
    /// A client must send a complete request head within this (slowloris);
    /// it also bounds idle keep-alive connections.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_sec: u64,
    /// Serve the `bind` port over TLS only (certificate and key in PEM),
    /// reloaded like the mesh certificates.
    #[serde(default)]
    pub tls: Option<HttpTls>,
    /// A second, plain-HTTP port for `/healthz`, `/readyz` and `/metrics`;
    /// when set, `bind` serves only `/tunnel`.
    #[serde(default)]
    pub ops_bind: Option<String>,
}

/// `http.tls`: the certificate (chain, leaf first) and private key the
/// `bind` port presents.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_header_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelSection {
    pub jwt: JwtConfig,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    #[serde(default = "default_window")]
    pub window_bytes: u32,
    /// The most a flow's receive window grows to when its sender keeps
    /// waiting on credit (a long round trip); `window_bytes` turns growth off.
    /// Unset: 4 MiB, or `window_bytes` if that is larger (see
    /// [`max_window`]).
    #[serde(default)]
    pub max_window_bytes: Option<u32>,
    #[serde(default = "default_ping")]
    pub ping_interval_sec: u64,
    #[serde(default = "default_idle")]
    pub idle_timeout_sec: u64,
    #[serde(default = "default_handshake")]
    pub handshake_timeout_sec: u64,
    #[serde(default = "default_flows")]
    pub max_flows_per_agent: usize,
    /// The most bytes of control replies (PONG, RST, CREDIT…) that may wait
    /// for an agent's socket; an agent that keeps sending and never reads
    /// has its tunnel closed past it (`limit_exceeded`, `output_budget`).
    #[serde(default = "default_control_backlog")]
    pub max_control_backlog_bytes: usize,
    /// Connectors one agent may announce in its HELLO; a longer list closes
    /// the tunnel with the reason.
    #[serde(default = "default_max_connectors")]
    pub max_connectors_per_agent: usize,
    /// Accept tokens without a `connectors` claim (such an agent may
    /// announce any connector of its tenant). Off by default; logged at
    /// start when on.
    #[serde(default)]
    pub allow_unscoped_tokens: bool,
    /// Revoked agents and token ids, one entry a line (see
    /// [`crate::jwt::Revocations`]); checked readable and parsed at start.
    #[serde(default)]
    pub revocation_file: Option<PathBuf>,
}

fn default_max_connectors() -> usize {
    nowconnect_core::Limits::default().max_connectors
}

fn default_max_frame() -> u32 {
    1024 * 1024
}
fn default_window() -> u32 {
    nowconnect_core::tunnel::DEFAULT_WINDOW
}
/// The most a window may grow to: as set, else the default, or the window
/// itself if that is larger (a file that sets only a large `window_bytes`
/// stays valid).
pub fn max_window(window: u32, max: Option<u32>) -> u32 {
    max.unwrap_or(nowconnect_core::tunnel::DEFAULT_MAX_WINDOW.max(window))
}

/// Largest per-flow window (advertised or grown to) a file may set: 1 GiB.
const WINDOW_LIMIT: u32 = 1 << 30;

/// Check `window_bytes` and `max_window_bytes`; the error names which of the
/// two keys is wrong and why.
fn check_windows(window: u32, max: Option<u32>) -> Result<(), (&'static str, String)> {
    if !(1024..=WINDOW_LIMIT).contains(&window) {
        return Err((
            "window_bytes",
            format!("must be between 1024 and {WINDOW_LIMIT}"),
        ));
    }
    let max = max_window(window, max);
    if max < window {
        return Err((
            "max_window_bytes",
            format!("must be at least window_bytes ({window}); equal turns window growth off"),
        ));
    }
    if max > WINDOW_LIMIT {
        return Err((
            "max_window_bytes",
            format!("must be at most {WINDOW_LIMIT}"),
        ));
    }
    Ok(())
}
fn default_ping() -> u64 {
    15
}
fn default_idle() -> u64 {
    45
}
fn default_handshake() -> u64 {
    10
}
fn default_flows() -> usize {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default = "default_audience")]
    pub audience: String,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// A JSON Web Key Set (`{"keys": [...]}`) of RSA, EC (P-256, P-384)
    /// and Ed25519 public keys, chosen by the token's `kid`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Allowed algorithms; default: HS256 with a secret, RS256 and ES256 with
    /// a public key, plus each JWKS key's algorithm.
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    #[serde(default = "default_leeway")]
    pub leeway_sec: u64,
    /// The claim naming the agent's tenant; absent in a token: the default
    /// tenant ([`crate::jwt::DEFAULT_TENANT`]).
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    /// Longest token lifetime accepted (`exp - iat`, or `exp - now` without
    /// `iat`); none: no limit.
    #[serde(default)]
    pub max_ttl_sec: Option<u64>,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

/// Claims the verifier reads itself; the tenant claim may not be one of them.
const STANDARD_CLAIMS: &[&str] = &[
    "sub",
    "agent_id",
    "aud",
    "exp",
    "iat",
    "nbf",
    "iss",
    "jti",
    "connectors",
];

/// Algorithm names `tunnel.jwt.algorithms` accepts.
pub const JWT_ALGORITHMS: &[&str] = &[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA",
];

fn default_audience() -> String {
    "nowconnect".into()
}
fn default_leeway() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: String,
    pub connector: String,
    /// The tenant whose agents serve this listener (default: the default
    /// tenant).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only these agents (ids within the listener's tenant) may serve it.
    #[serde(default)]
    pub agents: Option<Vec<String>>,
    /// Client connections open at once on this listener; more are refused
    /// (`listener_limit`). Keeps one listener's clients from taking every
    /// flow of the agents it shares with other listeners.
    #[serde(default = "default_listener_connections")]
    pub max_connections: usize,
    /// Client connections open at once from one client address on this
    /// listener; more are refused (`client_limit`). Behind a balancer every
    /// client has the balancer's address: raise it there.
    #[serde(default = "default_listener_connections_per_client")]
    pub max_connections_per_client: usize,
    /// New client connections a second on this listener (a burst of as
    /// many is taken); more are refused (`listener_rate`).
    #[serde(default = "default_listener_rate")]
    pub max_new_connections_per_sec: u32,
    /// New client connections a second from one client address (IPv6: its
    /// `/64`); more are refused (`client_rate`).
    #[serde(default = "default_listener_rate_per_client")]
    pub max_new_connections_per_sec_per_client: u32,
    /// A client that sends no byte within this after connecting is closed
    /// (`first_byte_timeout`), with the flow to its target. 0: never.
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout_sec: u64,
    /// Take the client's address from a PROXY protocol header (v1 or v2)
    /// sent by a load balancer in front of the hub.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolConfig>,
}

/// `listeners[].proxy_protocol`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocolConfig {
    /// The balancers' addresses or networks (`10.0.0.0/8`). Only these may
    /// connect, and each of their connections must start with a header.
    pub trusted_proxies: Vec<String>,
}

fn default_listener_rate() -> u32 {
    2000
}
/// A quarter of the listener's: no one address can spend the listener's
/// rate alone.
fn default_listener_rate_per_client() -> u32 {
    500
}
fn default_first_byte_timeout() -> u64 {
    10
}

fn default_listener_connections() -> usize {
    1024
}
fn default_listener_connections_per_client() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubLimits {
    #[serde(default = "default_max_agents")]
    pub max_agents: usize,
    #[serde(default = "default_max_clients")]
    pub max_client_connections: usize,
    /// Client connections waiting for a registry answer (HA modes) at once;
    /// more are refused with `limit_exceeded`.
    #[serde(default = "default_max_pending_routes")]
    pub max_pending_routes: usize,
    /// A client flow with no byte in either direction for this long is
    /// closed (`idle_timeout`). 0: no limit (LDAP clients may pool idle
    /// connections for a long time).
    #[serde(default)]
    pub client_idle_timeout_sec: u64,
}

impl Default for HubLimits {
    fn default() -> Self {
        HubLimits {
            max_agents: default_max_agents(),
            max_client_connections: default_max_clients(),
            max_pending_routes: default_max_pending_routes(),
            client_idle_timeout_sec: 0,
        }
    }
}

fn default_max_pending_routes() -> usize {
    4096
}

fn default_max_agents() -> usize {
    1024
}
fn default_max_clients() -> usize {
    20_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    #[serde(default)]
    pub format: Option<String>,
    /// A tracing filter such as `info` or `nowconnect=debug`; `RUST_LOG` overrides.
    #[serde(default)]
    pub level: Option<String>,
    /// Hub: log listener clients' addresses as their network (`/24`,
    /// `/48`) only. `false` logs them in full (and says so at start).
    #[serde(default = "default_true")]
    pub mask_client_addresses: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: None,
            level: None,
            mask_client_addresses: true,
        }
    }
}

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
fn check_redis(ha: &HaConfig) -> Result<Option<Secret>, (&'static str, String)> {
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
fn default_control_backlog() -> usize {
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

fn default_true() -> bool {
    true
}
fn default_queue() -> usize {
    1000
}
fn default_inflight() -> u64 {
    8 * 1024 * 1024
}
fn default_backoff() -> u64 {
    30
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshTls {
    pub ca_bundle: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// How one listener admits its clients (validated from its
/// [`ListenerConfig`]).
#[derive(Debug, Clone)]
pub struct ListenerEdge {
    pub limits: nowconnect_core::admission::AdmissionLimits,
    /// Close a client that has sent nothing for this long after connecting.
    pub first_byte_timeout: Option<Duration>,
    /// Read a PROXY header from these balancers (and take no one else).
    pub proxy: Option<crate::proxy_protocol::TrustedProxies>,
}

impl ListenerEdge {
    /// No limit, no timeout, no PROXY protocol.
    pub fn unlimited() -> Self {
        ListenerEdge {
            limits: nowconnect_core::admission::AdmissionLimits {
                max_connections: usize::MAX,
                max_connections_per_client: usize::MAX,
                max_new_per_sec: u32::MAX,
                max_new_per_sec_per_client: u32::MAX,
            },
            first_byte_timeout: None,
            proxy: None,
        }
    }
}

/// The validated hub configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub file: PathBuf,
    pub raw: HubFile,
    pub http_bind: SocketAddr,
    /// `http.ops_bind`: where `/healthz`, `/readyz` and `/metrics` are
    /// served instead of `http_bind`.
    pub ops_bind: Option<SocketAddr>,
    /// The TLS server configuration of the `bind` port (`http.tls`), built
    /// from its files when the configuration was read.
    pub http_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// (name, address, connector qualified by the listener's tenant; see
    /// `nowconnect_core::tenant`).
    pub listeners: Vec<(String, SocketAddr, String)>,
    /// Listener name → the qualified ids of the only agents that may serve it.
    pub listener_pins: std::collections::BTreeMap<String, Vec<String>>,
    /// Listener name → how its clients are admitted.
    pub listener_edges: std::collections::BTreeMap<String, ListenerEdge>,
    pub mode: Mode,
    pub replica_id: String,
    pub limits: Limits,
    /// The Redis password read from `ha.redis_password_file`.
    pub redis_password: Option<Secret>,
}

impl HubConfig {
    /// The secret files this hub reads (config key, path): the HS256
    /// secret, the mesh and Redis private keys, the Redis password.
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        let r = &self.raw;
        let mut v: Vec<(&'static str, &Path)> = Vec::new();
        if let Some(p) = &r.tunnel.jwt.hs256_secret_file {
            v.push(("tunnel.jwt.hs256_secret_file", p));
        }
        if let Some(t) = &r.http.tls {
            v.push(("http.tls.key_file", &t.key_file));
        }
        if let Some(t) = &r.ha.mesh.tls {
            v.push(("ha.mesh.tls.key_file", &t.key_file));
        }
        if let Some(p) = r.ha.redis_tls.as_ref().and_then(|t| t.key_file.as_ref()) {
            v.push(("ha.redis_tls.key_file", p));
        }
        if let Some(p) = &r.ha.redis_password_file {
            v.push(("ha.redis_password_file", p));
        }
        v
    }

    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = read_file(file)?;
        Self::parse(file, &text)
    }

    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: HubFile = parse_yaml(file, text)?;
        let err = |key: &str, reason: String| ConfigError::new(file, key, reason);
        let http_bind = parse_addr(&raw.http.bind).map_err(|r| err("http.bind", r))?;
        if raw.shutdown_delay_sec > raw.shutdown_grace_sec {
            return Err(err(
                "shutdown_delay_sec",
                format!(
                    "{} is longer than shutdown_grace_sec ({}): the delay is part of the grace period",
                    raw.shutdown_delay_sec, raw.shutdown_grace_sec
                ),
            ));
        }
        if raw.http.header_timeout_sec == 0 {
            return Err(err("http.header_timeout_sec", "must be > 0".into()));
        }
        let http_tls = match &raw.http.tls {
            Some(t) => Some(std::sync::Arc::new(
                crate::tls::http_server_config(&t.cert_file, &t.key_file)
                    .map_err(|(key, reason)| err(key, reason))?,
            )),
            None => None,
        };
        let ops_bind = match &raw.http.ops_bind {
            Some(o) => {
                let a = parse_addr(o).map_err(|r| err("http.ops_bind", r))?;
                if a.port() != 0 && a == http_bind {
                    return Err(err(
                        "http.ops_bind",
                        format!(
                            "{a} is http.bind too: use another address (or leave ops_bind out)"
                        ),
                    ));
                }
                Some(a)
            }
            None => None,
        };
        check_worker_threads(raw.worker_threads).map_err(|r| err("worker_threads", r))?;
        let mut listeners = Vec::new();
        let mut listener_pins = std::collections::BTreeMap::new();
        let mut listener_edges = std::collections::BTreeMap::new();
        for (i, l) in raw.listeners.iter().enumerate() {
            let key = |k: &str| format!("listeners[{i}].{k}");
            check_name(&l.name).map_err(|r| err(&key("name"), r))?;
            // Connector, tenant and agent names must be ones a token can carry.
            crate::jwt::check_connector(&l.connector).map_err(|r| err(&key("connector"), r))?;
            let addr = parse_addr(&l.bind).map_err(|r| err(&key("bind"), r))?;
            if l.max_connections == 0 {
                return Err(err(&key("max_connections"), "must be > 0".into()));
            }
            if l.max_connections_per_client == 0 {
                return Err(err(
                    &key("max_connections_per_client"),
                    "must be > 0".into(),
                ));
            }
            for (k, v) in [
                ("max_new_connections_per_sec", l.max_new_connections_per_sec),
                (
                    "max_new_connections_per_sec_per_client",
                    l.max_new_connections_per_sec_per_client,
                ),
            ] {
                if v == 0 {
                    return Err(err(&key(k), "must be > 0".into()));
                }
            }
            let proxy = match &l.proxy_protocol {
                Some(p) if p.trusted_proxies.is_empty() => {
                    return Err(err(
                        &key("proxy_protocol.trusted_proxies"),
                        "lists no address: no connection could be taken".into(),
                    ));
                }
                Some(p) => Some(
                    crate::proxy_protocol::TrustedProxies::parse(&p.trusted_proxies).map_err(
                        |(j, r)| err(&key(&format!("proxy_protocol.trusted_proxies[{j}]")), r),
                    )?,
                ),
                None => None,
            };
            if listeners.iter().any(|(n, _, _)| n == &l.name) {
                return Err(err(
                    &key("name"),
                    format!("duplicate listener name `{}`", l.name),
                ));
            }
            listener_edges.insert(
                l.name.clone(),
                ListenerEdge {
                    limits: nowconnect_core::admission::AdmissionLimits {
                        max_connections: l.max_connections,
                        max_connections_per_client: l.max_connections_per_client,
                        max_new_per_sec: l.max_new_connections_per_sec,
                        max_new_per_sec_per_client: l.max_new_connections_per_sec_per_client,
                    },
                    first_byte_timeout: match l.first_byte_timeout_sec {
                        0 => None,
                        s => Some(Duration::from_secs(s)),
                    },
                    proxy,
                },
            );
            if addr.port() != 0 && ops_bind == Some(addr) {
                return Err(err(
                    "http.ops_bind",
                    format!("{addr} is {} too: use another address", key("bind")),
                ));
            }
            if addr.port() != 0 && listeners.iter().any(|(_, a, _)| *a == addr) {
                return Err(err(
                    &key("bind"),
                    format!("{addr} is already used by another listener"),
                ));
            }
            let tenant = match &l.tenant {
                Some(t) => {
                    crate::jwt::check_tenant(t).map_err(|r| err(&key("tenant"), r))?;
                    t.as_str()
                }
                None => nowconnect_core::tenant::DEFAULT_TENANT,
            };
            if let Some(agents) = &l.agents {
                if agents.is_empty() {
                    return Err(err(
                        &key("agents"),
                        "lists no agent: the listener could never be served (omit it to allow every agent of the tenant)".into(),
                    ));
                }
                let mut pin = Vec::new();
                for (j, a) in agents.iter().enumerate() {
                    crate::jwt::check_agent_id(a)
                        .map_err(|r| err(&key(&format!("agents[{j}]")), r))?;
                    pin.push(nowconnect_core::tenant::qualify(tenant, a));
                }
                listener_pins.insert(l.name.clone(), pin);
            }
            listeners.push((
                l.name.clone(),
                addr,
                nowconnect_core::tenant::qualify(tenant, &l.connector),
            ));
        }
        let jwt = &raw.tunnel.jwt;
        match (&jwt.hs256_secret_file, &jwt.public_key_file) {
            (None, None) if jwt.jwks_file.is_none() => {
                return Err(err(
                    "tunnel.jwt",
                    "one of `hs256_secret_file`, `public_key_file` or `jwks_file` is required"
                        .into(),
                ));
            }
            (None, None) => {}
            (Some(_), Some(_)) => {
                return Err(err(
                    "tunnel.jwt",
                    "set only one of `hs256_secret_file` and `public_key_file`".into(),
                ));
            }
            (Some(p), None) => {
                check_readable(p).map_err(|r| err("tunnel.jwt.hs256_secret_file", r))?
            }
            (None, Some(p)) => {
                check_readable(p).map_err(|r| err("tunnel.jwt.public_key_file", r))?
            }
        }
        if let Some(p) = &jwt.jwks_file {
            check_readable(p).map_err(|r| err("tunnel.jwt.jwks_file", r))?
        }
        if jwt.audience.is_empty() {
            return Err(err("tunnel.jwt.audience", "must not be empty".into()));
        }
        if jwt.tenant_claim.is_empty() {
            return Err(err("tunnel.jwt.tenant_claim", "must not be empty".into()));
        }
        if STANDARD_CLAIMS.contains(&jwt.tenant_claim.as_str()) {
            return Err(err(
                "tunnel.jwt.tenant_claim",
                format!(
                    "`{}` is a claim the verifier reads for something else",
                    jwt.tenant_claim
                ),
            ));
        }
        if jwt.max_ttl_sec == Some(0) {
            return Err(err(
                "tunnel.jwt.max_ttl_sec",
                "must be > 0 (leave it out for no limit)".into(),
            ));
        }
        if let Some(p) = &raw.tunnel.revocation_file {
            crate::jwt::Revocations::load(p).map_err(|r| err("tunnel.revocation_file", r))?;
        }
        if let Some(algs) = &jwt.algorithms {
            if algs.is_empty() {
                return Err(err(
                    "tunnel.jwt.algorithms",
                    "must list at least one algorithm".into(),
                ));
            }
            for a in algs {
                if !JWT_ALGORITHMS.contains(&a.as_str()) {
                    return Err(err(
                        "tunnel.jwt.algorithms",
                        format!("unsupported algorithm `{a}`"),
                    ));
                }
            }
        }
        let t = &raw.tunnel;
        if !(1024..=16 * 1024 * 1024).contains(&t.max_frame_bytes) {
            return Err(err(
                "tunnel.max_frame_bytes",
                "must be between 1024 and 16777216".into(),
            ));
        }
        check_windows(t.window_bytes, t.max_window_bytes)
            .map_err(|(key, reason)| err(&format!("tunnel.{key}"), reason))?;
        if t.ping_interval_sec == 0 || t.idle_timeout_sec <= t.ping_interval_sec {
            return Err(err(
                "tunnel.idle_timeout_sec",
                format!(
                    "must be greater than ping_interval_sec ({}), and ping_interval_sec must be > 0",
                    t.ping_interval_sec
                ),
            ));
        }
        if t.handshake_timeout_sec == 0 {
            return Err(err("tunnel.handshake_timeout_sec", "must be > 0".into()));
        }
        if t.max_control_backlog_bytes < 64 * 1024 {
            return Err(err(
                "tunnel.max_control_backlog_bytes",
                format!(
                    "{} is below 65536: a healthy agent's replies would close its tunnel",
                    t.max_control_backlog_bytes
                ),
            ));
        }
        if t.max_flows_per_agent == 0 {
            return Err(err("tunnel.max_flows_per_agent", "must be > 0".into()));
        }
        if raw.limits.max_agents == 0 {
            return Err(err("limits.max_agents", "must be > 0".into()));
        }
        if raw.limits.max_pending_routes == 0 {
            return Err(err("limits.max_pending_routes", "must be > 0".into()));
        }
        if !(1..=1024).contains(&t.max_connectors_per_agent) {
            return Err(err(
                "tunnel.max_connectors_per_agent",
                "must be between 1 and 1024".into(),
            ));
        }
        if raw.ha.mesh.max_inbound_links == 0 {
            return Err(err("ha.mesh.max_inbound_links", "must be > 0".into()));
        }
        let mode = Mode::from_name(&raw.ha.mode).ok_or_else(|| {
            err(
                "ha.mode",
                format!("`{}` is not one of off, shadow, active", raw.ha.mode),
            )
        })?;
        let mode = if raw.ha.enabled { mode } else { Mode::Off };
        let replica_id = match &raw.ha.replica_id {
            Some(r) => {
                check_name(r).map_err(|e| err("ha.replica_id", e))?;
                r.clone()
            }
            None if raw.ha.enabled => {
                return Err(err(
                    "ha.replica_id",
                    "required when ha.enabled is true".into(),
                ));
            }
            None => "hub".into(),
        };
        let ha = &raw.ha;
        if ha.renew_interval_sec == 0 || ha.lease_sec <= ha.renew_interval_sec {
            return Err(err(
                "ha.lease_sec",
                format!(
                    "must be greater than ha.renew_interval_sec ({}), which must be > 0",
                    ha.renew_interval_sec
                ),
            ));
        }
        if ha.registry_timeout_ms == 0 {
            return Err(err("ha.registry_timeout_ms", "must be > 0".into()));
        }
        let redis_password = check_redis(ha).map_err(|(key, reason)| err(key, reason))?;
        let m = &raw.ha.mesh;
        if let Some(l) = &m.listen {
            let a = parse_addr(l).map_err(|r| err("ha.mesh.listen", r))?;
            if a.port() != 0 && ops_bind == Some(a) {
                return Err(err(
                    "http.ops_bind",
                    format!("{a} is ha.mesh.listen too: use another address"),
                ));
            }
        }
        for (i, p) in m.peers.iter().enumerate() {
            if !(p.starts_with("wss://") || p.starts_with("ws://")) {
                return Err(err(
                    &format!("ha.mesh.peers[{i}]"),
                    format!("`{p}` is not a ws:// or wss:// URL"),
                ));
            }
        }
        if let Some(u) = &m.advertise_url
            && !(u.starts_with("wss://") || u.starts_with("ws://"))
        {
            return Err(err(
                "ha.mesh.advertise_url",
                format!("`{u}` is not a ws:// or wss:// URL"),
            ));
        }
        if m.advertise_url.is_some() && m.listen.is_none() {
            return Err(err("ha.mesh.advertise_url", "needs ha.mesh.listen".into()));
        }
        for (i, r) in m.allowed_replicas.iter().enumerate() {
            check_name(r).map_err(|e| err(&format!("ha.mesh.allowed_replicas[{i}]"), e))?;
        }
        if m.send_queue_depth == 0 {
            return Err(err("ha.mesh.send_queue_depth", "must be > 0".into()));
        }
        if m.per_link_max_inflight_bytes < u64::from(t.window_bytes) {
            return Err(err(
                "ha.mesh.per_link_max_inflight_bytes",
                format!("must be at least tunnel.window_bytes ({})", t.window_bytes),
            ));
        }
        if m.handshake_timeout_sec == 0 {
            return Err(err("ha.mesh.handshake_timeout_sec", "must be > 0".into()));
        }
        if m.connect_backoff_max_sec == 0 {
            return Err(err("ha.mesh.connect_backoff_max_sec", "must be > 0".into()));
        }
        check_proxy_mode(m).map_err(|(key, reason)| err(&key, reason))?;
        let mesh_used = mode != Mode::Off && (m.listen.is_some() || !m.peers.is_empty());
        if mesh_used && m.require_mtls && m.tls.is_none() {
            return Err(err(
                "ha.mesh.tls",
                "required when ha.mesh.require_mtls is true".into(),
            ));
        }
        // Under mTLS every link is authenticated both ways: a plain ws://
        // peer would be neither.
        if let Some(i) = m.peers.iter().position(|p| p.starts_with("ws://"))
            && mesh_used
            && m.require_mtls
        {
            return Err(err(
                &format!("ha.mesh.peers[{i}]"),
                "a ws:// peer is not authenticated; use wss:// (ha.mesh.require_mtls is true)"
                    .into(),
            ));
        }
        if let Some(i) = m.peers.iter().position(|p| p.starts_with("wss://"))
            && mesh_used
            && m.tls.is_none()
        {
            return Err(err(
                &format!("ha.mesh.peers[{i}]"),
                "wss:// peers need ha.mesh.tls".into(),
            ));
        }
        if let Some(tls) = &m.tls {
            check_readable(&tls.ca_bundle).map_err(|r| err("ha.mesh.tls.ca_bundle", r))?;
            check_readable(&tls.cert_file).map_err(|r| err("ha.mesh.tls.cert_file", r))?;
            check_readable(&tls.key_file).map_err(|r| err("ha.mesh.tls.key_file", r))?;
        }
        if let Some(f) = &raw.log.format
            && f != "text"
            && f != "json"
        {
            return Err(err("log.format", format!("`{f}` is not one of text, json")));
        }
        let limits = Limits {
            max_frame: t.max_frame_bytes as usize,
            max_connectors: t.max_connectors_per_agent,
            ..Limits::default()
        };
        Ok(HubConfig {
            file: file.to_path_buf(),
            http_bind,
            ops_bind,
            http_tls,
            listeners,
            listener_pins,
            listener_edges,
            mode,
            replica_id,
            limits,
            redis_password,
            raw,
        })
    }

    pub fn tunnel_config(&self) -> nowconnect_core::tunnel::TunnelConfig {
        let t = &self.raw.tunnel;
        nowconnect_core::tunnel::TunnelConfig {
            limits: self.limits,
            window: t.window_bytes,
            max_window: max_window(t.window_bytes, t.max_window_bytes),
            ping_interval: Duration::from_secs(t.ping_interval_sec),
            idle_timeout: Duration::from_secs(t.idle_timeout_sec),
            handshake_timeout: Duration::from_secs(t.handshake_timeout_sec),
            max_flows: t.max_flows_per_agent,
            dedup_capacity: t.max_flows_per_agent,
            max_control_backlog: t.max_control_backlog_bytes,
            ..Default::default()
        }
    }
}

// ---------------------------------------------------------------- agent

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent_id: String,
    pub hubs: Vec<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<AgentTls>,
    pub connectors: Vec<ConnectorConfig>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_sec: u64,
    #[serde(default = "default_backoff")]
    pub reconnect_backoff_max_sec: u64,
    #[serde(default = "default_window")]
    pub window_bytes: u32,
    /// As the hub's `tunnel.max_window_bytes`.
    #[serde(default)]
    pub max_window_bytes: Option<u32>,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: u32,
    /// Flows open at once on the tunnel; further opens are refused with
    /// `limit_exceeded`.
    #[serde(default = "default_agent_max_flows")]
    pub max_flows: usize,
    /// Target dials in progress at once; further opens are refused with
    /// `limit_exceeded`.
    #[serde(default = "default_agent_max_dials")]
    pub max_pending_dials: usize,
    /// Use only the v1 JSON codec (for hubs that predate v2).
    #[serde(default)]
    pub v1_only: bool,
    /// Allow `ws://` hub URLs to hosts other than loopback (the token then
    /// crosses the network in clear text): only where something else
    /// encrypts the path, e.g. a TLS-terminating sidecar. Logged at start.
    #[serde(default)]
    pub allow_plaintext_hubs: bool,
    #[serde(default)]
    pub log: LogConfig,
    /// Executor threads of this process; 0 (the default): the runtime's
    /// own default, one per CPU. Read at start; a reload does not change it.
    #[serde(default)]
    pub worker_threads: usize,
}

fn default_mesh_handshake() -> u64 {
    10
}

fn default_connect_timeout() -> u64 {
    5
}

/// Whether a `ws://` URL's host is this machine (`localhost`, 127.0.0.0/8,
/// `::1`).
fn is_loopback_url(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host_port.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host_port.rsplit_once(':').map_or(host_port, |(h, _)| h)
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn default_agent_max_dials() -> usize {
    nowconnect_core::agent::AgentConfig::default().max_pending_dials
}

fn default_agent_max_flows() -> usize {
    nowconnect_core::tunnel::TunnelConfig::default().max_flows
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTls {
    pub ca_bundle: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectorConfig {
    pub name: String,
    pub target: String,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub file: PathBuf,
    pub raw: AgentFile,
    pub token: String,
}

impl AgentConfig {
    /// The secret files this agent reads (config key, path).
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        self.raw
            .token_file
            .iter()
            .map(|p| ("token_file", p.as_path()))
            .collect()
    }

    /// The core agent's settings from this file (both runtimes use this).
    pub fn core_config(&self) -> nowconnect_core::agent::AgentConfig {
        let r = &self.raw;
        nowconnect_core::agent::AgentConfig {
            agent_id: r.agent_id.clone(),
            hubs: r.hubs.clone(),
            connectors: r
                .connectors
                .iter()
                .map(|c| (c.name.clone(), c.target.clone()))
                .collect(),
            backoff_max: Duration::from_secs(r.reconnect_backoff_max_sec),
            target_connect_timeout: Duration::from_secs(r.connect_timeout_sec),
            max_pending_dials: r.max_pending_dials,
            ..nowconnect_core::agent::AgentConfig::default()
        }
    }

    /// The agent side's tunnel settings.
    pub fn tunnel_config(&self) -> nowconnect_core::tunnel::TunnelConfig {
        let r = &self.raw;
        nowconnect_core::tunnel::TunnelConfig {
            limits: Limits {
                max_frame: r.max_frame_bytes as usize,
                // The agent announces what it serves; the hub's limit decides.
                max_connectors: r.connectors.len().max(Limits::default().max_connectors),
                ..Limits::default()
            },
            window: r.window_bytes,
            max_window: max_window(r.window_bytes, r.max_window_bytes),
            max_flows: r.max_flows,
            dedup_capacity: r.max_flows,
            codecs: if r.v1_only {
                vec![nowconnect_core::Codec::V1]
            } else {
                vec![nowconnect_core::Codec::V2, nowconnect_core::Codec::V1]
            },
            ..nowconnect_core::tunnel::TunnelConfig::default()
        }
    }

    /// The token to present on the next hub connection: `token_file` read
    /// again (so a rotated token is picked up without a restart), else the
    /// token given at start. An unreadable or empty file is an error; the
    /// caller then uses the token read at start.
    pub fn current_token(&self) -> Result<String, String> {
        let Some(p) = &self.raw.token_file else {
            return Ok(self.token.clone());
        };
        let t = std::fs::read_to_string(p)
            .map_err(|e| format!("token_file {}: {e}", p.display()))?
            .trim()
            .to_string();
        if t.is_empty() {
            return Err(format!("token_file {}: empty", p.display()));
        }
        Ok(t)
    }

    /// [`AgentConfig::current_token`], or (with a warning naming the
    /// problem) the token read at start.
    pub fn dial_token(&self) -> String {
        self.current_token().unwrap_or_else(|error| {
            tracing::warn!(%error, "using the token read at start");
            self.token.clone()
        })
    }

    /// Largest WebSocket message to accept from a hub.
    pub fn max_message(&self) -> usize {
        self.raw.max_frame_bytes as usize + 1024
    }

    pub fn load(file: &Path) -> Result<Self, ConfigError> {
        let text = read_file(file)?;
        Self::parse(file, &text, std::env::var("NC_TOKEN").ok())
    }

    pub fn parse(file: &Path, text: &str, env_token: Option<String>) -> Result<Self, ConfigError> {
        let raw: AgentFile = parse_yaml(file, text)?;
        let err = |key: &str, reason: String| ConfigError::new(file, key, reason);
        crate::jwt::check_agent_id(&raw.agent_id).map_err(|r| err("agent_id", r))?;
        if raw.hubs.is_empty() {
            return Err(err("hubs", "list at least one hub tunnel URL".into()));
        }
        for (i, h) in raw.hubs.iter().enumerate() {
            if !(h.starts_with("ws://") || h.starts_with("wss://")) {
                return Err(err(
                    &format!("hubs[{i}]"),
                    format!("`{h}` is not a ws:// or wss:// URL"),
                ));
            }
            if !raw.allow_plaintext_hubs && h.starts_with("ws://") && !is_loopback_url(h) {
                return Err(err(
                    &format!("hubs[{i}]"),
                    format!(
                        "`{h}` would send the agent's token in clear text to another host: use wss:// (or set allow_plaintext_hubs: true where a sidecar encrypts the path)"
                    ),
                ));
            }
        }
        if raw.connectors.is_empty() {
            return Err(err("connectors", "list at least one connector".into()));
        }
        for (i, c) in raw.connectors.iter().enumerate() {
            crate::jwt::check_connector(&c.name)
                .map_err(|r| err(&format!("connectors[{i}].name"), r))?;
            check_target(&c.target).map_err(|r| err(&format!("connectors[{i}].target"), r))?;
            if raw.connectors[..i].iter().any(|o| o.name == c.name) {
                return Err(err(
                    &format!("connectors[{i}].name"),
                    format!("duplicate connector `{}`", c.name),
                ));
            }
        }
        if raw.connect_timeout_sec == 0 {
            return Err(err("connect_timeout_sec", "must be > 0".into()));
        }
        check_worker_threads(raw.worker_threads).map_err(|r| err("worker_threads", r))?;
        check_windows(raw.window_bytes, raw.max_window_bytes)
            .map_err(|(key, reason)| err(key, reason))?;
        if raw.max_pending_dials == 0 {
            return Err(err("max_pending_dials", "must be > 0".into()));
        }
        if raw.max_flows == 0 {
            return Err(err("max_flows", "must be > 0".into()));
        }
        if let Some(tls) = &raw.tls {
            check_readable(&tls.ca_bundle).map_err(|r| err("tls.ca_bundle", r))?;
        }
        let token = match (&raw.token_file, env_token) {
            (Some(p), _) => std::fs::read_to_string(p)
                .map_err(|e| err("token_file", format!("cannot read {}: {e}", p.display())))?
                .trim()
                .to_string(),
            (None, Some(t)) => t.trim().to_string(),
            (None, None) => {
                return Err(err(
                    "token_file",
                    "no token: set token_file or NC_TOKEN in the environment".into(),
                ));
            }
        };
        if token.is_empty() {
            return Err(err("token_file", "the token is empty".into()));
        }
        Ok(AgentConfig {
            file: file.to_path_buf(),
            raw,
            token,
        })
    }
}

// ---------------------------------------------------------------- helpers

/// `ha.mesh.tls_terminated_by_proxy` and its companions: the proxy mode
/// needs the peers' CA (`tls`), an authenticating mesh (`require_mtls`), a
/// listener, and the proxies' networks; those keys mean nothing without it.
fn check_proxy_mode(m: &MeshConfig) -> Result<(), (String, String)> {
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

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an address like 127.0.0.1:8080 or [::1]:389"))
}

fn check_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 255 {
        return Err("must be 1 to 255 bytes".into());
    }
    if !s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
    {
        return Err(format!(
            "`{s}` may contain only letters, digits, `-`, `_`, `.` and `:`"
        ));
    }
    Ok(())
}

fn check_target(s: &str) -> Result<(), String> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(format!("`{s}` is not host:port"));
    };
    if host.is_empty() {
        return Err(format!("`{s}` has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("`{s}` has no valid port")),
    }
}

fn check_readable(p: &Path) -> Result<(), String> {
    std::fs::metadata(p)
        .map(|_| ())
        .map_err(|e| format!("cannot read {}: {e}", p.display()))
}
