//! Agent tokens: minting (`nowconnect token`, HS256) and verification on
//! `/tunnel` before the WebSocket upgrade (HS256 secret or RS256/ES256 public
//! key, an algorithm allow-list, audience, optional issuer, expiry and
//! not-before with leeway, agent id from `sub` or `agent_id`, optional
//! connector scope).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::config::JwtConfig;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    pub aud: String,
    pub exp: u64,
    #[serde(default)]
    pub iat: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The connectors this agent may announce; absent means any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connectors: Option<Vec<String>>,
    /// The agent's tenant; absent means the default tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

/// Who a valid token says the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub scope: Option<Vec<String>>,
    pub tenant: String,
    /// The token's `exp` (unix seconds): the tunnel closes then.
    pub expires_at: u64,
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

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn from_config(cfg: &JwtConfig) -> Result<Self, String> {
        let (key, family) = match (&cfg.hs256_secret_file, &cfg.public_key_file) {
            (Some(p), _) => (DecodingKey::from_secret(&read_secret(p)?), "HS"),
            (None, Some(p)) => {
                let pem =
                    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                    (k, "RS")
                } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                    (k, "ES")
                } else {
                    return Err(format!(
                        "{}: not an RSA or EC public key in PEM form",
                        p.display()
                    ));
                }
            }
            (None, None) => return Err("no verification key configured".into()),
        };
        let algs: Vec<Algorithm> = match &cfg.algorithms {
            Some(names) => names
                .iter()
                .map(|n| parse_alg(n))
                .collect::<Result<_, _>>()?,
            None => match family {
                "HS" => vec![Algorithm::HS256],
                "RS" => vec![Algorithm::RS256],
                _ => vec![Algorithm::ES256],
            },
        };
        if let Some(bad) = algs.iter().find(|a| !format!("{a:?}").starts_with(family)) {
            return Err(format!(
                "algorithm {bad:?} does not fit the configured {family} key"
            ));
        }
        let mut validation = Validation::new(algs[0]);
        validation.algorithms = algs;
        validation.set_audience(&[cfg.audience.as_str()]);
        // A configured issuer must be present, not only match when present.
        if let Some(iss) = &cfg.issuer {
            validation.set_issuer(&[iss.as_str()]);
            validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        } else {
            validation.set_required_spec_claims(&["exp", "aud"]);
        }
        validation.validate_nbf = true;
        validation.leeway = cfg.leeway_sec;
        Ok(Verifier { key, validation })
    }

    pub fn verify(&self, token: &str) -> Result<AgentIdentity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            AuthError::new("malformed", format!("cannot read the token header: {e}"))
        })?;
        if !self.validation.algorithms.contains(&header.alg) {
            return Err(AuthError::new(
                "algorithm_not_allowed",
                format!(
                    "algorithm {:?} is not in the allow-list {:?}",
                    header.alg, self.validation.algorithms
                ),
            ));
        }
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
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
        let tenant = c
            .tenant
            .unwrap_or_else(|| nowconnect_core::tenant::DEFAULT_TENANT.to_string());
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "-_.:".contains(ch))
        };
        if !name_ok(&tenant) {
            return Err(AuthError::new(
                "malformed",
                "the tenant claim must be 1 to 128 letters, digits, `-`, `_`, `.` or `:`",
            ));
        }
        Ok(AgentIdentity {
            agent_id,
            scope: c.connectors,
            tenant,
            expires_at: c.exp,
            jti: c.jti,
        })
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

/// Sign an HS256 token for `agent_id`.
pub fn mint(
    secret: &[u8],
    agent_id: &str,
    connectors: Option<Vec<String>>,
    ttl: Duration,
) -> Result<String, String> {
    mint_for(
        secret,
        &TokenSpec {
            agent_id: agent_id.to_string(),
            connectors,
            tenant: None,
            ttl,
        },
    )
}

/// What a minted token says.
#[derive(Clone, Debug)]
pub struct TokenSpec {
    pub agent_id: String,
    pub connectors: Option<Vec<String>>,
    /// `None`: no tenant claim (the default tenant).
    pub tenant: Option<String>,
    pub ttl: Duration,
}

/// Sign an HS256 token as `spec` says.
pub fn mint_for(secret: &[u8], spec: &TokenSpec) -> Result<String, String> {
    let now = unix_now();
    let claims = Claims {
        sub: Some(spec.agent_id.clone()),
        agent_id: None,
        aud: "nowconnect".into(),
        exp: now + spec.ttl.as_secs(),
        iat: now,
        nbf: None,
        iss: None,
        connectors: spec.connectors.clone(),
        tenant: spec.tenant.clone(),
        jti: None,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign token: {e}"))
}
