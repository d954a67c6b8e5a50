//! The request head reader behind the async-std hub's HTTP endpoints.

use futures_lite::future::block_on;
use futures_util::io::Cursor;
use nowconnect_shared::http::{MAX_HEAD, read_head, response};

#[test]
fn a_head_is_parsed_and_the_bytes_after_it_are_kept() {
    let raw = b"GET /tunnel?x=1 HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nAuthorization: Bearer abc\r\n\r\n\x82\x05hello";
    let head = block_on(read_head(&mut Cursor::new(raw.to_vec()))).unwrap();
    assert_eq!(head.method, "GET");
    assert_eq!(head.path, "/tunnel?x=1");
    assert_eq!(head.header("authorization"), Some("Bearer abc"));
    assert_eq!(head.header("UPGRADE"), Some("websocket"));
    assert_eq!(head.rest, b"\x82\x05hello");
}

#[test]
fn an_endless_or_broken_or_cut_head_is_refused_with_a_reason() {
    let endless = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(MAX_HEAD));
    let e = block_on(read_head(&mut Cursor::new(endless.into_bytes()))).unwrap_err();
    assert!(e.contains("too large"), "{e}");
    let broken = b"GET / HTTP/1.1\r\nbad header line\r\n\r\n".to_vec();
    let e = block_on(read_head(&mut Cursor::new(broken))).unwrap_err();
    assert!(e.starts_with("bad request head"), "{e}");
    let cut = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    let e = block_on(read_head(&mut Cursor::new(cut))).unwrap_err();
    assert!(e.contains("closed before a full request head"), "{e}");
}

#[test]
fn responses_close_the_connection_and_carry_their_length() {
    let r = String::from_utf8(response(
        503,
        "application/json",
        "{\"status\":\"draining\"}",
    ))
    .unwrap();
    assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
    assert!(r.contains("\r\nconnection: close\r\n"), "{r}");
    assert!(r.contains("\r\ncontent-length: 21\r\n"), "{r}");
    assert!(r.ends_with("\r\n\r\n{\"status\":\"draining\"}"), "{r}");
}
