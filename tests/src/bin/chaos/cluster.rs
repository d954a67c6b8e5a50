//! The cluster under test, one process per lab namespace: Redis, `slapd`,
//! the checked target, three meshed hubs (mTLS mesh, Redis registry, mode
//! `active`) and two agents, each multi-homed (two tunnels, on two of the
//! three hubs) and serving `echo` (the target) and `ldap` (`slapd`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nowconnect_tests::ldap::{Slapd, slapd_path};
use nowconnect_tests::netlab::Lab;
use nowconnect_tests::pki::Ca;
use nowconnect_tests::{AgentProc, Env, HubProc, Proc, Runtime, wait_port};

pub const HUBS: [&str; 3] = ["hub1", "hub2", "hub3"];
pub const AGENTS: [&str; 2] = ["agent1", "agent2"];
pub const NODES: [&str; 8] = [
    "hub1", "hub2", "hub3", "agent1", "agent2", "redis", "ldap", "target",
];
pub const ECHO_PORT: u16 = 7000;
pub const LDAP_PORT: u16 = 1389;
pub const TARGET_PORT: u16 = 7000;
pub const HTTP_PORT: u16 = 8080;
pub const MESH_PORT: u16 = 8443;
pub const REDIS_PORT: u16 = 6379;

/// The timeouts the cluster runs with; the checker's bounds derive from them.
pub const PING_SEC: u64 = 1;
pub const IDLE_SEC: u64 = 4;
pub const LEASE_SEC: u64 = 3;
pub const RENEW_SEC: u64 = 1;
pub const REGISTRY_TIMEOUT_MS: u64 = 500;
pub const BACKOFF_MAX_SEC: u64 = 2;

/// Fields drop in order: the processes go first, the lab network last.
pub struct Cluster {
    pub env: Env,
    pub hubs: Vec<Option<HubProc>>,
    pub agents: Vec<Option<AgentProc>>,
    pub redis: Option<Proc>,
    /// Held for their lifetime (dropping one kills it).
    _slapd: Slapd,
    _target: Proc,
    hub_yaml: Vec<String>,
    agent_yaml: Vec<String>,
    tokens: Vec<String>,
    /// Restarts so far, to name each process's log file apart.
    generation: u32,
    redis_dir: PathBuf,
    runtimes: Vec<Runtime>,
    /// This program's copy (for `chaos target` and `chaos netem`).
    pub own: PathBuf,
    pub lab: Lab,
}

impl Cluster {
    pub fn start(lab: Lab, runtimes: Vec<Runtime>) -> Cluster {
        let env = Env::new();
        let dir = env.path().to_path_buf();
        let ip = |n: &str| lab.node(n).ip;
        // Redis: snapshots only when asked (`SAVE`), so a restart "with
        // data" loads the last one and a restart "without" starts empty.
        let redis_dir = dir.join("redis");
        std::fs::create_dir_all(&redis_dir).unwrap();
        let redis = start_redis(&lab, &redis_dir, &dir, 0);
        // slapd and the target.
        let slapd = Slapd::start_with(
            &dir,
            SocketAddr::new(ip("ldap").into(), 389),
            lab.command("ldap", slapd_path()),
        );
        // The target and the delay daemons run from a copy of this
        // program, so rebuilding it during a long run changes nothing.
        let own = dir.join("chaos-exe");
        std::fs::copy(std::env::current_exe().expect("own path"), &own)
            .expect("copy the chaos program");
        let mut t = lab.command("target", &own);
        t.args([
            "target",
            "--bind",
            &SocketAddr::new(ip("target").into(), TARGET_PORT).to_string(),
        ]);
        let target = Proc::spawn("target", t, &dir);
        target.wait_line("chaos target listening", Duration::from_secs(10));
        // Hubs.
        let ca = Ca::new("chaos-mesh-ca");
        let mut hub_yaml = Vec::new();
        for (i, h) in HUBS.iter().enumerate() {
            let my = ip(h);
            let leaf = ca.issue_for(&dir, &replica(i), &[&replica(i), &my.to_string()]);
            let peers: Vec<String> = HUBS
                .iter()
                .filter(|p| *p != h)
                .map(|p| format!("'wss://{}:{MESH_PORT}/mesh'", ip(p)))
                .collect();
            hub_yaml.push(format!(
                "http:\n  bind: {my}:{HTTP_PORT}\n\
                 log:\n  format: json\n\
                 tunnel:\n  jwt:\n    hs256_secret_file: {secret}\n  ping_interval_sec: {PING_SEC}\n  idle_timeout_sec: {IDLE_SEC}\n\
                 shutdown_grace_sec: 2\n\
                 listeners:\n  - {{ name: echo, bind: '{my}:{ECHO_PORT}', connector: echo }}\n  - {{ name: ldap, bind: '{my}:{LDAP_PORT}', connector: ldap }}\n\
                 ha:\n  enabled: true\n  mode: active\n  replica_id: {rid}\n  redis_url: redis://{redis_ip}:{REDIS_PORT}\n  \
                 lease_sec: {LEASE_SEC}\n  renew_interval_sec: {RENEW_SEC}\n  registry_timeout_ms: {REGISTRY_TIMEOUT_MS}\n  \
                 mesh:\n    listen: {my}:{MESH_PORT}\n    peers: [{peers}]\n    require_mtls: true\n    connect_backoff_max_sec: 1\n    \
                 tls: {{ ca_bundle: {ca}, cert_file: {cert}, key_file: {key} }}\n",
                secret = env.secret_file.display(),
                rid = replica(i),
                redis_ip = ip("redis"),
                peers = peers.join(", "),
                ca = leaf.ca.display(),
                cert = leaf.cert.display(),
                key = leaf.key.display(),
            ));
        }
        // Agents: each lists the hubs from another start, so their first
        // tunnels land on different hubs.
        let mut agent_yaml = Vec::new();
        let mut tokens = Vec::new();
        for (i, a) in AGENTS.iter().enumerate() {
            let order: Vec<String> = (0..HUBS.len())
                .map(|k| {
                    format!(
                        "'ws://{}:{HTTP_PORT}/tunnel'",
                        ip(HUBS[(i + k) % HUBS.len()])
                    )
                })
                .collect();
            agent_yaml.push(format!(
                "agent_id: {a}\nhubs: [{}]\nha_connections: 2\nallow_plaintext_hubs: true\n\
                 reconnect_backoff_max_sec: {BACKOFF_MAX_SEC}\nconnect_timeout_sec: 3\nlog:\n  format: json\n\
                 connectors:\n  - {{ name: echo, target: '{}:{TARGET_PORT}' }}\n  - {{ name: ldap, target: '{}:389' }}\n",
                order.join(", "),
                ip("target"),
                ip("ldap"),
            ));
            tokens.push(env.token(a, Some(vec!["echo".into(), "ldap".into()])));
        }
        let mut c = Cluster {
            lab,
            env,
            hubs: Vec::new(),
            agents: Vec::new(),
            redis: Some(redis),
            _slapd: slapd,
            _target: target,
            hub_yaml,
            agent_yaml,
            tokens,
            generation: 0,
            redis_dir,
            runtimes,
            own,
        };
        for i in 0..HUBS.len() {
            let h = c.spawn_hub(i);
            c.hubs.push(Some(h));
        }
        for i in 0..AGENTS.len() {
            let a = c.spawn_agent(i);
            c.agents.push(Some(a));
        }
        c
    }

    pub fn dir(&self) -> &Path {
        self.env.path()
    }

    pub fn ip(&self, node: &str) -> Ipv4Addr {
        self.lab.node(node).ip
    }

    pub fn echo_addr(&self, hub: usize) -> SocketAddr {
        SocketAddr::new(self.ip(HUBS[hub]).into(), ECHO_PORT)
    }

    pub fn ldap_addr(&self, hub: usize) -> SocketAddr {
        SocketAddr::new(self.ip(HUBS[hub]).into(), LDAP_PORT)
    }

    pub fn redis_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip("redis").into(), REDIS_PORT)
    }

    fn next_name(&mut self, base: &str) -> String {
        self.generation += 1;
        format!("{base}.{}", self.generation)
    }

    fn runtime(&self, i: usize) -> Runtime {
        self.runtimes[i % self.runtimes.len()]
    }

    fn spawn_hub(&mut self, i: usize) -> HubProc {
        let name = self.next_name(HUBS[i]);
        let mut cmd = self.lab.command(HUBS[i], self.runtime(i).bin());
        cmd.env(
            "RUST_LOG",
            "info,nowconnect_shared::hub::clients=debug,nowconnect_shared::hub::mesh_tasks=debug",
        );
        let yaml = self.hub_yaml[i].clone();
        HubProc::start_with(cmd, self.dir(), &name, &yaml)
    }

    fn spawn_agent(&mut self, i: usize) -> AgentProc {
        let name = self.next_name(AGENTS[i]);
        let cmd = self.lab.command(AGENTS[i], self.runtime(i + 1).bin());
        let (yaml, token) = (self.agent_yaml[i].clone(), self.tokens[i].clone());
        AgentProc::start_with(cmd, self.dir(), &name, &yaml, &token)
    }

    /// Start hub `i` again (after its process was killed; its log stays).
    pub fn restart_hub(&mut self, i: usize) {
        if let Some(h) = self.hubs[i].as_mut() {
            h.proc.kill();
        }
        let h = self.spawn_hub(i);
        self.hubs[i] = Some(h);
    }

    /// Start agent `i` again (as [`Cluster::restart_hub`]).
    pub fn restart_agent(&mut self, i: usize) {
        if let Some(a) = self.agents[i].as_mut() {
            a.proc.kill();
        }
        let a = self.spawn_agent(i);
        self.agents[i] = Some(a);
    }

    /// The pid of a hub or agent by node name.
    pub fn pid(&self, node: &str) -> u32 {
        if let Some(i) = HUBS.iter().position(|h| *h == node) {
            return self.hubs[i].as_ref().map_or(0, |h| h.proc.pid());
        }
        if let Some(i) = AGENTS.iter().position(|a| *a == node) {
            return self.agents[i].as_ref().map_or(0, |a| a.proc.pid());
        }
        panic!("no process for `{node}`")
    }

    pub fn kill_redis(&mut self) {
        if let Some(mut r) = self.redis.take() {
            r.kill();
        }
    }

    /// Restart Redis: `keep` loads the snapshot taken just before it was
    /// killed (`SAVE`); otherwise it starts empty.
    pub fn restart_redis(&mut self, keep: bool) {
        if !keep {
            let _ = std::fs::remove_file(self.redis_dir.join("dump.rdb"));
        }
        self.generation += 1;
        let r = start_redis(&self.lab, &self.redis_dir, self.env.path(), self.generation);
        self.redis = Some(r);
    }

    /// Every log line of every hub process this run started (all
    /// generations), by hub index.
    pub fn hub_logs(&self) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return out;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            for (i, h) in HUBS.iter().enumerate() {
                if name.starts_with(&format!("{h}.")) && name.ends_with(".log") {
                    out.push((i, std::fs::read_to_string(e.path()).unwrap_or_default()));
                }
            }
        }
        out
    }
}

pub fn replica(i: usize) -> String {
    format!("hub-{}", i + 1)
}

fn start_redis(lab: &Lab, data: &Path, logs: &Path, generation: u32) -> Proc {
    let ip = lab.node("redis").ip;
    let mut cmd = lab.command("redis", "redis-server");
    cmd.args([
        "--bind",
        &ip.to_string(),
        "--port",
        &REDIS_PORT.to_string(),
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dbfilename",
        "dump.rdb",
        "--dir",
    ])
    .arg(data);
    let p = Proc::spawn(&format!("redis.{generation}"), cmd, logs);
    assert!(
        wait_port(
            SocketAddr::new(ip.into(), REDIS_PORT),
            Duration::from_secs(10)
        ),
        "redis did not listen: {}",
        p.log_text()
    );
    p
}

/// `redis-cli -h … SAVE`: a snapshot for a restart "with data".
pub fn redis_save(addr: SocketAddr) -> bool {
    Command::new("redis-cli")
        .args([
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "SAVE",
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}
