//! tungstenite, the WebSocket library under both runtimes' client and mesh
//! sockets (tokio-tungstenite and async-tungstenite share its message type):
//! the request an agent dials a hub with, the size limits, and the link
//! writer's message constructors.

use async_channel::Receiver;
use nowconnect_core::WsMessage;
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request;
use tungstenite::protocol::{CloseFrame, WebSocketConfig};

use crate::driver::{InlineWriter, Outgoing};

/// The upgrade request for a hub's `/tunnel`, carrying the agent's token.
pub fn hub_request(url: &str, token: &str) -> Result<Request, String> {
    let mut req = url
        .into_client_request()
        .map_err(|e| format!("bad hub URL `{url}`: {e}"))?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {token}")
            .parse()
            .map_err(|_| "token has characters not allowed in a header".to_string())?,
    );
    Ok(req)
}

/// How much tungstenite reads per call. It zeroes that much of its buffer
/// before each read, whatever the read returns, and a read from TLS returns
/// one record (at most 16 KiB): with its default of 128 KiB the zeroing cost
/// more than the copy.
pub const READ_BUFFER: usize = 32 * 1024;

/// The read size of a hub's agent tunnels (`/tunnel`), half of
/// [`READ_BUFFER`]: a hub holds one per agent, and tungstenite keeps that
/// much zeroed and resident for each even while it only carries pings.
/// 10,000 idle agents on one hub: 50.1 KiB of hub RSS per agent with 32 KiB,
/// 34.0 KiB with 16 KiB, and less of the hub's idle CPU spent zeroing
/// (`agents-bench idle --count 10000`, `docs/performance.md`). It bounds
/// only what one read takes from the agent (the target-to-client
/// direction); a TLS record is at most 16 KiB of it.
pub const HUB_TUNNEL_READ_BUFFER: usize = 16 * 1024;

/// Size limits and read size of a hub's agent tunnel (`/tunnel`).
pub fn hub_tunnel_ws_config(max: usize) -> WebSocketConfig {
    ws_config(max).read_buffer_size(HUB_TUNNEL_READ_BUFFER)
}

/// Message and frame size limits for a link whose largest message is `max`.
pub fn ws_config(max: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(READ_BUFFER)
}

/// A frame as a tungstenite message.
pub fn frame_message(m: WsMessage) -> Message {
    match m {
        WsMessage::Text(s) => Message::Text(s.into()),
        WsMessage::Binary(b) => Message::Binary(b),
    }
}

/// What a tungstenite WebSocket delivered, as a link loop needs it.
pub fn ws_in(m: Result<Message, tungstenite::Error>) -> crate::driver::WsIn {
    use crate::driver::WsIn;
    match m {
        Ok(Message::Binary(b)) => WsIn::Frame(WsMessage::Binary(b)),
        Ok(Message::Text(t)) => WsIn::Frame(WsMessage::Text(t.as_str().to_owned())),
        Ok(Message::Close(f)) => WsIn::Closed(f.map(|f| f.reason.to_string()).unwrap_or_default()),
        Ok(_) => WsIn::Other,
        Err(e) => WsIn::Failed(e.to_string()),
    }
}

/// A close frame as a tungstenite message.
pub fn close_message(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseFrame {
        code: code.into(),
        reason: reason.into(),
    }))
}

/// A tungstenite WebSocket written by the link task itself.
pub fn inline_writer<S>(sink: S, rx: Receiver<Outgoing>) -> InlineWriter<S, Message>
where
    S: futures_util::Sink<Message> + Unpin,
{
    InlineWriter::new(sink, rx, frame_message, close_message)
}
