//! Typed frames of the agent tunnel and the hub mesh.
//!
//! A frame is one WebSocket message. The codecs in [`crate::codec`] turn frames
//! into bytes and back; everything above them speaks only in these types.

use bytes::Bytes;

/// Flow (connection) id, unique per link for the life of the link.
///
/// On the wire it is a plain `u64` (a JSON number in v1, eight little-endian
/// bytes in v2), and it prints as that number.
///
/// The opener of flows picks their cids counting up: a tunnel's hub from 1
/// ([`Cid::next`]), a mesh link's dialer the odd ones and its acceptor the
/// even ones ([`Cid::first_on_mesh`], [`Cid::next_on_mesh`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cid(pub u64);

impl Cid {
    /// The least and the greatest cid, to bound a range of keys.
    pub const MIN: Cid = Cid(u64::MIN);
    pub const MAX: Cid = Cid(u64::MAX);

    /// The cid a tunnel's hub opens after this one.
    pub const fn next(self) -> Cid {
        Cid(self.0 + 1)
    }

    /// The first cid one side of a mesh link opens: 1 for the dialer, 2 for
    /// the acceptor.
    pub const fn first_on_mesh(dialer: bool) -> Cid {
        if dialer { Cid(1) } else { Cid(2) }
    }

    /// The cid the same side of a mesh link opens after this one.
    pub const fn next_on_mesh(self) -> Cid {
        Cid(self.0 + 2)
    }

    /// Whether this cid is one a mesh link's dialer opens (odd) rather than
    /// one its acceptor opens (even).
    pub const fn opened_by_mesh_dialer(self) -> bool {
        self.0 % 2 == 1
    }
}

impl std::fmt::Display for Cid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// At most this many simultaneous tunnels (slots) per agent.
pub const MAX_SLOTS: u8 = 4;

/// Per-direction sequence number of a DATA frame within a flow, starting at 0.
pub type Seq = u64;

/// Ownership epoch of an agent's tunnel: grows strictly with every claim.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

/// Why a flow or link was reset. Carried on RST / M_RST / M_OPEN_ACK.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// No error: an orderly abort requested by an endpoint.
    Normal = 0,
    /// The peer broke the protocol (bad frame, unexpected frame, unknown flow).
    ProtocolError = 1,
    /// The agent could not connect to the target.
    TargetUnreachable = 2,
    /// The agent's connect to the target timed out.
    ConnectTimeout = 3,
    /// No agent serves the connector.
    NoAgent = 4,
    /// A frame or open carried an epoch that is no longer current.
    StaleEpoch = 5,
    /// The sender exceeded the receiver's advertised window.
    CreditOverrun = 6,
    /// A DATA frame skipped a sequence number, or FIN announced frames never seen.
    SequenceGap = 7,
    /// A frame exceeded the negotiated maximum size.
    FrameTooLarge = 8,
    /// The endpoint is shutting down.
    Shutdown = 9,
    /// The link that carried the flow was lost.
    LinkLost = 10,
    /// The registry (control plane) is unavailable.
    RegistryUnavailable = 11,
    /// No mesh link to the owner hub is established.
    MeshUnavailable = 12,
    /// Refused by policy (scope, limits, mode).
    Refused = 13,
    /// Internal error of the endpoint.
    Internal = 14,
    /// The flow or link was idle for too long.
    IdleTimeout = 15,
    /// A configured limit was reached (flows, queue, inflight bytes).
    LimitExceeded = 16,
    /// The client or target side of the flow reset its TCP connection.
    ConnectionReset = 17,
    /// The connector named is not served by this agent.
    UnknownConnector = 18,
}

impl ErrorCode {
    /// The WebSocket close code a link closed for this reason carries
    /// (RFC 6455 §7.4.1): a normal end, going away, a protocol error, a
    /// message too big, an internal error, or a policy refusal for the rest.
    pub fn ws_close_code(self) -> u16 {
        match self {
            ErrorCode::Normal | ErrorCode::LinkLost | ErrorCode::IdleTimeout => 1000,
            ErrorCode::Shutdown => 1001,
            ErrorCode::ProtocolError | ErrorCode::SequenceGap | ErrorCode::CreditOverrun => 1002,
            ErrorCode::FrameTooLarge => 1009,
            ErrorCode::Internal => 1011,
            _ => 1008,
        }
    }

    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::Normal,
        ErrorCode::ProtocolError,
        ErrorCode::TargetUnreachable,
        ErrorCode::ConnectTimeout,
        ErrorCode::NoAgent,
        ErrorCode::StaleEpoch,
        ErrorCode::CreditOverrun,
        ErrorCode::SequenceGap,
        ErrorCode::FrameTooLarge,
        ErrorCode::Shutdown,
        ErrorCode::LinkLost,
        ErrorCode::RegistryUnavailable,
        ErrorCode::MeshUnavailable,
        ErrorCode::Refused,
        ErrorCode::Internal,
        ErrorCode::IdleTimeout,
        ErrorCode::LimitExceeded,
        ErrorCode::ConnectionReset,
        ErrorCode::UnknownConnector,
    ];

    /// The stable wire name (v1) and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Normal => "normal",
            ErrorCode::ProtocolError => "protocol_error",
            ErrorCode::TargetUnreachable => "target_unreachable",
            ErrorCode::ConnectTimeout => "connect_timeout",
            ErrorCode::NoAgent => "no_agent",
            ErrorCode::StaleEpoch => "stale_epoch",
            ErrorCode::CreditOverrun => "credit_overrun",
            ErrorCode::SequenceGap => "sequence_gap",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::Shutdown => "shutdown",
            ErrorCode::LinkLost => "link_lost",
            ErrorCode::RegistryUnavailable => "registry_unavailable",
            ErrorCode::MeshUnavailable => "mesh_unavailable",
            ErrorCode::Refused => "refused",
            ErrorCode::Internal => "internal",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::ConnectionReset => "connection_reset",
            ErrorCode::UnknownConnector => "unknown_connector",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|c| c.as_str() == s)
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(v as usize).copied()
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Header carried by every mesh flow frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshHeader {
    pub cid: Cid,
    pub connector: String,
    pub agent_id: String,
    pub seq: Seq,
    pub epoch: Epoch,
}

/// Every frame of the tunnel (agent ↔ hub) and of the mesh (hub ↔ hub).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Agent → hub, first frame: who the agent is and what it serves.
    /// `codecs` lists the encodings the agent can send and receive, best first;
    /// an agent that sends none speaks v1 only. `window` is the agent's
    /// per-flow receive window in bytes (0: the protocol default).
    Hello {
        agent_id: String,
        connectors: Vec<String>,
        codecs: Vec<String>,
        window: u32,
        /// Multi-homed agents: which of the agent's `slots` simultaneous
        /// tunnels this is (each slot is claimed and fenced on its own, so
        /// the agent can hold one tunnel on each of several hubs). An agent
        /// that says nothing has one slot, slot 0.
        slot: u8,
        slots: u8,
    },
    /// Hub → agent: the tunnel is accepted under `epoch`; both sides use `codec`
    /// from the next frame on; `window` is the hub's per-flow receive window.
    /// `replica_id` names the hub that answered (empty from hubs that do not
    /// say), so an agent behind one load-balanced URL can tell its tunnels'
    /// hubs apart.
    Welcome {
        epoch: Epoch,
        codec: String,
        window: u32,
        max_frame: u32,
        replica_id: String,
    },
    /// Hub → agent: a client connected to `connector`; open a flow to its target.
    Open {
        cid: Cid,
        connector: String,
    },
    /// Bytes of a flow, in order.
    Data {
        cid: Cid,
        seq: Seq,
        payload: Bytes,
    },
    /// The sender will send no more DATA on this flow. `seq`, when present,
    /// is the number of DATA frames sent, so a missing tail is detected.
    Fin {
        cid: Cid,
        seq: Option<Seq>,
    },
    /// Abort a flow with a reason.
    Rst {
        cid: Cid,
        code: ErrorCode,
        reason: String,
    },
    /// Grant the peer `bytes` more of send window on a flow.
    Credit {
        cid: Cid,
        bytes: u32,
    },
    /// Keepalive and RTT probe; answered with PONG carrying the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// Hub → agent: this hub is shutting down. Open a tunnel to another hub
    /// now and keep this one only for the flows it carries; the hub still
    /// opens flows on it until the agent is owned elsewhere.
    Drain,
    /// Agent → hub (v2): a fresh token for this tunnel, sent before the
    /// current one expires. The hub verifies it like the token of the
    /// upgrade (same agent and tenant, a scope covering what the HELLO
    /// announced) and moves the tunnel's expiry to its `exp`; a token it
    /// refuses closes the tunnel. Flows are not touched.
    Reauth {
        token: String,
    },

    /// Mesh, both directions, first frame: the sender's replica id and its
    /// per-flow receive window.
    MHello {
        replica_id: String,
        window: u32,
    },
    /// Origin hub → owner hub: open a flow to `agent_id` under `epoch`.
    MOpen {
        h: MeshHeader,
    },
    /// Owner → origin: whether the open was accepted.
    MOpenAck {
        h: MeshHeader,
        ok: bool,
        code: ErrorCode,
        reason: String,
    },
    MData {
        h: MeshHeader,
        payload: Bytes,
    },
    MFin {
        h: MeshHeader,
    },
    MRst {
        h: MeshHeader,
        code: ErrorCode,
        reason: String,
    },
    MCredit {
        h: MeshHeader,
        bytes: u32,
    },
    MPing {
        nonce: u64,
    },
    MPong {
        nonce: u64,
    },
}

/// The frame kinds, for metrics labels and error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FrameType {
    Hello,
    Welcome,
    Open,
    Data,
    Fin,
    Rst,
    Credit,
    Ping,
    Pong,
    Drain,
    Reauth,
    MHello,
    MOpen,
    MOpenAck,
    MData,
    MFin,
    MRst,
    MCredit,
    MPing,
    MPong,
}

impl FrameType {
    pub const ALL: [FrameType; 20] = [
        FrameType::Hello,
        FrameType::Welcome,
        FrameType::Open,
        FrameType::Data,
        FrameType::Fin,
        FrameType::Rst,
        FrameType::Credit,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Drain,
        FrameType::Reauth,
        FrameType::MHello,
        FrameType::MOpen,
        FrameType::MOpenAck,
        FrameType::MData,
        FrameType::MFin,
        FrameType::MRst,
        FrameType::MCredit,
        FrameType::MPing,
        FrameType::MPong,
    ];

    /// The wire name used by v1 (`"type"` field) and as the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameType::Hello => "HELLO",
            FrameType::Welcome => "WELCOME",
            FrameType::Open => "OPEN",
            FrameType::Data => "DATA",
            FrameType::Fin => "FIN",
            FrameType::Rst => "RST",
            FrameType::Credit => "CREDIT",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Drain => "DRAIN",
            FrameType::Reauth => "REAUTH",
            FrameType::MHello => "M_HELLO",
            FrameType::MOpen => "M_OPEN",
            FrameType::MOpenAck => "M_OPEN_ACK",
            FrameType::MData => "M_DATA",
            FrameType::MFin => "M_FIN",
            FrameType::MRst => "M_RST",
            FrameType::MCredit => "M_CREDIT",
            FrameType::MPing => "M_PING",
            FrameType::MPong => "M_PONG",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.as_str() == s)
    }

    /// The v2 type tag.
    pub fn tag(self) -> u8 {
        match self {
            FrameType::Hello => 0x01,
            FrameType::Welcome => 0x02,
            FrameType::Open => 0x03,
            FrameType::Data => 0x04,
            FrameType::Fin => 0x05,
            FrameType::Rst => 0x06,
            FrameType::Credit => 0x07,
            FrameType::Ping => 0x08,
            FrameType::Pong => 0x09,
            FrameType::Drain => 0x0a,
            FrameType::Reauth => 0x0b,
            FrameType::MHello => 0x10,
            FrameType::MOpen => 0x11,
            FrameType::MOpenAck => 0x12,
            FrameType::MData => 0x13,
            FrameType::MFin => 0x14,
            FrameType::MRst => 0x15,
            FrameType::MCredit => 0x16,
            FrameType::MPing => 0x17,
            FrameType::MPong => 0x18,
        }
    }

    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.tag() == tag)
    }

    /// Mesh frames are the ones whose v1 name starts with `M_`.
    pub fn is_mesh(self) -> bool {
        self.tag() >= 0x10
    }
}

impl Frame {
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Hello { .. } => FrameType::Hello,
            Frame::Welcome { .. } => FrameType::Welcome,
            Frame::Open { .. } => FrameType::Open,
            Frame::Data { .. } => FrameType::Data,
            Frame::Fin { .. } => FrameType::Fin,
            Frame::Rst { .. } => FrameType::Rst,
            Frame::Credit { .. } => FrameType::Credit,
            Frame::Ping { .. } => FrameType::Ping,
            Frame::Pong { .. } => FrameType::Pong,
            Frame::Drain => FrameType::Drain,
            Frame::Reauth { .. } => FrameType::Reauth,
            Frame::MHello { .. } => FrameType::MHello,
            Frame::MOpen { .. } => FrameType::MOpen,
            Frame::MOpenAck { .. } => FrameType::MOpenAck,
            Frame::MData { .. } => FrameType::MData,
            Frame::MFin { .. } => FrameType::MFin,
            Frame::MRst { .. } => FrameType::MRst,
            Frame::MCredit { .. } => FrameType::MCredit,
            Frame::MPing { .. } => FrameType::MPing,
            Frame::MPong { .. } => FrameType::MPong,
        }
    }

    /// Data frames yield to control frames in send queues.
    pub fn is_data(&self) -> bool {
        matches!(self, Frame::Data { .. } | Frame::MData { .. })
    }
}

/// Limits every decoder and state machine enforces. All are configurable;
/// the defaults are documented in `docs/protocol.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest WebSocket message accepted or produced, in bytes.
    pub max_frame: usize,
    /// Longest agent id, replica id, connector name or codec name.
    pub max_name: usize,
    /// Most connectors one HELLO may announce.
    pub max_connectors: usize,
    /// Longest RST reason; longer reasons are truncated when sent, refused when received.
    pub max_reason: usize,
    /// Longest token in a REAUTH frame.
    pub max_token: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame: 1024 * 1024,
            max_name: 255,
            max_connectors: 64,
            max_reason: 1024,
            max_token: 16 * 1024,
        }
    }
}

impl Limits {
    /// The largest DATA payload that fits a frame of `max_frame` bytes in
    /// either codec (v1 base64 inflates by 4/3, plus the JSON envelope, and the
    /// mesh header carries two names).
    pub fn max_payload(&self) -> usize {
        let envelope = 128 + 2 * self.max_name;
        (self.max_frame.saturating_sub(envelope) / 4) * 3
    }
}

/// Cut a reason to the limit on a character boundary.
pub fn truncate_reason(reason: &str, limits: &Limits) -> String {
    if reason.len() <= limits.max_reason {
        return reason.to_string();
    }
    let mut end = limits.max_reason;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

/// A close frame's reason cut to the 123 bytes RFC 6455 allows (at a
/// character boundary).
pub fn ws_close_reason(reason: &str) -> &str {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}
