//! The hub process, written once for every runtime: the control loop around
//! the core [`HubNode`] (the [`Hub`] and the hub's agent tunnels, whose
//! HELLO, renewal and token-expiry decisions it makes), one task per agent
//! tunnel, one accept loop per listener, one task per client connection,
//! graceful drain, configuration reload and the file watcher. An adapter
//! supplies what only it can do through [`HubRt`]: spawn and sleep, bind and
//! accept TCP, dial and accept mesh WebSockets, pipe a client socket, call
//! Redis, and serve HTTP.
//!
//! Here: the shared state ([`Shared`]), the control loop that performs the
//! core's outputs, and [`start`]. Beside it, by concern: `tunnels` (agent
//! tunnels), `clients` (accept loops and client connections), `mesh_peers`
//! and `mesh_tasks` (the mesh), `reload` (reload and the file watcher) and
//! `drain`.

mod clients;
mod drain;
mod http_port;
mod mesh_peers;
mod mesh_tasks;
mod reload;
mod tunnels;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::future::race;
use nowconnect_core::ErrorCode;
use nowconnect_core::hub::{Hub, HubConfig as CoreHubConfig, HubOutput, TunnelId};
use nowconnect_core::hub_node::{HubNode, NodeOutput};
use nowconnect_core::registry::MemoryRegistry;
use nowconnect_core::routing::{Mode, Route};

use crate::config::HubConfig;
use crate::driver::{LinkCmd, TunnelCmd, TunnelTx};
use crate::jwt::{AgentIdentity, Verifier};
use crate::mesh::{MeshLinks, MeshTlsConfigs};
use crate::metrics::{Metrics, labels};

pub use crate::rt::{HubRt, WsIn};
pub use http_port::{HttpRole, HubHttp};

/// The control state shared by all tasks (not on the data path).
struct Control {
    /// The core `Hub` and its agent tunnels.
    node: HubNode,
    /// In-process registry; `None`: Redis through the runtime.
    memory: Option<MemoryRegistry>,
    tunnels: BTreeMap<TunnelId, TunnelTx>,
    /// Who each live tunnel's token says its agent is (re-checked against
    /// the revocation list).
    identities: BTreeMap<TunnelId, AgentIdentity>,
    routes: BTreeMap<u64, Sender<Route>>,
    /// The deadline the control timer sleeps until (`None`: none), so that
    /// an event wakes it only when the node's next deadline moved earlier.
    timer_armed: Option<Instant>,
}

pub struct Shared<R: HubRt> {
    rt: R,
    cfg: HubConfig,
    metrics: Arc<Metrics>,
    /// Replaced whole on reload; read per `/tunnel` request, never held
    /// across an await.
    verifier: RwLock<Arc<Verifier>>,
    control: Mutex<Control>,
    /// Wakes the control timer when the core's deadline may have moved.
    control_wake: (Sender<()>, Receiver<()>),
    next_id: AtomicU64,
    /// The node's drain steps (`CloseListeners`, `Drained`), for
    /// [`Shared::drain`]; each comes once.
    drain_steps: (Sender<NodeOutput>, Receiver<NodeOutput>),
    mesh_links: Mutex<MeshLinks>,
    /// Mesh URLs with an outbound link task: static peers (`None`) and
    /// discovered ones (the replica the registry announced at the URL).
    mesh_dialed: Mutex<BTreeMap<String, Option<String>>>,
    /// The registry's last listing: mesh URL → replica id.
    mesh_peer_urls: Mutex<BTreeMap<String, String>>,
    /// Registry URLs refused (logged once each).
    mesh_refused_urls: Mutex<std::collections::BTreeSet<String>>,
    /// Mesh TLS (server and client sides), replaced whole on reload: new
    /// links use the new certificates, established links keep theirs.
    mesh_tls: RwLock<MeshTlsConfigs>,
    /// TLS of the HTTP port (`http.tls`), replaced whole on reload: new
    /// connections use the new certificate, open ones keep theirs.
    http_tls: RwLock<Option<Arc<rustls::ServerConfig>>>,
    mesh_started: AtomicBool,
    /// The files whose change triggers a reload (config, keys, certificates).
    watched: Mutex<Vec<PathBuf>>,
}

/// A running hub: its bound addresses and a way to stop it.
pub struct HubHandle<R: HubRt> {
    pub http_addr: SocketAddr,
    /// The bound `http.ops_bind` port.
    pub ops_addr: Option<SocketAddr>,
    pub mesh_addr: Option<SocketAddr>,
    pub listener_addrs: Vec<(String, SocketAddr)>,
    stop: Sender<()>,
    done: Receiver<()>,
    shared: Arc<Shared<R>>,
}

impl<R: HubRt> HubHandle<R> {
    /// Re-read the configuration file and apply what can change without a
    /// restart (see [`Shared::reload`]).
    pub fn reload(&self) -> Result<String, String> {
        self.shared.reload()
    }

    /// The one line on stdout that operators and tests wait for:
    /// `nowconnect hub ready http=… [ops=…] [mesh=…] listeners=name=addr,…`.
    pub fn ready_line(&self) -> String {
        let listeners: Vec<String> = self
            .listener_addrs
            .iter()
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        let mesh = self
            .mesh_addr
            .map(|m| format!(" mesh={m}"))
            .unwrap_or_default();
        let ops = self
            .ops_addr
            .map(|o| format!(" ops={o}"))
            .unwrap_or_default();
        format!(
            "nowconnect hub ready http={}{ops}{mesh} listeners={}",
            self.http_addr,
            listeners.join(",")
        )
    }

    /// Graceful stop: drain (see [`Shared::drain`]), then close every
    /// tunnel and the HTTP server.
    pub async fn shutdown(self) {
        let _ = self.stop.try_send(());
        let _ = self.done.recv().await;
    }
}

impl<R: HubRt> Shared<R> {
    pub fn cfg(&self) -> &HubConfig {
        &self.cfg
    }

    pub fn rt(&self) -> &R {
        &self.rt
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn is_draining(&self) -> bool {
        self.control
            .lock()
            .expect("control lock")
            .node
            .is_draining()
    }

    /// A flow counted by `HubNode::mesh_open` (or a client's route) ended.
    pub fn flow_ended(self: &Arc<Self>, tunnel: TunnelId) {
        self.flows_ended(tunnel, 1);
    }

    /// `n` flows of `tunnel` ended.
    fn flows_ended(self: &Arc<Self>, tunnel: TunnelId, n: usize) {
        if n > 0 {
            self.with_control(|c, _| {
                for _ in 0..n {
                    c.node.flow_ended(tunnel);
                }
            });
        }
    }

    /// Count a refusal of a credential holder going beyond its credential.
    pub fn security_event(&self, kind: &'static str) {
        self.metrics
            .security_events
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Run `f` on the control state, then perform every output it caused.
    fn with_control<T>(self: &Arc<Self>, f: impl FnOnce(&mut Control, Instant) -> T) -> T {
        let now = Instant::now();
        let mut c = self.control.lock().expect("control lock");
        let r = f(&mut c, now);
        self.pump(&mut c, now);
        let earlier = match (c.node.poll_timeout(), c.timer_armed) {
            (Some(next), Some(armed)) => next < armed,
            (next, armed) => next.is_some() && armed.is_none(),
        };
        drop(c);
        if earlier {
            let _ = self.control_wake.0.try_send(());
        }
        r
    }

    fn pump(self: &Arc<Self>, c: &mut Control, now: Instant) {
        while let Some(out) = c.node.poll_output() {
            let out = match out {
                NodeOutput::Hub(out) => out,
                NodeOutput::AcceptTunnel { tunnel, epoch } => {
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let replica_id = c.node.hub().replica_id().to_string();
                        let _ = tx.try_send(LinkCmd::Link(TunnelCmd::Accept { epoch, replica_id }));
                    }
                    continue;
                }
                NodeOutput::CloseTunnel {
                    tunnel,
                    code,
                    reason,
                } => {
                    tracing::warn!(target: "nowconnect::security", tunnel = tunnel.0, %code, %reason, "closing agent tunnel");
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let _ = tx.try_send(LinkCmd::Close { code, reason });
                    }
                    continue;
                }
                NodeOutput::DrainTunnel { tunnel } => {
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let _ = tx.try_send(LinkCmd::Link(TunnelCmd::Drain));
                    }
                    continue;
                }
                NodeOutput::Refused(r) => {
                    self.tunnel_refused(&r);
                    continue;
                }
                step @ (NodeOutput::CloseListeners | NodeOutput::Drained { .. }) => {
                    let _ = self.drain_steps.0.try_send(step);
                    continue;
                }
            };
            match out {
                HubOutput::Registry { op, call } => match &mut c.memory {
                    Some(m) => {
                        let r = m.apply(now, &call);
                        c.node.hub_mut().registry_reply(now, op, r);
                    }
                    None => {
                        let shared = self.clone();
                        let name = call.name();
                        let reply = self.rt.registry_apply(call);
                        self.rt.spawn(async move {
                            let r = reply.await;
                            if let Err(e) = &r {
                                shared.metrics.registry_errors.inc();
                                tracing::warn!(op = name, error = %e, "registry call failed");
                            }
                            shared
                                .with_control(|c, now| c.node.hub_mut().registry_reply(now, op, r));
                        });
                    }
                },
                HubOutput::Route { client, route } => {
                    // A local flow counts on its tunnel from the routing
                    // decision on (the node counted it); `serve_client`
                    // ends it, or this if the client is gone.
                    let local = match &route {
                        Route::Local { tunnel, .. } => Some(*tunnel),
                        _ => None,
                    };
                    let delivered = match c.routes.remove(&client) {
                        Some(tx) => tx.try_send(route).is_ok(),
                        None => false,
                    };
                    if let (Some(t), false) = (local, delivered) {
                        c.node.flow_ended(t);
                    }
                }
                HubOutput::Peers(peers) => self.peers_listed(peers),
                HubOutput::PeerDeparted { replica_id } => self.peer_departed(&replica_id),
                // Configured peers are dialed once this replica is
                // registered (see `start`): before, they would refuse it.
                HubOutput::Announced => self.dial_static_peers(),
                // The node turns these into its own outputs (above).
                HubOutput::AcceptTunnel { .. }
                | HubOutput::CloseTunnel { .. }
                | HubOutput::DrainTunnel { .. } => {}
            }
        }
        self.metrics
            .agents_connected
            .set(c.node.hub().agent_count() as i64);
        self.metrics
            .registry_healthy
            .set(i64::from(c.node.hub().registry_healthy()));
        for (kind, n) in &c.node.hub().counters.shadow_would {
            let g = self
                .metrics
                .shadow_would_route
                .get_or_create(&labels(&[("route", kind)]));
            let cur = g.get();
            if *n > cur {
                g.inc_by(*n - cur);
            }
        }
        let mismatches = c.node.hub().counters.epoch_mismatch;
        let cur = self.metrics.owner_epoch_mismatch.get();
        if mismatches > cur {
            self.metrics.owner_epoch_mismatch.inc_by(mismatches - cur);
        }
    }

    /// `/readyz`: the status code and the JSON body.
    pub fn readyz(&self) -> (u16, String) {
        let reasons = {
            let c = self.control.lock().expect("control lock");
            // The configured peers count from the start, dialed or not yet
            // (a hub dials them only once it has announced itself): a hub
            // that just started is not ready while no link is up, or the
            // clients a load balancer sends it would be refused.
            let dialed = self.mesh_dialed.lock().expect("mesh dialed lock");
            let configured = &self.cfg.raw.ha.mesh.peers;
            let known_peers = dialed.len()
                + configured
                    .iter()
                    .filter(|url| !dialed.contains_key(url.as_str()))
                    .count();
            c.node.hub().readiness(known_peers)
        };
        crate::http_wire::readiness(&reasons)
    }

    /// The largest WebSocket message or frame a tunnel takes.
    pub fn max_ws_message(&self) -> usize {
        self.cfg.limits.max_frame + 1024
    }

    async fn control_timer(self: Arc<Self>) {
        loop {
            let deadline = {
                let mut c = self.control.lock().expect("control lock");
                c.timer_armed = c.node.poll_timeout();
                c.timer_armed
            };
            let timer = async {
                match deadline {
                    Some(d) => {
                        self.rt
                            .sleep(d.saturating_duration_since(Instant::now()))
                            .await;
                        true
                    }
                    None => futures_lite::future::pending().await,
                }
            };
            let woken = async {
                let _ = self.control_wake.1.recv().await;
                false
            };
            if race(timer, woken).await {
                self.with_control(|c, now| c.node.handle_timeout(now));
            }
        }
    }
}

/// `Authorization: Bearer <token>` → the token.
pub fn bearer(v: &str) -> Option<&str> {
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

/// Start a hub: bind every socket (failing fast with the address that could
/// not be bound), then serve until [`HubHandle::shutdown`].
pub async fn start<R: HubHttp>(cfg: HubConfig, rt: R, redis: bool) -> Result<HubHandle<R>, String> {
    let metrics = Arc::new(Metrics::new());
    let connectors: Vec<String> = cfg.listeners.iter().map(|(_, _, c)| c.clone()).collect();
    metrics.init_known_series(&connectors);
    let verifier = Verifier::from_tunnel_config(&cfg.raw.tunnel)
        .map_err(|e| format!("{}: tunnel.jwt: {e}", cfg.file.display()))?;
    let now = Instant::now();
    let ha = &cfg.raw.ha;
    let core_cfg = CoreHubConfig {
        replica_id: cfg.replica_id.clone(),
        mode: cfg.mode,
        max_agents: cfg.raw.limits.max_agents,
        max_pending_routes: cfg.raw.limits.max_pending_routes,
        lease: Duration::from_secs(ha.lease_sec),
        renew_interval: Duration::from_secs(ha.renew_interval_sec),
        registry_timeout: Duration::from_millis(ha.registry_timeout_ms),
        mesh_url: ha.mesh.advertise_url.clone(),
        ..CoreHubConfig::default()
    };
    let seed = rand::random::<u64>();
    let shared = Arc::new(Shared {
        rt,
        metrics,
        verifier: RwLock::new(Arc::new(verifier)),
        control: Mutex::new(Control {
            node: HubNode::new(
                Hub::new(now, core_cfg, seed),
                cfg.raw.limits.max_client_connections,
            ),
            memory: (!redis).then(MemoryRegistry::new),
            tunnels: BTreeMap::new(),
            identities: BTreeMap::new(),
            routes: BTreeMap::new(),
            timer_armed: None,
        }),
        control_wake: async_channel::bounded(1),
        next_id: AtomicU64::new(1),
        drain_steps: async_channel::bounded(2),
        mesh_links: Mutex::new(Default::default()),
        mesh_dialed: Mutex::new(Default::default()),
        mesh_peer_urls: Mutex::new(Default::default()),
        mesh_refused_urls: Mutex::new(Default::default()),
        mesh_tls: RwLock::new(MeshTlsConfigs::default()),
        http_tls: RwLock::new(cfg.http_tls.clone()),
        mesh_started: AtomicBool::new(false),
        watched: Mutex::new(reload::watched_files(&cfg)),
        cfg,
    });
    let rt = &shared.rt;

    let http = rt
        .bind(shared.cfg.http_bind)
        .await
        .map_err(|e| format!("http.bind {}: {e}", shared.cfg.http_bind))?;
    let http_addr = R::local_addr(&http).map_err(|e| e.to_string())?;
    let ops = match shared.cfg.ops_bind {
        Some(addr) => {
            let l = rt
                .bind(addr)
                .await
                .map_err(|e| format!("http.ops_bind {addr}: {e}"))?;
            let bound = R::local_addr(&l).map_err(|e| e.to_string())?;
            Some((bound, l))
        }
        None => None,
    };
    let ops_addr = ops.as_ref().map(|(a, _)| *a);
    let public_role = if ops.is_some() {
        HttpRole::Tunnel
    } else {
        HttpRole::All
    };
    let scheme = if shared.cfg.http_tls.is_some() {
        "https"
    } else {
        "http"
    };
    tracing::info!(addr = %http_addr, scheme, paths = public_role.paths(), "http port");
    if let Some(o) = ops_addr {
        tracing::info!(addr = %o, scheme = "http", paths = HttpRole::Ops.paths(), "ops port (http.ops_bind)");
    }
    let mut listeners = Vec::new();
    for (name, addr, connector) in &shared.cfg.listeners {
        let l = rt
            .bind(*addr)
            .await
            .map_err(|e| format!("listener `{name}` bind {addr}: {e}"))?;
        let bound = R::local_addr(&l).map_err(|e| e.to_string())?;
        listeners.push((name.clone(), bound, connector.clone(), l));
    }
    let listener_addrs = listeners
        .iter()
        .map(|(n, a, _, _)| (n.clone(), *a))
        .collect();

    let mut mesh_addr = None;
    let mut tasks = vec![rt.spawn(shared.clone().control_timer())];
    if shared.cfg.mode != Mode::Off {
        let mesh = &shared.cfg.raw.ha.mesh;
        let tls = crate::mesh::tls_configs(mesh)
            .map_err(|e| format!("{}: {e}", shared.cfg.file.display()))?;
        if let Some(addr) = &mesh.listen {
            let sock = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("ha.mesh.listen `{addr}`: not an address"))?;
            let l = rt
                .bind(sock)
                .await
                .map_err(|e| format!("ha.mesh.listen {addr}: {e}"))?;
            mesh_addr = Some(R::local_addr(&l).map_err(|e| e.to_string())?);
            tasks.push(rt.spawn(mesh_tasks::serve(shared.clone(), l)));
        }
        *shared.mesh_tls.write().expect("mesh tls lock") = tls;
        shared.mesh_started.store(true, Ordering::Relaxed);
        if mesh.tls.is_none() {
            tracing::warn!(target: "nowconnect::security", "the mesh runs without TLS (ha.mesh.tls unset, require_mtls false): any host that reaches ha.mesh.listen can claim any replica id; use this only on a network that is itself authenticated");
        } else if !mesh.require_mtls {
            tracing::warn!(target: "nowconnect::security", "ha.mesh.require_mtls is false: inbound mesh peers are not authenticated and may claim any registered replica id");
        } else if mesh.tls_terminated_by_proxy {
            let h = mesh.client_cert_header();
            tracing::info!(target: "nowconnect::security", trusted_proxies = ?mesh.trusted_proxies, header = %h.header_name(), format = ?h.format, "the mesh listener speaks plain WebSocket behind a TLS-terminating proxy: only trusted_proxies are served, and the peer certificate they forward is verified against ha.mesh.tls.ca_bundle; the proxies are part of the mesh's trusted base");
        }
        // `ha.mesh.peers` are dialed when the registry has taken this
        // replica's announcement (`HubOutput::Announced`), so they admit its
        // links; if the registry has not within one lease (Redis down at
        // start; peers may still list this replica in allowed_replicas),
        // they are dialed anyway.
        if shared.with_control(|c, _| c.node.hub().announced()) {
            shared.dial_static_peers();
        }
        let (s, lease) = (
            shared.clone(),
            Duration::from_secs(shared.cfg.raw.ha.lease_sec),
        );
        tasks.push(rt.spawn(async move {
            s.rt.sleep(lease).await;
            s.dial_static_peers();
        }));
    }
    if shared.cfg.raw.tunnel.revocation_file.is_some() {
        tasks.push(rt.spawn(shared.clone().watch_revocations()));
    }
    crate::logging::mask_client_addresses(shared.cfg.raw.log.mask_client_addresses);
    let found = crate::keyfiles::warn_world_readable(&shared.cfg.secret_files());
    for _ in 0..found {
        shared.security_event("key_file_world_readable");
    }
    if shared.cfg.raw.tunnel.allow_unscoped_tokens {
        tracing::warn!(target: "nowconnect::security", "tunnel.allow_unscoped_tokens is true: an agent whose token names no connectors may announce any connector of its tenant");
    }
    if shared.cfg.raw.reload.watch_interval_sec > 0 {
        let every = Duration::from_secs(shared.cfg.raw.reload.watch_interval_sec);
        tasks.push(rt.spawn(shared.clone().watch_files(every)));
    }
    let mut listener_tasks = Vec::new();
    for (name, _, connector, l) in listeners {
        listener_tasks.push(rt.spawn(shared.clone().accept_loop(name, connector, l)));
    }
    // HTTP stays up while draining so /readyz reports it; it stops after.
    let (http_stop_tx, http_stop) = async_channel::bounded::<()>(1);
    let (http_done_tx, http_done) = async_channel::bounded::<()>(1);
    let server = R::serve_http(shared.clone(), http, public_role, http_stop.clone());
    let done_public = http_done_tx.clone();
    rt.spawn(async move {
        server.await;
        drop(done_public);
    });
    if let Some((_, l)) = ops {
        let server = R::serve_http(shared.clone(), l, HttpRole::Ops, http_stop);
        rt.spawn(async move {
            server.await;
            drop(http_done_tx);
        });
    }

    let (stop, stop_rx) = async_channel::bounded::<()>(1);
    let (done_tx, done) = async_channel::bounded::<()>(1);
    let s2 = shared.clone();
    rt.spawn(async move {
        let _ = stop_rx.recv().await;
        s2.drain(listener_tasks).await;
        for t in tasks {
            s2.rt.abort(t);
        }
        // Close every tunnel (its flows end with `shutdown`).
        let tunnels: Vec<_> = s2
            .control
            .lock()
            .expect("control lock")
            .tunnels
            .values()
            .cloned()
            .collect();
        for tx in tunnels {
            let _ = tx.try_send(LinkCmd::Close {
                code: ErrorCode::Shutdown,
                reason: "hub shutting down".into(),
            });
        }
        drop(http_stop_tx);
        race(
            async {
                let _ = http_done.recv().await;
            },
            s2.rt.sleep(Duration::from_secs(2)),
        )
        .await;
        drop(done_tx);
    });
    Ok(HubHandle {
        http_addr,
        ops_addr,
        mesh_addr,
        listener_addrs,
        stop,
        done,
        shared,
    })
}
