//! `chaos netem`: delay, jitter and reordering for the packets an NFQUEUE
//! rule hands over (this kernel has no `sch_netem`). Run inside a lab
//! namespace; each packet is held `delay ± jitter` (uniform), and
//! `reorder`% of them go at once (ahead of held ones), as netem's
//! `reorder` does. When stdin closes every held packet is let go and the
//! program ends, so healing never drops what is in flight.

use std::collections::BinaryHeap;
use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

struct Held {
    at: Instant,
    seq: u64,
    msg: nfq::Message,
}

impl PartialEq for Held {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Held {
    // Earliest release first (BinaryHeap is a max-heap).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

pub struct Params {
    pub queue: u16,
    pub delay: Duration,
    pub jitter: Duration,
    pub reorder_pct: u32,
    pub seed: u64,
}

pub fn run(p: Params) -> Result<(), String> {
    let mut q = nfq::Queue::open().map_err(|e| format!("nfqueue open: {e}"))?;
    q.bind(p.queue)
        .map_err(|e| format!("nfqueue bind {}: {e}", p.queue))?;
    // Metadata only: the verdict refers to the packet by id.
    q.set_copy_range(p.queue, 0)
        .map_err(|e| format!("nfqueue copy range: {e}"))?;
    q.set_queue_max_len(p.queue, 65536)
        .map_err(|e| format!("nfqueue max len: {e}"))?;
    q.set_fail_open(p.queue, true)
        .map_err(|e| format!("nfqueue fail open: {e}"))?;
    q.set_nonblocking(true);
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        s2.store(true, Ordering::SeqCst);
    });
    println!(
        "chaos netem queue={} delay={:?} jitter={:?} reorder={}%",
        p.queue, p.delay, p.jitter, p.reorder_pct
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed);
    let mut held: BinaryHeap<Held> = BinaryHeap::new();
    let mut seq = 0u64;
    let (mut passed, mut max_held) = (0u64, 0usize);
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut got = 0;
        while got < 4096 {
            match q.recv() {
                Ok(mut msg) => {
                    got += 1;
                    let now = Instant::now();
                    if stopping || rng.random_range(0..100) < p.reorder_pct {
                        msg.set_verdict(nfq::Verdict::Accept);
                        q.verdict(msg).map_err(|e| format!("verdict: {e}"))?;
                        passed += 1;
                        continue;
                    }
                    let j = p.jitter.as_micros() as i64;
                    let off = if j > 0 { rng.random_range(-j..=j) } else { 0 };
                    let d = (p.delay.as_micros() as i64 + off).max(0) as u64;
                    seq += 1;
                    held.push(Held {
                        at: now + Duration::from_micros(d),
                        seq,
                        msg,
                    });
                    max_held = max_held.max(held.len());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("nfqueue recv: {e}")),
            }
        }
        let now = Instant::now();
        while held.peek().is_some_and(|h| stopping || h.at <= now) {
            let mut h = held.pop().expect("peeked");
            h.msg.set_verdict(nfq::Verdict::Accept);
            q.verdict(h.msg).map_err(|e| format!("verdict: {e}"))?;
            passed += 1;
        }
        if stopping && held.is_empty() {
            println!("chaos netem done passed={passed} max_held={max_held}");
            return Ok(());
        }
        if got == 0 {
            let until = held.peek().map_or(Duration::from_millis(1), |h| {
                h.at.saturating_duration_since(now)
            });
            std::thread::sleep(until.min(Duration::from_millis(1)));
        }
    }
}
