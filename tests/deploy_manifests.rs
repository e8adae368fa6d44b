//! Every deployment artefact in deploy/ parses and agrees with the others and with the CLI: the pods'
//! arguments are accepted by the real `serve` parser, probes hit the `--http` address, the socket the
//! plugin listens on is the one every EncryptionConfiguration names and is on a host directory the
//! apiserver can mount, the security settings are in place, and no secret sits in a pod's `env`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use kms_plugin::cli::{Cli, Command};
use serde::Deserialize;
use serde_yaml::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files_with_ext(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_with_ext(&path, ext, out);
        } else if path.extension().is_some_and(|e| e == ext) {
            out.push(path);
        }
    }
    out.sort();
}

/// Every YAML document in deploy/, with the file it came from.
fn documents() -> Vec<(PathBuf, Value)> {
    let mut files = Vec::new();
    files_with_ext(&deploy_dir(), "yaml", &mut files);
    files_with_ext(&deploy_dir(), "yml", &mut files);
    assert!(!files.is_empty(), "no YAML in deploy/");
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push((f.clone(), v));
            }
        }
    }
    docs
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    get(v, path)?.as_str()
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn seq<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    get(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn name_of(f: &Path) -> String {
    f.file_name().unwrap().to_string_lossy().into_owned()
}

/// The value of `--flag=value` or `--flag value` in an argument list.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v)
        } else if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

/// What one pod spec says about the plugin, after checking its invariants.
struct PluginPod {
    socket: String,
}

fn check_pod_spec(file: &str, spec: &Value) -> PluginPod {
    assert_eq!(
        get(spec, &["hostNetwork"]).and_then(Value::as_bool),
        Some(true),
        "{file}: hostNetwork"
    );
    assert_eq!(
        s(spec, &["priorityClassName"]),
        Some("system-node-critical"),
        "{file}"
    );
    assert_eq!(
        get(spec, &["securityContext", "runAsNonRoot"]).and_then(Value::as_bool),
        Some(true),
        "{file}: runAsNonRoot"
    );
    let uid = get(spec, &["securityContext", "runAsUser"]).and_then(Value::as_u64);
    assert!(
        uid.is_some_and(|u| u != 0),
        "{file}: runAsUser must be a non-zero uid"
    );

    let containers = seq(spec, &["containers"]);
    assert_eq!(containers.len(), 1, "{file}: one container");
    let c = &containers[0];
    let sc =
        get(c, &["securityContext"]).unwrap_or_else(|| panic!("{file}: container securityContext"));
    assert_eq!(
        get(sc, &["allowPrivilegeEscalation"]).and_then(Value::as_bool),
        Some(false),
        "{file}"
    );
    assert_eq!(
        get(sc, &["readOnlyRootFilesystem"]).and_then(Value::as_bool),
        Some(true),
        "{file}"
    );
    assert!(
        seq(sc, &["capabilities", "drop"])
            .iter()
            .any(|d| d.as_str() == Some("ALL")),
        "{file}: drop ALL"
    );
    assert!(
        get(sc, &["privileged"]).and_then(Value::as_bool) != Some(true),
        "{file}: privileged"
    );
    for r in ["cpu", "memory"] {
        assert!(
            get(c, &["resources", "requests", r]).is_some(),
            "{file}: resources.requests.{r}"
        );
    }

    // The command line must be accepted by the real parser.
    let command: Vec<String> = seq(c, &["command"])
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(command, ["/usr/local/bin/kms-plugin"], "{file}: command");
    let args: Vec<String> = seq(c, &["args"])
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    let cli =
        Cli::try_parse_from(std::iter::once("kms-plugin".to_owned()).chain(args.iter().cloned()))
            .unwrap_or_else(|e| panic!("{file}: args rejected by the CLI: {e}"));
    let Command::Serve(serve) = cli.command else {
        panic!("{file}: not `serve`")
    };

    // Environment: KMS_PLUGIN_* names exist, and no secret is given as a literal value.
    let known_env: BTreeSet<String> = Cli::command()
        .find_subcommand("serve")
        .unwrap()
        .get_arguments()
        .chain(Cli::command().get_arguments())
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for e in seq(c, &["env"]) {
        let name = s(e, &["name"]).unwrap();
        let is_secret = ["ACCESS_KEY", "TOKEN", "PASSWORD", "PIN", "SECRET"]
            .iter()
            .any(|w| name.ends_with(w));
        assert!(
            !(is_secret && get(e, &["value"]).is_some()),
            "{file}: {name} carries a secret in env; mount a file instead"
        );
        // Variables of backends left out of this build cannot be checked here.
        let not_built = [
            ("KMS_PLUGIN_AKEYLESS_", cfg!(feature = "akeyless")),
            ("KMS_PLUGIN_PKCS11_", cfg!(feature = "pkcs11")),
            ("KMS_PLUGIN_AWS_", cfg!(feature = "aws-kms")),
        ]
        .iter()
        .any(|(p, built)| name.starts_with(p) && !built);
        if name.starts_with("KMS_PLUGIN_") && !not_built {
            assert!(known_env.contains(name), "{file}: unknown variable {name}");
        }
    }

    // Probes: /livez for liveness (never the KMS health), /readyz for readiness, on --http.
    let http = serve
        .http
        .unwrap_or_else(|| panic!("{file}: --http missing"));
    assert!(
        http.ip().is_loopback(),
        "{file}: --http should stay on loopback with hostNetwork"
    );
    for (probe, path) in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz")] {
        let p = get(c, &[probe, "httpGet"]).unwrap_or_else(|| panic!("{file}: {probe}"));
        assert_eq!(s(p, &["path"]), Some(path), "{file}: {probe} path");
        assert_eq!(
            get(p, &["port"]).and_then(Value::as_u64),
            Some(u64::from(http.port())),
            "{file}: {probe} port"
        );
        assert_eq!(
            s(p, &["host"]),
            Some(http.ip().to_string().as_str()),
            "{file}: {probe} host"
        );
    }
    if let Some(p) = get(c, &["startupProbe", "httpGet"]) {
        assert_eq!(s(p, &["path"]), Some("/livez"), "{file}: startupProbe");
    }

    // The socket lives in a hostPath directory mounted at the same path (so kube-apiserver, which
    // mounts the same host directory, sees the same endpoint).
    let listen = flag(&args, "--listen").unwrap_or_else(|| panic!("{file}: --listen missing"));
    let socket = listen
        .strip_prefix("unix://")
        .unwrap_or_else(|| panic!("{file}: --listen {listen}"));
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    let mount = seq(c, &["volumeMounts"])
        .iter()
        .find(|m| s(m, &["mountPath"]) == Some(socket_dir))
        .unwrap_or_else(|| panic!("{file}: no volume mounted at {socket_dir}"));
    assert!(
        get(mount, &["readOnly"]).and_then(Value::as_bool) != Some(true),
        "{file}: socket dir read-only"
    );
    let vol_name = s(mount, &["name"]).unwrap();
    let vol = seq(spec, &["volumes"])
        .iter()
        .find(|v| s(v, &["name"]) == Some(vol_name))
        .unwrap();
    assert_eq!(
        s(vol, &["hostPath", "path"]),
        Some(socket_dir),
        "{file}: socket dir is not the same hostPath"
    );

    // Every file the plugin reads comes from a read-only mount.
    for key in ["--local-key-file"] {
        if let Some(path) = flag(&args, key) {
            let covered = seq(c, &["volumeMounts"]).iter().any(|m| {
                get(m, &["readOnly"]).and_then(Value::as_bool) == Some(true)
                    && s(m, &["mountPath"]).is_some_and(|mp| Path::new(path).starts_with(mp))
            });
            assert!(covered, "{file}: {key} {path} is not on a read-only mount");
        }
    }
    // Akeyless pods: the state directory (rotated Universal Identity tokens) is a writable hostPath,
    // so a container restart comes back with the newest token, not the consumed init token.
    let env_value = |name: &str| {
        seq(c, &["env"])
            .iter()
            .find(|e| s(e, &["name"]) == Some(name))
            .and_then(|e| s(e, &["value"]))
            .map(str::to_owned)
    };
    let akeyless = seq(c, &["env"]).iter().any(|e| {
        s(e, &["name"])
            .is_some_and(|n| n.starts_with("AKEYLESS_") || n.starts_with("KMS_PLUGIN_AKEYLESS_"))
    }) || flag(&args, "--backend") == Some("akeyless");
    if akeyless {
        let state = flag(&args, "--state-dir")
            .map(str::to_owned)
            .or_else(|| env_value("KMS_PLUGIN_STATE_DIR"))
            .or_else(|| flag(&args, "--data-dir").map(str::to_owned))
            .or_else(|| env_value("KMS_PLUGIN_DATA_DIR"))
            .unwrap_or_else(|| "/var/lib/kms-plugin".to_owned());
        let mount = seq(c, &["volumeMounts"])
            .iter()
            .find(|m| {
                s(m, &["mountPath"])
                    .is_some_and(|mp| Path::new(&state).starts_with(mp) && mp != "/")
            })
            .unwrap_or_else(|| {
                panic!("{file}: the Akeyless state directory {state} is not mounted")
            });
        assert!(
            get(mount, &["readOnly"]).and_then(Value::as_bool) != Some(true),
            "{file}: state directory {state} is read-only"
        );
        let vol_name = s(mount, &["name"]).unwrap();
        let vol = seq(spec, &["volumes"])
            .iter()
            .find(|v| s(v, &["name"]) == Some(vol_name))
            .unwrap();
        assert!(
            get(vol, &["hostPath"]).is_some(),
            "{file}: state directory {state} must be a hostPath that survives a restart, not {vol:?}"
        );
    }
    // A writable /tmp despite the read-only root.
    assert!(
        seq(c, &["volumeMounts"])
            .iter()
            .any(|m| s(m, &["mountPath"]) == Some("/tmp")),
        "{file}: /tmp mount"
    );
    PluginPod {
        socket: socket.to_owned(),
    }
}

#[test]
fn manifests_parse_and_agree() {
    let docs = documents();
    let mut kinds = BTreeSet::new();
    let mut sockets = BTreeSet::new();
    let mut endpoints = Vec::new();
    let mut provider_names = BTreeSet::new();
    for (path, doc) in &docs {
        let file = name_of(path);
        let kind = s(doc, &["kind"]).unwrap_or_else(|| panic!("{file}: no kind"));
        kinds.insert(kind.to_owned());
        match kind {
            "Pod" => {
                assert_eq!(s(doc, &["apiVersion"]), Some("v1"));
                assert_eq!(
                    s(doc, &["metadata", "namespace"]),
                    Some("kube-system"),
                    "{file}"
                );
                let pod = check_pod_spec(&file, get(doc, &["spec"]).unwrap());
                sockets.insert(pod.socket);
            }
            "DaemonSet" => {
                assert_eq!(s(doc, &["apiVersion"]), Some("apps/v1"));
                let spec = get(doc, &["spec", "template", "spec"]).unwrap();
                assert!(
                    get(
                        spec,
                        &["nodeSelector", "node-role.kubernetes.io/control-plane"]
                    )
                    .is_some(),
                    "{file}: not pinned to control-plane nodes"
                );
                assert!(
                    seq(spec, &["tolerations"]).iter().any(|t| {
                        s(t, &["key"]) == Some("node-role.kubernetes.io/control-plane")
                            && s(t, &["effect"]) == Some("NoSchedule")
                    }),
                    "{file}: control-plane taint not tolerated"
                );
                // Selector matches the template labels.
                let sel = get(doc, &["spec", "selector", "matchLabels"])
                    .and_then(Value::as_mapping)
                    .unwrap();
                let labels = get(doc, &["spec", "template", "metadata", "labels"]).unwrap();
                for (k, v) in sel {
                    assert_eq!(
                        labels.get(k),
                        Some(v),
                        "{file}: selector does not match template"
                    );
                }
                let pod = check_pod_spec(&file, spec);
                sockets.insert(pod.socket);
            }
            "EncryptionConfiguration" => {
                assert_eq!(
                    s(doc, &["apiVersion"]),
                    Some("apiserver.config.k8s.io/v1"),
                    "{file}"
                );
                let resources = seq(doc, &["resources"]);
                assert!(!resources.is_empty(), "{file}");
                for r in resources {
                    assert!(
                        seq(r, &["resources"])
                            .iter()
                            .any(|x| x.as_str() == Some("secrets")),
                        "{file}"
                    );
                    let providers = seq(r, &["providers"]);
                    let kms = get(&providers[0], &["kms"])
                        .unwrap_or_else(|| panic!("{file}: kms must write"));
                    let version = s(kms, &["apiVersion"]).unwrap_or("v1");
                    let name = s(kms, &["name"]).unwrap();
                    assert!(
                        !(name.is_empty() || (version == "v2" && name.contains(':'))),
                        "{file}: name {name}"
                    );
                    if version == "v2" {
                        assert!(
                            get(kms, &["cachesize"]).is_none(),
                            "{file}: cachesize is v1 only"
                        );
                    }
                    assert!(
                        provider_names.insert(name.to_owned()),
                        "{file}: provider name {name} reused"
                    );
                    let ep = s(kms, &["endpoint"]).unwrap();
                    endpoints.push((file.clone(), version.to_owned(), ep.to_owned()));
                    assert!(
                        providers.last().and_then(|p| p.get("identity")).is_some(),
                        "{file}: identity should stay last so unencrypted data stays readable"
                    );
                }
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    for k in ["Pod", "DaemonSet", "EncryptionConfiguration"] {
        assert!(kinds.contains(k), "deploy/ has no {k}");
    }
    let versions: BTreeSet<_> = endpoints.iter().map(|(_, v, _)| v.as_str()).collect();
    assert_eq!(
        versions,
        BTreeSet::from(["v1", "v2"]),
        "need a v1 and a v2 EncryptionConfiguration"
    );
    assert_eq!(
        sockets.len(),
        1,
        "pods disagree about the socket: {sockets:?}"
    );
    let socket = sockets.into_iter().next().unwrap();
    for (file, _, ep) in &endpoints {
        assert_eq!(
            ep,
            &format!("unix://{socket}"),
            "{file}: endpoint is not the plugin's socket"
        );
    }
    // The systemd variant serves the same socket (/var/run is /run).
    let env = std::fs::read_to_string(deploy_dir().join("systemd/kms-plugin.env")).unwrap();
    let listen = env
        .lines()
        .find_map(|l| l.strip_prefix("KMS_PLUGIN_LISTEN="))
        .expect("KMS_PLUGIN_LISTEN in kms-plugin.env");
    assert_eq!(
        listen.replace("/run/", "/var/run/"),
        format!("unix://{socket}")
    );
}

/// `Key=value` lines of a systemd unit, in order.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('[')
        })
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

#[test]
fn systemd_unit_is_hardened_and_consistent() {
    let text = std::fs::read_to_string(deploy_dir().join("systemd/kms-plugin.service")).unwrap();
    let settings = unit_settings(&text);
    let one = |k: &str| {
        settings
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("{k} missing"))
    };
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("RuntimeDirectory", "kms-plugin"),
        ("RuntimeDirectoryPreserve", "yes"),
        ("StateDirectory", "kms-plugin"),
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
        ("RestrictSUIDSGID", "yes"),
        ("Restart", "always"),
    ] {
        assert_eq!(one(k), v, "{k}");
    }
    assert!(one("User") != "root", "runs as root");
    let exec = one("ExecStart");
    assert!(
        exec.starts_with("/usr/local/bin/kms-plugin serve"),
        "{exec}"
    );
    assert!(
        one("ExecReload").contains("-HUP"),
        "reload must reopen the audit log"
    );

    // The example environment file configures a working `serve`: every KMS_PLUGIN_ variable exists,
    // and the values given parse.
    let env = std::fs::read_to_string(deploy_dir().join("systemd/kms-plugin.env")).unwrap();
    let root = Cli::command();
    let serve = root.find_subcommand("serve").unwrap();
    let mut args = vec!["kms-plugin".to_owned(), "serve".to_owned()];
    for line in env
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (name, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("bad line {line}"));
        let arg = serve
            .get_arguments()
            .chain(root.get_arguments())
            .find(|a| a.get_env().is_some_and(|e| e == name))
            .unwrap_or_else(|| panic!("kms-plugin.env: {name} is not a serve option"));
        args.push(format!("--{}={value}", arg.get_long().unwrap()));
    }
    Cli::try_parse_from(&args).unwrap_or_else(|e| panic!("kms-plugin.env rejected: {e}"));
    // The paths the service writes are the directories systemd creates for it.
    for line in env.lines().filter(|l| !l.starts_with('#')) {
        if let Some(p) = line.strip_prefix("KMS_PLUGIN_AUDIT_LOG=") {
            assert!(
                p.starts_with("/var/log/kms-plugin/"),
                "{p}: not in LogsDirectory"
            );
        }
        if let Some(p) = line.strip_prefix("KMS_PLUGIN_STATE_DIR=") {
            assert_eq!(p, "/var/lib/kms-plugin");
        }
        if let Some(p) = line.strip_prefix("KMS_PLUGIN_LISTEN=") {
            assert!(
                p.starts_with("unix:///run/kms-plugin/"),
                "{p}: not in RuntimeDirectory"
            );
        }
    }
}

#[test]
fn dockerfile_is_multistage_nonroot_and_matches_the_pods() {
    let text = std::fs::read_to_string(deploy_dir().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let froms = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(froms >= 2, "multi-stage build expected");
    let user = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "image runs as root");
    let entry = lines
        .iter()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("ENTRYPOINT");
    assert_eq!(entry, r#"["/usr/local/bin/kms-plugin"]"#);
    assert!(
        text.contains("PKCS#11"),
        "the PKCS#11 caveat must be documented"
    );
    // The files the build copies exist.
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        for src in l
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .split_last()
            .unwrap()
            .1
        {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(src.trim_end_matches('/'));
            assert!(p.exists(), "Dockerfile copies missing {src}");
        }
    }
}
