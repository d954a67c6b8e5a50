#![no_main]
//! v1 decoding never panics, and whatever decodes round-trips.
use libfuzzer_sys::fuzz_target;
use nowconnect_core::Limits;
use nowconnect_core::codec::v1;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let limits = Limits::default();
    if let Ok(frame) = v1::decode(text, &limits) {
        let again = v1::encode(&frame, &limits).expect("a decoded frame encodes");
        assert_eq!(v1::decode(&again, &limits).expect("round trip"), frame);
    }
});
