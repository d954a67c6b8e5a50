//! Drivers shared by the fuzz targets and the corpus replay tests, so a seed
//! means the same thing in both.

use std::time::{Duration, Instant};

use bytes::Bytes;
use nowconnect_core::tunnel::{Tunnel, TunnelConfig};
use nowconnect_core::{Cid, Epoch, WsMessage};

/// Flow and dedup bound used by [`drive_tunnels`].
pub const TUNNEL_BOUND: usize = 16;

/// Feed a hub-side and an agent-side tunnel alternately with the messages in
/// `data` (split at 0xff; the first byte of each picks text or binary, moves
/// the clock, and may accept the hub side). Panics if a bound is exceeded.
pub fn drive_tunnels(origin: Instant, data: &[u8]) {
    let cfg = TunnelConfig {
        max_flows: TUNNEL_BOUND,
        dedup_capacity: TUNNEL_BOUND,
        ..TunnelConfig::default()
    };
    let mut hub = Tunnel::hub(origin, cfg.clone());
    let mut agent = Tunnel::agent(origin, cfg, "a1", &["ldap".to_string()]);
    let mut now = origin;
    for (i, chunk) in data.split(|b| *b == 0xff).enumerate() {
        let Some((&kind, body)) = chunk.split_first() else {
            continue;
        };
        let msg = if kind & 1 == 0 {
            WsMessage::Text(String::from_utf8_lossy(body).into_owned())
        } else {
            WsMessage::Binary(Bytes::copy_from_slice(body))
        };
        now += Duration::from_millis(u64::from(kind >> 1));
        let t = if i % 2 == 0 { &mut hub } else { &mut agent };
        t.handle_message(now, &msg);
        if kind & 0x80 != 0 {
            t.accept(now, Epoch(1));
        }
        t.handle_timeout(now);
        while t.poll_transmit().is_some() {}
        while t.poll_event().is_some() {}
        assert!(t.flow_count() <= TUNNEL_BOUND, "flow bound exceeded");
        assert!(
            t.mux().dedup().len() <= TUNNEL_BOUND,
            "dedup bound exceeded"
        );
    }
}

/// Reads the fuzzer's bytes one decision at a time; zeros once they run out.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    /// One of the cids 0..16, from one byte.
    fn cid(&mut self) -> Cid {
        Cid(u64::from(self.byte() % 16))
    }

    fn more(&self) -> bool {
        self.pos < self.data.len()
    }
}

/// The hub's control state machine fed an arbitrary sequence of events
/// (HELLOs, closes, clients, registry replies to real or made-up calls,
/// time, mesh opens, drain). Panics if the hub breaks one of its promises:
/// it accepts only tunnels that said HELLO and are open, routes clients only
/// to tunnels it accepted and still holds, never exceeds its agent limit,
/// and never asks to be woken in the past.
pub fn drive_hub(origin: Instant, data: &[u8]) {
    use nowconnect_core::hub::{Hub, HubConfig, HubOutput, TunnelId};
    use nowconnect_core::registry::{AgentRecord, Owner, RegistryError, RegistryReply};
    use nowconnect_core::routing::{Mode, Route};
    use std::collections::{BTreeMap, BTreeSet};

    let mut input = Input { data, pos: 0 };
    let mode = match input.byte() % 3 {
        0 => Mode::Off,
        1 => Mode::Shadow,
        _ => Mode::Active,
    };
    let cfg = HubConfig {
        replica_id: "hub-a".into(),
        mode,
        max_agents: 4,
        max_pending_routes: 8,
        ..HubConfig::default()
    };
    let max_agents = cfg.max_agents;
    let mut hub = Hub::new(origin, cfg, u64::from(input.byte()));
    let mut now = origin;
    let mut open: BTreeSet<TunnelId> = BTreeSet::new(); // tunnels that said HELLO, not closed
    let mut accepted: BTreeSet<TunnelId> = BTreeSet::new();
    let mut pending: Vec<u64> = Vec::new();
    let mut next_client = 1;
    let mut client_tenant: BTreeMap<u64, &str> = BTreeMap::new();
    let agent = |b: u8| format!("a{}", b % 6);
    let connectors = |b: u8| -> Vec<String> {
        ["ldap", "pg", "echo"]
            .iter()
            .enumerate()
            .filter(|(i, _)| b & (1 << i) != 0)
            .map(|(_, c)| c.to_string())
            .collect()
    };
    while input.more() {
        match input.byte() % 11 {
            0 => {
                let t = TunnelId(u64::from(input.byte() % 8));
                let (a, c, s, k) = (input.byte(), input.byte(), input.byte(), input.byte());
                let scope = connectors(s);
                // A token's credential (tenant, agent, scope) and a HELLO
                // that may name another agent or unscoped connectors.
                let credential = nowconnect_core::tenant::AgentCredential {
                    tenant: ["default", "acme", "globex"][usize::from(k % 3)].to_string(),
                    agent_id: agent(a),
                    scope: (s & 0x80 != 0).then(|| scope.clone()),
                };
                let hello = if k & 0x10 != 0 {
                    agent(a ^ 1)
                } else {
                    agent(a)
                };
                let announced = connectors(c);
                if open.insert(t) {
                    let res = hub.tunnel_hello_as(now, t, &credential, &hello, &announced);
                    let in_scope = credential
                        .scope
                        .as_ref()
                        .is_none_or(|sc| announced.iter().all(|x| sc.contains(x)));
                    assert_eq!(
                        res.is_ok(),
                        hello == credential.agent_id && in_scope,
                        "HELLO {hello} {announced:?} under {credential:?}: {res:?}"
                    );
                    if res.is_err() {
                        open.remove(&t);
                    }
                }
            }
            1 => {
                let t = TunnelId(u64::from(input.byte() % 8));
                open.remove(&t);
                accepted.remove(&t);
                hub.tunnel_closed(now, t);
            }
            2 => {
                let c = connectors(input.byte() | 1);
                let tenant = ["default", "acme", "globex"][usize::from(input.byte() % 3)];
                let connector =
                    nowconnect_core::tenant::qualify(tenant, c.last().map_or("ldap", |s| s));
                client_tenant.insert(next_client, tenant);
                hub.client_connected(now, next_client, &connector);
                next_client += 1;
            }
            3 | 10 => {
                let pick = usize::from(input.byte());
                let op = if pending.is_empty() || pick == 255 {
                    u64::from(input.byte())
                } else {
                    pending.remove(pick % pending.len())
                };
                let (k, v) = (input.byte(), input.byte());
                let owner = Owner {
                    replica_id: if v & 1 == 0 { "hub-a" } else { "hub-b" }.into(),
                    epoch: Epoch(u64::from(v >> 1)),
                    slot: (k >> 4) % nowconnect_core::frame::MAX_SLOTS,
                };
                let reply = match k % 12 {
                    0 => Ok(RegistryReply::Claimed(Epoch(u64::from(v)))),
                    1 => Ok(RegistryReply::Renewed),
                    // A batched renewal's lost slot (its index may be past
                    // the call's slots, as from a hostile registry).
                    2 | 3 if k & 0x80 != 0 => Ok(RegistryReply::RenewedMany {
                        lost: vec![(usize::from(v % 4), (k % 12 == 3).then_some(owner))],
                    }),
                    2 => Ok(RegistryReply::Lost { current: None }),
                    3 => Ok(RegistryReply::Lost {
                        current: Some(owner),
                    }),
                    4 => Ok(RegistryReply::Released),
                    5 => Ok(RegistryReply::Done),
                    6 => Ok(RegistryReply::Agents(vec![AgentRecord {
                        agent_id: agent(v),
                        owners: (v & 0x80 != 0)
                            .then_some(owner.clone())
                            .into_iter()
                            .collect(),
                    }])),
                    7 => Ok(RegistryReply::Owners(vec![owner])),
                    8 => Ok(RegistryReply::Replicas(vec![(
                        "hub-b".into(),
                        "wss://b/mesh".into(),
                    )])),
                    9 => Ok(RegistryReply::Healthy),
                    10 => Err(RegistryError::Unavailable("down".into())),
                    _ => Err(RegistryError::Timeout(Duration::from_millis(500))),
                };
                hub.registry_reply(now, op, reply);
            }
            4 => {
                now += Duration::from_millis(u64::from(input.byte()) * 40);
                hub.handle_timeout(now);
                if let Some(at) = hub.poll_timeout() {
                    assert!(at >= now, "the hub asks to be woken in the past");
                }
            }
            5 => hub.flow_started(TunnelId(u64::from(input.byte() % 8))),
            6 => hub.flow_ended(TunnelId(u64::from(input.byte() % 8))),
            7 => {
                let (a, e, c) = (input.byte(), input.byte(), input.byte());
                let tenant = ["default", "acme", "globex"][usize::from(c / 3 % 3)];
                let connector = nowconnect_core::tenant::qualify(
                    tenant,
                    ["ldap", "pg", "echo"][usize::from(c % 3)],
                );
                let connector = connector.as_str();
                let agent = |b| nowconnect_core::tenant::qualify(tenant, &agent(b));
                if let Ok(t) = hub.check_mesh_open(&agent(a), connector, Epoch(u64::from(e))) {
                    assert!(
                        accepted.contains(&t),
                        "mesh open served by tunnel {t}, not accepted"
                    );
                    assert!(
                        hub.agents()
                            .any(|(id, _, cs)| id == agent(a) && cs.iter().any(|x| x == connector)),
                        "mesh open for `{connector}` served by an agent that did not announce it"
                    );
                }
            }
            8 => {
                let b = input.byte();
                hub.mesh_link_up(if b & 1 == 0 { "hub-b" } else { "hub-c" }, b & 2 != 0);
            }
            _ => {
                if input.byte() == 0xd7 {
                    hub.drain(now);
                }
            }
        }
        while let Some(o) = hub.poll_output() {
            match o {
                HubOutput::Registry { op, .. } => pending.push(op),
                HubOutput::AcceptTunnel { tunnel, .. } => {
                    assert!(
                        open.contains(&tunnel),
                        "accepted tunnel {tunnel} that is not open"
                    );
                    accepted.insert(tunnel);
                }
                HubOutput::CloseTunnel { tunnel, .. } => {
                    accepted.remove(&tunnel);
                }
                HubOutput::DrainTunnel { tunnel } => {
                    assert!(
                        accepted.contains(&tunnel),
                        "DRAIN for tunnel {tunnel} that is not accepted"
                    );
                }
                HubOutput::Route {
                    client,
                    route: Route::Local { tunnel, agent_id },
                } => {
                    assert!(
                        accepted.contains(&tunnel),
                        "routed to tunnel {tunnel} not accepted"
                    );
                    let want = client_tenant.get(&client).copied().unwrap_or("default");
                    assert_eq!(
                        nowconnect_core::tenant::split(&agent_id).0,
                        want,
                        "client {client} of tenant {want} routed to agent {agent_id}"
                    );
                }
                HubOutput::Route { .. }
                | HubOutput::Peers(_)
                | HubOutput::PeerDeparted { .. }
                | HubOutput::Announced => {}
            }
        }
        assert!(hub.agent_count() <= max_agents, "agent limit exceeded");
        // Tunnels: at most one owned and one claiming per agent.
        let mut per_agent: BTreeMap<&str, usize> = BTreeMap::new();
        for (a, _, _) in hub.agents() {
            *per_agent.entry(a).or_default() += 1;
        }
        assert!(
            per_agent.len() <= max_agents,
            "more owned agents than the limit"
        );
        assert!(
            hub.tunnel_count() <= 2 * max_agents,
            "{} tunnels held for at most {max_agents} agents",
            hub.tunnel_count()
        );
    }
}

/// The agent both agent drivers run: two hubs, one connector, at most four
/// target dials at once.
fn fuzz_agent_config() -> nowconnect_core::agent::AgentConfig {
    let mut connectors = std::collections::BTreeMap::new();
    connectors.insert("ldap".to_string(), "ldap:389".to_string());
    nowconnect_core::agent::AgentConfig {
        agent_id: "a1".into(),
        hubs: vec!["wss://h1/tunnel".into(), "wss://h2/tunnel".into()],
        connectors,
        max_pending_dials: 4,
        ..Default::default()
    }
}

/// The agent's control state machine fed an arbitrary sequence of events
/// (hub attempts succeeding or failing, flows opened for known and unknown
/// connectors, target dials finishing, time). Panics if it dials a target for
/// a flow it was not asked to open, holds more dials than its limit, or asks
/// to be woken in the past.
pub fn drive_agent(origin: Instant, data: &[u8]) {
    use nowconnect_core::agent::{Agent, AgentOutput, AttemptId, HubLinkState};
    use std::collections::BTreeSet;

    let mut input = Input { data, pos: 0 };
    let cfg = fuzz_agent_config();
    let hubs = cfg.hubs.clone();
    let mut agent = Agent::new(origin, cfg, u64::from(input.byte()));
    let mut now = origin;
    let mut attempts: Vec<AttemptId> = Vec::new();
    let mut opened: BTreeSet<(AttemptId, Cid)> = BTreeSet::new();
    let mut dialing: BTreeSet<(AttemptId, Cid)> = BTreeSet::new();
    while input.more() {
        let pick = |v: &[AttemptId], b: u8| v.get(usize::from(b) % v.len().max(1)).copied();
        match input.byte() % 8 {
            0 => {
                now += Duration::from_millis(u64::from(input.byte()) * 50);
                agent.handle_timeout(now);
                if let Some(at) = agent.poll_timeout() {
                    assert!(at >= now, "the agent asks to be woken in the past");
                }
            }
            1 => {
                let b = input.byte();
                agent.hub_established(now, pick(&attempts, b).unwrap_or(AttemptId(u64::from(b))));
            }
            2 => {
                let b = input.byte();
                agent.hub_lost(now, pick(&attempts, b).unwrap_or(AttemptId(u64::from(b))));
            }
            3 => {
                let (a, c, k) = (input.byte(), input.cid(), input.byte());
                let a = pick(&attempts, a).unwrap_or(AttemptId(0));
                opened.insert((a, c));
                agent.flow_opened(now, a, c, if k & 1 == 0 { "ldap" } else { "nope" });
            }
            4 => {
                let (a, c) = (input.byte(), input.cid());
                let a = pick(&attempts, a).unwrap_or(AttemptId(0));
                if agent.target_connected(now, a, c) {
                    assert!(
                        dialing.remove(&(a, c)),
                        "target {a}/{c} connected without a dial"
                    );
                }
            }
            5 => {
                let (a, c) = (input.byte(), input.cid());
                let a = pick(&attempts, a).unwrap_or(AttemptId(0));
                dialing.remove(&(a, c));
                agent.target_failed(now, a, c, "refused");
            }
            6 => {
                let (a, c) = (input.byte(), input.cid());
                let a = pick(&attempts, a).unwrap_or(AttemptId(0));
                dialing.remove(&(a, c));
                opened.remove(&(a, c));
                agent.flow_gone(a, c);
            }
            _ => {
                let b = input.byte();
                if let Some(a) = pick(&attempts, b) {
                    let was_current = agent.state() == &HubLinkState::Connected { attempt: a };
                    agent.hub_draining(now, a);
                    if was_current {
                        assert!(
                            agent.draining_tunnels().any(|d| d == a),
                            "a drained tunnel is not kept for its flows"
                        );
                        assert!(
                            matches!(agent.state(), HubLinkState::Dialing { .. }),
                            "DRAIN did not start a dial to the next hub"
                        );
                    }
                }
            }
        }
        while let Some(o) = agent.poll_output() {
            match o {
                AgentOutput::DialHub { attempt, url } => {
                    assert!(hubs.contains(&url), "dialed an unknown hub {url}");
                    attempts.push(attempt);
                }
                AgentOutput::DialTarget { attempt, cid, .. } => {
                    assert!(
                        opened.contains(&(attempt, cid)),
                        "dialed a target for flow {attempt}/{cid} never opened"
                    );
                    dialing.insert((attempt, cid));
                }
                AgentOutput::ResetFlow { attempt, cid, .. } => {
                    dialing.remove(&(attempt, cid));
                }
                AgentOutput::AbortHub { .. } => {}
            }
        }
        assert!(
            agent.pending_dials() <= 4,
            "more target dials than the limit"
        );
    }
}

/// The whole agent ([`AgentNode`](nowconnect_core::agent_node::AgentNode):
/// its control machine and its tunnel links) fed an arbitrary sequence of
/// what its links, dials and clock report, a hostile hub included (events
/// for tunnels it never had, flows opened twice, DRAIN before WELCOME).
/// Panics if it dials a target for a flow no tunnel of its opened, speaks of
/// a tunnel it never connected or already ended, holds more than one current
/// or draining tunnel or more dials than its limit, or asks to be woken in
/// the past.
pub fn drive_agent_node(origin: Instant, data: &[u8]) {
    use nowconnect_core::agent::AttemptId;
    use nowconnect_core::agent_node::{AgentCommand, AgentNode, LinkRole};
    use nowconnect_core::mux::FlowEvent;
    use nowconnect_core::tunnel::TunnelEvent;
    use nowconnect_core::{Codec, Epoch, ErrorCode};
    use std::collections::BTreeSet;

    let mut input = Input { data, pos: 0 };
    let cfg = fuzz_agent_config();
    let mut node = AgentNode::new(origin, cfg, u64::from(input.byte()));
    let mut now = origin;
    // Hub attempts dialed, tunnels connected and not yet ended, flows opened.
    let mut attempts: Vec<AttemptId> = Vec::new();
    let mut live: BTreeSet<AttemptId> = BTreeSet::new();
    let mut opened: BTreeSet<(AttemptId, Cid)> = BTreeSet::new();
    let mut dialing: BTreeSet<(AttemptId, Cid)> = BTreeSet::new();
    loop {
        while let Some(c) = node.poll_command() {
            match c {
                AgentCommand::DialHub { attempt, .. } => attempts.push(attempt),
                AgentCommand::CancelHubDial { attempt, .. } => {
                    assert!(attempts.contains(&attempt), "cancelled a dial never made");
                }
                AgentCommand::CloseTunnel { attempt, .. } => {
                    assert!(live.contains(&attempt), "closes tunnel {attempt}, not live");
                }
                AgentCommand::EndTunnel { attempt, .. } => {
                    assert!(live.remove(&attempt), "ends tunnel {attempt}, not live");
                    dialing.retain(|(a, _)| *a != attempt);
                }
                AgentCommand::DialTarget { attempt, cid, .. } => {
                    assert!(
                        live.contains(&attempt),
                        "dials for tunnel {attempt}, not live"
                    );
                    assert!(
                        opened.contains(&(attempt, cid)),
                        "dialed a target for flow {attempt}/{cid} never opened"
                    );
                    dialing.insert((attempt, cid));
                }
                AgentCommand::CancelTarget { attempt, cid } => {
                    dialing.remove(&(attempt, cid));
                }
                AgentCommand::ResetFlow { attempt, .. } => {
                    assert!(
                        live.contains(&attempt),
                        "resets on tunnel {attempt}, not live"
                    );
                }
            }
        }
        let roles: Vec<LinkRole> = node.links().map(|(_, r)| r).collect();
        for role in [LinkRole::Current, LinkRole::Draining] {
            assert!(
                roles.iter().filter(|r| **r == role).count() <= 1,
                "two {role:?} tunnels"
            );
        }
        assert!(node.links().all(|(a, _)| live.contains(&a)));
        assert!(
            node.pending_dials() <= 4,
            "more target dials than the limit"
        );
        if let Some(at) = node.poll_timeout() {
            assert!(at >= now, "the agent asks to be woken in the past");
        }
        if !input.more() {
            break;
        }
        let pick = |v: &[AttemptId], b: u8| v.get(usize::from(b) % v.len().max(1)).copied();
        let b = input.byte();
        let a = pick(&attempts, b).unwrap_or(AttemptId(u64::from(b)));
        let cid = input.cid();
        let ev = match input.byte() % 10 {
            0 => {
                now += Duration::from_millis(u64::from(input.byte()) * 50);
                node.handle_timeout(now);
                continue;
            }
            1 => {
                if node.hub_connected(now, a).is_ok() {
                    assert!(live.insert(a), "tunnel {a} connected twice");
                }
                continue;
            }
            2 => {
                node.hub_failed(now, a);
                continue;
            }
            3 => {
                if node.target_connected(now, a, cid) {
                    assert!(
                        dialing.remove(&(a, cid)),
                        "target {a}/{cid} piped without a dial"
                    );
                }
                continue;
            }
            4 => {
                dialing.remove(&(a, cid));
                node.target_failed(now, a, cid, "refused");
                continue;
            }
            5 => TunnelEvent::Established {
                epoch: Epoch(1),
                codec: Codec::V2,
                replica_id: "hub-a".into(),
            },
            6 => {
                if live.contains(&a) {
                    opened.insert((a, cid));
                }
                let connector = if input.byte() & 1 == 0 {
                    "ldap"
                } else {
                    "nope"
                };
                TunnelEvent::Open {
                    cid,
                    connector: connector.into(),
                }
            }
            7 => TunnelEvent::Flow(FlowEvent::Reset {
                cid,
                code: ErrorCode::ConnectionReset,
                reason: "reset".into(),
            }),
            8 => TunnelEvent::Drain,
            _ => TunnelEvent::Closed {
                code: ErrorCode::LinkLost,
                reason: "lost".into(),
            },
        };
        node.tunnel_event(now, a, &ev);
    }
}

/// A simulated cluster whose chaos is chosen by the fuzzer's bytes (see
/// `World::from_fuzz_bytes`): every invariant must hold through the chaos,
/// and after healing every flow must end.
pub fn drive_world(origin: Instant, data: &[u8]) {
    let mut w = crate::world::World::from_fuzz_bytes(origin, data);
    w.start_clients(8, Duration::from_millis(500));
    if let Err(v) = w.run_until(origin + Duration::from_secs(2)) {
        panic!("invariant broken: {}", v.0);
    }
    w.heal();
    if let Err(v) = w.run_until(origin + Duration::from_secs(10)) {
        panic!("invariant broken after healing: {}", v.0);
    }
    assert_eq!(
        w.open_clients(),
        0,
        "flows still open 8 s after healing: {:?}",
        w.client_summary(0)
    );
}
