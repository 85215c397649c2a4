//! `--kube-api` end to end: a fake API server on 127.0.0.1 (plain HTTP) answers the pod LIST
//! and WATCH of this node, a kubeconfig written by the test points the daemon at it, and fake
//! pods made of real cgroups send real queries. The pod log directories are empty, so only the
//! API can name the pods.
//!
//! The server is deliberately small: one thread per connection, requests recorded for the test
//! to check, watch streams kept open and fed from a shared event list.

mod support;

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use support::{
    run_client_in, skip_unless_root, Cgroup, CreatedCgroups, Daemon, TempDir, World, WorldConfig,
    RECORD_TIMEOUT, WWW,
};

const TOKEN: &str = "dnsprobe-test-token";

#[derive(Default)]
struct ApiState {
    /// The pods the LIST answers with.
    listed: Vec<Value>,
    /// Watch events (one JSON line each), in the order sent; each watch connection streams
    /// those appended after it connected.
    events: Vec<String>,
    /// Request lines and headers, as received.
    requests: Vec<String>,
}

/// The fake API server; stops accepting and ends its streams on drop.
struct FakeApi {
    port: u16,
    state: Arc<(Mutex<ApiState>, Condvar)>,
    stop: Arc<AtomicBool>,
    acceptor: Option<thread::JoinHandle<()>>,
}

impl FakeApi {
    fn start(listed: Vec<Value>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the fake API server");
        // Polled, so that drop can stop the accept loop.
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let port = listener.local_addr().expect("local address").port();
        let state = Arc::new((
            Mutex::new(ApiState {
                listed,
                ..ApiState::default()
            }),
            Condvar::new(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let acceptor = {
            let (state, stop) = (state.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let (state, stop) = (state.clone(), stop.clone());
                            thread::spawn(move || serve(conn, &state, &stop));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        Self {
            port,
            state,
            stop,
            acceptor: Some(acceptor),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ApiState> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }

    fn send_event(&self, kind: &str, object: &Value) {
        let line = json!({"type": kind, "object": object}).to_string();
        self.lock().events.push(line);
        self.state.1.notify_all();
    }

    /// Waits until a request matching `pred` arrived.
    fn wait_request(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + RECORD_TIMEOUT;
        loop {
            if let Some(r) = self.requests().into_iter().find(|r| pred(r)) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} request; requests so far: {:#?}",
                self.requests()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Serves one connection: any number of requests (the client keeps connections alive); a
/// watch keeps the connection to itself until the server stops or the client goes away.
fn serve(conn: TcpStream, state: &(Mutex<ApiState>, Condvar), stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push_str(&line);
        }
        let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let params: Vec<&str> = query.split('&').collect();
        let watch = params.contains(&"watch=true") || params.contains(&"watch=1");
        let (lock, cvar) = state;
        let mut st = lock.lock().unwrap_or_else(|p| p.into_inner());
        st.requests.push(head.clone());
        let authorized = head.lines().any(|l| {
            l.trim()
                .eq_ignore_ascii_case(&format!("authorization: Bearer {TOKEN}"))
        });
        if path != "/api/v1/pods" || !authorized {
            drop(st);
            let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                              "code": 404, "reason": "NotFound", "message": "not here"})
            .to_string();
            let _ = write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            continue;
        }
        if !watch {
            let body = json!({"kind": "PodList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": "100"}, "items": st.listed})
            .to_string();
            drop(st);
            if write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .is_err()
            {
                return;
            }
            continue;
        }
        // The watch: from the events appended from now on (the cursor is taken under the lock
        // that recorded the request, so a test that saw the request misses no event).
        let mut cursor = st.events.len();
        let mut pending = Vec::new();
        if params.contains(&"allowWatchBookmarks=true") {
            pending.push(
                json!({"type": "BOOKMARK", "object": {"kind": "Pod", "apiVersion": "v1",
                       "metadata": {"resourceVersion": "101"}}})
                .to_string(),
            );
        }
        drop(st);
        if out
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
            .is_err()
        {
            return;
        }
        loop {
            for line in pending.drain(..) {
                let chunk = format!("{line}\n");
                if write!(out, "{:x}\r\n{chunk}\r\n", chunk.len()).is_err() || out.flush().is_err()
                {
                    return;
                }
            }
            if stop.load(Ordering::Relaxed) {
                let _ = out.write_all(b"0\r\n\r\n");
                return;
            }
            let st = lock.lock().unwrap_or_else(|p| p.into_inner());
            let (st, _) = cvar
                .wait_timeout_while(st, Duration::from_millis(200), |s| {
                    s.events.len() == cursor && !stop.load(Ordering::Relaxed)
                })
                .unwrap_or_else(|p| p.into_inner());
            pending.extend(st.events[cursor..].iter().cloned());
            cursor = st.events.len();
        }
    }
}

fn pod_json(
    node: &str,
    namespace: &str,
    name: &str,
    uid: &str,
    container: &str,
    container_id: &str,
    mirror_of: Option<&str>,
) -> Value {
    let mut metadata = json!({"name": name, "namespace": namespace, "uid": uid,
                              "resourceVersion": "100"});
    if let Some(hash) = mirror_of {
        metadata["annotations"] = json!({"kubernetes.io/config.mirror": hash});
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {"nodeName": node, "containers": [{"name": container, "image": "x"}]},
        "status": {"phase": "Running", "containerStatuses": [{
            "name": container,
            "containerID": container_id,
            "image": "x",
            "imageID": "",
            "ready": true,
            "restartCount": 0,
        }]},
    })
}

fn answered_records(daemon: &Daemon, cgroup_path: &str) -> Vec<Value> {
    daemon
        .lines()
        .into_iter()
        .map(|(v, _)| v)
        .filter(|v| {
            v["event"] == "query"
                && v["cgroup_path"] == cgroup_path
                && v["qname"] == WWW
                && v["outcome"] == "answered"
        })
        .collect()
}

/// Runs dig in `leaf` until a record of it names a pod (the daemon may learn of the pod a
/// moment after the test sent it), and returns that record.
fn named_record(daemon: &Daemon, world: &World, leaf: &Cgroup) -> Value {
    let deadline = Instant::now() + RECORD_TIMEOUT;
    let server = format!("@{}", world.server_v4);
    loop {
        let before = answered_records(daemon, &leaf.path).len();
        run_client_in(
            leaf,
            &world.client_ns,
            &["dig", &server, WWW, "A", "+tries=1", "+time=2"],
        )
        .assert_success();
        loop {
            let records = answered_records(daemon, &leaf.path);
            if records.len() > before {
                let last = records.last().cloned().unwrap_or_default();
                if last["pod"]["name"].is_string() {
                    return last;
                }
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no record for {}; daemon stderr:\n{}",
                leaf.path,
                daemon.stderr()
            );
            thread::sleep(Duration::from_millis(25));
        }
        assert!(
            Instant::now() < deadline,
            "records of {} never named a pod: {:?}; daemon stderr:\n{}",
            leaf.path,
            answered_records(daemon, &leaf.path),
            daemon.stderr()
        );
        // The attributor re-tries an unnamed pod after 2 s.
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn pods_are_named_from_the_api_server() {
    if skip_unless_root("pods_are_named_from_the_api_server") {
        return;
    }
    let pid = std::process::id();
    let node = format!("node-{pid}");
    let uid = |n: u32| format!("{pid:08x}-{n:04x}-4000-8000-00000000a{n:03x}");
    let cid = |n: u32| format!("{:016x}{:016x}{:016x}{:016x}", pid, n, 0xfeed_u32, n + 1);
    // A static pod: its cgroups carry the manifest hash; the API has its mirror under another UID.
    let static_hash = format!("{pid:08x}{:024x}", 0x5717_u32);

    let listed = vec![
        pod_json(
            &node,
            "shop",
            "web-0",
            &uid(0),
            "app",
            &format!("containerd://{}", cid(0)),
            None,
        ),
        pod_json(
            &node,
            "kube-system",
            &format!("etcd-{node}"),
            &uid(1),
            "etcd",
            &format!("cri-o://{}", cid(1)),
            Some(&static_hash),
        ),
    ];
    let api = FakeApi::start(listed);
    let dir = TempDir::new(&format!("{pid}-kubeapi"));
    let kubeconfig = dir.path().join("kubeconfig");
    fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user:\n    token: {TOKEN}\n",
            api.port
        ),
    )
    .expect("writing the kubeconfig");
    let empty_logs = dir.path().join("no-logs");
    fs::create_dir_all(&empty_logs).expect("empty log dir");
    let empty = empty_logs.to_str().expect("utf-8 path");

    let world = World::new(WorldConfig::default());
    let daemon = Daemon::start_with(&[
        "--kube-api",
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8 path"),
        "--node-name",
        &node,
        "--pod-log-dir",
        empty,
        "--container-log-dir",
        empty,
    ]);

    // The list and the watch asked only for this node's pods, with the token.
    let selector = format!("fieldSelector=spec.nodeName%3D{node}");
    let list = api.wait_request("LIST", |r| {
        r.starts_with("GET /api/v1/pods?") && !r.contains("watch=")
    });
    assert!(list.contains(&selector), "{list}");
    let watch = api.wait_request("WATCH", |r| {
        r.starts_with("GET /api/v1/pods?") && (r.contains("watch=true") || r.contains("watch=1"))
    });
    assert!(watch.contains(&selector), "{watch}");
    assert!(
        watch.contains("resourceVersion=100"),
        "resumes from the list: {watch}"
    );
    assert!(
        daemon.stderr().contains("--kube-api: listed the pods"),
        "{}",
        daemon.stderr()
    );

    let mut cgroups = CreatedCgroups::default();
    let prefix = format!("dp-kubeapi-{pid}");
    let u0 = uid(0).replace('-', "_");
    let cases = [
        (
            format!(
                "{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u0}.slice/cri-containerd-{}.scope",
                cid(0)
            ),
            ("shop", "web-0".to_owned(), uid(0), "app", cid(0)),
        ),
        (
            format!("{prefix}/kubepods/pod{static_hash}/{}", cid(1)),
            (
                "kube-system",
                format!("etcd-{node}"),
                static_hash.clone(),
                "etcd",
                cid(1),
            ),
        ),
    ];
    for (layout, (namespace, name, pod_uid, container, container_id)) in &cases {
        let leaf = cgroups.make(layout);
        let record = named_record(&daemon, &world, leaf);
        let what = format!("record of {layout}: {record}");
        assert_eq!(record["pod"]["namespace"], *namespace, "{what}");
        assert_eq!(record["pod"]["name"], name.as_str(), "{what}");
        assert_eq!(record["pod"]["uid"], pod_uid.as_str(), "{what}");
        assert_eq!(record["container"]["id"], container_id.as_str(), "{what}");
        assert_eq!(record["container"]["name"], *container, "{what}");
    }

    // A pod scheduled after the daemon started: ADDED on the watch stream, then its query.
    api.send_event(
        "ADDED",
        &pod_json(
            &node,
            "batch",
            "job-7",
            &uid(2),
            "worker",
            &format!("docker://{}", cid(2)),
            None,
        ),
    );
    let u2 = uid(2).replace('-', "_");
    let leaf = cgroups.make(&format!(
        "{prefix}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u2}.slice/docker-{}.scope",
        cid(2)
    ));
    let record = named_record(&daemon, &world, leaf);
    assert_eq!(record["pod"]["namespace"], "batch", "{record}");
    assert_eq!(record["pod"]["name"], "job-7", "{record}");
    assert_eq!(record["pod"]["uid"], uid(2).as_str(), "{record}");
    assert_eq!(record["container"]["name"], "worker", "{record}");

    // The bookmark and the events were understood: no watch error was reported.
    let stderr = daemon.stderr();
    assert!(!stderr.contains("watching pods"), "{stderr}");

    drop(cgroups);
    daemon.stop();
    drop(api);
}

#[test]
fn a_missing_node_name_or_bad_kubeconfig_fails_at_start_up_naming_the_flag() {
    // No kernel needed: both fail before anything is attached... but only as root does the
    // daemon get that far (it checks its privileges first).
    if skip_unless_root("a_missing_node_name_or_bad_kubeconfig_fails_at_start_up_naming_the_flag") {
        return;
    }
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_dnsprobe"))
            .arg("run")
            .args(args)
            .env_remove("NODE_NAME")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running dnsprobe")
    };
    let out = run(&["--kube-api"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--node-name"), "{stderr}");

    let out = run(&[
        "--kube-api",
        "--node-name",
        "n1",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--kube-api"), "{stderr}");
    assert!(stderr.contains("/nonexistent/kubeconfig"), "{stderr}");
}
