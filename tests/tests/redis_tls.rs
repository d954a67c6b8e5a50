//! The Redis registry over TLS (rustls, ring) against a real TLS-only
//! `redis-server` with ACL users: claims and renewals as an ACL user, client
//! certificates, refused server certificates, and credentials that appear in
//! no error, no `Debug` output, no log line and no `/readyz` reason.

use std::path::Path;
use std::time::Duration;

use nowconnect_core::registry::{RegistryError, RegistryOp, RegistryReply};
use nowconnect_tests::pki::Ca;
use nowconnect_tests::*;
use nowconnect_tokio::redact::Secret;
use nowconnect_tokio::registry::{RedisAuth, RedisRegistry, RedisTlsPem};

const USER: &str = "nowconnect";

/// A password nobody could mistake for other text in a message.
fn password() -> String {
    format!("pw-{:016x}", rand::random::<u64>())
}

fn setup<'a>(ca: &'a Ca, auth_clients: &'a str, password: &'a str) -> RedisTlsSetup<'a> {
    RedisTlsSetup {
        ca,
        auth_clients,
        user: USER,
        password,
    }
}

/// Trust `ca` (written to `dir`), optionally with a client certificate of it.
fn tls(dir: &Path, ca: &Ca, client: Option<&str>) -> RedisTlsPem {
    let trust = dir.join(format!("trust-{}.pem", rand::random::<u32>()));
    std::fs::write(&trust, &ca.pem).unwrap();
    let leaf = client.map(|name| ca.issue(dir, name));
    RedisTlsPem::read(
        &trust,
        leaf.as_ref().map(|l| (l.cert.as_path(), l.key.as_path())),
    )
    .unwrap()
}

fn auth(password: &str, tls: RedisTlsPem) -> RedisAuth {
    RedisAuth {
        username: Some(USER.into()),
        password: Some(Secret::new(password)),
        tls: Some(tls),
    }
}

fn registry(url: &str, auth: &RedisAuth) -> RedisRegistry {
    RedisRegistry::with_auth(url, auth, "nowconnect:", Duration::from_secs(2)).unwrap()
}

fn claim(agent: &str, replica: &str) -> RegistryOp {
    RegistryOp::Claim {
        slot: 0,
        agent_id: agent.into(),
        replica_id: replica.into(),
        lease: Duration::from_secs(10),
    }
}

/// The error of `op`, which must fail.
async fn failure(r: &RedisRegistry, op: &RegistryOp) -> RegistryError {
    match r.apply(op).await {
        Err(e) => e,
        Ok(reply) => panic!("{} succeeded: {reply:?}", op.name()),
    }
}

#[tokio::test]
async fn the_registry_over_tls_as_an_acl_user_claims_and_renews() {
    let env = Env::new();
    let ca = Ca::new("redis-ca");
    let pw = password();
    let redis = RedisProc::start_tls(env.path(), &setup(&ca, "optional", &pw));
    assert!(redis.url().starts_with("rediss://"));

    let r = registry(&redis.url(), &auth(&pw, tls(env.path(), &ca, None)));
    let RegistryReply::Claimed(e1) = r.apply(&claim("a1", "hub-a")).await.unwrap() else {
        panic!("no claim")
    };
    let RegistryReply::Claimed(e2) = r.apply(&claim("a1", "hub-b")).await.unwrap() else {
        panic!("no claim")
    };
    assert!(e2 > e1, "{e2:?} !> {e1:?}");
    let renew = |replica: &str, epoch| RegistryOp::Renew {
        slot: 0,
        agent_id: "a1".into(),
        replica_id: replica.into(),
        epoch,
        lease: Duration::from_secs(10),
    };
    assert_eq!(
        r.apply(&renew("hub-b", e2)).await.unwrap(),
        RegistryReply::Renewed
    );
    assert!(matches!(
        r.apply(&renew("hub-a", e1)).await.unwrap(),
        RegistryReply::Lost { current: Some(_) }
    ));
    assert_eq!(
        r.apply(&RegistryOp::Health).await.unwrap(),
        RegistryReply::Healthy
    );

    // The ACL is in force: keys outside `nowconnect:` are refused to this
    // user, and the `default` user (no credentials) is off.
    let other_prefix = RedisRegistry::with_auth(
        &redis.url(),
        &auth(&pw, tls(env.path(), &ca, None)),
        "other:",
        Duration::from_secs(2),
    )
    .unwrap();
    let e = failure(&other_prefix, &claim("a1", "hub-a"))
        .await
        .to_string();
    assert!(e.to_lowercase().contains("noperm"), "{e}");
    let anonymous = registry(
        &redis.url(),
        &RedisAuth {
            tls: Some(tls(env.path(), &ca, None)),
            ..RedisAuth::default()
        },
    );
    let e = failure(&anonymous, &RegistryOp::Health).await.to_string();
    assert!(e.to_lowercase().contains("auth"), "{e}");
}

#[tokio::test]
async fn a_client_certificate_is_presented_when_redis_requires_one() {
    let env = Env::new();
    let ca = Ca::new("redis-ca");
    let pw = password();
    let redis = RedisProc::start_tls(env.path(), &setup(&ca, "yes", &pw));

    // Without a client certificate the TLS handshake is refused.
    let without = registry(&redis.url(), &auth(&pw, tls(env.path(), &ca, None)));
    failure(&without, &RegistryOp::Health).await;

    // A client certificate from another CA is refused as well.
    let stranger = Ca::new("stranger-ca");
    let mut foreign = tls(env.path(), &stranger, Some("foreign-client"));
    foreign.ca = ca.pem.clone().into_bytes();
    let foreign = registry(&redis.url(), &auth(&pw, foreign));
    failure(&foreign, &RegistryOp::Health).await;

    let with = registry(
        &redis.url(),
        &auth(&pw, tls(env.path(), &ca, Some("hub-client"))),
    );
    assert!(matches!(
        with.apply(&claim("a2", "hub-a")).await.unwrap(),
        RegistryReply::Claimed(_)
    ));
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    let env = Env::new();
    let ca = Ca::new("redis-ca");
    let pw = password();
    let redis = RedisProc::start_tls(env.path(), &setup(&ca, "optional", &pw));

    // Trusting another CA only: the server's certificate is refused.
    let other = Ca::new("other-ca");
    let r = registry(&redis.url(), &auth(&pw, tls(env.path(), &other, None)));
    let e = failure(&r, &RegistryOp::Health).await.to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");

    // Without `ha.redis_tls` a rediss:// URL trusts the system roots, which
    // do not hold the test CA either.
    let system = registry(
        &redis.url(),
        &RedisAuth {
            username: Some(USER.into()),
            password: Some(Secret::new(&pw)),
            tls: None,
        },
    );
    let e = failure(&system, &RegistryOp::Health).await.to_string();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}

#[tokio::test]
async fn a_wrong_password_is_refused_clearly_and_never_shown() {
    let env = Env::new();
    let ca = Ca::new("redis-ca");
    let pw = password();
    let redis = RedisProc::start_tls(env.path(), &setup(&ca, "optional", &pw));
    let wrong = password();

    // The password set on the connection (as from ha.redis_password_file).
    let r = registry(&redis.url(), &auth(&wrong, tls(env.path(), &ca, None)));
    let e = failure(&r, &claim("a3", "hub-a")).await;
    let (shown, debug) = (e.to_string(), format!("{e:?}"));
    assert!(shown.contains("authentication failed"), "{shown}");
    for text in [&shown, &debug] {
        assert!(!text.contains(&wrong), "wrong password shown: {text}");
        assert!(!text.contains(&pw), "password shown: {text}");
    }
    assert!(!format!("{:?}", auth(&wrong, tls(env.path(), &ca, None))).contains(&wrong));

    // The password inside the URL: the same refusal, still not shown.
    let url = format!("rediss://{USER}:{wrong}@127.0.0.1:{}/0", redis.port);
    let r = RedisRegistry::with_auth(
        &url,
        &RedisAuth {
            tls: Some(tls(env.path(), &ca, None)),
            ..RedisAuth::default()
        },
        "nowconnect:",
        Duration::from_secs(2),
    )
    .unwrap();
    let e = failure(&r, &RegistryOp::Health).await;
    let (shown, debug) = (e.to_string(), format!("{e:?}"));
    assert!(shown.contains("authentication failed"), "{shown}");
    assert!(
        !shown.contains(&wrong) && !debug.contains(&wrong),
        "{shown} / {debug}"
    );

    // A URL the client refuses: the error shows it masked.
    let bad = format!("rediss://{USER}:{wrong}@127.0.0.1:{}/not-a-db", redis.port);
    let e = match RedisRegistry::new(&bad, "nowconnect:", Duration::from_secs(2)) {
        Err(e) => e,
        Ok(_) => panic!("{bad} accepted"),
    };
    assert!(!e.contains(&wrong), "{e}");
    assert!(e.contains(&format!("rediss://{USER}:***@127.0.0.1")), "{e}");
}

/// The hub's registry calls succeed: its sweeper calls Redis every second,
/// so after 2.5 s without an error and `/readyz` 200, Redis answered.
fn assert_registry_healthy(hub: &HubProc) {
    std::thread::sleep(Duration::from_millis(2500));
    let readyz = hub.get("/readyz");
    assert_eq!(readyz.0, 200, "{readyz:?}\n{}", hub.proc.log_text());
    assert_eq!(hub.metric("nowconnect_registry_errors_total"), 0.0);
    assert_eq!(hub.metric("nowconnect_registry_healthy"), 1.0);
}

/// A hub in active mode on a TLS Redis as an ACL user.
fn tls_hub_yaml(env: &Env, redis: &RedisProc, ca_file: &Path, auth: &str) -> String {
    env.hub_yaml(
        &[("l1", "ldap")],
        &format!(
            "ha:\n  enabled: true\n  mode: active\n  replica_id: hub-a\n  redis_url: {}\n  redis_tls: {{ ca_bundle: {} }}\n{auth}  lease_sec: 3\n  renew_interval_sec: 1\n  registry_timeout_ms: 1000\n  mesh:\n    require_mtls: false\n",
            redis.url(),
            ca_file.display()
        ),
    )
}

#[test]
fn a_hub_uses_tls_redis_with_a_password_file_and_prints_no_password() {
    let env = Env::new();
    let ca = Ca::new("redis-ca");
    let pw = password();
    let redis = RedisProc::start_tls(env.path(), &setup(&ca, "optional", &pw));
    let ca_file = env.path().join("redis-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();

    // The password from a file (with a trailing newline, as editors leave it).
    let pw_file = env.path().join("redis.password");
    std::fs::write(&pw_file, format!("{pw}\n")).unwrap();
    let hub = HubProc::start(
        env.path(),
        "hub-file",
        &tls_hub_yaml(
            &env,
            &redis,
            &ca_file,
            &format!(
                "  redis_username: {USER}\n  redis_password_file: {}\n",
                pw_file.display()
            ),
        ),
    );
    // An agent attaches: the hub claims it in Redis, where the test reads
    // the owner back over TLS.
    let echo = echo_server();
    let _agent = AgentProc::start(
        env.path(),
        "agent",
        &env.agent_yaml("agent-1", &[hub.http], &[("ldap", echo)], ""),
        &env.token("agent-1", None),
    );
    assert!(hub.agents_attached(1.0, Duration::from_secs(10)));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let r = registry(&redis.url(), &auth(&pw, tls(env.path(), &ca, None)));
    let owner = rt.block_on(r.apply(&RegistryOp::GetOwners {
        agent_id: "agent-1".into(),
    }));
    assert!(
        matches!(&owner, Ok(RegistryReply::Owners(o)) if o.len() == 1 && o[0].replica_id == "hub-a"),
        "{owner:?}\n{}",
        hub.proc.log_text()
    );
    assert_registry_healthy(&hub);
    let log = hub.proc.wait_log("redis registry", Duration::from_secs(2));
    assert!(log.contains(&redis.url()), "{log}");
    drop(hub);

    // The password in the URL works, with a warning; the URL is logged masked.
    let url = format!("rediss://{USER}:{pw}@127.0.0.1:{}/0", redis.port);
    let yaml = tls_hub_yaml(&env, &redis, &ca_file, "").replace(&redis.url(), &url);
    let hub = HubProc::start(env.path(), "hub-url", &yaml);
    assert_registry_healthy(&hub);
    let log = hub
        .proc
        .wait_log("ha.redis_password_file instead", Duration::from_secs(2));
    assert!(
        log.contains(&format!("rediss://{USER}:***@127.0.0.1:{}/0", redis.port)),
        "{log}"
    );
    let out = hub.proc.stdout_lines.lock().unwrap().join("\n");
    assert!(!log.contains(&pw) && !out.contains(&pw), "{log}\n{out}");
    drop(hub);

    // A wrong password: /readyz names the refusal; nothing prints a password.
    let wrong = password();
    let url = format!("rediss://{USER}:{wrong}@127.0.0.1:{}/0", redis.port);
    let yaml = tls_hub_yaml(&env, &redis, &ca_file, "").replace(&redis.url(), &url);
    let hub = HubProc::start(env.path(), "hub-wrong", &yaml);
    let mut readyz = (0, String::new());
    assert!(
        eventually(Duration::from_secs(5), || {
            readyz = hub.get("/readyz");
            readyz.0 == 503 && readyz.1.contains("authentication failed")
        }),
        "{readyz:?}"
    );
    let log = hub.proc.log_text();
    let out = hub.proc.stdout_lines.lock().unwrap().join("\n");
    for text in [&log, &out, &readyz.1, &hub.get("/metrics").1] {
        assert!(!text.contains(&wrong) && !text.contains(&pw), "{text}");
    }
}
