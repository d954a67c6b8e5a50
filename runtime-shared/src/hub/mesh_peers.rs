//! The hub's side of its mesh peers: TLS of new links, `M_OPEN` checks,
//! which replica each live link reaches, dialing announced peers, and
//! admitting a peer (certificate, replica id, allowed replicas).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use nowconnect_core::hub::TunnelId;
use nowconnect_core::registry::{RegistryOp, RegistryReply};
use nowconnect_core::{Epoch, ErrorCode};

use crate::driver::{LinkCmd, MeshTx, TunnelTx};
use crate::mesh::{LinkId, LinkReport};
use crate::metrics::{Metrics, labels};
use crate::rt::HubRt;

use super::{Shared, mesh_tasks};

impl<R: HubRt> Shared<R> {
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
    pub fn mesh_open(
        self: &Arc<Self>,
        agent_id: &str,
        connector: &str,
        epoch: Epoch,
    ) -> Result<(TunnelId, TunnelTx), (ErrorCode, String)> {
        self.with_control(|c, _| {
            let tunnel = c.node.mesh_open(agent_id, connector, epoch)?;
            match c.tunnels.get(&tunnel).cloned() {
                Some(tx) => Ok((tunnel, tx)),
                None => {
                    c.node.flow_ended(tunnel);
                    Err((
                        ErrorCode::LinkLost,
                        "the agent tunnel went away".to_string(),
                    ))
                }
            }
        })
    }

    pub fn count_epoch_mismatch(self: &Arc<Self>) {
        self.with_control(|c, _| c.node.hub_mut().count_epoch_mismatch());
    }

    /// A mesh link to `replica` came up (`Some(sender)`) or went down.
    pub fn mesh_link_state(self: &Arc<Self>, replica: &str, link: LinkId, sender: Option<MeshTx>) {
        let up = {
            let mut links = self.mesh_links.lock().expect("mesh links lock");
            links.set(replica, link, sender)
        };
        self.with_control(|c, _| c.node.hub_mut().mesh_link_up(replica, up));
    }

    /// A link task's report: its peer's series follow (see [`MeshLinks`]);
    /// `counters` adds its per-peer counter deltas when the peer exports.
    ///
    /// [`MeshLinks`]: crate::mesh::MeshLinks
    pub fn mesh_link_report(
        &self,
        link: LinkId,
        report: LinkReport,
        cmd: MeshTx,
        counters: impl FnOnce(&Metrics, &str),
    ) {
        self.mesh_links.lock().expect("mesh links lock").report(
            &self.metrics,
            link,
            report,
            cmd,
            counters,
        );
    }

    /// A link task ended.
    pub fn mesh_link_gone(&self, link: LinkId) {
        self.mesh_links
            .lock()
            .expect("mesh links lock")
            .gone(&self.metrics, link);
    }

    /// `replica` is registered (listed by the registry, or admitted on a
    /// link): its series may exist again.
    pub fn mesh_peer_registered(&self, replica: &str) {
        self.mesh_links
            .lock()
            .expect("mesh links lock")
            .registered(&self.metrics, replica);
    }

    /// The replica the registry's last listing announced at `url`, if any
    /// (to label a configured peer's link before its M_HELLO).
    pub fn mesh_replica_at(&self, url: &str) -> Option<String> {
        self.mesh_peer_urls
            .lock()
            .expect("mesh peer urls lock")
            .get(url)
            .cloned()
    }

    /// A registry listing of the other replicas (replica id, mesh URL).
    pub(super) fn peers_listed(self: &Arc<Self>, peers: Vec<(String, String)>) {
        *self.mesh_peer_urls.lock().expect("mesh peer urls lock") = peers
            .iter()
            .map(|(r, url)| (url.clone(), r.clone()))
            .collect();
        for (replica, url) in peers {
            self.mesh_peer_registered(&replica);
            self.dial_once(Some(&replica), &url);
        }
    }

    /// Start an outbound mesh link to `url`, announced in the registry by
    /// `replica`, unless one exists already. Redis holds ownership, not
    /// authority: with mesh TLS configured only a `wss://` URL is dialed, and
    /// the peer must then prove (by its certificate) that it is `replica`.
    /// `replica` is `None` for a peer from `ha.mesh.peers` (trusted as
    /// configured).
    /// Dial every `ha.mesh.peers` URL not dialed yet (once the mesh runs).
    pub(super) fn dial_static_peers(self: &Arc<Self>) {
        for peer in &self.cfg.raw.ha.mesh.peers {
            self.dial_once(None, peer);
        }
    }

    pub(super) fn dial_once(self: &Arc<Self>, replica: Option<&str>, url: &str) {
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
    pub(super) fn peer_departed(&self, replica: &str) {
        self.metrics.mesh_peers_departed.inc();
        tracing::warn!(peer = %replica, "mesh peer left the registry: its links are closed");
        // Every link task to it, established or not (one in backoff would
        // otherwise redial a discovered URL for ever); its series go now.
        let links = self
            .mesh_links
            .lock()
            .expect("mesh links lock")
            .departed(&self.metrics, replica);
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
        self.mesh_peer_urls
            .lock()
            .expect("mesh peer urls lock")
            .retain(|_, r| r != replica);
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
            || self.with_control(|c, _| c.node.hub_mut().replica_registered(claimed))
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
                self.with_control(|c, now| c.node.hub_mut().replicas_listed(now, &list));
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
}
