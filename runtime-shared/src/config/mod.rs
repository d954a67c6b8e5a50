//! Hub (`cloud.yaml`) and agent (`premise.yaml`) configuration: parsed with
//! serde-saphyr, unknown keys refused, every value validated at start. Every
//! error names the file, the key path and the reason.
//!
//! `docs/configuration.md` documents each key and its default.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

mod agent;
mod ha;
mod hub;
mod listener;

pub use agent::{AgentConfig, AgentFile, AgentHttp, AgentTls, ConnectorConfig};
pub use ha::{
    ClientCertFormat, ClientCertHeader, HaConfig, MeshConfig, MeshTls, RedisTls, RedisUrl,
};
pub use hub::{
    HttpConfig, HttpTls, HubConfig, HubFile, HubLimits, JWT_ALGORITHMS, JwtConfig, LogConfig,
    ReloadConfig, TunnelSection,
};
pub use listener::{ListenerConfig, ListenerEdge, ProxyProtocolConfig};

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

// ---------------------------------------------------------------- shared
// by the hub's and the agent's files

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

fn default_true() -> bool {
    true
}
fn default_backoff() -> u64 {
    30
}

fn default_mesh_handshake() -> u64 {
    10
}

// ---------------------------------------------------------------- helpers

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
