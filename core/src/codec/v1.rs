//! v1: JSON text messages with base64 payloads, one frame per text message.
//!
//! Field names follow the original NowConnect design: `{"type":"DATA","cid":7,
//! "seq":0,"b64":"..."}`. Mesh frames carry their header flat:
//! `{"type":"M_DATA","cid":7,"connector":"ldap","agent_id":"a1","seq":0,
//! "epoch":3,"b64":"..."}`. Unknown fields are ignored (forward compatible);
//! missing required fields, wrong types and out-of-range values are errors.

use std::borrow::Cow;
use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{CodecError, validate};
use crate::frame::{Cid, Epoch, ErrorCode, Frame, FrameType, Limits, MeshHeader};

#[derive(Serialize, Deserialize, Default)]
struct Raw<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    agent_id: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    replica_id: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    connectors: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    codecs: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    codec: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    cid: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    connector: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    epoch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    window: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    max_frame: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    nonce: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    code: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    reason: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    b64: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    slot: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    slots: Option<u64>,
}

pub fn encode(frame: &Frame, limits: &Limits) -> Result<String, CodecError> {
    validate(frame, limits)?;
    // DATA is the hot path: write it directly rather than through serde.
    let s = if let Frame::Data { cid, seq, payload } = frame {
        let mut s = String::with_capacity(48 + payload.len().div_ceil(3) * 4);
        let _ = write!(s, r#"{{"type":"DATA","cid":{cid},"seq":{seq},"b64":""#);
        B64.encode_string(payload, &mut s);
        s.push_str("\"}");
        s
    } else {
        serde_json::to_string(&to_raw(frame)).map_err(|e| CodecError::BadJson(e.to_string()))?
    };
    if s.len() > limits.max_frame {
        return Err(CodecError::TooLarge {
            len: s.len(),
            max: limits.max_frame,
        });
    }
    Ok(s)
}

fn to_raw(frame: &Frame) -> Raw<'_> {
    let mut r = Raw {
        ty: Cow::Borrowed(frame.frame_type().as_str()),
        ..Raw::default()
    };
    let header = |r: &mut Raw<'_>, h: &MeshHeader| {
        r.cid = Some(h.cid.0);
        r.seq = Some(h.seq);
        r.epoch = Some(h.epoch.0);
    };
    match frame {
        Frame::Hello {
            agent_id,
            connectors,
            codecs,
            window,
            slot,
            slots,
        } => {
            r.agent_id = Some(Cow::Borrowed(agent_id));
            r.connectors = Some(connectors.clone());
            r.codecs = Some(codecs.clone());
            r.window = Some(u64::from(*window));
            // A single-homed agent's HELLO stays what it always was.
            if *slots > 1 || *slot > 0 {
                r.slot = Some(u64::from(*slot));
                r.slots = Some(u64::from(*slots));
            }
        }
        Frame::Welcome {
            epoch,
            codec,
            window,
            max_frame,
            replica_id,
        } => {
            r.epoch = Some(epoch.0);
            r.codec = Some(Cow::Borrowed(codec));
            r.window = Some(u64::from(*window));
            r.max_frame = Some(u64::from(*max_frame));
            if !replica_id.is_empty() {
                r.replica_id = Some(Cow::Borrowed(replica_id));
            }
        }
        Frame::Open { cid, connector } => {
            r.cid = Some(cid.0);
            r.connector = Some(Cow::Borrowed(connector));
        }
        Frame::Data { cid, seq, payload } => {
            r.cid = Some(cid.0);
            r.seq = Some(*seq);
            r.b64 = Some(Cow::Owned(B64.encode(payload)));
        }
        Frame::Fin { cid, seq } => {
            r.cid = Some(cid.0);
            r.seq = *seq;
        }
        Frame::Rst { cid, code, reason } => {
            r.cid = Some(cid.0);
            r.code = Some(Cow::Borrowed(code.as_str()));
            r.reason = Some(Cow::Borrowed(reason));
        }
        Frame::Credit { cid, bytes } => {
            r.cid = Some(cid.0);
            r.bytes = Some(u64::from(*bytes));
        }
        Frame::Ping { nonce }
        | Frame::Pong { nonce }
        | Frame::MPing { nonce }
        | Frame::MPong { nonce } => r.nonce = Some(*nonce),
        Frame::Drain => {}
        Frame::Reauth { token } => r.token = Some(Cow::Borrowed(token)),
        Frame::MHello { replica_id, window } => {
            r.replica_id = Some(Cow::Borrowed(replica_id));
            r.window = Some(u64::from(*window));
        }
        Frame::MOpen { h } | Frame::MFin { h } => header(&mut r, h),
        Frame::MOpenAck {
            h,
            ok,
            code,
            reason,
        } => {
            header(&mut r, h);
            r.ok = Some(*ok);
            r.code = Some(Cow::Borrowed(code.as_str()));
            r.reason = Some(Cow::Borrowed(reason));
        }
        Frame::MData { h, payload } => {
            header(&mut r, h);
            r.b64 = Some(Cow::Owned(B64.encode(payload)));
        }
        Frame::MRst { h, code, reason } => {
            header(&mut r, h);
            r.code = Some(Cow::Borrowed(code.as_str()));
            r.reason = Some(Cow::Borrowed(reason));
        }
        Frame::MCredit { h, bytes } => {
            header(&mut r, h);
            r.bytes = Some(u64::from(*bytes));
        }
    }
    if let Frame::MOpen { h }
    | Frame::MOpenAck { h, .. }
    | Frame::MData { h, .. }
    | Frame::MFin { h }
    | Frame::MRst { h, .. }
    | Frame::MCredit { h, .. } = frame
    {
        r.connector = Some(Cow::Borrowed(&h.connector));
        r.agent_id = Some(Cow::Borrowed(&h.agent_id));
    }
    r
}

pub fn decode(msg: &str, limits: &Limits) -> Result<Frame, CodecError> {
    if msg.len() > limits.max_frame {
        return Err(CodecError::TooLarge {
            len: msg.len(),
            max: limits.max_frame,
        });
    }
    if msg.is_empty() {
        return Err(CodecError::Empty);
    }
    let raw: Raw<'_> = serde_json::from_str(msg).map_err(|e| CodecError::BadJson(e.to_string()))?;
    let t =
        FrameType::from_name(&raw.ty).ok_or_else(|| CodecError::UnknownType(truncate(&raw.ty)))?;
    let f = Fields { raw: &raw, t };
    let frame = match t {
        FrameType::Hello => Frame::Hello {
            agent_id: f.string("agent_id", &raw.agent_id)?,
            connectors: raw.connectors.clone().unwrap_or_default(),
            codecs: raw.codecs.clone().unwrap_or_default(),
            window: f.opt_u32("window", raw.window)?.unwrap_or(0),
            slot: f.opt_u8("slot", raw.slot)?.unwrap_or(0),
            slots: f.opt_u8("slots", raw.slots)?.unwrap_or(1),
        },
        FrameType::Welcome => Frame::Welcome {
            epoch: Epoch(f.u64("epoch", raw.epoch)?),
            codec: raw.codec.as_deref().unwrap_or("v1").to_string(),
            window: f.opt_u32("window", raw.window)?.unwrap_or(0),
            max_frame: f.opt_u32("max_frame", raw.max_frame)?.unwrap_or(0),
            replica_id: raw.replica_id.as_deref().unwrap_or("").to_string(),
        },
        FrameType::Open => Frame::Open {
            cid: f.cid()?,
            connector: f.string("connector", &raw.connector)?,
        },
        FrameType::Data => Frame::Data {
            cid: f.cid()?,
            seq: f.u64("seq", raw.seq)?,
            payload: f.payload(limits)?,
        },
        FrameType::Fin => Frame::Fin {
            cid: f.cid()?,
            seq: raw.seq,
        },
        FrameType::Rst => Frame::Rst {
            cid: f.cid()?,
            code: f.code()?,
            reason: raw.reason.as_deref().unwrap_or("").to_string(),
        },
        FrameType::Credit => Frame::Credit {
            cid: f.cid()?,
            bytes: f.u32("bytes", raw.bytes)?,
        },
        FrameType::Ping => Frame::Ping {
            nonce: f.u64("nonce", raw.nonce)?,
        },
        FrameType::Pong => Frame::Pong {
            nonce: f.u64("nonce", raw.nonce)?,
        },
        FrameType::Drain => Frame::Drain,
        FrameType::Reauth => Frame::Reauth {
            token: raw.token.as_deref().unwrap_or("").to_string(),
        },
        FrameType::MPing => Frame::MPing {
            nonce: f.u64("nonce", raw.nonce)?,
        },
        FrameType::MPong => Frame::MPong {
            nonce: f.u64("nonce", raw.nonce)?,
        },
        FrameType::MHello => Frame::MHello {
            replica_id: f.string("replica_id", &raw.replica_id)?,
            window: f.opt_u32("window", raw.window)?.unwrap_or(0),
        },
        FrameType::MOpen => Frame::MOpen { h: f.header()? },
        FrameType::MFin => Frame::MFin { h: f.header()? },
        FrameType::MOpenAck => Frame::MOpenAck {
            h: f.header()?,
            ok: raw.ok.ok_or(CodecError::MissingField {
                frame: t.as_str(),
                field: "ok",
            })?,
            code: f.code()?,
            reason: raw.reason.as_deref().unwrap_or("").to_string(),
        },
        FrameType::MData => Frame::MData {
            h: f.header()?,
            payload: f.payload(limits)?,
        },
        FrameType::MRst => Frame::MRst {
            h: f.header()?,
            code: f.code()?,
            reason: raw.reason.as_deref().unwrap_or("").to_string(),
        },
        FrameType::MCredit => Frame::MCredit {
            h: f.header()?,
            bytes: f.u32("bytes", raw.bytes)?,
        },
    };
    validate(&frame, limits)?;
    Ok(frame)
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

struct Fields<'r, 'a> {
    raw: &'r Raw<'a>,
    t: FrameType,
}

impl Fields<'_, '_> {
    fn missing(&self, field: &'static str) -> CodecError {
        CodecError::MissingField {
            frame: self.t.as_str(),
            field,
        }
    }

    fn u64(&self, field: &'static str, v: Option<u64>) -> Result<u64, CodecError> {
        v.ok_or_else(|| self.missing(field))
    }

    fn cid(&self) -> Result<Cid, CodecError> {
        self.u64("cid", self.raw.cid).map(Cid)
    }

    fn u32(&self, field: &'static str, v: Option<u64>) -> Result<u32, CodecError> {
        self.opt_u32(field, v)?.ok_or_else(|| self.missing(field))
    }

    fn opt_u32(&self, field: &'static str, v: Option<u64>) -> Result<Option<u32>, CodecError> {
        v.map(|v| {
            u32::try_from(v).map_err(|_| {
                CodecError::out_of_range(self.t, field, format!("{v} does not fit 32 bits"))
            })
        })
        .transpose()
    }

    fn opt_u8(&self, field: &'static str, v: Option<u64>) -> Result<Option<u8>, CodecError> {
        v.map(|v| {
            u8::try_from(v).map_err(|_| {
                CodecError::out_of_range(self.t, field, format!("{v} does not fit 8 bits"))
            })
        })
        .transpose()
    }

    fn string(&self, field: &'static str, v: &Option<Cow<'_, str>>) -> Result<String, CodecError> {
        v.as_deref()
            .map(str::to_owned)
            .ok_or_else(|| self.missing(field))
    }

    fn code(&self) -> Result<ErrorCode, CodecError> {
        match self.raw.code.as_deref() {
            None => Ok(ErrorCode::Normal),
            Some(c) => ErrorCode::from_name(c).ok_or_else(|| {
                CodecError::out_of_range(
                    self.t,
                    "code",
                    format!("unknown error code `{}`", truncate(c)),
                )
            }),
        }
    }

    fn header(&self) -> Result<MeshHeader, CodecError> {
        Ok(MeshHeader {
            cid: self.cid()?,
            connector: self.string("connector", &self.raw.connector)?,
            agent_id: self.string("agent_id", &self.raw.agent_id)?,
            seq: self.u64("seq", self.raw.seq)?,
            epoch: Epoch(self.u64("epoch", self.raw.epoch)?),
        })
    }

    fn payload(&self, limits: &Limits) -> Result<Bytes, CodecError> {
        let s = self.raw.b64.as_deref().ok_or_else(|| self.missing("b64"))?;
        // Check the decoded size before allocating for it.
        let max = limits.max_payload();
        if s.len() / 4 * 3 > max + 3 {
            return Err(CodecError::out_of_range(
                self.t,
                "b64",
                format!("payload of about {} bytes, at most {max}", s.len() / 4 * 3),
            ));
        }
        B64.decode(s)
            .map(Bytes::from)
            .map_err(|e| CodecError::BadBase64 {
                frame: self.t.as_str(),
                reason: e.to_string(),
            })
    }
}
