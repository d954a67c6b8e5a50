//! The inline WebSocket writer: order, back-pressure, cancel-safety and the
//! close frame, against a sink that can be held shut.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures_lite::future::{block_on, poll_once};
use nowconnect_core::{ErrorCode, WsMessage};
use nowconnect_shared::driver::{InlineWriter, Outgoing, ReadSize};

/// A sink of strings that takes nothing while `open` is false.
#[derive(Clone, Default)]
struct Gate {
    open: Arc<AtomicBool>,
    got: Arc<Mutex<Vec<String>>>,
    flushes: Arc<Mutex<usize>>,
}

impl futures_util::Sink<String> for Gate {
    type Error = ();

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
        if self.open.load(Ordering::Relaxed) {
            Poll::Ready(Ok(()))
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    fn start_send(self: Pin<&mut Self>, item: String) -> Result<(), ()> {
        self.got.lock().unwrap().push(item);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        *self.flushes.lock().unwrap() += 1;
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), ()>> {
        Poll::Ready(Ok(()))
    }
}

fn frame(m: WsMessage) -> String {
    match m {
        WsMessage::Text(s) => s,
        WsMessage::Binary(b) => format!("{} bytes", b.len()),
    }
}

fn close(code: u16, reason: String) -> String {
    format!("close {code} {reason}")
}

fn text(s: &str) -> Outgoing {
    Outgoing::Frame(WsMessage::Text(s.into()))
}

#[test]
fn queued_frames_go_out_in_order_with_one_flush_once_the_socket_takes_them() {
    let gate = Gate::default();
    let (tx, rx) = async_channel::unbounded();
    let mut w = InlineWriter::new(gate.clone(), rx, frame, close);
    assert!(w.is_idle());
    for s in ["a", "b", "c"] {
        tx.try_send(text(s)).unwrap();
    }
    assert!(!w.is_idle());
    // The socket takes nothing: the write does not complete, nothing is lost.
    assert!(block_on(poll_once(w.write())).is_none());
    assert!(gate.got.lock().unwrap().is_empty());
    assert!(!w.is_idle());
    gate.open.store(true, Ordering::Relaxed);
    block_on(w.write());
    assert_eq!(*gate.got.lock().unwrap(), ["a", "b", "c"]);
    assert_eq!(*gate.flushes.lock().unwrap(), 1, "one flush per batch");
    assert!(w.is_idle());
    assert!(!w.is_done());
}

#[test]
fn a_write_dropped_midway_loses_and_repeats_nothing() {
    let gate = Gate::default();
    let (tx, rx) = async_channel::unbounded();
    let mut w = InlineWriter::new(gate.clone(), rx, frame, close);
    for i in 0..100 {
        tx.try_send(text(&i.to_string())).unwrap();
        // Every few messages the socket opens for one poll, then shuts.
        gate.open.store(i % 7 == 0, Ordering::Relaxed);
        // A `race` another branch wins drops the write future like this.
        let _ = block_on(poll_once(w.write()));
    }
    gate.open.store(true, Ordering::Relaxed);
    block_on(w.write());
    let want: Vec<String> = (0..100).map(|i: i32| i.to_string()).collect();
    assert_eq!(*gate.got.lock().unwrap(), want);
}

#[test]
fn a_close_frame_ends_the_socket_and_nothing_after_it_is_sent() {
    let gate = Gate::default();
    gate.open.store(true, Ordering::Relaxed);
    let (tx, rx) = async_channel::unbounded();
    let mut w = InlineWriter::new(gate.clone(), rx, frame, close);
    tx.try_send(text("last words")).unwrap();
    tx.try_send(Outgoing::Close {
        code: ErrorCode::Shutdown,
        reason: "hub shutting down".into(),
    })
    .unwrap();
    tx.try_send(text("too late")).unwrap();
    block_on(w.write());
    assert!(w.is_done());
    assert!(w.is_idle());
    let got = gate.got.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0], "last words");
    assert!(got[1].starts_with("close 1001"), "{got:?}");
    assert!(got[1].contains("hub shutting down"), "{got:?}");
}

#[test]
fn read_size_grows_with_bulk_reads_and_shrinks_with_small_ones() {
    let mut r = ReadSize::default();
    assert_eq!(r.get(), ReadSize::MIN);
    // Full reads double it up to the largest read.
    for _ in 0..20 {
        let n = r.get();
        r.update(n);
    }
    assert_eq!(r.get(), nowconnect_shared::driver::READ_CHUNK);
    // Reads of a few bytes halve it back down, never below the minimum.
    for _ in 0..20 {
        r.update(100);
    }
    assert_eq!(r.get(), ReadSize::MIN);
    // A read that uses between a quarter and all of it leaves it alone.
    r.update(2048);
    assert_eq!(r.get(), ReadSize::MIN);
}
