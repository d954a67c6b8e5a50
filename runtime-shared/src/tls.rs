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
