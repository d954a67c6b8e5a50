//! The `nowconnect-async-std` binary: the hub and the agent on the
//! async-std runtime, with the same configuration files, CLI, endpoints,
//! metrics, logs and signals as `nowconnect hub` and `nowconnect agent`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use futures_util::StreamExt;
use nowconnect_shared::config::{AgentConfig, HubConfig, Service};

#[derive(Parser)]
#[command(
    name = "nowconnect-async-std",
    version,
    about = "NowConnect on the async-std runtime (hub and agent)"
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
}

fn main() -> ExitCode {
    nowconnect_shared::tls::install_provider();
    let cli = Cli::parse();
    // The file is loaded before the executor starts: its `worker_threads`
    // sizes it (0: async-std's default, one per CPU or
    // ASYNC_STD_THREAD_COUNT). async-std keeps the executor configured here.
    let service = match cli.cmd {
        Cmd::Hub { config } => HubConfig::load(&config).map(|c| Service::Hub(Box::new(c))),
        Cmd::Agent { config } => AgentConfig::load(&config).map(|c| Service::Agent(Box::new(c))),
    };
    let service = match service {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let threads = service.worker_threads();
    if threads > 0 {
        async_global_executor::init_with_config(
            async_global_executor::GlobalExecutorConfig::default()
                .with_min_threads(threads)
                .with_max_threads(threads)
                .with_thread_name_fn(|| "async-std/runtime".to_string()),
        );
    }
    match async_std::task::block_on(run(service)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(service: Service) -> Result<(), String> {
    match service {
        Service::Hub(cfg) => {
            nowconnect_shared::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            use async_signal::Signal;
            let mut signals = async_signal::Signals::new([Signal::Term, Signal::Int, Signal::Hup])
                .map_err(|e| format!("cannot install signal handlers: {e}"))?;
            // A socket per tunnel, flow and mesh link: the hub may use all
            // the operator granted.
            nowconnect_shared::nofile::raise_at_start();
            let hub = nowconnect_async_std::hub::start(*cfg).await?;
            // One line on stdout that operators and tests can wait for.
            println!("{}", hub.ready_line());
            let sig = loop {
                match signals.next().await {
                    // SIGHUP re-reads the configuration file.
                    Some(Ok(Signal::Hup)) => match hub.reload() {
                        Ok(what) => tracing::info!(%what, "configuration reloaded"),
                        Err(error) => tracing::warn!(
                            %error,
                            "configuration reload failed; the running configuration stays"
                        ),
                    },
                    Some(Ok(Signal::Term)) => break "SIGTERM",
                    _ => break "SIGINT",
                }
            };
            tracing::info!(signal = sig, "shutting down");
            hub.shutdown().await;
            Ok(())
        }
        Service::Agent(cfg) => {
            nowconnect_shared::logging::init(
                cfg.raw.log.format.as_deref(),
                cfg.raw.log.level.as_deref(),
            );
            let mut signals =
                async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
                    .map_err(|e| format!("cannot install signal handlers: {e}"))?;
            nowconnect_shared::keyfiles::warn_agent(&cfg);
            let mut rt = nowconnect_async_std::agent::AgentRuntime::new(*cfg)?;
            let http = rt.bind_http().await?;
            let (stop_tx, stop_rx) = nowconnect_async_std::agent::AgentRuntime::stopper();
            let task = async_std::task::spawn(rt.run(stop_rx));
            println!("{}", nowconnect_shared::agent::start_line(http));
            let sig = match signals.next().await {
                Some(Ok(async_signal::Signal::Term)) => "SIGTERM",
                _ => "SIGINT",
            };
            tracing::info!(signal = sig, "shutting down");
            let _ = stop_tx.try_send(());
            let _ = async_std::future::timeout(Duration::from_secs(5), task).await;
            Ok(())
        }
    }
}
