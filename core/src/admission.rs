//! Client admission at one listener: how many connections may be open at
//! once (in all and from one client) and how fast new ones may arrive (in
//! all and from one client). Sans-IO like the rest of core: every call takes
//! `now`; the runtime holds one [`Admission`] per listener and calls
//! [`Admission::release`] when an admitted connection ends.
//!
//! A client is its address, with IPv6 addresses taken by their `/64` (one
//! host usually holds a whole `/64`, so per-address limits would not bind)
//! and IPv4-mapped IPv6 addresses as the IPv4 address they carry.
//!
//! Rates are token buckets holding one second's worth of connections, so a
//! client may open `rate` connections at once and then `rate` a second.
//! The per-client buckets are bounded ([`MAX_TRACKED_CLIENTS`]): a bucket that
//! has refilled is forgotten when room is needed, and past the bound a new
//! client is held only to the listener's own rate (never refused for the
//! table being full, which would let one party with many addresses lock out
//! everyone else).
//!
//! Before that, a listener behind PROXY-protocol balancers decides at its
//! edge ([`ProxyEdge`]) whether a connection is read for a header at all:
//! only from a trusted proxy, and only while fewer connections than the
//! listener takes are still sending theirs.

use core::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Most clients whose connection rate is tracked at once per listener.
pub const MAX_TRACKED_CLIENTS: usize = 65_536;

/// The limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections open at once on the listener.
    pub max_connections: usize,
    /// Connections open at once from one client.
    pub max_connections_per_client: usize,
    /// New connections a second on the listener (burst: as many).
    pub max_new_per_sec: u32,
    /// New connections a second from one client (burst: as many).
    pub max_new_per_sec_per_client: u32,
}

/// Why a connection was not admitted; `as_str` is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `max_connections`.
    ListenerLimit,
    /// The client holds `max_connections_per_client`.
    ClientLimit,
    /// The listener's new-connection rate is spent.
    ListenerRate,
    /// The client's new-connection rate is spent.
    ClientRate,
}

impl Refusal {
    pub const ALL: [Refusal; 4] = [
        Refusal::ListenerLimit,
        Refusal::ClientLimit,
        Refusal::ListenerRate,
        Refusal::ClientRate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ListenerLimit => "listener_limit",
            Refusal::ClientLimit => "client_limit",
            Refusal::ListenerRate => "listener_rate",
            Refusal::ClientRate => "client_rate",
        }
    }
}

/// Why a listener's edge refused a connection before admitting it;
/// `as_str` is the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeRefusal {
    /// The listener takes PROXY-protocol connections, and this one came
    /// from an address that is none of its trusted proxies: a client that
    /// reaches the listener directly must not name its own address.
    UntrustedProxy,
    /// As many connections as the listener takes are still sending their
    /// PROXY header.
    ProxyPending,
    /// A trusted proxy sent no valid PROXY header (in time).
    ProxyHeader,
}

impl EdgeRefusal {
    pub const ALL: [EdgeRefusal; 3] = [
        EdgeRefusal::UntrustedProxy,
        EdgeRefusal::ProxyPending,
        EdgeRefusal::ProxyHeader,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EdgeRefusal::UntrustedProxy => "untrusted_proxy",
            EdgeRefusal::ProxyPending => "proxy_pending",
            EdgeRefusal::ProxyHeader => "proxy_header",
        }
    }
}

/// What to do with a connection a listener accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EdgeDecision {
    /// Admit and serve it as it is (a listener without PROXY protocol).
    Serve,
    /// Read its PROXY header first (within the runtime's timeout), then
    /// call [`ProxyEdge::header_ended`] and take the client from
    /// [`ProxyEdge::client_of`].
    ReadProxyHeader,
    /// Close it.
    Refuse(EdgeRefusal),
}

/// One listener's edge: whether its connections come straight from the
/// clients or through PROXY-protocol balancers, and for the latter how many
/// are still sending their header. Which addresses are trusted proxies is
/// configuration (the runtime matches the source against its CIDRs and
/// says `trusted`); what that means for the connection is decided here.
#[derive(Clone, Debug)]
pub struct ProxyEdge {
    proxy_protocol: bool,
    max_pending: usize,
    pending: usize,
}

impl ProxyEdge {
    /// A listener whose connections come straight from its clients.
    pub fn direct() -> Self {
        ProxyEdge {
            proxy_protocol: false,
            max_pending: 0,
            pending: 0,
        }
    }

    /// A listener behind PROXY-protocol balancers, reading at most
    /// `max_pending` headers at once (the listener's own connection limit:
    /// connections still sending their header count against it before
    /// they are admitted).
    pub fn proxied(max_pending: usize) -> Self {
        ProxyEdge {
            proxy_protocol: true,
            max_pending,
            pending: 0,
        }
    }

    /// A connection arrived from a source that is (`trusted`) or is not
    /// one of the listener's trusted proxies (ignored on a direct
    /// listener). [`EdgeDecision::ReadProxyHeader`] counts it as pending
    /// until [`ProxyEdge::header_ended`]; a refusal takes nothing.
    pub fn arrive(&mut self, trusted: bool) -> EdgeDecision {
        if !self.proxy_protocol {
            return EdgeDecision::Serve;
        }
        if !trusted {
            return EdgeDecision::Refuse(EdgeRefusal::UntrustedProxy);
        }
        if self.pending >= self.max_pending {
            return EdgeDecision::Refuse(EdgeRefusal::ProxyPending);
        }
        self.pending += 1;
        EdgeDecision::ReadProxyHeader
    }

    /// A connection told to read its header is done with it (read, failed,
    /// timed out or dropped): once for each [`EdgeDecision::ReadProxyHeader`].
    pub fn header_ended(&mut self) {
        debug_assert!(self.pending > 0, "header_ended without a pending header");
        self.pending = self.pending.saturating_sub(1);
    }

    /// Connections still sending their header.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// The client a connection from proxy `from` is served as, given its
    /// header: the address the header names; the proxy itself for a header
    /// that names none (v1 `UNKNOWN`, v2 `LOCAL`: the balancer's own health
    /// check); a header that could not be read refuses the connection
    /// ([`EdgeRefusal::ProxyHeader`], with the runtime's reason `E`).
    pub fn client_of<E>(
        from: SocketAddr,
        header: Result<Option<SocketAddr>, E>,
    ) -> Result<SocketAddr, (EdgeRefusal, E)> {
        match header {
            Ok(named) => Ok(named.unwrap_or(from)),
            Err(reason) => Err((EdgeRefusal::ProxyHeader, reason)),
        }
    }
}

/// The key a client is counted under (see the module documentation).
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Bucket {
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn refill(&mut self, rate: u32, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(f64::from(rate));
        self.at = now;
    }

    /// Whether a token is there (without taking it).
    fn has_token(&mut self, rate: u32, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= 1.0
    }

    /// Whether the bucket would be full again at `now`.
    fn refilled(&self, rate: u32, now: Instant) -> bool {
        let need = f64::from(rate) - self.tokens;
        now.saturating_duration_since(self.at) >= Duration::from_secs_f64(need / f64::from(rate))
    }
}

/// One listener's admission state.
#[derive(Debug)]
pub struct Admission {
    limits: AdmissionLimits,
    open: usize,
    open_by_client: BTreeMap<IpAddr, usize>,
    rate: Bucket,
    rate_by_client: BTreeMap<IpAddr, Bucket>,
    /// Clients admitted without a bucket of their own (table full).
    pub untracked: u64,
}

impl Admission {
    /// `limits` with rates of at least one a second (0 would never refill).
    pub fn new(limits: AdmissionLimits, now: Instant) -> Self {
        let limits = AdmissionLimits {
            max_new_per_sec: limits.max_new_per_sec.max(1),
            max_new_per_sec_per_client: limits.max_new_per_sec_per_client.max(1),
            ..limits
        };
        Admission {
            limits,
            open: 0,
            open_by_client: BTreeMap::new(),
            rate: Bucket::full(limits.max_new_per_sec, now),
            rate_by_client: BTreeMap::new(),
            untracked: 0,
        }
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open
    }

    /// Clients whose rate is tracked now.
    pub fn tracked_clients(&self) -> usize {
        self.rate_by_client.len()
    }

    /// Admit a new connection from `ip`, or say why not. An admitted
    /// connection counts until [`Admission::release`] with the same `ip`.
    /// A refused one takes nothing: neither a rate token nor a slot.
    pub fn admit(&mut self, now: Instant, ip: IpAddr) -> Result<(), Refusal> {
        let key = client_key(ip);
        let l = self.limits;
        if self.open >= l.max_connections {
            return Err(Refusal::ListenerLimit);
        }
        if self.open_by_client.get(&key).copied().unwrap_or(0) >= l.max_connections_per_client {
            return Err(Refusal::ClientLimit);
        }
        if !self.rate.has_token(l.max_new_per_sec, now) {
            return Err(Refusal::ListenerRate);
        }
        let tracked = self.client_bucket(now, key);
        if let Some(b) = tracked {
            if !b.has_token(l.max_new_per_sec_per_client, now) {
                return Err(Refusal::ClientRate);
            }
            b.tokens -= 1.0;
        } else {
            self.untracked += 1;
        }
        self.rate.tokens -= 1.0;
        self.open += 1;
        *self.open_by_client.entry(key).or_default() += 1;
        Ok(())
    }

    /// An admitted connection from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        let key = client_key(ip);
        if let Some(n) = self.open_by_client.get_mut(&key) {
            self.open -= 1;
            *n -= 1;
            if *n == 0 {
                self.open_by_client.remove(&key);
            }
        }
    }

    /// The client's bucket, made (full) if new; `None` when the table is
    /// full even after forgetting the buckets that have refilled.
    fn client_bucket(&mut self, now: Instant, key: IpAddr) -> Option<&mut Bucket> {
        let rate = self.limits.max_new_per_sec_per_client;
        if !self.rate_by_client.contains_key(&key) {
            if self.rate_by_client.len() >= MAX_TRACKED_CLIENTS {
                self.rate_by_client.retain(|_, b| !b.refilled(rate, now));
            }
            if self.rate_by_client.len() >= MAX_TRACKED_CLIENTS {
                return None;
            }
            self.rate_by_client.insert(key, Bucket::full(rate, now));
        }
        self.rate_by_client.get_mut(&key)
    }
}
