//! Log setup: text (default) or JSON lines, filter from `RUST_LOG` or config.
//! Security events (refused tokens, fencing, refused peers) use the stable
//! target `nowconnect::security`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

pub fn init(format: Option<&str>, level: Option<&str>) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(level.unwrap_or("info")));
    // Colour only on a terminal: log files and journald get plain text.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if format == Some("json") {
        b.json().flatten_event(true).try_init()
    } else {
        b.try_init()
    };
}

/// Whether listener clients' addresses are masked in logs
/// (`log.mask_client_addresses`, on by default).
static MASK_CLIENTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Set once at start from `log.mask_client_addresses`.
pub fn mask_client_addresses(on: bool) {
    MASK_CLIENTS.store(on, std::sync::atomic::Ordering::Relaxed);
    if !on {
        tracing::warn!(target: "nowconnect::security", "log.mask_client_addresses is false: client IP addresses are logged in full");
    }
}

/// A listener client's address as logs show it: its network (`/24` for
/// IPv4, `/48` for IPv6) unless masking is off. Client addresses are the
/// personal data a hub sees; the network is what an operator needs to
/// tell a balancer, an office or an attacker's range apart.
pub fn client_addr(a: std::net::SocketAddr) -> ClientAddr {
    ClientAddr(a, MASK_CLIENTS.load(std::sync::atomic::Ordering::Relaxed))
}

pub struct ClientAddr(std::net::SocketAddr, bool);

impl std::fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.0.ip(), self.1) {
            (_, false) => write!(f, "{}", self.0),
            (std::net::IpAddr::V4(v4), true) => {
                let [a, b, c, _] = v4.octets();
                write!(f, "{a}.{b}.{c}.0/24")
            }
            (std::net::IpAddr::V6(v6), true) => match v6.to_ipv4_mapped() {
                Some(v4) => {
                    let [a, b, c, _] = v4.octets();
                    write!(f, "{a}.{b}.{c}.0/24")
                }
                None => {
                    let s = v6.segments();
                    write!(f, "{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
                }
            },
        }
    }
}

/// At most one log line a period for events an outsider can cause at will
/// (connections refused at a listener's edge): the first in each period is
/// logged, the others only counted (every one is in the metrics anyway) and
/// the count is logged with the next line, so a flood cannot fill the disk
/// or drown the other lines.
pub struct LogThrottle {
    period: std::time::Duration,
    /// When the last line was let through, and the lines held back since.
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl LogThrottle {
    pub const fn new(period: std::time::Duration) -> Self {
        LogThrottle {
            period,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// `Some(held_back)`: log this line now, noting the lines held back
    /// since the last one; `None`: hold this one back.
    pub fn admit(&self, now: std::time::Instant) -> Option<u64> {
        let mut st = self.state.lock().expect("log throttle lock");
        match st.0 {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                st.1 += 1;
                None
            }
            _ => {
                let held = std::mem::take(&mut st.1);
                st.0 = Some(now);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_lets_one_line_a_period_through_and_counts_the_rest() {
        let t = LogThrottle::new(std::time::Duration::from_secs(1));
        let t0 = std::time::Instant::now();
        assert_eq!(t.admit(t0), Some(0));
        for i in 1..=999u64 {
            assert_eq!(t.admit(t0 + std::time::Duration::from_micros(i)), None);
        }
        let t1 = t0 + std::time::Duration::from_secs(1);
        assert_eq!(t.admit(t1), Some(999));
        assert_eq!(t.admit(t1), None);
        assert_eq!(t.admit(t1 + std::time::Duration::from_secs(5)), Some(1));
    }

    #[test]
    fn client_addresses_are_masked_to_their_network() {
        let show = |a: &str, mask: bool| ClientAddr(a.parse().unwrap(), mask).to_string();
        assert_eq!(show("203.0.113.77:51234", true), "203.0.113.0/24");
        assert_eq!(show("[2001:db8:aa:bb::7]:636", true), "2001:db8:aa::/48");
        assert_eq!(show("[::ffff:198.51.100.9]:389", true), "198.51.100.0/24");
        assert_eq!(show("203.0.113.77:51234", false), "203.0.113.77:51234");
    }
}
