//! Agent credentials that run out within the run, and the hub rules on them.
//!
//! A simulated issuer (the operator's token rotation) writes each agent's
//! next token into its token file: on time, late (after the current one
//! expired), or wrong (for another agent or tenant, or a narrower scope; the
//! operator puts it right a moment later). Each agent renews through the
//! shipped `TokenRenewal` (`core/src/renewal.rs`), as the real agent does: it
//! presents the token file's token at every dial, and when a quarter of the
//! tracked token's lifetime is left it reads the file again and sends a
//! longer-lived token (REAUTH) to every established tunnel whose hub holds an
//! older one, else looks again a moment later. Each hub
//! verifies a renewed token as its runtime does (known, unexpired, not
//! revoked there) and hands it to its `HubNode` (`tunnel_reauthed`); the
//! node's token expiry timer and `tunnel_revoked` close tunnels. A revocation
//! fault revokes a tunnel's token at one hub.
//!
//! The world keeps its own account of what each hub tunnel may carry (its
//! credential and deadline, moved only by a renewal the rules allow) and
//! checks the node against it: nothing new goes to an agent on a tunnel past
//! its deadline or after its token was revoked or its renewal refused; a
//! refused renewal never changes the tunnel's identity; a tunnel whose
//! renewal arrived in time never expires.

use std::collections::BTreeSet;

use nowconnect_core::codec::decode;
use nowconnect_core::hub_node::Refused;
use nowconnect_core::renewal::{Presented, RenewalConfig, TokenRenewal, TokenTimes};
use nowconnect_core::{Frame, Limits};

use super::*;

/// The agent's renewal, scaled to simulated lifetimes (seconds, not hours):
/// a quarter of the lifetime ahead with no minimum lead (the real agent: at
/// least 2 s), and while nothing newer is found it looks again every 100 ms
/// (the real agent: 1 s).
fn renewal_config() -> RenewalConfig {
    RenewalConfig {
        min_lead: Duration::ZERO,
        retry: Duration::from_millis(100),
        ..RenewalConfig::default()
    }
}
/// The token file's lifetimes: short-lived agents, and the others.
const SHORT_LIFETIME_MS: (u64, u64) = (400, 1200);
const LIFETIME_MS: (u64, u64) = (1500, 5000);

/// A token the simulated issuer minted.
#[derive(Clone, Debug)]
pub(super) struct Token {
    pub(super) credential: AgentCredential,
    pub(super) iat: Instant,
    pub(super) exp: Instant,
}

impl Token {
    /// When the agent looks for a fresh one: a quarter of its lifetime
    /// before it expires.
    fn due(&self) -> Instant {
        self.exp - (self.exp - self.iat) / 4
    }

    fn text(id: usize) -> String {
        format!("sim-token-{id}")
    }

    fn parse(text: &str) -> Option<usize> {
        text.strip_prefix("sim-token-")?.parse().ok()
    }
}

/// An agent's credential: its token file and its renewal state.
#[derive(Debug)]
pub(super) struct AgentAuth {
    lifetime: Duration,
    /// The token in its token file (what the issuer wrote last).
    pub(super) file: usize,
    /// Bumped at every issuance: a pending issuance of an older one is void.
    issue: u64,
    /// The shipped renewal machine.
    renewal: TokenRenewal,
    /// `exp` of the token each of its tunnels' hubs holds (by the agent's
    /// endpoint): the one it dialed with, or the last it sent.
    pub(super) presented: BTreeMap<EpId, Duration>,
}

/// What a hub tunnel may carry, by the world's own account.
#[derive(Debug)]
pub(super) struct TunnelAuth {
    hub: usize,
    agent: usize,
    /// The token it holds: the upgrade's, then each renewal the rules allow.
    token: usize,
    credential: AgentCredential,
    expires: Instant,
    /// When its token was revoked or a renewal refused at the hub: from then
    /// on nothing new goes to the agent on it.
    cut_off: Option<Instant>,
    /// Whether the last renewal it received is one the rules allow.
    last_reauth_allowed: bool,
}

impl World {
    /// An agent's first token, issued now (`schedule_issue` plans the next).
    pub(super) fn first_token(&mut self, credential: &AgentCredential) -> AgentAuth {
        let short = self.rng.below(3) == 0;
        let (lo, hi) = if short {
            SHORT_LIFETIME_MS
        } else {
            LIFETIME_MS
        };
        let lifetime = Duration::from_millis(lo + self.rng.below(hi - lo));
        let file = self.mint(credential.clone(), lifetime, None);
        AgentAuth {
            lifetime,
            file,
            issue: 0,
            renewal: self.fresh_renewal(file),
            presented: BTreeMap::new(),
        }
    }

    fn mint(
        &mut self,
        credential: AgentCredential,
        lifetime: Duration,
        after: Option<usize>,
    ) -> usize {
        // Each token outlives the one before it in the file, so the agent
        // takes it as the fresher one.
        let floor = after.map(|t| self.tokens[t].exp + Duration::from_millis(1));
        let exp = (self.now + lifetime).max(floor.unwrap_or(self.now));
        self.tokens.push(Token {
            credential,
            iat: self.now,
            exp,
        });
        self.tokens.len() - 1
    }

    /// Schedule agent `i`'s next issuance: within its token's first three
    /// quarters (before the agent looks), or, with the profile's chance,
    /// only after the token expired.
    pub(super) fn schedule_issue(&mut self, i: usize) {
        let late = self.chance(self.faults.token_late);
        let l = self.agents[i].auth.lifetime.as_micros() as u64;
        let at = if late {
            l + l / 20 + self.rng.below(l / 2)
        } else {
            3 * l / 10 + self.rng.below(4 * l / 10)
        };
        let issue = self.agents[i].auth.issue;
        self.schedule(
            Duration::from_micros(at),
            Event::TokenIssued { agent: i, issue },
        );
    }

    /// The issuer writes agent `i`'s next token: for it (sometimes with a
    /// wider scope), or, with the profile's chance, a wrong one, put right
    /// 0.1–0.4 s later.
    pub(super) fn token_issued(&mut self, i: usize, issue: u64) {
        if self.agents[i].auth.issue != issue {
            return;
        }
        self.trace(18, i as u64, issue);
        self.log(format_args!(
            "agent {i}: token file gets sim-token-{}",
            self.tokens.len()
        ));
        let bad = self.chance(self.faults.token_bad);
        let mut credential = self.agents[i].credential.clone();
        if bad {
            match self.rng.below(3) {
                0 => credential.agent_id.push_str("-impostor"),
                1 => credential.scope = Some(vec!["ldap".to_string()]),
                _ => {
                    credential.tenant = "stray".to_string();
                    credential.agent_id.push_str("-stray");
                }
            }
        } else if !self.agents[i].rogue && self.rng.below(4) == 0 {
            credential.scope = Some(vec!["echo".to_string(), "ldap".to_string()]);
        }
        let a = &self.agents[i].auth;
        let (lifetime, prev) = (a.lifetime, a.file);
        let t = self.mint(credential, lifetime, Some(prev));
        let a = &mut self.agents[i].auth;
        a.file = t;
        a.issue += 1;
        if bad {
            let d = Duration::from_millis(100 + self.rng.below(300));
            let issue = a.issue;
            self.schedule(d, Event::TokenIssued { agent: i, issue });
        } else {
            self.schedule_issue(i);
        }
    }

    /// Healing: every agent gets a fresh token now and its issuer is on
    /// time from now on.
    pub(super) fn reissue_tokens(&mut self) {
        for i in 0..self.agents.len() {
            let issue = self.agents[i].auth.issue;
            self.token_issued(i, issue);
        }
    }

    /// A token's times on the renewal's clock (time since the world began).
    pub(super) fn times(&self, token: usize) -> TokenTimes {
        let t = &self.tokens[token];
        TokenTimes {
            exp: t.exp.duration_since(self.origin),
            iat: Some(t.iat.duration_since(self.origin)),
        }
    }

    /// A renewal that presented `token`.
    fn fresh_renewal(&self, token: usize) -> TokenRenewal {
        let mut r = TokenRenewal::new(renewal_config());
        r.observe(&Token::text(token), Some(self.times(token)));
        r
    }

    /// The agent's timer: when renewal is due.
    pub(super) fn renewal_deadline(&self, i: usize) -> Option<Instant> {
        let wall = self.now.duration_since(self.origin);
        self.agents[i].auth.renewal.deadline(self.now, wall)
    }

    /// Agent `i` renews if due: it reads its token file and, with a token
    /// that lives longer, hands it to its tunnels ([`Self::catch_up`]).
    pub(super) fn renew(&mut self, i: usize) {
        let (now, wall) = (self.now, self.now.duration_since(self.origin));
        if !self.agents[i].auth.renewal.due(now, wall) {
            return;
        }
        let file = self.agents[i].auth.file;
        let (text, times) = (Token::text(file), self.times(file));
        let a = &mut self.agents[i].auth;
        a.renewal.looked(now, wall, Some((&text, Some(times))));
        self.catch_up(i);
    }

    /// The shipped `TokenRenewal::catch_up` over agent `i`'s tunnels: every
    /// established one whose hub holds an older token than the newest gets
    /// it (REAUTH). Whether anything was sent.
    pub(super) fn catch_up(&mut self, i: usize) -> bool {
        let a = &mut self.agents[i];
        let (auth, eps) = (&mut a.auth, &a.eps);
        auth.presented.retain(|ep, _| eps.values().any(|e| e == ep));
        // Both maps are ordered by endpoint: walk them together.
        let mut held = auth.presented.iter_mut().peekable();
        let mut tunnels = Vec::new();
        for (id, e) in self.eps.iter_mut() {
            while held.next_if(|(ep, _)| **ep < *id).is_some() {}
            if let Some((_, exp)) = held.next_if(|(ep, _)| **ep == *id)
                && let Link::Tunnel(tunnel) = &mut e.link
            {
                tunnels.push(Presented { exp, tunnel });
            }
        }
        let done = auth.renewal.catch_up(tunnels);
        let sent = done.sent > 0;
        if sent {
            self.log(format_args!("agent {i}: REAUTH to {} tunnel(s)", done.sent));
        }
        sent
    }

    /// Agent `i` dials: it presents its token file's token (and tracks it
    /// when it lives longer).
    pub(super) fn dial_token(&mut self, i: usize) -> usize {
        let file = self.agents[i].auth.file;
        let times = self.times(file);
        let a = &mut self.agents[i].auth;
        a.renewal.observe(&Token::text(file), Some(times));
        file
    }

    /// A restarted agent tracks the token it reads at start.
    pub(super) fn restart_renewal(&mut self, i: usize) {
        let file = self.agents[i].auth.file;
        let renewal = self.fresh_renewal(file);
        let a = &mut self.agents[i].auth;
        a.renewal = renewal;
        a.presented.clear();
    }

    /// The upgrade at hub `h`: a token that expired or is revoked there is
    /// refused (401); `None` then.
    pub(super) fn upgrade(&mut self, h: usize, token: usize) -> Option<Token> {
        let t = &self.tokens[token];
        if t.exp <= self.now || self.hubs[h].revoked.contains(&token) {
            self.outcome.upgrades_refused += 1;
            return None;
        }
        Some(t.clone())
    }

    /// Hub `h` accepted tunnel `ep` of agent `i` for `token`.
    pub(super) fn tunnel_authed(&mut self, h: usize, ep: EpId, i: usize, token: usize) {
        let t = &self.tokens[token];
        self.tunnel_auth.insert(
            ep,
            TunnelAuth {
                hub: h,
                agent: i,
                token,
                credential: t.credential.clone(),
                expires: t.exp,
                cut_off: None,
                last_reauth_allowed: false,
            },
        );
    }

    /// A renewed token arrived at hub `h` on tunnel `ep`: verified as the
    /// runtime does, then the node decides; the world checks its decision.
    pub(super) fn hub_reauth(&mut self, h: usize, ep: EpId, text: &str) {
        let now = self.now;
        let Some(cur) = self.tunnel_auth.get_mut(&ep) else {
            return;
        };
        let verified = match Token::parse(text).and_then(|id| self.tokens.get(id).map(|t| (id, t)))
        {
            None => Err(("invalid_token", "not a token".to_string())),
            Some((id, _)) if self.hubs[h].revoked.contains(&id) => {
                Err(("revoked", "the token is revoked".to_string()))
            }
            Some((_, t)) if t.exp <= now => Err(("token_expired", "the token expired".to_string())),
            Some((id, t)) => Ok((id, t.clone())),
        };
        let (id, token) = match verified {
            Ok(v) => v,
            Err((label, detail)) => {
                cur.last_reauth_allowed = false;
                cur.cut_off.get_or_insert(now);
                self.hubs[h]
                    .node
                    .tunnel_reauth_refused(now, TunnelId(ep), label, detail);
                return;
            }
        };
        // The rules, stated again: same tenant and agent, a scope that
        // covers every connector the agent announced.
        let new = &token.credential;
        let announced = self.agents[cur.agent].cfg.connectors.keys();
        let allowed = new.tenant == cur.credential.tenant
            && new.agent_id == cur.credential.agent_id
            && new
                .scope
                .as_ref()
                .is_some_and(|s| announced.into_iter().all(|c| s.contains(c)));
        cur.last_reauth_allowed = allowed;
        let taken = self.hubs[h]
            .node
            .tunnel_reauthed(now, TunnelId(ep), new.clone(), token.exp);
        let cur = self.tunnel_auth.get_mut(&ep).expect("checked");
        if taken && allowed {
            self.outcome.reauths_accepted += 1;
            cur.token = id;
            cur.credential = token.credential.clone();
            cur.expires = token.exp;
        } else if !allowed {
            cur.cut_off.get_or_insert(now);
        }
        let before = format!("{:?}", cur.credential);
        let held = self.hubs[h]
            .node
            .tunnel(TunnelId(ep))
            .map(|t| t.credential());
        if held.is_some_and(|c| *c != cur.credential) || (taken && !allowed) {
            self.fail(format!(
                "hub {h}: a renewed token {new:?} that the rules refuse changed the identity of tunnel {ep} ({before})"
            ));
        }
    }

    /// A refusal the node decided: counted, and checked against the world's
    /// account of the tunnel.
    pub(super) fn tunnel_refused(&mut self, h: usize, r: &Refused) {
        let now = self.now;
        let Some(cur) = self.tunnel_auth.get(&r.tunnel.0) else {
            return;
        };
        let who = format!("{}/{}", cur.credential.tenant, cur.credential.agent_id);
        match r.refusal.stage() {
            RefusalStage::Hello => {}
            RefusalStage::Reauth => {
                self.outcome.reauths_refused += 1;
                if cur.last_reauth_allowed {
                    self.fail(format!(
                        "hub {h} refused a renewed token of `{who}` that the rules allow ({})",
                        r.detail
                    ));
                }
            }
            RefusalStage::Expiry => {
                self.outcome.token_expiries += 1;
                // Not a violation of the hub's rules, but worth seeing: the
                // agent held a fresh token for itself, issued before this
                // tunnel's token was due, and the tunnel still expired (the
                // renewal never reached it).
                let a = &self.agents[cur.agent];
                let (held, file) = (&self.tokens[cur.token], &self.tokens[a.auth.file]);
                if file.exp > held.exp && file.iat <= held.due() && file.credential == a.credential
                {
                    self.outcome.expiries_with_fresh_token += 1;
                }
                if now < cur.expires {
                    let (at, until) = (self.since(now), self.since(cur.expires));
                    self.fail(format!(
                        "hub {h} closed the tunnel of `{who}` at {at:?} for an expired token, though its token (renewed in time) runs until {until:?}"
                    ));
                }
            }
            RefusalStage::Revocation => {
                self.outcome.revocations += 1;
                if !self.hubs[h].revoked.contains(&cur.token) {
                    self.fail(format!(
                        "hub {h} revoked the tunnel of `{who}` whose token is not revoked"
                    ));
                }
            }
        }
    }

    fn since(&self, t: Instant) -> Duration {
        t.duration_since(self.origin)
    }

    /// The revocation fault: the token of a random admitted tunnel is
    /// revoked at its hub, which closes every tunnel holding it there; the
    /// operator gives the agent a fresh token 50–300 ms later.
    pub(super) fn revoke_random(&mut self) {
        let now = self.now;
        let ids: Vec<EpId> = self
            .tunnel_auth
            .iter()
            .filter(|(ep, a)| {
                a.cut_off.is_none()
                    && self.hubs[a.hub].alive
                    && self.hubs[a.hub]
                        .node
                        .tunnel(TunnelId(**ep))
                        .is_some_and(|t| t.agent().is_some())
            })
            .map(|(ep, _)| *ep)
            .collect();
        if ids.is_empty() {
            return;
        }
        let ep = ids[self.rng.below(ids.len() as u64) as usize];
        let (h, token, agent) = {
            let a = &self.tunnel_auth[&ep];
            (a.hub, a.token, a.agent)
        };
        self.trace(19, ep, token as u64);
        self.hubs[h].revoked.insert(token);
        let holding: Vec<EpId> = self
            .tunnel_auth
            .iter()
            .filter(|(_, a)| a.hub == h && a.token == token)
            .map(|(ep, _)| *ep)
            .collect();
        for ep in holding {
            self.tunnel_auth
                .get_mut(&ep)
                .expect("listed")
                .cut_off
                .get_or_insert(now);
            self.hubs[h].node.tunnel_revoked(now, TunnelId(ep));
        }
        if self.agents[agent].auth.file == token {
            let d = Duration::from_millis(50 + self.rng.below(250));
            let issue = self.agents[agent].auth.issue;
            self.schedule(d, Event::TokenIssued { agent, issue });
        }
    }

    /// A message leaves a hub tunnel endpoint: past its deadline, or once its
    /// token was revoked or a renewal refused, it must open no flow and carry
    /// no bytes to the agent.
    pub(super) fn check_to_agent(&mut self, from: EpId, msg: &WsMessage) {
        let Some(a) = self.tunnel_auth.get(&from) else {
            return;
        };
        let why = if let Some(at) = a.cut_off {
            format!(
                "its token was revoked or its renewal refused at {:?}",
                self.since(at)
            )
        } else if self.now > a.expires {
            format!("its token expired at {:?}", self.since(a.expires))
        } else {
            return;
        };
        let what = match decode(msg, &Limits::default()) {
            Ok(Frame::Open { .. }) => "opened a flow",
            Ok(f) if f.is_data() => "sent bytes",
            _ => return,
        };
        let (h, who) = (
            a.hub,
            format!("{}/{}", a.credential.tenant, a.credential.agent_id),
        );
        self.fail(format!(
            "hub {h} {what} to `{who}` on tunnel {from} at {:?}, after {why}",
            self.since(self.now)
        ));
    }
}

/// Hub-side: tokens revoked at a hub (its revocation list survives restarts).
pub(super) type Revoked = BTreeSet<usize>;
