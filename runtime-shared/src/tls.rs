//! rustls setup (ring provider) for `wss://` tunnels.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Install ring as the process-wide rustls provider. Call once at start.
pub fn install_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

/// A client config that trusts exactly the CAs in `ca_bundle`.
pub fn client_config(ca_bundle: &Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(ca_bundle)? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", ca_bundle.display()))?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The TLS server configuration of the hub's HTTP port (`http.tls`): the
/// certificate chain of `cert_file` with the key of `key_file`, rustls with
/// ring, no client certificates, ALPN `http/1.1`. An error names the
/// configuration key it is about and the reason (a key that does not match
/// the certificate is reported on `http.tls.cert_file`).
pub fn http_server_config(
    cert_file: &Path,
    key_file: &Path,
) -> Result<rustls::ServerConfig, (&'static str, String)> {
    use rustls_pki_types::PrivateKeyDer;
    let certs = load_certs(cert_file).map_err(|r| ("http.tls.cert_file", r))?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| ("http.tls.key_file", format!("{}: {e}", key_file.display())))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ("http.tls", e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            (
                "http.tls.cert_file",
                format!(
                    "{} with the key in {}: {e}",
                    cert_file.display(),
                    key_file.display()
                ),
            )
        })?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
