//! The hub's file (`cloud.yaml`): its sections and their validation into
//! [`HubConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nowconnect_core::Limits;
use nowconnect_core::routing::Mode;
use serde::Deserialize;

use super::ha::{check_proxy_mode, check_redis, default_control_backlog};
use super::{
    ConfigError, HaConfig, ListenerConfig, ListenerEdge, check_name, check_readable, check_windows,
    check_worker_threads, default_max_frame, default_true, default_window, max_window, parse_addr,
    parse_yaml, read_file,
};
use crate::redact::Secret;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubFile {
    /// Absent: every key at its default (`bind` 127.0.0.1:8080), so the
    /// design's minimal `cloud.yaml` starts.
    #[serde(default)]
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
    /// Loopback by default: `/metrics` and `/readyz` are not for the
    /// internet, and agents reach a hub through a proxy or an explicit
    /// bind (docs/configuration.md).
    #[serde(default = "default_http_bind")]
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

/// `http.bind` when the file names none.
pub const DEFAULT_HTTP_BIND: &str = "127.0.0.1:8080";

fn default_http_bind() -> String {
    DEFAULT_HTTP_BIND.to_string()
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            bind: default_http_bind(),
            header_timeout_sec: default_header_timeout(),
            tls: None,
            ops_bind: None,
        }
    }
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
