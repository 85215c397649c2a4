//! Checks the manifests in deploy/: against the Kubernetes API schemas, offline, with the
//! kubernetes-validate package (it carries the schemas of each Kubernetes release), and for the
//! privileges the DaemonSet asks for.
//!
//! Needs python3 with kubernetes-validate and PyYAML (a dependency of it); `cargo xtask setup`
//! installs them. Without them these tests fail rather than skip.
//!
//! kubernetes-validate exits 0 when it has no schema for a resource (a custom resource, or a
//! mistyped apiVersion): it only prints a WARN line. So a run passes here only if every resource
//! printed a pass line for every version, and nothing else was printed.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::{json, Value};

/// The oldest release the manifests are meant for, and the newest the pinned validator knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.28.0", "1.37.0"];

const SETUP_HINT: &str = "run `cargo xtask setup`; it installs the validator with \
     `python3 -m pip install kubernetes-validate==1.37.0`";

/// Custom resources: kubernetes-validate has no schema for them, so they are left out of the
/// schema check by name (their API group), and only their wiring is checked below.
const CUSTOM_RESOURCE_GROUPS: &[&str] = &["monitoring.coreos.com"];

const CAPABILITIES: &[&str] = &[
    "BPF",
    "DAC_READ_SEARCH",
    "NET_ADMIN",
    "PERFMON",
    "SYS_RESOURCE",
];

const HOST_PATHS: &[&str] = &[
    "/sys/fs/cgroup",
    "/sys/kernel/btf",
    "/sys/kernel/tracing",
    "/var/log/containers",
    "/var/log/pods",
];

const ARGS: &[&str] = &[
    "run",
    "--format",
    "json",
    "--metrics-addr",
    "0.0.0.0:9153",
    "--cgroup-root",
    "/host/sys/fs/cgroup",
    "--pod-log-dir",
    "/host/var/log/pods",
    "--container-log-dir",
    "/host/var/log/containers",
    "--kube-api",
];

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join(file)
}

/// Fails with the setup hint when python3 or the validator is missing.
fn require_validator() {
    let out = Command::new("python3")
        .args(["-c", "import kubernetes_validate, yaml"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): {SETUP_HINT}"));
    assert!(
        out.status.success(),
        "kubernetes-validate is not importable by python3 ({}): {SETUP_HINT}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// A file under the temp dir, removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "dnsprobe-deploy-{}-{name}.yaml",
            std::process::id()
        ));
        fs::write(&path, contents).expect("writing a temp file");
        Self(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The documents of a YAML file, as JSON values (PyYAML's safe loader does the parsing).
fn load(path: &Path) -> Vec<Value> {
    require_validator();
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml\n\
             with open(sys.argv[1]) as f:\n    \
                 docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
             json.dump(docs, sys.stdout)",
        ])
        .arg(path)
        .output()
        .expect("running python3");
    assert!(
        out.status.success(),
        "{} is not valid YAML: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let Value::Array(docs) = serde_json::from_slice(&out.stdout).expect("JSON from python3") else {
        panic!("expected a list of documents");
    };
    docs
}

/// `kind/name` as kubernetes-validate prints it.
fn resource(doc: &Value) -> String {
    format!(
        "{}/{}",
        doc["kind"].as_str().unwrap_or("?").to_lowercase(),
        doc["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn is_custom_resource(doc: &Value) -> bool {
    let api_version = doc["apiVersion"].as_str().unwrap_or("");
    CUSTOM_RESOURCE_GROUPS
        .iter()
        .any(|group| api_version.starts_with(&format!("{group}/")))
}

/// Runs the validator strictly (unknown fields are errors) for each version. Ok when it passed
/// every resource of the file for every version and reported nothing else; Err(its output).
fn validate(path: &Path) -> Result<(), String> {
    let docs = load(path);
    let mut cmd = Command::new("python3");
    cmd.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        cmd.args(["-k", version]);
    }
    let out = cmd.arg(path).output().expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!("exit status {}:\n{report}", out.status));
    }
    if let Some(line) = report.lines().find(|l| !l.starts_with("INFO ")) {
        return Err(format!("reported `{line}`:\n{report}"));
    }
    let passed: BTreeSet<&str> = stdout.lines().collect();
    for doc in &docs {
        for version in KUBERNETES_VERSIONS {
            let minor = version.rsplit_once('.').map_or(*version, |(m, _)| m);
            let line = format!(
                "INFO {} passed for resource {} against version {minor}",
                path.display(),
                resource(doc)
            );
            if !passed.contains(line.as_str()) {
                return Err(format!("no `{line}`:\n{report}"));
            }
        }
    }
    Ok(())
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let mut found = docs.iter().filter(|d| d["kind"] == kind);
    let doc = found.next().unwrap_or_else(|| panic!("no {kind}"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// What the DaemonSet's pods may do beyond what is meant. Empty when all is as designed.
fn privilege_violations(daemonset: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let pod = &daemonset["spec"]["template"]["spec"];
    for field in ["hostNetwork", "hostIPC"] {
        if pod[field] == true {
            found.push(format!("pod sets {field}: true"));
        }
    }
    if pod["securityContext"]["sysctls"].is_array() {
        found.push("pod sets sysctls".into());
    }
    let host_volumes: Vec<(&str, &str)> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|v| v["hostPath"].is_object())
        .map(|v| {
            (
                v["name"].as_str().unwrap_or("?"),
                v["hostPath"]["path"].as_str().unwrap_or("?"),
            )
        })
        .collect();
    let paths: BTreeSet<&str> = host_volumes.iter().map(|(_, path)| *path).collect();
    if paths != HOST_PATHS.iter().copied().collect() {
        found.push(format!("host paths are {paths:?}, not {HOST_PATHS:?}"));
    }
    let containers = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|list| pod[*list].as_array().into_iter().flatten());
    for container in containers {
        let name = container["name"].as_str().unwrap_or("?");
        let sc = &container["securityContext"];
        // Explicit values: defaults can differ between runtimes and admission policies.
        for (field, want) in [
            ("privileged", false),
            ("allowPrivilegeEscalation", false),
            ("readOnlyRootFilesystem", true),
        ] {
            if sc[field] != want {
                found.push(format!("{name}: securityContext.{field} is not {want}"));
            }
        }
        if strings(&sc["capabilities"]["drop"]) != ["ALL"] {
            found.push(format!("{name}: capabilities.drop is not [ALL]"));
        }
        let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
        if added != CAPABILITIES.iter().copied().collect() {
            found.push(format!(
                "{name}: capabilities.add is {added:?}, not {CAPABILITIES:?}"
            ));
        }
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let volume = mount["name"].as_str().unwrap_or("?");
            if !host_volumes.iter().any(|(v, _)| *v == volume) {
                continue;
            }
            if mount["readOnly"] != true {
                found.push(format!(
                    "{name}: host volume {volume} is not mounted readOnly"
                ));
            }
            if mount["mountPropagation"] == "Bidirectional" {
                found.push(format!(
                    "{name}: host volume {volume} propagates mounts back"
                ));
            }
        }
    }
    found
}

#[test]
fn dnsprobe_yaml_matches_the_kubernetes_schemas() {
    require_validator();
    if let Err(report) = validate(&deploy("dnsprobe.yaml")) {
        panic!("deploy/dnsprobe.yaml does not validate: {report}");
    }
}

#[test]
fn servicemonitor_yaml_core_resources_match_the_schemas() {
    require_validator();
    let docs = load(&deploy("servicemonitor.yaml"));
    let (custom, core): (Vec<&Value>, Vec<&Value>) =
        docs.iter().partition(|d| is_custom_resource(d));
    // Skipped on purpose, and only these: a new custom resource must be added here knowingly.
    let skipped: Vec<String> = custom.iter().map(|d| resource(d)).collect();
    assert_eq!(skipped, ["servicemonitor/dnsprobe"]);
    eprintln!(
        "not schema-checked (custom resources, kubernetes-validate has no schema): {skipped:?}"
    );
    assert!(!core.is_empty());
    let stream: String = core.iter().map(|d| format!("---\n{d}\n")).collect();
    let file = TempFile::new("servicemonitor-core", &stream);
    if let Err(report) = validate(&file.0) {
        panic!("the core resources of deploy/servicemonitor.yaml do not validate: {report}");
    }
}

/// The validator run as above really rejects what is wrong: a wrong type, a misspelt field
/// (caught by --strict only), and an apiVersion with no schema (a WARN, exit status 0).
#[test]
fn broken_manifests_are_rejected() {
    require_validator();
    let good = fs::read_to_string(deploy("dnsprobe.yaml")).unwrap();
    for (name, from, to, expect) in [
        (
            "wrong-type",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFilesystem: \"yes\"",
            "did not validate",
        ),
        (
            "misspelt-field",
            "readOnlyRootFilesystem: true",
            "readOnlyRootFileSystem: true",
            "was unexpected",
        ),
        (
            "unknown-api-version",
            "apiVersion: apps/v1",
            "apiVersion: app/v1",
            "Couldn't find schema",
        ),
        (
            "missing-required-field",
            "          hostPath:\n            path: /var/log/pods\n",
            "          hostPath:\n",
            "did not validate",
        ),
    ] {
        assert_eq!(
            good.matches(from).count(),
            1,
            "{name}: `{from}` not found once"
        );
        let file = TempFile::new(name, &good.replacen(from, to, 1));
        match validate(&file.0) {
            Ok(()) => panic!("{name}: a broken manifest validated"),
            Err(report) => assert!(report.contains(expect), "{name}: {report}"),
        }
    }
}

#[test]
fn daemonset_has_only_the_intended_privileges() {
    let docs = load(&deploy("dnsprobe.yaml"));
    let daemonset = find(&docs, "DaemonSet");
    assert_eq!(privilege_violations(daemonset), Vec::<String>::new());
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "process names need the host's /proc");
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    assert!(!daemonset.to_string().contains("SYS_ADMIN\""));
}

/// A change made to a parsed manifest.
type Mutation = Box<dyn Fn(&mut Value)>;

/// The checks above catch each kind of regression.
#[test]
fn privilege_checks_catch_regressions() {
    let docs = load(&deploy("dnsprobe.yaml"));
    let daemonset = find(&docs, "DaemonSet");
    let container = "/spec/template/spec/containers/0";
    let mutations: Vec<(&str, Mutation)> = vec![
        (
            "privileged",
            Box::new(move |d: &mut Value| {
                d.pointer_mut(&format!("{container}/securityContext"))
                    .unwrap()["privileged"] = json!(true)
            }),
        ),
        (
            "privileged unset",
            Box::new(move |d: &mut Value| {
                d.pointer_mut(&format!("{container}/securityContext"))
                    .unwrap()
                    .as_object_mut()
                    .unwrap()
                    .remove("privileged");
            }),
        ),
        (
            "SYS_ADMIN",
            Box::new(move |d: &mut Value| {
                d.pointer_mut(&format!("{container}/securityContext/capabilities/add"))
                    .unwrap()
                    .as_array_mut()
                    .unwrap()
                    .push(json!("SYS_ADMIN"))
            }),
        ),
        (
            "drop nothing",
            Box::new(move |d: &mut Value| {
                *d.pointer_mut(&format!("{container}/securityContext/capabilities/drop"))
                    .unwrap() = json!([])
            }),
        ),
        (
            "writable host mount",
            Box::new(move |d: &mut Value| {
                d.pointer_mut(&format!("{container}/volumeMounts/0"))
                    .unwrap()["readOnly"] = json!(false)
            }),
        ),
        (
            "another host path",
            Box::new(move |d: &mut Value| {
                d.pointer_mut("/spec/template/spec/volumes")
                    .unwrap()
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": "root", "hostPath": {"path": "/"}}))
            }),
        ),
        (
            "host network",
            Box::new(move |d: &mut Value| {
                d.pointer_mut("/spec/template/spec").unwrap()["hostNetwork"] = json!(true)
            }),
        ),
        (
            "writable root filesystem",
            Box::new(move |d: &mut Value| {
                d.pointer_mut(&format!("{container}/securityContext"))
                    .unwrap()["readOnlyRootFilesystem"] = json!(false)
            }),
        ),
    ];
    for (name, mutate) in mutations {
        let mut broken = daemonset.clone();
        mutate(&mut broken);
        assert!(
            !privilege_violations(&broken).is_empty(),
            "{name}: not caught"
        );
    }
}

#[test]
fn daemonset_runs_the_documented_command_and_exposes_metrics() {
    let docs = load(&deploy("dnsprobe.yaml"));
    let daemonset = find(&docs, "DaemonSet");
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"], json!(ARGS));
    assert!(
        container["command"].is_null(),
        "the image's entrypoint runs"
    );

    // Every host directory named on the command line is a read-only mount.
    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["readOnly"] == true)
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    for arg in ARGS.iter().filter(|a| a.starts_with("/host/")) {
        assert!(mounts.contains(arg), "{arg} is not a read-only mount");
    }
    assert!(mounts.contains(&"/sys/kernel/btf"));

    let port = &container["ports"][0];
    assert_eq!(port["name"], "metrics");
    assert_eq!(port["containerPort"], 9153);
    let annotations = &daemonset["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9153");
    assert_eq!(container["livenessProbe"]["tcpSocket"]["port"], "metrics");

    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let resources = &container["resources"];
    assert_eq!(
        resources["requests"],
        json!({"cpu": "50m", "memory": "64Mi"})
    );
    assert_eq!(resources["limits"], json!({"memory": "256Mi"}));
}

#[test]
fn rbac_grants_read_only_access_to_pods() {
    let docs = load(&deploy("dnsprobe.yaml"));
    let namespace = find(&docs, "Namespace");
    let account = find(&docs, "ServiceAccount");
    let role = find(&docs, "ClusterRole");
    let binding = find(&docs, "ClusterRoleBinding");
    let daemonset = find(&docs, "DaemonSet");
    let ns = namespace["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "privileged",
        "hostPID and hostPath pods are refused under the baseline level"
    );
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}])
    );
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": ns}])
    );
    assert_eq!(account["metadata"]["namespace"], ns);
    assert_eq!(daemonset["metadata"]["namespace"], ns);
    assert_eq!(
        daemonset["spec"]["template"]["spec"]["serviceAccountName"],
        account["metadata"]["name"]
    );
}

/// The Service selects the probe's pods and the ServiceMonitor selects the Service, by names
/// that exist (the custom resource is checked here since no schema checks it).
#[test]
fn servicemonitor_wiring() {
    let core = load(&deploy("dnsprobe.yaml"));
    let daemonset = find(&core, "DaemonSet");
    let docs = load(&deploy("servicemonitor.yaml"));
    let service = find(&docs, "Service");
    let monitor = find(&docs, "ServiceMonitor");
    let template = &daemonset["spec"]["template"];

    assert_eq!(service["spec"]["clusterIP"], "None");
    for (key, value) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &template["metadata"]["labels"][key], value,
            "selector {key}"
        );
    }
    let port = &service["spec"]["ports"][0];
    assert_eq!(
        port["targetPort"],
        template["spec"]["containers"][0]["ports"][0]["name"]
    );
    assert_eq!(port["port"], 9153);

    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], port["name"]);
    for (key, value) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &service["metadata"]["labels"][key], value,
            "matchLabels {key}"
        );
    }
    let ns = &daemonset["metadata"]["namespace"];
    assert_eq!(&service["metadata"]["namespace"], ns);
    assert_eq!(
        monitor["spec"]["namespaceSelector"]["matchNames"],
        json!([ns])
    );
}
