//! The hub mesh's runtime-neutral pieces, written once for every runtime:
//! the mesh WebSocket type an adapter hands back ([`MeshWs`]), peer
//! certificates and their names, the mesh TLS configurations (client
//! certificates required when `require_mtls`; or, behind a TLS-terminating
//! proxy, a plain listener taking the certificate from a header, see
//! [`crate::mesh_ingress`]), the `/mesh` handshake on both sides, and the
//! table of live links. The listener and the link tasks, each driving a core
//! [`nowconnect_core::mesh_link::MeshLink`] (which owns backoff, queues,
//! caps, credit, epochs and RTT), run over the hub's state in
//! `crate::hub::mesh_tasks`. Origin side: a client routed to another replica
//! gets a mesh flow. Owner side: an `M_OPEN` whose epoch is current is
//! bridged to a flow on the agent's tunnel. The adapter only dials and
//! accepts the TLS + WebSocket connections ([`crate::rt::HubRt`]).
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::{Sink, Stream};
use nowconnect_core::Codec;
use nowconnect_core::mesh_link::LinkState;
use prometheus_client::metrics::counter::Counter;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tungstenite::Message;
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::Request as ClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::http::{HeaderValue, StatusCode};

use crate::config::{MeshConfig, MeshTls};
use crate::driver::MeshTx;
use crate::mesh_ingress::ProxyClientCerts;
use crate::metrics::{Metrics, labels};

/// A mesh WebSocket of any runtime (tokio-tungstenite and async-tungstenite
/// share tungstenite's message type).
pub trait MeshWs:
    Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message> + Send + Unpin + 'static
{
}
impl<T> MeshWs for T where
    T: Stream<Item = Result<Message, tungstenite::Error>> + Sink<Message> + Send + Unpin + 'static
{
}

/// A mesh connection, dialed or accepted: the WebSocket, the codec its
/// handshake chose, and the peer's end-entity certificate (over TLS).
pub struct MeshConnected<W> {
    pub ws: W,
    pub codec: Codec,
    pub peer_cert: Option<CertificateDer<'static>>,
}

/// The names a certificate is issued for: its DNS and URI subject
/// alternative names.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot read the peer certificate: {e}"))?;
    let san = parsed.subject_alternative_name().map_err(|e| {
        format!("cannot read the peer certificate's subject alternative names: {e}")
    })?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A mesh peer says (in M_HELLO) that it is `claimed`: its certificate must
/// name that replica id (a DNS or URI subject alternative name equal to it).
/// Without a certificate the claim is only taken where the configuration
/// does not ask for one (`required` is false: no mesh TLS, or an inbound
/// link with `require_mtls: false`).
pub fn check_peer_certificate(
    cert: Option<&CertificateDer<'_>>,
    claimed: &str,
    required: bool,
) -> Result<(), String> {
    let Some(cert) = cert else {
        return if required {
            Err(format!(
                "the peer claims replica `{claimed}` without a certificate"
            ))
        } else {
            Ok(())
        };
    };
    let names = certificate_names(cert)?;
    if names.iter().any(|n| n == claimed) {
        Ok(())
    } else {
        Err(format!(
            "the peer claims replica `{claimed}` but its certificate names {names:?}"
        ))
    }
}

/// One mesh link task of this hub (drawn at random when the task starts;
/// kept across the link's reconnections).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

impl std::fmt::Display for LinkId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a link task last reported of itself.
#[derive(Clone, Debug)]
pub struct LinkReport {
    /// The peer's replica id once known: the one the registry announced at
    /// a discovered URL, the registry's replica at a configured URL, or the
    /// one an admitted M_HELLO proved. `None`: not identified (an inbound
    /// link before its M_HELLO, a configured peer never identified).
    pub peer: Option<String>,
    pub outbound: bool,
    pub state: LinkState,
    /// Frames the core holds for the socket (`MeshLink::queue_len`).
    pub queue_frames: usize,
    pub inflight_bytes: u64,
}

/// One link task: its last report and where its commands go now (each
/// connection of a link has a command channel of its own).
struct LinkTask {
    report: LinkReport,
    cmd: MeshTx,
}

/// The mesh links of this hub: the established ones by peer replica id (a
/// peer may have an inbound and an outbound link at once; either can carry
/// flows), every link task with its last report, and the per-peer series
/// exported from them.
///
/// The series (`nowconnect_mesh_links{peer,state}`, queue, inflight,
/// backpressure and bytes by peer) exist once per peer, labelled by its
/// replica id, only for a peer that is identified and not departed: label
/// values come only from the registry's listing or an admitted M_HELLO,
/// never from a URL or an unauthenticated connection, so no peer can make
/// series without bound. The state is the best of the peer's links:
/// `established` if any is, else the outbound link's state; a peer with no
/// link left (or only an inbound one that is not established) has none.
#[derive(Default)]
pub struct MeshLinks {
    by_replica: BTreeMap<String, BTreeMap<LinkId, MeshTx>>,
    tasks: BTreeMap<LinkId, LinkTask>,
    /// Replicas that left the registry and were not listed or admitted
    /// since: their links export nothing.
    departed: BTreeSet<String>,
    /// Peers whose series exist.
    exported: BTreeSet<String>,
}

impl MeshLinks {
    /// Record a link's state; returns whether any link to `replica` is up.
    pub fn set(&mut self, replica: &str, link: LinkId, sender: Option<MeshTx>) -> bool {
        let links = self.by_replica.entry(replica.to_string()).or_default();
        match sender {
            Some(tx) => {
                links.insert(link, tx);
            }
            None => {
                links.remove(&link);
            }
        }
        let up = !links.is_empty();
        if !up {
            self.by_replica.remove(replica);
        }
        up
    }

    pub fn sender(&self, replica: &str) -> Option<MeshTx> {
        self.by_replica.get(replica)?.values().next().cloned()
    }

    /// Every established link to `replica` (inbound and outbound).
    pub fn all(&self, replica: &str) -> Vec<MeshTx> {
        self.by_replica
            .get(replica)
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default()
    }

    /// A link task's report; its peer's series follow. `counters` adds the
    /// link's per-peer counter deltas under the peer's label, called only
    /// when the peer's series may exist (identified, not departed), under
    /// the same lock as a departure's removal, so a late report cannot
    /// bring a departed peer's series back.
    pub fn report(
        &mut self,
        m: &Metrics,
        link: LinkId,
        report: LinkReport,
        cmd: MeshTx,
        counters: impl FnOnce(&Metrics, &str),
    ) {
        let old = self
            .tasks
            .insert(link, LinkTask { report, cmd })
            .and_then(|t| t.report.peer);
        let new = self.tasks[&link].report.peer.clone();
        if let Some(p) = &new
            && !self.departed.contains(p)
        {
            counters(m, p);
        }
        if old != new
            && let Some(o) = old
        {
            self.export(m, &o);
        }
        if let Some(p) = new {
            self.export(m, &p);
        }
    }

    /// A link task ended.
    pub fn gone(&mut self, m: &Metrics, link: LinkId) {
        if let Some(p) = self.tasks.remove(&link).and_then(|t| t.report.peer) {
            self.export(m, &p);
            // A departed replica no task knows any more needs no marker: a
            // new link learns its id only from a listing or an admission,
            // both of which mean it is registered again. So the set stays
            // as small as the links that are left.
            if !self
                .tasks
                .values()
                .any(|t| t.report.peer.as_deref() == Some(p.as_str()))
            {
                self.departed.remove(&p);
            }
        }
    }

    /// `replica` left the registry: its series go at once and its links
    /// export nothing until it is listed or admitted again. Returns the
    /// command channel of every link task to it (established or not).
    pub fn departed(&mut self, m: &Metrics, replica: &str) -> Vec<MeshTx> {
        let links: Vec<MeshTx> = self
            .tasks
            .values()
            .filter(|t| t.report.peer.as_deref() == Some(replica))
            .map(|t| t.cmd.clone())
            .collect();
        // Marked only while a link task knows it (see `gone`).
        if !links.is_empty() {
            self.departed.insert(replica.to_string());
        }
        self.export(m, replica);
        links
    }

    /// `replica` is registered (listed, or admitted on a link) again.
    pub fn registered(&mut self, m: &Metrics, replica: &str) {
        if self.departed.remove(replica) {
            self.export(m, replica);
        }
    }

    /// Peers whose series exist now.
    pub fn exported(&self) -> impl Iterator<Item = &str> {
        self.exported.iter().map(String::as_str)
    }

    /// The peer's view over its links: (best state, queued frames,
    /// inflight bytes), or `None` when it exports nothing.
    fn view(&self, peer: &str) -> Option<(LinkState, usize, u64)> {
        if self.departed.contains(peer) {
            return None;
        }
        let links = || {
            self.tasks
                .values()
                .map(|t| &t.report)
                .filter(|r| r.peer.as_deref() == Some(peer))
        };
        let state = if links().any(|r| r.state == LinkState::Established) {
            LinkState::Established
        } else {
            links()
                .filter(|r| r.outbound)
                .map(|r| r.state)
                .min_by_key(|s| match s {
                    LinkState::Established => 0,
                    LinkState::Connecting => 1,
                    LinkState::Backoff => 2,
                    LinkState::Closed => 3,
                })?
        };
        let queue = links().map(|r| r.queue_frames).sum();
        let inflight = links().map(|r| r.inflight_bytes).sum();
        Some((state, queue, inflight))
    }

    /// Set or remove `peer`'s series.
    fn export(&mut self, m: &Metrics, peer: &str) {
        let p = [("peer", peer)];
        match self.view(peer) {
            Some((state, queue, inflight)) => {
                for st in LinkState::ALL {
                    m.mesh_links
                        .get_or_create(&labels(&[("peer", peer), ("state", st.as_str())]))
                        .set(i64::from(st == state));
                }
                m.mesh_link_queue_frames
                    .get_or_create(&labels(&p))
                    .set(queue as i64);
                m.mesh_link_inflight_bytes
                    .get_or_create(&labels(&p))
                    .set(inflight as i64);
                // Created at zero, so rate() and increase() see a start.
                for reason in nowconnect_core::mesh_link::BACKPRESSURE_REASONS {
                    let _ = m
                        .mesh_backpressure_drops
                        .get_or_create(&labels(&[("peer", peer), ("reason", reason)]));
                }
                for dir in ["in", "out"] {
                    let _ = m
                        .mesh_bytes
                        .get_or_create(&labels(&[("peer", peer), ("dir", dir)]));
                }
                self.exported.insert(peer.to_string());
            }
            None => {
                if self.exported.remove(peer) {
                    m.remove_mesh_peer(peer);
                }
            }
        }
    }
}

#[derive(Clone, Default)]
pub struct MeshTlsConfigs {
    /// TLS of the mesh listener (none behind a TLS-terminating proxy).
    pub server: Option<Arc<rustls::ServerConfig>>,
    pub client: Option<Arc<rustls::ClientConfig>>,
    /// Behind a TLS-terminating proxy: how the peer's certificate is taken
    /// from the upgrade request.
    pub proxy: Option<Arc<ProxyClientCerts>>,
}

/// How the mesh listener authenticates an inbound connection: TLS with
/// client certificates, or (behind a TLS-terminating proxy) the certificate
/// header; `refused` counts refused certificate headers.
pub struct MeshInbound {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub proxy: Option<Arc<ProxyClientCerts>>,
    pub refused: Counter,
}

impl MeshInbound {
    /// The state of one connection's WebSocket handshake.
    pub fn handshake(&self) -> MeshHandshake {
        MeshHandshake {
            proxy: self.proxy.clone(),
            refused: self.refused.clone(),
            codec: None,
            cert: None,
            refusal: None,
        }
    }
}

/// One inbound `/mesh` upgrade: the codec chosen, and, behind a proxy, the
/// certificate read from the request header (or why it was refused).
pub struct MeshHandshake {
    proxy: Option<Arc<ProxyClientCerts>>,
    refused: Counter,
    codec: Option<Codec>,
    cert: Option<CertificateDer<'static>>,
    refusal: Option<String>,
}

impl MeshHandshake {
    /// The handshake callback: path and subprotocol ([`choose_codec`]),
    /// then, behind a proxy, the certificate header; a missing, malformed
    /// or unverifiable certificate is answered `403` and counted. On a
    /// listener doing its own TLS a certificate header means nothing and is
    /// not read.
    // The handshake callback's error type is tungstenite's `ErrorResponse`.
    #[allow(clippy::result_large_err)]
    pub fn on_request(&mut self, req: &Request, resp: Response) -> Result<Response, ErrorResponse> {
        let (resp, codec) = choose_codec(req, resp)?;
        if let Some(p) = &self.proxy {
            match p.verify(req, rustls_pki_types::UnixTime::now()) {
                Ok(c) => self.cert = Some(c),
                Err(reason) => {
                    self.refused.inc();
                    let mut e = ErrorResponse::new(Some("client certificate refused".into()));
                    *e.status_mut() = StatusCode::FORBIDDEN;
                    self.refusal = Some(reason);
                    return Err(e);
                }
            }
        }
        self.codec = Some(codec);
        Ok(resp)
    }

    /// Why the handshake failed: the certificate refusal, else `error`.
    pub fn failed(&self, error: impl std::fmt::Display) -> String {
        match &self.refusal {
            Some(r) => format!("client certificate header refused: {r}"),
            None => format!("mesh WebSocket handshake failed: {error}"),
        }
    }

    /// The accepted connection; its peer certificate is the one of the TLS
    /// handshake (`tls_cert`) or, behind a proxy, the header's.
    pub fn connected<W>(
        self,
        ws: W,
        tls_cert: Option<CertificateDer<'static>>,
    ) -> MeshConnected<W> {
        MeshConnected {
            ws,
            codec: self.codec.unwrap_or(Codec::V2),
            peer_cert: tls_cert.or(self.cert),
        }
    }
}

pub fn tls_configs(mesh: &MeshConfig) -> Result<MeshTlsConfigs, String> {
    let Some(MeshTls {
        ca_bundle,
        cert_file,
        key_file,
    }) = &mesh.tls
    else {
        return Ok(MeshTlsConfigs::default());
    };
    let certs = crate::tls::load_certs(cert_file)?;
    let key = || {
        PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{}: {e}", key_file.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in crate::tls::load_certs(ca_bundle)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", ca_bundle.display()))?;
    }
    let roots = Arc::new(roots);
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(certs.clone(), key()?)
        .map_err(|e| format!("ha.mesh.tls: {e}"))?;
    if mesh.tls_terminated_by_proxy {
        // The proxy terminates TLS; the certificate it forwards is verified
        // against the same CA.
        return Ok(MeshTlsConfigs {
            server: None,
            client: Some(Arc::new(client)),
            proxy: Some(Arc::new(ProxyClientCerts::new(mesh, roots)?)),
        });
    }
    let builder = rustls::ServerConfig::builder();
    let server = if mesh.require_mtls {
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots.clone())
            .build()
            .map_err(|e| format!("ha.mesh.tls.ca_bundle: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    }
    .with_single_cert(certs, key()?)
    .map_err(|e| format!("ha.mesh.tls: {e}"))?;
    Ok(MeshTlsConfigs {
        server: Some(Arc::new(server)),
        client: Some(Arc::new(client)),
        proxy: None,
    })
}

/// The server side of the `/mesh` WebSocket handshake: the path must be
/// `/mesh` (404) and the client must offer a mesh subprotocol (400); the
/// newest offered is chosen and answered.
// The handshake callback's error type is tungstenite's `ErrorResponse`.
#[allow(clippy::result_large_err)]
pub fn choose_codec(req: &Request, mut resp: Response) -> Result<(Response, Codec), ErrorResponse> {
    if req.uri().path() != "/mesh" {
        let mut e = ErrorResponse::new(Some("not found".into()));
        *e.status_mut() = StatusCode::NOT_FOUND;
        return Err(e);
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .collect();
    let Some(codec) = [Codec::V2, Codec::V1]
        .into_iter()
        .find(|c| offered.contains(&c.mesh_subprotocol()))
    else {
        let mut e = ErrorResponse::new(Some("no supported mesh subprotocol".into()));
        *e.status_mut() = StatusCode::BAD_REQUEST;
        return Err(e);
    };
    resp.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(codec.mesh_subprotocol()),
    );
    Ok((resp, codec))
}

/// Where a mesh dial goes.
pub struct MeshDial {
    pub request: ClientRequest,
    pub host: String,
    pub port: u16,
    /// `wss://`: TLS with the hub's client certificate.
    pub secure: bool,
}

/// The client side of the `/mesh` handshake: the request offering both mesh
/// subprotocols, and where to connect.
pub fn mesh_dial(url: &str) -> Result<MeshDial, String> {
    let mut request = url
        .into_client_request()
        .map_err(|e| format!("{url}: {e}"))?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("nowconnect.mesh.v2, nowconnect.mesh.v1"),
    );
    let uri = request.uri().clone();
    let host = uri
        .host()
        .ok_or_else(|| format!("{url}: no host"))?
        .trim_matches(|c| c == '[' || c == ']')
        .to_string();
    let secure = uri.scheme_str() == Some("wss");
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    Ok(MeshDial {
        request,
        host,
        port,
        secure,
    })
}

/// The codec the peer chose in its handshake response.
pub fn chosen_codec(
    url: &str,
    resp: &tungstenite::handshake::client::Response,
) -> Result<Codec, String> {
    resp.headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(Codec::from_mesh_subprotocol)
        .ok_or_else(|| format!("{url}: the peer chose no mesh subprotocol"))
}
