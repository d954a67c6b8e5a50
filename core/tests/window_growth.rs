//! Receive-window growth (`core/src/flow.rs`): two flow multiplexers joined
//! by a modelled link with a one-way delay and no bandwidth limit, so that a
//! flow's window is all that bounds it; a bulk sender on one side, a consumer
//! on the other, on a virtual clock.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use nowconnect_core::mux::{FlowEvent, FlowFrame, FlowMux, GROWTH_BUDGET_WINDOWS, MuxConfig};
use nowconnect_core::{Cid, Limits};

const KIB: u32 = 1024;
const MIB: u32 = 1024 * 1024;
const CHUNK: usize = 256 * 1024;

fn mux(window: u32, max_window: u32) -> FlowMux {
    let mut m = FlowMux::new(MuxConfig {
        limits: Limits::default(),
        local_window: window,
        max_window,
        max_flows: 64,
        dedup_capacity: 64,
        #[cfg(feature = "planted-bugs")]
        planted_bug: Default::default(),
    });
    m.set_peer_window(window);
    m
}

/// How the receiving side's consumer drains what it is given.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Reader {
    /// Drains every byte as it arrives.
    Fast,
    /// Never drains.
    Stuck,
    /// Drains at most this many bytes per flow every period.
    Paced(usize, Duration),
}

struct Wan {
    now: Instant,
    delay: Duration,
    sender: FlowMux,
    receiver: FlowMux,
    /// Frames on the wire: (arrival, towards the receiver?, frame).
    wire: VecDeque<(Instant, bool, FlowFrame)>,
    /// Bytes the receiver got, with when.
    arrivals: Vec<(Instant, usize)>,
    reader: Reader,
    cids: Vec<Cid>,
    /// A sender at its own pace: this many bytes per flow every period (when
    /// credit allows); `None`: all the credit allows, at once.
    pace: Option<(usize, Duration)>,
    next_tick: Option<Instant>,
    /// Bytes delivered and not yet drained, per flow (a paced reader's).
    backlog: Vec<usize>,
    next_read: Option<Instant>,
}

impl Wan {
    fn new(delay: Duration, window: u32, max_window: u32, flows: u64, reader: Reader) -> Self {
        let mut w = Wan {
            now: common::origin(),
            delay,
            sender: mux(window, max_window),
            receiver: mux(window, max_window),
            wire: VecDeque::new(),
            arrivals: Vec::new(),
            reader,
            cids: (1..=flows).map(Cid).collect(),
            pace: None,
            next_tick: None,
            backlog: vec![0; flows as usize + 1],
            next_read: None,
        };
        for &cid in &w.cids {
            w.sender.open(cid).unwrap();
            w.receiver.open(cid).unwrap();
        }
        // What the link's pings measure.
        w.receiver.set_path_rtt(2 * delay);
        w
    }

    /// As [`Wan::new`], with the link's pings measuring `path_rtt` instead
    /// (`None`: no ping answered yet).
    fn with_path_rtt(
        delay: Duration,
        path_rtt: Option<Duration>,
        window: u32,
        max_window: u32,
    ) -> Self {
        let mut w = Wan::new(delay, window, max_window, 1, Reader::Fast);
        w.receiver = mux(window, max_window);
        w.receiver.open(Cid(1)).unwrap();
        if let Some(r) = path_rtt {
            w.receiver.set_path_rtt(r);
        }
        w
    }

    /// Send as much as every flow's credit allows, in chunks (paced: one
    /// step's worth, and only on a tick).
    fn send(&mut self, tick: bool) {
        if self.pace.is_some() && !tick {
            return;
        }
        for &cid in &self.cids {
            let mut budget = self.pace.map_or(usize::MAX, |(n, _)| n);
            loop {
                let n = (self.sender.send_credit(cid) as usize)
                    .min(CHUNK)
                    .min(budget);
                if n == 0 {
                    break;
                }
                budget -= n;
                self.sender
                    .send_data(cid, Bytes::from(vec![7u8; n]))
                    .unwrap();
            }
        }
        while let Some(f) = self.sender.poll_frame() {
            self.wire.push_back((self.now + self.delay, true, f));
        }
    }

    /// A paced reader's tick: drain up to its step from every flow.
    fn drain(&mut self) {
        let Reader::Paced(step, _) = self.reader else {
            return;
        };
        for &cid in &self.cids {
            let n = self.backlog[cid.0 as usize].min(step);
            if n > 0 {
                self.backlog[cid.0 as usize] -= n;
                self.receiver.consumed(cid, n);
            }
        }
        while let Some(f) = self.receiver.poll_frame() {
            self.wire.push_back((self.now + self.delay, false, f));
        }
    }

    /// Run the transfer for `secs` of virtual time.
    fn run(&mut self, secs: f64) {
        let end = self.now + Duration::from_secs_f64(secs);
        self.send(true);
        loop {
            let wire = self.wire.front().map(|(at, _, _)| *at);
            let tick = self
                .pace
                .map(|(_, p)| *self.next_tick.get_or_insert(self.now + p));
            let read = match self.reader {
                Reader::Paced(_, p) => Some(*self.next_read.get_or_insert(self.now + p)),
                _ => None,
            };
            let Some(at) = [wire, tick, read].into_iter().flatten().min() else {
                break;
            };
            if at > end {
                break;
            }
            self.now = at;
            if wire != Some(at) {
                if tick == Some(at) {
                    self.next_tick = None;
                    self.send(true);
                }
                if read == Some(at) {
                    self.next_read = None;
                    self.drain();
                }
                continue;
            }
            let (_, to_receiver, frame) = self.wire.pop_front().unwrap();
            if to_receiver {
                self.receiver.on_frame(frame, self.now);
                while let Some(e) = self.receiver.poll_event() {
                    match e {
                        FlowEvent::Data { cid, payload } => {
                            self.arrivals.push((self.now, payload.len()));
                            match self.reader {
                                Reader::Fast => self.receiver.consumed(cid, payload.len()),
                                Reader::Paced(..) => self.backlog[cid.0 as usize] += payload.len(),
                                Reader::Stuck => {}
                            }
                        }
                        FlowEvent::Reset { code, reason, .. } => {
                            panic!("flow reset: {code} {reason}")
                        }
                        _ => {}
                    }
                }
                while let Some(f) = self.receiver.poll_frame() {
                    self.wire.push_back((self.now + self.delay, false, f));
                }
            } else {
                self.sender.on_frame(frame, self.now);
                while let Some(e) = self.sender.poll_event() {
                    if let FlowEvent::Reset { code, reason, .. } = e {
                        panic!("flow reset: {code} {reason}");
                    }
                }
                self.send(false);
            }
        }
    }

    /// Bytes per second the receiver got over the last `secs` before now.
    fn rate_over_last(&self, secs: f64) -> f64 {
        let from = self.now - Duration::from_secs_f64(secs);
        let n: usize = self
            .arrivals
            .iter()
            .filter(|(t, _)| *t > from)
            .map(|(_, n)| n)
            .sum();
        n as f64 / secs
    }

    fn window(&self, cid: Cid) -> u32 {
        self.receiver.flow(cid).unwrap().local_window()
    }
}

#[test]
fn a_flow_window_doubles_up_to_its_maximum_across_a_long_round_trip() {
    // 20 ms round trip: 256 KiB allows 12.5 MiB/s, 4 MiB 200 MiB/s.
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        4 * MIB,
        1,
        Reader::Fast,
    );
    w.run(0.2);
    assert!(
        w.window(Cid(1)) > 256 * KIB,
        "no growth after 10 round trips"
    );
    w.run(2.0);
    assert_eq!(w.window(Cid(1)), 4 * MIB, "stops at the maximum");
    // 256 KiB → 512 KiB → 1 MiB → 2 MiB → 4 MiB.
    assert_eq!(w.receiver.stats.windows_grown, 4);
    assert_eq!(w.receiver.window_growth(), u64::from(4 * MIB - 256 * KIB));
    let rate = w.rate_over_last(1.0) / f64::from(MIB);
    assert!(
        (190.0..=200.5).contains(&rate),
        "{rate:.1} MiB/s, expected the maximum window per round trip (200)"
    );
    assert_eq!(w.receiver.stats.protocol_violations, 0);
    assert_eq!(w.sender.stats.protocol_violations, 0);
}

#[test]
fn without_growth_a_flow_moves_one_window_per_round_trip() {
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        256 * KIB,
        1,
        Reader::Fast,
    );
    w.run(2.0);
    assert_eq!(w.window(Cid(1)), 256 * KIB);
    assert_eq!(w.receiver.stats.windows_grown, 0);
    let rate = w.rate_over_last(1.0) / f64::from(MIB);
    assert!(
        (12.0..=12.6).contains(&rate),
        "{rate:.2} MiB/s, expected 12.5"
    );
}

#[test]
fn a_short_round_trip_leaves_the_window_as_configured() {
    // 0.4 ms round trip: every wait for credit is under the 1 ms that counts
    // (even with pings that claimed a long path).
    let mut w = Wan::with_path_rtt(
        Duration::from_micros(200),
        Some(Duration::from_millis(5)),
        256 * KIB,
        4 * MIB,
    );
    w.run(1.0);
    assert_eq!(w.window(Cid(1)), 256 * KIB);
    assert_eq!(w.receiver.stats.windows_grown, 0);
    assert!(w.rate_over_last(0.5) > 500.0 * f64::from(MIB));
}

#[test]
fn a_reader_that_does_not_drain_never_grows_its_window() {
    let mut w = Wan::new(
        Duration::from_millis(25),
        256 * KIB,
        4 * MIB,
        1,
        Reader::Stuck,
    );
    w.run(2.0);
    assert_eq!(w.window(Cid(1)), 256 * KIB);
    // It got exactly one window and holds it; the sender waits.
    let got: usize = w.arrivals.iter().map(|(_, n)| n).sum();
    assert_eq!(got, 256 * KIB as usize);
    assert_eq!(w.sender.send_credit(Cid(1)), 0);
}

#[test]
fn the_growth_of_all_flows_of_a_link_is_bounded_and_returned_when_they_end() {
    let flows = GROWTH_BUDGET_WINDOWS + 4;
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        4 * MIB,
        flows,
        Reader::Fast,
    );
    w.run(3.0);
    let budget = GROWTH_BUDGET_WINDOWS * u64::from(4 * MIB);
    let growth: u64 = w
        .cids
        .iter()
        .map(|&c| u64::from(w.window(c) - 256 * KIB))
        .sum();
    assert_eq!(growth, w.receiver.window_growth());
    assert!(growth <= budget, "{growth} above the budget {budget}");
    assert!(growth > budget / 2, "the flows grew by only {growth}");
    // Ending flows returns their growth, so that others may grow again.
    for &cid in &w.cids.clone()[..4] {
        assert!(
            w.receiver
                .reset(cid, nowconnect_core::ErrorCode::ConnectionReset, "done")
        );
    }
    let left: u64 = w.cids[4..]
        .iter()
        .map(|&c| u64::from(w.window(c) - 256 * KIB))
        .sum();
    assert_eq!(w.receiver.window_growth(), left);
}

/// A sender of `step` bytes every `period` across a 20 ms round trip, with
/// windows of 256 KiB growing to 4 MiB, run for 3 s.
fn paced(step: u32, period: Duration) -> Wan {
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        4 * MIB,
        1,
        Reader::Fast,
    );
    w.pace = Some((step as usize, period));
    w.run(3.0);
    w
}

#[test]
fn a_sender_that_keeps_credit_in_hand_does_not_grow_the_window() {
    // 64 KiB every 25 ms (2.5 MiB/s) over a 20 ms round trip: bursts and
    // pauses, but never out of credit.
    let w = paced(64 * KIB, Duration::from_millis(25));
    assert_eq!(w.window(Cid(1)), 256 * KIB);
    assert_eq!(w.receiver.stats.windows_grown, 0);
    let rate = w.rate_over_last(2.0) / f64::from(MIB);
    assert!((2.4..=2.6).contains(&rate), "{rate:.2} MiB/s, expected 2.5");
}

#[test]
fn a_sender_paced_just_above_the_window_per_round_trip_grows_it() {
    // 256 KiB every 15 ms wants 16.7 MiB/s; 256 KiB per 20 ms round trip
    // allows 12.5: the sender runs out of credit and waits.
    let w = paced(256 * KIB, Duration::from_millis(15));
    assert!(w.window(Cid(1)) > 256 * KIB);
    let rate = w.rate_over_last(2.0) / f64::from(MIB);
    assert!(
        (16.0..=17.2).contains(&rate),
        "{rate:.2} MiB/s, expected 16.7"
    );
}

#[test]
fn long_waits_on_a_short_path_or_before_any_ping_do_not_grow_the_window() {
    // Waits of 20 ms, as when a busy machine does not run the process, but
    // the link's pings have seen 0.2 ms: no growth. Nor before any ping.
    for path_rtt in [Some(Duration::from_micros(200)), None] {
        let mut w = Wan::with_path_rtt(Duration::from_millis(10), path_rtt, 256 * KIB, 4 * MIB);
        w.run(1.0);
        assert_eq!(w.window(Cid(1)), 256 * KIB, "path {path_rtt:?}");
        assert_eq!(w.receiver.stats.windows_grown, 0);
    }
    // The shortest ping is what counts: a later, slower one does not allow it.
    let mut w = Wan::with_path_rtt(
        Duration::from_millis(10),
        Some(Duration::from_micros(200)),
        256 * KIB,
        4 * MIB,
    );
    w.receiver.set_path_rtt(Duration::from_millis(30));
    w.run(1.0);
    assert_eq!(w.window(Cid(1)), 256 * KIB);
}

#[test]
fn a_reader_that_drains_slowly_does_not_grow_the_window() {
    // 64 KiB every 20 ms (3.1 MiB/s) over a 20 ms round trip, where the
    // 256 KiB window allows 12.5 MiB/s: the reader, not the window, holds
    // the sender back, and a bigger window would only fill the receiver.
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        4 * MIB,
        1,
        Reader::Paced(64 * KIB as usize, Duration::from_millis(20)),
    );
    w.run(3.0);
    assert_eq!(w.window(Cid(1)), 256 * KIB);
    assert_eq!(w.receiver.stats.windows_grown, 0);
    let rate = w.rate_over_last(2.0) / f64::from(MIB);
    assert!((3.0..=3.2).contains(&rate), "{rate:.2} MiB/s, expected 3.1");
    // A reader as fast as the window allows lets it grow.
    let mut w = Wan::new(
        Duration::from_millis(10),
        256 * KIB,
        4 * MIB,
        1,
        Reader::Paced(256 * KIB as usize, Duration::from_millis(5)),
    );
    w.run(3.0);
    assert!(
        w.window(Cid(1)) > 256 * KIB,
        "a 50 MiB/s reader held to one window per round trip"
    );
}
