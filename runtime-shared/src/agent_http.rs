//! The agent's own HTTP endpoint (`http.bind` in `premise.yaml`):
//! `/healthz`, `/readyz` and `/metrics`, over any `futures-io` socket of the
//! runtime ([`AgentRt`]), with the hub's request head reader and responses
//! ([`crate::http`]).
//!
//! It runs in tasks of its own, never on the agent loop: it reads only what
//! the loop published ([`AgentStatus`], the [`AgentMetrics`] registry).
//! Bounded against slow or hostile clients: one request per connection,
//! the head within [`HEAD_TIMEOUT`] and at most [`MAX_HEAD`] bytes, the
//! whole connection (head and response) within [`CONNECTION_TIMEOUT`], and
//! at most [`MAX_CONNECTIONS`] connections at once (more are closed
//! unanswered until one ends).
//!
//! [`MAX_HEAD`]: crate::http_wire::MAX_HEAD

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncWrite};

use crate::agent_status::AgentStatus;
use crate::config::AgentConfig;
use crate::http_wire::{ops_response, read_head_within, respond, response};
use crate::metrics::agent::AgentMetrics;
use crate::rt::AgentRt;

/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last, head and response together (a client
/// that does not read the response is cut off here).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;

/// What the endpoint answers from.
pub struct Endpoint {
    pub cfg: AgentConfig,
    pub status: Arc<AgentStatus>,
    pub metrics: Arc<AgentMetrics>,
}

/// Bind `http.bind`, if the file sets it: the listener and the address it
/// took (port 0: the one the system chose).
pub async fn bind<R: AgentRt>(
    rt: &R,
    cfg: &AgentConfig,
) -> Result<Option<(R::Listener, SocketAddr)>, String> {
    let Some(addr) = cfg.http_bind else {
        return Ok(None);
    };
    let l = rt
        .bind(addr)
        .await
        .map_err(|e| format!("http.bind {addr}: {e}"))?;
    let bound = R::local_addr(&l).map_err(|e| format!("http.bind {addr}: {e}"))?;
    tracing::info!(addr = %bound, paths = "/healthz /readyz /metrics", "agent http endpoint");
    Ok(Some((l, bound)))
}

/// Holds one of the [`MAX_CONNECTIONS`] places until dropped.
struct Place(Arc<AtomicUsize>);

impl Place {
    fn take(open: &Arc<AtomicUsize>) -> Option<Place> {
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_CONNECTIONS).then_some(n + 1)
        })
        .ok()
        .map(|_| Place(open.clone()))
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accept and serve connections on `l` for as long as the task runs.
pub async fn serve<R: AgentRt>(rt: Arc<R>, l: R::Listener, ep: Arc<Endpoint>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match R::accept(&l).await {
            Ok(a) => a,
            Err(error) => {
                // Out of descriptors and the like: do not spin.
                tracing::warn!(%error, "agent http accept failed");
                rt.sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(place) = Place::take(&open) else {
            tracing::debug!(%peer, "agent http: {MAX_CONNECTIONS} connections open; closed");
            continue;
        };
        let (ep, head, whole) = (
            ep.clone(),
            rt.sleep(HEAD_TIMEOUT),
            rt.sleep(CONNECTION_TIMEOUT),
        );
        rt.spawn(async move {
            let _place = place;
            futures_lite::future::race(connection(stream, peer, &ep, head), whole).await;
        });
    }
}

/// One request: the head within `head_timeout`, then the answer.
async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    peer: SocketAddr,
    ep: &Endpoint,
    head_timeout: impl std::future::Future<Output = ()>,
) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let Some(head) = read_head_within(&mut stream, head_timeout, peer).await else {
        return;
    };
    let path = head.path.split('?').next().unwrap_or_default();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics");
    let reply = if known && head.method != "GET" {
        response(405, TEXT, "")
    } else {
        ops_response(path, || ep.status.readyz(&ep.cfg), || ep.metrics.render())
            .unwrap_or_else(|| response(404, TEXT, ""))
    };
    respond(&mut stream, &reply).await;
}
