//! Clients: one accept loop per listener (rates, connection limits, PROXY
//! headers) and one task per client connection, routed by the core.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nowconnect_core::admission::{Admission, EdgeDecision, EdgeRefusal, ProxyEdge};
use nowconnect_core::hub::TunnelId;
use nowconnect_core::routing::Route;
use nowconnect_core::{Epoch, ErrorCode};

use crate::driver::{FlowEnd, MeshCmd, MeshTx, OpenRefused, TunnelCmd, TunnelTx, send_open};
use crate::logging::LogThrottle;
use crate::metrics::labels;
use crate::rt::HubRt;

use super::Shared;

impl<R: HubRt> Shared<R> {
    fn refuse_client(&self, reason: &str) {
        self.metrics
            .client_connections_refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// [`Shared::refuse_client`] at a listener's edge, where anyone who can
    /// connect can cause refusals at will: `Some(held_back)` when this one
    /// may be logged (one line a second a listener; the lines held back
    /// since are counted in it), `None` when it is only counted.
    fn refuse_at_edge(&self, log: &LogThrottle, reason: &str) -> Option<u64> {
        self.refuse_client(reason);
        log.admit(Instant::now())
    }

    pub(super) async fn accept_loop(
        self: Arc<Self>,
        name: String,
        connector: String,
        listener: R::Listener,
    ) {
        tracing::info!(listener = %name, addr = ?R::local_addr(&listener).ok(), %connector, "listening");
        let edge = self
            .cfg
            .listener_edges
            .get(&name)
            .cloned()
            .unwrap_or_else(crate::config::ListenerEdge::unlimited);
        let admission = Arc::new(Mutex::new(Admission::new(edge.limits, Instant::now())));
        let proxy_edge = Arc::new(Mutex::new(match edge.proxy {
            Some(_) => ProxyEdge::proxied(edge.limits.max_connections),
            None => ProxyEdge::direct(),
        }));
        let edge = Arc::new(edge);
        let log = Arc::new(LogThrottle::new(Duration::from_secs(1)));
        loop {
            let (stream, from) = match R::accept(&listener).await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, do not spin.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    self.rt.sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The node takes the client (one of the hub's client
            // connections, counted for a drain) before anything is read
            // from it; the guard gives the slot back however it ends.
            let client = self.id();
            let accepted = self.with_control(|c, now| c.node.client_accepted(now, client));
            if let Err(refusal) = accepted {
                if let Some(held_back) = self.refuse_at_edge(&log, refusal.as_str()) {
                    tracing::warn!(listener = %name, peer = %crate::logging::client_addr(from), held_back, "client connection limit reached");
                }
                continue;
            }
            let guard = ClientGuard(self.clone(), client);
            let trusted = edge.proxy.as_ref().is_some_and(|t| t.trusts(from.ip()));
            let decision = proxy_edge.lock().expect("edge lock").arrive(trusted);
            match decision {
                EdgeDecision::Serve => {
                    if let Some(slots) = self.admit(guard, &name, &admission, &log, from) {
                        self.rt.spawn(self.clone().serve_client(
                            slots,
                            name.clone(),
                            connector.clone(),
                            stream,
                            from,
                            edge.first_byte_timeout,
                        ));
                    }
                    continue;
                }
                EdgeDecision::Refuse(refusal) => {
                    if let Some(held_back) = self.refuse_at_edge(&log, refusal.as_str()) {
                        match refusal {
                            EdgeRefusal::UntrustedProxy => {
                                tracing::warn!(listener = %name, peer = %crate::logging::client_addr(from), held_back, "client connection refused: the listener takes PROXY protocol connections from its trusted proxies only")
                            }
                            _ => {
                                tracing::warn!(listener = %name, proxy = %from, reason = refusal.as_str(), held_back, "client connection refused: as many connections as the listener takes are still sending their PROXY header")
                            }
                        }
                    }
                    continue;
                }
                EdgeDecision::ReadProxyHeader => {}
            }
            let pending = PendingGuard(proxy_edge.clone());
            let (shared, name, connector, edge, admission, log) = (
                self.clone(),
                name.clone(),
                connector.clone(),
                edge.clone(),
                admission.clone(),
                log.clone(),
            );
            self.rt.spawn(async move {
                let within = edge
                    .first_byte_timeout
                    .map_or(PROXY_HEADER_TIMEOUT, |t| t.min(PROXY_HEADER_TIMEOUT));
                let (stream, header) = shared.rt.read_proxy_header(stream, within).await;
                drop(pending);
                let peer = match ProxyEdge::client_of(from, header) {
                    Ok(peer) => peer,
                    Err((refusal, reason)) => {
                        if let Some(held_back) = shared.refuse_at_edge(&log, refusal.as_str()) {
                            tracing::warn!(listener = %name, proxy = %from, %reason, held_back, "client connection refused: no valid PROXY protocol header");
                        }
                        return;
                    }
                };
                if let Some(slots) = shared.admit(guard, &name, &admission, &log, peer) {
                    shared
                        .clone()
                        .serve_client(slots, name, connector, stream, peer, edge.first_byte_timeout)
                        .await;
                }
            });
        }
    }

    /// Count a new client of listener `name` from `peer` (accepted by the
    /// node: `client`) against the listener's limits, or refuse it
    /// (counted, and logged through `log`; dropping `client` closes it).
    fn admit(
        &self,
        client: ClientGuard<R>,
        name: &str,
        admission: &Arc<Mutex<Admission>>,
        log: &LogThrottle,
        peer: SocketAddr,
    ) -> Option<Slots<R>> {
        let res = admission
            .lock()
            .expect("admission lock")
            .admit(Instant::now(), peer.ip());
        match res {
            Ok(()) => Some(Slots {
                _load: LoadGuard(admission.clone(), peer.ip()),
                client,
            }),
            Err(refusal) => {
                if let Some(held_back) = self.refuse_at_edge(log, refusal.as_str()) {
                    let limits = admission.lock().expect("admission lock").limits();
                    tracing::warn!(listener = %name, peer = %crate::logging::client_addr(peer), reason = refusal.as_str(), ?limits, held_back, "client connection refused: listener limit reached");
                }
                None
            }
        }
    }

    /// One client of listener `listener`, whose `connector` is qualified by
    /// the listener's tenant: only that tenant's agents (and, when the
    /// listener pins them, only those) can be chosen.
    async fn serve_client(
        self: Arc<Self>,
        slots: Slots<R>,
        listener: String,
        connector: String,
        stream: R::Stream,
        peer: SocketAddr,
        first_byte: Option<Duration>,
    ) {
        let shared = self;
        // Counted by the node since its accept (a drain waits for it) and
        // by its listener until `slots` goes, with this task.
        let client = slots.client.1;
        let (tx, rx) = async_channel::bounded(1);
        let pin = shared.cfg.listener_pins.get(&listener);
        shared.with_control(|c, now| {
            c.routes.insert(client, tx);
            c.node
                .client_connected(now, client, &connector, pin.map(Vec::as_slice));
        });
        let Ok(route) = rx.recv().await else {
            return;
        };
        let mut local_epoch = None;
        let (tunnel, agent_id, route_kind, open) = match route {
            Route::Local { tunnel, agent_id } => {
                let (link, epoch) = {
                    let c = shared.control.lock().expect("control lock");
                    // The tunnel's epoch now (a reclaim after Redis lost
                    // its data moves it), for the flow's debug line only:
                    // the open path does not pay for it otherwise.
                    let epoch = tracing::enabled!(tracing::Level::DEBUG)
                        .then(|| c.node.hub().owned_tunnels(&agent_id))
                        .and_then(|owned| owned.into_iter().find(|(t, _)| *t == tunnel))
                        .map(|(_, e)| e.0);
                    (c.tunnels.get(&tunnel).cloned(), epoch)
                };
                local_epoch = epoch;
                // The agent knows its connectors by their bare names.
                let open = OpenRequest::Tunnel {
                    link,
                    connector: nowconnect_core::tenant::split(&connector).1.to_string(),
                };
                (Some(tunnel), agent_id, "local", open)
            }
            Route::Mesh {
                replica_id,
                agent_id,
                epoch,
            } => {
                let link = shared
                    .mesh_links
                    .lock()
                    .expect("mesh links lock")
                    .sender(&replica_id);
                let open = OpenRequest::Mesh {
                    link,
                    connector: connector.clone(),
                    agent_id: agent_id.clone(),
                    epoch,
                };
                (None, format!("{agent_id}@{replica_id}"), "mesh", open)
            }
            Route::Refuse { code, reason } => {
                shared.refuse_client(code.as_str());
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, %code, %reason, "client connection refused");
                return;
            }
        };
        // Counted on its tunnel since the routing decision (see `pump`).
        let _counted = tunnel.map(|t| TunnelFlowGuard(shared.clone(), t));
        let rrx = open.send();
        let end: FlowEnd = match rrx.recv().await {
            Ok(Ok(end)) => end,
            Ok(Err(refused)) => {
                shared.refuse_client(refused.label);
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, reason = %refused.reason, code = %refused.code, "client connection refused");
                return;
            }
            Err(_) => {
                shared.refuse_client(ErrorCode::LinkLost.as_str());
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, "client connection refused: the link to the agent went away");
                return;
            }
        };
        tracing::debug!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, tunnel = tunnel.map(|t| t.0), epoch = local_epoch, cid = end.cid.0, "flow opened");
        shared
            .metrics
            .flows
            .get_or_create(&labels(&[("connector", &connector), ("route", route_kind)]))
            .inc();
        let timeouts = crate::driver::ClientTimeouts {
            idle: match shared.cfg.raw.limits.client_idle_timeout_sec {
                0 => None,
                s => Some(Duration::from_secs(s)),
            },
            first_byte,
        };
        shared
            .rt
            .pipe_client(stream, end, shared.metrics.clone(), timeouts)
            .await;
    }
}

/// How a client's flow is opened: on a local agent tunnel or over the mesh
/// (`link`: none when it went away since the routing decision).
enum OpenRequest {
    Tunnel {
        link: Option<TunnelTx>,
        connector: String,
    },
    Mesh {
        link: Option<MeshTx>,
        connector: String,
        agent_id: String,
        epoch: Epoch,
    },
}

impl OpenRequest {
    /// Send the open to its link; where its answer arrives.
    fn send(self) -> async_channel::Receiver<Result<FlowEnd, OpenRefused>> {
        match self {
            OpenRequest::Tunnel { link, connector } => {
                send_open(link, |reply| TunnelCmd::OpenFlow { connector, reply })
            }
            OpenRequest::Mesh {
                link,
                connector,
                agent_id,
                epoch,
            } => send_open(link, |reply| MeshCmd::OpenFlow {
                connector,
                agent_id,
                epoch,
                reply,
            }),
        }
    }
}

/// The longest a trusted balancer has to send its PROXY header (less when
/// the listener's first-byte timeout is shorter).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection counted by its listener's [`ProxyEdge`] while it sends
/// its PROXY header ([`EdgeDecision::ReadProxyHeader`]); ended once, when
/// dropped (read, failed, timed out, or the task dropped).
struct PendingGuard(Arc<Mutex<ProxyEdge>>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.lock().expect("edge lock").header_ended();
    }
}

/// A client's slots: the node's ([`ClientGuard`]) and its listener's
/// ([`LoadGuard`]), both given back when the client's task ends.
struct Slots<R: HubRt> {
    client: ClientGuard<R>,
    _load: LoadGuard,
}

/// A client connection admitted by its listener ([`Admission`]), released
/// when dropped.
struct LoadGuard(Arc<Mutex<Admission>>, std::net::IpAddr);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.lock().expect("admission lock").release(self.1);
    }
}

/// A client connection the node accepted ([`HubNode::client_accepted`]),
/// counted until this goes, whichever way the connection ends: refused at
/// the listener's edge or admission, refused by its route, or served. The
/// one place a client is closed, so exactly once.
///
/// [`HubNode::client_accepted`]: nowconnect_core::hub_node::HubNode::client_accepted
struct ClientGuard<R: HubRt>(Arc<Shared<R>>, u64);

impl<R: HubRt> Drop for ClientGuard<R> {
    fn drop(&mut self) {
        let client = self.1;
        self.0.with_control(|c, now| {
            // Not routed yet (its task was dropped): the route, when it
            // comes, finds no one and ends its count (see `pump`).
            c.routes.remove(&client);
            c.node.client_closed(now, client);
        });
    }
}

/// Ends a local flow's count on its tunnel however the client ends.
struct TunnelFlowGuard<R: HubRt>(Arc<Shared<R>>, TunnelId);

impl<R: HubRt> Drop for TunnelFlowGuard<R> {
    fn drop(&mut self) {
        self.0.flow_ended(self.1);
    }
}
