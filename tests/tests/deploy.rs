//! The Kubernetes manifests of `deploy/kubernetes/`: valid against the
//! Kubernetes API schemas in strict mode (`kubernetes-validate`, from PyPI;
//! a broken copy is rejected), every embedded `cloud.yaml` and
//! `premise.yaml` accepted by the hub's and the agent's own parsers with the
//! files their pods mount, and the parts that must agree with each other:
//! one configuration file per StatefulSet pod naming that pod as its replica
//! and its own mesh certificate, peers and advertised URLs on the headless
//! Service, probes on the ops port, the drain shorter than the termination
//! grace period, Services on ports the containers open, secrets only as files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use nowconnect_tests::pki::Ca;
use nowconnect_tokio::config::{AgentConfig, HubConfig};
use serde_json::Value;

/// The Kubernetes versions the manifests are validated against: the oldest
/// we support and a recent one.
const K8S_VERSIONS: &[&str] = &["1.31.0", "1.34.0"];

/// Seconds the termination grace period must leave beyond a hub's
/// `shutdown_grace_sec` (closing what is left, logs, a slow kubelet).
const GRACE_MARGIN_SEC: u64 = 10;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// Every `*.yaml` under `deploy/kubernetes`, sorted.
fn manifest_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![k8s_dir()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 6, "manifests: {out:?}");
    out
}

/// Every document of every manifest.
fn documents() -> Vec<Value> {
    manifest_files()
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(f).unwrap();
            serde_saphyr::from_multiple::<Value>(&text)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()))
        })
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/kubernetes"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: not a string: {v}"))
}

fn arr<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: not a list: {v}"))
}

// ------------------------------------------------------------ the validator

/// The `kubernetes-validate` executable: `NOWCONNECT_K8S_VALIDATE`, else the
/// virtualenv `scripts/test-all.sh` installs it into.
fn validator() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_default()
        .join("nowconnect/k8s-venv/bin/kubernetes-validate");
    let path = std::env::var_os("NOWCONNECT_K8S_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or(cache);
    assert!(
        path.is_file(),
        "kubernetes-validate not found at {} (NOWCONNECT_K8S_VALIDATE). Install it \
         (scripts/test-all.sh does): python3 -m venv ~/.cache/nowconnect/k8s-venv && \
         ~/.cache/nowconnect/k8s-venv/bin/pip install kubernetes-validate==1.37.0, \
         then export NOWCONNECT_K8S_VALIDATE=~/.cache/nowconnect/k8s-venv/bin/kubernetes-validate",
        path.display()
    );
    path
}

/// Run the validator in strict mode (unknown fields fail); the exit status
/// and everything it printed.
fn validate(version: &str, files: &[PathBuf]) -> (bool, String) {
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", version])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run kubernetes-validate: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn every_manifest_is_valid_against_the_kubernetes_schemas_in_strict_mode() {
    let files = manifest_files();
    let n = documents().len();
    for v in K8S_VERSIONS {
        let (ok, out) = validate(v, &files);
        assert!(ok, "kubernetes-validate {v} failed:\n{out}");
        // A kind without a schema is only a WARN with exit 0: every document
        // must have passed, none skipped.
        let passed = out
            .lines()
            .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
            .count();
        assert_eq!(passed, n, "{n} documents, {passed} passed ({v}):\n{out}");
        assert!(
            !out.lines()
                .any(|l| l.starts_with("WARN") || l.starts_with("ERROR")),
            "{out}"
        );
    }
}

#[test]
fn the_validator_rejects_a_broken_statefulset() {
    let good = std::fs::read_to_string(k8s_dir().join("hub/statefulset.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // An unknown field in the container (a typo: strict mode must catch it)
    // and a wrong type.
    let cases = [
        (
            "unknown-field.yaml",
            "          readinessProbe:",
            "          readinesProbe:",
            "'readinesProbe' was unexpected",
        ),
        (
            "wrong-type.yaml",
            "  replicas: 3\n",
            "  replicas: three\n",
            "spec.replicas: 'three' is not of type 'integer'",
        ),
    ];
    for (name, from, to, expect) in cases {
        assert_eq!(
            good.matches(from).count(),
            1,
            "{from:?} in statefulset.yaml"
        );
        let broken = dir.path().join(name);
        std::fs::write(&broken, good.replacen(from, to, 1)).unwrap();
        let (ok, out) = validate(K8S_VERSIONS[0], &[broken]);
        eprintln!("{name}: {}", out.trim());
        assert!(!ok, "{name} was accepted:\n{out}");
        assert!(
            out.contains(expect),
            "{name}: expected {expect:?} in:\n{out}"
        );
    }
}

// ------------------------------------------------------- what a pod mounts

/// Where a mounted file comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
}

/// The files `container` of `pod` sees, by absolute path: each item of its
/// ConfigMap, Secret and projected volumes. Secret volumes must list their
/// items (the test, like a reader, then knows every file); a ConfigMap
/// without items contributes the keys it has in the manifests.
fn mounted_files(docs: &[Value], pod: &Value, container: &Value) -> BTreeMap<String, Source> {
    let volumes = arr(&pod["volumes"], "volumes");
    let mut files = BTreeMap::new();
    let items = |v: &Value, what: &str| -> Vec<(String, String)> {
        arr(&v["items"], &format!("{what}: items"))
            .iter()
            .map(|i| {
                (
                    str_of(&i["key"], "key").to_string(),
                    str_of(&i["path"], "path").to_string(),
                )
            })
            .collect()
    };
    for m in arr(&container["volumeMounts"], "volumeMounts") {
        assert!(
            m.get("subPath").is_none() && m.get("subPathExpr").is_none(),
            "{m}: a subPath mount never sees a changed Secret or ConfigMap (no rotation)"
        );
        let dir = str_of(&m["mountPath"], "mountPath");
        let vname = &m["name"];
        let vol = volumes
            .iter()
            .find(|v| v["name"] == *vname)
            .unwrap_or_else(|| panic!("no volume {vname}"));
        let mut add = |list: Vec<(String, String)>, name: &str, secret: bool| {
            for (key, path) in list {
                let name = name.to_string();
                let src = if secret {
                    Source::Secret { name, key }
                } else {
                    Source::ConfigMap { name, key }
                };
                files.insert(format!("{dir}/{path}"), src);
            }
        };
        if let Some(cm) = vol.get("configMap") {
            let name = str_of(&cm["name"], "configMap.name");
            let list = if cm.get("items").is_some() {
                items(cm, name)
            } else {
                let data = &find(docs, "ConfigMap", name)["data"];
                let keys = data.as_object().expect("ConfigMap data").keys();
                keys.map(|k| (k.clone(), k.clone())).collect()
            };
            add(list, name, false);
        } else if let Some(s) = vol.get("secret") {
            let name = str_of(&s["secretName"], "secretName");
            add(items(s, name), name, true);
        } else if let Some(p) = vol.get("projected") {
            for src in arr(&p["sources"], "projected.sources") {
                if let Some(s) = src.get("secret") {
                    let name = str_of(&s["name"], "secret.name");
                    add(items(s, name), name, true);
                } else if let Some(c) = src.get("configMap") {
                    let name = str_of(&c["name"], "configMap.name");
                    add(items(c, name), name, false);
                } else {
                    panic!("unexpected projected source {src}");
                }
            }
        }
    }
    files
}

/// A pod's filesystem as far as NowConnect reads it, in a temporary
/// directory: every mounted file, ConfigMap keys with their manifest text,
/// Secrets with stand-ins of the right kind (a CA, a certificate and its key
/// from one test CA, else a 32-byte secret).
struct PodFs {
    root: tempfile::TempDir,
}

impl PodFs {
    fn new(docs: &[Value], files: &BTreeMap<String, Source>) -> PodFs {
        let root = tempfile::tempdir().unwrap();
        let ca = Ca::new("deploy test CA");
        let leaf = ca.issue(root.path(), "leaf");
        let (cert, leaf_key) = (
            std::fs::read_to_string(&leaf.cert).unwrap(),
            std::fs::read_to_string(&leaf.key).unwrap(),
        );
        for (path, src) in files {
            let text = match src {
                Source::ConfigMap { name, key } => docs
                    .iter()
                    .find(|d| d["kind"] == "ConfigMap" && d["metadata"]["name"] == name.as_str())
                    .map(|d| str_of(&d["data"][key], key).to_string())
                    // Created by the operator (e.g. a CA bundle): a CA.
                    .unwrap_or_else(|| ca.pem.clone()),
                Source::Secret { key, .. } if key == "ca.crt" => ca.pem.clone(),
                Source::Secret { key, .. } if key.ends_with(".crt") => cert.clone(),
                Source::Secret { key, .. } if key.ends_with(".key") => leaf_key.clone(),
                Source::Secret { .. } => "k8s-test-secret-0123456789abcdef".to_string(),
            };
            let p = root.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        PodFs { root }
    }

    /// `text` with every `/etc/nowconnect/` path moved into this directory.
    fn localize(&self, text: &str) -> String {
        text.replace(
            "/etc/nowconnect/",
            &format!("{}/etc/nowconnect/", self.root.path().display()),
        )
    }

    /// The path inside the pod of a path [`PodFs::localize`] moved.
    fn in_pod(&self, p: &Path) -> String {
        let p = p.display().to_string();
        p.strip_prefix(&self.root.path().display().to_string())
            .unwrap_or_else(|| panic!("{p} is outside the pod's files"))
            .to_string()
    }

    fn read(&self, in_pod: &str) -> String {
        std::fs::read_to_string(self.root.path().join(in_pod.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{in_pod}: {e}"))
    }
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    arr(&pod["containers"], "containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The number of a container port given by name (or as a number).
fn container_port(c: &Value, port: &Value) -> u64 {
    if let Some(n) = port.as_u64() {
        return n;
    }
    arr(&c["ports"], "ports")
        .iter()
        .find(|p| p["name"] == *port)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("container {} has no port {port}", c["name"]))
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr}: no port"))
}

/// A container's `args` with `$(VAR)` expanded from `vars`, as the kubelet does.
fn expand(args: &Value, vars: &[(&str, &str)]) -> Vec<String> {
    arr(args, "args")
        .iter()
        .map(|a| {
            let mut s = str_of(a, "arg").to_string();
            for (k, v) in vars {
                s = s.replace(&format!("$({k})"), v);
            }
            assert!(
                !s.contains("$("),
                "{s}: a variable the container does not define"
            );
            s
        })
        .collect()
}

fn config_arg(args: &[String]) -> &str {
    let i = args
        .iter()
        .position(|a| a == "--config")
        .expect("--config in args");
    &args[i + 1]
}

/// Probes on the ops port: readiness on `/readyz`, liveness on `/healthz`,
/// and Prometheus told to scrape that port.
fn check_probes(who: &str, template: &Value, c: &Value, ops: u64) {
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let g = &c[probe]["httpGet"];
        assert_eq!(g["path"], path, "{who}: {probe}");
        assert_eq!(
            container_port(c, &g["port"]),
            ops,
            "{who}: {probe} is not on the ops port"
        );
    }
    let a = &template["metadata"]["annotations"];
    assert_eq!(a["prometheus.io/scrape"], "true", "{who}");
    assert_eq!(
        a["prometheus.io/port"],
        ops.to_string(),
        "{who}: scrape port"
    );
    assert_eq!(a["prometheus.io/path"], "/metrics", "{who}");
}

#[test]
fn every_hub_pod_gets_its_own_configuration_and_the_hub_parser_accepts_it() {
    nowconnect_tokio::tls::install_provider();
    let docs = documents();
    let sts = find(&docs, "StatefulSet", "nowconnect-hub");
    let sts_name = str_of(&sts["metadata"]["name"], "name");
    let ns = str_of(&sts["metadata"]["namespace"], "namespace");
    let spec = &sts["spec"];
    let replicas = spec["replicas"].as_u64().expect("replicas");
    assert_eq!(replicas, 3);
    assert_eq!(
        spec["podManagementPolicy"], "Parallel",
        "hubs are ready only once meshed"
    );
    let template = &spec["template"];
    let pod = &template["spec"];
    let hub = container(pod, "hub");
    let files = mounted_files(&docs, pod, hub);
    let fs = PodFs::new(&docs, &files);
    assert!(
        arr(&hub["env"], "env")
            .iter()
            .any(|e| e["name"] == "POD_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "POD_NAME from the downward API"
    );

    // The headless Service: stable names, published before the hubs are ready.
    let headless_name = str_of(&spec["serviceName"], "serviceName");
    let headless = find(&docs, "Service", headless_name);
    assert_eq!(headless["spec"]["clusterIP"], "None");
    assert_eq!(headless["spec"]["publishNotReadyAddresses"], true);
    let mesh_port = &arr(&headless["spec"]["ports"], "ports")[0];
    let url = |i: u64| {
        format!(
            "wss://{sts_name}-{i}.{headless_name}.{ns}.svc.cluster.local:{}/mesh",
            mesh_port["port"]
        )
    };
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    let redis = find(&docs, "Service", "nowconnect-redis");

    let mut used = BTreeSet::new();
    for i in 0..replicas {
        let pod_name = format!("{sts_name}-{i}");
        let args = expand(&hub["args"], &[("POD_NAME", &pod_name)]);
        assert_eq!(args[0], "hub");
        let cfg_path = config_arg(&args);
        let Some(Source::ConfigMap { name, key }) = files.get(cfg_path) else {
            panic!(
                "{pod_name}: --config {cfg_path} is not a file of a mounted ConfigMap: {files:?}"
            );
        };
        used.insert((name.clone(), key.clone()));
        let text = fs.localize(&fs.read(cfg_path));
        let cfg = HubConfig::parse(Path::new(cfg_path), &text)
            .unwrap_or_else(|e| panic!("{pod_name}: the hub refuses its configuration: {e}"));

        // Its replica id is its pod name, on the mesh under its stable name.
        assert_eq!(cfg.replica_id, pod_name);
        let ha = &cfg.raw.ha;
        assert!(ha.enabled && ha.mode == "active", "{pod_name}: ha");
        let m = &ha.mesh;
        assert_eq!(
            m.advertise_url.as_deref(),
            Some(url(i).as_str()),
            "{pod_name}"
        );
        let peers: BTreeSet<String> = m.peers.iter().cloned().collect();
        let others: BTreeSet<String> = (0..replicas).filter(|j| *j != i).map(url).collect();
        assert_eq!(peers, others, "{pod_name}: peers are the other hubs");
        assert!(m.require_mtls);
        assert_eq!(
            port_of(m.listen.as_deref().expect("ha.mesh.listen")),
            container_port(hub, &mesh_port["targetPort"])
        );
        // Its own certificate and key: from the Secret of its replica only.
        let tls = m.tls.as_ref().expect("ha.mesh.tls");
        for (file, key) in [(&tls.cert_file, "tls.crt"), (&tls.key_file, "tls.key")] {
            assert_eq!(
                files.get(&fs.in_pod(file)),
                Some(&Source::Secret {
                    name: format!("{pod_name}-mesh"),
                    key: key.into()
                }),
                "{pod_name}: {}",
                file.display()
            );
        }

        // Ports: the tunnel, the ops port (probes, scrapes), the listeners.
        assert_eq!(
            u64::from(cfg.http_bind.port()),
            container_port(hub, &"tunnel".into())
        );
        let ops = cfg
            .ops_bind
            .expect("http.ops_bind: probes and scrapes off the tunnel port");
        let ops = u64::from(ops.port());
        assert_eq!(ops, container_port(hub, &"ops".into()));
        check_probes(&pod_name, template, hub, ops);
        for (name, addr, _) in &cfg.listeners {
            assert_eq!(
                u64::from(addr.port()),
                container_port(hub, &name.as_str().into()),
                "listener {name}"
            );
        }

        // The drain fits in the grace period, with a margin.
        let r = &cfg.raw;
        assert!(
            r.shutdown_delay_sec > 0,
            "{pod_name}: shutdown_delay_sec lets endpoint removal reach every node"
        );
        assert!(
            grace >= r.shutdown_grace_sec + GRACE_MARGIN_SEC,
            "{pod_name}: terminationGracePeriodSeconds {grace} < shutdown_grace_sec {} + {GRACE_MARGIN_SEC}: \
             Kubernetes would SIGKILL the hub in the middle of its drain",
            r.shutdown_grace_sec
        );

        // Redis: the Service in the manifests, its password a mounted file.
        let redis_url = ha
            .redis_url
            .as_ref()
            .expect("ha.redis_url")
            .expose()
            .to_string();
        let want = format!(
            "redis://{}.{ns}.svc.cluster.local:{}/",
            redis["metadata"]["name"].as_str().unwrap(),
            arr(&redis["spec"]["ports"], "ports")[0]["port"]
        );
        assert!(redis_url.starts_with(&want), "{redis_url} is not {want}…");
        let pw = ha
            .redis_password_file
            .as_ref()
            .expect("ha.redis_password_file");
        assert!(matches!(
            files.get(&fs.in_pod(pw)),
            Some(Source::Secret { .. })
        ));
    }
    // No file for a pod that does not exist (a stale replica's configuration).
    let (cm, _) = used.first().unwrap().clone();
    let keys: BTreeSet<(String, String)> = find(&docs, "ConfigMap", &cm)["data"]
        .as_object()
        .unwrap()
        .keys()
        .map(|k| (cm.clone(), k.clone()))
        .collect();
    assert_eq!(keys, used, "one configuration file per pod, no other");
}

#[test]
fn the_agent_example_is_accepted_by_the_agent_parser() {
    let docs = documents();
    let dep = docs
        .iter()
        .find(|d| {
            d["kind"] == "Deployment"
                && d["metadata"]["labels"]["app.kubernetes.io/component"] == "agent"
        })
        .expect("an agent Deployment");
    // One process per agent id: never two side by side.
    assert_eq!(dep["spec"]["replicas"], 1);
    assert_eq!(dep["spec"]["strategy"]["type"], "Recreate");
    let template = &dep["spec"]["template"];
    let pod = &template["spec"];
    let agent = container(pod, "agent");
    let files = mounted_files(&docs, pod, agent);
    let fs = PodFs::new(&docs, &files);
    let args = expand(&agent["args"], &[]);
    assert_eq!(args[0], "agent");
    let cfg_path = config_arg(&args);
    assert!(
        matches!(files.get(cfg_path), Some(Source::ConfigMap { .. })),
        "{cfg_path}"
    );
    let text = fs.localize(&fs.read(cfg_path));
    let doc: Value = serde_saphyr::from_str(&text).unwrap();

    let cfg = AgentConfig::parse(Path::new(cfg_path), &text, None)
        .unwrap_or_else(|e| panic!("the agent refuses premise.yaml: {e}"));
    // The parsed file has the endpoint the probes and scrapes use.
    assert_eq!(
        cfg.raw.http.as_ref().map(|h| h.bind.as_str()),
        str_of(&doc["http"]["bind"], "premise.yaml http.bind").into()
    );
    // The token is the mounted Secret file, not the environment.
    let token = cfg.raw.token_file.as_ref().expect("token_file");
    assert!(matches!(
        files.get(&fs.in_pod(token)),
        Some(Source::Secret { .. })
    ));
    assert!(cfg.raw.hubs.iter().all(|h| h.starts_with("wss://")));
    // The probes and scrapes reach the agent's HTTP endpoint.
    let ops = port_of(str_of(&doc["http"]["bind"], "premise.yaml http.bind"));
    assert_eq!(ops, container_port(agent, &"ops".into()));
    check_probes("agent", template, agent, ops);
}

/// Every pod template of the manifests, with its workload's name.
fn pod_templates(docs: &[Value]) -> Vec<(String, &Value)> {
    docs.iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("StatefulSet" | "Deployment")))
        .map(|d| {
            (
                format!("{} {}", d["kind"], d["metadata"]["name"]),
                &d["spec"]["template"],
            )
        })
        .collect()
}

#[test]
fn every_pod_is_locked_down_and_takes_secrets_only_as_files() {
    let docs = documents();
    let pods = pod_templates(&docs);
    assert!(pods.len() >= 3, "hub, redis, agent");
    for (who, t) in pods {
        let pod = &t["spec"];
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{who}");
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{who}"
        );
        assert_eq!(pod["automountServiceAccountToken"], false, "{who}");
        for c in arr(&pod["containers"], "containers") {
            let sc = &c["securityContext"];
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{who}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{who}");
            assert_eq!(sc["runAsNonRoot"], true, "{who}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{who}"
            );
            assert!(sc["capabilities"].get("add").is_none(), "{who}");
            for k in ["requests", "limits"] {
                let r = &c["resources"][k];
                assert!(
                    r["cpu"].is_string() && r["memory"].is_string(),
                    "{who}: resources.{k}"
                );
            }
            assert!(c.get("envFrom").is_none(), "{who}: envFrom");
            for e in c["env"].as_array().into_iter().flatten() {
                assert!(
                    e["valueFrom"].get("secretKeyRef").is_none(),
                    "{who}: secret in env {e}"
                );
            }
        }
    }
}

#[test]
fn services_and_the_disruption_budget_reach_the_hubs() {
    let docs = documents();
    let sts = find(&docs, "StatefulSet", "nowconnect-hub");
    let labels = &sts["spec"]["template"]["metadata"]["labels"];
    assert_eq!(sts["spec"]["selector"]["matchLabels"], *labels);
    let hub = container(&sts["spec"]["template"]["spec"], "hub");
    let selects_hubs = |sel: &Value| {
        sel.as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| labels[k] == *v)
    };
    // The agents' tunnel, the listener, the mesh.
    for (name, ready_only) in [
        ("nowconnect-tunnel", true),
        ("nowconnect-ldap", true),
        ("nowconnect-hub-mesh", false),
    ] {
        let s = find(&docs, "Service", name);
        assert!(selects_hubs(&s["spec"]["selector"]), "{name}: selector");
        for p in arr(&s["spec"]["ports"], "ports") {
            container_port(hub, &p["targetPort"]);
        }
        // Clients and agents go only to ready hubs (not draining, meshed).
        assert_eq!(
            s["spec"]["publishNotReadyAddresses"]
                .as_bool()
                .unwrap_or(false),
            !ready_only,
            "{name}: publishNotReadyAddresses"
        );
    }
    let pdb = find(&docs, "PodDisruptionBudget", "nowconnect-hub");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    assert!(selects_hubs(&pdb["spec"]["selector"]["matchLabels"]));
    let anti = &sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"];
    let terms = arr(
        &anti["preferredDuringSchedulingIgnoredDuringExecution"],
        "anti-affinity",
    );
    assert!(terms.iter().any(
        |t| t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
            && selects_hubs(&t["podAffinityTerm"]["labelSelector"]["matchLabels"])
    ));

    // The bundled Redis never evicts a key and keeps an append-only file.
    let conf = str_of(
        &find(&docs, "ConfigMap", "nowconnect-redis-config")["data"]["redis.conf"],
        "redis.conf",
    );
    for line in ["maxmemory-policy noeviction", "appendonly yes"] {
        assert!(
            conf.lines().any(|l| l.trim() == line),
            "redis.conf lacks {line:?}"
        );
    }
}
