//! Where a new client connection goes: a local agent, the mesh to the owner of
//! a remote agent, or nowhere (refused with a reason). In shadow mode the
//! decision active mode *would* have made is returned beside what is done.

use crate::frame::{Epoch, ErrorCode};
use crate::registry::AgentRecord;
use crate::rng::Rng;

/// One agent tunnel of a hub, as the hub's runtime (or the simulator)
/// numbers it (re-exported as `hub::TunnelId`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TunnelId(pub u64);

impl std::fmt::Display for TunnelId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// One replica; no registry beyond the process, no mesh.
    Off,
    /// Registry and mesh run and are observed; traffic served only locally.
    Shadow,
    /// Local agent first, else the mesh to the owner.
    Active,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Off => "off",
            Mode::Shadow => "shadow",
            Mode::Active => "active",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "off" => Some(Mode::Off),
            "shadow" => Some(Mode::Shadow),
            "active" => Some(Mode::Active),
            _ => None,
        }
    }
}

/// A local agent tunnel that serves the connector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalCandidate {
    pub tunnel: TunnelId,
    pub agent_id: String,
    pub open_flows: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Local {
        tunnel: TunnelId,
        agent_id: String,
    },
    Mesh {
        replica_id: String,
        agent_id: String,
        epoch: Epoch,
    },
    Refuse {
        code: ErrorCode,
        reason: String,
    },
}

impl Route {
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Local { .. } => "local",
            Route::Mesh { .. } => "mesh",
            Route::Refuse { .. } => "refuse",
        }
    }

    fn refuse(code: ErrorCode, reason: String) -> Route {
        Route::Refuse { code, reason }
    }
}

/// The local agent with the fewest open flows; ties go to the oldest tunnel
/// (lowest id) so the choice is deterministic.
pub fn pick_local(candidates: &[LocalCandidate]) -> Option<&LocalCandidate> {
    candidates.iter().min_by_key(|c| (c.open_flows, c.tunnel))
}

/// What the registry said about the connector's agents, for the remote step.
pub enum RemoteView<'a> {
    Agents(&'a [AgentRecord]),
    Unavailable(&'a str),
}

/// The remote step, once no local agent serves the connector. `mesh_up`
/// tells whether the link to a replica is established. Among agents whose
/// owner is reachable one is drawn at random (seeded), spreading load.
pub fn route_remote(
    connector: &str,
    local_replica: &str,
    view: RemoteView<'_>,
    mesh_up: impl Fn(&str) -> bool,
    rng: &mut Rng,
) -> Route {
    let agents = match view {
        RemoteView::Unavailable(why) => {
            return Route::refuse(
                ErrorCode::RegistryUnavailable,
                format!(
                    "connector `{connector}`: no local agent and the registry is unavailable ({why})"
                ),
            );
        }
        RemoteView::Agents(a) => a,
    };
    // Every tunnel of every agent held by another hub (a multi-homed
    // agent is reachable through each of its hubs).
    let owned: Vec<_> = agents
        .iter()
        .flat_map(|a| a.owners.iter().map(move |o| (a, o)))
        .filter(|(_, o)| o.replica_id != local_replica)
        .collect();
    if owned.is_empty() {
        return Route::refuse(
            ErrorCode::NoAgent,
            format!("connector `{connector}`: no agent is connected to any hub"),
        );
    }
    let reachable: Vec<_> = owned
        .iter()
        .filter(|(_, o)| mesh_up(&o.replica_id))
        .collect();
    if reachable.is_empty() {
        let mut owners: Vec<&str> = owned.iter().map(|(_, o)| o.replica_id.as_str()).collect();
        owners.sort_unstable();
        owners.dedup();
        return Route::refuse(
            ErrorCode::MeshUnavailable,
            format!(
                "connector `{connector}`: agents are owned by {} but no mesh link to them is up",
                owners.join(", ")
            ),
        );
    }
    let (a, o) = reachable[rng.below(reachable.len() as u64) as usize];
    Route::Mesh {
        replica_id: o.replica_id.clone(),
        agent_id: a.agent_id.clone(),
        epoch: o.epoch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Owner;

    fn rec(agent: &str, owner: Option<(&str, u64)>) -> AgentRecord {
        AgentRecord {
            agent_id: agent.into(),
            owners: owner
                .map(|(r, e)| Owner {
                    replica_id: r.into(),
                    epoch: Epoch(e),
                    slot: 0,
                })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn local_pick_is_least_loaded_then_oldest() {
        let c = |t, f| LocalCandidate {
            tunnel: TunnelId(t),
            agent_id: format!("a{t}"),
            open_flows: f,
        };
        assert_eq!(
            pick_local(&[c(3, 2), c(1, 5), c(2, 2)]).unwrap().tunnel,
            TunnelId(2)
        );
        assert!(pick_local(&[]).is_none());
    }

    #[test]
    fn remote_refusals_name_the_reason() {
        let mut rng = Rng::new(1);
        let r = route_remote(
            "ldap",
            "hub-b",
            RemoteView::Unavailable("timeout"),
            |_| true,
            &mut rng,
        );
        assert!(matches!(
            r,
            Route::Refuse {
                code: ErrorCode::RegistryUnavailable,
                ..
            }
        ));
        let none = [rec("a1", None), rec("a2", Some(("hub-b", 1)))];
        let r = route_remote(
            "ldap",
            "hub-b",
            RemoteView::Agents(&none),
            |_| true,
            &mut rng,
        );
        assert!(matches!(
            r,
            Route::Refuse {
                code: ErrorCode::NoAgent,
                ..
            }
        ));
        let down = [rec("a1", Some(("hub-a", 4)))];
        let r = route_remote(
            "ldap",
            "hub-b",
            RemoteView::Agents(&down),
            |_| false,
            &mut rng,
        );
        match r {
            Route::Refuse {
                code: ErrorCode::MeshUnavailable,
                reason,
            } => assert!(reason.contains("hub-a")),
            other => panic!("{other:?}"),
        }
        let r = route_remote(
            "ldap",
            "hub-b",
            RemoteView::Agents(&down),
            |p| p == "hub-a",
            &mut rng,
        );
        assert_eq!(
            r,
            Route::Mesh {
                replica_id: "hub-a".into(),
                agent_id: "a1".into(),
                epoch: Epoch(4)
            }
        );
    }
}
