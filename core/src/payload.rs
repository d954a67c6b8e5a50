//! Outgoing DATA payloads that can carry room for their frame's header.
//!
//! A v2 DATA (or M_DATA) message is the frame's header followed by the
//! payload, in one buffer. A runtime that reads a flow socket into a buffer
//! with [`HEADROOM`] bytes free in front of what it read hands that buffer
//! over as [`Payload::with_room`]; the header is then written into that
//! room when the frame is encoded ([`Payload::prepend`]), and the payload is
//! never copied on its way to the WebSocket. A payload without room (one
//! decoded from a peer's frame, or the tail of a split) is copied once
//! behind its header, as every payload was before.

use std::fmt;

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Room a runtime leaves in front of what it reads from a flow socket.
/// Enough for a DATA header (17 bytes) and for an M_DATA header whose
/// connector and agent id together take up to 99 bytes; longer names make
/// the mesh copy the payload, as it did before payloads had room.
pub const HEADROOM: usize = 128;

/// The bytes of one DATA payload on their way out.
#[derive(Clone)]
pub struct Payload(Repr);

#[derive(Clone)]
enum Repr {
    Shared(Bytes),
    /// `buf[start..]` is the payload; `buf[..start]` is free room.
    Room {
        buf: BytesMut,
        start: usize,
    },
}

impl Payload {
    /// `buf[start..]` is the payload and the `start` bytes before it may be
    /// overwritten by a frame header. A `start` beyond the buffer leaves no
    /// payload and no room.
    pub fn with_room(buf: BytesMut, start: usize) -> Payload {
        if start > buf.len() {
            return Payload(Repr::Shared(Bytes::new()));
        }
        Payload(Repr::Room { buf, start })
    }

    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_slice(&self) -> &[u8] {
        match &self.0 {
            Repr::Shared(b) => b,
            Repr::Room { buf, start } => &buf[*start..],
        }
    }

    /// Bytes free in front of the payload.
    pub fn room(&self) -> usize {
        match &self.0 {
            Repr::Shared(_) => 0,
            Repr::Room { start, .. } => *start,
        }
    }

    /// Split off and return the first `at` bytes (at most all of them). The
    /// front keeps the room; the rest has none.
    pub fn split_to(&mut self, at: usize) -> Payload {
        let at = at.min(self.len());
        match &mut self.0 {
            Repr::Shared(b) => Payload(Repr::Shared(b.split_to(at))),
            Repr::Room { buf, start } => {
                let front = buf.split_to(*start + at);
                let start = std::mem::replace(start, 0);
                Payload(Repr::Room { buf: front, start })
            }
        }
    }

    /// The payload alone.
    pub fn into_bytes(self) -> Bytes {
        match self.0 {
            Repr::Shared(b) => b,
            Repr::Room { mut buf, start } => {
                buf.advance(start);
                buf.freeze()
            }
        }
    }

    /// `header` followed by the payload, in one buffer: written into the
    /// room in front of the payload when it is large enough (no copy of
    /// the payload), else copied into a new buffer.
    pub fn prepend(self, header: &[u8]) -> Bytes {
        match self.0 {
            Repr::Room { mut buf, start } if start >= header.len() => {
                let at = start - header.len();
                buf[at..start].copy_from_slice(header);
                buf.advance(at);
                buf.freeze()
            }
            repr => {
                let payload = Payload(repr);
                let mut out = BytesMut::with_capacity(header.len() + payload.len());
                out.put_slice(header);
                out.put_slice(payload.as_slice());
                out.freeze()
            }
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload(Repr::Shared(Bytes::new()))
    }
}

impl From<Bytes> for Payload {
    fn from(b: Bytes) -> Self {
        Payload(Repr::Shared(b))
    }
}

impl From<Vec<u8>> for Payload {
    fn from(v: Vec<u8>) -> Self {
        Payload(Repr::Shared(Bytes::from(v)))
    }
}

impl From<&'static [u8]> for Payload {
    fn from(s: &'static [u8]) -> Self {
        Payload(Repr::Shared(Bytes::from_static(s)))
    }
}

impl std::ops::Deref for Payload {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Payload({} bytes, {} free in front)",
            self.len(),
            self.room()
        )
    }
}
