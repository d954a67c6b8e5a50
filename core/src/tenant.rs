//! Tenants: a tenant owns connectors and agents. Agent ids and connector
//! names are unique only within a tenant, so inside a hub, in the registry
//! and on the mesh they travel *qualified*: `tenant/name`. The default
//! tenant's names stay bare, so single-tenant deployments keep their
//! registry keys and metric labels. Names never contain `/` (configuration
//! and token checks refuse it), so a qualified name splits one way only.

/// The tenant of a token without a tenant claim and of a listener without
/// `tenant`.
pub const DEFAULT_TENANT: &str = "default";

/// `name` as it is known across the cluster: bare in the default tenant,
/// `tenant/name` in any other.
pub fn qualify(tenant: &str, name: &str) -> String {
    if tenant == DEFAULT_TENANT {
        name.to_string()
    } else {
        format!("{tenant}/{name}")
    }
}

/// The tenant and the bare name of a qualified name.
pub fn split(qualified: &str) -> (&str, &str) {
    match qualified.split_once('/') {
        Some((tenant, name)) => (tenant, name),
        None => (DEFAULT_TENANT, qualified),
    }
}

/// Who a verified token says an agent is: its tenant, its id, and the
/// connectors it may announce (`None`: any, only where the operator allows
/// unscoped tokens).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentCredential {
    pub tenant: String,
    pub agent_id: String,
    pub scope: Option<Vec<String>>,
}

/// Why a credential does not admit a HELLO (or a renewed token).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inadmissible {
    /// It names another agent than the credential.
    AgentMismatch,
    /// It announces a connector outside the credential's scope.
    ConnectorOutsideScope,
}

impl Inadmissible {
    pub fn as_str(&self) -> &'static str {
        match self {
            Inadmissible::AgentMismatch => "agent_mismatch",
            Inadmissible::ConnectorOutsideScope => "connector_outside_scope",
        }
    }
}

impl AgentCredential {
    /// Whether this credential admits a HELLO of `agent_id` announcing
    /// `connectors` (at the tunnel's start, and again for a token renewed
    /// on it): the refusal's kind and reason otherwise.
    pub fn admission(
        &self,
        agent_id: &str,
        connectors: &[String],
    ) -> Result<(), (Inadmissible, String)> {
        if agent_id != self.agent_id {
            return Err((
                Inadmissible::AgentMismatch,
                format!(
                    "HELLO names agent `{agent_id}` but the token is for `{}`",
                    self.agent_id
                ),
            ));
        }
        if let Some(scope) = &self.scope
            && let Some(bad) = connectors.iter().find(|c| !scope.contains(c))
        {
            return Err((
                Inadmissible::ConnectorOutsideScope,
                format!("connector `{bad}` is outside the token's scope"),
            ));
        }
        Ok(())
    }

    /// [`AgentCredential::admission`] with the refusal's kind as its label
    /// (`agent_mismatch`, `connector_outside_scope`).
    pub fn admits(
        &self,
        agent_id: &str,
        connectors: &[String],
    ) -> Result<(), (&'static str, String)> {
        self.admission(agent_id, connectors)
            .map_err(|(kind, reason)| (kind.as_str(), reason))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qualified_names_round_trip_and_default_stays_bare() {
        assert_eq!(qualify(DEFAULT_TENANT, "ldap"), "ldap");
        assert_eq!(qualify("acme", "ldap"), "acme/ldap");
        assert_eq!(split("acme/ldap"), ("acme", "ldap"));
        assert_eq!(split("ldap"), (DEFAULT_TENANT, "ldap"));
        assert_ne!(qualify("acme", "ldap"), qualify("globex", "ldap"));
    }
}
