//! The `nowconnect` binary: `hub`, `agent`, `token`, `quickstart`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nowconnect_tokio::config::{AgentConfig, HubConfig, Service};
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "nowconnect",
    version,
    about = "Reach TCP services inside private networks through outbound tunnels"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a cloud hub.
    Hub {
        /// Hub configuration (cloud.yaml).
        #[arg(long, env = "NC_CONFIG")]
        config: PathBuf,
    },
    /// Run a premise agent.
    Agent {
        /// Agent configuration (premise.yaml).
        #[arg(long, env = "NC_CONFIG")]
        config: PathBuf,
    },
    #[command(flatten)]
    Tool(Tool),
}

/// The subcommands that are not a long-running service.
#[derive(Subcommand)]
enum Tool {
    /// Print a signed HS256 token for an agent.
    Token {
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        agent_id: String,
        /// Comma-separated connectors the agent may announce (required: the
        /// agent may serve only what its token names).
        #[arg(long, value_delimiter = ',', required = true)]
        connectors: Vec<String>,
        /// The agent's tenant (letters, digits, `.`, `_`, `-`; at most 64);
        /// omitted: no tenant claim, the default tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime, e.g. 15m, 12h, 30d.
        #[arg(long, default_value = "15m")]
        ttl: humantime::Duration,
    },
    /// Load a listener and compare with a direct target (LDAP or raw TCP).
    #[command(subcommand)]
    Perf(Box<PerfCmd>),
    /// Run a hub, an agent and a demo target on loopback, nothing to configure.
    Quickstart {
        /// Run the self-check, then exit (0 when the tunnel works).
        #[arg(long)]
        check: bool,
        /// Port of the demo listener (0: any free port).
        #[arg(long, default_value_t = 0)]
        listen_port: u16,
    },
}

#[derive(Subcommand)]
enum PerfCmd {
    /// Bind + search through an LDAP listener (ldap3 client); exit code 3
    /// when an assertion (--p99-max, --error-budget) fails.
    Ldap {
        /// The listener under test, e.g. ldap://127.0.0.1:389.
        #[arg(long)]
        url: String,
        /// The same directory reached directly, measured in the same run.
        #[arg(long)]
        direct: Option<String>,
        #[arg(long)]
        bind_dn: String,
        /// The bind password (prefer --password-file or NC_PERF_PASSWORD).
        #[arg(long, env = "NC_PERF_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// Search base.
        #[arg(long)]
        base: String,
        #[arg(long, default_value = "(objectClass=*)")]
        filter: String,
        /// Concurrent clients, one connection each.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// How long to run (ignored with --requests).
        #[arg(long, default_value = "10s")]
        duration: humantime::Duration,
        /// Stop after this many requests instead.
        #[arg(long)]
        requests: Option<u64>,
        /// Target requests per second over all clients (open loop); default:
        /// as fast as the clients go.
        #[arg(long)]
        rate: Option<f64>,
        /// Fail (exit 3) when p99 latency is above this, e.g. 5ms.
        #[arg(long)]
        p99_max: Option<humantime::Duration>,
        /// Fail (exit 3) when more than this percentage of requests fail.
        #[arg(long)]
        error_budget: Option<f64>,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Latency-by-percentile plot.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// No progress lines on stderr.
        #[arg(long)]
        quiet: bool,
    },
    /// Throughput (one flow and N flows), echo latency and connection rate
    /// through a listener in front of an echo service, and the same against
    /// the echo service directly in the same run; with --open-target, open
    /// latency (a client's connect to its first byte at the target).
    Tcp {
        /// The listener under test.
        #[arg(long)]
        through: std::net::SocketAddr,
        /// The echo service itself.
        #[arg(long)]
        direct: Option<std::net::SocketAddr>,
        /// Bytes per throughput run (split over the flows in the N-flow run).
        #[arg(long, default_value_t = 256 * 1024 * 1024)]
        bytes: u64,
        #[arg(long, default_value_t = 8)]
        flows: usize,
        /// Sequential echo round trips for the latency figures.
        #[arg(long, default_value_t = 5000)]
        echoes: u64,
        #[arg(long, default_value_t = 1024)]
        echo_size: usize,
        /// New connections per second to open (0: skip the rate test).
        #[arg(long, default_value_t = 0.0)]
        conn_rate: f64,
        #[arg(long, default_value = "5s")]
        conn_duration: humantime::Duration,
        /// Also measure open latency: perf listens here itself and is the
        /// target. A connector's target must point at this address, and
        /// --open-through be the listener in front of that connector (not
        /// --through: its connector's target is the echo service). Each
        /// open connects to --open-through and sends an 8-byte id; its
        /// latency runs from just before the connect to the id read here.
        /// With --direct, the same opens straight to this address are the
        /// baseline.
        #[arg(long, requires = "open_through")]
        open_target: Option<std::net::SocketAddr>,
        /// The listener whose connector's target is --open-target.
        #[arg(long, requires = "open_target")]
        open_through: Option<std::net::SocketAddr>,
        /// Opens per side (through, and direct with --direct).
        #[arg(long, default_value_t = 1000)]
        opens: u64,
        /// Opens per second (open loop: each open starts when due).
        #[arg(long, default_value_t = 200.0)]
        open_rate: f64,
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        markdown: Option<PathBuf>,
        #[arg(long)]
        svg: Option<PathBuf>,
    },
    /// Hold N real agent tunnels in one process (distinct ids, a token each
    /// minted with the hub's HS256 secret); timestamps every hub dial and
    /// tunnel for connect-time, re-homing and backoff figures.
    Agents {
        /// A hub tunnel URL (repeat: each agent's hub list, in order).
        #[arg(long = "hub", required = true)]
        hubs: Vec<String>,
        /// Agents to hold.
        #[arg(long)]
        count: usize,
        /// Agent ids are this prefix and the agent's index.
        #[arg(long, default_value = "perf-agent-")]
        id_prefix: String,
        /// The connector each agent serves (and its token names).
        #[arg(long, default_value = "perf")]
        connector: String,
        /// The connector's target, host:port.
        #[arg(long)]
        target: String,
        /// The hub's HS256 secret file (`tunnel.jwt.hs256_secret_file`).
        #[arg(long)]
        jwt_key: PathBuf,
        /// The agents' tenant claim (none: the default tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime of each token.
        #[arg(long, default_value = "12h")]
        token_ttl: humantime::Duration,
        /// Agents started per second.
        #[arg(long, default_value_t = 500.0)]
        ramp: f64,
        /// How long to hold the agents once all were started, then exit
        /// (SIGTERM or SIGINT: at once, the report written).
        #[arg(long, default_value = "60s")]
        duration: humantime::Duration,
        /// Tunnels per agent (`ha_connections`; default: the agent's own
        /// default, 2 when two or more hubs are listed).
        #[arg(long)]
        ha_connections: Option<u8>,
        /// `reconnect_backoff_max_sec` of every agent (default: the agent's).
        #[arg(long)]
        backoff_max_sec: Option<u64>,
        /// Full report: samples over time and every agent's events.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Progress on stderr at most this often (when something changed).
        #[arg(long, default_value = "1s")]
        progress: humantime::Duration,
    },
}

async fn perf(cmd: PerfCmd) -> Result<ExitCode, String> {
    use nowconnect_tokio::perf;
    match cmd {
        PerfCmd::Ldap {
            url,
            direct,
            bind_dn,
            password,
            password_file,
            base,
            filter,
            concurrency,
            duration,
            requests,
            rate,
            p99_max,
            error_budget,
            json,
            markdown,
            svg,
            quiet,
        } => {
            let password = match (password, password_file) {
                (_, Some(f)) => std::fs::read_to_string(&f)
                    .map_err(|e| format!("--password-file {}: {e}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
                (Some(p), None) => p,
                (None, None) => {
                    return Err("give the bind password with --password-file, NC_PERF_PASSWORD or --password".into());
                }
            };
            if concurrency == 0 {
                return Err("--concurrency must be at least 1".into());
            }
            if let Some(b) = error_budget
                && !(0.0..=100.0).contains(&b)
            {
                return Err(format!(
                    "--error-budget {b}: a percentage between 0 and 100"
                ));
            }
            let args = perf::LdapArgs {
                url,
                direct,
                bind_dn,
                password,
                base,
                filter,
                concurrency,
                duration: duration.into(),
                requests,
                rate,
                p99_max: p99_max.map(Into::into),
                error_budget: error_budget.map(|b| b / 100.0),
                json,
                markdown,
                svg,
                quiet,
            };
            let r = perf::perf_ldap(&args).await?;
            let l = &r.through.latency;
            println!(
                "through {}: {} requests, {} errors, {:.0} req/s, p50 {} µs, p99 {} µs, max {} µs",
                r.through.url,
                r.through.requests,
                r.through.errors,
                r.through.throughput_rps,
                l.p50_us,
                l.p99_us,
                l.max_us
            );
            if let Some(d) = &r.direct {
                println!(
                    "direct {}: {} requests, {} errors, {:.0} req/s, p50 {} µs, p99 {} µs; through/direct {:.2}x",
                    d.url,
                    d.requests,
                    d.errors,
                    d.throughput_rps,
                    d.latency.p50_us,
                    d.latency.p99_us,
                    r.throughput_ratio.unwrap_or(0.0)
                );
            }
            for a in &r.assertions {
                println!(
                    "assertion {}: {} (limit {}): {}",
                    a.name,
                    a.measured,
                    a.limit,
                    if a.passed { "pass" } else { "FAIL" }
                );
            }
            Ok(if r.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(perf::EXIT_ASSERTION)
            })
        }
        PerfCmd::Tcp {
            through,
            direct,
            bytes,
            flows,
            echoes,
            echo_size,
            conn_rate,
            conn_duration,
            open_target,
            open_through,
            opens,
            open_rate,
            json,
            markdown,
            svg,
        } => {
            if flows == 0 || echo_size == 0 || bytes == 0 {
                return Err("--flows, --echo-size and --bytes must be at least 1".into());
            }
            if opens == 0 || open_rate.is_nan() || open_rate <= 0.0 {
                return Err("--opens must be at least 1 and --open-rate above 0".into());
            }
            let open = open_target
                .zip(open_through)
                .map(|(target, through)| perf::OpenArgs {
                    target,
                    through,
                    opens,
                    rate: open_rate,
                    timeout: Duration::from_secs(10),
                });
            let args = perf::TcpArgs {
                through,
                direct,
                bytes,
                flows,
                echoes,
                echo_size,
                conn_rate,
                conn_duration: conn_duration.into(),
                open,
                json,
                markdown,
                svg,
            };
            let r = perf::perf_tcp(&args).await?;
            let t = &r.through;
            println!(
                "through {}: 1 flow {:.0} MiB/s, {} flows {:.0} MiB/s, echo p50 {} µs p99 {} µs, {:.0} conn/s ({} errors)",
                t.addr,
                t.one_flow_mib_s,
                r.flows,
                t.n_flows_mib_s,
                t.echo.p50_us,
                t.echo.p99_us,
                t.conn_rate_achieved,
                t.conn_errors
            );
            if let Some(d) = &r.direct {
                println!(
                    "direct {}: 1 flow {:.0} MiB/s, {} flows {:.0} MiB/s, echo p50 {} µs p99 {} µs, {:.0} conn/s ({} errors)",
                    d.addr,
                    d.one_flow_mib_s,
                    r.flows,
                    d.n_flows_mib_s,
                    d.echo.p50_us,
                    d.echo.p99_us,
                    d.conn_rate_achieved,
                    d.conn_errors
                );
                println!(
                    "through/direct: 1 flow {:.3}x, {} flows {:.3}x; added echo p50 {} µs, p99 {} µs",
                    r.one_flow_ratio.unwrap_or(0.0),
                    r.flows,
                    r.n_flows_ratio.unwrap_or(0.0),
                    r.added_echo_p50_us.unwrap_or(0),
                    r.added_echo_p99_us.unwrap_or(0)
                );
            }
            for (side, x) in r
                .direct
                .iter()
                .map(|d| ("direct", d))
                .chain([("through", t)])
            {
                if let (Some(addr), Some(l), Some(errors)) = (&x.open_addr, &x.open, x.open_errors)
                {
                    println!(
                        "{side} {addr}: open p50 {} µs p99 {} µs max {} µs, {} opens answered, {errors} errors",
                        l.p50_us, l.p99_us, l.max_us, l.count
                    );
                }
            }
            if let Some(p) = r.added_open_p99_us {
                println!("through/direct: added open p99 {p} µs");
            }
            if let (Some(n), Some(at)) = (r.open_strays, &r.open_target) {
                println!("open target {at}: {n} stray connections");
            }
            let failed_conns = t.conn_errors > 0;
            let failed_opens = t.open_errors.unwrap_or(0) > 0;
            if failed_conns {
                eprintln!(
                    "error: {} connections failed through {}",
                    t.conn_errors, t.addr
                );
            }
            if failed_opens {
                eprintln!(
                    "error: {} of {} opens failed through {}: {}",
                    t.open_errors.unwrap_or(0),
                    r.opens.unwrap_or(0),
                    t.open_addr.as_deref().unwrap_or("?"),
                    t.open_error_samples.join("; ")
                );
            }
            Ok(if failed_conns || failed_opens {
                ExitCode::from(perf::EXIT_ASSERTION)
            } else {
                ExitCode::SUCCESS
            })
        }
        PerfCmd::Agents {
            hubs,
            count,
            id_prefix,
            connector,
            target,
            jwt_key,
            tenant,
            token_ttl,
            ramp,
            duration,
            ha_connections,
            backoff_max_sec,
            json,
            progress,
        } => {
            let args = nowconnect_tokio::perf_agents::AgentsArgs {
                hubs,
                count,
                id_prefix,
                connector,
                target,
                jwt_key,
                tenant,
                token_ttl: token_ttl.into(),
                ramp,
                duration: duration.into(),
                ha_connections,
                backoff_max_sec,
                progress: progress.into(),
            };
            let r = nowconnect_tokio::perf_agents::perf_agents(&args).await?;
            if let Some(p) = &json {
                let text = serde_json::to_string(&r).map_err(|e| format!("report: {e}"))?;
                std::fs::write(p, text).map_err(|e| format!("{}: {e}", p.display()))?;
            }
            println!("{}", nowconnect_tokio::perf_agents::summary_line(&r));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What the binary runs: a hub or an agent with its configuration loaded,
/// or a tool.
enum Job {
    Service(Service),
    Tool(Tool),
}

fn main() -> ExitCode {
    nowconnect_tokio::tls::install_provider();
    let cli = Cli::parse();
    // A hub or agent file is loaded before the runtime starts: its
    // `worker_threads` sizes the runtime.
    let job = match cli.cmd {
        Cmd::Hub { config } => {
            HubConfig::load(&config).map(|c| Job::Service(Service::Hub(Box::new(c))))
        }
        Cmd::Agent { config } => {
            AgentConfig::load(&config).map(|c| Job::Service(Service::Agent(Box::new(c))))
        }
        Cmd::Tool(t) => Ok(Job::Tool(t)),
    };
    let job = match job {
        Ok(job) => job,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    // 0: tokio's default (one per CPU, or TOKIO_WORKER_THREADS).
    if let Job::Service(s) = &job
        && s.worker_threads() > 0
    {
        builder.worker_threads(s.worker_threads());
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(job)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() -> &'static str {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    }
}

/// Runs a subcommand; `perf` picks its own exit code (3: an assertion
/// failed), the others succeed or fail with their error.
async fn run(job: Job) -> Result<ExitCode, String> {
    match job {
        Job::Service(Service::Hub(cfg)) => {
            nowconnect_tokio::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            // A socket per tunnel, flow and mesh link: the hub may use all
            // the operator granted.
            nowconnect_shared::nofile::raise_at_start();
            let hub = nowconnect_tokio::hub::start(*cfg).await?;
            // One line on stdout that operators and tests can wait for.
            println!("{}", hub.ready_line());
            // SIGHUP re-reads the configuration file (JWT verification keys).
            #[cfg(unix)]
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| format!("cannot install the SIGHUP handler: {e}"))?;
            let shutdown = shutdown_signal();
            tokio::pin!(shutdown);
            let sig = loop {
                #[cfg(unix)]
                tokio::select! {
                    s = &mut shutdown => break s,
                    _ = hup.recv() => match hub.reload() {
                        Ok(what) => tracing::info!(%what, "configuration reloaded"),
                        Err(error) => tracing::warn!(
                            %error,
                            "configuration reload failed; the running configuration stays"
                        ),
                    },
                }
                #[cfg(not(unix))]
                break (&mut shutdown).await;
            };
            tracing::info!(signal = sig, "shutting down");
            hub.shutdown().await;
            Ok(ExitCode::SUCCESS)
        }
        Job::Service(Service::Agent(cfg)) => {
            nowconnect_tokio::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            nowconnect_shared::keyfiles::warn_agent(&cfg);
            let mut rt = nowconnect_tokio::agent::AgentRuntime::new(*cfg)?;
            let http = rt.bind_http().await?;
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(rt.run(stop_rx));
            println!("{}", nowconnect_shared::agent::start_line(http));
            let sig = shutdown_signal().await;
            tracing::info!(signal = sig, "shutting down");
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            Ok(ExitCode::SUCCESS)
        }
        Job::Tool(Tool::Token {
            secret_file,
            agent_id,
            connectors,
            tenant,
            ttl,
        }) => {
            let secret = nowconnect_tokio::jwt::read_secret(&secret_file)?;
            let token = nowconnect_tokio::jwt::mint(
                &secret,
                &agent_id,
                &connectors,
                tenant.as_deref(),
                ttl.into(),
            )?;
            println!("{token}");
            Ok(ExitCode::SUCCESS)
        }
        Job::Tool(Tool::Quickstart { check, listen_port }) => {
            nowconnect_tokio::logging::init(None, Some("warn"));
            nowconnect_tokio::quickstart::run(check, listen_port)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
        Job::Tool(Tool::Perf(p)) => {
            if matches!(*p, PerfCmd::Agents { .. }) {
                // Thousands of agents: their routine warnings stay, their
                // info lines would drown the progress.
                nowconnect_tokio::logging::init(None, Some("warn"));
            }
            perf(*p).await
        }
    }
}
