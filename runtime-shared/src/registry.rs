//! The Redis registry (with feature `redis-tokio` or `redis-smol`): performs the core's [`RegistryOp`]s with atomic Lua
//! scripts over a `redis` ConnectionManager (reconnects by itself, created
//! lazily so a hub starts while Redis is down and reports itself degraded).
//!
//! Key layout (prefix `nowconnect:` by default), documented in
//! `docs/registry.md`:
//! - `{p}agent:{id}:epoch`      counter, never expires
//! - `{p}agent:{id}:owner`      "replica|epoch" of slot 0, PX lease
//! - `{p}agent:{id}:owner:{k}`  the same for slot k ≥ 1 (multi-homed agents)
//! - `{p}agent:{id}:connectors` set of connector names, PX lease
//! - `{p}connector:{name}`      zset agent id → lease expiry (ms, Redis TIME)
//! - `{p}connectors`            set of connector names with a live agent
//!   (pruned by the sweep once a connector's last lease lapsed)
//! - `{p}sweep:cursor`          where the next sweep continues its SSCAN
//! - `{p}replicas`              zset replica id → lease expiry (ms)
//! - `{p}replica:{id}:url`      mesh URL, PX lease
//!
//! Epochs: a claim takes `max(INCR, server time in ms)`, so epochs keep
//! growing even if Redis loses its data (restart without persistence,
//! failover to an empty replica), as long as the server clock does not step
//! back by more than the time since the last claim.
//!
//! Transport and credentials: a `rediss://` URL is served over rustls (ring),
//! trusting `ha.redis_tls.ca_bundle` (with an optional client certificate)
//! or, without `ha.redis_tls`, the system's roots. The ACL user and the
//! password from `ha.redis_password_file` are set on the connection info,
//! never spliced into the URL; every error shows the URL with its password
//! masked ([`crate::redact::redact_url`]).

use std::time::Duration;

use nowconnect_core::Epoch;
use nowconnect_core::frame::MAX_SLOTS;
use nowconnect_core::registry::{AgentRecord, Owner, RegistryError, RegistryOp, RegistryReply};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ClientTlsConfig, IntoConnectionInfo, Script, TlsCertificates};

use crate::redact::{Secret, redact_url};

/// Connector names one sweep call looks at (an SSCAN `COUNT` hint).
pub const SWEEP_STEP: usize = 256;

const NOW_MS: &str = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)";

pub struct RedisRegistry {
    conn: ConnectionManager,
    prefix: String,
    claim: Script,
    renew: Script,
    renew_many: Script,
    release: Script,
    add_connectors: Script,
    list_agents: Script,
    get_owners: Script,
    announce: Script,
    list_replicas: Script,
    sweep: Script,
}

impl RedisRegistry {
    /// The registry a hub configuration asks for: Redis when `ha.enabled`
    /// and `ha.redis_url` are set, else `None` (in-process).
    pub fn for_config(cfg: &crate::config::HubConfig) -> Result<Option<Self>, String> {
        let ha = &cfg.raw.ha;
        let (Some(url), true) = (&ha.redis_url, ha.enabled) else {
            return Ok(None);
        };
        if url.has_password() {
            tracing::warn!(
                redis_url = %url,
                "ha.redis_url holds a password: put it in a file named by ha.redis_password_file instead"
            );
        }
        let tls = match &ha.redis_tls {
            Some(t) => Some(RedisTlsPem::read(
                &t.ca_bundle,
                t.cert_file.as_deref().zip(t.key_file.as_deref()),
            )?),
            None => None,
        };
        let auth = RedisAuth {
            username: ha.redis_username.clone(),
            password: cfg.redis_password.clone(),
            tls,
        };
        let registry = Self::with_auth(
            url.expose(),
            &auth,
            &ha.registry_prefix,
            Duration::from_millis(ha.registry_timeout_ms),
        )?;
        tracing::info!(
            redis_url = %url,
            tls = url.is_tls(),
            tls_roots = if ha.redis_tls.is_some() { "ha.redis_tls.ca_bundle" } else { "system" },
            client_certificate = auth.tls.as_ref().is_some_and(|t| t.client.is_some()),
            user = auth.username.as_deref().unwrap_or("(from the URL, or default)"),
            password_file = ha.redis_password_file.is_some(),
            "redis registry"
        );
        Ok(Some(registry))
    }

    /// Connects lazily: the first call opens the connection. Credentials and
    /// TLS trust come from `url` alone (a `rediss://` URL trusts the system's
    /// roots); see [`RedisRegistry::with_auth`].
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, String> {
        Self::with_auth(url, &RedisAuth::default(), prefix, timeout)
    }

    /// As [`RedisRegistry::new`], with an ACL user, a password and TLS
    /// material set on the connection besides what `url` holds.
    pub fn with_auth(
        url: &str,
        auth: &RedisAuth,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = client(url, auth)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, cfg)
            .map_err(|e| format!("redis: {e}"))?;
        Ok(RedisRegistry {
            conn,
            prefix: prefix.to_string(),
            claim: Script::new(&format!(
                "{NOW_MS}
                 local e = redis.call('INCR', KEYS[1])
                 if e < now then e = now redis.call('SET', KEYS[1], e) end
                 redis.call('SET', KEYS[2], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
                 return e"
            )),
            renew: Script::new(
                "local v = redis.call('GET', KEYS[1])
                 if v == ARGV[1] .. '|' .. ARGV[2] then
                   redis.call('PEXPIRE', KEYS[1], ARGV[3])
                   return ''
                 end
                 if v then return v end
                 return '-'",
            ),
            // KEYS: `connectors`, then per slot its owner and its agent's
            // connector set. ARGV: replica, lease (ms), then per slot its
            // epoch, agent id, connector count and connector names.
            // All owners are read in one MGET; each slot still held is
            // extended, and each agent with a slot renewed has its set
            // extended (and refilled if it lapsed) and one ZADD per
            // connector carries every member's new score. Replies the
            // lost slots: 0-based index, current owner ('' for none).
            renew_many: Script::new(&format!(
                "{NOW_MS}
                 local rid, lease = ARGV[1], tonumber(ARGV[2])
                 local n = (#KEYS - 1) / 2
                 if n < 1 then return {{}} end
                 local owners = {{}}
                 for i = 1, n do owners[i] = KEYS[2 * i] end
                 local vals = redis.call('MGET', unpack(owners))
                 local lost, seen, members, names = {{}}, {{}}, {{}}, {{}}
                 local a = 3
                 for i = 1, n do
                   local epoch, id, k = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
                   if vals[i] == rid .. '|' .. epoch then
                     redis.call('PEXPIRE', KEYS[2 * i], lease)
                     if k > 0 and not seen[id] then
                       seen[id] = true
                       local set = KEYS[2 * i + 1]
                       local refill = redis.call('PEXPIRE', set, lease) == 0
                       for j = a + 3, a + 2 + k do
                         local c = ARGV[j]
                         if refill then redis.call('SADD', set, c) end
                         if not members[c] then members[c] = {{}} table.insert(names, c) end
                         table.insert(members[c], now + lease)
                         table.insert(members[c], id)
                       end
                       if refill then redis.call('PEXPIRE', set, lease) end
                     end
                   else
                     table.insert(lost, tostring(i - 1))
                     table.insert(lost, vals[i] or '')
                   end
                   a = a + 3 + k
                 end
                 for _, c in ipairs(names) do
                   redis.call('ZADD', '{p}connector:' .. c, unpack(members[c]))
                 end
                 if #names > 0 then redis.call('SADD', KEYS[1], unpack(names)) end
                 return lost",
                p = prefix
            )),
            // KEYS: the slot's owner, the agent's connectors, then the
            // agent's other slots' owners: membership goes with the last.
            release: Script::new(&format!(
                "local v = redis.call('GET', KEYS[1])
                 if v ~= ARGV[1] .. '|' .. ARGV[2] then return 0 end
                 redis.call('DEL', KEYS[1])
                 for i = 3, #KEYS do
                   if redis.call('EXISTS', KEYS[i]) == 1 then return 1 end
                 end
                 for _, c in ipairs(redis.call('SMEMBERS', KEYS[2])) do
                   redis.call('ZREM', '{p}connector:' .. c, ARGV[3])
                 end
                 redis.call('DEL', KEYS[2])
                 return 1",
                p = prefix
            )),
            add_connectors: Script::new(&format!(
                "{NOW_MS}
                 for i = 3, #ARGV do
                   redis.call('ZADD', '{p}connector:' .. ARGV[i], now + tonumber(ARGV[2]), ARGV[1])
                   redis.call('SADD', KEYS[1], ARGV[i])
                   redis.call('SADD', KEYS[2], ARGV[i])
                 end
                 redis.call('PEXPIRE', KEYS[1], ARGV[2])
                 return 1",
                p = prefix
            )),
            // Each member, then the owner of each of its slots ('' for none).
            list_agents: Script::new(&format!(
                "{NOW_MS}
                 local out = {{}}
                 for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
                   table.insert(out, id)
                   table.insert(out, redis.call('GET', '{p}agent:' .. id .. ':owner') or '')
                   for k = 1, tonumber(ARGV[1]) - 1 do
                     table.insert(out, redis.call('GET', '{p}agent:' .. id .. ':owner:' .. k) or '')
                   end
                 end
                 return out",
                p = prefix
            )),
            get_owners: Script::new(
                "local out = {}
                 for i = 1, #KEYS do table.insert(out, redis.call('GET', KEYS[i]) or '') end
                 return out",
            ),
            announce: Script::new(&format!(
                "{NOW_MS}
                 redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
                 redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
                 return 1"
            )),
            list_replicas: Script::new(&format!(
                "{NOW_MS}
                 local out = {{}}
                 for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')) do
                   local url = redis.call('GET', '{p}replica:' .. id .. ':url')
                   if url then table.insert(out, id) table.insert(out, url) end
                 end
                 return out",
                p = prefix
            )),
            // Bounded work per call: one SSCAN step over the connector set
            // (its cursor kept in Redis, so every hub's sweep continues
            // where the last one stopped); a connector whose last agent's
            // lease lapsed leaves the set.
            sweep: Script::new(&format!(
                "{NOW_MS}
                 local n = 0
                 local step = redis.call('SSCAN', KEYS[1], redis.call('GET', KEYS[3]) or '0', 'COUNT', ARGV[1])
                 redis.call('SET', KEYS[3], step[1])
                 for _, c in ipairs(step[2]) do
                   local k = '{p}connector:' .. c
                   n = n + redis.call('ZREMRANGEBYSCORE', k, '-inf', now)
                   if redis.call('ZCARD', k) == 0 then redis.call('SREM', KEYS[1], c) end
                 end
                 n = n + redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
                 return n",
                p = prefix
            )),
        })
    }

    /// One call on `registry` (or the error that there is none), as a
    /// future that owns what it needs.
    pub async fn call(
        registry: Option<std::sync::Arc<Self>>,
        op: RegistryOp,
    ) -> Result<RegistryReply, RegistryError> {
        match registry {
            Some(r) => r.apply(&op).await,
            None => Err(RegistryError::Unavailable("no registry configured".into())),
        }
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    /// The owner key of `slot` of `agent_id`: slot 0 keeps the key every
    /// agent used before slots existed.
    fn owner_key(&self, agent_id: &str, slot: u8) -> String {
        if slot == 0 {
            self.key(&["agent", agent_id, "owner"])
        } else {
            self.key(&["agent", agent_id, "owner", &slot.to_string()])
        }
    }

    pub async fn apply(&self, op: &RegistryOp) -> Result<RegistryReply, RegistryError> {
        self.apply_inner(op)
            .await
            .map_err(|e| RegistryError::Unavailable(format!("redis {}: {e}", op.name())))
    }

    async fn apply_inner(&self, op: &RegistryOp) -> redis::RedisResult<RegistryReply> {
        let mut c = self.conn.clone();
        Ok(match op {
            RegistryOp::Claim {
                agent_id,
                slot,
                replica_id,
                lease,
            } => {
                let e: u64 = self
                    .claim
                    .key(self.key(&["agent", agent_id, "epoch"]))
                    .key(self.owner_key(agent_id, *slot))
                    .arg(replica_id)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Claimed(Epoch(e))
            }
            RegistryOp::Renew {
                agent_id,
                slot,
                replica_id,
                epoch,
                lease,
            } => {
                let v: String = self
                    .renew
                    .key(self.owner_key(agent_id, *slot))
                    .arg(replica_id)
                    .arg(epoch.0)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await?;
                match v.as_str() {
                    "" => RegistryReply::Renewed,
                    "-" => RegistryReply::Lost { current: None },
                    other => RegistryReply::Lost {
                        current: parse_owner(other, *slot),
                    },
                }
            }
            RegistryOp::RenewMany {
                replica_id,
                lease,
                slots,
            } => {
                if slots.is_empty() {
                    return Ok(RegistryReply::RenewedMany { lost: Vec::new() });
                }
                let mut inv = self.renew_many.prepare_invoke();
                inv.key(self.key(&["connectors"]))
                    .arg(replica_id)
                    .arg(lease.as_millis() as u64);
                for s in slots {
                    inv.key(self.owner_key(&s.agent_id, s.slot))
                        .key(self.key(&["agent", &s.agent_id, "connectors"]))
                        .arg(s.epoch.0)
                        .arg(&s.agent_id)
                        .arg(s.connectors.len());
                    for name in &s.connectors {
                        inv.arg(name);
                    }
                }
                let flat: Vec<String> = inv.invoke_async(&mut c).await?;
                let mut lost = Vec::new();
                for pair in flat.chunks(2) {
                    let [i, owner] = pair else {
                        return Err(malformed("renew_many", "an odd-length reply"));
                    };
                    let Some(s) = i
                        .parse::<usize>()
                        .ok()
                        .and_then(|i| slots.get(i).map(|s| (i, s)))
                    else {
                        return Err(malformed("renew_many", "a slot index out of range"));
                    };
                    lost.push((s.0, parse_owner(owner, s.1.slot)));
                }
                RegistryReply::RenewedMany { lost }
            }
            RegistryOp::Release {
                agent_id,
                slot,
                replica_id,
                epoch,
            } => {
                let mut inv = self.release.prepare_invoke();
                inv.key(self.owner_key(agent_id, *slot)).key(self.key(&[
                    "agent",
                    agent_id,
                    "connectors",
                ]));
                for other in (0..MAX_SLOTS).filter(|k| k != slot) {
                    inv.key(self.owner_key(agent_id, other));
                }
                let _: i64 = inv
                    .arg(replica_id)
                    .arg(epoch.0)
                    .arg(agent_id)
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Released
            }
            RegistryOp::AddConnectors {
                agent_id,
                connectors,
                lease,
            } => {
                let mut inv = self.add_connectors.prepare_invoke();
                inv.key(self.key(&["agent", agent_id, "connectors"]))
                    .key(self.key(&["connectors"]))
                    .arg(agent_id)
                    .arg(lease.as_millis() as u64);
                for name in connectors {
                    inv.arg(name);
                }
                let _: i64 = inv.invoke_async(&mut c).await?;
                RegistryReply::Done
            }
            RegistryOp::ListAgents { connector } => {
                let flat: Vec<String> = self
                    .list_agents
                    .key(self.key(&["connector", connector]))
                    .arg(MAX_SLOTS)
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Agents(
                    flat.chunks(1 + usize::from(MAX_SLOTS))
                        .map(|p| AgentRecord {
                            agent_id: p[0].clone(),
                            owners: parse_owners(&p[1..]),
                        })
                        .collect(),
                )
            }
            RegistryOp::GetOwners { agent_id } => {
                let mut inv = self.get_owners.prepare_invoke();
                for slot in 0..MAX_SLOTS {
                    inv.key(self.owner_key(agent_id, slot));
                }
                let v: Vec<String> = inv.invoke_async(&mut c).await?;
                RegistryReply::Owners(parse_owners(&v))
            }
            RegistryOp::AnnounceReplica {
                replica_id,
                mesh_url,
                lease,
            } => {
                let _: i64 = self
                    .announce
                    .key(self.key(&["replicas"]))
                    .key(self.key(&["replica", replica_id, "url"]))
                    .arg(replica_id)
                    .arg(mesh_url)
                    .arg(lease.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Done
            }
            RegistryOp::ListReplicas => {
                let flat: Vec<String> = self
                    .list_replicas
                    .key(self.key(&["replicas"]))
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Replicas(
                    flat.chunks(2)
                        .map(|p| (p[0].clone(), p[1].clone()))
                        .collect(),
                )
            }
            RegistryOp::Sweep => {
                let n: u64 = self
                    .sweep
                    .key(self.key(&["connectors"]))
                    .key(self.key(&["replicas"]))
                    .key(self.key(&["sweep", "cursor"]))
                    .arg(SWEEP_STEP)
                    .invoke_async(&mut c)
                    .await?;
                RegistryReply::Swept(n)
            }
            RegistryOp::Health => {
                let _: String = redis::cmd("PING").query_async(&mut c).await?;
                RegistryReply::Healthy
            }
        })
    }
}

/// What a Redis connection needs besides its URL: the ACL user and password
/// (set on the connection info, overriding the URL's) and TLS material for a
/// `rediss://` URL. `Debug` shows no password and no key.
#[derive(Clone, Debug, Default)]
pub struct RedisAuth {
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<RedisTlsPem>,
}

/// PEM bytes for a `rediss://` connection: the CAs to trust (only these) and
/// an optional client certificate chain and key.
#[derive(Clone)]
pub struct RedisTlsPem {
    pub ca: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTlsPem {
    /// Read the CA bundle and, if given, the client certificate and key;
    /// errors name the file, never its contents.
    pub fn read(
        ca_bundle: &std::path::Path,
        client: Option<(&std::path::Path, &std::path::Path)>,
    ) -> Result<Self, String> {
        let read =
            |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        Ok(RedisTlsPem {
            ca: read(ca_bundle)?,
            client: match client {
                Some((cert, key)) => Some((read(cert)?, read(key)?)),
                None => None,
            },
        })
    }
}

impl std::fmt::Debug for RedisTlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTlsPem")
            .field("ca", &format_args!("{} bytes", self.ca.len()))
            .field(
                "client",
                &self.client.as_ref().map(|_| "(certificate and key)"),
            )
            .finish()
    }
}

/// The redis client for `url` with `auth` applied. Errors show the URL with
/// its password masked.
fn client(url: &str, auth: &RedisAuth) -> Result<redis::Client, String> {
    // redis builds its rustls configuration with the process default
    // provider: make sure that is ring (the binaries install it at start).
    crate::tls::install_provider();
    let shown = redact_url(url);
    let mut info = url
        .into_connection_info()
        .map_err(|e| format!("redis_url `{shown}`: {e}"))?;
    if auth.username.is_some() || auth.password.is_some() {
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &auth.username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &auth.password {
            settings = settings.set_password(password.expose());
        }
        info = info.set_redis_settings(settings);
    }
    match &auth.tls {
        Some(tls) => redis::Client::build_with_tls(
            info,
            TlsCertificates {
                client_tls: tls.client.as_ref().map(|(cert, key)| ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
                root_cert: Some(tls.ca.clone()),
            },
        )
        .map_err(|e| format!("redis_url `{shown}`: TLS: {e}")),
        None => redis::Client::open(info).map_err(|e| format!("redis_url `{shown}`: {e}")),
    }
}

/// A reply that does not have the shape its script returns.
fn malformed(script: &str, what: &str) -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::UnexpectedReturnType,
        "unexpected reply",
        format!("{script} returned {what}"),
    ))
}

fn parse_owner(v: &str, slot: u8) -> Option<Owner> {
    let (replica, epoch) = v.rsplit_once('|')?;
    Some(Owner {
        replica_id: replica.to_string(),
        epoch: Epoch(epoch.parse().ok()?),
        slot,
    })
}

/// Owner values by slot ('' where a slot has none).
fn parse_owners(values: &[String]) -> Vec<Owner> {
    values
        .iter()
        .zip(0u8..)
        .filter_map(|(v, slot)| parse_owner(v, slot))
        .collect()
}
