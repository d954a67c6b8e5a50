//! # nowconnect-tests
//!
//! The harness of the end-to-end tests: it starts real `nowconnect` hub and
//! agent processes, a real OpenLDAP `slapd` and real `redis-server`s on
//! ephemeral loopback ports, and kills every process it started when the
//! handle drops (also when a test fails). Every wait is bounded in time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod ldap;
pub mod netlab;

/// The `nowconnect` binary under test: `$NOWCONNECT_BIN` if set, else built
/// once (release) into `target/e2e`. A target directory of its own keeps
/// the binary's feature set from flip-flopping with the test build's.
pub fn bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built("NOWCONNECT_BIN", "nowconnect-tokio", "nowconnect"))
        .clone()
}

/// The `nowconnect-async-std` binary under test (`$NOWCONNECT_ASYNC_STD_BIN`,
/// else built like [`bin`]).
pub fn bin_async_std() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        built(
            "NOWCONNECT_ASYNC_STD_BIN",
            "nowconnect-async-std",
            "nowconnect-async-std",
        )
    })
    .clone()
}

fn built(env: &str, package: &str, name: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf();
    let target = workspace.join("target").join("e2e");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "-q",
            "--release",
            "-p",
            package,
            "--bin",
            name,
            "--target-dir",
        ])
        .arg(&target)
        .current_dir(&workspace)
        .status()
        .expect("run cargo build");
    assert!(st.success(), "building the {name} binary failed");
    let p = target.join("release").join(name);
    assert!(p.exists(), "{} missing after build", p.display());
    p
}

/// The runtime a process under test runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    Tokio,
    AsyncStd,
}

impl Runtime {
    pub fn name(self) -> &'static str {
        match self {
            Runtime::Tokio => "tokio",
            Runtime::AsyncStd => "async-std",
        }
    }

    /// `tokio,async-std` (a benchmark's `--runtimes`) as runtimes.
    pub fn parse_list(list: &str) -> Vec<Runtime> {
        list.split(',')
            .map(|r| match r {
                "tokio" => Runtime::Tokio,
                "async-std" => Runtime::AsyncStd,
                other => panic!("unknown runtime `{other}`: use tokio or async-std"),
            })
            .collect()
    }

    /// The binary that runs a hub or an agent on this runtime.
    pub fn bin(self) -> PathBuf {
        match self {
            Runtime::Tokio => bin(),
            Runtime::AsyncStd => bin_async_std(),
        }
    }
}

impl Runtime {
    /// Executor threads of a `nowconnect` process on this runtime, counted
    /// by thread name in `/proc` (tokio's workers, async-std's executor).
    pub fn executor_threads(self, pid: u32) -> usize {
        let name = match self {
            Runtime::Tokio => "tokio-rt-worker",
            Runtime::AsyncStd => "async-std/runti",
        };
        threads_named(pid, name)
    }
}

/// How many threads of process `pid` are named `name` (as `/proc` shows
/// it: the first 15 bytes).
pub fn threads_named(pid: u32, name: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
                .filter(|c| c.trim() == name)
                .count()
        })
        .unwrap_or(0)
}

/// The runtime of the hubs the hub suites start:
/// `$NOWCONNECT_HUB_RUNTIME` (`tokio`, the default, or `async-std`), so
/// the whole hub suite runs once per runtime (`scripts/test-all.sh` does
/// both). The conformance suite names its runtimes itself.
pub fn hub_runtime() -> Runtime {
    match std::env::var("NOWCONNECT_HUB_RUNTIME").as_deref() {
        Err(_) | Ok("") | Ok("tokio") => Runtime::Tokio,
        Ok("async-std") => Runtime::AsyncStd,
        Ok(other) => panic!("NOWCONNECT_HUB_RUNTIME={other}: use tokio or async-std"),
    }
}

/// A free loopback port for a process to bind later. Drawn from 20000–32767,
/// below Linux's ephemeral range (32768–60999), so the many outbound
/// connections of concurrent tests can never take it between the draw and
/// the bind; never handed out twice by one test process; checked bindable.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap();
    for _ in 0..1000 {
        let port = 20000 + (rand::random::<u16>() % 12768);
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in 20000-32767")
}

pub fn wait_port(addr: SocketAddr, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    pub stdout_lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    log: PathBuf,
}

impl Proc {
    /// Spawn with stderr to a log file and stdout collected line by line.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let err = std::fs::File::create(&log).expect("log file");
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let out = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().unwrap().push(line);
            }
        });
        Proc {
            name: name.into(),
            child: Some(child),
            stdout_lines: lines,
            log,
        }
    }

    /// Wait for a stdout line starting with `prefix`; return it.
    pub fn wait_line(&self, prefix: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(l) = self
                .stdout_lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "{}: no line `{prefix}…` within {within:?}; log:\n{}",
            self.name,
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until the log contains `needle` and return the log. A process
    /// often logs just after the effect a test observes (a closed socket, a
    /// counted metric), so a log check right after an effect must wait.
    pub fn wait_log(&self, needle: &str, within: Duration) -> String {
        let end = Instant::now() + within;
        loop {
            let log = self.log_text();
            if log.contains(needle) {
                return log;
            }
            if Instant::now() >= end {
                panic!(
                    "{}: `{needle}` not logged within {within:?}; log:\n{log}",
                    self.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `within` for exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `RUST_LOG=info` unless the caller chose a filter.
fn default_log_level(cmd: &mut Command) {
    if !cmd.get_envs().any(|(k, _)| k == "RUST_LOG") {
        cmd.env("RUST_LOG", "info");
    }
}

/// A running hub process.
pub struct HubProc {
    pub proc: Proc,
    pub http: SocketAddr,
    /// The `http.ops_bind` port, when the hub has one.
    pub ops: Option<SocketAddr>,
    pub mesh: Option<SocketAddr>,
    pub listeners: Vec<(String, SocketAddr)>,
}

impl HubProc {
    /// A hub on [`hub_runtime`].
    pub fn start(dir: &Path, name: &str, yaml: &str) -> HubProc {
        Self::start_on(hub_runtime(), dir, name, yaml)
    }

    /// A hub on the given runtime (same configuration, CLI and endpoints on
    /// each).
    pub fn start_on(rt: Runtime, dir: &Path, name: &str, yaml: &str) -> HubProc {
        Self::start_with(Command::new(rt.bin()), dir, name, yaml)
    }

    /// A hub run by `cmd` (a runtime's binary, perhaps behind a wrapper
    /// such as `ip netns exec`), with its arguments added here.
    pub fn start_with(mut cmd: Command, dir: &Path, name: &str, yaml: &str) -> HubProc {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        cmd.args(["hub", "--config"]).arg(&cfg);
        default_log_level(&mut cmd);
        let proc = Proc::spawn(name, cmd, dir);
        let line = proc.wait_line("nowconnect hub ready", Duration::from_secs(20));
        // nowconnect hub ready http=127.0.0.1:1234 [ops=…] [mesh=…] listeners=l1=127.0.0.1:389,...
        let mut http = None;
        let mut ops = None;
        let mut mesh = None;
        let mut listeners = Vec::new();
        for part in line.split_whitespace() {
            if let Some(h) = part.strip_prefix("http=") {
                http = Some(h.parse().unwrap());
            } else if let Some(o) = part.strip_prefix("ops=") {
                ops = Some(o.parse().unwrap());
            } else if let Some(m) = part.strip_prefix("mesh=") {
                mesh = Some(m.parse().unwrap());
            } else if let Some(ls) = part.strip_prefix("listeners=") {
                for l in ls.split(',').filter(|s| !s.is_empty()) {
                    let (n, a) = l.split_once('=').unwrap();
                    listeners.push((n.to_string(), a.parse().unwrap()));
                }
            }
        }
        HubProc {
            proc,
            http: http.expect("http address in the ready line"),
            ops,
            mesh,
            listeners,
        }
    }

    pub fn listener(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .expect("listener")
            .1
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http, path)
    }

    /// A GET on the `http.ops_bind` port (`/metrics`, `/readyz`, `/healthz`).
    pub fn ops_get(&self, path: &str) -> (u16, String) {
        http_get(self.ops.expect("the hub has no ops port"), path)
    }

    /// The value of one metric sample, e.g. `nowconnect_agents_connected`
    /// or `nowconnect_tunnel_auth_failures_total{reason="expired"}` (from
    /// the ops port when the hub has one).
    pub fn metric(&self, sample: &str) -> f64 {
        let text = match self.ops {
            Some(_) => self.ops_get("/metrics").1,
            None => self.get("/metrics").1,
        };
        metric_value(&text, sample)
    }

    /// Whether `n` agents are attached to this hub within `within`.
    pub fn agents_attached(&self, n: f64, within: Duration) -> bool {
        eventually(within, || self.metric("nowconnect_agents_connected") == n)
    }

    /// [`Self::metric`] once the hub's links have exported what they
    /// counted: a busy tunnel or mesh link exports its core counters (frames,
    /// protocol errors, duplicates) at most every 250 ms.
    pub fn settled_metric(&self, sample: &str) -> f64 {
        std::thread::sleep(Duration::from_millis(400));
        self.metric(sample)
    }
}

pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == sample).then(|| v.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// A minimal HTTP/1.1 GET (the tests need no HTTP client dependency).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    http_get_over(&mut s, addr, path)
}

/// One `GET path` on a connection already open to `addr` (plain or TLS):
/// (status, body), status 0 when no HTTP answer came. The hub closes after
/// its answer; what arrived before a read error (a TLS peer that closes
/// without close_notify) still counts.
pub fn http_get_over(s: &mut (impl Read + Write), addr: SocketAddr, path: &str) -> (u16, String) {
    http_request_over(s, addr, path, "HTTP/1.1")
}

/// [`http_get_over`] with the HTTP version to ask in: `HTTP/1.0` gets an
/// answer that is not chunked (servers that chunk 1.1 answers, such as
/// Prometheus', then write the body as it is).
pub fn http_request_over(
    s: &mut (impl Read + Write),
    addr: SocketAddr,
    path: &str,
    version: &str,
) -> (u16, String) {
    if write!(
        s,
        "GET {path} {version}\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    // Chunked bodies: good enough to search in; strip nothing.
    (status, body)
}

/// A running agent process.
pub struct AgentProc {
    pub proc: Proc,
    /// Its HTTP endpoint (`http.bind`), as its start line names it
    /// (`nowconnect agent started http=ADDR`).
    pub http: Option<SocketAddr>,
}

impl AgentProc {
    pub fn start(dir: &Path, name: &str, yaml: &str, token: &str) -> AgentProc {
        Self::start_on(Runtime::Tokio, dir, name, yaml, token)
    }

    /// An agent on the given runtime (same configuration and CLI on each).
    pub fn start_on(rt: Runtime, dir: &Path, name: &str, yaml: &str, token: &str) -> AgentProc {
        Self::start_with(Command::new(rt.bin()), dir, name, yaml, token)
    }

    /// An agent run by `cmd` (as [`HubProc::start_with`]).
    pub fn start_with(
        mut cmd: Command,
        dir: &Path,
        name: &str,
        yaml: &str,
        token: &str,
    ) -> AgentProc {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, yaml).unwrap();
        cmd.args(["agent", "--config"])
            .arg(&cfg)
            .env("NC_TOKEN", token);
        default_log_level(&mut cmd);
        let proc = Proc::spawn(name, cmd, dir);
        let line = proc.wait_line("nowconnect agent started", Duration::from_secs(20));
        let http = line
            .split_whitespace()
            .find_map(|p| p.strip_prefix("http="))
            .map(|a| a.parse().expect("http address in the start line"));
        AgentProc { proc, http }
    }

    /// A GET on the agent's HTTP endpoint.
    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.http.expect("the agent has no http.bind"), path)
    }

    /// The value of one sample of the agent's `/metrics` (0 when absent).
    pub fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.get("/metrics").1, sample)
    }
}

/// A temporary directory with a shared HS256 secret.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub secret: String,
    pub secret_file: PathBuf,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("nowconnect-e2e-")
            .tempdir()
            .unwrap();
        let secret: String = (0..32)
            .map(|_| format!("{:02x}", rand::random::<u8>()))
            .collect();
        let secret_file = dir.path().join("jwt.secret");
        write_secret(&secret_file, &secret);
        Env {
            dir,
            secret,
            secret_file,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A token for `agent_id` scoped to `connectors`; `None` scopes it to
    /// every connector name the suites use ([`TEST_SCOPE`]), since hubs
    /// refuse unscoped tokens (see [`Env::unscoped_token`]).
    pub fn token(&self, agent_id: &str, connectors: Option<Vec<String>>) -> String {
        let scope =
            connectors.unwrap_or_else(|| TEST_SCOPE.iter().map(|c| c.to_string()).collect());
        self.mint(agent_id, Some(scope), None, Duration::from_secs(3600))
    }

    /// A token with no `connectors` claim at all.
    pub fn unscoped_token(&self, agent_id: &str) -> String {
        self.mint(agent_id, None, None, Duration::from_secs(3600))
    }

    /// A token of `tenant` for `agent_id`, scoped to `connectors`.
    pub fn tenant_token(&self, tenant: &str, agent_id: &str, connectors: &[&str]) -> String {
        let scope = connectors.iter().map(|c| c.to_string()).collect();
        self.mint(
            agent_id,
            Some(scope),
            Some(tenant),
            Duration::from_secs(3600),
        )
    }

    /// A token as `nowconnect token` mints it: `agent_id` serving exactly
    /// `connectors` in `tenant` (`None`: the default tenant), valid for an hour.
    pub fn token_for_tenant(
        &self,
        agent_id: &str,
        connectors: &[&str],
        tenant: Option<&str>,
    ) -> String {
        let connectors: Vec<String> = connectors.iter().map(|c| c.to_string()).collect();
        nowconnect_tokio::jwt::mint(
            self.secret.as_bytes(),
            agent_id,
            &connectors,
            tenant,
            Duration::from_secs(3600),
        )
        .unwrap()
    }

    /// A token signed with this environment's secret, claims as given
    /// (`connectors: None`: no scope claim; `tenant: None`: no tenant claim).
    pub fn mint(
        &self,
        agent_id: &str,
        connectors: Option<Vec<String>>,
        tenant: Option<&str>,
        ttl: Duration,
    ) -> String {
        let mut claims = nowconnect_tokio::jwt::Claims::for_agent(agent_id, ttl);
        claims.connectors = connectors;
        if let Some(t) = tenant {
            claims.extra.insert("tenant".into(), t.into());
        }
        nowconnect_tokio::jwt::sign_hs256(self.secret.as_bytes(), &claims).unwrap()
    }

    /// A hub config with the given listeners (`name`, `connector`) on free ports.
    pub fn hub_yaml(&self, listeners: &[(&str, &str)], extra: &str) -> String {
        let mut y = format!(
            "http:\n  bind: 127.0.0.1:0\ntunnel:\n  jwt:\n    hs256_secret_file: {}\nshutdown_grace_sec: 3\nlisteners:\n",
            self.secret_file.display()
        );
        for (name, connector) in listeners {
            y += &format!("  - {{ name: {name}, bind: '127.0.0.1:0', connector: {connector} }}\n");
        }
        y + extra
    }

    pub fn agent_yaml(
        &self,
        agent_id: &str,
        hubs: &[SocketAddr],
        connectors: &[(&str, SocketAddr)],
        extra: &str,
    ) -> String {
        let hubs: Vec<String> = hubs.iter().map(|h| format!("'ws://{h}/tunnel'")).collect();
        let mut y = format!(
            "agent_id: {agent_id}\nhubs: [{}]\nreconnect_backoff_max_sec: 2\nconnectors:\n",
            hubs.join(", ")
        );
        for (name, target) in connectors {
            y += &format!("  - {{ name: {name}, target: '{target}' }}\n");
        }
        // Single-homed unless the test asks otherwise: most scenarios pin
        // an agent to one hub to exercise the mesh, the move to another
        // hub, or the drain; multi-homing has tests of its own.
        if !extra.contains("ha_connections") {
            y += "ha_connections: 1\n";
        }
        y + extra
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

/// Wait until `f` holds, polling; false on timeout.
pub fn eventually(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

/// A TCP echo server on loopback (one thread per connection), for tests.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// A TCP proxy on loopback to `to` that passes every chunk on `delay` after
/// it was read, in each direction: a WAN's round trip (2 × `delay`) with no
/// bandwidth limit and no TCP window of its own. The bytes it holds are bounded (1024 chunks of at most
/// 64 KiB per direction), far above any flow window measured with it.
pub fn delay_proxy(to: SocketAddr, delay: Duration) -> SocketAddr {
    Gate::start(to, delay).addr
}

/// A TCP proxy on loopback whose delay can change and which can be shut
/// like a network partition: [`Gate::close`] severs every connection and
/// refuses new ones (accepted, then closed at once) until [`Gate::open`].
/// Each chunk is passed on `delay` after it was read (the delay in force
/// when it was read), as [`delay_proxy`] does.
pub struct Gate {
    pub addr: SocketAddr,
    delay_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    closed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Gate {
    pub fn start(to: SocketAddr, delay: Duration) -> Gate {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let delay_us = Arc::new(AtomicU64::new(delay.as_micros() as u64));
        let closed = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let gate = Gate {
            addr,
            delay_us: delay_us.clone(),
            closed: closed.clone(),
            conns: conns.clone(),
        };
        std::thread::spawn(move || {
            for inbound in l.incoming().map_while(Result::ok) {
                if closed.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let Ok(outbound) = TcpStream::connect(to) else {
                    continue;
                };
                {
                    let mut c = conns.lock().unwrap();
                    c.retain(|s: &TcpStream| s.peer_addr().is_ok());
                    c.push(inbound.try_clone().unwrap());
                    c.push(outbound.try_clone().unwrap());
                }
                for (from, into) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let _ = from.set_nodelay(true);
                    delayed_pump(from, into, delay_us.clone());
                }
            }
        });
        gate
    }

    /// The delay of each direction from now on (a round trip gains twice it).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_us.store(
            delay.as_micros() as u64,
            std::sync::atomic::Ordering::SeqCst,
        );
    }

    /// Sever every connection through the gate and refuse new ones.
    pub fn close(&self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Pass new connections again.
    pub fn open(&self) {
        self.closed
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Read `from` on one thread, write `into` on another, each chunk `delay_us`
/// (read when the chunk arrives) after it was read; an end of stream is
/// passed on (after the delay too).
fn delayed_pump(
    mut from: TcpStream,
    mut into: TcpStream,
    delay_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(1024);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let delay = Duration::from_micros(delay_us.load(std::sync::atomic::Ordering::SeqCst));
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
                || n == 0
            {
                return;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if chunk.is_empty() || into.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = into.shutdown(std::net::Shutdown::Write);
    });
}

/// A target for reset tests. A connection whose first byte is `R` gets
/// 64 KiB and then a TCP reset (`SO_LINGER` 0). Any other connection is read
/// until it ends, and how it ended is sent on the channel: `"eof"` or
/// `"reset"` (a read error), once the first byte arrived and `"started"` was
/// sent.
pub fn reset_lab() -> (SocketAddr, std::sync::mpsc::Receiver<&'static str>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).is_err() {
                    return;
                }
                if first[0] == b'R' {
                    let _ = s.write_all(&vec![7u8; 64 * 1024]);
                    std::thread::sleep(Duration::from_millis(100));
                    return reset_close(s);
                }
                let _ = tx.send("started");
                let mut buf = [0u8; 16 * 1024];
                let end = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break "eof",
                        Ok(_) => {}
                        Err(_) => break "reset",
                    }
                };
                let _ = tx.send(end);
            });
        }
    });
    (addr, rx)
}

/// Close a TCP connection with a reset (`SO_LINGER` 0).
/// One echo of `msg` through `addr`: whether it came back whole.
pub fn echo_once(addr: SocketAddr, msg: &[u8]) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.write_all(msg).is_ok() && s.read_exact(&mut got).is_ok() && got == msg
}

/// Connect to `to` from the loopback address `127.0.0.<last>` (every
/// `127/8` address is local on Linux), so one test can be several clients.
pub fn connect_from(last: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::from(([127, 0, 0, last], 0)).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(10))?;
    Ok(TcpStream::from(s))
}

/// Open `n` connections to `to` from `127.0.0.<last>` at most 80 a second
/// (far under a listener's default rate per client), each sending one
/// byte at once (so a listener's first-byte timeout does not close it).
/// Connections the hub closes at accept are among those returned; the hub's
/// refusal counters tell them apart.
pub fn open_paced(last: u8, to: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let started = Instant::now();
        for _ in 0..40.min(n - out.len()) {
            let mut s = connect_from(last, to).expect("connect");
            let _ = s.write_all(b"\x00");
            out.push(s);
        }
        if out.len() < n {
            std::thread::sleep(Duration::from_millis(500).saturating_sub(started.elapsed()));
        }
    }
    out
}

pub fn reset_close(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
}

/// Read until the connection ends: the bytes read and how it ended (`None`
/// for an end of stream, else the error's kind).
pub fn read_to_end_or_error(s: &mut TcpStream) -> (usize, Option<std::io::ErrorKind>) {
    let mut total = 0;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (total, None),
            Ok(n) => total += n,
            Err(e) => return (total, Some(e.kind())),
        }
    }
}

/// A server that writes an endless stream to every connection.
pub fn source_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let buf = vec![7u8; 64 * 1024];
                while s.write_all(&buf).is_ok() {}
            });
        }
    });
    addr
}

/// `flows` concurrent echoes of `size` random bytes each through `addr`,
/// every one compared by SHA-256 with what was sent; `what` names a flow in
/// the failure.
pub fn concurrent_echoes_intact(addr: SocketAddr, flows: usize, size: usize, what: &str) {
    let handles: Vec<_> = (0..flows)
        .map(|_| {
            let data = std::sync::Arc::new(random_bytes(size));
            let want = sha256(&data);
            std::thread::spawn(move || (echo_roundtrip(addr, data), want))
        })
        .collect();
    for h in handles {
        let (got, want) = h.join().unwrap();
        assert_eq!(got.expect("flow failed"), want, "{what} was corrupted");
    }
}

/// Send `data` through `addr` (an echo path) while reading the echo
/// concurrently; returns the SHA-256 of what came back.
pub fn echo_roundtrip(
    addr: SocketAddr,
    data: std::sync::Arc<Vec<u8>>,
) -> std::io::Result<[u8; 32]> {
    echo_roundtrip_within(addr, data, Duration::from_secs(60))
}

/// [`echo_roundtrip`] giving up when no byte comes back for `quiet`: for
/// loops that retry until a failover completes, so that one connection
/// caught in the failover cannot hold the loop past its deadline.
pub fn echo_roundtrip_within(
    addr: SocketAddr,
    data: std::sync::Arc<Vec<u8>>,
    quiet: Duration,
) -> std::io::Result<[u8; 32]> {
    use sha2::Digest;
    let s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(quiet))?;
    let mut w = s.try_clone()?;
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for chunk in data.chunks(256 * 1024) {
            w.write_all(chunk)?;
        }
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut r = s;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    writer.join().expect("writer thread")?;
    Ok(h.finalize().into())
}

/// After a hub died: echo `data` through `addr`, a fresh connection per
/// attempt, until it comes back whole, within `budget`; the time that took.
/// An attempt may be refused or reset while the cluster recovers, but it
/// must end: a connection that goes 3 s without a byte or a close is a
/// defect, and so is no recovery within `budget` (`Err` says which).
pub fn echo_until_recovered(
    addr: SocketAddr,
    data: std::sync::Arc<Vec<u8>>,
    budget: Duration,
) -> Result<Duration, String> {
    let start = std::time::Instant::now();
    let want = sha256(&data);
    while start.elapsed() < budget {
        let at = start.elapsed();
        match echo_roundtrip_within(addr, data.clone(), Duration::from_secs(3)) {
            Ok(h) if h == want => return Ok(start.elapsed()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "a connection made {at:?} in went 3 s with neither data nor a close"
                ));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("no whole echo within {budget:?}"))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::Rng::fill(&mut rand::rng(), &mut v[..]);
    v
}

/// A real `redis-server` on an ephemeral loopback port, no persistence;
/// plain TCP ([`RedisProc::start`]) or TLS only with ACL users
/// ([`RedisProc::start_tls`]).
pub struct RedisProc {
    pub proc: Proc,
    pub port: u16,
    dir: PathBuf,
    /// The TLS and ACL arguments of a TLS server (kept for a restart).
    tls_args: Vec<String>,
}

/// How a TLS `redis-server` is set up ([`RedisProc::start_tls`]).
pub struct RedisTlsSetup<'a> {
    /// Issues the server's certificate (for `localhost` and `127.0.0.1`);
    /// client certificates are checked against it.
    pub ca: &'a pki::Ca,
    /// `--tls-auth-clients`: `yes` (a client certificate is required),
    /// `optional` (checked when presented) or `no`.
    pub auth_clients: &'a str,
    /// The ACL user the hub uses and its password. The user may run every
    /// command but the dangerous ones, on keys under `nowconnect:` only;
    /// the `default` user is off.
    pub user: &'a str,
    pub password: &'a str,
}

/// Write a secret file readable by its owner only (mode 0600), as the
/// hub expects key files to be.
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// `redis-cli -u url args…` (a plain `redis://` server): its output, trimmed.
pub fn redis_cli(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .arg("-u")
        .arg(url)
        .args(args)
        .output()
        .expect("redis-cli");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `INFO section` of a plain `redis://` server as field → value (the
/// numeric fields).
pub fn redis_info(url: &str, section: &str) -> std::collections::BTreeMap<String, f64> {
    redis_cli(url, &["INFO", section])
        .lines()
        .filter_map(|l| {
            let (k, v) = l.trim().split_once(':')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// The Redis server's CPU seconds (user + system) so far.
pub fn redis_cpu(url: &str) -> f64 {
    let i = redis_info(url, "cpu");
    i["used_cpu_user"] + i["used_cpu_sys"]
}

impl RedisProc {
    pub fn start(dir: &Path) -> RedisProc {
        Self::start_on(dir, free_port())
    }

    pub fn start_on(dir: &Path, port: u16) -> RedisProc {
        Self::spawn(dir, port, Vec::new())
    }

    /// A TLS-only `redis-server` (`--port 0`, `--tls-port`) with a server
    /// certificate from `setup.ca`, the `default` user disabled and one ACL
    /// user (written to an `aclfile`).
    pub fn start_tls(dir: &Path, setup: &RedisTlsSetup) -> RedisProc {
        let port = free_port();
        let leaf = setup.ca.issue(dir, &format!("redis-{port}"));
        let acl = dir.join(format!("redis-{port}.acl"));
        std::fs::write(
            &acl,
            format!(
                "user default off\nuser {} on >{} ~nowconnect:* resetchannels +@all -@dangerous\n",
                setup.user, setup.password
            ),
        )
        .unwrap();
        let path = |p: &Path| p.display().to_string();
        let args = vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string(),
            "--tls-cert-file".into(),
            path(&leaf.cert),
            "--tls-key-file".into(),
            path(&leaf.key),
            "--tls-ca-cert-file".into(),
            path(&leaf.ca),
            "--tls-auth-clients".into(),
            setup.auth_clients.into(),
            "--aclfile".into(),
            path(&acl),
        ];
        Self::spawn(dir, port, args)
    }

    fn spawn(dir: &Path, port: u16, tls_args: Vec<String>) -> RedisProc {
        let mut cmd = Command::new("redis-server");
        if tls_args.is_empty() {
            cmd.args(["--port", &port.to_string()]);
        }
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(&tls_args)
            .current_dir(dir);
        let proc = Proc::spawn(&format!("redis-{port}"), cmd, dir);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        assert!(
            wait_port(addr, Duration::from_secs(10)),
            "redis-server did not listen: {}",
            proc.log_text()
        );
        RedisProc {
            proc,
            port,
            dir: dir.to_path_buf(),
            tls_args,
        }
    }

    /// `redis://127.0.0.1:PORT/0`, or `rediss://…` for a TLS server (no
    /// credentials in either).
    pub fn url(&self) -> String {
        let scheme = if self.tls_args.is_empty() {
            "redis"
        } else {
            "rediss"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// SIGKILL the server (a crash, not a shutdown).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Start again on the same port with the same settings (empty: no
    /// persistence).
    pub fn restart(&mut self) {
        self.proc.kill();
        *self = RedisProc::spawn(&self.dir.clone(), self.port, self.tls_args.clone());
    }
}

/// Every connector name the suites announce: what [`Env::token`] scopes a
/// token to when a test names no connectors.
pub const TEST_SCOPE: &[&str] = &[
    "a", "b", "c", "dead", "echo", "idle", "ldap", "local", "other", "pg", "silent", "sink",
    "source", "svc",
];

/// Test certificates made with rcgen: a CA and leaf certificates valid for
/// `localhost` and `127.0.0.1`, usable as TLS server and client.
pub mod pki {
    use std::path::{Path, PathBuf};

    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };

    pub struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pub pem: String,
    }

    pub struct Leaf {
        pub ca: PathBuf,
        pub cert: PathBuf,
        pub key: PathBuf,
    }

    impl Ca {
        pub fn new(name: &str) -> Ca {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(DnType::CommonName, name);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = p.self_signed(&key).unwrap();
            Ca {
                pem: cert.pem(),
                issuer: Issuer::new(p, key),
            }
        }

        /// Write `ca-<id>.pem`, `<name>.crt` and `<name>.key` into `dir`: a
        /// leaf for `localhost`, `127.0.0.1` and `name` (a mesh hub's
        /// certificate names its replica id).
        pub fn issue(&self, dir: &Path, name: &str) -> Leaf {
            self.issue_for(dir, name, &[name])
        }

        /// [`Ca::issue`] with `names` as the extra subject alternative names.
        pub fn issue_for(&self, dir: &Path, name: &str, names: &[&str]) -> Leaf {
            let key = KeyPair::generate().unwrap();
            let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
            sans.extend(names.iter().map(|n| n.to_string()));
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = p.signed_by(&key, &self.issuer).unwrap();
            let leaf = Leaf {
                ca: dir.join(format!("ca-for-{name}.pem")),
                cert: dir.join(format!("{name}.crt")),
                key: dir.join(format!("{name}.key")),
            };
            std::fs::write(&leaf.ca, &self.pem).unwrap();
            std::fs::write(&leaf.cert, cert.pem()).unwrap();
            crate::write_secret(&leaf.key, key.serialize_pem());
            leaf
        }
    }
}

/// A TCP proxy on loopback whose connections can be cut at once, to sever a
/// link between two processes without killing either.
pub struct Proxy {
    pub addr: SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(to: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c2 = conns.clone();
        std::thread::spawn(move || {
            for inbound in l.incoming().map_while(Result::ok) {
                let Ok(outbound) = TcpStream::connect(to) else {
                    continue;
                };
                {
                    let mut c = c2.lock().unwrap();
                    c.push(inbound.try_clone().unwrap());
                    c.push(outbound.try_clone().unwrap());
                }
                for (mut r, mut w) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, conns }
    }

    /// Close every connection through the proxy (new ones are still proxied).
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// A server that greets every connection with `banner` + "\n", then echoes.
pub fn banner_server(banner: &str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let banner = format!("{banner}\n");
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            let banner = banner.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                if w.write_all(banner.as_bytes()).is_err() {
                    return;
                }
                let mut r = s;
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
    addr
}

/// The `epoch=` values of the log lines containing `marker`, in order.
pub fn epochs_in_log(log: &str, marker: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains(marker))
        .filter_map(|l| {
            l.split("epoch=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

// ---- HA clusters: two hubs, Redis, mTLS mesh

/// A hub of an HA cluster: Redis registry, mTLS mesh on `mesh_port`, the
/// peers' mesh ports, an `ldap` listener.
pub fn mesh_hub_yaml(
    env: &Env,
    replica: &str,
    mode: &str,
    redis: &RedisProc,
    mesh_port: u16,
    peers: &[u16],
    leaf: &pki::Leaf,
) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| format!("'wss://127.0.0.1:{p}/mesh'"))
        .collect();
    env.hub_yaml(
        &[("ldap", "ldap")],
        &format!(
            "ha:\n  enabled: true\n  mode: {mode}\n  replica_id: {replica}\n  redis_url: {}\n  lease_sec: 3\n  renew_interval_sec: 1\n  registry_timeout_ms: 300\n  mesh:\n    listen: 127.0.0.1:{mesh_port}\n    peers: [{}]\n    require_mtls: true\n    connect_backoff_max_sec: 1\n    tls: {{ ca_bundle: {}, cert_file: {}, key_file: {} }}\n",
            redis.url(),
            peers.join(", "),
            leaf.ca.display(),
            leaf.cert.display(),
            leaf.key.display()
        ),
    )
}

/// Two hubs meshed with each other (each lists the other as a peer);
/// returns them with their mesh ports.
pub fn meshed_pair(
    env: &Env,
    mode: &str,
    redis: &RedisProc,
    ca: &pki::Ca,
) -> (HubProc, HubProc, u16, u16) {
    meshed_pair_on([Runtime::Tokio; 2], env, mode, redis, ca)
}

/// [`meshed_pair`] with hub-a and hub-b on the given runtimes.
pub fn meshed_pair_on(
    rts: [Runtime; 2],
    env: &Env,
    mode: &str,
    redis: &RedisProc,
    ca: &pki::Ca,
) -> (HubProc, HubProc, u16, u16) {
    meshed_pair_with(rts, env, mode, redis, ca, &|y| y)
}

/// [`meshed_pair_on`] with each hub's configuration passed through `edit`.
pub fn meshed_pair_with(
    rts: [Runtime; 2],
    env: &Env,
    mode: &str,
    redis: &RedisProc,
    ca: &pki::Ca,
    edit: &dyn Fn(String) -> String,
) -> (HubProc, HubProc, u16, u16) {
    let (pa, pb) = (free_port(), free_port());
    let start = |rt: Runtime, name: &str, port: u16, peer: u16| {
        let leaf = ca.issue(env.path(), name);
        let yaml = edit(mesh_hub_yaml(env, name, mode, redis, port, &[peer], &leaf));
        HubProc::start_on(rt, env.path(), name, &yaml)
    };
    let a = start(rts[0], "hub-a", pa, pb);
    let b = start(rts[1], "hub-b", pb, pa);
    (a, b, pa, pb)
}

/// Whether a meshed pair is up: hub-a holds the agent and each hub has an
/// established link to the other.
pub fn pair_ready(a: &HubProc, b: &HubProc) -> bool {
    a.metric("nowconnect_agents_connected") == 1.0
        && mesh_established(a, "hub-b")
        && mesh_established(b, "hub-a")
}

/// Whether `h` has an established mesh link to replica `peer` (its series
/// are labelled by the peer's replica id).
pub fn mesh_established(h: &HubProc, peer: &str) -> bool {
    h.metric(&format!(
        "nowconnect_mesh_links{{peer=\"{peer}\",state=\"established\"}}"
    )) == 1.0
}

/// Whether `h`'s own (outbound) link to the hub whose mesh port is
/// `peer_port` has been established, from its log: the series tell only
/// whether some link to a peer is.
pub fn dialed_link_up(h: &HubProc, peer_port: u16) -> bool {
    let link = format!("link=wss://127.0.0.1:{peer_port}/mesh");
    h.proc
        .log_text()
        .lines()
        .any(|l| l.contains("mesh link established") && l.contains(&link))
}

/// Every `peer` label value among `h`'s exported series (mesh link state,
/// queue, inflight, backpressure, bytes).
pub fn peer_labels(h: &HubProc) -> std::collections::BTreeSet<String> {
    let text = match h.ops {
        Some(_) => h.ops_get("/metrics").1,
        None => h.get("/metrics").1,
    };
    peer_labels_in(&text)
}

/// The `peer` label values of the samples in a `/metrics` text.
pub fn peer_labels_in(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let start = l.find("peer=\"")? + "peer=\"".len();
            let len = l[start..].find('"')?;
            Some(l[start..start + len].to_string())
        })
        .collect()
}

// ---- Benchmarks: bulk transfers, metric families, process memory

/// A TCP sink on loopback: reads each connection until EOF, then answers
/// with the byte count (8 bytes, LE).
pub fn sink_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => n += k as u64,
                    }
                }
                let _ = s.write_all(&n.to_le_bytes());
            });
        }
    });
    addr
}

/// Send `bytes` to a [`sink_server`] (directly or through a tunnel) on one
/// connection and wait for its count: the flow's throughput in bytes/s.
/// Panics if the path fails or the sink saw another count.
pub fn bulk_throughput(addr: SocketAddr, bytes: u64) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let buf = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).unwrap();
        left -= k as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(
        u64::from_le_bytes(got),
        bytes,
        "sink saw a different byte count"
    );
    bytes as f64 / secs
}

/// The sum of every sample of the metric family `name` (any labels) whose
/// label set contains `label` (e.g. `reason="queue_full"`), or of all of
/// them when `label` is `None`; 0 when there is none. Unlike
/// [`metric_value`] it does not depend on how the other labels are spelled.
pub fn metric_sum(text: &str, name: &str, label: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name && label.is_none_or(|want| labels.contains(want)))
                .then(|| v.parse::<f64>().ok())?
        })
        .sum()
}

/// CPU seconds (user + system) a process has used so far, from
/// `/proc/<pid>/stat` (in USER_HZ, 100 per second on Linux).
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`, ...); 0 when
/// the process or the field is gone.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let v = l.strip_prefix(field)?.strip_prefix(':')?;
            v.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or(0)
}

/// A TCP proxy on loopback to `to` for bulk transfers across a simulated
/// WAN: like [`delay_proxy`], every byte is passed on `delay` after it was
/// read (a round trip of 2 × `delay`), but what a direction holds is bounded
/// by bytes (`max_held`), not by read calls: the bytes read within one
/// millisecond travel together (each at most 1 ms early), so a fast stream
/// read in small pieces is not capped at a number of pieces per delay.
pub fn wan_proxy(to: SocketAddr, delay: Duration, max_held: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for inbound in l.incoming().map_while(Result::ok) {
            let Ok(outbound) = TcpStream::connect(to) else {
                continue;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let back = (outbound.try_clone().unwrap(), inbound.try_clone().unwrap());
            held_pipe(inbound, outbound, delay, max_held);
            held_pipe(back.0, back.1, delay, max_held);
        }
    });
    addr
}

/// What one direction of a [`wan_proxy`] holds: chunks with the instant
/// each is due, their total size, and whether the reader saw the end.
#[derive(Default)]
struct Held {
    chunks: std::collections::VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
    eof: bool,
}

fn held_pipe(mut from: TcpStream, mut into: TcpStream, delay: Duration, max_held: usize) {
    let state = std::sync::Arc::new((
        std::sync::Mutex::new(Held::default()),
        std::sync::Condvar::new(),
    ));
    let reader_state = state.clone();
    std::thread::spawn(move || {
        let (lock, cv) = &*reader_state;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = from.read(&mut buf).unwrap_or(0);
            let mut h = cv
                .wait_while(lock.lock().unwrap(), |h| h.bytes >= max_held)
                .unwrap();
            if n == 0 {
                h.eof = true;
                cv.notify_all();
                return;
            }
            let due = Instant::now() + delay;
            match h.chunks.back_mut() {
                Some((d, c)) if due < *d + Duration::from_millis(1) => {
                    c.extend_from_slice(&buf[..n])
                }
                _ => h.chunks.push_back((due, buf[..n].to_vec())),
            }
            h.bytes += n;
            cv.notify_all();
        }
    });
    std::thread::spawn(move || {
        let (lock, cv) = &*state;
        loop {
            let due = {
                let h = cv
                    .wait_while(lock.lock().unwrap(), |h| h.chunks.is_empty() && !h.eof)
                    .unwrap();
                match h.chunks.front() {
                    Some((due, _)) => *due,
                    None => break,
                }
            };
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let chunk = {
                let mut h = lock.lock().unwrap();
                let (_, c) = h.chunks.pop_front().expect("only this thread takes");
                h.bytes -= c.len();
                cv.notify_all();
                c
            };
            if into.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = into.shutdown(std::net::Shutdown::Write);
    });
}
