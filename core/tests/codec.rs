//! Both codecs: round trips, arbitrary input never panics, and every class of
//! bad input gives its own typed error.

use bytes::{BufMut, Bytes, BytesMut};
use nowconnect_core::codec::{self, CodecError, v1, v2};
use nowconnect_core::payload::HEADROOM;
use nowconnect_core::{
    Cid, Codec, Epoch, ErrorCode, Frame, Limits, MeshHeader, Payload, WsMessage,
};
use proptest::prelude::*;

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,24}"
}

fn reason() -> impl Strategy<Value = String> {
    // Any Unicode, including quotes and control characters that JSON escapes.
    ".{0,40}"
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..2048).prop_map(Bytes::from)
}

fn code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(ErrorCode::ALL.to_vec())
}

fn cid() -> impl Strategy<Value = Cid> {
    any::<u64>().prop_map(Cid)
}

fn header() -> impl Strategy<Value = MeshHeader> {
    (cid(), name(), name(), any::<u64>(), any::<u64>()).prop_map(
        |(cid, connector, agent_id, seq, e)| MeshHeader {
            cid,
            connector,
            agent_id,
            seq,
            epoch: Epoch(e),
        },
    )
}

pub fn frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (
            name(),
            prop::collection::vec(name(), 0..5),
            prop::collection::vec(name(), 0..3),
            any::<u32>()
        )
            .prop_map(|(agent_id, connectors, codecs, window)| Frame::Hello {
                slot: 0,
                slots: 1,
                agent_id,
                connectors,
                codecs,
                window
            }),
        (any::<u64>(), name(), any::<u32>(), any::<u32>()).prop_map(
            |(e, codec, window, max_frame)| Frame::Welcome {
                replica_id: String::new(),
                epoch: Epoch(e),
                codec,
                window,
                max_frame
            }
        ),
        (cid(), name()).prop_map(|(cid, connector)| Frame::Open { cid, connector }),
        (cid(), any::<u64>(), payload()).prop_map(|(cid, seq, payload)| Frame::Data {
            cid,
            seq,
            payload
        }),
        (cid(), any::<Option<u64>>()).prop_map(|(cid, seq)| Frame::Fin { cid, seq }),
        (cid(), code(), reason()).prop_map(|(cid, code, reason)| Frame::Rst { cid, code, reason }),
        (cid(), any::<u32>()).prop_map(|(cid, bytes)| Frame::Credit { cid, bytes }),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        Just(Frame::Drain),
        "[A-Za-z0-9._-]{1,600}".prop_map(|token| Frame::Reauth { token }),
        (name(), any::<u32>())
            .prop_map(|(replica_id, window)| Frame::MHello { replica_id, window }),
        header().prop_map(|h| Frame::MOpen { h }),
        (header(), any::<bool>(), code(), reason()).prop_map(|(h, ok, code, reason)| {
            Frame::MOpenAck {
                h,
                ok,
                code,
                reason,
            }
        }),
        (header(), payload()).prop_map(|(h, payload)| Frame::MData { h, payload }),
        header().prop_map(|h| Frame::MFin { h }),
        (header(), code(), reason()).prop_map(|(h, code, reason)| Frame::MRst { h, code, reason }),
        (header(), any::<u32>()).prop_map(|(h, bytes)| Frame::MCredit { h, bytes }),
        any::<u64>().prop_map(|nonce| Frame::MPing { nonce }),
        any::<u64>().prop_map(|nonce| Frame::MPong { nonce }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn v2_round_trip(f in frame()) {
        let limits = Limits::default();
        let bytes = v2::encode(&f, &limits).unwrap();
        prop_assert_eq!(v2::decode(&bytes, &limits).unwrap(), f);
    }

    #[test]
    fn v1_round_trip(f in frame()) {
        let limits = Limits::default();
        let text = v1::encode(&f, &limits).unwrap();
        prop_assert_eq!(v1::decode(&text, &limits).unwrap(), f);
    }

    #[test]
    fn generic_decode_picks_codec_by_message_kind(f in frame(), use_v2 in any::<bool>()) {
        let limits = Limits::default();
        let c = if use_v2 { Codec::V2 } else { Codec::V1 };
        let msg = c.encode(&f, &limits).unwrap();
        prop_assert_eq!(codec::decode(&msg, &limits).unwrap(), f);
    }

    #[test]
    fn v2_arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = v2::decode(&Bytes::from(data), &Limits::default());
    }

    #[test]
    fn v2_tag_then_arbitrary_bytes_never_panic(tag in 0u8..0x20, data in prop::collection::vec(any::<u8>(), 0..256)) {
        let mut b = vec![tag];
        b.extend(data);
        let _ = v2::decode(&Bytes::from(b), &Limits::default());
    }

    #[test]
    fn v1_arbitrary_text_never_panics(s in ".{0,300}") {
        let _ = v1::decode(&s, &Limits::default());
    }

    #[test]
    fn v1_json_shaped_text_never_panics(
        ty in prop::sample::select(vec!["HELLO","WELCOME","OPEN","DATA","FIN","RST","CREDIT","PING","M_OPEN","M_DATA","M_OPEN_ACK","X"]),
        cid in prop::option::of(any::<i64>()),
        b64 in prop::option::of("[A-Za-z0-9+/=!]{0,40}"),
        extra in prop::option::of(".{0,20}"),
    ) {
        let mut s = format!(r#"{{"type":"{ty}""#);
        if let Some(c) = cid { s += &format!(r#","cid":{c},"seq":{c},"epoch":{c},"nonce":{c},"bytes":{c}"#); }
        if let Some(b) = b64 { s += &format!(r#","b64":"{b}""#); }
        if let Some(e) = extra { s += &format!(r#","agent_id":{},"connector":"c""#, serde_json::to_string(&e).unwrap()); }
        s += "}";
        let _ = v1::decode(&s, &Limits::default());
    }

    #[test]
    fn truncating_a_v2_frame_is_an_error_never_a_panic(f in frame(), cut in any::<prop::sample::Index>()) {
        let limits = Limits::default();
        let bytes = v2::encode(&f, &limits).unwrap();
        let n = cut.index(bytes.len());
        // DATA payloads are "the rest", so a cut inside one is a shorter valid frame.
        if !f.is_data() {
            prop_assert!(v2::decode(&bytes.slice(..n), &limits).is_err());
        }
    }
}

#[test]
fn oversized_frames_are_refused_before_parsing() {
    let limits = Limits {
        max_frame: 1024,
        ..Limits::default()
    };
    let big = Bytes::from(vec![0x04u8; 2000]);
    assert_eq!(
        v2::decode(&big, &limits),
        Err(CodecError::TooLarge {
            len: 2000,
            max: 1024
        })
    );
    let text = format!(
        r#"{{"type":"DATA","cid":1,"seq":0,"b64":"{}"}}"#,
        "A".repeat(2000)
    );
    assert!(matches!(
        v1::decode(&text, &limits),
        Err(CodecError::TooLarge { .. })
    ));
    // And we never produce one.
    let f = Frame::Data {
        cid: Cid(1),
        seq: 0,
        payload: Bytes::from(vec![0u8; 4000]),
    };
    assert!(v2::encode(&f, &limits).is_err());
    assert!(v1::encode(&f, &limits).is_err());
}

#[test]
fn every_bad_input_class_has_its_own_error() {
    let l = Limits::default();
    assert_eq!(v2::decode(&Bytes::new(), &l), Err(CodecError::Empty));
    assert_eq!(v1::decode("", &l), Err(CodecError::Empty));
    assert!(matches!(
        v2::decode(&Bytes::from_static(&[0x7f]), &l),
        Err(CodecError::UnknownType(_))
    ));
    assert!(
        matches!(v1::decode(r#"{"type":"BOGUS"}"#, &l), Err(CodecError::UnknownType(t)) if t == "BOGUS")
    );
    assert!(matches!(
        v1::decode("{not json", &l),
        Err(CodecError::BadJson(_))
    ));
    assert!(matches!(
        v1::decode(r#"{"cid":1}"#, &l),
        Err(CodecError::BadJson(_))
    ));
    assert_eq!(
        v1::decode(r#"{"type":"DATA","cid":1,"seq":0}"#, &l),
        Err(CodecError::MissingField {
            frame: "DATA",
            field: "b64"
        })
    );
    assert!(matches!(
        v1::decode(r#"{"type":"DATA","cid":1,"seq":0,"b64":"%%%"}"#, &l),
        Err(CodecError::BadBase64 { frame: "DATA", .. })
    ));
    assert!(matches!(
        v1::decode(r#"{"type":"CREDIT","cid":1,"bytes":99999999999}"#, &l),
        Err(CodecError::OutOfRange {
            frame: "CREDIT",
            field: "bytes",
            ..
        })
    ));
    assert!(matches!(
        v1::decode(r#"{"type":"RST","cid":1,"code":"nope"}"#, &l),
        Err(CodecError::OutOfRange { field: "code", .. })
    ));
    assert!(matches!(
        v1::decode(r#"{"type":"OPEN","cid":1,"connector":""}"#, &l),
        Err(CodecError::OutOfRange {
            field: "connector",
            ..
        })
    ));
    // Truncated v2: an OPEN whose string length runs past the end.
    let mut b = BytesMut::new();
    b.put_u8(0x03);
    b.put_u64_le(9);
    b.put_u16_le(10);
    b.extend_from_slice(b"ld");
    assert!(matches!(
        v2::decode(&b.freeze(), &l),
        Err(CodecError::Truncated {
            frame: "OPEN",
            field: "connector",
            need: 10,
            have: 2
        })
    ));
    // Trailing bytes after a fixed-size frame.
    let mut b = BytesMut::new();
    b.put_u8(0x08);
    b.put_u64_le(1);
    b.put_u8(0);
    assert_eq!(
        v2::decode(&b.freeze(), &l),
        Err(CodecError::TrailingBytes {
            frame: "PING",
            extra: 1
        })
    );
    // Invalid UTF-8 in a name.
    let mut b = BytesMut::new();
    b.put_u8(0x03);
    b.put_u64_le(9);
    b.put_u16_le(2);
    b.extend_from_slice(&[0xff, 0xfe]);
    assert_eq!(
        v2::decode(&b.freeze(), &l),
        Err(CodecError::BadUtf8 {
            frame: "OPEN",
            field: "connector"
        })
    );
    // A string length above the limit is refused before allocating.
    let mut b = BytesMut::new();
    b.put_u8(0x03);
    b.put_u64_le(9);
    b.put_u16_le(60000);
    assert!(matches!(
        v2::decode(&b.freeze(), &l),
        Err(CodecError::OutOfRange {
            field: "connector",
            ..
        })
    ));
    // Unknown error code byte.
    let mut b = BytesMut::new();
    b.put_u8(0x06);
    b.put_u64_le(9);
    b.put_u8(200);
    b.put_u16_le(0);
    assert!(matches!(
        v2::decode(&b.freeze(), &l),
        Err(CodecError::OutOfRange { field: "code", .. })
    ));
}

#[test]
fn v1_matches_the_original_field_names() {
    let l = Limits::default();
    let f = v1::decode(r#"{"type":"DATA","cid":7,"seq":2,"b64":"aGk="}"#, &l).unwrap();
    assert_eq!(
        f,
        Frame::Data {
            cid: Cid(7),
            seq: 2,
            payload: Bytes::from_static(b"hi")
        }
    );
    // An original agent's HELLO has no codecs and no window; FIN has no seq.
    let f = v1::decode(
        r#"{"type":"HELLO","agent_id":"a1","connectors":["ldap"]}"#,
        &l,
    )
    .unwrap();
    assert!(matches!(f, Frame::Hello { ref codecs, window: 0, .. } if codecs.is_empty()));
    assert_eq!(
        v1::decode(r#"{"type":"FIN","cid":3}"#, &l).unwrap(),
        Frame::Fin {
            cid: Cid(3),
            seq: None
        }
    );
    // Unknown fields are ignored.
    assert_eq!(
        v1::decode(r#"{"type":"PING","nonce":1,"future":true}"#, &l).unwrap(),
        Frame::Ping { nonce: 1 }
    );
    let m = v1::encode(
        &Frame::MData {
            h: MeshHeader {
                cid: Cid(1),
                connector: "ldap".into(),
                agent_id: "a1".into(),
                seq: 0,
                epoch: Epoch(3),
            },
            payload: Bytes::from_static(b"x"),
        },
        &l,
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&m).unwrap();
    for k in [
        "type",
        "cid",
        "connector",
        "agent_id",
        "seq",
        "epoch",
        "b64",
    ] {
        assert!(v.get(k).is_some(), "M_DATA lacks `{k}`: {m}");
    }
    assert!(matches!(
        codec::decode(&WsMessage::Text(m), &l),
        Ok(Frame::MData { .. })
    ));
}

#[test]
fn v2_data_decode_shares_the_buffer() {
    let l = Limits::default();
    let f = Frame::Data {
        cid: Cid(1),
        seq: 0,
        payload: Bytes::from(vec![7u8; 16384]),
    };
    let b = v2::encode(&f, &l).unwrap();
    let Frame::Data { payload, .. } = v2::decode(&b, &l).unwrap() else {
        panic!()
    };
    assert_eq!(payload.as_ptr(), b[v2::DATA_HEADER_LEN..].as_ptr());
}

/// A payload read behind `room` free bytes, as a runtime's flow reader
/// hands it over.
fn with_room(data: &[u8], room: usize) -> Payload {
    let mut buf = BytesMut::with_capacity(room + data.len());
    buf.put_bytes(0xee, room);
    buf.put_slice(data);
    Payload::with_room(buf, room)
}

#[test]
fn data_with_room_is_encoded_in_place_without_a_copy() {
    let l = Limits::default();
    let data = vec![9u8; 256 * 1024];
    let p = with_room(&data, HEADROOM);
    let at = p.as_ptr();
    let head = Frame::Data {
        cid: Cid(7),
        seq: 3,
        payload: Bytes::new(),
    };
    let WsMessage::Binary(b) = Codec::V2.encode_data(head, p, &l).unwrap() else {
        panic!("v2 encodes binary");
    };
    // The payload in the message is the very memory it was read into.
    assert_eq!(b[v2::DATA_HEADER_LEN..].as_ptr(), at);
    let full = Frame::Data {
        cid: Cid(7),
        seq: 3,
        payload: Bytes::from(data),
    };
    assert_eq!(b, v2::encode(&full, &l).unwrap());
}

#[test]
fn mesh_data_with_room_is_encoded_in_place_and_long_names_fall_back_to_a_copy() {
    let l = Limits::default();
    let data = vec![4u8; 4096];
    for (names, in_place) in [(8, true), (49, true), (50, false), (255, false)] {
        let h = MeshHeader {
            cid: Cid(1),
            connector: "c".repeat(names),
            agent_id: "a".repeat(names),
            seq: 2,
            epoch: Epoch(3),
        };
        let p = with_room(&data, HEADROOM);
        let at = p.as_ptr();
        let head = Frame::MData {
            h: h.clone(),
            payload: Bytes::new(),
        };
        let WsMessage::Binary(b) = Codec::V2.encode_data(head, p, &l).unwrap() else {
            panic!("v2 encodes binary");
        };
        let full = Frame::MData {
            h,
            payload: Bytes::from(data.clone()),
        };
        assert_eq!(b, v2::encode(&full, &l).unwrap(), "names of {names}");
        let header_len = b.len() - data.len();
        assert_eq!(
            b[header_len..].as_ptr() == at,
            in_place,
            "names of {names}: header of {header_len} bytes, {HEADROOM} of room"
        );
    }
}

#[test]
fn data_payload_limits_hold_with_room_as_without() {
    let l = Limits::default();
    let too_big = vec![0u8; l.max_payload() + 1];
    let head = || Frame::Data {
        cid: Cid(1),
        seq: 0,
        payload: Bytes::new(),
    };
    let full = Frame::Data {
        cid: Cid(1),
        seq: 0,
        payload: Bytes::from(too_big.clone()),
    };
    let want = v2::encode(&full, &l).unwrap_err();
    for c in [Codec::V1, Codec::V2] {
        let err = c
            .encode_data(head(), with_room(&too_big, HEADROOM), &l)
            .unwrap_err();
        assert_eq!(err, want, "{c:?}");
    }
    // The largest payload still fits a frame, with room or without.
    let max = vec![1u8; l.max_payload()];
    assert!(
        Codec::V2
            .encode_data(head(), with_room(&max, HEADROOM), &l)
            .is_ok()
    );
    assert!(
        Codec::V2
            .encode_data(head(), Payload::from(max), &l)
            .is_ok()
    );
}

#[test]
fn splitting_a_payload_keeps_the_room_in_front() {
    let data: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let mut p = with_room(&data, 40);
    let front = p.split_to(300);
    assert_eq!((front.room(), &front[..]), (40, &data[..300]));
    assert_eq!((p.room(), &p[..]), (0, &data[300..]));
    let mut rest = p;
    let all = rest.split_to(5000);
    assert_eq!(&all[..], &data[300..]);
    assert!(rest.is_empty());
    assert_eq!(with_room(&data, 40).into_bytes(), Bytes::from(data.clone()));
    // A start past the end is no payload, not a panic.
    assert!(Payload::with_room(BytesMut::from(&b"abc"[..]), 9).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Whatever the room, the split and the codec, a DATA or M_DATA frame
    /// encoded with its payload apart is the frame encoded whole.
    #[test]
    fn encoding_data_apart_is_encoding_it_whole(
        data in prop::collection::vec(any::<u8>(), 0..4096),
        room in 0usize..200,
        cut in any::<prop::sample::Index>(),
        h in header(),
        mesh in any::<bool>(),
        use_v2 in any::<bool>(),
    ) {
        let l = Limits::default();
        let c = if use_v2 { Codec::V2 } else { Codec::V1 };
        let mut p = with_room(&data, room);
        let n = cut.index(data.len() + 1);
        let parts = [p.split_to(n), p];
        let mut at = 0;
        for part in parts {
            let bytes = Bytes::copy_from_slice(&data[at..at + part.len()]);
            at += part.len();
            let (head, full) = if mesh {
                (
                    Frame::MData { h: h.clone(), payload: Bytes::new() },
                    Frame::MData { h: h.clone(), payload: bytes },
                )
            } else {
                (
                    Frame::Data { cid: h.cid, seq: h.seq, payload: Bytes::new() },
                    Frame::Data { cid: h.cid, seq: h.seq, payload: bytes },
                )
            };
            let apart = c.encode_data(head, part, &l).unwrap();
            prop_assert_eq!(&apart, &c.encode(&full, &l).unwrap());
            prop_assert_eq!(codec::decode(&apart, &l).unwrap(), full);
        }
        prop_assert_eq!(at, data.len());
    }
}

/// The bytes of every frame that names a flow, in both codecs: the flow id
/// is a plain u64 on the wire (a JSON number, eight little-endian bytes).
#[test]
fn flow_frames_have_pinned_bytes() {
    let l = Limits::default();
    let cid = Cid(0x0102_0304_0506_0708);
    let h = MeshHeader {
        cid,
        connector: "ldap".into(),
        agent_id: "a1".into(),
        seq: 2,
        epoch: Epoch(3),
    };
    let frames = [
        Frame::Open {
            cid,
            connector: "ldap".into(),
        },
        Frame::Data {
            cid,
            seq: 2,
            payload: Bytes::from_static(b"hi"),
        },
        Frame::Fin { cid, seq: Some(4) },
        Frame::Fin { cid, seq: None },
        Frame::Rst {
            cid,
            code: ErrorCode::Refused,
            reason: "no".into(),
        },
        Frame::Credit { cid, bytes: 65536 },
        Frame::MOpen { h: h.clone() },
        Frame::MOpenAck {
            h: h.clone(),
            ok: false,
            code: ErrorCode::NoAgent,
            reason: "no".into(),
        },
        Frame::MData {
            h: h.clone(),
            payload: Bytes::from_static(b"hi"),
        },
        Frame::MFin { h: h.clone() },
        Frame::MRst {
            h: h.clone(),
            code: ErrorCode::Refused,
            reason: "no".into(),
        },
        Frame::MCredit { h, bytes: 65536 },
    ];
    let want = [
        (
            r#"{"type":"OPEN","cid":72623859790382856,"connector":"ldap"}"#,
            "03080706050403020104006c646170",
        ),
        (
            r#"{"type":"DATA","cid":72623859790382856,"seq":2,"b64":"aGk="}"#,
            "04080706050403020102000000000000006869",
        ),
        (
            r#"{"type":"FIN","cid":72623859790382856,"seq":4}"#,
            "050807060504030201010400000000000000",
        ),
        (
            r#"{"type":"FIN","cid":72623859790382856}"#,
            "05080706050403020100",
        ),
        (
            r#"{"type":"RST","cid":72623859790382856,"code":"refused","reason":"no"}"#,
            "0608070605040302010d02006e6f",
        ),
        (
            r#"{"type":"CREDIT","cid":72623859790382856,"bytes":65536}"#,
            "07080706050403020100000100",
        ),
        (
            r#"{"type":"M_OPEN","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3}"#,
            "1108070605040302010200000000000000030000000000000004006c64617002006131",
        ),
        (
            r#"{"type":"M_OPEN_ACK","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3,"ok":false,"code":"no_agent","reason":"no"}"#,
            "1208070605040302010200000000000000030000000000000004006c64617002006131000402006e6f",
        ),
        (
            r#"{"type":"M_DATA","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3,"b64":"aGk="}"#,
            "1308070605040302010200000000000000030000000000000004006c646170020061316869",
        ),
        (
            r#"{"type":"M_FIN","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3}"#,
            "1408070605040302010200000000000000030000000000000004006c64617002006131",
        ),
        (
            r#"{"type":"M_RST","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3,"code":"refused","reason":"no"}"#,
            "1508070605040302010200000000000000030000000000000004006c646170020061310d02006e6f",
        ),
        (
            r#"{"type":"M_CREDIT","agent_id":"a1","cid":72623859790382856,"connector":"ldap","seq":2,"epoch":3,"bytes":65536}"#,
            "1608070605040302010200000000000000030000000000000004006c6461700200613100000100",
        ),
    ];
    for (f, (text, hex)) in frames.iter().zip(want) {
        assert_eq!(v1::encode(f, &l).unwrap(), text);
        assert_eq!(&v1::decode(text, &l).unwrap(), f);
        let b = v2::encode(f, &l).unwrap();
        let got: String = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(got, hex, "v2 bytes of {f:?}");
        assert_eq!(&v2::decode(&b, &l).unwrap(), f);
    }
}
