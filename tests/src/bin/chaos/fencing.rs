//! No flow is carried by a fenced tunnel: Redis (read only, as any holder
//! of a read credential could) is polled for the owner record of every
//! agent slot, and every flow a hub opens on a tunnel, locally or for a
//! mesh peer, is taken from the hubs' logs (`flow opened` and `mesh flow
//! opened`, at debug level, with the tunnel; `agent tunnel established`
//! gives each tunnel's agent and epoch). A flow opened on a tunnel whose
//! slot Redis had already given a newer epoch for longer than the bound is
//! a violation.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cluster::AGENTS;

/// (agent, slot) → every (first seen, unix ms; epoch) Redis showed, in order.
pub type Owners = Arc<Mutex<BTreeMap<(String, u8), Vec<(u64, u64)>>>>;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Poll the owner keys every 100 ms until `stop`.
pub fn poll_owners(redis: SocketAddr, owners: Owners, stop: Arc<AtomicBool>) {
    let keys: Vec<(String, u8, String)> = AGENTS
        .iter()
        .flat_map(|a| {
            [
                (a.to_string(), 0, format!("nowconnect:agent:{a}:owner")),
                (a.to_string(), 1, format!("nowconnect:agent:{a}:owner:1")),
            ]
        })
        .collect();
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if conn.is_none() {
            conn = TcpStream::connect_timeout(&redis, Duration::from_millis(300))
                .ok()
                .inspect(|s| {
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                });
        }
        let Some(s) = conn.as_mut() else { continue };
        let names: Vec<&str> = keys.iter().map(|k| k.2.as_str()).collect();
        match mget(s, &names) {
            Ok(values) => {
                let t = now_ms();
                let mut o = owners.lock().expect("owners lock");
                for ((agent, slot, _), v) in keys.iter().zip(values) {
                    let Some(epoch) = v
                        .as_deref()
                        .and_then(|v| v.rsplit_once('|'))
                        .and_then(|(_, e)| e.parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let h = o.entry((agent.clone(), *slot)).or_default();
                    if h.last().is_none_or(|(_, e)| *e != epoch) {
                        h.push((t, epoch));
                    }
                }
            }
            Err(_) => conn = None,
        }
    }
}

/// `MGET` over RESP: each value, or `None` for a missing key.
fn mget(s: &mut TcpStream, keys: &[&str]) -> std::io::Result<Vec<Option<String>>> {
    let mut req = format!("*{}\r\n$4\r\nMGET\r\n", keys.len() + 1);
    for k in keys {
        req += &format!("${}\r\n{k}\r\n", k.len());
    }
    s.write_all(req.as_bytes())?;
    let mut r = Resp { s, buf: Vec::new() };
    let head = r.line()?;
    let n: usize = head
        .strip_prefix('*')
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad(&head))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let l = r.line()?;
        let len: i64 = l
            .strip_prefix('$')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| bad(&l))?;
        if len < 0 {
            out.push(None);
        } else {
            let v = r.take(len as usize + 2)?;
            out.push(Some(
                String::from_utf8_lossy(&v[..len as usize]).into_owned(),
            ));
        }
    }
    Ok(out)
}

fn bad(line: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unexpected reply {line:?}"),
    )
}

struct Resp<'a> {
    s: &'a mut TcpStream,
    buf: Vec<u8>,
}

impl Resp<'_> {
    fn fill(&mut self) -> std::io::Result<()> {
        let mut b = [0u8; 4096];
        let n = self.s.read(&mut b)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&b[..n]);
        Ok(())
    }

    fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(l);
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> std::io::Result<Vec<u8>> {
        while self.buf.len() < n {
            self.fill()?;
        }
        Ok(self.buf.drain(..n).collect())
    }
}

/// A flow a hub opened on one of its tunnels, from its log.
#[derive(Debug)]
pub struct Opened {
    pub hub: usize,
    pub at_ms: u64,
    pub agent: String,
    pub epoch: u64,
    pub mesh: bool,
}

/// The flows the hubs opened on tunnels, with each tunnel's epoch.
/// `logs` holds one entry per hub process (tunnel ids are per process).
pub fn opened_flows(logs: &[(usize, String)]) -> Vec<Opened> {
    let mut out = Vec::new();
    for (hub, text) in logs {
        // tunnel id → (agent, epoch), for this process.
        let mut tunnels: BTreeMap<u64, (String, u64)> = BTreeMap::new();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let field = |k: &str| v.get(k).or_else(|| v.get("fields").and_then(|f| f.get(k)));
            let msg = field("message").and_then(|m| m.as_str()).unwrap_or("");
            let num = |k: &str| field(k).and_then(serde_json::Value::as_u64);
            let text_of = |k: &str| field(k).and_then(|x| x.as_str()).map(str::to_string);
            let Some(at_ms) = v
                .get("timestamp")
                .and_then(|t| t.as_str())
                .and_then(parse_rfc3339_ms)
            else {
                continue;
            };
            match msg {
                "agent tunnel established" => {
                    if let (Some(t), Some(a), Some(e)) =
                        (num("tunnel"), text_of("agent"), num("epoch"))
                    {
                        tunnels.insert(t, (a, e));
                    }
                }
                "flow opened" => {
                    // The epoch the hub held the tunnel under when it
                    // opened the flow (moved by a reclaim), else the one
                    // it was established with.
                    if let Some(t) = num("tunnel")
                        && let Some((agent, epoch)) = tunnels.get(&t)
                    {
                        out.push(Opened {
                            hub: *hub,
                            at_ms,
                            agent: agent.clone(),
                            epoch: num("epoch").unwrap_or(*epoch),
                            mesh: false,
                        });
                    }
                }
                "mesh flow opened" => {
                    if let (Some(agent), Some(epoch)) = (text_of("agent_id"), num("epoch")) {
                        out.push(Opened {
                            hub: *hub,
                            at_ms,
                            agent,
                            epoch,
                            mesh: true,
                        });
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// Violations of fencing: flows opened on a tunnel more than `bound`
/// after Redis gave its slot a newer epoch. Also returns how many flows
/// were checked and how many could not be placed on a slot (their epoch
/// never showed in Redis between two polls).
pub fn check(
    opened: &[Opened],
    owners: &BTreeMap<(String, u8), Vec<(u64, u64)>>,
    bound: Duration,
) -> (Vec<String>, usize, usize) {
    let mut violations = Vec::new();
    let (mut checked, mut unplaced) = (0, 0);
    for f in opened {
        let slot = owners
            .iter()
            .find(|((a, _), h)| *a == f.agent && h.iter().any(|(_, e)| *e == f.epoch));
        let Some(((_, slot), history)) = slot else {
            unplaced += 1;
            continue;
        };
        checked += 1;
        if let Some((since, newer)) = history.iter().find(|(_, e)| *e > f.epoch)
            && f.at_ms > since + bound.as_millis() as u64
        {
            violations.push(format!(
                "hub{} opened a {} flow for {} on its tunnel of epoch {} (slot {slot}) {} ms after Redis gave the slot epoch {newer}",
                f.hub + 1,
                if f.mesh { "mesh" } else { "local" },
                f.agent,
                f.epoch,
                f.at_ms - since
            ));
        }
    }
    (violations, checked, unplaced)
}

/// `2026-12-07T18:05:26.123456Z` (UTC, as the hubs log) → unix ms.
pub fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let time = time.trim_end_matches('Z');
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as u64 * 86_400_000 + hh * 3_600_000 + mm * 60_000 + (sec * 1000.0) as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_log_timestamps() {
        assert_eq!(
            super::parse_rfc3339_ms("1970-01-02T00:00:01.500Z"),
            Some(86_401_500)
        );
        assert_eq!(
            super::parse_rfc3339_ms("2026-12-07T18:05:26.123456Z"),
            Some(1_796_666_726_123)
        );
    }
}

#[cfg(test)]
mod fence_tests {
    use super::*;

    fn log(lines: &[(&str, &str)]) -> String {
        lines
            .iter()
            .map(|(ts, rest)| format!("{{\"timestamp\":\"{ts}\",\"level\":\"INFO\",{rest}}}\n"))
            .collect()
    }

    fn owners(h: &[(u64, u64)]) -> BTreeMap<(String, u8), Vec<(u64, u64)>> {
        let mut o = BTreeMap::new();
        o.insert(("agent1".to_string(), 1), h.to_vec());
        o
    }

    #[test]
    fn a_flow_on_a_tunnel_long_after_its_slot_moved_is_a_violation() {
        let t0 = parse_rfc3339_ms("2026-12-07T10:00:00.000Z").unwrap();
        let text = log(&[
            (
                "2026-12-07T10:00:00.000Z",
                r#""message":"agent tunnel established","tunnel":3,"agent":"agent1","epoch":100"#,
            ),
            // Within the bound of the newer epoch (granted at t0 + 1 s).
            (
                "2026-12-07T10:00:03.000Z",
                r#""message":"flow opened","tunnel":3,"epoch":100,"agent":"agent1""#,
            ),
            // Far past it.
            (
                "2026-12-07T10:00:20.000Z",
                r#""message":"flow opened","tunnel":3,"epoch":100,"agent":"agent1""#,
            ),
            (
                "2026-12-07T10:00:20.500Z",
                r#""message":"mesh flow opened","agent_id":"agent1","epoch":100,"tunnel":3"#,
            ),
        ]);
        let opened = opened_flows(&[(1, text)]);
        assert_eq!(opened.len(), 3);
        let (v, checked, unplaced) = check(
            &opened,
            &owners(&[(t0, 100), (t0 + 1000, 200)]),
            Duration::from_secs(5),
        );
        assert_eq!((checked, unplaced), (3, 0));
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].contains("local flow") && v[1].contains("mesh flow"),
            "{v:?}"
        );
    }

    #[test]
    fn a_reclaimed_tunnel_is_judged_by_its_epoch_at_the_open() {
        let t0 = parse_rfc3339_ms("2026-12-07T10:00:00.000Z").unwrap();
        // Established under 100; Redis lost its data and the hub
        // reclaimed the slot under 300 for the same tunnel.
        let text = log(&[
            (
                "2026-12-07T10:00:00.000Z",
                r#""message":"agent tunnel established","tunnel":3,"agent":"agent1","epoch":100"#,
            ),
            (
                "2026-12-07T10:00:30.000Z",
                r#""message":"flow opened","tunnel":3,"epoch":300,"agent":"agent1""#,
            ),
        ]);
        let opened = opened_flows(&[(0, text)]);
        let (v, checked, _) = check(
            &opened,
            &owners(&[(t0, 100), (t0 + 5000, 300)]),
            Duration::from_secs(5),
        );
        assert_eq!((v.len(), checked), (0, 1), "{v:?}");
    }
}
