//! The hub process: HTTP (`/tunnel`, `/healthz`, `/readyz`, `/metrics`),
//! one task per agent tunnel, one accept loop per listener, one task per
//! client connection, and the control loop around the core [`Hub`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt;
use nowconnect_core::hub::{Hub, HubConfig as CoreHubConfig, HubOutput, TunnelId};
use nowconnect_core::registry::MemoryRegistry;
use nowconnect_core::routing::Route;
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{ErrorCode, WsMessage};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, oneshot, watch};

use crate::config::HubConfig;
use crate::driver::{FlowEnd, LinkCmd, Outgoing, TunnelDriver};
use crate::jwt::Verifier;
use crate::metrics::{Metrics, labels};

/// Where registry calls go: in-process, or Redis (asynchronous).
enum Registry {
    Memory(MemoryRegistry),
    Redis(Arc<crate::registry::RedisRegistry>),
}

/// The control state shared by all tasks (not on the data path).
struct Control {
    hub: Hub,
    registry: Registry,
    tunnels: BTreeMap<TunnelId, async_channel::Sender<LinkCmd>>,
    routes: BTreeMap<u64, oneshot::Sender<Route>>,
}

pub struct Shared {
    cfg: HubConfig,
    metrics: Arc<Metrics>,
    /// Replaced whole on reload; read per `/tunnel` request, never held
    /// across an await.
    verifier: std::sync::RwLock<Arc<Verifier>>,
    control: Mutex<Control>,
    control_wake: Notify,
    next_id: AtomicU64,
    active_clients: AtomicUsize,
    draining: watch::Sender<bool>,
    mesh_links: Mutex<crate::mesh::MeshLinks>,
    /// Mesh URLs with an outbound link task (static peers and discovered ones).
    mesh_dialed: Mutex<std::collections::BTreeSet<String>>,
    /// Mesh TLS (server and client sides), replaced whole on reload: new
    /// links use the new certificates, established links keep theirs.
    mesh_tls: std::sync::RwLock<crate::mesh::MeshTlsConfigs>,
    mesh_started: std::sync::atomic::AtomicBool,
    /// The files whose change triggers a reload (config, keys, certificates).
    watched: Mutex<Vec<std::path::PathBuf>>,
}

/// A running hub: its bound addresses and a way to stop it.
pub struct HubHandle {
    pub http_addr: SocketAddr,
    pub mesh_addr: Option<SocketAddr>,
    pub listener_addrs: Vec<(String, SocketAddr)>,
    stop: watch::Sender<bool>,
    done: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl HubHandle {
    /// Re-read the configuration file and apply what can change without a
    /// restart (see [`Shared::reload`]).
    pub fn reload(&self) -> Result<String, String> {
        self.shared.reload()
    }

    /// Graceful stop: refuse new work, let flows finish up to the grace
    /// period, then close everything.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.done.await;
    }
}

impl Shared {
    pub fn cfg(&self) -> &HubConfig {
        &self.cfg
    }

    /// Re-read the configuration file and apply what can change without a
    /// restart: the JWT verification settings (`tunnel.jwt`: secret or public
    /// key file, algorithms, audience, issuer, leeway) and, with the mesh on,
    /// its certificate, key and CA bundle (`ha.mesh.tls`). Established
    /// tunnels and mesh links are not touched; new `/tunnel` requests and new
    /// mesh connections use the new settings. Everything is checked before
    /// anything is applied: on any error the running configuration stays
    /// whole and the error names the file, key and reason. Counted in
    /// `nowconnect_config_reloads_total{result}`.
    pub fn reload(&self) -> Result<String, String> {
        let res = self.try_reload();
        let result = if res.is_ok() { "ok" } else { "error" };
        self.metrics
            .config_reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
        res
    }

    fn try_reload(&self) -> Result<String, String> {
        let file = &self.cfg.file;
        let cfg = HubConfig::load(file).map_err(|e| e.to_string())?;
        let v = Verifier::from_config(&cfg.raw.tunnel.jwt)
            .map_err(|e| format!("{}: tunnel.jwt: {e}", file.display()))?;
        let mesh = if self.mesh_started.load(Ordering::Relaxed) {
            Some(
                crate::mesh::tls_configs(&cfg.raw.ha.mesh)
                    .map_err(|e| format!("{}: ha.mesh.tls: {e}", file.display()))?,
            )
        } else {
            None
        };
        *self.verifier.write().expect("verifier lock") = Arc::new(v);
        let mut what = format!("{}: tunnel.jwt", file.display());
        if let Some(m) = mesh {
            *self.mesh_tls.write().expect("mesh tls lock") = m;
            what += ", ha.mesh.tls";
        }
        *self.watched.lock().expect("watched lock") = watched_files(&cfg);
        Ok(what + " reloaded")
    }

    pub fn mesh_server_tls(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.mesh_tls.read().expect("mesh tls lock").server.clone()
    }

    pub fn mesh_client_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.mesh_tls.read().expect("mesh tls lock").client.clone()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Owner side of the mesh: the tunnel to serve a flow for `agent_id`
    /// under `epoch`, or the refusal.
    pub fn check_mesh_open(
        self: &Arc<Self>,
        agent_id: &str,
        epoch: nowconnect_core::Epoch,
    ) -> Result<(u64, async_channel::Sender<LinkCmd>), (ErrorCode, String)> {
        self.with_control(|c, _| {
            let tunnel = c.hub.check_mesh_open(agent_id, epoch)?;
            let tx = c.tunnels.get(&tunnel).cloned().ok_or((
                ErrorCode::LinkLost,
                "the agent tunnel went away".to_string(),
            ))?;
            c.hub.flow_started(tunnel);
            Ok((tunnel, tx))
        })
    }

    /// A flow counted by `check_mesh_open` (or a client's) ended.
    pub fn flow_ended(self: &Arc<Self>, tunnel: u64) {
        self.with_control(|c, _| c.hub.flow_ended(tunnel));
    }

    pub fn count_epoch_mismatch(self: &Arc<Self>) {
        self.with_control(|c, _| c.hub.count_epoch_mismatch());
    }

    /// A mesh link to `replica` came up (`Some(sender)`) or went down.
    pub fn mesh_link_state(
        self: &Arc<Self>,
        replica: &str,
        link: u64,
        sender: Option<async_channel::Sender<LinkCmd>>,
    ) {
        let up = {
            let mut links = self.mesh_links.lock().expect("mesh links lock");
            links.set(replica, link, sender)
        };
        self.with_control(|c, _| c.hub.mesh_link_up(replica, up));
    }

    /// Start an outbound mesh link to `url` unless one exists already.
    fn dial_once(self: &Arc<Self>, replica: &str, url: &str) {
        if !self.mesh_started.load(Ordering::Relaxed) {
            return; // mesh not started (mode off)
        }
        if !self
            .mesh_dialed
            .lock()
            .expect("mesh dialed lock")
            .insert(url.to_string())
        {
            return;
        }
        tracing::info!(peer = %replica, %url, "mesh peer discovered");
        tokio::spawn(crate::mesh::dial_peer(self.clone(), url.to_string()));
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Run `f` on the control state, then perform every output it caused.
    fn with_control<R>(self: &Arc<Self>, f: impl FnOnce(&mut Control, Instant) -> R) -> R {
        let now = Self::now();
        let mut c = self.control.lock().expect("control lock");
        let r = f(&mut c, now);
        self.pump(&mut c, now);
        drop(c);
        self.control_wake.notify_one();
        r
    }

    fn pump(self: &Arc<Self>, c: &mut Control, now: Instant) {
        while let Some(out) = c.hub.poll_output() {
            match out {
                HubOutput::Registry { op, call } => match &mut c.registry {
                    Registry::Memory(m) => {
                        let r = m.apply(now, &call);
                        c.hub.registry_reply(now, op, r);
                    }
                    Registry::Redis(redis) => {
                        let redis = redis.clone();
                        let shared = self.clone();
                        tokio::spawn(async move {
                            let r = redis.apply(&call).await;
                            if let Err(e) = &r {
                                shared.metrics.registry_errors.inc();
                                tracing::warn!(op = call.name(), error = %e, "registry call failed");
                            }
                            shared.with_control(|c, now| c.hub.registry_reply(now, op, r));
                        });
                    }
                },
                HubOutput::AcceptTunnel { tunnel, epoch } => {
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let _ = tx.try_send(LinkCmd::Accept { epoch });
                    }
                }
                HubOutput::CloseTunnel {
                    tunnel,
                    code,
                    reason,
                } => {
                    tracing::warn!(target: "nowconnect::security", tunnel, %code, %reason, "closing agent tunnel");
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let _ = tx.try_send(LinkCmd::Close { code, reason });
                    }
                }
                HubOutput::Route { client, route } => {
                    // A local flow counts on its tunnel from the routing
                    // decision on, so a draining hub never closes a tunnel
                    // a flow is being opened on; `serve_client` ends it.
                    let local = match &route {
                        Route::Local { tunnel, .. } => Some(*tunnel),
                        _ => None,
                    };
                    if let Some(t) = local {
                        c.hub.flow_started(t);
                    }
                    let delivered = match c.routes.remove(&client) {
                        Some(tx) => tx.send(route).is_ok(),
                        None => false,
                    };
                    if let (Some(t), false) = (local, delivered) {
                        c.hub.flow_ended(t);
                    }
                }
                HubOutput::Peers(peers) => {
                    for (replica, url) in peers {
                        self.dial_once(&replica, &url);
                    }
                }
                HubOutput::DrainTunnel { tunnel } => {
                    if let Some(tx) = c.tunnels.get(&tunnel) {
                        let _ = tx.try_send(LinkCmd::Drain);
                    }
                }
            }
        }
        self.metrics
            .agents_connected
            .set(c.hub.agent_count() as i64);
        self.metrics
            .registry_healthy
            .set(i64::from(c.hub.registry_healthy()));
        for (kind, n) in &c.hub.counters.shadow_would {
            let g = self
                .metrics
                .shadow_would_route
                .get_or_create(&labels(&[("route", kind)]));
            let cur = g.get();
            if *n > cur {
                g.inc_by(*n - cur);
            }
        }
        let mismatches = c.hub.counters.epoch_mismatch;
        let cur = self.metrics.owner_epoch_mismatch.get();
        if mismatches > cur {
            self.metrics.owner_epoch_mismatch.inc_by(mismatches - cur);
        }
    }

    fn readiness(&self) -> Vec<String> {
        let c = self.control.lock().expect("control lock");
        let known_peers = self.mesh_dialed.lock().expect("mesh dialed lock").len();
        c.hub.readiness(known_peers)
    }
}

/// Start a hub: bind every socket (failing fast with the address that could
/// not be bound), then serve until `shutdown` is called.
pub async fn start(cfg: HubConfig) -> Result<HubHandle, String> {
    let metrics = Arc::new(Metrics::new());
    let connectors: Vec<String> = cfg.listeners.iter().map(|(_, _, c)| c.clone()).collect();
    metrics.init_known_series(&connectors);
    let verifier = Verifier::from_config(&cfg.raw.tunnel.jwt)
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
    let registry = match (&ha.redis_url, ha.enabled) {
        (Some(url), true) => Registry::Redis(Arc::new(crate::registry::RedisRegistry::new(
            url,
            &ha.registry_prefix,
            Duration::from_millis(ha.registry_timeout_ms),
        )?)),
        _ => Registry::Memory(MemoryRegistry::new()),
    };
    let seed = rand::random::<u64>();
    let (draining, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        metrics,
        verifier: std::sync::RwLock::new(Arc::new(verifier)),
        control: Mutex::new(Control {
            hub: Hub::new(now, core_cfg, seed),
            registry,
            tunnels: BTreeMap::new(),
            routes: BTreeMap::new(),
        }),
        control_wake: Notify::new(),
        next_id: AtomicU64::new(1),
        active_clients: AtomicUsize::new(0),
        draining,
        mesh_links: Mutex::new(Default::default()),
        mesh_dialed: Mutex::new(Default::default()),
        mesh_tls: std::sync::RwLock::new(crate::mesh::MeshTlsConfigs::default()),
        mesh_started: std::sync::atomic::AtomicBool::new(false),
        watched: Mutex::new(watched_files(&cfg)),
        cfg,
    });

    let http = TcpListener::bind(shared.cfg.http_bind)
        .await
        .map_err(|e| format!("http.bind {}: {e}", shared.cfg.http_bind))?;
    let http_addr = http.local_addr().map_err(|e| e.to_string())?;
    let mut listeners = Vec::new();
    for (name, addr, connector) in &shared.cfg.listeners {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("listener `{name}` bind {addr}: {e}"))?;
        let bound = l.local_addr().map_err(|e| e.to_string())?;
        listeners.push((name.clone(), bound, connector.clone(), l));
    }
    let listener_addrs = listeners
        .iter()
        .map(|(n, a, _, _)| (n.clone(), *a))
        .collect();

    let mut mesh_addr = None;
    let (stop, mut stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(control_timer(shared.clone())));
    if shared.cfg.mode != nowconnect_core::routing::Mode::Off {
        let mesh = &shared.cfg.raw.ha.mesh;
        let tls = crate::mesh::tls_configs(mesh)
            .map_err(|e| format!("{}: {e}", shared.cfg.file.display()))?;
        if let Some(addr) = &mesh.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("ha.mesh.listen {addr}: {e}"))?;
            let bound = l.local_addr().map_err(|e| e.to_string())?;
            mesh_addr = Some(bound);
            tasks.push(tokio::spawn(crate::mesh::serve(shared.clone(), l)));
        }
        *shared.mesh_tls.write().expect("mesh tls lock") = tls;
        shared.mesh_started.store(true, Ordering::Relaxed);
        for peer in &mesh.peers {
            shared.dial_once("(configured)", peer);
        }
    }
    if shared.cfg.raw.reload.watch_interval_sec > 0 {
        tasks.push(tokio::spawn(watch_files(
            shared.clone(),
            Duration::from_secs(shared.cfg.raw.reload.watch_interval_sec),
        )));
    }
    let mut listener_tasks = Vec::new();
    for (name, _, connector, l) in listeners {
        listener_tasks.push(tokio::spawn(accept_loop(
            shared.clone(),
            name,
            connector,
            l,
        )));
    }
    let app = Router::new()
        .route("/tunnel", get(tunnel_handler))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(shared.clone());
    // HTTP stays up while draining so /readyz reports it; it stops after.
    let (http_stop_tx, http_stop) = watch::channel(false);
    let header_timeout = Duration::from_secs(shared.cfg.raw.http.header_timeout_sec);
    let server = tokio::spawn(serve_http(http, app, http_stop, header_timeout));

    let s2 = shared.clone();
    let done = tokio::spawn(async move {
        let _ = stop_rx.wait_for(|v| *v).await;
        drain(&s2, listener_tasks).await;
        for t in tasks {
            t.abort();
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
        let _ = http_stop_tx.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    });
    Ok(HubHandle {
        http_addr,
        mesh_addr,
        listener_addrs,
        stop,
        done,
        shared,
    })
}

/// The files a reload reads: the configuration file, the JWT key files and
/// the mesh TLS files.
fn watched_files(cfg: &HubConfig) -> Vec<std::path::PathBuf> {
    let jwt = &cfg.raw.tunnel.jwt;
    let mut files = vec![cfg.file.clone()];
    files.extend(jwt.hs256_secret_file.iter().cloned());
    files.extend(jwt.public_key_file.iter().cloned());
    if let Some(t) = &cfg.raw.ha.mesh.tls {
        files.extend([t.ca_bundle.clone(), t.cert_file.clone(), t.key_file.clone()]);
    }
    files
}

/// What the watched files hold now (a missing file counts as a state too).
fn fingerprint(files: &[std::path::PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// Reload when a watched file changes (checked every `every`). A failed
/// reload is retried only after the files change again.
async fn watch_files(shared: Arc<Shared>, every: Duration) {
    let files = shared.watched.lock().expect("watched lock").clone();
    let mut last = fingerprint(&files);
    loop {
        tokio::time::sleep(every).await;
        let files = shared.watched.lock().expect("watched lock").clone();
        let now = fingerprint(&files);
        if now == last {
            continue;
        }
        match shared.reload() {
            Ok(what) => tracing::info!(%what, "a watched file changed; configuration reloaded"),
            Err(error) => tracing::warn!(
                %error,
                "a watched file changed but the reload failed; the running configuration stays"
            ),
        }
        // The set may have changed with the reload.
        let files = shared.watched.lock().expect("watched lock").clone();
        last = fingerprint(&files);
    }
}

/// Graceful drain: `/readyz` says `draining` and new tunnels are refused at
/// once; every agent is told to move (DRAIN) and claims itself on another
/// hub, while its flows here go on. Listeners keep taking clients for
/// `shutdown_delay_sec`, then close. Returns when no client flow, no tunnel
/// flow and no pending agent move is left, or when the grace period ends.
async fn drain(shared: &Arc<Shared>, listeners: Vec<tokio::task::JoinHandle<()>>) {
    let _ = shared.draining.send(true);
    shared.with_control(|c, now| c.hub.drain(now));
    let raw = &shared.cfg.raw;
    let start = tokio::time::Instant::now();
    let deadline = start + Duration::from_secs(raw.shutdown_grace_sec);
    let (clients, flows, moves) = drain_state(shared);
    tracing::info!(
        open_client_flows = clients,
        open_tunnel_flows = flows,
        agents_to_move = moves,
        delay_sec = raw.shutdown_delay_sec,
        grace_sec = raw.shutdown_grace_sec,
        "draining"
    );
    tokio::time::sleep_until(start + Duration::from_secs(raw.shutdown_delay_sec)).await;
    for l in listeners {
        l.abort();
    }
    tracing::info!("listeners closed");
    loop {
        let (clients, flows, moves) = drain_state(shared);
        if clients == 0 && flows == 0 && moves == 0 {
            tracing::info!(
                elapsed_ms = start.elapsed().as_millis() as u64,
                "drained: no flow left and every agent moved"
            );
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                open_client_flows = clients,
                open_tunnel_flows = flows,
                agents_not_moved = moves,
                "grace period over; closing what is left"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// (client flows, flows on this hub's tunnels, agents told to move that
/// are not owned elsewhere yet).
fn drain_state(shared: &Shared) -> (usize, usize, usize) {
    let c = shared.control.lock().expect("control lock");
    (
        shared.active_clients.load(Ordering::Relaxed),
        c.hub.open_tunnel_flows(),
        c.hub.moves_pending(),
    )
}

/// The HTTP server of `/tunnel`, `/healthz`, `/readyz` and `/metrics`: hyper
/// with a timer, so a client must send its request head within
/// `header_timeout` (no slowloris), a connection that sends nothing is
/// closed after the same time, and each connection serves one request.
/// Stops accepting when `stop` turns true and lets requests in progress end.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    mut stop: watch::Receiver<bool>,
    header_timeout: Duration,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    use hyper_util::service::TowerToHyperService;
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let builder = Arc::new(builder);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|v| *v).await; } => return,
        };
        // Tunnel frames are small and latency-bound: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let svc = TowerToHyperService::new(
            app.clone()
                .layer(axum::middleware::map_response(close_unless_upgrade))
                .layer(axum::Extension(axum::extract::ConnectInfo(peer))),
        );
        let builder = builder.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            // hyper's header timer starts with the first byte: a connection
            // that sends nothing gets the same deadline here.
            let mut first = [0u8; 1];
            if tokio::time::timeout(header_timeout, tcp.peek(&mut first))
                .await
                .is_err()
            {
                tracing::debug!(%peer, "http connection sent nothing; closed");
                return;
            }
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(%peer, error = %e, "http connection ended");
                    }
                }
                _ = async { let _ = stop.wait_for(|v| *v).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// One request per connection (health checks, scrapes, one WebSocket
/// upgrade): every response but a `101` closes its connection, so no idle
/// keep-alive connection is held open.
async fn close_unless_upgrade(mut r: Response) -> Response {
    if r.status() != StatusCode::SWITCHING_PROTOCOLS {
        r.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
}

async fn control_timer(shared: Arc<Shared>) {
    loop {
        let deadline = shared
            .control
            .lock()
            .expect("control lock")
            .hub
            .poll_timeout();
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => shared.with_control(|c, now| c.hub.handle_timeout(now)),
            _ = shared.control_wake.notified() => {}
        }
    }
}

// ---------------------------------------------------------------- HTTP

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let reasons = shared.readiness();
    if reasons.is_empty() {
        (
            StatusCode::OK,
            axum::Json(serde_json::json!({"status": "ready"})),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"status": "degraded", "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

async fn tunnel_handler(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let refuse = |label: &'static str, detail: String| {
        shared
            .metrics
            .auth_failures
            .get_or_create(&labels(&[("reason", label)]))
            .inc();
        tracing::warn!(target: "nowconnect::security", %peer, reason = label, %detail, "tunnel refused before upgrade");
        (StatusCode::UNAUTHORIZED, format!("{label}: {detail}\n")).into_response()
    };
    if *shared.draining.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "hub is draining\n").into_response();
    }
    let Some(token) = bearer(&headers) else {
        return refuse("missing_token", "no `Authorization: Bearer` header".into());
    };
    let verifier = shared.verifier.read().expect("verifier lock").clone();
    let identity = match verifier.verify(token) {
        Ok(id) => id,
        Err(e) => return refuse(e.label, e.detail),
    };
    let max = shared.cfg.limits.max_frame;
    ws.max_message_size(max + 1024)
        .max_frame_size(max + 1024)
        .on_upgrade(move |socket| run_tunnel(shared, socket, identity, peer))
}

// ---------------------------------------------------------------- tunnels

async fn run_tunnel(
    shared: Arc<Shared>,
    socket: WebSocket,
    identity: crate::jwt::AgentIdentity,
    peer: SocketAddr,
) {
    let tunnel_id = shared.id();
    let (sink, mut stream) = socket.split();
    let (out_tx, out_rx) = async_channel::unbounded::<Outgoing>();
    let writer = tokio::spawn(crate::io::write_axum(sink, out_rx));
    let (cmd_tx, cmd_rx) = async_channel::unbounded();
    shared
        .control
        .lock()
        .expect("control lock")
        .tunnels
        .insert(tunnel_id, cmd_tx.clone());
    let tunnel = Tunnel::hub(Instant::now(), shared.cfg.tunnel_config());
    let mut d = TunnelDriver::new(tunnel, out_tx, cmd_tx, shared.metrics.clone());
    let mut agent_id = identity.agent_id.clone();
    let mut report_at = tokio::time::Instant::now() + Duration::from_secs(1);
    tracing::info!(tunnel = tunnel_id, %peer, agent = %identity.agent_id, "agent tunnel connected");
    loop {
        let deadline = d
            .tunnel
            .poll_timeout()
            .map(|(at, _)| tokio::time::Instant::from_std(at));
        let timer = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.min(report_at)).await,
                None => tokio::time::sleep_until(report_at).await,
            }
        };
        tokio::select! {
            msg = stream.next() => {
                let now = Instant::now();
                match msg {
                    Some(Ok(Message::Binary(b))) => d.tunnel.handle_message(now, &WsMessage::Binary(b)),
                    Some(Ok(Message::Text(t))) => d.tunnel.handle_message(now, &WsMessage::Text(t.as_str().to_owned())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(f))) => {
                        let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                        d.tunnel.on_disconnected(&format!("agent closed the tunnel {why}"));
                    }
                    Some(Err(e)) => d.tunnel.on_disconnected(&format!("tunnel read error: {e}")),
                    None => d.tunnel.on_disconnected("tunnel closed by the agent"),
                }
            }
            cmd = cmd_rx.recv() => {
                let now = Instant::now();
                if let Ok(cmd) = cmd {
                    d.on_cmd(now, cmd);
                    for _ in 0..256 {
                        match cmd_rx.try_recv() {
                            Ok(c) => d.on_cmd(now, c),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = timer => {
                let now = Instant::now();
                d.tunnel.handle_timeout(now);
                if tokio::time::Instant::now() >= report_at {
                    d.report();
                    report_at = tokio::time::Instant::now() + Duration::from_secs(1);
                }
            }
        }
        let mut closed = None;
        for ev in d.drain() {
            match ev {
                TunnelEvent::Hello {
                    agent_id: hello_id,
                    connectors,
                } => {
                    if hello_id != identity.agent_id {
                        let reason = format!(
                            "HELLO names agent `{hello_id}` but the token is for `{}`",
                            identity.agent_id
                        );
                        shared
                            .metrics
                            .auth_failures
                            .get_or_create(&labels(&[("reason", "agent_mismatch")]))
                            .inc();
                        tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id, %reason, "tunnel refused");
                        d.tunnel.close(ErrorCode::Refused, &reason);
                        continue;
                    }
                    agent_id = hello_id.clone();
                    let scope = identity.scope.clone();
                    shared.with_control(|c, now| {
                        c.hub
                            .tunnel_hello(now, tunnel_id, &hello_id, &connectors, scope.as_deref())
                    });
                }
                TunnelEvent::Established { epoch, codec } => {
                    if codec != nowconnect_core::Codec::V2 {
                        shared.with_control(|c, _| c.hub.tunnel_cannot_drain(tunnel_id));
                    }
                    shared
                        .metrics
                        .tunnels
                        .get_or_create(&labels(&[("result", "accepted")]))
                        .inc();
                    tracing::info!(tunnel = tunnel_id, agent = %agent_id, epoch = epoch.0, codec = codec.as_str(), "agent tunnel established");
                }
                TunnelEvent::Closed { code, reason } => closed = Some((code, reason)),
                TunnelEvent::Open { .. }
                | TunnelEvent::Flow(_)
                | TunnelEvent::Rtt(_)
                | TunnelEvent::Drain => {}
            }
        }
        // Dispatch again: closing produced flow resets.
        d.drain();
        d.flush();
        if let Some((code, reason)) = closed {
            let result = if matches!(code, ErrorCode::LinkLost | ErrorCode::Shutdown) {
                "closed"
            } else {
                "refused"
            };
            shared
                .metrics
                .tunnels
                .get_or_create(&labels(&[("result", result)]))
                .inc();
            tracing::info!(tunnel = tunnel_id, agent = %agent_id, %code, %reason, "agent tunnel closed");
            d.close_socket(code, &reason);
            break;
        }
    }
    d.report();
    drop(d);
    shared.with_control(|c, now| {
        c.tunnels.remove(&tunnel_id);
        c.hub.tunnel_closed(now, tunnel_id);
    });
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

// ---------------------------------------------------------------- clients

async fn accept_loop(shared: Arc<Shared>, name: String, connector: String, listener: TcpListener) {
    tracing::info!(listener = %name, addr = ?listener.local_addr().ok(), %connector, "listening");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: back off, do not spin.
                tracing::warn!(listener = %name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.active_clients.load(Ordering::Relaxed)
            >= shared.cfg.raw.limits.max_client_connections
        {
            refuse_client(&shared, "limit_exceeded");
            tracing::warn!(listener = %name, %peer, "client connection limit reached");
            continue;
        }
        tokio::spawn(serve_client(
            shared.clone(),
            connector.clone(),
            stream,
            peer,
        ));
    }
}

fn refuse_client(shared: &Shared, reason: &str) {
    shared
        .metrics
        .client_connections_refused
        .get_or_create(&labels(&[("reason", reason)]))
        .inc();
}

/// How a client's flow is opened: on a local agent tunnel or over the mesh.
enum OpenRequest {
    Tunnel {
        connector: String,
    },
    Mesh {
        connector: String,
        agent_id: String,
        epoch: nowconnect_core::Epoch,
    },
}

impl OpenRequest {
    fn into_cmd(self, reply: crate::driver::Reply<Result<FlowEnd, String>>) -> LinkCmd {
        match self {
            OpenRequest::Tunnel { connector } => LinkCmd::OpenFlow { connector, reply },
            OpenRequest::Mesh {
                connector,
                agent_id,
                epoch,
            } => LinkCmd::OpenMeshFlow {
                connector,
                agent_id,
                epoch,
                reply,
            },
        }
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_client(shared: Arc<Shared>, connector: String, stream: TcpStream, peer: SocketAddr) {
    shared.active_clients.fetch_add(1, Ordering::Relaxed);
    let _guard = ActiveGuard(&shared.active_clients);
    let client = shared.id();
    let (tx, rx) = oneshot::channel();
    shared.with_control(|c, now| {
        c.routes.insert(client, tx);
        c.hub.client_connected(now, client, &connector);
    });
    let Ok(route) = rx.await else {
        return;
    };
    let (tunnel, agent_id, route_kind, cmd, open) = match route {
        Route::Local { tunnel, agent_id } => {
            let cmd = shared
                .control
                .lock()
                .expect("control lock")
                .tunnels
                .get(&tunnel)
                .cloned();
            let open = OpenRequest::Tunnel {
                connector: connector.clone(),
            };
            (Some(tunnel), agent_id, "local", cmd, open)
        }
        Route::Mesh {
            replica_id,
            agent_id,
            epoch,
        } => {
            let cmd = shared
                .mesh_links
                .lock()
                .expect("mesh links lock")
                .sender(&replica_id);
            let open = OpenRequest::Mesh {
                connector: connector.clone(),
                agent_id: agent_id.clone(),
                epoch,
            };
            (None, format!("{agent_id}@{replica_id}"), "mesh", cmd, open)
        }
        Route::Refuse { code, reason } => {
            refuse_client(&shared, code.as_str());
            tracing::warn!(%peer, %connector, %code, %reason, "client connection refused");
            return;
        }
    };
    // Counted on its tunnel since the routing decision (see `pump`).
    let _counted = tunnel.map(|t| TunnelFlowGuard(shared.clone(), t));
    let (rtx, rrx) = crate::driver::reply_channel();
    if let Some(cmd) = &cmd {
        let _ = cmd.try_send(open.into_cmd(rtx));
    }
    let end: FlowEnd = match rrx.recv().await {
        Ok(Ok(end)) => end,
        Ok(Err(reason)) => {
            refuse_client(&shared, ErrorCode::LimitExceeded.as_str());
            tracing::warn!(%peer, %connector, agent = %agent_id, %reason, "client connection refused");
            return;
        }
        Err(_) => {
            refuse_client(&shared, ErrorCode::LinkLost.as_str());
            tracing::warn!(%peer, %connector, agent = %agent_id, "client connection refused: the link to the agent went away");
            return;
        }
    };
    tracing::debug!(%peer, %connector, agent = %agent_id, cid = end.cid, "flow opened");
    shared
        .metrics
        .flows
        .get_or_create(&labels(&[("connector", &connector), ("route", route_kind)]))
        .inc();
    let idle = match shared.cfg.raw.limits.client_idle_timeout_sec {
        0 => None,
        s => Some(Duration::from_secs(s)),
    };
    crate::io::pipe_client(stream, end, shared.metrics.clone(), idle).await;
}

/// Ends a local flow's count on its tunnel however the client ends.
struct TunnelFlowGuard(Arc<Shared>, u64);

impl Drop for TunnelFlowGuard {
    fn drop(&mut self) {
        self.0.flow_ended(self.1);
    }
}
