//! The hub's mesh tasks, written once for every runtime: the listener
//! serving `/mesh` and one task per mesh link (inbound or outbound), each
//! driving a core [`MeshLink`] over the hub's [`Shared`] state. The
//! runtime-neutral pieces they use (certificates, handshake, TLS) are in
//! [`crate::mesh`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_channel::Sender;
use futures_lite::future::race;
use futures_util::StreamExt;
use nowconnect_core::mesh_link::{LinkState, MeshEvent, MeshLink, MeshLinkConfig};
use nowconnect_core::rng::Rng;
use nowconnect_core::{ErrorCode, WsMessage};
use rustls_pki_types::CertificateDer;
use tungstenite::Message;
use tungstenite::protocol::WebSocketConfig;

use super::Shared;
use crate::driver::{FlowPipes, LinkCmd, MeshCmd, Outgoing, Peer, PeerMsg, WRITER_HIGH_WATER};
use crate::mesh::{LinkId, LinkReport, MeshConnected};
use crate::metrics::{add_delta, add_frame_deltas, labels};
use crate::rt::HubRt;

fn ws_config<R: HubRt>(shared: &Shared<R>) -> WebSocketConfig {
    crate::tung::ws_config(shared.max_ws_message())
}

fn link_config<R: HubRt>(shared: &Shared<R>) -> MeshLinkConfig {
    let cfg = shared.cfg();
    let m = &cfg.raw.ha.mesh;
    MeshLinkConfig {
        limits: cfg.limits,
        window: cfg.raw.tunnel.window_bytes,
        max_window: crate::config::max_window(
            cfg.raw.tunnel.window_bytes,
            cfg.raw.tunnel.max_window_bytes,
        ),
        send_queue_depth: m.send_queue_depth,
        max_inflight_bytes: m.per_link_max_inflight_bytes,
        backoff_max: Duration::from_secs(m.connect_backoff_max_sec),
        ..MeshLinkConfig::default()
    }
}

/// Accept mesh connections until the task is aborted.
pub async fn serve<R: HubRt>(shared: Arc<Shared<R>>, listener: R::Listener) {
    let inbound = Arc::new(AtomicUsize::new(0));
    let max = shared.cfg().raw.ha.mesh.max_inbound_links;
    // Behind a TLS-terminating proxy only the proxies may connect: anyone
    // else could write a certificate header.
    let proxies = shared
        .cfg()
        .raw
        .ha
        .mesh
        .tls_terminated_by_proxy
        .then(|| shared.cfg().raw.ha.mesh.trusted_proxies());
    loop {
        let Ok((tcp, peer)) = R::accept(&listener).await else {
            shared.rt().sleep(Duration::from_millis(100)).await;
            continue;
        };
        if let Some(trusted) = &proxies
            && !trusted.trusts(peer.ip())
        {
            shared.security_event("mesh_proxy_untrusted_source");
            shared.metrics().mesh_link_errors.inc();
            tracing::warn!(target: "nowconnect::security", %peer, kind = "mesh_proxy_untrusted_source", "mesh peer refused: not from a trusted proxy (ha.mesh.trusted_proxies); the mesh listener is behind a TLS-terminating proxy");
            drop(tcp);
            continue;
        }
        if inbound.load(Ordering::Relaxed) >= max {
            shared.metrics().mesh_link_errors.inc();
            tracing::warn!(target: "nowconnect::security", %peer, limit = max, "mesh peer refused: inbound link limit reached (ha.mesh.max_inbound_links)");
            drop(tcp);
            continue;
        }
        inbound.fetch_add(1, Ordering::Relaxed);
        let slot = InboundSlot(inbound.clone());
        // The current certificates (reloadable), per connection.
        let hs = Duration::from_secs(shared.cfg().raw.ha.mesh.handshake_timeout_sec);
        let accept = shared
            .rt()
            .mesh_accept(tcp, shared.mesh_inbound(), hs, ws_config(&shared));
        let shared2 = shared.clone();
        shared.rt().spawn(async move {
            match accept.await {
                Ok(c) => {
                    let link = MeshLink::inbound(
                        Instant::now(),
                        link_config(&shared2),
                        &shared2.cfg().replica_id,
                        c.codec,
                        Rng::new(rand::random()),
                    );
                    let dial = Dial::Inbound { cert: c.peer_cert };
                    run_link(shared2, link, "inbound".into(), Some(c.ws), dial).await;
                }
                Err(reason) => {
                    shared2.metrics().mesh_link_errors.inc();
                    tracing::warn!(target: "nowconnect::security", %peer, %reason, "mesh peer refused");
                }
            }
            drop(slot);
        });
    }
}

/// One inbound mesh connection counted against `ha.mesh.max_inbound_links`
/// for as long as it lives.
struct InboundSlot(Arc<AtomicUsize>);

impl Drop for InboundSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keep an outbound link to `url` up for the life of the hub. `expected`:
/// the replica id the registry announced at that URL (none for a
/// configured peer); the peer must then be that replica.
pub async fn dial_peer<R: HubRt>(shared: Arc<Shared<R>>, url: String, expected: Option<String>) {
    let link = MeshLink::outbound(
        Instant::now(),
        link_config(&shared),
        &shared.cfg().replica_id,
        Rng::new(rand::random()),
    );
    let dial = Dial::Outbound {
        url: url.clone(),
        expected,
    };
    run_link(shared, link, url, None, dial).await;
}

/// Which side of a link this hub is, and what it knows of the peer before
/// its M_HELLO.
enum Dial {
    /// The peer dialed; its client certificate (when TLS is on).
    Inbound {
        cert: Option<CertificateDer<'static>>,
    },
    Outbound {
        url: String,
        expected: Option<String>,
    },
}

type DialResult<W> = Result<MeshConnected<W>, String>;
type MeshWriter<W> =
    crate::driver::InlineWriter<futures_util::stream::SplitSink<W, Message>, Message>;

/// Drive one mesh link: its socket(s), its commands, its timers.
async fn run_link<R: HubRt>(
    shared: Arc<Shared<R>>,
    mut link: MeshLink,
    mut label: String,
    first: Option<R::MeshWs>,
    side: Dial,
) {
    let (dial, expected, mut peer_cert) = match side {
        Dial::Inbound { cert } => (None, None, cert),
        Dial::Outbound { url, expected } => (Some(url), expected, None),
    };
    let metrics = shared.metrics().clone();
    let link_id = LinkId(rand::random::<u64>());
    // The peer's replica id for its series: the one the registry announced
    // at a discovered URL now; a configured URL's from the registry's
    // listing or, failing that, the admitted M_HELLO; an inbound link's
    // from its admitted M_HELLO only.
    let mut peer_label: Option<String> = expected.clone();
    let (mut cmd_tx, mut cmd_rx) = async_channel::unbounded();
    let mut pipes = FlowPipes::new(cmd_tx.clone(), metrics.clone());
    let (dial_tx, dial_rx) = async_channel::unbounded::<DialResult<R::MeshWs>>();
    let mut out: Option<Sender<Outgoing>> = None;
    let mut ws_in: Option<futures_util::stream::SplitStream<R::MeshWs>> = None;
    // The socket is written by this task (no writer task hop per frame).
    let mut writer: Option<MeshWriter<R::MeshWs>> = None;
    let mut peer_replica: Option<String> = None;
    let mut reporter = MeshReporter::default();
    let mut timer = crate::driver::LoopTimer::default();
    let attach = |ws: R::MeshWs,
                  out: &mut Option<Sender<Outgoing>>,
                  ws_in: &mut Option<futures_util::stream::SplitStream<R::MeshWs>>,
                  writer: &mut Option<MeshWriter<R::MeshWs>>| {
        let (sink, stream) = ws.split();
        // Unbounded as a type, bounded in use: the loop moves frames from
        // the core only while fewer than WRITER_HIGH_WATER wait here.
        let (tx, rx) = async_channel::unbounded();
        *writer = Some(crate::tung::inline_writer(sink, rx));
        *out = Some(tx);
        *ws_in = Some(stream);
    };
    // A socket that is given up still gets its close frame out (2 s at most).
    let finish = |w: Option<MeshWriter<R::MeshWs>>| {
        if let Some(mut w) = w {
            let grace = shared.rt().sleep(Duration::from_secs(2));
            shared.rt().spawn(async move {
                race(w.write(), grace).await;
            });
        }
    };
    if let Some(ws) = first {
        attach(ws, &mut out, &mut ws_in, &mut writer);
    }
    enum Wake<W> {
        Dialed(DialResult<W>),
        In(Option<Result<Message, tungstenite::Error>>),
        Cmd(LinkCmd<MeshCmd>),
        Timer,
        Written,
    }
    loop {
        while let Some(ev) = link.poll_event() {
            match ev {
                MeshEvent::Connect => {
                    if let Some(url) = &dial {
                        // The current client certificate (reloadable), per dial.
                        let connect = shared.rt().mesh_connect(
                            url.clone(),
                            shared.mesh_client_tls(),
                            ws_config(&shared),
                        );
                        let tx = dial_tx.clone();
                        shared.rt().spawn(async move {
                            let _ = tx.try_send(connect.await);
                        });
                    }
                }
                MeshEvent::Established { peer_replica: p } => {
                    let outbound = dial.is_some();
                    let admitted = shared
                        .admit_mesh_peer(&p, peer_cert.as_ref(), outbound, expected.as_deref())
                        .await;
                    if let Err((kind, reason)) = admitted {
                        shared.security_event(kind);
                        tracing::warn!(target: "nowconnect::security", peer = %p, link = %label, kind, %reason, "mesh peer refused");
                        link.on_disconnected(
                            Instant::now(),
                            &format!("mesh peer refused: {reason}"),
                        );
                        continue;
                    }
                    tracing::info!(peer = %p, link = %label, "mesh link established");
                    if dial.is_none() {
                        label = p.clone();
                    }
                    // Admitted: registered (or allow-listed), so its id may
                    // label series.
                    shared.mesh_peer_registered(&p);
                    peer_label = Some(p.clone());
                    shared.mesh_link_state(&p, link_id, Some(cmd_tx.clone()));
                    peer_replica = Some(p);
                }
                MeshEvent::Open { cid, .. } if peer_replica.is_none() => {
                    link.refuse_open(cid, ErrorCode::Refused, "mesh peer not admitted");
                }
                MeshEvent::Open {
                    cid,
                    connector,
                    agent_id,
                    epoch,
                } => match shared.mesh_open(&agent_id, &connector, epoch) {
                    Ok((tunnel, tunnel_cmd)) => {
                        tracing::debug!(peer = ?peer_replica, %agent_id, %connector, epoch = epoch.0, tunnel = tunnel.0, cid = cid.0, "mesh flow opened");
                        // Accepted once the agent's tunnel has taken the
                        // flow (the bridge's Join), refused with the
                        // tunnel's reason if it does not (the core relay).
                        pipes.hold_open(&mut link, cid, &connector);
                        let mesh = Peer {
                            cmd: cmd_tx.clone(),
                            cid,
                        };
                        let shared2 = shared.clone();
                        // M_OPEN names the tenant-qualified connector; the
                        // agent knows it by its bare name.
                        let bare = nowconnect_core::tenant::split(&connector).1.to_string();
                        shared.rt().spawn(async move {
                            if !crate::driver::bridge(mesh, tunnel_cmd, bare).await {
                                shared2.flow_ended(tunnel);
                            }
                        });
                    }
                    Err((code, reason)) => {
                        if code == ErrorCode::Refused {
                            shared.security_event("mesh_open_connector_not_served");
                        }
                        tracing::warn!(target: "nowconnect::security", peer = ?peer_replica, %agent_id, %connector, epoch = epoch.0, %code, %reason, "mesh open refused");
                        link.refuse_open(cid, code, &reason);
                    }
                },
                MeshEvent::OpenAccepted { .. } => {}
                MeshEvent::Flow(fe) => pipes.on_event(&mut link, fe),
                MeshEvent::StaleEpoch { cid, got, expected } => {
                    tracing::warn!(target: "nowconnect::security", cid = cid.0, got = got.0, expected = expected.0, "stale-epoch mesh frame refused");
                    shared.count_epoch_mismatch();
                }
                MeshEvent::Rtt(d) => metrics.mesh_rtt.observe(d.as_secs_f64()),
                MeshEvent::Down { reason } => {
                    // The link's flows are gone with it. The next connection
                    // gets its own command channel and flows: the peer
                    // numbers its flows anew, and a late command for a flow
                    // of this connection (a bridge's join, data, a reset)
                    // must never reach a new flow that got the same cid.
                    crate::driver::end_commands(&cmd_rx, "the mesh link reconnects");
                    (cmd_tx, cmd_rx) = async_channel::unbounded();
                    pipes = FlowPipes::new(cmd_tx.clone(), metrics.clone());
                    tracing::warn!(link = %label, %reason, "mesh link down");
                    if let Some(o) = out.take() {
                        let _ = o.try_send(Outgoing::Close {
                            code: ErrorCode::LinkLost,
                            reason: reason.clone(),
                        });
                    }
                    ws_in = None;
                    finish(writer.take());
                    if let Some(p) = peer_replica.take() {
                        shared.mesh_link_state(&p, link_id, None);
                    }
                }
            }
        }
        if let Some(o) = &out {
            // Only a few hundred frames wait for the socket outside the
            // core: the rest stays in the core's queues, bounded by
            // `send_queue_depth` (its backpressure and queue gauge see a
            // peer that does not read), and moves on as the socket takes
            // what waits here (`Wake::Written`).
            while o.len() < WRITER_HIGH_WATER {
                match link.poll_transmit() {
                    Some(m) => {
                        let _ = o.try_send(Outgoing::Frame(m));
                    }
                    None => break,
                }
            }
        }
        if let Some(w) = writer.as_mut() {
            // Out in this same wake-up, as far as the socket takes it.
            w.write_now().await;
        }
        if peer_label.is_none()
            && let Some(url) = &dial
        {
            peer_label = shared.mesh_replica_at(url);
        }
        let closed = link.state() == LinkState::Closed;
        if reporter.cadence.due(Instant::now()) || reporter.state != Some(link.state()) || closed {
            reporter.report(&shared, link_id, peer_label.as_deref(), &link, &cmd_tx);
        }
        if link.state() == LinkState::Closed {
            break;
        }
        let deadline = link
            .poll_timeout()
            .map(|(at, _)| at)
            .into_iter()
            .chain(reporter.cadence.deadline())
            .min();
        timer.set(deadline, |d| shared.rt().sleep(d));
        let timer = async {
            timer.wait().await;
            Wake::Timer
        };
        let dialed = async {
            match dial_rx.recv().await {
                Ok(r) => Wake::Dialed(r),
                Err(_) => futures_lite::future::pending().await,
            }
        };
        let incoming = async {
            match ws_in.as_mut() {
                Some(s) => Wake::In(s.next().await),
                None => futures_lite::future::pending().await,
            }
        };
        let cmd = async {
            match cmd_rx.recv().await {
                Ok(c) => Wake::Cmd(c),
                Err(_) => futures_lite::future::pending().await,
            }
        };
        // Frames the core holds beyond the writer's high-water mark make
        // this branch ready too, so they are moved on.
        let backlogged = link.has_transmit();
        let written = async {
            match writer.as_mut() {
                Some(w) if !w.is_done() && (!w.is_idle() || backlogged) => {
                    w.write().await;
                    Wake::Written
                }
                _ => futures_lite::future::pending().await,
            }
        };
        let wake = race(race(incoming, cmd), race(race(dialed, timer), written)).await;
        let now = Instant::now();
        match wake {
            Wake::Dialed(r) => match r {
                Ok(c) if link.state() == LinkState::Connecting => {
                    attach(c.ws, &mut out, &mut ws_in, &mut writer);
                    peer_cert = c.peer_cert;
                    link.on_connected(now, c.codec);
                }
                Ok(_) => {}
                Err(e) => link.on_disconnected(now, &e),
            },
            Wake::In(msg) => match msg {
                Some(Ok(Message::Binary(b))) => link.handle_message(now, &WsMessage::Binary(b)),
                Some(Ok(Message::Text(t))) => {
                    link.handle_message(now, &WsMessage::Text(t.as_str().to_owned()))
                }
                Some(Ok(Message::Close(f))) => {
                    let why = f.map(|f| f.reason.to_string()).unwrap_or_default();
                    link.on_disconnected(now, &format!("peer closed the mesh link: {why}"));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => link.on_disconnected(now, &format!("mesh read error: {e}")),
                None => link.on_disconnected(now, "mesh link closed by the peer"),
            },
            Wake::Cmd(cmd) => {
                let mut next = Some(cmd);
                let mut budget = crate::driver::CMD_BATCH;
                while let Some(cmd) = next.take() {
                    match cmd {
                        LinkCmd::Flow { cid, msg } => pipes.on_flow(&mut link, cid, msg),
                        LinkCmd::Link(MeshCmd::Join { cid, peer }) => {
                            pipes.join(&mut link, cid, peer)
                        }
                        LinkCmd::Link(MeshCmd::OpenFlow {
                            connector,
                            agent_id,
                            epoch,
                            reply,
                        }) => {
                            let res = link
                                .open_flow(&connector, &agent_id, epoch)
                                .map(|cid| pipes.attach(&mut link, cid, &connector))
                                .map_err(|e| e.refusal("mesh link flow"));
                            if let Err(async_channel::TrySendError::Closed(Ok(end))) =
                                reply.try_send(res)
                            {
                                let reset = PeerMsg::Reset {
                                    code: ErrorCode::ConnectionReset,
                                    reason: "client went away".into(),
                                };
                                pipes.on_flow(&mut link, end.cid, reset);
                            }
                        }
                        // A configured peer (dialed, not announced) is
                        // dialed again with backoff; any other link ends.
                        LinkCmd::Close { code, reason }
                            if code != ErrorCode::Shutdown
                                && dial.is_some()
                                && expected.is_none() =>
                        {
                            link.on_disconnected(now, &reason)
                        }
                        LinkCmd::Close { reason, .. } => link.close(&reason),
                    }
                    budget -= 1;
                    if budget > 0 {
                        next = cmd_rx.try_recv().ok();
                    }
                }
            }
            Wake::Timer => link.handle_timeout(now),
            Wake::Written => {}
        }
    }
    crate::driver::end_commands(&cmd_rx, "the mesh link closed");
    finish(writer.take());
    if let Some(p) = peer_replica {
        shared.mesh_link_state(&p, link_id, None);
    }
    shared.mesh_link_gone(link_id);
}

/// Exports one link's core counters as metric deltas, and its state, queue
/// and inflight to the hub's per-peer series ([`crate::mesh::MeshLinks`]).
#[derive(Default)]
struct MeshReporter {
    frames_in: BTreeMap<nowconnect_core::FrameType, u64>,
    frames_out: BTreeMap<nowconnect_core::FrameType, u64>,
    backpressure: BTreeMap<&'static str, u64>,
    bytes_in: u64,
    bytes_out: u64,
    reconnects: u64,
    errors: u64,
    dups: u64,
    growths: u64,
    /// The link state last reported (a change is reported at once).
    state: Option<LinkState>,
    cadence: crate::metrics::Cadence,
}

impl MeshReporter {
    fn report<R: HubRt>(
        &mut self,
        shared: &Shared<R>,
        link_id: LinkId,
        peer: Option<&str>,
        link: &MeshLink,
        cmd: &crate::driver::MeshTx,
    ) {
        let m = shared.metrics();
        let s = &link.stats;
        add_frame_deltas(&m.mesh_frames, "in", &s.frames_in, &mut self.frames_in);
        add_frame_deltas(&m.mesh_frames, "out", &s.frames_out, &mut self.frames_out);
        add_delta(&m.mesh_link_reconnects, s.reconnects, &mut self.reconnects);
        add_delta(&m.mesh_link_errors, s.errors, &mut self.errors);
        add_delta(
            &m.cid_dedup_dropped,
            link.mux().stats.duplicates_dropped,
            &mut self.dups,
        );
        add_delta(
            &m.flow_window_growths,
            link.mux().stats.windows_grown,
            &mut self.growths,
        );
        self.state = Some(link.state());
        let report = LinkReport {
            peer: peer.map(str::to_string),
            outbound: link.is_outbound(),
            state: link.state(),
            queue_frames: link.queue_len(),
            inflight_bytes: link.inflight_bytes(),
        };
        // Per-peer counters: added once the peer may label series (until
        // then they wait here, and are added later if it does).
        shared.mesh_link_report(link_id, report, cmd.clone(), |m, peer| {
            for reason in nowconnect_core::mesh_link::BACKPRESSURE_REASONS {
                let n = s.backpressure.get(reason).copied().unwrap_or(0);
                let seen = self.backpressure.entry(reason).or_default();
                if n > *seen {
                    let c = m
                        .mesh_backpressure_drops
                        .get_or_create(&labels(&[("peer", peer), ("reason", reason)]));
                    add_delta(&c, n, seen);
                }
            }
            for (dir, n, seen) in [
                ("in", s.bytes_in, &mut self.bytes_in),
                ("out", s.bytes_out, &mut self.bytes_out),
            ] {
                if n > *seen {
                    let c = m
                        .mesh_bytes
                        .get_or_create(&labels(&[("peer", peer), ("dir", dir)]));
                    add_delta(&c, n, seen);
                }
            }
        });
    }
}
