//! Agent tokens: minting (`nowconnect token`, HS256) and verification on
//! `/tunnel` before the WebSocket upgrade.
//!
//! Verification: an HS256 secret, an RS*/ES* public key and/or a JWKS file
//! (RSA, EC and Ed25519 keys chosen by `kid`); an algorithm allow-list;
//! audience (a string or an array); optional issuer; expiry and not-before
//! with leeway; an optional longest lifetime; the agent id from `sub` or
//! `agent_id`; the connector scope; the tenant from a configurable claim;
//! and an optional revocation list. Every name a token carries (agent id,
//! connectors, tenant) is limited to `[A-Za-z0-9._-]`, so `/` (the separator
//! of tenant-qualified names) can never come from a token.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::{JwtConfig, TunnelSection};

/// The tenant of a token without a tenant claim.
pub const DEFAULT_TENANT: &str = nowconnect_core::tenant::DEFAULT_TENANT;

/// Longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;
/// Longest agent id or connector name in a token.
pub const MAX_NAME_LEN: usize = 128;

/// `aud`: one audience or several (most identity providers issue an array).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, audience: &str) -> bool {
        match self {
            Audience::One(a) => a == audience,
            Audience::Many(v) => v.iter().any(|a| a == audience),
        }
    }
}

impl From<&str> for Audience {
    fn from(a: &str) -> Self {
        Audience::One(a.to_string())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub aud: Audience,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The connectors this agent may announce; absent means any (tokens
    /// minted by `nowconnect token` always name them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectors: Option<Vec<String>>,
    /// Every other claim, among them the tenant claim
    /// (`tunnel.jwt.tenant_claim`, `tenant` by default).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Claims {
    /// `sub = agent_id`, `aud = nowconnect`, `iat = now`, `exp = now + ttl`;
    /// nothing else.
    pub fn for_agent(agent_id: &str, ttl: Duration) -> Claims {
        let now = unix_now();
        Claims {
            sub: Some(agent_id.to_string()),
            agent_id: None,
            aud: "nowconnect".into(),
            exp: now + ttl.as_secs(),
            iat: Some(now),
            nbf: None,
            iss: None,
            jti: None,
            connectors: None,
            extra: serde_json::Map::new(),
        }
    }
}

/// Who a valid token says the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub scope: Option<Vec<String>>,
    /// The tenant claim, or [`DEFAULT_TENANT`] when the token has none.
    pub tenant: String,
    /// `exp`, unix seconds: the tunnel must not outlive it.
    pub expires_at: u64,
    /// `jti`, when the token has one (what a revocation list may name).
    pub jti: Option<String>,
}

impl AgentIdentity {
    /// What the core checks a HELLO against.
    pub fn credential(&self) -> nowconnect_core::tenant::AgentCredential {
        nowconnect_core::tenant::AgentCredential {
            tenant: self.tenant.clone(),
            agent_id: self.agent_id.clone(),
            scope: self.scope.clone(),
        }
    }
}

/// Every label an [`AuthError`] (or the hub's checks around it) can carry,
/// so the metric series exist from the start.
pub const AUTH_FAILURE_LABELS: &[&str] = &[
    "missing_token",
    "malformed",
    "algorithm_not_allowed",
    "bad_signature",
    "expired",
    "not_yet_valid",
    "wrong_audience",
    "wrong_issuer",
    "missing_claim",
    "agent_mismatch",
    "unknown_key",
    "ttl_too_long",
    "unscoped_token",
    "connector_outside_scope",
    "revoked",
];

/// A refused token: a stable label for metrics and a detail for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{label}: {detail}")]
pub struct AuthError {
    pub label: &'static str,
    pub detail: String,
}

impl AuthError {
    fn new(label: &'static str, detail: impl Into<String>) -> Self {
        AuthError {
            label,
            detail: detail.into(),
        }
    }
}

/// `s` is 1..=`max` characters of `[A-Za-z0-9._-]`.
fn is_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

fn check_name(what: &str, s: &str, max: usize) -> Result<(), String> {
    if is_name(s, max) {
        Ok(())
    } else {
        Err(format!(
            "{what} `{}` must be 1 to {max} characters of letters, digits, `.`, `_` and `-`",
            s.escape_debug()
        ))
    }
}

/// A tenant name: `[A-Za-z0-9._-]{1,64}`.
pub fn check_tenant(s: &str) -> Result<(), String> {
    check_name("tenant", s, MAX_TENANT_LEN)
}

/// An agent id in a token: `[A-Za-z0-9._-]{1,128}`.
pub fn check_agent_id(s: &str) -> Result<(), String> {
    check_name("agent id", s, MAX_NAME_LEN)
}

/// A connector name in a token: `[A-Za-z0-9._-]{1,128}`.
pub fn check_connector(s: &str) -> Result<(), String> {
    check_name("connector", s, MAX_NAME_LEN)
}

/// One verification key and the algorithms a token may use with it.
struct Key {
    key: DecodingKey,
    algs: Vec<Algorithm>,
}

pub struct Verifier {
    /// `hs256_secret_file` or `public_key_file`: for tokens without `kid`
    /// (and every token when no JWKS is configured).
    static_key: Option<Key>,
    /// `jwks_file`, by `kid`.
    jwks: Option<HashMap<String, Key>>,
    /// The allow-list, each with its validation (the library wants every
    /// algorithm of a validation to fit the key, so one per algorithm).
    validations: Vec<(Algorithm, Validation)>,
    tenant_claim: String,
    max_ttl: Option<u64>,
    leeway: u64,
    revocations: RwLock<Option<Arc<Revocations>>>,
}

impl Verifier {
    pub fn from_config(cfg: &JwtConfig) -> Result<Self, String> {
        let static_key = match (&cfg.hs256_secret_file, &cfg.public_key_file) {
            (Some(_), Some(_)) => {
                return Err("set only one of `hs256_secret_file` and `public_key_file`".into());
            }
            (Some(p), None) => Some(Key {
                key: DecodingKey::from_secret(&read_secret(p)?),
                algs: vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            }),
            (None, Some(p)) => {
                let pem =
                    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    Some(Key {
                        key: k,
                        algs: vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
                    })
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    Some(Key {
                        key: k,
                        algs: vec![Algorithm::ES256, Algorithm::ES384],
                    })
                } else {
                    return Err(format!(
                        "{}: not an RSA or EC public key in PEM form",
                        p.display()
                    ));
                }
            }
            (None, None) => None,
        };
        let jwks = cfg.jwks_file.as_deref().map(load_jwks).transpose()?;
        if static_key.is_none() && jwks.is_none() {
            return Err("no verification key configured".into());
        }
        let algs: Vec<Algorithm> = match &cfg.algorithms {
            Some(names) => names
                .iter()
                .map(|n| parse_alg(n))
                .collect::<Result<_, _>>()?,
            None => {
                // The first algorithm of each key: HS256, RS256, ES256, or
                // what the JWK names.
                let mut v = Vec::new();
                let keys = static_key
                    .iter()
                    .chain(jwks.iter().flat_map(|m| m.values()));
                for k in keys {
                    if !v.contains(&k.algs[0]) {
                        v.push(k.algs[0]);
                    }
                }
                v
            }
        };
        if algs.is_empty() {
            return Err("the algorithm allow-list is empty".into());
        }
        for a in &algs {
            let fits = static_key.iter().any(|k| k.algs.contains(a))
                || jwks
                    .iter()
                    .flat_map(|m| m.values())
                    .any(|k| k.algs.contains(a));
            if !fits {
                return Err(format!("algorithm {a:?} does not fit any configured key"));
            }
        }
        let validations = algs
            .iter()
            .map(|&a| {
                let mut v = Validation::new(a);
                v.set_audience(&[cfg.audience.as_str()]);
                // A configured issuer must be present, not only match when present.
                if let Some(iss) = &cfg.issuer {
                    v.set_issuer(&[iss.as_str()]);
                    v.set_required_spec_claims(&["exp", "aud", "iss"]);
                } else {
                    v.set_required_spec_claims(&["exp", "aud"]);
                }
                v.validate_nbf = true;
                v.leeway = cfg.leeway_sec;
                (a, v)
            })
            .collect();
        Ok(Verifier {
            static_key,
            jwks,
            validations,
            tenant_claim: cfg.tenant_claim.clone(),
            max_ttl: cfg.max_ttl_sec,
            leeway: cfg.leeway_sec,
            revocations: RwLock::new(None),
        })
    }

    /// [`Verifier::from_config`] of `tunnel.jwt`, with the revocation list
    /// of `tunnel.revocation_file` attached when one is set.
    pub fn from_tunnel_config(t: &TunnelSection) -> Result<Self, String> {
        let v = Self::from_config(&t.jwt)?;
        match &t.revocation_file {
            Some(p) => Ok(v.with_revocations(Arc::new(Revocations::load(p)?))),
            None => Ok(v),
        }
    }

    /// Refuse tokens `list` revokes (label `revoked`).
    pub fn with_revocations(self, list: Arc<Revocations>) -> Self {
        self.set_revocations(Some(list));
        self
    }

    /// Replace (or, with `None`, drop) the revocation list in place: a
    /// reloaded list applies to the next `verify` without rebuilding keys.
    pub fn set_revocations(&self, list: Option<Arc<Revocations>>) {
        *self.revocations.write().expect("revocations lock") = list;
    }

    /// The revocation list in use, if any.
    pub fn revocations(&self) -> Option<Arc<Revocations>> {
        self.revocations.read().expect("revocations lock").clone()
    }

    /// The allow-list, in configuration order.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.validations.iter().map(|(a, _)| *a).collect()
    }

    pub fn verify(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            AuthError::new("malformed", format!("cannot read the token header: {e}"))
        })?;
        let Some((_, validation)) = self.validations.iter().find(|(a, _)| *a == header.alg) else {
            return Err(AuthError::new(
                "algorithm_not_allowed",
                format!(
                    "algorithm {:?} is not in the allow-list {:?}",
                    header.alg,
                    self.algorithms()
                ),
            ));
        };
        // With a JWKS, a `kid` names the key; without one (or without a
        // JWKS) the static key verifies.
        let (key, key_name) = match (&self.jwks, &header.kid) {
            (Some(jwks), Some(kid)) => match jwks.get(kid) {
                Some(k) => (k, format!("JWKS key `{}`", kid.escape_debug())),
                None => {
                    return Err(AuthError::new(
                        "unknown_key",
                        format!("no key with kid `{}` in the JWKS", kid.escape_debug()),
                    ));
                }
            },
            _ => match &self.static_key {
                Some(k) => (k, "the static key".to_string()),
                None => {
                    return Err(AuthError::new(
                        "unknown_key",
                        "the token names no `kid` and only a JWKS is configured",
                    ));
                }
            },
        };
        if !key.algs.contains(&header.alg) {
            return Err(AuthError::new(
                "algorithm_not_allowed",
                format!(
                    "algorithm {:?} does not fit {key_name} ({:?})",
                    header.alg, key.algs
                ),
            ));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, validation).map_err(|e| {
            let label = match e.kind() {
                ErrorKind::InvalidSignature => "bad_signature",
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidAudience => "wrong_audience",
                ErrorKind::InvalidIssuer => "wrong_issuer",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    "algorithm_not_allowed"
                }
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                _ => "malformed",
            };
            AuthError::new(label, e.to_string())
        })?;
        let c = data.claims;
        let agent_id = c
            .sub
            .or(c.agent_id)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                AuthError::new(
                    "missing_claim",
                    "token names no agent (`sub` or `agent_id`)",
                )
            })?;
        check_agent_id(&agent_id).map_err(|d| AuthError::new("malformed", d))?;
        if let Some(cs) = &c.connectors {
            for name in cs {
                check_connector(name).map_err(|d| AuthError::new("malformed", d))?;
            }
        }
        let tenant = match c.extra.get(&self.tenant_claim) {
            None => DEFAULT_TENANT.to_string(),
            Some(serde_json::Value::String(t)) => {
                check_tenant(t).map_err(|d| {
                    AuthError::new("malformed", format!("claim `{}`: {d}", self.tenant_claim))
                })?;
                t.clone()
            }
            Some(other) => {
                return Err(AuthError::new(
                    "malformed",
                    format!(
                        "claim `{}` must be a string, not {other}",
                        self.tenant_claim
                    ),
                ));
            }
        };
        if let Some(max) = self.max_ttl {
            let now = unix_now();
            // Lifetime from issue; without `iat` (or with one in the future)
            // what is left of it, with the clock-skew leeway.
            let (lifetime, allowed) = match c.iat {
                Some(iat) if iat <= now => (c.exp.saturating_sub(iat), max),
                _ => (c.exp.saturating_sub(now), max.saturating_add(self.leeway)),
            };
            if lifetime > allowed {
                return Err(AuthError::new(
                    "ttl_too_long",
                    format!("the token lives {lifetime} s, more than max_ttl_sec ({max} s)"),
                ));
            }
        }
        let identity = AgentIdentity {
            agent_id,
            scope: c.connectors,
            tenant,
            expires_at: c.exp,
            jti: c.jti,
        };
        if let Some(list) = self.revocations()
            && list.is_revoked(&identity)
        {
            return Err(AuthError::new(
                "revoked",
                format!(
                    "agent `{}/{}`{} is on the revocation list",
                    identity.tenant,
                    identity.agent_id,
                    identity
                        .jti
                        .as_deref()
                        .map(|j| format!(" (jti `{}`)", j.escape_debug()))
                        .unwrap_or_default()
                ),
            ));
        }
        Ok(identity)
    }
}

/// The algorithms a JWK is for: its `alg` if it names one, else by key type
/// (the first one is the default allow-list entry).
fn jwk_algorithms(jwk: &jsonwebtoken::jwk::Jwk) -> Result<Vec<Algorithm>, String> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![Algorithm::RS256, Algorithm::RS384, Algorithm::RS512],
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            ref c => return Err(format!("EC curve {c:?} is not supported (P-256, P-384)")),
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            ref c => return Err(format!("OKP curve {c:?} is not supported (Ed25519)")),
        },
        AlgorithmParameters::OctetKey(_) => {
            return Err(
                "a symmetric (`oct`) key does not belong in a JWKS file; use hs256_secret_file"
                    .into(),
            );
        }
        _ => return Err("unsupported key type (RSA, EC or OKP)".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(by_type),
        Some(ka) => {
            let a = match ka {
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::RS384 => Algorithm::RS384,
                KeyAlgorithm::RS512 => Algorithm::RS512,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::ES384 => Algorithm::ES384,
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                other => return Err(format!("`alg` {other:?} is not supported")),
            };
            if by_type.contains(&a) {
                Ok(vec![a])
            } else {
                Err(format!("`alg` {a:?} does not fit the key type"))
            }
        }
    }
}

/// Read a JWKS file: every signing key needs a unique `kid`; keys marked
/// `"use": "enc"` are skipped.
fn load_jwks(path: &Path) -> Result<HashMap<String, Key>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet = serde_json::from_str(&text)
        .map_err(|e| format!("{}: not a JWK set: {e}", path.display()))?;
    let mut keys = HashMap::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            continue;
        }
        let at = |r: String| format!("{}: keys[{i}]: {r}", path.display());
        let kid = jwk
            .common
            .key_id
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or_else(|| at("no `kid`".into()))?;
        let algs = jwk_algorithms(jwk).map_err(at)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| at(format!("unusable key: {e}")))?;
        if keys.insert(kid.clone(), Key { key, algs }).is_some() {
            return Err(at(format!("kid `{kid}` appears twice")));
        }
    }
    if keys.is_empty() {
        return Err(format!("{}: no signing key in the set", path.display()));
    }
    Ok(keys)
}

/// When a file was last changed, as far as a cheap `stat` tells.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> Result<FileStamp, String> {
        let m =
            std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&m);
        #[cfg(not(unix))]
        let inode = 0;
        Ok(FileStamp {
            modified: m.modified().ok(),
            len: m.len(),
            inode,
        })
    }
}

/// A revocation list (`tunnel.revocation_file`): one entry a line,
/// `agent:<tenant>/<agent_id>`, `agent:<agent_id>` (the default tenant) or
/// `jti:<jti>`; `#` starts a comment, blank lines are ignored.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    /// Revoked agent ids by tenant.
    agents: HashMap<String, HashSet<String>>,
    jtis: HashSet<String>,
    path: Option<PathBuf>,
    stamp: Option<FileStamp>,
}

impl PartialEq for Revocations {
    /// Same entries (where they were read from does not count).
    fn eq(&self, other: &Self) -> bool {
        self.agents == other.agents && self.jtis == other.jtis
    }
}

impl Revocations {
    /// Read and parse `path`; an error names the file and the line.
    pub fn load(path: &Path) -> Result<Self, String> {
        // Stamp first: a change while reading shows as a change next time.
        let stamp = FileStamp::of(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut r = Self::parse(&path.display().to_string(), &text)?;
        r.path = Some(path.to_path_buf());
        r.stamp = Some(stamp);
        Ok(r)
    }

    /// Parse the text of a list; `origin` names it in errors.
    pub fn parse(origin: &str, text: &str) -> Result<Self, String> {
        let mut r = Revocations::default();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let at = |reason: String| format!("{origin}: line {}: {reason}", n + 1);
            if let Some(rest) = line.strip_prefix("agent:") {
                let (tenant, agent) = match rest.split_once('/') {
                    Some((t, a)) => (t, a),
                    None => (DEFAULT_TENANT, rest),
                };
                check_tenant(tenant).map_err(at)?;
                check_agent_id(agent).map_err(at)?;
                r.agents
                    .entry(tenant.to_string())
                    .or_default()
                    .insert(agent.to_string());
            } else if let Some(jti) = line.strip_prefix("jti:") {
                if jti.is_empty() || jti.contains(char::is_whitespace) {
                    return Err(at(format!(
                        "`{line}`: a jti must be non-empty, without spaces"
                    )));
                }
                r.jtis.insert(jti.to_string());
            } else {
                return Err(at(format!(
                    "`{line}` is not `agent:<tenant>/<agent_id>`, `agent:<agent_id>` or `jti:<jti>`"
                )));
            }
        }
        Ok(r)
    }

    pub fn is_revoked(&self, id: &AgentIdentity) -> bool {
        id.jti.as_ref().is_some_and(|j| self.jtis.contains(j))
            || self
                .agents
                .get(&id.tenant)
                .is_some_and(|a| a.contains(&id.agent_id))
    }

    /// Entries in the list.
    pub fn len(&self) -> usize {
        self.agents.values().map(HashSet::len).sum::<usize>() + self.jtis.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file this list was loaded from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// For a list from [`Revocations::load`]: `Ok(None)` when the file's
    /// modification time, size and inode are as when it was loaded (one
    /// `stat`, cheap enough for every second), else the list read again.
    /// An unreadable or invalid file is an error (keep the list in use). A
    /// list not loaded from a file never changes.
    pub fn reload_if_changed(&self) -> Result<Option<Revocations>, String> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        if self.stamp.as_ref() == Some(&FileStamp::of(path)?) {
            return Ok(None);
        }
        Revocations::load(path).map(Some)
    }
}

fn parse_alg(name: &str) -> Result<Algorithm, String> {
    name.parse::<Algorithm>()
        .map_err(|_| format!("unsupported algorithm `{name}`"))
}

pub fn read_secret(p: &Path) -> Result<Vec<u8>, String> {
    let s = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let trimmed: Vec<u8> = s.trim_ascii().to_vec();
    if trimmed.len() < 16 {
        return Err(format!(
            "{}: the secret must be at least 16 bytes",
            p.display()
        ));
    }
    Ok(trimmed)
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Sign `claims` with HS256 as they are (no policy checks: see [`mint`]).
pub fn sign_hs256(secret: &[u8], claims: &Claims) -> Result<String, String> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign token: {e}"))
}

/// Sign an HS256 token for `agent_id` that may serve exactly `connectors`
/// (at least one), in `tenant` (`None`: no tenant claim, the default
/// tenant), valid for `ttl`. Names are checked as the verifier checks them.
pub fn mint(
    secret: &[u8],
    agent_id: &str,
    connectors: &[String],
    tenant: Option<&str>,
    ttl: Duration,
) -> Result<String, String> {
    check_agent_id(agent_id)?;
    if connectors.is_empty() {
        return Err(
            "the token must name the connectors the agent may serve (--connectors a,b)".into(),
        );
    }
    for c in connectors {
        check_connector(c)?;
    }
    let mut claims = Claims::for_agent(agent_id, ttl);
    claims.connectors = Some(connectors.to_vec());
    if let Some(t) = tenant {
        check_tenant(t)?;
        claims
            .extra
            .insert("tenant".into(), serde_json::Value::String(t.to_string()));
    }
    sign_hs256(secret, &claims)
}
