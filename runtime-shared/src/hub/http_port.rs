//! The hub's HTTP ports: which endpoints each serves ([`HttpRole`]) and
//! what a runtime must do to serve them ([`HubHttp`]). Kept apart from
//! [`HubRt`] so that the runtime trait does not name the hub's state.

use std::future::Future;
use std::sync::Arc;

use async_channel::Receiver;

use super::Shared;
use crate::rt::HubRt;

/// Which endpoints an HTTP port serves: everything on `http.bind`, or,
/// with `http.ops_bind` set, `/tunnel` there and the operations endpoints
/// on the ops port. A path the port does not serve gets a `404`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpRole {
    /// `/tunnel`, `/healthz`, `/readyz` and `/metrics` (no `http.ops_bind`).
    All,
    /// `/tunnel` only: the public port when `http.ops_bind` is set.
    Tunnel,
    /// `/healthz`, `/readyz` and `/metrics`: the `http.ops_bind` port.
    Ops,
}

impl HttpRole {
    /// Whether this port answers `path` (without its query).
    pub fn serves(self, path: &str) -> bool {
        match path {
            "/tunnel" => self != HttpRole::Ops,
            "/healthz" | "/readyz" | "/metrics" => self != HttpRole::Tunnel,
            _ => false,
        }
    }

    /// The paths this port serves, for the start log.
    pub fn paths(self) -> &'static str {
        match self {
            HttpRole::All => "/tunnel /healthz /readyz /metrics",
            HttpRole::Tunnel => "/tunnel",
            HttpRole::Ops => "/healthz /readyz /metrics",
        }
    }
}

/// What a runtime must do to serve the hub's HTTP endpoints.
pub trait HubHttp: HubRt {
    /// Serve the endpoints of `role` on `l` until `stop` fires, then let
    /// requests in progress end. On a port where
    /// [`Shared::http_server_tls`] gives a configuration (read per accepted
    /// connection: a reload swaps it), every connection first completes a
    /// TLS handshake within `http.header_timeout_sec`; a failed or late one
    /// is closed and reported to [`Shared::http_tls_failed`].
    fn serve_http(
        shared: Arc<Shared<Self>>,
        l: Self::Listener,
        role: HttpRole,
        stop: Receiver<()>,
    ) -> impl Future<Output = ()> + Send + 'static;
}
