//! The hub process, written once for every runtime: the control loop around
//! the core [`Hub`], one task per agent tunnel, one accept loop per
//! listener, one task per client connection, graceful drain, configuration
//! reload and the file watcher. An adapter supplies what only it can do
//! through [`HubRt`]: spawn and sleep, bind and accept TCP, dial and accept
//! mesh WebSockets, pipe a client socket, call Redis, and serve HTTP.

mod mesh_tasks;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_lite::StreamExt;
use futures_lite::future::race;
use nowconnect_core::admission::Admission;
use nowconnect_core::hub::{Hub, HubConfig as CoreHubConfig, HubOutput, TunnelId};
use nowconnect_core::registry::{MemoryRegistry, RegistryOp, RegistryReply};
use nowconnect_core::routing::{Mode, Route};
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};
use nowconnect_core::{Codec, Epoch, ErrorCode};

use crate::config::HubConfig;
use crate::driver::{FlowEnd, InlineWriter, LinkCmd, LoopTimer, Outgoing, Reply, TunnelDriver};
use crate::http::HttpRole;
use crate::jwt::{AgentIdentity, Verifier};
use crate::mesh::{MeshLinks, MeshTlsConfigs};
use crate::metrics::{Metrics, labels};

pub use crate::rt::{HubRt, WsIn};

/// The control state shared by all tasks (not on the data path).
struct Control {
    hub: Hub,
    /// In-process registry; `None`: Redis through the runtime.
    memory: Option<MemoryRegistry>,
    tunnels: BTreeMap<TunnelId, Sender<LinkCmd>>,
    /// Who each live tunnel's token says its agent is (re-checked against
    /// the revocation list).
    identities: BTreeMap<TunnelId, AgentIdentity>,
    routes: BTreeMap<u64, Sender<Route>>,
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
    active_clients: AtomicUsize,
    draining: AtomicBool,
    mesh_links: Mutex<MeshLinks>,
    /// Mesh URLs with an outbound link task: static peers (`None`) and
    /// discovered ones (the replica the registry announced at the URL).
    mesh_dialed: Mutex<BTreeMap<String, Option<String>>>,
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
        self.draining.load(Ordering::Relaxed)
    }

    /// Re-read the configuration file and apply what can change without a
    /// restart: the JWT verification settings (`tunnel.jwt`: secret or public
    /// key file, algorithms, audience, issuer, leeway) and, with the mesh on,
    /// its certificate, key and CA bundle (`ha.mesh.tls`), and the HTTP
    /// port's certificate and key (`http.tls`; turning TLS on or off needs a
    /// restart, and a reload that tries is refused). Established
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
        let v = Verifier::from_tunnel_config(&cfg.raw.tunnel)
            .map_err(|e| format!("{}: tunnel.jwt: {e}", file.display()))?;
        match (&self.cfg.http_tls, &cfg.http_tls) {
            (Some(_), None) => {
                return Err(format!(
                    "{}: http.tls: removed, but the HTTP port cannot leave TLS without a restart",
                    file.display()
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{}: http.tls: added, but the HTTP port cannot turn to TLS without a restart",
                    file.display()
                ));
            }
            _ => {}
        }
        let (was, now) = (&self.cfg.raw.ha.mesh, &cfg.raw.ha.mesh);
        if was.tls_terminated_by_proxy != now.tls_terminated_by_proxy
            || was.trusted_proxies != now.trusted_proxies
        {
            // The mesh listener checks its sources as it started: a reload
            // must not turn on header certificates without that check, nor
            // leave a removed proxy trusted.
            return Err(format!(
                "{}: ha.mesh.tls_terminated_by_proxy and ha.mesh.trusted_proxies cannot change without a restart",
                file.display()
            ));
        }
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
        if let Some(t) = &cfg.http_tls {
            *self.http_tls.write().expect("http tls lock") = Some(t.clone());
            what += ", http.tls";
        }
        *self.watched.lock().expect("watched lock") = watched_files(&cfg);
        Ok(what + " reloaded")
    }

    /// The TLS configuration for a new connection on a port of `role`: the
    /// current `http.tls` certificate on the public port, none on the ops
    /// port (plain HTTP) or without `http.tls`.
    pub fn http_server_tls(&self, role: HttpRole) -> Option<Arc<rustls::ServerConfig>> {
        if role == HttpRole::Ops {
            return None;
        }
        self.http_tls.read().expect("http tls lock").clone()
    }

    /// A TLS handshake on the HTTP port failed (`timed_out`: not completed
    /// within `http.header_timeout_sec`): counted and logged.
    pub fn http_tls_failed(&self, peer: SocketAddr, reason: &str, timed_out: bool) {
        let kind = if timed_out { "timeout" } else { "error" };
        self.metrics
            .http_tls_handshake_failures
            .get_or_create(&labels(&[("reason", kind)]))
            .inc();
        tracing::debug!(%peer, %reason, "http TLS handshake failed; connection closed");
    }

    /// How the mesh listener authenticates the next inbound connection
    /// (the current certificates: they are reloadable).
    pub fn mesh_inbound(&self) -> crate::mesh::MeshInbound {
        let t = self.mesh_tls.read().expect("mesh tls lock");
        crate::mesh::MeshInbound {
            tls: t.server.clone(),
            proxy: t.proxy.clone(),
            refused: self
                .metrics
                .security_events
                .get_or_create(&labels(&[("kind", "mesh_client_cert_header_refused")]))
                .clone(),
        }
    }

    pub fn mesh_client_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.mesh_tls.read().expect("mesh tls lock").client.clone()
    }

    /// Owner side of the mesh: the tunnel to serve a flow for `connector`
    /// of `agent_id` under `epoch`, or the refusal.
    pub fn check_mesh_open(
        self: &Arc<Self>,
        agent_id: &str,
        connector: &str,
        epoch: Epoch,
    ) -> Result<(u64, Sender<LinkCmd>), (ErrorCode, String)> {
        self.with_control(|c, _| {
            let tunnel = c.hub.check_mesh_open(agent_id, connector, epoch)?;
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
        self.flows_ended(tunnel, 1);
    }

    /// `n` flows of `tunnel` ended.
    fn flows_ended(self: &Arc<Self>, tunnel: u64, n: usize) {
        if n > 0 {
            self.with_control(|c, _| {
                for _ in 0..n {
                    c.hub.flow_ended(tunnel);
                }
            });
        }
    }

    pub fn count_epoch_mismatch(self: &Arc<Self>) {
        self.with_control(|c, _| c.hub.count_epoch_mismatch());
    }

    /// A mesh link to `replica` came up (`Some(sender)`) or went down.
    pub fn mesh_link_state(
        self: &Arc<Self>,
        replica: &str,
        link: u64,
        sender: Option<Sender<LinkCmd>>,
    ) {
        let up = {
            let mut links = self.mesh_links.lock().expect("mesh links lock");
            links.set(replica, link, sender)
        };
        self.with_control(|c, _| c.hub.mesh_link_up(replica, up));
    }

    /// Start an outbound mesh link to `url`, announced in the registry by
    /// `replica`, unless one exists already. Redis holds ownership, not
    /// authority: with mesh TLS configured only a `wss://` URL is dialed, and
    /// the peer must then prove (by its certificate) that it is `replica`.
    /// `replica` is `None` for a peer from `ha.mesh.peers` (trusted as
    /// configured).
    fn dial_once(self: &Arc<Self>, replica: Option<&str>, url: &str) {
        if !self.mesh_started.load(Ordering::Relaxed) {
            return; // mesh not started (mode off)
        }
        let mesh = &self.cfg.raw.ha.mesh;
        let tls_required = mesh.tls.is_some() || mesh.require_mtls;
        if let Some(replica) = replica
            && tls_required
            && !url.starts_with("wss://")
        {
            if self
                .mesh_refused_urls
                .lock()
                .expect("mesh refused lock")
                .insert(url.to_string())
            {
                self.security_event("mesh_url_refused");
                tracing::warn!(target: "nowconnect::security", peer = %replica, %url, "mesh peer URL from the registry refused: mesh TLS is configured and the URL is not wss://");
            }
            return;
        }
        match self
            .mesh_dialed
            .lock()
            .expect("mesh dialed lock")
            .entry(url.to_string())
        {
            std::collections::btree_map::Entry::Occupied(_) => return,
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(replica.map(str::to_string));
            }
        }
        match replica {
            Some(peer) => tracing::info!(%peer, %url, "mesh peer discovered"),
            None => tracing::info!(%url, "mesh peer dialed (configured)"),
        }
        self.rt.spawn(mesh_tasks::dial_peer(
            self.clone(),
            url.to_string(),
            replica.map(str::to_string),
        ));
    }

    /// `replica` left the registry ([`HubOutput::PeerDeparted`]): its mesh
    /// links, both ways, are closed; a discovered URL of it is forgotten
    /// (dialed again if the replica announces itself again), a configured
    /// peer is dialed again with backoff and admitted only once the replica
    /// is registered again.
    fn peer_departed(&self, replica: &str) {
        self.metrics.mesh_peers_departed.inc();
        tracing::warn!(peer = %replica, "mesh peer left the registry: its links are closed");
        let links = self
            .mesh_links
            .lock()
            .expect("mesh links lock")
            .all(replica);
        for tx in links {
            let _ = tx.try_send(LinkCmd::Close {
                code: ErrorCode::Refused,
                reason: format!("replica `{replica}` left the registry"),
            });
        }
        self.mesh_dialed
            .lock()
            .expect("mesh dialed lock")
            .retain(|_, r| r.as_deref() != Some(replica));
    }

    /// Every second: re-read `tunnel.revocation_file` when it changed (a
    /// broken file keeps the list in force and is logged) and close every
    /// live tunnel whose token it revokes (`refused`, `revoked`), so a
    /// revocation takes effect within a second without touching other
    /// tunnels.
    async fn watch_revocations(self: Arc<Self>) {
        loop {
            self.rt.sleep(Duration::from_secs(1)).await;
            let verifier = self.verifier.read().expect("verifier lock").clone();
            let Some(mut list) = verifier.revocations() else {
                continue;
            };
            match list.reload_if_changed() {
                Ok(Some(new)) => {
                    let new = Arc::new(new);
                    verifier.set_revocations(Some(new.clone()));
                    tracing::info!(entries = new.len(), "revocation list reloaded");
                    list = new;
                }
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(target: "nowconnect::security", %error, "revocation list not reloaded; the previous one stays in force");
                }
            }
            let revoked: Vec<(TunnelId, AgentIdentity, Option<Sender<LinkCmd>>)> = {
                let mut c = self.control.lock().expect("control lock");
                let ids: Vec<TunnelId> = c
                    .identities
                    .iter()
                    .filter(|(_, id)| list.is_revoked(id))
                    .map(|(t, _)| *t)
                    .collect();
                ids.into_iter()
                    .filter_map(|t| {
                        let id = c.identities.remove(&t)?;
                        Some((t, id, c.tunnels.get(&t).cloned()))
                    })
                    .collect()
            };
            for (tunnel, id, tx) in revoked {
                self.security_event("tunnel_revoked");
                tracing::warn!(target: "nowconnect::security", tunnel, tenant = %id.tenant, agent = %id.agent_id, reason = "revoked", "closing agent tunnel: its token is revoked");
                if let Some(tx) = tx {
                    let _ = tx.try_send(LinkCmd::Close {
                        code: ErrorCode::Refused,
                        reason: "revoked: the agent's token is revoked".into(),
                    });
                }
            }
        }
    }

    /// Count a refusal of a credential holder going beyond its credential.
    pub fn security_event(&self, kind: &'static str) {
        self.metrics
            .security_events
            .get_or_create(&labels(&[("kind", kind)]))
            .inc();
    }

    /// A mesh peer said in its M_HELLO that it is replica `claimed`. It is
    /// served only when its certificate names that replica, it is the
    /// replica the registry announced at the dialed URL (`expected`), it is
    /// not this hub, and it is registered (or allow-listed in
    /// `ha.mesh.allowed_replicas`). The refusal's security-event kind and
    /// reason otherwise.
    pub async fn admit_mesh_peer(
        self: &Arc<Self>,
        claimed: &str,
        cert: Option<&rustls_pki_types::CertificateDer<'_>>,
        outbound: bool,
        expected: Option<&str>,
    ) -> Result<(), (&'static str, String)> {
        let mesh = &self.cfg.raw.ha.mesh;
        if claimed == self.cfg.replica_id {
            return Err((
                "mesh_peer_unexpected_replica",
                format!("the peer claims this hub's own replica id `{claimed}`"),
            ));
        }
        // A dialed hub always shows a certificate over wss://; an inbound
        // one must when mTLS is required.
        let required = mesh.tls.is_some() && (outbound || mesh.require_mtls);
        crate::mesh::check_peer_certificate(cert, claimed, required)
            .map_err(|r| ("mesh_peer_certificate_mismatch", r))?;
        if let Some(e) = expected
            && e != claimed
        {
            return Err((
                "mesh_peer_unexpected_replica",
                format!(
                    "the registry announced replica `{e}` at this URL, the peer claims `{claimed}`"
                ),
            ));
        }
        if mesh.allowed_replicas.iter().any(|r| r == claimed)
            || self.with_control(|c, _| c.hub.replica_registered(claimed))
        {
            return Ok(());
        }
        // Not seen at the last discovery (a hub that just started): ask the
        // registry now rather than wait for the next one.
        let listed = match self.with_control(|c, now| {
            c.memory
                .as_mut()
                .map(|m| m.apply(now, &RegistryOp::ListReplicas))
        }) {
            Some(r) => r,
            None => self.rt.registry_apply(RegistryOp::ListReplicas).await,
        };
        match listed {
            Ok(RegistryReply::Replicas(list)) => {
                let known = list.iter().any(|(r, _)| r == claimed);
                self.with_control(|c, now| c.hub.replicas_listed(now, &list));
                if known {
                    Ok(())
                } else {
                    Err((
                        "mesh_peer_not_registered",
                        format!(
                            "replica `{claimed}` is not registered and not in ha.mesh.allowed_replicas"
                        ),
                    ))
                }
            }
            Ok(other) => Err((
                "mesh_peer_not_registered",
                format!("cannot check replica `{claimed}`: unexpected registry reply {other:?}"),
            )),
            Err(e) => Err((
                "mesh_peer_not_registered",
                format!("cannot check that replica `{claimed}` is registered: {e}"),
            )),
        }
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
        drop(c);
        let _ = self.control_wake.0.try_send(());
        r
    }

    fn pump(self: &Arc<Self>, c: &mut Control, now: Instant) {
        while let Some(out) = c.hub.poll_output() {
            match out {
                HubOutput::Registry { op, call } => match &mut c.memory {
                    Some(m) => {
                        let r = m.apply(now, &call);
                        c.hub.registry_reply(now, op, r);
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
                        Some(tx) => tx.try_send(route).is_ok(),
                        None => false,
                    };
                    if let (Some(t), false) = (local, delivered) {
                        c.hub.flow_ended(t);
                    }
                }
                HubOutput::Peers(peers) => {
                    for (replica, url) in peers {
                        self.dial_once(Some(&replica), &url);
                    }
                }
                HubOutput::PeerDeparted { replica_id } => self.peer_departed(&replica_id),
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

    /// `/readyz`: the status code and the JSON body.
    pub fn readyz(&self) -> (u16, String) {
        let reasons = {
            let c = self.control.lock().expect("control lock");
            let known_peers = self.mesh_dialed.lock().expect("mesh dialed lock").len();
            c.hub.readiness(known_peers)
        };
        if reasons.is_empty() {
            (200, serde_json::json!({"status": "ready"}).to_string())
        } else {
            (
                503,
                serde_json::json!({"status": "degraded", "reasons": reasons}).to_string(),
            )
        }
    }

    /// `/tunnel` before the upgrade: the agent's identity, or the status and
    /// body of the refusal (counted and logged as a security event).
    pub fn authorize_tunnel(
        &self,
        authorization: Option<&str>,
        peer: SocketAddr,
    ) -> Result<AgentIdentity, (u16, String)> {
        let refuse = |label: &'static str, detail: String| {
            self.metrics
                .auth_failures
                .get_or_create(&labels(&[("reason", label)]))
                .inc();
            tracing::warn!(target: "nowconnect::security", %peer, reason = label, %detail, "tunnel refused before upgrade");
            (401, format!("{label}: {detail}\n"))
        };
        if self.is_draining() {
            return Err((503, "hub is draining\n".into()));
        }
        let Some(token) = authorization.and_then(bearer) else {
            return Err(refuse(
                "missing_token",
                "no `Authorization: Bearer` header".into(),
            ));
        };
        let verifier = self.verifier.read().expect("verifier lock").clone();
        let identity = verifier
            .verify(token)
            .map_err(|e| refuse(e.label, e.detail))?;
        if let Err((label, detail)) = self.check_scoped(&identity) {
            self.security_event(label);
            return Err(refuse(label, detail));
        }
        Ok(identity)
    }

    /// A token without a connector scope is refused unless the operator
    /// allows it (`tunnel.allow_unscoped_tokens`).
    fn check_scoped(&self, identity: &AgentIdentity) -> Result<(), (&'static str, String)> {
        if identity.scope.is_none() && !self.cfg.raw.tunnel.allow_unscoped_tokens {
            return Err((
                "unscoped_token",
                format!(
                    "the token for agent `{}` names no connectors (mint it with --connectors; tunnel.allow_unscoped_tokens is false)",
                    identity.agent_id
                ),
            ));
        }
        Ok(())
    }

    /// A token an established tunnel's agent sent to renew its credential
    /// (REAUTH): valid under the current verification settings (revocation
    /// included), for the same agent and tenant, and scoped to cover every
    /// connector the HELLO announced. The new identity, or the refusal's
    /// label and detail.
    pub fn check_reauth(
        &self,
        current: &AgentIdentity,
        announced: &[String],
        token: &str,
    ) -> Result<AgentIdentity, (&'static str, String)> {
        let verifier = self.verifier.read().expect("verifier lock").clone();
        let new = verifier.verify(token).map_err(|e| (e.label, e.detail))?;
        if new.tenant != current.tenant {
            return Err((
                "agent_mismatch",
                format!(
                    "the renewed token is for tenant `{}`, the tunnel for `{}`",
                    new.tenant, current.tenant
                ),
            ));
        }
        self.check_scoped(&new)?;
        new.credential().admits(&current.agent_id, announced)?;
        Ok(new)
    }

    /// The largest WebSocket message or frame a tunnel takes.
    pub fn max_ws_message(&self) -> usize {
        self.cfg.limits.max_frame + 1024
    }

    /// Drive one agent tunnel until it closes: `stream` is what the agent
    /// sends; `out` is the queue `writer` writes to the socket, from this
    /// task (given up to 2 s to flush the close at the end).
    pub async fn run_tunnel<S, K, M>(
        self: Arc<Self>,
        mut stream: S,
        out: Sender<Outgoing>,
        mut writer: InlineWriter<K, M>,
        mut identity: AgentIdentity,
        peer: SocketAddr,
    ) where
        S: futures_lite::Stream<Item = WsIn> + Unpin + Send,
        K: futures_util::Sink<M> + Unpin + Send,
        M: Send,
    {
        let shared = self;
        let tunnel_id = shared.id();
        let (cmd_tx, cmd_rx) = async_channel::unbounded();
        {
            let mut c = shared.control.lock().expect("control lock");
            c.tunnels.insert(tunnel_id, cmd_tx.clone());
            c.identities.insert(tunnel_id, identity.clone());
        }
        let tunnel = Tunnel::hub(Instant::now(), shared.cfg.tunnel_config());
        let mut d = TunnelDriver::new(tunnel, out, cmd_tx, shared.metrics.clone());
        let agent_id = identity.agent_id.clone();
        let tenant = identity.tenant.clone();
        // The tunnel lives no longer than its token.
        let until = |exp: u64| {
            Instant::now() + Duration::from_secs(exp.saturating_sub(crate::jwt::unix_now()))
        };
        let mut expires = until(identity.expires_at);
        let mut expired = false;
        // What the HELLO announced (bare names): a renewed token must cover it.
        let mut announced: Vec<String> = Vec::new();
        tracing::info!(tunnel = tunnel_id, %peer, %tenant, agent = %identity.agent_id, "agent tunnel connected");
        enum Wake {
            In(Option<WsIn>),
            Cmd(LinkCmd),
            Timer,
            Written,
        }
        let mut timer = LoopTimer::default();
        loop {
            // Until it fires, the token's expiry is one more deadline.
            let deadline = if expired {
                d.deadline()
            } else {
                Some(d.deadline().map_or(expires, |at| at.min(expires)))
            };
            timer.set(deadline, |dur| shared.rt.sleep(dur));
            // Frames the core holds beyond the writer's high-water mark
            // make the writer branch ready, so they are moved on.
            let backlogged = d.backlogged();
            let wake = race(
                race(async { Wake::In(stream.next().await) }, async {
                    if writer.is_idle() && !backlogged {
                        futures_lite::future::pending::<()>().await;
                    }
                    writer.write().await;
                    Wake::Written
                }),
                race(
                    async {
                        match cmd_rx.recv().await {
                            Ok(c) => Wake::Cmd(c),
                            // Never: the driver holds a sender.
                            Err(_) => futures_lite::future::pending().await,
                        }
                    },
                    async {
                        timer.wait().await;
                        Wake::Timer
                    },
                ),
            )
            .await;
            let now = Instant::now();
            match wake {
                Wake::In(Some(WsIn::Frame(m))) => d.tunnel.handle_message(now, &m),
                Wake::In(Some(WsIn::Other)) => {}
                Wake::In(Some(WsIn::Closed(why))) => {
                    d.tunnel
                        .on_disconnected(&format!("agent closed the tunnel {why}"));
                }
                Wake::In(Some(WsIn::Failed(e))) => {
                    d.tunnel.on_disconnected(&format!("tunnel read error: {e}"))
                }
                Wake::In(None) => d.tunnel.on_disconnected("tunnel closed by the agent"),
                Wake::Cmd(cmd) => {
                    d.on_cmd(now, cmd);
                    for _ in 0..crate::driver::CMD_BATCH {
                        match cmd_rx.try_recv() {
                            Ok(c) => d.on_cmd(now, c),
                            Err(_) => break,
                        }
                    }
                }
                Wake::Timer if !expired && now >= expires => {
                    expired = true;
                    shared.security_event("tunnel_token_expired");
                    tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id, %tenant, agent = %agent_id, reason = "token_expired", "closing agent tunnel: its token expired");
                    d.tunnel.close(
                        ErrorCode::Refused,
                        "token_expired: the agent's token expired",
                    );
                }
                Wake::Timer => d.tunnel.handle_timeout(now),
                Wake::Written => {}
            }
            let mut closed = None;
            for ev in d.drain() {
                match ev {
                    TunnelEvent::Hello {
                        agent_id: hello_id,
                        connectors,
                    } => {
                        announced = connectors.clone();
                        let credential = identity.credential();
                        let res = shared.with_control(|c, now| {
                            c.hub.tunnel_hello_as(
                                now,
                                tunnel_id,
                                &credential,
                                &hello_id,
                                &connectors,
                            )
                        });
                        if let Err(kind) = res {
                            if kind == "agent_mismatch" {
                                shared
                                    .metrics
                                    .auth_failures
                                    .get_or_create(&labels(&[("reason", kind)]))
                                    .inc();
                            } else {
                                shared.security_event(kind);
                            }
                            tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id, %tenant, agent = %agent_id, hello_agent = %hello_id, reason = kind, "tunnel refused at HELLO");
                        }
                    }
                    TunnelEvent::Reauth { token } => {
                        match shared.check_reauth(&identity, &announced, &token) {
                            Ok(new) => {
                                tracing::info!(tunnel = tunnel_id, %tenant, agent = %agent_id, expires_at = new.expires_at, "agent token renewed on the tunnel");
                                expires = until(new.expires_at);
                                shared.with_control(|c, _| {
                                    if let Some(id) = c.identities.get_mut(&tunnel_id) {
                                        *id = new.clone();
                                    }
                                });
                                identity = new;
                            }
                            Err((label, detail)) => {
                                shared
                                    .metrics
                                    .auth_failures
                                    .get_or_create(&labels(&[("reason", label)]))
                                    .inc();
                                tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id, %tenant, agent = %agent_id, reason = label, %detail, "renewed token refused; closing the tunnel");
                                d.tunnel.close(
                                    ErrorCode::Refused,
                                    &format!("renewed token refused: {label}: {detail}"),
                                );
                            }
                        }
                    }
                    TunnelEvent::Established { epoch, codec } => {
                        if codec != Codec::V2 {
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
            d.flush_bounded();
            // Bridged mesh flows are counted by the tunnel that carries them.
            shared.flows_ended(tunnel_id, d.pipes.take_bridged_ends());
            // Out in this same wake-up, as far as the socket takes it.
            writer.write_now().await;
            d.report_due(now);
            if let Some((code, reason)) = closed {
                if d.tunnel.stats.control_backlog_closes > 0 {
                    shared.security_event("tunnel_output_budget");
                    tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id, %peer, %tenant, agent = %agent_id, %reason, "closing agent tunnel: it does not read what it causes");
                }
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
        crate::driver::end_commands(&cmd_rx, "the agent tunnel closed");
        let left = d.pipes.take_bridged_ends() + d.pipes.bridged_open();
        drop(d);
        shared.flows_ended(tunnel_id, left);
        shared.with_control(|c, now| {
            c.tunnels.remove(&tunnel_id);
            c.identities.remove(&tunnel_id);
            c.hub.tunnel_closed(now, tunnel_id);
        });
        let grace = shared.rt.sleep(Duration::from_secs(2));
        race(writer.write(), grace).await;
    }

    fn refuse_client(&self, reason: &str) {
        self.metrics
            .client_connections_refused
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    async fn accept_loop(self: Arc<Self>, name: String, connector: String, listener: R::Listener) {
        tracing::info!(listener = %name, addr = ?R::local_addr(&listener).ok(), %connector, "listening");
        let edge = self
            .cfg
            .listener_edges
            .get(&name)
            .cloned()
            .unwrap_or_else(crate::config::ListenerEdge::unlimited);
        let admission = Arc::new(Mutex::new(Admission::new(edge.limits, Instant::now())));
        let pending_headers = Arc::new(AtomicUsize::new(0));
        let edge = Arc::new(edge);
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
            if self.active_clients.load(Ordering::Relaxed)
                >= self.cfg.raw.limits.max_client_connections
            {
                self.refuse_client("limit_exceeded");
                tracing::warn!(listener = %name, peer = %crate::logging::client_addr(from), "client connection limit reached");
                continue;
            }
            let Some(trusted) = &edge.proxy else {
                if let Some(load) = self.admit(&name, &admission, from) {
                    self.rt.spawn(self.clone().serve_client(
                        name.clone(),
                        connector.clone(),
                        stream,
                        from,
                        load,
                        edge.first_byte_timeout,
                    ));
                }
                continue;
            };
            if !trusted.trusts(from.ip()) {
                self.refuse_client("untrusted_proxy");
                tracing::warn!(listener = %name, peer = %crate::logging::client_addr(from), "client connection refused: the listener takes PROXY protocol connections from its trusted proxies only");
                continue;
            }
            // Connections still sending their header count against the
            // listener's connection limit too, before they are admitted.
            if pending_headers.load(Ordering::Relaxed) >= edge.limits.max_connections {
                self.refuse_client("proxy_pending");
                tracing::warn!(listener = %name, proxy = %from, "client connection refused: as many connections as the listener takes are still sending their PROXY header");
                continue;
            }
            let pending = PendingGuard::new(&pending_headers);
            let (shared, name, connector, edge, admission) = (
                self.clone(),
                name.clone(),
                connector.clone(),
                edge.clone(),
                admission.clone(),
            );
            self.rt.spawn(async move {
                let within = edge
                    .first_byte_timeout
                    .map_or(PROXY_HEADER_TIMEOUT, |t| t.min(PROXY_HEADER_TIMEOUT));
                let (stream, header) = shared.rt.read_proxy_header(stream, within).await;
                drop(pending);
                let peer = match header {
                    Ok(Some(client)) => client,
                    // A header without an address: the balancer's own check.
                    Ok(None) => from,
                    Err(reason) => {
                        shared.refuse_client("proxy_header");
                        tracing::warn!(listener = %name, proxy = %from, %reason, "client connection refused: no valid PROXY protocol header");
                        return;
                    }
                };
                if let Some(load) = shared.admit(&name, &admission, peer) {
                    shared
                        .clone()
                        .serve_client(name, connector, stream, peer, load, edge.first_byte_timeout)
                        .await;
                }
            });
        }
    }

    /// Count a new client of listener `name` from `peer` against the
    /// listener's limits, or refuse it (counted and logged).
    fn admit(
        &self,
        name: &str,
        admission: &Arc<Mutex<Admission>>,
        peer: SocketAddr,
    ) -> Option<LoadGuard> {
        let res = admission
            .lock()
            .expect("admission lock")
            .admit(Instant::now(), peer.ip());
        match res {
            Ok(()) => Some(LoadGuard(admission.clone(), peer.ip())),
            Err(refusal) => {
                self.refuse_client(refusal.as_str());
                let limits = admission.lock().expect("admission lock").limits();
                tracing::warn!(listener = %name, peer = %crate::logging::client_addr(peer), reason = refusal.as_str(), ?limits, "client connection refused: listener limit reached");
                None
            }
        }
    }

    /// One client of listener `listener`, whose `connector` is qualified by
    /// the listener's tenant: only that tenant's agents (and, when the
    /// listener pins them, only those) can be chosen.
    async fn serve_client(
        self: Arc<Self>,
        listener: String,
        connector: String,
        stream: R::Stream,
        peer: SocketAddr,
        _load: LoadGuard,
        first_byte: Option<Duration>,
    ) {
        let shared = self;
        shared.active_clients.fetch_add(1, Ordering::Relaxed);
        let _guard = ActiveGuard(&shared.active_clients);
        let client = shared.id();
        let (tx, rx) = async_channel::bounded(1);
        let pin = shared.cfg.listener_pins.get(&listener);
        shared.with_control(|c, now| {
            c.routes.insert(client, tx);
            c.hub
                .client_connected_pinned(now, client, &connector, pin.map(Vec::as_slice));
        });
        let Ok(route) = rx.recv().await else {
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
                // The agent knows its connectors by their bare names.
                let open = OpenRequest::Tunnel {
                    connector: nowconnect_core::tenant::split(&connector).1.to_string(),
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
                shared.refuse_client(code.as_str());
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, %code, %reason, "client connection refused");
                return;
            }
        };
        // Counted on its tunnel since the routing decision (see `pump`).
        let _counted = tunnel.map(|t| TunnelFlowGuard(shared.clone(), t));
        let rrx = crate::driver::send_open(cmd, |reply| open.into_cmd(reply));
        let end: FlowEnd = match rrx.recv().await {
            Ok(Ok(end)) => end,
            Ok(Err(reason)) => {
                shared.refuse_client(ErrorCode::LimitExceeded.as_str());
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, %reason, "client connection refused");
                return;
            }
            Err(_) => {
                shared.refuse_client(ErrorCode::LinkLost.as_str());
                tracing::warn!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, "client connection refused: the link to the agent went away");
                return;
            }
        };
        tracing::debug!(peer = %crate::logging::client_addr(peer), %connector, agent = %agent_id, cid = end.cid, "flow opened");
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

    async fn control_timer(self: Arc<Self>) {
        loop {
            let deadline = self
                .control
                .lock()
                .expect("control lock")
                .hub
                .poll_timeout();
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
                self.with_control(|c, now| c.hub.handle_timeout(now));
            }
        }
    }

    /// Reload when a watched file changes (checked every `every`). A failed
    /// reload is retried only after the files change again.
    async fn watch_files(self: Arc<Self>, every: Duration) {
        let Some(reader) = FileReader::start() else {
            tracing::error!(
                "could not start the file-watch thread; watched files are not checked (SIGHUP still reloads)"
            );
            return;
        };
        // The current set of watched files (a reload may change it), read and
        // hashed on the watcher's thread.
        let check = || reader.fingerprint(self.watched.lock().expect("watched lock").clone());
        let Some(mut last) = check().await else {
            return;
        };
        loop {
            self.rt.sleep(every).await;
            let Some(now) = check().await else {
                return;
            };
            if now == last {
                continue;
            }
            match self.reload() {
                Ok(what) => tracing::info!(%what, "a watched file changed; configuration reloaded"),
                Err(error) => tracing::warn!(
                    %error,
                    "a watched file changed but the reload failed; the running configuration stays"
                ),
            }
            // The set may have changed with the reload.
            let Some(now) = check().await else {
                return;
            };
            last = now;
        }
    }

    /// Graceful drain: `/readyz` says `draining` and new tunnels are refused
    /// at once; every agent is told to move (DRAIN) and claims itself on
    /// another hub, while its flows here go on. Listeners keep taking
    /// clients for `shutdown_delay_sec`, then close. Returns when no client
    /// flow, no tunnel flow and no pending agent move is left, or when the
    /// grace period ends.
    async fn drain(self: &Arc<Self>, listeners: Vec<R::Task>) {
        self.draining.store(true, Ordering::Relaxed);
        self.with_control(|c, now| c.hub.drain(now));
        let raw = &self.cfg.raw;
        let start = Instant::now();
        let deadline = start + Duration::from_secs(raw.shutdown_grace_sec);
        let (clients, flows, moves) = self.drain_state();
        tracing::info!(
            open_client_flows = clients,
            open_tunnel_flows = flows,
            agents_to_move = moves,
            delay_sec = raw.shutdown_delay_sec,
            grace_sec = raw.shutdown_grace_sec,
            "draining"
        );
        self.rt
            .sleep(Duration::from_secs(raw.shutdown_delay_sec))
            .await;
        for l in listeners {
            self.rt.abort(l);
        }
        tracing::info!("listeners closed");
        loop {
            let (clients, flows, moves) = self.drain_state();
            if clients == 0 && flows == 0 && moves == 0 {
                tracing::info!(
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    "drained: no flow left and every agent moved"
                );
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    open_client_flows = clients,
                    open_tunnel_flows = flows,
                    agents_not_moved = moves,
                    "grace period over; closing what is left"
                );
                return;
            }
            self.rt.sleep(Duration::from_millis(50)).await;
        }
    }

    /// (client flows, flows on this hub's tunnels, agents told to move that
    /// are not owned elsewhere yet).
    fn drain_state(&self) -> (usize, usize, usize) {
        let c = self.control.lock().expect("control lock");
        (
            self.active_clients.load(Ordering::Relaxed),
            c.hub.open_tunnel_flows(),
            c.hub.moves_pending(),
        )
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
pub async fn start<R: HubRt>(cfg: HubConfig, rt: R, redis: bool) -> Result<HubHandle<R>, String> {
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
            hub: Hub::new(now, core_cfg, seed),
            memory: (!redis).then(MemoryRegistry::new),
            tunnels: BTreeMap::new(),
            identities: BTreeMap::new(),
            routes: BTreeMap::new(),
        }),
        control_wake: async_channel::bounded(1),
        next_id: AtomicU64::new(1),
        active_clients: AtomicUsize::new(0),
        draining: AtomicBool::new(false),
        mesh_links: Mutex::new(Default::default()),
        mesh_dialed: Mutex::new(Default::default()),
        mesh_refused_urls: Mutex::new(Default::default()),
        mesh_tls: RwLock::new(MeshTlsConfigs::default()),
        http_tls: RwLock::new(cfg.http_tls.clone()),
        mesh_started: AtomicBool::new(false),
        watched: Mutex::new(watched_files(&cfg)),
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
        for peer in &mesh.peers {
            shared.dial_once(None, peer);
        }
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

/// The files a reload reads: the configuration file, the JWT key files
/// (secret, public key, JWKS), the HTTP port's certificate and key and the
/// mesh TLS files.
fn watched_files(cfg: &HubConfig) -> Vec<PathBuf> {
    let jwt = &cfg.raw.tunnel.jwt;
    let mut files = vec![cfg.file.clone()];
    files.extend(jwt.hs256_secret_file.iter().cloned());
    files.extend(jwt.public_key_file.iter().cloned());
    files.extend(jwt.jwks_file.iter().cloned());
    if let Some(t) = &cfg.raw.http.tls {
        files.extend([t.cert_file.clone(), t.key_file.clone()]);
    }
    if let Some(t) = &cfg.raw.ha.mesh.tls {
        files.extend([t.ca_bundle.clone(), t.cert_file.clone(), t.key_file.clone()]);
    }
    files
}

/// The watcher's own thread (`nowconnect-watch`), which reads and hashes
/// the watched files: file reads never run on an executor thread, where they
/// would hold up every flow on it (0.2-2 ms per check on a small VM, longer
/// on a slow secrets mount). The thread ends when this is dropped.
struct FileReader {
    ask: std::sync::mpsc::Sender<(Vec<PathBuf>, async_channel::Sender<u64>)>,
}

impl FileReader {
    fn start() -> Option<FileReader> {
        let (ask, asked) = std::sync::mpsc::channel::<(Vec<PathBuf>, async_channel::Sender<u64>)>();
        std::thread::Builder::new()
            .name("nowconnect-watch".into())
            .spawn(move || {
                for (files, reply) in asked {
                    let _ = reply.send_blocking(fingerprint(&files));
                }
            })
            .ok()?;
        Some(FileReader { ask })
    }

    /// The fingerprint of `files`, computed on the watcher's thread (`None`:
    /// the thread is gone, which is logged).
    async fn fingerprint(&self, files: Vec<PathBuf>) -> Option<u64> {
        let (reply, answer) = async_channel::bounded(1);
        let got = match self.ask.send((files, reply)) {
            Ok(()) => answer.recv().await.ok(),
            Err(_) => None,
        };
        if got.is_none() {
            tracing::error!(
                "the file-watch thread ended; watched files are no longer checked (SIGHUP still reloads)"
            );
        }
        got
    }
}

/// What the watched files hold now (a missing file counts as a state too).
fn fingerprint(files: &[PathBuf]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for f in files {
        f.hash(&mut h);
        std::fs::read(f).ok().hash(&mut h);
    }
    h.finish()
}

/// How a client's flow is opened: on a local agent tunnel or over the mesh.
enum OpenRequest {
    Tunnel {
        connector: String,
    },
    Mesh {
        connector: String,
        agent_id: String,
        epoch: Epoch,
    },
}

impl OpenRequest {
    fn into_cmd(self, reply: Reply<Result<FlowEnd, String>>) -> LinkCmd {
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

/// The longest a trusted balancer has to send its PROXY header (less when
/// the listener's first-byte timeout is shorter).
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection counted while it sends its PROXY header.
struct PendingGuard(Arc<AtomicUsize>);

impl PendingGuard {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        PendingGuard(count.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A client connection admitted by its listener ([`Admission`]), released
/// when dropped.
struct LoadGuard(Arc<Mutex<Admission>>, std::net::IpAddr);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.lock().expect("admission lock").release(self.1);
    }
}

struct ActiveGuard<'a>(&'a AtomicUsize);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Ends a local flow's count on its tunnel however the client ends.
struct TunnelFlowGuard<R: HubRt>(Arc<Shared<R>>, u64);

impl<R: HubRt> Drop for TunnelFlowGuard<R> {
    fn drop(&mut self) {
        self.0.flow_ended(self.1);
    }
}
