//! The hub's HTTP endpoints over any `futures-io` socket, for runtimes
//! without a hyper stack (the tokio adapter serves the same routes with
//! axum): `/healthz`, `/readyz`, `/metrics` and the `/tunnel` upgrade. The
//! agent's endpoint ([`crate::agent_http`]) is built from the same pieces
//! ([`crate::http_wire`]).
//!
//! One request per connection: the head must arrive within
//! `http.header_timeout_sec` (no slowloris), every response but a `101`
//! carries `Connection: close` and ends its connection. The request head is
//! parsed with `httparse`; the WebSocket accept key is tungstenite's.

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::hub::{HubRt, Shared};
use crate::jwt::AgentIdentity;

pub use crate::hub::HttpRole;

use crate::http_wire::TEXT;
pub use crate::http_wire::{
    Head, MAX_HEAD, ops_response, read_head, read_head_within, respond, response,
};

/// What to do with a request.
pub enum Answer {
    /// Write these bytes and close.
    Respond(Vec<u8>),
    /// Write these bytes (`101`), then run the agent tunnel on the socket.
    Upgrade {
        response: Vec<u8>,
        identity: AgentIdentity,
    },
}

/// Route one request the way the tokio hub's axum router does.
pub fn answer<R: HubRt>(
    shared: &Shared<R>,
    head: &Head,
    peer: SocketAddr,
    role: HttpRole,
) -> Answer {
    let path = head.path.split('?').next().unwrap_or_default();
    if !role.serves(path) {
        return Answer::Respond(response(404, TEXT, ""));
    }
    if head.method != "GET" {
        return Answer::Respond(response(405, TEXT, ""));
    }
    match ops_response(path, || shared.readyz(), || shared.metrics().render()) {
        Some(r) => Answer::Respond(r),
        None => {
            let key = head.header("sec-websocket-key");
            let upgrade = head.has_token("upgrade", "websocket")
                && head.has_token("connection", "upgrade")
                && head.header("sec-websocket-version") == Some("13");
            let Some(key) = key.filter(|_| upgrade) else {
                return Answer::Respond(response(
                    400,
                    TEXT,
                    "a WebSocket upgrade (version 13) is required\n",
                ));
            };
            match shared.authorize_tunnel(head.header("authorization"), peer) {
                Err((status, body)) => Answer::Respond(response(status, TEXT, &body)),
                Ok(identity) => Answer::Upgrade {
                    response: format!(
                        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-accept: {}\r\n\r\n",
                        tungstenite::handshake::derive_accept_key(key.as_bytes())
                    )
                    .into_bytes(),
                    identity,
                },
            }
        }
    }
}

/// Serve one HTTP connection: read the head (bounded by the header timeout,
/// which also covers a connection that sends nothing), answer it, and on a
/// `/tunnel` upgrade hand the socket and any bytes read past the head to
/// `upgrade`.
pub async fn serve_connection<R, S, U, F>(
    shared: Arc<Shared<R>>,
    mut stream: S,
    peer: SocketAddr,
    role: HttpRole,
    upgrade: U,
) where
    R: HubRt,
    S: AsyncRead + AsyncWrite + Unpin + Send,
    U: FnOnce(Arc<Shared<R>>, S, Vec<u8>, AgentIdentity) -> F,
    F: std::future::Future<Output = ()> + Send,
{
    let within = std::time::Duration::from_secs(shared.cfg().raw.http.header_timeout_sec);
    let timeout = shared.rt().sleep(within);
    let Some(head) = read_head_within(&mut stream, timeout, peer).await else {
        return;
    };
    match answer(&shared, &head, peer, role) {
        Answer::Respond(bytes) => respond(&mut stream, &bytes).await,
        Answer::Upgrade { response, identity } => {
            if stream.write_all(&response).await.is_err() || stream.flush().await.is_err() {
                return;
            }
            upgrade(shared, stream, head.rest, identity).await;
        }
    }
}
