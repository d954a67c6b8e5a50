//! `listeners[]` of the hub's file and how each admits its clients.

use std::time::Duration;

use serde::Deserialize;

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
