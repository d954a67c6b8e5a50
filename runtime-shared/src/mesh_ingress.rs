//! Mesh mTLS terminated by a proxy (`ha.mesh.tls_terminated_by_proxy`): an
//! ingress in front of the mesh port verifies the peer's client certificate
//! and forwards it in a request header. The hub serves such connections only
//! from `ha.mesh.trusted_proxies`, reads the certificate from the header and
//! verifies it again against `ha.mesh.tls.ca_bundle` (chain, validity,
//! clientAuth usage, by rustls' webpki verifier) before the WebSocket
//! upgrade; from then on it is the peer's certificate, exactly as one shown
//! in a TLS handshake (the same replica identity check).

use std::sync::Arc;

use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};
use tungstenite::handshake::server::Request;

use crate::config::{ClientCertFormat, MeshConfig};

/// The longest certificate header taken (an RSA-4096 certificate, URL
/// encoded, is about 3 KiB).
pub const MAX_CERT_HEADER_BYTES: usize = 16 * 1024;

/// The certificate a proxy forwarded in the header `name` (every value of
/// it the request carries, in order), in `format`. Exactly one value with
/// exactly one certificate is taken: anything else is refused with the
/// reason.
pub fn certificate_from_header(
    format: ClientCertFormat,
    name: &str,
    values: &[&[u8]],
) -> Result<CertificateDer<'static>, String> {
    let value = match values {
        [] => return Err(format!("no client certificate header `{name}`")),
        [v] => *v,
        more => {
            return Err(format!(
                "the client certificate header `{name}` appears {} times; the proxy must set it once",
                more.len()
            ));
        }
    };
    if value.len() > MAX_CERT_HEADER_BYTES {
        return Err(format!(
            "the client certificate header `{name}` is {} bytes, more than {MAX_CERT_HEADER_BYTES}",
            value.len()
        ));
    }
    let text = std::str::from_utf8(value)
        .ok()
        .filter(|t| t.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        .ok_or_else(|| format!("the client certificate header `{name}` is not printable ASCII"))?
        .trim();
    if text.is_empty() {
        return Err(format!("the client certificate header `{name}` is empty"));
    }
    let encoded = match format {
        ClientCertFormat::Nginx => text.to_string(),
        ClientCertFormat::Envoy => envoy_cert_element(text)
            .map_err(|r| format!("the client certificate header `{name}` (envoy): {r}"))?,
    };
    let pem: Vec<u8> = percent_encoding::percent_decode(encoded.as_bytes()).collect();
    let mut certs = Vec::new();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| {
            format!("the client certificate header `{name}` holds no readable PEM certificate: {e}")
        })?;
        certs.push(c);
    }
    match certs.len() {
        1 => Ok(certs.remove(0)),
        0 => Err(format!(
            "the client certificate header `{name}` holds no PEM certificate"
        )),
        n => Err(format!(
            "the client certificate header `{name}` holds {n} certificates; only the peer's own is taken"
        )),
    }
}

/// The (still URL-encoded) value of the `Cert` key of an Envoy
/// `x-forwarded-client-cert` header. Envoy writes one element per proxy,
/// separated by `,`; a mesh connection passes one proxy, configured to
/// replace the header (`forward_client_cert_details: SANITIZE_SET`), so a
/// header with more elements (one a client could have sent) is refused.
fn envoy_cert_element(header: &str) -> Result<String, String> {
    let elements = split_unquoted(header, ',')?;
    let [element] = elements.as_slice() else {
        return Err(format!(
            "{} elements; the proxy must replace the header (envoy: forward_client_cert_details: SANITIZE_SET), not append to it",
            elements.len()
        ));
    };
    let mut cert = None;
    for pair in split_unquoted(element, ';')? {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("`{}` is not key=value", shorten(pair)))?;
        if key.trim().eq_ignore_ascii_case("cert") {
            if cert.is_some() {
                return Err("more than one Cert key".into());
            }
            cert = Some(unquote(value.trim())?);
        }
    }
    cert.ok_or_else(|| {
        "no Cert key (envoy: set_current_client_cert_details: { cert: true })".into()
    })
}

/// `s` split at `sep` outside double quotes (a backslash escapes the next
/// character inside quotes).
fn split_unquoted(s: &str, sep: char) -> Result<Vec<&str>, String> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    if quoted {
        return Err("a quoted value is not closed".into());
    }
    parts.push(&s[start..]);
    Ok(parts)
}

/// A value as written: bare, or in double quotes with `\` escapes.
fn unquote(v: &str) -> Result<String, String> {
    let Some(inner) = v.strip_prefix('"') else {
        return Ok(v.to_string());
    };
    let inner = inner
        .strip_suffix('"')
        .ok_or_else(|| "a quoted value is not closed".to_string())?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            out.push(chars.next().ok_or("a quoted value ends in `\\`")?);
        } else {
            out.push(c);
        }
    }
    Ok(out)
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

/// How a hub behind a TLS-terminating proxy takes the peer's certificate
/// from the upgrade request: which header, which format, and the verifier
/// of `ha.mesh.tls.ca_bundle` (the one the hub's own TLS listener would use).
pub struct ProxyClientCerts {
    header: String,
    format: ClientCertFormat,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl ProxyClientCerts {
    pub fn new(mesh: &MeshConfig, roots: Arc<rustls::RootCertStore>) -> Result<Self, String> {
        let h = mesh.client_cert_header();
        let verifier = rustls::server::WebPkiClientVerifier::builder(roots)
            .build()
            .map_err(|e| format!("ha.mesh.tls.ca_bundle: {e}"))?;
        Ok(ProxyClientCerts {
            header: h.header_name(),
            format: h.format,
            verifier,
        })
    }

    /// The header's name (lower case).
    pub fn header(&self) -> &str {
        &self.header
    }

    /// The peer's certificate from the upgrade request `req`, verified
    /// against the mesh CA as a TLS client certificate (chain, validity
    /// period, clientAuth extended key usage) at `now`.
    pub fn verify(&self, req: &Request, now: UnixTime) -> Result<CertificateDer<'static>, String> {
        let values: Vec<&[u8]> = req
            .headers()
            .get_all(self.header.as_str())
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        let cert = certificate_from_header(self.format, &self.header, &values)?;
        self.verifier
            .verify_client_cert(&cert, &[], now)
            .map_err(|e| {
                format!(
                    "the certificate in header `{}` is not a valid client certificate of ha.mesh.tls.ca_bundle: {e}",
                    self.header
                )
            })?;
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "ssl-client-cert";

    /// A certificate for `hub-b` from a fresh CA, with `eku` (and expired
    /// in 2020 when `expired`), as PEM; and that CA as roots.
    fn issue(
        eku: Vec<rcgen::ExtendedKeyUsagePurpose>,
        expired: bool,
    ) -> (String, Arc<rustls::RootCertStore>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["hub-b".to_string()]).unwrap();
        p.extended_key_usages = eku;
        if expired {
            p.not_before = rcgen::date_time_ymd(2019, 1, 1);
            p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = p.signed_by(&key, &issuer).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        (cert.pem(), Arc::new(roots))
    }

    fn client_cert() -> String {
        issue(vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth], false).0
    }

    /// URL-encoded as nginx' `$ssl_client_escaped_cert` writes it.
    fn escaped(pem: &str) -> String {
        percent_encoding::utf8_percent_encode(pem, percent_encoding::NON_ALPHANUMERIC).to_string()
    }

    fn der_of(pem: &str) -> Vec<u8> {
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn nginx(values: &[&str]) -> Result<CertificateDer<'static>, String> {
        let v: Vec<&[u8]> = values.iter().map(|s| s.as_bytes()).collect();
        certificate_from_header(ClientCertFormat::Nginx, HEADER, &v)
    }

    fn envoy(value: &str) -> Result<CertificateDer<'static>, String> {
        certificate_from_header(
            ClientCertFormat::Envoy,
            "x-forwarded-client-cert",
            &[value.as_bytes()],
        )
    }

    #[test]
    fn nginx_escaped_pem_gives_the_certificate() {
        let pem = client_cert();
        let c = nginx(&[&escaped(&pem)]).unwrap();
        assert_eq!(c.as_ref(), der_of(&pem));
    }

    #[test]
    fn envoy_cert_element_gives_the_certificate_quoted_or_bare_among_other_keys() {
        let pem = client_cert();
        let e = escaped(&pem);
        for header in [
            format!("Hash=abc;Cert=\"{e}\";Subject=\"CN=x,O=y;z\";URI=spiffe://a/b"),
            format!("By=spiffe://hub;Cert={e}"),
            format!("cert=\"{e}\""),
        ] {
            let c = envoy(&header).unwrap_or_else(|r| panic!("{header}: {r}"));
            assert_eq!(c.as_ref(), der_of(&pem));
        }
    }

    #[test]
    fn missing_repeated_empty_and_oversized_headers_are_refused() {
        let e = escaped(&client_cert());
        let r = nginx(&[]).unwrap_err();
        assert!(
            r.contains("no client certificate header `ssl-client-cert`"),
            "{r}"
        );
        let r = nginx(&[&e, &e]).unwrap_err();
        assert!(r.contains("appears 2 times"), "{r}");
        let r = nginx(&["  "]).unwrap_err();
        assert!(r.contains("is empty"), "{r}");
        let big = "A".repeat(MAX_CERT_HEADER_BYTES + 1);
        let r = nginx(&[&big]).unwrap_err();
        assert!(r.contains("more than 16384"), "{r}");
        let r = certificate_from_header(ClientCertFormat::Nginx, HEADER, &[b"caf\xc3\xa9"])
            .unwrap_err();
        assert!(r.contains("not printable ASCII"), "{r}");
    }

    #[test]
    fn malformed_nginx_values_are_refused_with_the_reason() {
        // Not PEM at all.
        let r = nginx(&["hello"]).unwrap_err();
        assert!(r.contains("holds no PEM certificate"), "{r}");
        // A PEM block that is not a certificate.
        let key = escaped("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n");
        let r = nginx(&[&key]).unwrap_err();
        assert!(r.contains("holds no PEM certificate"), "{r}");
        // Broken base64 inside the armour.
        let broken = escaped("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n");
        let r = nginx(&[&broken]).unwrap_err();
        assert!(r.contains("no readable PEM certificate"), "{r}");
        // A chain: only the peer's own certificate is taken.
        let pem = client_cert();
        let two = escaped(&format!("{pem}{pem}"));
        let r = nginx(&[&two]).unwrap_err();
        assert!(r.contains("holds 2 certificates"), "{r}");
        // nginx' deprecated `$ssl_client_cert` (raw PEM, tab-indented lines)
        // is not the escaped format.
        let raw = pem.trim_end().replace('\n', "\n\t");
        assert!(nginx(&[&raw]).is_err());
    }

    #[test]
    fn malformed_envoy_values_are_refused_with_the_reason() {
        let e = escaped(&client_cert());
        let r = envoy("Hash=abc;Subject=\"CN=x\"").unwrap_err();
        assert!(r.contains("no Cert key"), "{r}");
        let r = envoy(&format!("Cert=\"{e}\",Cert=\"{e}\"")).unwrap_err();
        assert!(r.contains("2 elements"), "{r}");
        let r = envoy(&format!("Cert=\"{e}\";Cert=\"{e}\"")).unwrap_err();
        assert!(r.contains("more than one Cert key"), "{r}");
        let r = envoy(&format!("Cert=\"{e}")).unwrap_err();
        assert!(r.contains("not closed"), "{r}");
        let r = envoy("Cert").unwrap_err();
        assert!(r.contains("is not key=value"), "{r}");
        let r = envoy("Cert=\"garbage\"").unwrap_err();
        assert!(r.contains("holds no PEM certificate"), "{r}");
        assert!(
            r.contains("(envoy)") || r.contains("x-forwarded-client-cert"),
            "{r}"
        );
    }

    #[test]
    fn trusted_sources_are_those_inside_the_networks() {
        use crate::proxy_protocol::TrustedProxies;
        let t = TrustedProxies::parse(&["127.0.0.1/32".into(), "fd00::/64".into()]).unwrap();
        assert!(t.trusts("127.0.0.1".parse().unwrap()));
        assert!(!t.trusts("127.0.0.2".parse().unwrap()));
        assert!(t.trusts("::ffff:127.0.0.1".parse().unwrap()));
        assert!(t.trusts("fd00::7".parse().unwrap()));
        assert!(!t.trusts("fd00:0:0:1::7".parse().unwrap()));
        assert!(!TrustedProxies::default().trusts("10.0.0.1".parse().unwrap()));
    }

    fn request_with(value: &str) -> Request {
        Request::builder()
            .uri("/mesh")
            .header(HEADER, value)
            .body(())
            .unwrap()
    }

    #[test]
    fn verify_takes_only_valid_client_certificates_of_the_mesh_ca() {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mesh = MeshConfig::default();
        let now = UnixTime::now();
        let (good, roots) = issue(vec![ServerAuth, ClientAuth], false);
        let check = ProxyClientCerts::new(&mesh, roots.clone()).unwrap();
        assert_eq!(check.header(), "ssl-client-cert");
        let c = check.verify(&request_with(&escaped(&good)), now).unwrap();
        assert_eq!(c.as_ref(), der_of(&good));
        // Another CA's certificate.
        let (other, _) = issue(vec![ClientAuth], false);
        let r = check
            .verify(&request_with(&escaped(&other)), now)
            .unwrap_err();
        assert!(
            r.contains("not a valid client certificate of ha.mesh.tls.ca_bundle"),
            "{r}"
        );
        // Expired, and one for servers only, each from the mesh CA: a CA
        // per certificate, so a checker over that CA's roots.
        for (eku, expired, why) in [
            (vec![ClientAuth], true, "expired"),
            (vec![ServerAuth], false, "usage"),
        ] {
            let (pem, roots) = issue(eku, expired);
            let check = ProxyClientCerts::new(&mesh, roots).unwrap();
            let r = check
                .verify(&request_with(&escaped(&pem)), now)
                .unwrap_err();
            assert!(r.contains("not a valid client certificate"), "{why}: {r}");
        }
        // No header: refused before any verification.
        let bare = Request::builder().uri("/mesh").body(()).unwrap();
        let r = check.verify(&bare, now).unwrap_err();
        assert!(r.contains("no client certificate header"), "{r}");
    }
}
