#![no_main]
//! A hub-side and an agent-side tunnel fed arbitrary message sequences (each
//! input byte run is one message; the first byte picks text or binary, the
//! clock moves between messages): no panic, bounded state.
use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nowconnect_core::WsMessage;
use nowconnect_core::tunnel::{Tunnel, TunnelConfig};

fuzz_target!(|data: &[u8]| {
    #[allow(clippy::disallowed_methods)]
    let origin = Instant::now();
    let cfg = TunnelConfig { max_flows: 16, dedup_capacity: 16, ..TunnelConfig::default() };
    let mut hub = Tunnel::hub(origin, cfg.clone());
    let mut agent = Tunnel::agent(origin, cfg, "a1", &["ldap".to_string()]);
    let mut now = origin;
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate() {
        let Some((&kind, body)) = chunk.split_first() else { continue };
        let msg = if kind & 1 == 0 {
            WsMessage::Text(String::from_utf8_lossy(body).into_owned())
        } else {
            WsMessage::Binary(Bytes::copy_from_slice(body))
        };
        now += Duration::from_millis(u64::from(kind >> 1));
        let t = if i % 2 == 0 { &mut hub } else { &mut agent };
        t.handle_message(now, &msg);
        if kind & 0x80 != 0 {
            t.accept(now, nowconnect_core::Epoch(1));
        }
        t.handle_timeout(now);
        while t.poll_transmit().is_some() {}
        while t.poll_event().is_some() {}
        assert!(t.flow_count() <= 16);
        assert!(t.mux().dedup().len() <= 16);
    }
});
