//! `nowconnect quickstart`: a hub, an agent and a demo target on loopback,
//! with a generated secret and an in-memory registry; nothing to configure.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::agent::AgentRuntime;
use crate::config::{AgentConfig, HubConfig};

pub const BANNER: &[u8] = b"hello from the NowConnect demo target; type a line and it comes back\n";

/// The demo target: greets, then echoes every byte back.
pub async fn demo_target(listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if s.write_all(BANNER).await.is_err() {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// One round trip through the tunnel: banner, then an echo.
pub async fn self_check(listener: SocketAddr) -> Result<Duration, String> {
    let start = Instant::now();
    let mut s = TcpStream::connect(listener)
        .await
        .map_err(|e| format!("connect {listener}: {e}"))?;
    let mut banner = vec![0u8; BANNER.len()];
    s.read_exact(&mut banner)
        .await
        .map_err(|e| format!("reading the banner: {e}"))?;
    if banner != BANNER {
        return Err("unexpected banner".into());
    }
    s.write_all(b"ping\n").await.map_err(|e| e.to_string())?;
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo)
        .await
        .map_err(|e| format!("reading the echo: {e}"))?;
    if &echo != b"ping\n" {
        return Err("echo mismatch".into());
    }
    Ok(start.elapsed())
}

fn write_file(p: &Path, text: &str) -> Result<(), String> {
    let mut f = std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?;
    f.write_all(text.as_bytes())
        .map_err(|e| format!("{}: {e}", p.display()))
}

pub async fn run(check_only: bool, listen_port: u16) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("nowconnect-quickstart-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let secret: String = (0..48)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect();
    let secret_file = dir.join("jwt.secret");
    write_file(&secret_file, &secret)?;

    let target = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let target_addr = target.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(demo_target(target));

    let cloud = format!(
        "http:\n  bind: 127.0.0.1:0\ntunnel:\n  jwt:\n    hs256_secret_file: {}\nlisteners:\n  - {{ name: demo, bind: '127.0.0.1:{listen_port}', connector: demo }}\nshutdown_grace_sec: 2\n",
        secret_file.display()
    );
    let cloud_file = dir.join("cloud.yaml");
    write_file(&cloud_file, &cloud)?;
    let hub_cfg = HubConfig::parse(&cloud_file, &cloud).map_err(|e| e.to_string())?;
    let hub = crate::hub::start(hub_cfg).await?;
    let listener = hub.listener_addrs[0].1;

    let token = crate::jwt::mint(
        secret.as_bytes(),
        "quickstart-agent",
        &["demo".to_string()],
        None,
        Duration::from_secs(24 * 3600),
    )?;
    let premise = format!(
        "agent_id: quickstart-agent\nhubs: ['ws://{}/tunnel']\nconnectors:\n  - {{ name: demo, target: '{target_addr}' }}\n",
        hub.http_addr
    );
    let premise_file = dir.join("premise.yaml");
    write_file(&premise_file, &premise)?;
    let agent_cfg =
        AgentConfig::parse(&premise_file, &premise, Some(token)).map_err(|e| e.to_string())?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let agent = tokio::spawn(AgentRuntime::new(agent_cfg)?.run(stop_rx));

    // Wait for the tunnel, then prove the path works.
    let deadline = Instant::now() + Duration::from_secs(10);
    let rtt = loop {
        match self_check(listener).await {
            Ok(d) => break d,
            Err(e) if Instant::now() > deadline => return Err(format!("self-check failed: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    println!("NowConnect quickstart is running.");
    println!(
        "  hub HTTP      http://{}  (/healthz /readyz /metrics; agents dial ws://{}/tunnel)",
        hub.http_addr, hub.http_addr
    );
    println!("  listener      {listener}  (connector `demo`)");
    println!("  demo target   {target_addr}  (greets, then echoes)");
    println!("  configs       {}", dir.display());
    println!(
        "self-check: banner and echo through the tunnel OK in {:.1} ms",
        rtt.as_secs_f64() * 1000.0
    );
    if check_only {
        let _ = stop_tx.send(true);
        let _ = agent.await;
        hub.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    println!(
        "Try it:   nc {} {}     or   curl http://{}/metrics",
        listener.ip(),
        listener.port(),
        hub.http_addr
    );
    println!("Press Ctrl-C to stop.");
    let _ = tokio::signal::ctrl_c().await;
    let _ = stop_tx.send(true);
    let _ = agent.await;
    hub.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
