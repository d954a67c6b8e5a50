//! Agent tunnels: `/tunnel` authorisation before the upgrade, token
//! verification for re-authentication, and one task per agent socket around
//! a `Tunnel::hub`, which reports its HELLO, establishment, renewals and
//! close to the core `HubNode` and executes what it decides (through the
//! pump: accept, close, drain).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_channel::Sender;
use futures_lite::StreamExt;
use futures_lite::future::race;
use nowconnect_core::ErrorCode;
use nowconnect_core::hub::TunnelId;
use nowconnect_core::hub_node::{RefusalCount, RefusalStage, Refused};
use nowconnect_core::tunnel::{Tunnel, TunnelEvent};

use crate::driver::{InlineWriter, LinkCmd, LoopTimer, Outgoing, TunnelCmd, TunnelDriver};
use crate::jwt::AgentIdentity;
use crate::metrics::labels;
use crate::rt::{HubRt, WsIn};

use super::{Shared, bearer};

impl<R: HubRt> Shared<R> {
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
    /// (REAUTH), checked as at the upgrade: valid under the current
    /// verification settings (revocation included) and scoped as the
    /// operator requires. The node decides whether it may replace the
    /// tunnel's current token (`HubNode::tunnel_reauthed`). The new
    /// identity, or the refusal's label and detail.
    pub fn verify_reauth(&self, token: &str) -> Result<AgentIdentity, (&'static str, String)> {
        let verifier = self.verifier.read().expect("verifier lock").clone();
        let new = verifier.verify(token).map_err(|e| (e.label, e.detail))?;
        self.check_scoped(&new)?;
        Ok(new)
    }

    /// Count and log a refusal the node decided (its close follows).
    pub(super) fn tunnel_refused(&self, r: &Refused) {
        match r.refusal.count() {
            RefusalCount::AuthFailure(reason) => {
                self.metrics
                    .auth_failures
                    .get_or_create(&labels(&[("reason", reason)]))
                    .inc();
            }
            RefusalCount::SecurityEvent(kind) => self.security_event(kind),
        }
        let (tunnel, tenant, agent, reason) =
            (r.tunnel, &r.tenant, &r.agent_id, r.refusal.as_str());
        let detail = &r.detail;
        match r.refusal.stage() {
            RefusalStage::Hello => {
                let hello_agent = r.hello_agent.as_deref().unwrap_or_default();
                tracing::warn!(target: "nowconnect::security", tunnel = tunnel.0, %tenant, %agent, %hello_agent, reason, "tunnel refused at HELLO");
            }
            RefusalStage::Reauth => {
                tracing::warn!(target: "nowconnect::security", tunnel = tunnel.0, %tenant, %agent, reason, %detail, "renewed token refused; closing the tunnel");
            }
            RefusalStage::Expiry => {
                tracing::warn!(target: "nowconnect::security", tunnel = tunnel.0, %tenant, %agent, reason, "closing agent tunnel: its token expired");
            }
            RefusalStage::Revocation => {
                tracing::warn!(target: "nowconnect::security", tunnel = tunnel.0, %tenant, %agent, reason, "closing agent tunnel: its token is revoked");
            }
        }
    }

    /// Drive one agent tunnel until it closes: `stream` is what the agent
    /// sends; `out` is the queue `writer` writes to the socket, from this
    /// task (given up to 2 s to flush the close at the end).
    pub async fn run_tunnel<S, K, M>(
        self: Arc<Self>,
        mut stream: S,
        out: Sender<Outgoing>,
        mut writer: InlineWriter<K, M>,
        identity: AgentIdentity,
        peer: SocketAddr,
    ) where
        S: futures_lite::Stream<Item = WsIn> + Unpin + Send,
        K: futures_util::Sink<M> + Unpin + Send,
        M: Send,
    {
        let shared = self;
        let tunnel_id = TunnelId(shared.id());
        let (cmd_tx, cmd_rx) = async_channel::unbounded();
        // The tunnel lives no longer than its token: the node closes it then.
        let until = |exp: u64| {
            Instant::now() + Duration::from_secs(exp.saturating_sub(crate::jwt::unix_now()))
        };
        shared.with_control(|c, now| {
            c.tunnels.insert(tunnel_id, cmd_tx.clone());
            c.identities.insert(tunnel_id, identity.clone());
            let expires = until(identity.expires_at);
            c.node
                .tunnel_connected(now, tunnel_id, identity.credential(), expires);
        });
        let tunnel = Tunnel::hub(Instant::now(), shared.cfg.tunnel_config());
        let mut d = TunnelDriver::new(tunnel, out, cmd_tx, shared.metrics.clone());
        let agent_id = identity.agent_id.clone();
        let tenant = identity.tenant.clone();
        tracing::info!(tunnel = tunnel_id.0, %peer, %tenant, agent = %identity.agent_id, "agent tunnel connected");
        enum Wake {
            In(Option<WsIn>),
            Cmd(LinkCmd<TunnelCmd>),
            Timer,
            Written,
        }
        let mut timer = LoopTimer::default();
        loop {
            timer.set(d.deadline(), |dur| shared.rt.sleep(dur));
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
                Wake::Timer => d.tunnel.handle_timeout(now),
                Wake::Written => {}
            }
            let mut closed = None;
            for ev in d.drain() {
                match ev {
                    ev @ TunnelEvent::Hello { .. } => {
                        shared.with_control(|c, now| c.node.tunnel_event(now, tunnel_id, &ev));
                    }
                    TunnelEvent::Reauth { token } => match shared.verify_reauth(&token) {
                        Ok(new) => {
                            let expires = until(new.expires_at);
                            let taken = shared.with_control(|c, now| {
                                let taken = c.node.tunnel_reauthed(
                                    now,
                                    tunnel_id,
                                    new.credential(),
                                    expires,
                                );
                                if taken && let Some(id) = c.identities.get_mut(&tunnel_id) {
                                    *id = new.clone();
                                }
                                taken
                            });
                            if taken {
                                tracing::info!(tunnel = tunnel_id.0, %tenant, agent = %agent_id, expires_at = new.expires_at, "agent token renewed on the tunnel");
                            }
                        }
                        Err((label, detail)) => shared.with_control(|c, now| {
                            c.node.tunnel_reauth_refused(now, tunnel_id, label, detail)
                        }),
                    },
                    ev @ TunnelEvent::Established { epoch, codec, .. } => {
                        shared.with_control(|c, now| c.node.tunnel_event(now, tunnel_id, &ev));
                        shared
                            .metrics
                            .tunnels
                            .get_or_create(&labels(&[("result", "accepted")]))
                            .inc();
                        tracing::info!(tunnel = tunnel_id.0, agent = %agent_id, epoch = epoch.0, codec = codec.as_str(), "agent tunnel established");
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
                    tracing::warn!(target: "nowconnect::security", tunnel = tunnel_id.0, %peer, %tenant, agent = %agent_id, %reason, "closing agent tunnel: it does not read what it causes");
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
                tracing::info!(tunnel = tunnel_id.0, agent = %agent_id, %code, %reason, "agent tunnel closed");
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
            c.node.tunnel_closed(now, tunnel_id);
        });
        let grace = shared.rt.sleep(Duration::from_secs(2));
        race(writer.write(), grace).await;
    }
}
