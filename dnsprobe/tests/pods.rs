//! Attribution end to end: fake pods made of real cgroups laid out the way real nodes lay them
//! out (containerd, CRI-O and Docker; systemd and cgroupfs drivers), a kubelet pod-log-directory
//! fixture, and a real client in each: its records must name the right pod and container.
//!
//! Every layout lives under a prefix cgroup unique to the test (the daemon finds the kubepods
//! part anywhere in a path, as on nodes that run inside a container), so parallel tests and the
//! machine's own cgroups are never touched.

mod support;

use std::{fs, os::unix::fs::symlink, path::Path};

use serde_json::Value;
use support::{
    cgroup2_root, skip_unless_root, ClientRun, CreatedCgroups, Daemon, TempDir, World, WorldConfig,
    RECORD_TIMEOUT, WWW,
};

/// One fake pod: where its container's cgroup is, and what the records must say about it.
struct FakePod {
    /// Path below the test's prefix cgroup, `/`-separated.
    layout: String,
    namespace: &'static str,
    pod: String,
    uid: String,
    container: &'static str,
    container_id: String,
    runtime: &'static str,
    qos: &'static str,
}

/// A unique pod UID and a 64-hex container id for pod `n` of this process.
fn ids(n: u32) -> (String, String) {
    let pid = std::process::id();
    let uid = format!(
        "{pid:08x}-{n:04x}-4000-8000-{:012x}",
        u64::from(pid) * 31 + u64::from(n)
    );
    let id = format!(
        "{:016x}{:016x}{:016x}{:016x}",
        pid,
        n,
        pid ^ 0xdead_beef,
        n + 7
    );
    (uid, id)
}

fn fake_pods() -> Vec<FakePod> {
    let mut pods = Vec::new();
    let mut add = |n: u32,
                   layout: &dyn Fn(&str, &str) -> String,
                   namespace: &'static str,
                   container: &'static str,
                   runtime: &'static str,
                   qos: &'static str| {
        let (uid, id) = ids(n);
        pods.push(FakePod {
            layout: layout(&uid, &id),
            namespace,
            pod: format!("web-{n}"),
            uid,
            container,
            container_id: id,
            runtime,
            qos,
        });
    };
    // systemd driver: the pod UID is written with `_` instead of `-`.
    add(
        0,
        &|uid, id| {
            let u = uid.replace('-', "_");
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{id}.scope"
            )
        },
        "shop",
        "app",
        "containerd",
        "burstable",
    );
    add(
        1,
        &|uid, id| {
            let u = uid.replace('-', "_");
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{id}.scope"
            )
        },
        "batch",
        "worker",
        "cri-o",
        "besteffort",
    );
    add(
        2,
        &|uid, id| {
            let u = uid.replace('-', "_");
            format!("kubepods.slice/kubepods-pod{u}.slice/docker-{id}.scope")
        },
        "db",
        "postgres",
        "docker",
        "guaranteed",
    );
    // cgroupfs driver: the UID keeps its dashes, the container directory is the bare id.
    add(
        3,
        &|uid, id| format!("kubepods/burstable/pod{uid}/{id}"),
        "shop",
        "sidecar",
        // The cgroupfs layout does not say which runtime made the container.
        "unknown",
        "burstable",
    );
    add(
        4,
        &|uid, id| format!("kubepods/pod{uid}/{id}"),
        "kube-system",
        "coredns",
        "unknown",
        "guaranteed",
    );
    pods
}

/// Writes the kubelet's log layout for the fake pods: `pods/<ns>_<pod>_<uid>/<container>/0.log`
/// and `containers/<pod>_<ns>_<container>-<id>.log` linking to it.
fn log_fixture(dir: &Path, pods: &[FakePod]) {
    for p in pods {
        let container_dir = dir
            .join("pods")
            .join(format!("{}_{}_{}", p.namespace, p.pod, p.uid))
            .join(p.container);
        fs::create_dir_all(&container_dir).expect("pod log dir");
        let log = container_dir.join("0.log");
        fs::write(&log, "").expect("pod log file");
        fs::create_dir_all(dir.join("containers")).expect("container log dir");
        symlink(
            &log,
            dir.join("containers").join(format!(
                "{}_{}_{}-{}.log",
                p.pod, p.namespace, p.container, p.container_id
            )),
        )
        .expect("container log link");
    }
}

fn record_line(daemon: &Daemon, cgroup_path: &str) -> Option<Value> {
    daemon.lines().into_iter().map(|(v, _)| v).find(|v| {
        v["event"] == "query"
            && v["cgroup_path"] == cgroup_path
            && v["qname"] == WWW
            && v["outcome"] == "answered"
    })
}

fn wait_for_record(daemon: &Daemon, cgroup_path: &str) -> Value {
    daemon.wait_until(
        &format!("a record for {cgroup_path}"),
        RECORD_TIMEOUT,
        |d| record_line(d, cgroup_path),
    )
}

fn assert_names_pod(record: &Value, p: &FakePod, run: &ClientRun) {
    let what = format!("record of {}: {record}", p.layout);
    assert_eq!(record["pid"], run.pid, "{what}");
    assert_eq!(record["pod"]["namespace"], p.namespace, "{what}");
    assert_eq!(record["pod"]["name"], p.pod.as_str(), "{what}");
    assert_eq!(record["pod"]["uid"], p.uid.as_str(), "{what}");
    assert_eq!(record["pod"]["qos"], p.qos, "{what}");
    assert_eq!(record["container"]["id"], p.container_id.as_str(), "{what}");
    assert_eq!(record["container"]["name"], p.container, "{what}");
    assert_eq!(record["container"]["runtime"], p.runtime, "{what}");
    assert!(record.get("host_unit").is_none(), "{what}");
}

/// A world for the fake pods' clients, the pods, and their kubelet log fixture in a temporary
/// directory named after `tag`.
fn pods_with_logs(tag: &str) -> (World, TempDir, Vec<FakePod>) {
    let world = World::new(WorldConfig::default());
    let logs = TempDir::new(&format!("{}-{tag}", std::process::id()));
    let pods = fake_pods();
    log_fixture(logs.path(), &pods);
    (world, logs, pods)
}

/// The daemon started with the given flags, the pods' log fixture passed to it.
fn start_daemon(logs: &TempDir, extra: &[&str]) -> Daemon {
    let pods_dir = logs.path().join("pods");
    let containers_dir = logs.path().join("containers");
    let mut args = vec![
        "--pod-log-dir",
        pods_dir.to_str().expect("utf-8 path"),
        "--container-log-dir",
        containers_dir.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    Daemon::start_with(&args)
}

#[test]
fn queries_from_fake_pods_carry_namespace_pod_container_and_uid() {
    if skip_unless_root("queries_from_fake_pods_carry_namespace_pod_container_and_uid") {
        return;
    }
    let (world, logs, pods) = pods_with_logs("podlogs");
    let daemon = start_daemon(&logs, &[]);

    let mut cgroups = CreatedCgroups::default();
    let prefix = format!("dp-pods-{}", std::process::id());
    for p in &pods {
        let leaf = cgroups.make(&format!("{prefix}/{}", p.layout));
        let run = world.dig_www_in(leaf);
        let record = wait_for_record(&daemon, &leaf.path);
        assert_names_pod(&record, p, &run);
    }

    // A host service, for contrast: no pod, its unit named. Host units sit under a top-level
    // systemd slice; the test makes its own slice rather than touch system.slice.
    let unit = format!("dp-host-{}.service", std::process::id());
    let leaf = cgroups.make(&format!("dp-host-{}.slice/{unit}", std::process::id()));
    world.dig_www_in(leaf);
    let record = wait_for_record(&daemon, &leaf.path);
    assert_eq!(record["host_unit"], unit.as_str(), "{record}");
    assert!(record.get("pod").is_none(), "{record}");
    drop(cgroups);
    daemon.stop();
}

/// On a node the daemon may attach to the pods' slice only (`--cgroup-root`), so that host
/// traffic never runs its programs. The pods under it must still be named (the parser needs the
/// kubepods slices above a pod, so paths stay rooted at the top of the hierarchy), and a pod
/// of the other (cgroupfs) layout, outside that slice, must not be seen at all.
#[test]
fn a_daemon_attached_to_the_kubepods_slice_still_names_its_pods() {
    if skip_unless_root("a_daemon_attached_to_the_kubepods_slice_still_names_its_pods") {
        return;
    }
    let (world, logs, pods) = pods_with_logs("podlogs-slice");
    let mut cgroups = CreatedCgroups::default();
    let prefix = format!("dp-pods-slice-{}", std::process::id());
    // The attach point must exist before the daemon starts: every leaf is made first.
    let leaves: Vec<(&FakePod, String)> = pods
        .iter()
        .map(|p| {
            (
                p,
                cgroups.make(&format!("{prefix}/{}", p.layout)).path.clone(),
            )
        })
        .collect();
    let slice = cgroup2_root().join(&prefix).join("kubepods.slice");
    let daemon = start_daemon(
        &logs,
        &["--cgroup-root", slice.to_str().expect("utf-8 path")],
    );
    let (inside, outside): (Vec<_>, Vec<_>) = leaves
        .iter()
        .partition(|(p, _)| p.layout.starts_with("kubepods.slice/"));
    assert!(
        !inside.is_empty() && !outside.is_empty(),
        "the layouts changed"
    );

    // Outside first: were they seen, their records would be written before (or with) the
    // ones from inside, which are waited for.
    for (_, path) in &outside {
        world.dig_www_in(cgroups.get(path));
    }
    for (p, path) in &inside {
        let run = world.dig_www_in(cgroups.get(path));
        let record = wait_for_record(&daemon, path);
        assert_names_pod(&record, p, &run);
    }
    let seen: Vec<String> = daemon
        .lines()
        .into_iter()
        .filter(|(v, _)| v["event"] == "query")
        .map(|(_, line)| line)
        .collect();
    assert_eq!(
        seen.len(),
        inside.len(),
        "one query record for each pod under the slice, none from outside it: {seen:#?}"
    );
    drop(cgroups);
    daemon.stop();
}
