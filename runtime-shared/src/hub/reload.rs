//! Configuration reload (SIGHUP, the file watcher, `/reload`): the files a
//! reload reads, the watcher thread that hashes them, the HTTP port's TLS
//! swapped on reload, and the revocation-list watch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use nowconnect_core::hub::TunnelId;

use super::HttpRole;
use crate::config::HubConfig;
use crate::jwt::Verifier;
use crate::metrics::labels;
use crate::rt::HubRt;

use super::Shared;

impl<R: HubRt> Shared<R> {
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

    /// Every second: re-read `tunnel.revocation_file` when it changed (a
    /// broken file keeps the list in force and is logged) and close every
    /// live tunnel whose token it revokes (`refused`, `revoked`), so a
    /// revocation takes effect within a second without touching other
    /// tunnels.
    pub(super) async fn watch_revocations(self: Arc<Self>) {
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
            // The node closes each revoked tunnel (once) and the pump
            // counts and logs it.
            self.with_control(|c, now| {
                let revoked: Vec<TunnelId> = c
                    .identities
                    .iter()
                    .filter(|(_, id)| list.is_revoked(id))
                    .map(|(t, _)| *t)
                    .collect();
                for t in revoked {
                    c.identities.remove(&t);
                    c.node.tunnel_revoked(now, t);
                }
            });
        }
    }

    /// Reload when a watched file changes (checked every `every`). A failed
    /// reload is retried only after the files change again.
    pub(super) async fn watch_files(self: Arc<Self>, every: Duration) {
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
}

/// The files a reload reads: the configuration file, the JWT key files
/// (secret, public key, JWKS), the HTTP port's certificate and key and the
/// mesh TLS files.
pub(super) fn watched_files(cfg: &HubConfig) -> Vec<PathBuf> {
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
