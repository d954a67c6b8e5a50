//! HTTP/1.1 as every NowConnect endpoint speaks it over a `futures-io`
//! socket, whatever the process and its role: the request head (read with
//! `httparse`, bounded in size and time), the answers (`Connection: close`),
//! and the operations routes every process serves (`/healthz`, `/readyz`,
//! `/metrics`). The hub's routes are in [`crate::http`], the agent's in
//! [`crate::agent_http`].

use std::net::SocketAddr;

use futures_util::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head taken.
pub const MAX_HEAD: usize = 16 * 1024;

/// A parsed request head, and the bytes read after it.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }
}

/// Read one request head (`Err`: the reason the connection is dropped).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<Head, String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before a full request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                return Ok(Head {
                    method: req.method.unwrap_or_default().to_string(),
                    path: req.path.unwrap_or_default().to_string(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    rest: buf[len..].to_vec(),
                });
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("request head too large".into()),
            Err(e) => return Err(format!("bad request head: {e}")),
        }
    }
}

/// A complete response that closes the connection.
pub fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// `/readyz`'s answer: `200 {"status":"ready"}` with no reason against,
/// else `503 {"status":"degraded","reasons":[…]}`.
pub fn readiness(reasons: &[String]) -> (u16, String) {
    if reasons.is_empty() {
        (200, serde_json::json!({"status": "ready"}).to_string())
    } else {
        (
            503,
            serde_json::json!({"status": "degraded", "reasons": reasons}).to_string(),
        )
    }
}

pub(crate) const TEXT: &str = "text/plain; charset=utf-8";

/// The operations endpoints every process serves (`/healthz`, `/readyz`,
/// `/metrics`) for a `GET` of `path` (without its query); `None` for any
/// other path. `readyz` and `metrics` are asked only for their own path.
pub fn ops_response(
    path: &str,
    readyz: impl FnOnce() -> (u16, String),
    metrics: impl FnOnce() -> String,
) -> Option<Vec<u8>> {
    match path {
        "/healthz" => Some(response(200, TEXT, "ok")),
        "/readyz" => {
            let (status, body) = readyz();
            Some(response(status, "application/json", &body))
        }
        "/metrics" => Some(response(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            &metrics(),
        )),
        _ => None,
    }
}

/// Read one request head within the time `timeout` takes (it also covers a
/// connection that sends nothing). A malformed or oversized head gets a
/// `400` and the connection is closed; `None` then, and when the head did
/// not come in time or the peer went away.
pub async fn read_head_within<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    timeout: impl std::future::Future<Output = ()>,
    peer: SocketAddr,
) -> Option<Head> {
    let head = futures_lite::future::race(async { Some(read_head(stream).await) }, async {
        timeout.await;
        None
    })
    .await;
    match head {
        Some(Ok(h)) => Some(h),
        Some(Err(reason)) => {
            tracing::debug!(%peer, %reason, "http connection ended");
            if reason.starts_with("bad request") || reason.contains("too large") {
                let _ = stream.write_all(&response(400, TEXT, "")).await;
                let _ = stream.close().await;
            }
            None
        }
        None => {
            tracing::debug!(%peer, "http request head not received in time; closed");
            None
        }
    }
}

/// Write a complete response and close the connection.
pub async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let _ = stream.close().await;
}
