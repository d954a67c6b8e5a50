#![no_main]
//! v2 decoding never panics, and whatever decodes re-encodes to a frame that
//! decodes to the same value.
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nowconnect_core::Limits;
use nowconnect_core::codec::v2;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    if let Ok(frame) = v2::decode(&Bytes::copy_from_slice(data), &limits) {
        let again = v2::encode(&frame, &limits).expect("a decoded frame encodes");
        assert_eq!(v2::decode(&again, &limits).expect("round trip"), frame);
    }
});
