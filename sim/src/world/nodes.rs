//! The nodes: how each hub drives its `HubNode` (whose inputs and outputs
//! decide HELLO, drain and token rules for its tunnels, as in the runtimes;
//! tokens themselves are `auth.rs`'s),
//! tunnels, mesh links and bridges, and how each agent drives its `Agent`
//! and tunnels.

use super::*;

impl World {
    pub(super) fn flow_ended(&mut self, hub: usize, ep: EpId) {
        if self
            .eps
            .get(&ep)
            .is_some_and(|e| matches!(e.link, Link::Tunnel(_)))
        {
            self.hubs[hub].node.flow_ended(TunnelId(ep));
        }
    }

    /// A client's connection to `hub` ended.
    pub(super) fn client_closed(&mut self, hub: usize, client: u64) {
        let now = self.now;
        self.hubs[hub].node.client_closed(now, client);
    }

    /// Drain every state machine until nothing moves.
    pub(super) fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            moved |= self.pump_hubs();
            moved |= self.pump_eps();
            moved |= self.pump_agents();
            if !moved {
                return;
            }
        }
        panic!("the world did not settle after 10,000 rounds");
    }

    pub(super) fn pump_hubs(&mut self) -> bool {
        let mut moved = false;
        for h in 0..self.hubs.len() {
            if !self.hubs[h].alive {
                continue;
            }
            while let Some(o) = self.hubs[h].node.poll_output() {
                moved = true;
                self.hub_output(h, o);
            }
        }
        moved
    }

    pub(super) fn log(&self, what: std::fmt::Arguments) {
        if self.debug {
            eprintln!("[{:>12?}] {what}", self.now.duration_since(self.origin));
        }
    }

    pub(super) fn hub_output(&mut self, h: usize, o: NodeOutput) {
        let now = self.now;
        self.log(format_args!("hub {h}: {o:?}"));
        match o {
            NodeOutput::Hub(HubOutput::Registry { op, call }) => {
                let incarnation = self.hubs[h].incarnation;
                if self.held_until(Node::Hub(h), Node::Redis).is_some() {
                    return; // lost on the way; the hub times the call out
                }
                let d = self.latency();
                self.schedule(
                    d,
                    Event::RegistryArrive {
                        hub: h,
                        incarnation,
                        op,
                        call,
                    },
                );
            }
            NodeOutput::AcceptTunnel { tunnel, epoch } => {
                let replica = self.hubs[h].cfg.replica_id.clone();
                let agent = match self.eps.get_mut(&tunnel.0) {
                    Some(Ep {
                        link: Link::Tunnel(t),
                        agent_id,
                        ..
                    }) => {
                        t.accept_as(now, epoch, &replica);
                        agent_id.clone()
                    }
                    _ => None,
                };
                if agent.as_deref() == Some("rogue") {
                    self.fail(format!(
                        "hub {h} accepted the tunnel of an agent whose token does not list its connector"
                    ));
                }
                if let Some(agent) = agent {
                    match self.owner_of.get(&(agent.clone(), epoch)) {
                        Some(&other) if other != h => self.fail(format!(
                            "hubs {other} and {h} both own `{agent}` under epoch {}",
                            epoch.0
                        )),
                        _ => {
                            self.owner_of.insert((agent, epoch), h);
                        }
                    }
                }
            }
            NodeOutput::CloseTunnel {
                tunnel,
                code,
                reason,
            } => {
                if let Some(Link::Tunnel(t)) = self.eps.get_mut(&tunnel.0).map(|e| &mut e.link) {
                    t.close(code, &reason);
                }
            }
            NodeOutput::Refused(r) => {
                if r.refusal.stage() == RefusalStage::Hello {
                    self.outcome.hellos_refused += 1;
                }
                self.tunnel_refused(h, &r);
            }
            NodeOutput::Hub(HubOutput::Route { client, route }) => self.route(h, client, route),
            // The sim's mesh is configured, not discovered.
            NodeOutput::Hub(
                HubOutput::Peers(_) | HubOutput::PeerDeparted { .. } | HubOutput::Announced,
            ) => {}
            NodeOutput::DrainTunnel { tunnel } => {
                if let Some(Link::Tunnel(t)) = self.eps.get_mut(&tunnel.0).map(|e| &mut e.link) {
                    t.send_drain();
                }
            }
            NodeOutput::CloseListeners => self.hubs[h].listening = false,
            NodeOutput::Drained { complete, .. } => {
                // The hub exits once the node's output is performed.
                let incarnation = self.hubs[h].incarnation;
                self.schedule(
                    Duration::ZERO,
                    Event::HubDrainEnd {
                        hub: h,
                        incarnation,
                        complete,
                    },
                );
            }
            // The node turns these into its own outputs.
            NodeOutput::Hub(
                HubOutput::AcceptTunnel { .. }
                | HubOutput::CloseTunnel { .. }
                | HubOutput::DrainTunnel { .. },
            ) => {}
        }
    }

    pub(super) fn route(&mut self, h: usize, client: u64, route: Route) {
        // A flow never crosses tenants: the agent chosen must be one of the
        // client's listener's tenant.
        let tenant = self.clients[&client].tenant;
        let chosen = match &route {
            Route::Local { tunnel, .. } => self.eps.get(&tunnel.0).and_then(|e| e.agent_id.clone()),
            Route::Mesh { agent_id, .. } => Some(agent_id.clone()),
            Route::Refuse { .. } => None,
        };
        if let Some(agent) = chosen
            && split(&agent).0 != tenant
        {
            return self.fail(format!(
                "hub {h} routed a client of tenant `{tenant}` to agent `{agent}`"
            ));
        }
        let connector = qualify(tenant, "echo");
        let opened = match &route {
            Route::Local { tunnel, .. } => match self.eps.get_mut(&tunnel.0).map(|e| &mut e.link) {
                Some(Link::Tunnel(t)) => match t.open_flow("echo") {
                    Ok(cid) => Some((tunnel.0, cid)),
                    Err(SendError::NotEstablished) => None,
                    Err(_) => {
                        // The agent's tunnel is full: refused as such.
                        let c = self.clients.get_mut(&client).expect("client");
                        c.state = ClientState::Done;
                        c.ended = Some(ErrorCode::LimitExceeded);
                        let code = ErrorCode::LimitExceeded.as_str();
                        *self.outcome.flows_refused.entry(code).or_default() += 1;
                        self.hubs[h].node.flow_ended(*tunnel);
                        self.client_closed(h, client);
                        return;
                    }
                },
                _ => None,
            },
            Route::Mesh {
                replica_id,
                agent_id,
                epoch,
            } => {
                let link = self.eps.iter_mut().find(|(_, e)| {
                    e.node == Node::Hub(h) && e.mesh_up.as_deref() == Some(replica_id.as_str())
                });
                match link {
                    Some((
                        id,
                        Ep {
                            link: Link::Mesh(m),
                            ..
                        },
                    )) => m
                        .open_flow(&connector, agent_id, *epoch)
                        .ok()
                        .map(|cid| (*id, cid)),
                    _ => None,
                }
            }
            Route::Refuse { code, .. } => {
                let c = self.clients.get_mut(&client).expect("client");
                c.state = ClientState::Done;
                c.ended = Some(*code);
                *self.outcome.flows_refused.entry(code.as_str()).or_default() += 1;
                self.client_closed(h, client);
                return;
            }
        };
        let c = self.clients.get_mut(&client).expect("client");
        match opened {
            Some((ep, cid)) => {
                c.state = ClientState::Open { ep, cid };
                self.client_of.insert((ep, cid), client);
                // A local flow was counted on its tunnel by the node when
                // it routed it.
                if !matches!(route, Route::Local { .. }) {
                    self.outcome.flows_via_mesh += 1;
                }
                self.schedule(Duration::ZERO, Event::ClientStep { client });
            }
            None => {
                c.state = ClientState::Done;
                c.ended = Some(ErrorCode::LinkLost);
                *self.outcome.flows_refused.entry("open_failed").or_default() += 1;
                if let Route::Local { tunnel, .. } = route {
                    self.hubs[h].node.flow_ended(tunnel);
                }
                self.client_closed(h, client);
            }
        }
    }

    pub(super) fn hub_tunnel_event(&mut self, h: usize, ep: EpId, e: TunnelEvent) {
        let now = self.now;
        match e {
            TunnelEvent::Hello { .. } => {
                if self.hubs[h].node.tunnel(TunnelId(ep)).is_none() {
                    return self.fail(format!("hub {h}: a HELLO on tunnel {ep} without a token"));
                }
                self.hubs[h].node.tunnel_event(now, TunnelId(ep), &e);
                // Admitted: the node knows the agent by its qualified name.
                let agent = self.hubs[h]
                    .node
                    .tunnel(TunnelId(ep))
                    .and_then(|t| t.agent());
                if let (Some(agent), Some(e)) = (agent, self.eps.get_mut(&ep)) {
                    e.agent_id = Some(agent);
                }
            }
            TunnelEvent::Flow(fe) => self.hub_flow_event(ep, fe),
            TunnelEvent::Established { .. } => {
                self.hubs[h].node.tunnel_event(now, TunnelId(ep), &e)
            }
            TunnelEvent::Closed { .. } => {
                self.hubs[h].node.tunnel_event(now, TunnelId(ep), &e);
                self.remove_ep(ep);
            }
            TunnelEvent::Reauth { token } => self.hub_reauth(h, ep, &token),
            TunnelEvent::Open { .. } | TunnelEvent::Rtt(_) | TunnelEvent::Drain => {}
        }
    }

    /// A flow event at a hub: for a client, or for one side of a bridge.
    pub(super) fn hub_flow_event(&mut self, ep: EpId, fe: FlowEvent) {
        let cid = flow_cid(&fe);
        if self.eps.get(&ep).is_some_and(|e| e.relay.contains(cid)) {
            self.bridge_event(ep, fe);
        } else {
            self.client_event(ep, fe);
        }
    }

    pub(super) fn mesh_event(&mut self, h: usize, ep: EpId, me: MeshEvent) {
        if matches!(
            me,
            MeshEvent::Established { .. } | MeshEvent::Down { .. } | MeshEvent::Connect
        ) {
            self.log(format_args!("hub {h} mesh ep {ep}: {me:?}"));
        }
        match me {
            MeshEvent::Connect => {
                let d = self.latency() * 2;
                self.schedule(d, Event::MeshDialDone { ep });
            }
            MeshEvent::Established { peer_replica } => {
                let e = self.eps.get_mut(&ep).expect("ep");
                if e.mesh_to.is_some() {
                    self.hubs[h]
                        .node
                        .hub_mut()
                        .mesh_link_up(&peer_replica, true);
                    e.mesh_up = Some(peer_replica);
                }
            }
            MeshEvent::Open {
                cid,
                connector,
                agent_id,
                epoch,
            } => self.owner_open(h, ep, cid, &connector, &agent_id, epoch),
            MeshEvent::OpenAccepted { .. } | MeshEvent::Rtt(_) => {}
            MeshEvent::Flow(fe) => self.hub_flow_event(ep, fe),
            MeshEvent::StaleEpoch { .. } => self.hubs[h].node.hub_mut().count_epoch_mismatch(),
            MeshEvent::Down { .. } => {
                let e = self.eps.get_mut(&ep).expect("ep");
                if let Some(name) = e.mesh_up.take() {
                    self.hubs[h].node.hub_mut().mesh_link_up(&name, false);
                }
                if e.mesh_to.is_some() {
                    // Outbound: it reconnects by itself; the old socket ends.
                    // The next connection is another one for the flows'
                    // addresses: nothing late reaches its flows.
                    // (The core reset every flow before `Down`, so the old
                    // relay is empty; whatever it held still ends.)
                    e.conn += 1;
                    let mut old = std::mem::take(&mut e.relay);
                    let peer = e.peer.take();
                    old.link_lost("the mesh link reconnects");
                    self.carry_out_relay(ep, Node::Hub(h), &mut old);
                    if let Some(p) = peer {
                        self.send_close(ep, Node::Hub(h), p);
                    }
                } else {
                    self.remove_ep(ep);
                }
            }
        }
    }

    /// Owner side of a mesh open: fencing, then a bridge to the agent's tunnel.
    pub(super) fn owner_open(
        &mut self,
        h: usize,
        ep: EpId,
        cid: Cid,
        connector: &str,
        agent_id: &str,
        epoch: Epoch,
    ) {
        let checked = self.hubs[h].node.mesh_open(agent_id, connector, epoch);
        let Some(Ep {
            link: Link::Mesh(mesh),
            ..
        }) = self.eps.get_mut(&ep)
        else {
            if let Ok(t) = checked {
                self.hubs[h].node.flow_ended(t);
            }
            return;
        };
        let tunnel = match checked {
            Ok(t) => t,
            Err((code, reason)) => {
                if code == ErrorCode::StaleEpoch {
                    self.outcome.stale_epoch_refusals += 1;
                }
                mesh.refuse_open(cid, code, &reason);
                return;
            }
        };
        if split(connector).0 != split(agent_id).0 {
            self.fail(format!(
                "hub {h} bridged a mesh open for `{connector}` to agent `{agent_id}` of another tenant"
            ));
        }
        // The independent check: what this hub owns, under which epoch.
        let owned = self.hubs[h].node.hub_mut().owned_tunnels(agent_id);
        if !owned.contains(&(tunnel, epoch)) {
            let cur: Vec<u64> = owned.iter().map(|(_, e)| e.0).collect();
            self.fail(format!(
                "hub {h} let a mesh flow under stale epoch {} reach the tunnel of `{agent_id}` (current epochs {cur:?})",
                epoch.0
            ));
        }
        // Held until the agent's tunnel took the flow (the relay accepts the
        // open on the join, or refuses it with the tunnel's reason); the
        // bridge reaches the tunnel's task a moment later, as in the runtime.
        let Some(e) = self.eps.get_mut(&ep) else {
            self.hubs[h].node.flow_ended(tunnel);
            return;
        };
        let conn = e.conn;
        e.relay.hold_open(cid, connector);
        self.carry_out(ep);
        let mesh = FlowAddr { ep, conn, cid };
        let hop = self.hop();
        self.schedule(
            hop,
            Event::BridgeOpen {
                hub: h,
                mesh,
                tunnel: tunnel.0,
                connector: connector.to_string(),
            },
        );
    }

    pub(super) fn pump_agents(&mut self) -> bool {
        let mut moved = false;
        for i in 0..self.agents.len() {
            // A tunnel just established, or left with an older token.
            moved |= self.catch_up(i);
            while let Some(c) = self.agents[i].node.poll_command() {
                moved = true;
                self.agent_command(i, c);
            }
        }
        moved
    }

    /// Carry out what agent `i`'s node asks for: the simulated sockets and
    /// dials, as a runtime's agent loop does with real ones.
    fn agent_command(&mut self, i: usize, c: AgentCommand) {
        match c {
            AgentCommand::DialHub { attempt, url, .. } => {
                let hub = url
                    .trim_start_matches("sim://")
                    .parse()
                    .expect("sim hub url");
                let d = self.latency() * 2;
                let incarnation = self.agents[i].incarnation;
                let token = self.dial_token(i);
                self.schedule(
                    d,
                    Event::HubDialDone {
                        agent: i,
                        incarnation,
                        attempt,
                        hub,
                        token,
                    },
                );
            }
            // A late dial finds the node no longer dialing it.
            AgentCommand::CancelHubDial { .. } => {}
            AgentCommand::CloseTunnel {
                attempt,
                code,
                reason,
            } => {
                if let Some(ep) = self.agents[i].eps.get(&attempt).copied()
                    && let Some(Link::Tunnel(t)) = self.eps.get_mut(&ep).map(|e| &mut e.link)
                {
                    t.close(code, &reason);
                }
            }
            AgentCommand::EndTunnel { attempt, .. } => {
                if let Some(ep) = self.agents[i].eps.remove(&attempt) {
                    // What the tunnel queued (its CLOSE) goes out before the
                    // connection closes.
                    let mut out = Vec::new();
                    if let Some(Link::Tunnel(t)) = self.eps.get_mut(&ep).map(|e| &mut e.link) {
                        while let Some(m) = t.poll_transmit() {
                            out.push(m);
                        }
                    }
                    for m in out {
                        self.send(ep, m);
                    }
                    self.remove_ep(ep);
                }
            }
            AgentCommand::DialTarget { attempt, cid, .. } => {
                let ok = !self.chance(self.faults.target_refuse);
                if !ok {
                    self.outcome.target_refusals += 1;
                }
                let d = self.latency();
                if let Some(ep) = self.agents[i].eps.get(&attempt).copied() {
                    self.schedule(d, Event::TargetDialDone { ep, cid, ok });
                }
            }
            AgentCommand::CancelTarget { attempt, cid } => {
                if let Some(ep) = self.agents[i].eps.get(&attempt).copied() {
                    self.targets.remove(&(ep, cid));
                }
            }
            AgentCommand::ResetFlow {
                attempt,
                cid,
                code,
                reason,
            } => {
                if let Some(ep) = self.agents[i].eps.get(&attempt).copied() {
                    self.targets.remove(&(ep, cid));
                    if let Some(l) = self.flow_link(ep) {
                        l.reset_flow(cid, code, &reason);
                    }
                }
            }
        }
    }

    /// An event of agent `i`'s tunnel endpoint `ep`: the flow's bytes go to
    /// its simulated target here; what concerns the agent as a whole is the
    /// node's.
    pub(super) fn agent_tunnel_event(&mut self, i: usize, ep: EpId, e: TunnelEvent) {
        let now = self.now;
        let attempt = self.eps.get(&ep).map_or(AttemptId(0), |e| e.attempt);
        if self.agents[i].eps.get(&attempt) != Some(&ep) {
            // A tunnel the node has ended already.
            if matches!(e, TunnelEvent::Closed { .. }) {
                self.remove_ep(ep);
            }
            return;
        }
        match &e {
            TunnelEvent::Open { cid, .. } => {
                self.targets.insert((ep, *cid), Target::default());
            }
            TunnelEvent::Flow(fe) => match fe {
                FlowEvent::Data { cid, payload } => {
                    let cid = *cid;
                    let Some(t) = self.targets.get_mut(&(ep, cid)) else {
                        return;
                    };
                    t.buf.extend_from_slice(payload);
                    if t.connected {
                        if let Some(l) = self.flow_link(ep) {
                            l.consumed(cid, payload.len());
                        }
                    } else {
                        t.inbox += payload.len();
                    }
                    self.echo(ep, cid);
                }
                FlowEvent::Fin { cid } => {
                    if let Some(t) = self.targets.get_mut(&(ep, *cid)) {
                        t.fin = true;
                    }
                    self.echo(ep, *cid);
                }
                FlowEvent::Writable { cid, .. } => self.echo(ep, *cid),
                FlowEvent::Reset { cid, .. } | FlowEvent::Closed { cid } => {
                    self.targets.remove(&(ep, *cid));
                }
            },
            _ => {}
        }
        self.agents[i].node.tunnel_event(now, attempt, &e);
    }
}
