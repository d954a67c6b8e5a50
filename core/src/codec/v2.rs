//! v2: the compact binary encoding, one frame per binary WebSocket message.
//!
//! Layout: a one-byte type tag, then the frame's fields in declaration order.
//! Integers are little-endian fixed width (`u64`, `u32`, `u8`); strings are a
//! `u16` byte length then UTF-8; a list is a `u16` count then its items; the
//! DATA / M_DATA payload is the rest of the message (no length, no copy on
//! decode). A mesh header is `cid u64, seq u64, epoch u64, connector str,
//! agent_id str`. `docs/protocol.md` has the table per frame.

use bytes::{BufMut, Bytes, BytesMut};

use super::{CodecError, check_payload, validate};
use crate::frame::{Cid, Epoch, ErrorCode, Frame, FrameType, Limits, MeshHeader};
use crate::payload::Payload;

/// Bytes in front of a DATA payload: tag, cid, seq.
pub const DATA_HEADER_LEN: usize = 1 + 8 + 8;

pub fn encode(frame: &Frame, limits: &Limits) -> Result<Bytes, CodecError> {
    let mut buf = BytesMut::with_capacity(encoded_len_hint(frame));
    encode_into(frame, limits, &mut buf)?;
    Ok(buf.freeze())
}

/// Encode a DATA or M_DATA frame whose payload is given apart: `head` is
/// the frame with an empty payload. The header is written into the room in
/// front of `payload` when it has enough ([`Payload::prepend`]), so a
/// payload read with room is not copied.
pub fn encode_data(head: &Frame, payload: Payload, limits: &Limits) -> Result<Bytes, CodecError> {
    debug_assert!(matches!(
        head,
        Frame::Data { payload, .. } | Frame::MData { payload, .. } if payload.is_empty()
    ));
    check_payload(head.frame_type(), payload.len(), limits)?;
    let mut header = BytesMut::with_capacity(64);
    encode_into(head, limits, &mut header)?;
    let len = header.len() + payload.len();
    if len > limits.max_frame {
        return Err(CodecError::TooLarge {
            len,
            max: limits.max_frame,
        });
    }
    Ok(payload.prepend(&header))
}

fn encoded_len_hint(frame: &Frame) -> usize {
    match frame {
        Frame::Data { payload, .. } => DATA_HEADER_LEN + payload.len(),
        Frame::MData { h, payload } => 32 + h.connector.len() + h.agent_id.len() + payload.len(),
        _ => 64,
    }
}

/// Append the encoding of `frame` to `buf`. Refuses frames that the decoder
/// would refuse, so that nothing we send can be rejected by a conforming peer.
pub fn encode_into(frame: &Frame, limits: &Limits, buf: &mut BytesMut) -> Result<(), CodecError> {
    validate(frame, limits)?;
    let start = buf.len();
    buf.put_u8(frame.frame_type().tag());
    match frame {
        Frame::Hello {
            agent_id,
            connectors,
            codecs,
            window,
            slot,
            slots,
        } => {
            put_str(buf, agent_id);
            put_list(buf, connectors);
            put_list(buf, codecs);
            buf.put_u32_le(*window);
            buf.put_u8(*slot);
            buf.put_u8(*slots);
        }
        Frame::Welcome {
            epoch,
            codec,
            window,
            max_frame,
            replica_id,
        } => {
            buf.put_u64_le(epoch.0);
            put_str(buf, codec);
            buf.put_u32_le(*window);
            buf.put_u32_le(*max_frame);
            put_str(buf, replica_id);
        }
        Frame::Open { cid, connector } => {
            buf.put_u64_le(cid.0);
            put_str(buf, connector);
        }
        Frame::Data { cid, seq, payload } => {
            buf.put_u64_le(cid.0);
            buf.put_u64_le(*seq);
            buf.extend_from_slice(payload);
        }
        Frame::Fin { cid, seq } => {
            buf.put_u64_le(cid.0);
            match seq {
                Some(s) => {
                    buf.put_u8(1);
                    buf.put_u64_le(*s);
                }
                None => buf.put_u8(0),
            }
        }
        Frame::Rst { cid, code, reason } => {
            buf.put_u64_le(cid.0);
            buf.put_u8(*code as u8);
            put_str(buf, reason);
        }
        Frame::Credit { cid, bytes } => {
            buf.put_u64_le(cid.0);
            buf.put_u32_le(*bytes);
        }
        Frame::Ping { nonce }
        | Frame::Pong { nonce }
        | Frame::MPing { nonce }
        | Frame::MPong { nonce } => buf.put_u64_le(*nonce),
        Frame::Drain => {}
        Frame::Reauth { token } => put_str(buf, token),
        Frame::MHello { replica_id, window } => {
            put_str(buf, replica_id);
            buf.put_u32_le(*window);
        }
        Frame::MOpen { h } | Frame::MFin { h } => put_header(buf, h),
        Frame::MOpenAck {
            h,
            ok,
            code,
            reason,
        } => {
            put_header(buf, h);
            buf.put_u8(u8::from(*ok));
            buf.put_u8(*code as u8);
            put_str(buf, reason);
        }
        Frame::MData { h, payload } => {
            put_header(buf, h);
            buf.extend_from_slice(payload);
        }
        Frame::MRst { h, code, reason } => {
            put_header(buf, h);
            buf.put_u8(*code as u8);
            put_str(buf, reason);
        }
        Frame::MCredit { h, bytes } => {
            put_header(buf, h);
            buf.put_u32_le(*bytes);
        }
    }
    let len = buf.len() - start;
    if len > limits.max_frame {
        buf.truncate(start);
        return Err(CodecError::TooLarge {
            len,
            max: limits.max_frame,
        });
    }
    Ok(())
}

fn put_str(buf: &mut BytesMut, s: &str) {
    // validate() bounded every string well below u16::MAX.
    buf.put_u16_le(s.len() as u16);
    buf.extend_from_slice(s.as_bytes());
}

fn put_list(buf: &mut BytesMut, items: &[String]) {
    buf.put_u16_le(items.len() as u16);
    for s in items {
        put_str(buf, s);
    }
}

fn put_header(buf: &mut BytesMut, h: &MeshHeader) {
    buf.put_u64_le(h.cid.0);
    buf.put_u64_le(h.seq);
    buf.put_u64_le(h.epoch.0);
    put_str(buf, &h.connector);
    put_str(buf, &h.agent_id);
}

/// Decode one binary message. The payload of DATA / M_DATA shares `msg`'s
/// buffer (no copy).
pub fn decode(msg: &Bytes, limits: &Limits) -> Result<Frame, CodecError> {
    if msg.len() > limits.max_frame {
        return Err(CodecError::TooLarge {
            len: msg.len(),
            max: limits.max_frame,
        });
    }
    let Some(&tag) = msg.first() else {
        return Err(CodecError::Empty);
    };
    let t = FrameType::from_tag(tag)
        .ok_or_else(|| CodecError::UnknownType(format!("tag 0x{tag:02x}")))?;
    let mut r = Reader {
        msg,
        pos: 1,
        frame: t,
        limits,
    };
    let frame = match t {
        FrameType::Hello => Frame::Hello {
            agent_id: r.string("agent_id")?,
            connectors: r.list("connectors", limits.max_connectors)?,
            codecs: r.list("codecs", 8)?,
            window: r.u32("window")?,
            slot: r.u8("slot")?,
            slots: r.u8("slots")?,
        },
        FrameType::Welcome => Frame::Welcome {
            epoch: Epoch(r.u64("epoch")?),
            codec: r.string("codec")?,
            window: r.u32("window")?,
            max_frame: r.u32("max_frame")?,
            replica_id: r.string_allow_empty("replica_id")?,
        },
        FrameType::Open => Frame::Open {
            cid: r.cid()?,
            connector: r.string("connector")?,
        },
        FrameType::Data => Frame::Data {
            cid: r.cid()?,
            seq: r.u64("seq")?,
            payload: r.rest(),
        },
        FrameType::Fin => {
            let cid = r.cid()?;
            let seq = match r.u8("has_seq")? {
                0 => None,
                1 => Some(r.u64("seq")?),
                v => {
                    return Err(CodecError::out_of_range(
                        t,
                        "has_seq",
                        format!("{v} is not 0 or 1"),
                    ));
                }
            };
            Frame::Fin { cid, seq }
        }
        FrameType::Rst => Frame::Rst {
            cid: r.cid()?,
            code: r.code()?,
            reason: r.string_allow_empty("reason")?,
        },
        FrameType::Credit => Frame::Credit {
            cid: r.cid()?,
            bytes: r.u32("bytes")?,
        },
        FrameType::Ping => Frame::Ping {
            nonce: r.u64("nonce")?,
        },
        FrameType::Pong => Frame::Pong {
            nonce: r.u64("nonce")?,
        },
        FrameType::Drain => Frame::Drain,
        FrameType::Reauth => Frame::Reauth {
            token: r.string("token")?,
        },
        FrameType::MPing => Frame::MPing {
            nonce: r.u64("nonce")?,
        },
        FrameType::MPong => Frame::MPong {
            nonce: r.u64("nonce")?,
        },
        FrameType::MHello => Frame::MHello {
            replica_id: r.string("replica_id")?,
            window: r.u32("window")?,
        },
        FrameType::MOpen => Frame::MOpen { h: r.header()? },
        FrameType::MFin => Frame::MFin { h: r.header()? },
        FrameType::MOpenAck => {
            let h = r.header()?;
            let ok = match r.u8("ok")? {
                0 => false,
                1 => true,
                v => {
                    return Err(CodecError::out_of_range(
                        t,
                        "ok",
                        format!("{v} is not 0 or 1"),
                    ));
                }
            };
            Frame::MOpenAck {
                h,
                ok,
                code: r.code()?,
                reason: r.string_allow_empty("reason")?,
            }
        }
        FrameType::MData => Frame::MData {
            h: r.header()?,
            payload: r.rest(),
        },
        FrameType::MRst => Frame::MRst {
            h: r.header()?,
            code: r.code()?,
            reason: r.string_allow_empty("reason")?,
        },
        FrameType::MCredit => Frame::MCredit {
            h: r.header()?,
            bytes: r.u32("bytes")?,
        },
    };
    r.finish()?;
    validate(&frame, limits)?;
    Ok(frame)
}

struct Reader<'a> {
    msg: &'a Bytes,
    pos: usize,
    frame: FrameType,
    limits: &'a Limits,
}

impl Reader<'_> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&[u8], CodecError> {
        let have = self.msg.len() - self.pos;
        if have < n {
            return Err(CodecError::Truncated {
                frame: self.frame.as_str(),
                field,
                need: n,
                have,
            });
        }
        let s = &self.msg[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(field, 1)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, CodecError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, CodecError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, CodecError> {
        let b = self.take(field, 8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn cid(&mut self) -> Result<Cid, CodecError> {
        self.u64("cid").map(Cid)
    }

    fn code(&mut self) -> Result<ErrorCode, CodecError> {
        let v = self.u8("code")?;
        ErrorCode::from_u8(v).ok_or_else(|| {
            CodecError::out_of_range(self.frame, "code", format!("unknown error code {v}"))
        })
    }

    fn string_allow_empty(&mut self, field: &'static str) -> Result<String, CodecError> {
        let len = self.u16(field)? as usize;
        // Check against the limit before allocating.
        let max = if field == "reason" {
            self.limits.max_reason
        } else if field == "token" {
            self.limits.max_token
        } else {
            self.limits.max_name
        };
        if len > max {
            return Err(CodecError::out_of_range(
                self.frame,
                field,
                format!("{len} bytes, at most {max}"),
            ));
        }
        let frame = self.frame.as_str();
        let b = self.take(field, len)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| CodecError::BadUtf8 { frame, field })
    }

    fn string(&mut self, field: &'static str) -> Result<String, CodecError> {
        self.string_allow_empty(field)
    }

    fn list(&mut self, field: &'static str, max: usize) -> Result<Vec<String>, CodecError> {
        let n = self.u16(field)? as usize;
        if n > max {
            return Err(CodecError::out_of_range(
                self.frame,
                field,
                format!("{n} entries, at most {max}"),
            ));
        }
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(self.string(field)?);
        }
        Ok(v)
    }

    fn header(&mut self) -> Result<MeshHeader, CodecError> {
        Ok(MeshHeader {
            cid: self.cid()?,
            seq: self.u64("seq")?,
            epoch: Epoch(self.u64("epoch")?),
            connector: self.string("connector")?,
            agent_id: self.string("agent_id")?,
        })
    }

    fn rest(&mut self) -> Bytes {
        let b = self.msg.slice(self.pos..);
        self.pos = self.msg.len();
        b
    }

    fn finish(&self) -> Result<(), CodecError> {
        let extra = self.msg.len() - self.pos;
        if extra > 0 {
            return Err(CodecError::TrailingBytes {
                frame: self.frame.as_str(),
                extra,
            });
        }
        Ok(())
    }
}
