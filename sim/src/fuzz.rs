//! Drivers shared by the fuzz targets and the corpus replay tests, so a seed
//! means the same thing in both.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nowconnect_core::tunnel::{Tunnel, TunnelConfig};
use nowconnect_core::{Epoch, WsMessage};

/// Flow and dedup bound used by [`drive_tunnels`].
pub const TUNNEL_BOUND: usize = 16;

/// Feed a hub-side and an agent-side tunnel alternately with the messages in
/// `data` (split at 0xff; the first byte of each picks text or binary, moves
/// the clock, and may accept the hub side). Panics if a bound is exceeded.
pub fn drive_tunnels(origin: Instant, data: &[u8]) {
    let cfg = TunnelConfig {
        max_flows: TUNNEL_BOUND,
        dedup_capacity: TUNNEL_BOUND,
        ..TunnelConfig::default()
    };
    let mut hub = Tunnel::hub(origin, cfg.clone());
    let mut agent = Tunnel::agent(origin, cfg, "a1", &["ldap".to_string()]);
    let mut now = origin;
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate() {
        let Some((&kind, body)) = chunk.split_first() else {
            continue;
        };
        let msg = if kind & 1 == 0 {
            WsMessage::Text(String::from_utf8_lossy(body).into_owned())
        } else {
            WsMessage::Binary(Bytes::copy_from_slice(body))
        };
        now += Duration::from_millis(u64::from(kind >> 1));
        let t = if i % 2 == 0 { &mut hub } else { &mut agent };
        t.handle_message(now, &msg);
        if kind & 0x80 != 0 {
            t.accept(now, Epoch(1));
        }
        t.handle_timeout(now);
        while t.poll_transmit().is_some() {}
        while t.poll_event().is_some() {}
        assert!(t.flow_count() <= TUNNEL_BOUND, "flow bound exceeded");
        assert!(
            t.mux().dedup().len() <= TUNNEL_BOUND,
            "dedup bound exceeded"
        );
    }
}
