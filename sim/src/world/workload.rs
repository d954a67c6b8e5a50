//! The workload: clients with hash-checked streams, slow readers, resets
//! and half-closes, and the echo targets behind the agents.

use super::*;

impl World {
    /// Start `n` client flows spread over the next `within`, each on a hub
    /// picked at random.
    pub fn start_clients(&mut self, n: usize, within: Duration) {
        for _ in 0..n {
            let id = self.next_client;
            self.next_client += 1;
            let len = 1 + self.rng.below(64 * 1024) as usize;
            let data: Vec<u8> = (0..len).map(|_| self.rng.below(256) as u8).collect();
            let slow = self.chance(self.faults.slow_reader);
            if slow {
                self.outcome.slow_readers += 1;
            }
            let hub = self.rng.below(self.hubs.len() as u64) as usize;
            // A listener of the second tenant exists only if it has agents.
            let tenant = if self
                .agents
                .iter()
                .any(|a| !a.rogue && a.credential.tenant == OTHER_TENANT)
                && self.rng.below(2) == 1
            {
                OTHER_TENANT
            } else {
                DEFAULT_TENANT
            };
            if tenant == OTHER_TENANT {
                self.outcome.flows_other_tenant += 1;
            }
            self.clients.insert(
                id,
                Client {
                    hub,
                    tenant,
                    state: ClientState::Waiting,
                    data,
                    sent: 0,
                    received: Vec::new(),
                    fin_sent: false,
                    fin_received: false,
                    slow,
                    unconsumed: 0,
                    ended: None,
                },
            );
            let at = Duration::from_micros(self.rng.below(within.as_micros() as u64 + 1));
            self.schedule(at, Event::ClientStart { client: id });
        }
    }

    /// The client connects to its hub's listener: refused when the hub is
    /// down or its listeners were closed (draining), else routed.
    pub(super) fn client_start(&mut self, client: u64) {
        self.outcome.flows_started += 1;
        let (hub, tenant) = (self.clients[&client].hub, self.clients[&client].tenant);
        let refused = if !self.hubs[hub].alive {
            Some("hub_down")
        } else if !self.hubs[hub].listening {
            Some("listener_closed")
        } else {
            None
        };
        if let Some(why) = refused {
            let c = self.clients.get_mut(&client).expect("client");
            c.state = ClientState::Done;
            c.ended = Some(ErrorCode::Refused);
            *self.outcome.flows_refused.entry(why).or_default() += 1;
        } else {
            let listener = qualify(tenant, "echo");
            let now = self.now;
            let node = &mut self.hubs[hub].node;
            match node.client_accepted(now, client) {
                Ok(()) => node.client_connected(now, client, &listener, None),
                Err(refusal) => {
                    let c = self.clients.get_mut(&client).expect("client");
                    c.state = ClientState::Done;
                    c.ended = Some(ErrorCode::Refused);
                    *self
                        .outcome
                        .flows_refused
                        .entry(refusal.as_str())
                        .or_default() += 1;
                }
            }
        }
    }

    pub(super) fn client_step(&mut self, id: u64) {
        let Some(ClientState::Open { ep, cid }) = self.clients.get(&id).map(|c| &c.state) else {
            return;
        };
        let (ep, cid) = (*ep, *cid);
        let delay = Duration::from_micros(100 + self.rng.below(2000));
        self.schedule(delay, Event::ClientStep { client: id });
        let reset_now = self.chance(self.faults.client_reset);
        let early_roll = self.chance(self.faults.client_half_close / 8.0);
        let Some(e) = self.eps.get_mut(&ep) else {
            return;
        };
        let link: &mut dyn FlowLink = match &mut e.link {
            Link::Tunnel(t) => t,
            Link::Mesh(m) => m,
        };
        let c = self.clients.get_mut(&id).expect("client");
        // A slow reader drains what it has, in bursts.
        if c.unconsumed > 0 {
            let n = c.unconsumed;
            c.unconsumed = 0;
            link.consumed(cid, n);
        }
        if c.fin_sent {
            return;
        }
        if reset_now {
            self.outcome.client_resets += 1;
            link.reset_flow(cid, ErrorCode::ConnectionReset, "client reset");
            c.ended = Some(ErrorCode::ConnectionReset);
            c.state = ClientState::Done;
            self.client_of.remove(&(ep, cid));
            *self.outcome.flows_reset.entry("client_reset").or_default() += 1;
            let hub = c.hub;
            self.flow_ended(hub, ep);
            self.client_closed(hub, id);
            return;
        }
        let credit = link.send_credit(cid) as usize;
        let n = (c.data.len() - c.sent).min(credit).min(CHUNK);
        if n > 0 {
            let chunk = read_with_room(&c.data[c.sent..c.sent + n]);
            if link.send_data(cid, chunk).is_ok() {
                c.sent += n;
            }
        } else if c.sent < c.data.len() {
            link.note_blocked(cid);
        }
        let early = early_roll && c.sent > 0;
        if c.sent == c.data.len() || early {
            if early && c.sent < c.data.len() {
                self.outcome.half_closes += 1;
                c.data.truncate(c.sent);
            }
            if link.send_fin(cid).is_ok() {
                c.fin_sent = true;
            }
        }
    }

    /// Echo what a target holds back to the hub, as far as credit allows.
    pub(super) fn echo(&mut self, ep: EpId, cid: Cid) {
        let Some(Ep {
            link: Link::Tunnel(tun),
            ..
        }) = self.eps.get_mut(&ep)
        else {
            return;
        };
        let Some(t) = self.targets.get_mut(&(ep, cid)) else {
            return;
        };
        if !t.connected {
            return;
        }
        while !t.buf.is_empty() {
            let credit = tun.send_credit(cid) as usize;
            let n = t.buf.len().min(credit).min(CHUNK);
            if n == 0 {
                break;
            }
            let chunk: Vec<u8> = t.buf.drain(..n).collect();
            if tun.send_data(cid, read_with_room(&chunk)).is_err() {
                break;
            }
        }
        if t.fin && t.buf.is_empty() && !t.fin_sent {
            t.fin_sent = true;
            let _ = tun.send_fin(cid);
        }
    }

    pub(super) fn client_event(&mut self, ep: EpId, fe: FlowEvent) {
        let cid = flow_cid(&fe);
        let Some(&id) = self.client_of.get(&(ep, cid)) else {
            return;
        };
        let c = self.clients.get_mut(&id).expect("client");
        let hub = c.hub;
        match fe {
            FlowEvent::Data { payload, .. } => {
                c.received.extend_from_slice(&payload);
                self.outcome.bytes_echoed += payload.len() as u64;
                if c.slow {
                    c.unconsumed += payload.len();
                } else if let Some(l) = self.flow_link(ep) {
                    l.consumed(cid, payload.len());
                }
            }
            FlowEvent::Fin { .. } => c.fin_received = true,
            FlowEvent::Reset { code, .. } => {
                c.ended = Some(code);
                c.state = ClientState::Done;
                self.client_of.remove(&(ep, cid));
                *self.outcome.flows_reset.entry(code.as_str()).or_default() += 1;
                self.flow_ended(hub, ep);
                self.client_closed(hub, id);
            }
            FlowEvent::Writable { .. } => {
                self.schedule(Duration::ZERO, Event::ClientStep { client: id })
            }
            FlowEvent::Closed { .. } => {
                c.state = ClientState::Done;
                self.client_of.remove(&(ep, cid));
                self.outcome.flows_completed += 1;
                self.flow_ended(hub, ep);
                self.client_closed(hub, id);
            }
        }
    }

    /// Clients not finished yet.
    pub fn open_clients(&self) -> usize {
        self.clients
            .values()
            .filter(|c| c.state != ClientState::Done)
            .count()
    }

    /// Flows still open on any link or bridge (a quiet, healed world has
    /// none: a flow left behind would hold one of its agent's flows for
    /// good).
    pub fn open_link_flows(&self) -> usize {
        self.eps
            .values()
            .map(|e| {
                let on_link = match &e.link {
                    Link::Tunnel(t) => t.flow_count(),
                    Link::Mesh(m) => m.flow_count(),
                };
                on_link + e.relay.len()
            })
            .sum()
    }

    /// Clients started after `first_id` that completed with every byte echoed.
    pub fn completed_since(&self, first_id: u64) -> (usize, usize) {
        let fresh: Vec<&Client> = self.clients.range(first_id..).map(|(_, c)| c).collect();
        let ok = fresh
            .iter()
            .filter(|c| c.state == ClientState::Done && c.ended.is_none() && c.received == c.data)
            .count();
        (ok, fresh.len())
    }

    /// Clients started after `first_id` refused because the agent's tunnel
    /// had no flow left for them (`limit_exceeded`).
    pub fn refused_for_limit_since(&self, first_id: u64) -> usize {
        self.clients
            .range(first_id..)
            .filter(|(_, c)| c.ended == Some(ErrorCode::LimitExceeded))
            .count()
    }

    /// How many flows each agent's tunnel takes at once in this world.
    pub fn flows_per_agent(&self) -> usize {
        self.tunnel_cfg.max_flows
    }

    /// How the clients started after `first_id` ended (or where they are):
    /// the reason a liveness check failed.
    pub fn client_summary(&self, first_id: u64) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for c in self.clients.range(first_id..).map(|(_, c)| c) {
            let k = match (&c.state, c.ended) {
                (ClientState::Done, None) if c.received == c.data => "completed".to_string(),
                (ClientState::Done, None) => "closed short".to_string(),
                (ClientState::Done, Some(code)) => format!("ended: {}", code.as_str()),
                (ClientState::Waiting, _) => format!("waiting for a route at hub {}", c.hub),
                (ClientState::Open { .. }, _) => format!(
                    "open at hub {} ({} of {} bytes sent, {} echoed)",
                    c.hub,
                    c.sent,
                    c.data.len(),
                    c.received.len()
                ),
            };
            *m.entry(k).or_default() += 1;
        }
        m
    }
}
