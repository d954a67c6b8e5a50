//! The `nowconnect` binary: `hub`, `agent`, `token`, `quickstart`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use nowconnect_tokio::config::{AgentConfig, HubConfig};
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
    /// Print a signed HS256 token for an agent.
    Token {
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long)]
        agent_id: String,
        /// Comma-separated connectors the agent may announce (default: any).
        #[arg(long, value_delimiter = ',')]
        connectors: Option<Vec<String>>,
        /// Lifetime, e.g. 15m, 12h, 30d.
        #[arg(long, default_value = "15m")]
        ttl: humantime::Duration,
    },
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

fn main() -> ExitCode {
    nowconnect_tokio::tls::install_provider();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.cmd)) {
        Ok(()) => ExitCode::SUCCESS,
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

async fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Hub { config } => {
            let cfg = HubConfig::load(&config).map_err(|e| e.to_string())?;
            nowconnect_tokio::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            let hub = nowconnect_tokio::hub::start(cfg).await?;
            let listeners: Vec<String> = hub
                .listener_addrs
                .iter()
                .map(|(n, a)| format!("{n}={a}"))
                .collect();
            // One line on stdout that operators and tests can wait for.
            println!(
                "nowconnect hub ready http={} listeners={}",
                hub.http_addr,
                listeners.join(",")
            );
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
            Ok(())
        }
        Cmd::Agent { config } => {
            let cfg = AgentConfig::load(&config).map_err(|e| e.to_string())?;
            nowconnect_tokio::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            let rt = nowconnect_tokio::agent::AgentRuntime::new(cfg)?;
            let (stop_tx, stop_rx) = watch::channel(false);
            let task = tokio::spawn(rt.run(stop_rx));
            println!("nowconnect agent started");
            let sig = shutdown_signal().await;
            tracing::info!(signal = sig, "shutting down");
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            Ok(())
        }
        Cmd::Token {
            secret_file,
            agent_id,
            connectors,
            ttl,
        } => {
            let secret = nowconnect_tokio::jwt::read_secret(&secret_file)?;
            let token = nowconnect_tokio::jwt::mint(&secret, &agent_id, connectors, ttl.into())?;
            println!("{token}");
            Ok(())
        }
        Cmd::Quickstart { check, listen_port } => {
            nowconnect_tokio::logging::init(None, Some("warn"));
            nowconnect_tokio::quickstart::run(check, listen_port).await
        }
    }
}
