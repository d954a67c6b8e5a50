//! The agent's file (`premise.yaml`) and its validation into [`AgentConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nowconnect_core::Limits;
use serde::Deserialize;

use super::{
    ConfigError, LogConfig, check_readable, check_target, check_windows, check_worker_threads,
    default_backoff, default_max_frame, default_window, max_window, parse_addr, parse_yaml,
    read_file,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub agent_id: String,
    pub hubs: Vec<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<AgentTls>,
    /// The agent's own HTTP endpoint (`/healthz`, `/readyz`, `/metrics`);
    /// absent: none is served.
    #[serde(default)]
    pub http: Option<AgentHttp>,
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
    /// Tunnels held at once, each to a distinct hub (multi-homing): new
    /// connections on every hub that holds one are served without the mesh,
    /// and a hub's loss leaves the others serving. 1 to 4; default 2 when
    /// `hubs` lists at least two URLs, else 1 (set it to 2 or more behind
    /// one load-balanced URL: the agent keeps dialing until its tunnels
    /// are on distinct hubs).
    #[serde(default)]
    pub ha_connections: Option<u8>,
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
pub struct AgentHttp {
    /// `host:port` to serve on (port 0: any free port, printed in the
    /// start line). No authentication: bind to loopback or a private
    /// address.
    pub bind: String,
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
    /// `http.bind`, parsed.
    pub http_bind: Option<SocketAddr>,
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
            ha_connections: self.ha_connections(),
            ..nowconnect_core::agent::AgentConfig::default()
        }
    }

    /// Tunnels the agent holds at once: `ha_connections`, or 2 when `hubs`
    /// lists at least two URLs, else 1.
    pub fn ha_connections(&self) -> u8 {
        self.raw
            .ha_connections
            .unwrap_or(if self.raw.hubs.len() >= 2 { 2 } else { 1 })
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
        if let Some(n) = raw.ha_connections
            && !(1..=nowconnect_core::frame::MAX_SLOTS).contains(&n)
        {
            return Err(err(
                "ha_connections",
                format!(
                    "{n}: an agent holds 1 to {} tunnels at once",
                    nowconnect_core::frame::MAX_SLOTS
                ),
            ));
        }
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
        let http_bind = match &raw.http {
            Some(h) => Some(parse_addr(&h.bind).map_err(|r| err("http.bind", r))?),
            None => None,
        };
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
            http_bind,
        })
    }
}
