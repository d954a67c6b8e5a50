//! When a hub client's flow has timed out: the client sent nothing within
//! its first-byte limit after connecting, or no byte moved either way for
//! the idle limit. Pure: the runtime measures the times (it owns the socket
//! and the clock) and asks [`ClientTimeouts::check`] what follows.

use std::time::Duration;

use crate::frame::ErrorCode;

/// The timeouts of a hub client's flow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientTimeouts {
    /// No byte in either direction for this long: reset (`idle_timeout`).
    pub idle: Option<Duration>,
    /// The client sent no byte (nor its end) this long after connecting:
    /// reset (`idle_timeout`, reason `first_byte_timeout`).
    pub first_byte: Option<Duration>,
}

/// Which timeout a flow ran into, with its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expired {
    Idle(Duration),
    FirstByte(Duration),
}

impl Expired {
    /// The metric label (`nowconnect_client_timeouts_total{kind}`).
    pub fn kind(&self) -> &'static str {
        match self {
            Expired::Idle(_) => "idle",
            Expired::FirstByte(_) => "first_byte",
        }
    }

    /// The flow is reset with this code.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::IdleTimeout
    }

    /// The reset's reason, naming the setting.
    pub fn reason(&self) -> String {
        match self {
            Expired::Idle(limit) => format!(
                "no bytes either way for {}s (limits.client_idle_timeout_sec)",
                limit.as_secs()
            ),
            Expired::FirstByte(limit) => format!(
                "the client sent no byte within {}s of connecting (listeners[].first_byte_timeout_sec)",
                limit.as_secs()
            ),
        }
    }
}

/// What a flow's watcher does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Reset the flow.
    Expired(Expired),
    /// Look again after this long (nothing can expire sooner).
    CheckIn(Duration),
    /// Nothing left to watch (the client spoke and there is no idle limit).
    Done,
}

impl ClientTimeouts {
    /// Whether any timeout applies at all (a flow without one needs no watcher).
    pub fn any(&self) -> bool {
        self.idle.is_some() || self.first_byte.is_some()
    }

    /// `age`: since the client connected; `idle`: since a byte last moved
    /// either way (or since connecting); `client_spoke`: the client sent a
    /// byte or its end. The first-byte limit is checked first.
    pub fn check(&self, age: Duration, idle: Duration, client_spoke: bool) -> Verdict {
        let mut wait: Option<Duration> = None;
        if let Some(limit) = self.first_byte.filter(|_| !client_spoke) {
            if age >= limit {
                return Verdict::Expired(Expired::FirstByte(limit));
            }
            wait = Some(limit - age);
        }
        if let Some(limit) = self.idle {
            if idle >= limit {
                return Verdict::Expired(Expired::Idle(limit));
            }
            wait = Some(wait.map_or(limit - idle, |w| w.min(limit - idle)));
        }
        match wait {
            Some(w) => Verdict::CheckIn(w),
            None => Verdict::Done,
        }
    }
}
