//! Agent tokens against the trust model: tenant, names, audience forms,
//! longest lifetime, JWKS keys by `kid`, revocation and minting. Every token
//! here is signed in the test; keys are made in the test (EC P-256, Ed25519)
//! or read from a fixed test-only RSA key (`fixtures/rsa-test-key.pem`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nowconnect_shared::config::{HubConfig, JwtConfig};
use nowconnect_shared::jwt::{
    AUTH_FAILURE_LABELS, AgentIdentity, AuthError, DEFAULT_TENANT, Revocations, Verifier, mint,
    unix_now,
};
use serde_json::{Value, json};

const SECRET: &str = "a-test-secret-of-more-than-sixteen-bytes";
const RSA_TEST_KEY: &str = include_str!("fixtures/rsa-test-key.pem");

struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn cfg(dir: &Dir) -> JwtConfig {
    JwtConfig {
        audience: "nowconnect".into(),
        issuer: None,
        hs256_secret_file: Some(dir.write("jwt.secret", SECRET)),
        public_key_file: None,
        jwks_file: None,
        algorithms: None,
        leeway_sec: 0,
        tenant_claim: "tenant".into(),
        max_ttl_sec: None,
    }
}

fn hs(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&h, claims, key).unwrap()
}

fn good(now: u64) -> Value {
    json!({"sub": "a1", "aud": "nowconnect", "iat": now, "exp": now + 600, "connectors": ["ldap"]})
}

fn label(r: Result<AgentIdentity, AuthError>) -> &'static str {
    match r {
        Ok(id) => panic!("accepted: {id:?}"),
        Err(e) => {
            assert!(
                AUTH_FAILURE_LABELS.contains(&e.label),
                "{} is not a listed label",
                e.label
            );
            e.label
        }
    }
}

/// An EC P-256 key made here: PKCS#8 DER of a random scalar.
fn p256_key() -> EncodingKey {
    let mut der = hex("3041020100301306072a8648ce3d020106082a8648ce3d030107042730250201010420");
    der.extend(rand::random::<[u8; 32]>());
    EncodingKey::from_ec_der(&der)
}

/// An Ed25519 key made here: PKCS#8 (v1) DER of a random seed.
fn ed25519_key() -> EncodingKey {
    let mut der = hex("302e020100300506032b657004220420");
    der.extend(rand::random::<[u8; 32]>());
    EncodingKey::from_ed_der(&der)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_TEST_KEY.as_bytes()).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The public JWK of `key` with `kid` (and `alg` when given).
fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str, with_alg: bool) -> Value {
    let mut j = Jwk::from_encoding_key(key, alg).unwrap();
    j.common.key_id = Some(kid.into());
    if !with_alg {
        j.common.key_algorithm = None;
    }
    serde_json::to_value(j).unwrap()
}

fn jwks_file(dir: &Dir, keys: &[Value]) -> PathBuf {
    dir.write("jwks.json", &json!({ "keys": keys }).to_string())
}

// ------------------------------------------------------------ tenant, names

#[test]
fn tenant_comes_from_the_claim_and_defaults_to_the_default_tenant() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let now = unix_now();
    let id = v.verify(&hs(&good(now))).unwrap();
    assert_eq!(id.tenant, DEFAULT_TENANT);
    assert_eq!(DEFAULT_TENANT, "default");
    assert_eq!(id.expires_at, now + 600);
    assert_eq!(id.jti, None);
    assert_eq!(id.scope, Some(vec!["ldap".to_string()]));

    let mut c = good(now);
    c["tenant"] = json!("acme.eu-1_x");
    c["jti"] = json!("tok-42");
    let id = v.verify(&hs(&c)).unwrap();
    assert_eq!(id.tenant, "acme.eu-1_x");
    assert_eq!(id.jti.as_deref(), Some("tok-42"));
}

#[test]
fn the_tenant_claim_name_is_configurable() {
    let dir = Dir::new();
    let mut c = cfg(&dir);
    c.tenant_claim = "https://example.com/org".into();
    let v = Verifier::from_config(&c).unwrap();
    let mut claims = good(unix_now());
    claims["tenant"] = json!("ignored");
    assert_eq!(v.verify(&hs(&claims)).unwrap().tenant, DEFAULT_TENANT);
    claims["https://example.com/org"] = json!("acme");
    assert_eq!(v.verify(&hs(&claims)).unwrap().tenant, "acme");
}

#[test]
fn bad_tenants_are_refused_as_malformed() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let long = "t".repeat(65);
    for bad in [
        json!(""),
        json!("acme/evil"),
        json!("a b"),
        json!("ü"),
        json!(long),
        json!(7),
        json!(null),
    ] {
        let mut c = good(unix_now());
        c["tenant"] = bad.clone();
        let e = v.verify(&hs(&c)).unwrap_err();
        assert_eq!(e.label, "malformed", "{bad}: {e}");
        assert!(e.detail.contains("tenant"), "{bad}: {e}");
    }
    let mut c = good(unix_now());
    c["tenant"] = json!("t".repeat(64));
    assert!(v.verify(&hs(&c)).is_ok(), "64 characters are allowed");
}

#[test]
fn agent_ids_and_connectors_outside_the_name_set_are_refused() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let now = unix_now();
    let long = "a".repeat(129);
    for agent in ["acme/a1", "a:1", "a 1", long.as_str()] {
        let mut c = good(now);
        c["sub"] = json!(agent);
        assert_eq!(label(v.verify(&hs(&c))), "malformed", "agent `{agent}`");
    }
    // The `agent_id` claim is checked the same way.
    let c = json!({"agent_id": "x/y", "aud": "nowconnect", "exp": now + 600});
    assert_eq!(label(v.verify(&hs(&c))), "malformed");
    for conn in ["ldap/x", "", "l dap"] {
        let mut c = good(now);
        c["connectors"] = json!(["ok", conn]);
        assert_eq!(label(v.verify(&hs(&c))), "malformed", "connector `{conn}`");
    }
    let mut c = good(now);
    c["sub"] = json!("a".repeat(128));
    c["connectors"] = json!(["c".repeat(128)]);
    assert!(v.verify(&hs(&c)).is_ok(), "128 characters are allowed");
}

// ------------------------------------------------------------ audience

#[test]
fn audience_may_be_a_string_or_an_array_containing_ours() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let mut c = good(unix_now());
    assert!(v.verify(&hs(&c)).is_ok());
    c["aud"] = json!(["other-api", "nowconnect"]);
    assert_eq!(v.verify(&hs(&c)).unwrap().agent_id, "a1");
    c["aud"] = json!(["nowconnect"]);
    assert!(v.verify(&hs(&c)).is_ok());
    c["aud"] = json!(["other-api", "another"]);
    assert_eq!(label(v.verify(&hs(&c))), "wrong_audience");
    c["aud"] = json!([]);
    assert_eq!(label(v.verify(&hs(&c))), "wrong_audience");
    c["aud"] = json!("other-api");
    assert_eq!(label(v.verify(&hs(&c))), "wrong_audience");
}

// ------------------------------------------------------------ max_ttl_sec

#[test]
fn tokens_living_longer_than_max_ttl_are_refused() {
    let dir = Dir::new();
    let mut c = cfg(&dir);
    let now = unix_now();
    let long = json!({"sub": "a1", "aud": "nowconnect", "iat": now - 10, "exp": now + 7200});
    // No limit by default.
    assert!(
        Verifier::from_config(&c)
            .unwrap()
            .verify(&hs(&long))
            .is_ok()
    );
    c.max_ttl_sec = Some(3600);
    let v = Verifier::from_config(&c).unwrap();
    let e = v.verify(&hs(&long)).unwrap_err();
    assert_eq!(e.label, "ttl_too_long", "{e}");
    // Measured from `iat`: 3000 s left of a 3610 s token is still too long.
    let old = json!({"sub": "a1", "aud": "nowconnect", "iat": now - 610, "exp": now + 3000});
    assert_eq!(label(v.verify(&hs(&old))), "ttl_too_long");
    let ok = json!({"sub": "a1", "aud": "nowconnect", "iat": now, "exp": now + 3600});
    assert!(v.verify(&hs(&ok)).is_ok());
    // Without `iat`: what is left.
    let no_iat = json!({"sub": "a1", "aud": "nowconnect", "exp": now + 7200});
    assert_eq!(label(v.verify(&hs(&no_iat))), "ttl_too_long");
    let no_iat = json!({"sub": "a1", "aud": "nowconnect", "exp": now + 1800});
    assert!(v.verify(&hs(&no_iat)).is_ok());
    // An `iat` in the future does not shorten the measure.
    let future = json!({"sub": "a1", "aud": "nowconnect", "iat": now + 5000, "exp": now + 7200});
    assert_eq!(label(v.verify(&hs(&future))), "ttl_too_long");
}

// ------------------------------------------------------------ JWKS

#[test]
fn jwks_keys_verify_es256_eddsa_and_rs256_tokens_by_kid() {
    let dir = Dir::new();
    let (ec, ed, rsa) = (p256_key(), ed25519_key(), rsa_key());
    let mut c = cfg(&dir);
    c.hs256_secret_file = None;
    c.jwks_file = Some(jwks_file(
        &dir,
        &[
            jwk(&ec, Algorithm::ES256, "ec-1", false),
            jwk(&ed, Algorithm::EdDSA, "ed-1", true),
            jwk(&rsa, Algorithm::RS256, "rsa-1", true),
        ],
    ));
    let v = Verifier::from_config(&c).unwrap();
    assert_eq!(
        v.algorithms().len(),
        3,
        "default allow-list: one per key type {:?}",
        v.algorithms()
    );
    let now = unix_now();
    for (alg, kid, key) in [
        (Algorithm::ES256, "ec-1", &ec),
        (Algorithm::EdDSA, "ed-1", &ed),
        (Algorithm::RS256, "rsa-1", &rsa),
    ] {
        let id = v.verify(&signed(alg, Some(kid), key, &good(now))).unwrap();
        assert_eq!(id.agent_id, "a1", "{alg:?}");
    }
    // Unknown kid, and no kid with only a JWKS.
    let t = signed(Algorithm::ES256, Some("ec-2"), &ec, &good(now));
    assert_eq!(label(v.verify(&t)), "unknown_key");
    let t = signed(Algorithm::ES256, None, &ec, &good(now));
    assert_eq!(label(v.verify(&t)), "unknown_key");
    // Another key under a known kid.
    let t = signed(Algorithm::ES256, Some("ec-1"), &p256_key(), &good(now));
    assert_eq!(label(v.verify(&t)), "bad_signature");
    // The key's family must fit the token's algorithm: an EC kid for an
    // EdDSA token, an HS256 token naming a public key (key confusion).
    let t = signed(Algorithm::EdDSA, Some("ec-1"), &ed, &good(now));
    assert_eq!(label(v.verify(&t)), "algorithm_not_allowed");
    let t = signed(
        Algorithm::HS256,
        Some("rsa-1"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &good(now),
    );
    assert_eq!(label(v.verify(&t)), "algorithm_not_allowed");
}

#[test]
fn the_allow_list_still_applies_to_jwks_keys() {
    let dir = Dir::new();
    let (ec, ed) = (p256_key(), ed25519_key());
    let mut c = cfg(&dir);
    c.jwks_file = Some(jwks_file(
        &dir,
        &[
            jwk(&ec, Algorithm::ES256, "ec-1", true),
            jwk(&ed, Algorithm::EdDSA, "ed-1", true),
        ],
    ));
    c.algorithms = Some(vec!["HS256".into(), "ES256".into()]);
    let v = Verifier::from_config(&c).unwrap();
    let now = unix_now();
    assert!(
        v.verify(&signed(Algorithm::ES256, Some("ec-1"), &ec, &good(now)))
            .is_ok()
    );
    let t = signed(Algorithm::EdDSA, Some("ed-1"), &ed, &good(now));
    assert_eq!(label(v.verify(&t)), "algorithm_not_allowed");
    // A token without kid goes to the static HS256 secret.
    assert!(v.verify(&hs(&good(now))).is_ok());
    // HS256 is allowed, but not with a public key's kid (key confusion).
    let t = signed(
        Algorithm::HS256,
        Some("ec-1"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &good(now),
    );
    assert_eq!(label(v.verify(&t)), "algorithm_not_allowed");
    // An algorithm that no key can verify is a configuration error.
    c.algorithms = Some(vec!["ES256".into(), "RS256".into()]);
    let e = Verifier::from_config(&c).err().unwrap();
    assert!(e.contains("RS256"), "{e}");
}

#[test]
fn without_a_jwks_a_kid_is_ignored_and_the_static_key_verifies() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let t = signed(
        Algorithm::HS256,
        Some("whatever"),
        &EncodingKey::from_secret(SECRET.as_bytes()),
        &good(unix_now()),
    );
    assert!(v.verify(&t).is_ok());
}

#[test]
fn bad_jwks_files_are_refused_with_the_key_and_reason() {
    let dir = Dir::new();
    let ec = p256_key();
    let mut c = cfg(&dir);
    let cases: Vec<(Vec<Value>, &str)> = vec![
        (
            vec![json!({"kty": "oct", "kid": "s", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"})],
            "oct",
        ),
        (
            vec![{
                let mut k = jwk(&ec, Algorithm::ES256, "x", true);
                k.as_object_mut().unwrap().remove("kid");
                k
            }],
            "kid",
        ),
        (
            vec![
                jwk(&ec, Algorithm::ES256, "x", true),
                jwk(&p256_key(), Algorithm::ES256, "x", true),
            ],
            "twice",
        ),
        (
            vec![{
                let mut k = jwk(&ec, Algorithm::ES256, "x", true);
                k["alg"] = json!("RS256");
                k
            }],
            "does not fit",
        ),
        (vec![], "no signing key"),
    ];
    for (keys, want) in cases {
        c.jwks_file = Some(jwks_file(&dir, &keys));
        let e = Verifier::from_config(&c).err().unwrap();
        assert!(
            e.contains("jwks.json") && e.contains(want),
            "want `{want}`: {e}"
        );
    }
    std::fs::write(dir.path().join("jwks.json"), "not json").unwrap();
    assert!(
        Verifier::from_config(&c)
            .err()
            .unwrap()
            .contains("not a JWK set")
    );
    // Encryption keys are skipped, not refused.
    let mut enc = jwk(&p256_key(), Algorithm::ES256, "enc", true);
    enc["use"] = json!("enc");
    c.jwks_file = Some(jwks_file(
        &dir,
        &[enc, jwk(&ec, Algorithm::ES256, "sig", true)],
    ));
    let v = Verifier::from_config(&c).unwrap();
    let t = signed(Algorithm::ES256, Some("enc"), &ec, &good(unix_now()));
    assert_eq!(label(v.verify(&t)), "unknown_key");
}

#[test]
fn a_fixed_rsa_public_jwk_parses_and_verifies() {
    // The public half of fixtures/rsa-test-key.pem as an IdP publishes it
    // (n and e only, `use: sig`, no `alg`).
    let dir = Dir::new();
    let rsa = rsa_key();
    let full = jwk(&rsa, Algorithm::RS256, "idp-2024", false);
    let public =
        json!({"kty": "RSA", "use": "sig", "kid": "idp-2024", "n": full["n"], "e": full["e"]});
    assert_eq!(public["e"], json!("AQAB"));
    let set: JwkSet = serde_json::from_value(json!({"keys": [public.clone()]})).unwrap();
    assert!(set.find("idp-2024").is_some());
    let mut c = cfg(&dir);
    c.hs256_secret_file = None;
    c.jwks_file = Some(jwks_file(&dir, &[public]));
    let v = Verifier::from_config(&c).unwrap();
    assert_eq!(v.algorithms(), vec![Algorithm::RS256]);
    let mut claims = good(unix_now());
    claims["aud"] = json!(["nowconnect", "https://idp.example/api"]);
    let id = v
        .verify(&signed(Algorithm::RS256, Some("idp-2024"), &rsa, &claims))
        .unwrap();
    assert_eq!(id.agent_id, "a1");
}

// ------------------------------------------------------------ revocation

fn identity(tenant: &str, agent: &str, jti: Option<&str>) -> AgentIdentity {
    AgentIdentity {
        agent_id: agent.into(),
        scope: None,
        tenant: tenant.into(),
        expires_at: 0,
        jti: jti.map(str::to_string),
    }
}

#[test]
fn revocation_lists_name_agents_per_tenant_and_token_ids() {
    let r = Revocations::parse(
        "revoked.txt",
        "# revoked after the incident\n\nagent:acme/a1\n  agent:a2   # default tenant\njti:tok-9\n",
    )
    .unwrap();
    assert_eq!(r.len(), 3);
    assert!(r.is_revoked(&identity("acme", "a1", None)));
    assert!(
        !r.is_revoked(&identity("default", "a1", None)),
        "another tenant's a1"
    );
    assert!(!r.is_revoked(&identity("other", "a1", None)));
    assert!(r.is_revoked(&identity(DEFAULT_TENANT, "a2", None)));
    assert!(!r.is_revoked(&identity("acme", "a2", None)));
    assert!(r.is_revoked(&identity("acme", "a3", Some("tok-9"))));
    assert!(!r.is_revoked(&identity("acme", "a3", Some("tok-10"))));
    assert!(Revocations::parse("x", "").unwrap().is_empty());
}

#[test]
fn bad_revocation_lines_name_the_file_and_line() {
    for (text, line) in [
        ("agent:a1\nbogus\n", 2),
        ("\n\nagent:acme/a/b\n", 3),
        ("agent:\n", 1),
        ("agent:acme/\n", 1),
        ("agent:/a1\n", 1),
        ("jti:\n", 1),
        ("jti:a b\n", 1),
        ("AGENT:a1\n", 1),
    ] {
        let e = Revocations::parse("/etc/nowconnect/revoked.txt", text).unwrap_err();
        assert!(
            e.starts_with(&format!("/etc/nowconnect/revoked.txt: line {line}: ")),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn a_revoked_token_is_refused_and_a_new_list_applies_at_once() {
    let dir = Dir::new();
    let list = dir.write("revoked.txt", "agent:acme/a1\n");
    let v = Verifier::from_config(&cfg(&dir))
        .unwrap()
        .with_revocations(Arc::new(Revocations::load(&list).unwrap()));
    let now = unix_now();
    let mut c = good(now);
    c["tenant"] = json!("acme");
    let e = v.verify(&hs(&c)).unwrap_err();
    assert_eq!(e.label, "revoked", "{e}");
    assert!(e.detail.contains("acme/a1"), "{e}");
    // The same agent id in the default tenant is another agent.
    assert!(v.verify(&hs(&good(now))).is_ok());
    // By jti.
    let r = Revocations::parse("inline", "jti:t-1\n").unwrap();
    v.set_revocations(Some(Arc::new(r)));
    let mut c = good(now);
    c["jti"] = json!("t-1");
    assert_eq!(label(v.verify(&hs(&c))), "revoked");
    v.set_revocations(None);
    assert!(v.verify(&hs(&c)).is_ok());
}

#[test]
fn revocation_files_reload_when_they_change() {
    let dir = Dir::new();
    let p = dir.write("revoked.txt", "agent:a1\n");
    let r = Revocations::load(&p).unwrap();
    assert_eq!(r.path(), Some(p.as_path()));
    assert!(r.reload_if_changed().unwrap().is_none(), "unchanged");
    std::fs::write(&p, "agent:a1\njti:new\n").unwrap();
    let r2 = r.reload_if_changed().unwrap().expect("changed size");
    assert!(r2.is_revoked(&identity(DEFAULT_TENANT, "x", Some("new"))));
    assert!(r2.reload_if_changed().unwrap().is_none());
    // Replaced by rename, same size: a new inode.
    let tmp = dir.write("revoked.tmp", "agent:a9\njti:new\n");
    std::fs::rename(&tmp, &p).unwrap();
    let r3 = r2.reload_if_changed().unwrap().expect("replaced file");
    assert!(r3.is_revoked(&identity(DEFAULT_TENANT, "a9", None)));
    // A broken file is an error; the caller keeps its list.
    std::fs::write(&p, "nonsense\n").unwrap();
    assert!(r3.reload_if_changed().unwrap_err().contains("line 1"));
    std::fs::remove_file(&p).unwrap();
    assert!(r3.reload_if_changed().is_err());
}

// ------------------------------------------------------------ minting

#[test]
fn minted_tokens_carry_scope_and_tenant_and_refuse_bad_input() {
    let dir = Dir::new();
    let v = Verifier::from_config(&cfg(&dir)).unwrap();
    let conns = vec!["ldap".to_string(), "ssh".to_string()];
    let ttl = Duration::from_secs(900);
    let t = mint(SECRET.as_bytes(), "agent-7", &conns, Some("acme"), ttl).unwrap();
    let id = v.verify(&t).unwrap();
    assert_eq!(
        (id.agent_id.as_str(), id.tenant.as_str()),
        ("agent-7", "acme")
    );
    assert_eq!(id.scope, Some(conns.clone()));
    assert!((895..=905).contains(&(id.expires_at - unix_now())));
    let t = mint(SECRET.as_bytes(), "agent-7", &conns, None, ttl).unwrap();
    assert_eq!(v.verify(&t).unwrap().tenant, DEFAULT_TENANT);
    let payload: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(&t)
        .unwrap()
        .claims;
    assert!(payload.get("tenant").is_none(), "{payload}");

    let e = mint(SECRET.as_bytes(), "agent-7", &[], None, ttl).unwrap_err();
    assert!(e.contains("--connectors"), "{e}");
    for (agent, conn, tenant) in [
        ("a/b", "ldap", None),
        ("a", "ld/ap", None),
        ("a", "ldap", Some("ac/me")),
        ("a", "ldap", Some("")),
    ] {
        let r = mint(SECRET.as_bytes(), agent, &[conn.to_string()], tenant, ttl);
        assert!(r.is_err(), "{agent} {conn} {tenant:?}");
    }
}

#[test]
fn the_new_refusals_are_labelled_for_metrics() {
    for l in ["unknown_key", "ttl_too_long", "revoked"] {
        assert!(AUTH_FAILURE_LABELS.contains(&l), "{l}");
    }
}

// ------------------------------------------------------------ configuration

fn hub(dir: &Dir, jwt: &str, tunnel: &str) -> Result<HubConfig, String> {
    let text = format!("http:\n  bind: 127.0.0.1:0\ntunnel:\n  jwt:\n{jwt}{tunnel}");
    HubConfig::parse(&dir.path().join("cloud.yaml"), &text).map_err(|e| e.to_string())
}

#[test]
fn hub_configuration_takes_and_checks_the_new_keys() {
    let dir = Dir::new();
    let secret = dir.write("jwt.secret", SECRET);
    let jwks = jwks_file(
        &dir,
        &[
            jwk(&p256_key(), Algorithm::ES256, "k", true),
            jwk(&ed25519_key(), Algorithm::EdDSA, "e", true),
        ],
    );
    let revoked = dir.write("revoked.txt", "agent:acme/a1\n");
    let s = format!("    hs256_secret_file: {}\n", secret.display());
    let j = format!("    jwks_file: {}\n", jwks.display());

    let c = hub(&dir, &s, "").unwrap();
    assert_eq!(c.raw.tunnel.jwt.tenant_claim, "tenant");
    assert_eq!(c.raw.tunnel.jwt.max_ttl_sec, None);
    assert_eq!(c.raw.tunnel.revocation_file, None);

    let c = hub(
        &dir,
        &format!(
            "{j}    tenant_claim: org\n    max_ttl_sec: 86400\n    algorithms: [ES256, EdDSA]\n"
        ),
        &format!("  revocation_file: {}\n", revoked.display()),
    )
    .unwrap();
    assert_eq!(c.raw.tunnel.jwt.jwks_file.as_deref(), Some(jwks.as_path()));
    assert_eq!(c.raw.tunnel.jwt.max_ttl_sec, Some(86400));
    let v = Verifier::from_tunnel_config(&c.raw.tunnel).unwrap();
    assert!(
        v.revocations()
            .unwrap()
            .is_revoked(&identity("acme", "a1", None))
    );

    let e = hub(&dir, "    audience: nowconnect\n", "").unwrap_err();
    assert!(e.contains("tunnel.jwt") && e.contains("jwks_file"), "{e}");
    let e = hub(&dir, &format!("{s}    tenant_claim: sub\n"), "").unwrap_err();
    assert!(e.contains("tunnel.jwt.tenant_claim"), "{e}");
    let e = hub(&dir, &format!("{s}    tenant_claim: ''\n"), "").unwrap_err();
    assert!(e.contains("tunnel.jwt.tenant_claim"), "{e}");
    let e = hub(&dir, &format!("{s}    max_ttl_sec: 0\n"), "").unwrap_err();
    assert!(e.contains("tunnel.jwt.max_ttl_sec"), "{e}");
    let e = hub(&dir, "    jwks_file: /nonexistent/jwks.json\n", "").unwrap_err();
    assert!(e.contains("tunnel.jwt.jwks_file"), "{e}");
    std::fs::write(&revoked, "agent:ok\nagent:a/b/c\n").unwrap();
    let e = hub(
        &dir,
        &s,
        &format!("  revocation_file: {}\n", revoked.display()),
    )
    .unwrap_err();
    assert!(
        e.contains("tunnel.revocation_file") && e.contains("revoked.txt: line 2"),
        "{e}"
    );
}

/// Names in the configuration that a token must match (a listener's
/// connector, tenant and pinned agents; an agent's id and connector names)
/// follow the token's rules, so a name no token could carry is refused at
/// start with the key, instead of a listener that can never be served.
#[test]
fn configured_names_follow_the_token_rules() {
    let dir = Dir::new();
    let secret = dir.write("jwt.secret", SECRET);
    let s = format!("    hs256_secret_file: {}\n", secret.display());
    let with = |listener: &str| {
        let text = format!(
            "http:\n  bind: 127.0.0.1:0\ntunnel:\n  jwt:\n{s}listeners:\n  - {{ name: l, bind: '127.0.0.1:0', {listener} }}\n"
        );
        HubConfig::parse(&dir.path().join("cloud.yaml"), &text).map_err(|e| e.to_string())
    };
    with("connector: ldap, tenant: acme, agents: [a-1]").unwrap();
    let long_tenant = "t".repeat(65);
    for (listener, key) in [
        ("connector: 'ld:ap'", "listeners[0].connector"),
        ("connector: ldap, tenant: 'ac:me'", "listeners[0].tenant"),
        (
            &*format!("connector: ldap, tenant: {long_tenant}"),
            "listeners[0].tenant",
        ),
        ("connector: ldap, agents: ['a:1']", "listeners[0].agents[0]"),
    ] {
        let e = with(listener).unwrap_err();
        assert!(e.contains(key), "{listener}: {e}");
        assert!(e.contains("letters, digits"), "{listener}: {e}");
    }
    let agent = |id: &str, conn: &str| {
        let text = format!(
            "agent_id: '{id}'\nhubs: ['ws://127.0.0.1:1/tunnel']\nconnectors:\n  - {{ name: '{conn}', target: '127.0.0.1:389' }}\n"
        );
        nowconnect_shared::config::AgentConfig::parse(
            &dir.path().join("premise.yaml"),
            &text,
            Some("token".into()),
        )
        .map_err(|e| e.to_string())
    };
    agent("a-1", "ldap").unwrap();
    assert!(agent("a:1", "ldap").unwrap_err().contains("agent_id"));
    assert!(
        agent("a-1", "ld:ap")
            .unwrap_err()
            .contains("connectors[0].name")
    );
}

/// An agent sends its token on the upgrade: a `ws://` hub URL to another
/// host would put it on the network in clear text, so it is refused unless
/// the operator says a sidecar encrypts the path; loopback stays allowed.
#[test]
fn plaintext_hub_urls_to_other_hosts_are_refused() {
    let dir = Dir::new();
    let agent = |hub: &str, extra: &str| {
        let text = format!(
            "agent_id: a-1\nhubs: ['{hub}']\nconnectors:\n  - {{ name: ldap, target: '127.0.0.1:389' }}\n{extra}"
        );
        nowconnect_shared::config::AgentConfig::parse(
            &dir.path().join("premise.yaml"),
            &text,
            Some("token".into()),
        )
        .map_err(|e| e.to_string())
    };
    for ok in [
        "ws://127.0.0.1:8080/tunnel",
        "ws://localhost:8080/tunnel",
        "ws://[::1]:8080/tunnel",
        "wss://hub.example.com/tunnel",
    ] {
        agent(ok, "").unwrap();
    }
    for bad in [
        "ws://hub.example.com/tunnel",
        "ws://10.0.0.5:8080/tunnel",
        "ws://127.0.0.1.evil.example/tunnel",
        "ws://[2001:db8::1]:8080/tunnel",
    ] {
        let e = agent(bad, "").unwrap_err();
        assert!(
            e.contains("hubs[0]") && e.contains("clear text"),
            "{bad}: {e}"
        );
        agent(bad, "allow_plaintext_hubs: true\n").unwrap();
    }
}
