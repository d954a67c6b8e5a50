//! The link loops' timer: made again only when the deadline moves, pending
//! without a deadline, spent once it fires, and kept when a wait is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::future::{block_on, poll_once};
use nowconnect_shared::driver::LoopTimer;

/// A timer that fires when `fire` is set; counts how many were made.
struct Fake(Arc<AtomicBool>);

impl Future for Fake {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.load(Ordering::SeqCst) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }
}

struct Clock {
    made: Arc<AtomicUsize>,
    fire: Arc<AtomicBool>,
}

impl Clock {
    fn new() -> Self {
        Clock {
            made: Arc::default(),
            fire: Arc::default(),
        }
    }

    fn sleep(&self) -> impl FnOnce(Duration) -> Fake + use<> {
        let (made, fire) = (self.made.clone(), self.fire.clone());
        move |_| {
            made.fetch_add(1, Ordering::SeqCst);
            Fake(fire)
        }
    }

    fn made(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }
}

#[test]
fn the_timer_is_made_again_only_when_the_deadline_moves() {
    let clock = Clock::new();
    let mut t = LoopTimer::default();
    let at = Instant::now() + Duration::from_secs(5);
    t.set(Some(at), clock.sleep());
    t.set(Some(at), clock.sleep());
    t.set(Some(at), clock.sleep());
    assert_eq!(clock.made(), 1, "the same deadline reuses the timer");
    t.set(Some(at + Duration::from_secs(1)), clock.sleep());
    assert_eq!(clock.made(), 2, "a new deadline makes a new timer");
    t.set(None, clock.sleep());
    t.set(None, clock.sleep());
    assert_eq!(clock.made(), 2, "no deadline, no timer");
    assert!(
        block_on(poll_once(t.wait())).is_none(),
        "pending without one"
    );
}

#[test]
fn a_dropped_wait_keeps_the_timer_and_a_fired_one_is_spent() {
    let clock = Clock::new();
    let mut t = LoopTimer::default();
    let at = Instant::now();
    t.set(Some(at), clock.sleep());
    // The other branch of the race won: the wait is dropped, the timer stays.
    assert!(block_on(poll_once(t.wait())).is_none());
    t.set(Some(at), clock.sleep());
    assert_eq!(clock.made(), 1);
    clock.fire.store(true, Ordering::SeqCst);
    block_on(t.wait());
    // Spent: waiting again pends until the next `set`, which arms a new one
    // even for the same deadline (the loop still has it due).
    assert!(block_on(poll_once(t.wait())).is_none());
    t.set(Some(at), clock.sleep());
    assert_eq!(clock.made(), 2);
    block_on(t.wait());
}
