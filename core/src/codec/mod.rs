//! Frame codecs: v1 (JSON text, base64 payloads) and v2 (compact binary).
//!
//! Both check the message length against [`Limits::max_frame`] before looking
//! at its contents, check every length before allocating, and return a typed
//! [`CodecError`] for bad input; they never panic.

pub mod v1;
pub mod v2;

use bytes::Bytes;

use crate::frame::{Frame, FrameType, Limits};
use crate::payload::Payload;

/// The payload of one WebSocket message as the codecs see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WsMessage {
    Text(String),
    Binary(Bytes),
}

impl WsMessage {
    pub fn len(&self) -> usize {
        match self {
            WsMessage::Text(s) => s.len(),
            WsMessage::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which encoding a link sends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Codec {
    V1,
    V2,
}

impl Codec {
    pub fn as_str(self) -> &'static str {
        match self {
            Codec::V1 => "v1",
            Codec::V2 => "v2",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "v1" => Some(Codec::V1),
            "v2" => Some(Codec::V2),
            _ => None,
        }
    }

    /// The WebSocket subprotocol that selects this codec on the mesh.
    pub fn mesh_subprotocol(self) -> &'static str {
        match self {
            Codec::V1 => "nowconnect.mesh.v1",
            Codec::V2 => "nowconnect.mesh.v2",
        }
    }

    pub fn from_mesh_subprotocol(s: &str) -> Option<Self> {
        [Codec::V2, Codec::V1]
            .into_iter()
            .find(|c| c.mesh_subprotocol() == s)
    }

    pub fn encode(self, frame: &Frame, limits: &Limits) -> Result<WsMessage, CodecError> {
        match self {
            Codec::V1 => v1::encode(frame, limits).map(WsMessage::Text),
            Codec::V2 => v2::encode(frame, limits).map(WsMessage::Binary),
        }
    }

    /// Encode a DATA or M_DATA frame given as `head` (the frame with an
    /// empty payload) and its payload. v2 writes the header into the room in
    /// front of the payload when there is enough, instead of copying the
    /// payload behind it; v1 encodes the whole frame as text either way.
    pub fn encode_data(
        self,
        head: Frame,
        payload: Payload,
        limits: &Limits,
    ) -> Result<WsMessage, CodecError> {
        match self {
            Codec::V1 => {
                let frame = match head {
                    Frame::Data { cid, seq, .. } => Frame::Data {
                        cid,
                        seq,
                        payload: payload.into_bytes(),
                    },
                    Frame::MData { h, .. } => Frame::MData {
                        h,
                        payload: payload.into_bytes(),
                    },
                    other => other,
                };
                v1::encode(&frame, limits).map(WsMessage::Text)
            }
            Codec::V2 => v2::encode_data(&head, payload, limits).map(WsMessage::Binary),
        }
    }
}

/// Decode one message: text is v1, binary is v2, whatever the link negotiated
/// for sending (so a v1-only peer and a v2 peer can always be understood).
pub fn decode(msg: &WsMessage, limits: &Limits) -> Result<Frame, CodecError> {
    match msg {
        WsMessage::Text(s) => v1::decode(s, limits),
        WsMessage::Binary(b) => v2::decode(b, limits),
    }
}

/// Why bytes from a peer are not a valid frame.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(String),
    #[error("{frame}: truncated: field `{field}` needs {need} bytes, {have} left")]
    Truncated {
        frame: &'static str,
        field: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{frame}: {extra} unexpected trailing bytes")]
    TrailingBytes { frame: &'static str, extra: usize },
    #[error("{frame}: field `{field}` is missing")]
    MissingField {
        frame: &'static str,
        field: &'static str,
    },
    #[error("{frame}: field `{field}` is out of range: {reason}")]
    OutOfRange {
        frame: &'static str,
        field: &'static str,
        reason: String,
    },
    #[error("{frame}: field `{field}` is not valid UTF-8")]
    BadUtf8 {
        frame: &'static str,
        field: &'static str,
    },
    #[error("{frame}: field `b64` is not valid base64: {reason}")]
    BadBase64 { frame: &'static str, reason: String },
    #[error("malformed JSON: {0}")]
    BadJson(String),
}

impl CodecError {
    pub(crate) fn out_of_range(
        frame: FrameType,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        CodecError::OutOfRange {
            frame: frame.as_str(),
            field,
            reason: reason.into(),
        }
    }
}

/// A DATA payload of `len` bytes fits a frame in either codec.
pub(crate) fn check_payload(t: FrameType, len: usize, limits: &Limits) -> Result<(), CodecError> {
    if len > limits.max_payload() {
        return Err(CodecError::out_of_range(
            t,
            "b64",
            format!("{len} bytes, at most {}", limits.max_payload()),
        ));
    }
    Ok(())
}

/// Checks shared by both codecs on the decoded values, so that v1 and v2
/// accept exactly the same set of frames.
pub(crate) fn validate(frame: &Frame, limits: &Limits) -> Result<(), CodecError> {
    let t = frame.frame_type();
    let name = |field: &'static str, v: &str| -> Result<(), CodecError> {
        if v.is_empty() {
            return Err(CodecError::out_of_range(t, field, "must not be empty"));
        }
        if v.len() > limits.max_name {
            return Err(CodecError::out_of_range(
                t,
                field,
                format!("{} bytes, at most {}", v.len(), limits.max_name),
            ));
        }
        Ok(())
    };
    let reason = |v: &str| -> Result<(), CodecError> {
        if v.len() > limits.max_reason {
            return Err(CodecError::out_of_range(
                t,
                "reason",
                format!("{} bytes, at most {}", v.len(), limits.max_reason),
            ));
        }
        Ok(())
    };
    let payload = |p: &Bytes| check_payload(t, p.len(), limits);
    match frame {
        Frame::Hello {
            agent_id,
            connectors,
            codecs,
            slot,
            slots,
            ..
        } => {
            name("agent_id", agent_id)?;
            if *slots == 0 || *slots > crate::frame::MAX_SLOTS {
                return Err(CodecError::out_of_range(
                    t,
                    "slots",
                    format!("{slots}, between 1 and {}", crate::frame::MAX_SLOTS),
                ));
            }
            if slot >= slots {
                return Err(CodecError::out_of_range(
                    t,
                    "slot",
                    format!("{slot}, below slots ({slots})"),
                ));
            }
            if connectors.len() > limits.max_connectors {
                return Err(CodecError::out_of_range(
                    t,
                    "connectors",
                    format!(
                        "{} entries, at most {}",
                        connectors.len(),
                        limits.max_connectors
                    ),
                ));
            }
            for c in connectors {
                name("connectors", c)?;
            }
            if codecs.len() > 8 {
                return Err(CodecError::out_of_range(t, "codecs", "at most 8 entries"));
            }
            for c in codecs {
                name("codecs", c)?;
            }
        }
        Frame::Welcome {
            codec, replica_id, ..
        } => {
            name("codec", codec)?;
            if !replica_id.is_empty() {
                name("replica_id", replica_id)?;
            }
        }
        Frame::Reauth { token } => {
            if token.is_empty() {
                return Err(CodecError::out_of_range(t, "token", "must not be empty"));
            }
            if token.len() > limits.max_token {
                return Err(CodecError::out_of_range(
                    t,
                    "token",
                    format!("{} bytes, at most {}", token.len(), limits.max_token),
                ));
            }
        }
        Frame::Open { connector, .. } => name("connector", connector)?,
        Frame::Data { payload: p, .. } => payload(p)?,
        Frame::Rst { reason: r, .. } => reason(r)?,
        Frame::MHello { replica_id, .. } => name("replica_id", replica_id)?,
        Frame::MOpen { h }
        | Frame::MOpenAck { h, .. }
        | Frame::MData { h, .. }
        | Frame::MFin { h }
        | Frame::MRst { h, .. }
        | Frame::MCredit { h, .. } => {
            name("connector", &h.connector)?;
            name("agent_id", &h.agent_id)?;
            match frame {
                Frame::MOpenAck { reason: r, .. } | Frame::MRst { reason: r, .. } => reason(r)?,
                Frame::MData { payload: p, .. } => payload(p)?,
                _ => {}
            }
        }
        Frame::Fin { .. }
        | Frame::Credit { .. }
        | Frame::Ping { .. }
        | Frame::Pong { .. }
        | Frame::Drain
        | Frame::MPing { .. }
        | Frame::MPong { .. } => {}
    }
    Ok(())
}
