//! Hash-checked streams: the target server (run in the target's namespace)
//! and the client side of a flow (run by the harness), with the check that
//! every byte a client receives is exactly the next byte the target sent.
//!
//! A flow starts with a 16-byte header from the client: `NCX1`, the mode,
//! three zero bytes, then a 64-bit seed (little endian). The byte stream of
//! a seed is [`Gen`], so both ends know every byte without storing it.
//! - `ECHO`: the target returns every byte; the client sends `Gen(seed)`
//!   and must read back exactly what it sent, in order.
//! - `SOURCE`: the target sends `Gen(seed)` until the client leaves; the
//!   client checks every byte (target → client).
//! - `SINK`: the client sends `Gen(seed)`; the target checks every byte
//!   (client → target) and reports the count verified as 8-byte numbers
//!   (after every 64 KiB and at the client's end of stream), or
//!   `u64::MAX` at the first wrong byte.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const MAGIC: &[u8; 4] = b"NCX1";
pub const ECHO: u8 = 0;
pub const SOURCE: u8 = 1;
pub const SINK: u8 = 2;
const REPORT_EVERY: u64 = 64 * 1024;

/// The byte stream of a seed (xorshift64*): cheap, and the same on both ends.
pub struct Gen {
    state: u64,
    buf: [u8; 8],
    used: usize,
}

impl Gen {
    pub fn new(seed: u64) -> Gen {
        Gen {
            state: seed | 1,
            buf: [0; 8],
            used: 8,
        }
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for b in out {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.buf = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *b = self.buf[self.used];
            self.used += 1;
        }
    }

    /// Compare `got` with the next bytes of the stream: the index of the
    /// first byte that differs, if one does.
    pub fn check(&mut self, got: &[u8]) -> Option<usize> {
        let mut want = [0u8; 4096];
        let mut at = 0;
        while at < got.len() {
            let n = (got.len() - at).min(want.len());
            self.fill(&mut want[..n]);
            if let Some(i) = (0..n).find(|&i| got[at + i] != want[i]) {
                return Some(at + i);
            }
            at += n;
        }
        None
    }
}

/// The flow header; `rate` (bytes/s, in KiB steps up to 16 GiB/s) paces
/// what the target sends in `SOURCE` mode.
pub fn header(mode: u8, seed: u64, rate: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(MAGIC);
    h[4] = mode;
    let kib = (rate / 1024).min(0xff_ffff) as u32;
    h[5..8].copy_from_slice(&kib.to_le_bytes()[..3]);
    h[8..].copy_from_slice(&seed.to_le_bytes());
    h
}

/// The target: serves every connection on its own thread until killed.
pub fn serve_target(bind: SocketAddr) -> ! {
    let listener = TcpListener::bind(bind).unwrap_or_else(|e| panic!("bind {bind}: {e}"));
    println!("chaos target listening {bind}");
    for conn in listener.incoming() {
        let Ok(s) = conn else { continue };
        std::thread::spawn(move || serve_one(s));
    }
    unreachable!("incoming() never ends")
}

fn serve_one(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    // A connection stuck for a minute is gone (its flow was reset).
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
    let mut h = [0u8; 16];
    if s.read_exact(&mut h).is_err() || &h[..4] != MAGIC {
        return;
    }
    let seed = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
    let mut buf = vec![0u8; 64 * 1024];
    match h[4] {
        ECHO => loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = s.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        },
        SOURCE => {
            let mut reader = s.try_clone().expect("clone");
            // The client's leaving ends the stream: a reader notices it.
            std::thread::spawn(move || {
                let mut sink = [0u8; 1024];
                while matches!(reader.read(&mut sink), Ok(n) if n > 0) {}
                let _ = reader.shutdown(Shutdown::Both);
            });
            let rate = u64::from(u32::from_le_bytes([h[5], h[6], h[7], 0])).max(1) * 1024;
            let start = Instant::now();
            let mut g = Gen::new(seed);
            let mut sent = 0u64;
            loop {
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                g.fill(&mut buf[..16 * 1024]);
                if s.write_all(&buf[..16 * 1024]).is_err() {
                    return;
                }
                sent += 16 * 1024;
            }
        }
        SINK => {
            let mut g = Gen::new(seed);
            let (mut ok, mut reported) = (0u64, 0u64);
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        let _ = s.write_all(&ok.to_le_bytes());
                        let _ = s.shutdown(Shutdown::Write);
                        return;
                    }
                    Err(_) => return,
                    Ok(n) => {
                        if g.check(&buf[..n]).is_some() {
                            let _ = s.write_all(&u64::MAX.to_le_bytes());
                            return;
                        }
                        ok += n as u64;
                        if ok - reported >= REPORT_EVERY {
                            reported = ok;
                            if s.write_all(&ok.to_le_bytes()).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}

/// How a flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Every byte arrived and the flow closed cleanly.
    Intact,
    /// Closed or reset early; what arrived was checked and right.
    Reset(String),
    /// The tunnel could not be reached (connect refused or timed out, or
    /// closed before the first byte): not a flow, an unavailability.
    NotOpened(String),
    /// A byte was wrong, missing, repeated or out of order.
    Corrupt(String),
    /// No progress for longer than the bound, and not closed.
    Hung(String),
}

/// What one flow did, for the checker.
#[derive(Debug, Clone)]
pub struct FlowRecord {
    pub hub: usize,
    pub mode: u8,
    pub seed: u64,
    /// Bytes checked (received and right, or confirmed by the target).
    pub checked: u64,
    pub end: End,
}

/// A client flow to make: through `addr` (hub `hub`) in `mode` for `life`,
/// sending at most `rate` bytes per second; `hang` bounds the time without
/// progress.
pub struct FlowSpec {
    pub hub: usize,
    pub addr: SocketAddr,
    pub mode: u8,
    pub seed: u64,
    pub life: Duration,
    pub rate: u64,
    pub hang: Duration,
}

pub fn run_flow(spec: FlowSpec, checked_total: &AtomicU64) -> FlowRecord {
    let FlowSpec {
        hub,
        addr,
        mode,
        seed,
        life,
        rate,
        hang,
    } = spec;
    let started = Instant::now();
    let rec = |checked, end| FlowRecord {
        hub,
        mode,
        seed,
        checked,
        end,
    };
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => return rec(0, End::NotOpened(format!("connect: {e}"))),
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
    if s.write_all(&header(mode, seed, rate)).is_err() {
        return rec(0, End::NotOpened("header not sent".into()));
    }
    let flow = Flow {
        s,
        mode,
        seed,
        life,
        rate,
        hang,
        started,
        checked_total,
    };
    let (checked, end) = flow.run();
    rec(checked, end)
}

struct Flow<'a> {
    s: TcpStream,
    mode: u8,
    seed: u64,
    life: Duration,
    rate: u64,
    hang: Duration,
    started: Instant,
    checked_total: &'a AtomicU64,
}

impl Flow<'_> {
    /// One loop for every mode: send while the mode sends and the life
    /// lasts, read and check what comes back, then end the stream and
    /// expect the rest.
    fn run(mut self) -> (u64, End) {
        let sends = self.mode != SOURCE;
        let mut out_gen = Gen::new(self.seed);
        let mut in_gen = Gen::new(self.seed);
        let mut out = vec![0u8; 16 * 1024];
        let mut inbuf = vec![0u8; 64 * 1024];
        let (mut sent, mut received, mut confirmed) = (0u64, 0u64, 0u64);
        // Bytes generated and not yet written: `pending[at..]`.
        let mut pending: Vec<u8> = Vec::new();
        let mut at = 0usize;
        let mut last_progress = Instant::now();
        let mut finishing = false;
        let mut was_finishing = false;
        let mut report = [0u8; 8];
        let mut report_len = 0;
        let checked = |received: u64, confirmed: u64, mode: u8| match mode {
            SINK => confirmed,
            _ => received,
        };
        loop {
            let now = Instant::now();
            let age = now - self.started;
            if !finishing && age >= self.life {
                if self.mode == SOURCE {
                    // The client leaves once bytes are moving (a flow
                    // stalled at its end goes on until they move again or
                    // it counts as hung).
                    if last_progress.elapsed() < Duration::from_secs(1) {
                        let _ = self.s.shutdown(Shutdown::Both);
                        return (received, End::Intact);
                    }
                } else {
                    finishing = true;
                }
            }
            if finishing && !was_finishing {
                was_finishing = true;
                if at == pending.len() {
                    let _ = self.s.shutdown(Shutdown::Write);
                }
            }
            // Send, paced to the rate.
            if sends && !finishing || at < pending.len() {
                if at == pending.len() {
                    let allowed = (self.rate as f64 * age.as_secs_f64()) as u64;
                    if sent < allowed {
                        let n = ((allowed - sent) as usize).min(out.len());
                        out_gen.fill(&mut out[..n]);
                        pending.clear();
                        pending.extend_from_slice(&out[..n]);
                        at = 0;
                    }
                }
                if at < pending.len() {
                    match self.s.write(&pending[at..]) {
                        Ok(n) => {
                            sent += n as u64;
                            at += n;
                            last_progress = now;
                            if finishing && at == pending.len() {
                                let _ = self.s.shutdown(Shutdown::Write);
                            }
                        }
                        Err(e) if is_timeout(&e) => {}
                        Err(e) => {
                            return (
                                checked(received, confirmed, self.mode),
                                End::Reset(format!("write: {e}")),
                            );
                        }
                    }
                }
            }
            // Read and check; briefly while there is more to send.
            let more = sends && !finishing || at < pending.len();
            let _ =
                self.s
                    .set_read_timeout(Some(Duration::from_millis(if more { 2 } else { 100 })));
            match self.s.read(&mut inbuf) {
                Ok(0) => {
                    let c = checked(received, confirmed, self.mode);
                    let done = match self.mode {
                        ECHO => finishing && at == pending.len() && received == sent,
                        SINK => finishing && at == pending.len() && confirmed == sent,
                        _ => false,
                    };
                    return if done {
                        (c, End::Intact)
                    } else {
                        (c, End::Reset(format!("closed after {c} bytes")))
                    };
                }
                Ok(n) => {
                    last_progress = Instant::now();
                    match self.mode {
                        SINK => {
                            for &b in &inbuf[..n] {
                                report[report_len] = b;
                                report_len += 1;
                                if report_len == 8 {
                                    report_len = 0;
                                    let v = u64::from_le_bytes(report);
                                    if v == u64::MAX {
                                        return (
                                            confirmed,
                                            End::Corrupt(format!(
                                                "the target found a wrong byte after {confirmed} confirmed"
                                            )),
                                        );
                                    }
                                    if v < confirmed || v > sent {
                                        return (
                                            confirmed,
                                            End::Corrupt(format!(
                                                "the target confirmed {v} bytes after {confirmed}, {sent} sent"
                                            )),
                                        );
                                    }
                                    self.checked_total
                                        .fetch_add(v - confirmed, Ordering::Relaxed);
                                    confirmed = v;
                                }
                            }
                        }
                        _ => {
                            if self.mode == ECHO && received + n as u64 > sent {
                                return (
                                    received,
                                    End::Corrupt(format!(
                                        "{} bytes echoed, {sent} sent",
                                        received + n as u64
                                    )),
                                );
                            }
                            if let Some(i) = in_gen.check(&inbuf[..n]) {
                                return (
                                    received,
                                    End::Corrupt(format!(
                                        "byte {} differs from what the target sent",
                                        received + i as u64
                                    )),
                                );
                            }
                            received += n as u64;
                            self.checked_total.fetch_add(n as u64, Ordering::Relaxed);
                        }
                    }
                }
                Err(e) if is_timeout(&e) => {}
                Err(e) => {
                    return (
                        checked(received, confirmed, self.mode),
                        End::Reset(format!("read: {e}")),
                    );
                }
            }
            if last_progress.elapsed() > self.hang {
                let _ = self.s.shutdown(Shutdown::Both);
                return (
                    checked(received, confirmed, self.mode),
                    End::Hung(format!(
                        "no byte moved for {:?} ({sent} sent, {received} received, {confirmed} confirmed)",
                        self.hang
                    )),
                );
            }
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A short echo through `addr`: connect, 1 KiB there and back within
/// `within`. Ok when every byte came back right; Err says what failed
/// (`wrong:` for a wrong byte, which is a violation, not an outage).
pub fn probe(addr: SocketAddr, seed: u64, within: Duration) -> Result<(), String> {
    let end = Instant::now() + within;
    let mut s = TcpStream::connect_timeout(&addr, within).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_nodelay(true);
    let left = end
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(10));
    let _ = s.set_read_timeout(Some(left));
    let _ = s.set_write_timeout(Some(left));
    let mut msg = vec![0u8; 1024];
    Gen::new(seed).fill(&mut msg);
    let mut all = header(ECHO, seed, 0).to_vec();
    all.extend_from_slice(&msg);
    s.write_all(&all).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; msg.len()];
    let mut got = 0;
    while got < back.len() {
        match s.read(&mut back[got..]) {
            Ok(0) => return Err(format!("closed after {got} bytes")),
            Ok(n) => got += n,
            Err(e) => return Err(format!("read: {e}")),
        }
        if let Some(i) = (0..got).find(|&i| back[i] != msg[i]) {
            return Err(format!("wrong: byte {i} of a probe differs"));
        }
    }
    Ok(())
}

/// The checker must catch what it claims to: each test puts a relay that
/// misbehaves in one precise way between a client flow and the real
/// target code, and expects the verdict.
#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                std::thread::spawn(move || serve_one(c));
            }
        });
        a
    }

    #[derive(Clone, Copy)]
    enum Harm {
        None,
        /// Flip the byte at this offset (target → client, or the other way).
        Flip {
            down: bool,
            at: u64,
        },
        /// Leave out the byte at this offset (target → client).
        Skip {
            at: u64,
        },
        /// Send the first 100 bytes at this offset twice (target → client).
        Repeat {
            at: u64,
        },
        /// Stop passing bytes on after this many (target → client), and
        /// hold the connection open.
        Stall {
            after: u64,
        },
        /// Close both ways after this many bytes (target → client).
        Close {
            after: u64,
        },
    }

    /// A relay on loopback in front of `to` that does `harm`.
    fn relay(to: SocketAddr, harm: Harm) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let t = TcpStream::connect(to).unwrap();
                let (c2, t2) = (c.try_clone().unwrap(), t.try_clone().unwrap());
                let up = matches!(harm, Harm::Flip { down: false, .. });
                std::thread::spawn(move || pass(c2, t2, if up { harm } else { Harm::None }));
                std::thread::spawn(move || pass(t, c, if up { Harm::None } else { harm }));
            }
        });
        a
    }

    fn pass(mut from: TcpStream, mut to: TcpStream, harm: Harm) {
        let mut buf = vec![0u8; 8192];
        let mut off = 0u64;
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => n,
            };
            let mut chunk = buf[..n].to_vec();
            let range = off..off + n as u64;
            match harm {
                Harm::Flip { at, .. } if range.contains(&at) => {
                    chunk[(at - off) as usize] ^= 0x55;
                }
                Harm::Skip { at } if range.contains(&at) => {
                    chunk.remove((at - off) as usize);
                }
                Harm::Repeat { at } if range.contains(&at) => {
                    let i = (at - off) as usize;
                    let dup: Vec<u8> = chunk[i..(i + 100).min(n)].to_vec();
                    chunk.splice(i..i, dup);
                }
                Harm::Stall { after } if off + n as u64 > after => {
                    let keep = (after.saturating_sub(off)) as usize;
                    let _ = to.write_all(&chunk[..keep]);
                    std::thread::sleep(Duration::from_secs(30));
                    return;
                }
                Harm::Close { after } if off + n as u64 > after => {
                    let keep = (after.saturating_sub(off)) as usize;
                    let _ = to.write_all(&chunk[..keep]);
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                _ => {}
            }
            off += n as u64;
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
    }

    fn flow(mode: u8, harm: Harm) -> FlowRecord {
        flow_for(mode, harm, Duration::from_millis(600))
    }

    /// A flow of `life` at 2 MiB/s that hangs after 1 s without progress.
    fn flow_for(mode: u8, harm: Harm, life: Duration) -> FlowRecord {
        let addr = relay(target(), harm);
        let total = AtomicU64::new(0);
        run_flow(
            FlowSpec {
                hub: 0,
                addr,
                mode,
                seed: 42,
                life,
                rate: 2 * 1024 * 1024,
                hang: Duration::from_secs(1),
            },
            &total,
        )
    }

    fn corrupt(r: &FlowRecord) -> bool {
        matches!(r.end, End::Corrupt(_))
    }

    #[test]
    fn clean_paths_end_intact_in_every_mode() {
        for mode in [ECHO, SOURCE, SINK] {
            let r = flow(mode, Harm::None);
            assert_eq!(r.end, End::Intact, "mode {mode}");
            assert!(
                r.checked > 100_000,
                "mode {mode}: {} bytes checked",
                r.checked
            );
        }
    }

    #[test]
    fn a_flipped_byte_is_caught_in_each_direction() {
        let down = Harm::Flip {
            down: true,
            at: 5000,
        };
        let up = Harm::Flip {
            down: false,
            at: 16 + 5000,
        };
        assert!(corrupt(&flow(ECHO, down)), "echo, target → client");
        assert!(corrupt(&flow(SOURCE, down)), "source");
        assert!(corrupt(&flow(ECHO, up)), "echo, client → target");
        assert!(corrupt(&flow(SINK, up)), "sink (the target finds it)");
    }

    #[test]
    fn a_missing_or_repeated_byte_is_caught() {
        assert!(corrupt(&flow(SOURCE, Harm::Skip { at: 7000 })));
        assert!(corrupt(&flow(ECHO, Harm::Skip { at: 7000 })));
        assert!(corrupt(&flow(SOURCE, Harm::Repeat { at: 7000 })));
        assert!(corrupt(&flow(ECHO, Harm::Repeat { at: 7000 })));
    }

    #[test]
    fn a_stalled_flow_is_a_hang() {
        for mode in [ECHO, SOURCE] {
            let r = flow_for(mode, Harm::Stall { after: 20_000 }, Duration::from_secs(3));
            assert!(matches!(r.end, End::Hung(_)), "mode {mode}: {:?}", r.end);
        }
        // A stall outlasting the bound is a hang, also in a flow whose
        // life is almost over (it is never called intact).
        let r = flow_for(
            SOURCE,
            Harm::Stall { after: 20_000 },
            Duration::from_millis(1500),
        );
        assert!(matches!(r.end, End::Hung(_)), "{:?}", r.end);
    }

    #[test]
    fn an_early_close_is_a_reset_with_its_bytes_checked() {
        let r = flow(SOURCE, Harm::Close { after: 30_000 });
        assert!(matches!(r.end, End::Reset(_)), "{:?}", r.end);
        assert_eq!(r.checked, 30_000);
        let r = flow(ECHO, Harm::Close { after: 30_000 });
        assert!(matches!(r.end, End::Reset(_)), "{:?}", r.end);
    }

    #[test]
    fn probes_catch_a_wrong_byte() {
        let t = target();
        assert!(probe(t, 9, Duration::from_secs(2)).is_ok());
        let bad = relay(
            t,
            Harm::Flip {
                down: true,
                at: 100,
            },
        );
        let e = probe(bad, 9, Duration::from_secs(2)).unwrap_err();
        assert!(e.starts_with("wrong:"), "{e}");
    }
}
