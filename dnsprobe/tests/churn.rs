//! Pod churn: 1,000 cgroups are created, each used for one DNS query and removed. Every record
//! keeps the cgroup it was made in, and the daemon's caches (cgroup paths, workloads, process
//! names, resolver configurations) grow while the cgroups live and shrink back to at most their
//! starting size once they are gone.
//!
//! Cache sizes come from the daemon's periodic stats line, which covers the whole machine: this
//! is a test binary of its own (test binaries run one after another).

mod support;

use std::{
    collections::HashMap,
    fs,
    time::{Duration, Instant},
};

use support::{
    cgroup2_root, client_command_in, skip_unless_root, Cgroup, Daemon, World, WorldConfig,
};

const CGROUPS: usize = 1000;
/// Clients running at once: enough to finish in seconds on two cores, few enough to be kind.
const BATCH: usize = 50;
const CACHES: [&str; 4] = [
    "cgroups_known",
    "workloads_known",
    "processes_known",
    "resolver_configs",
];

/// Cache sizes from the last `stats:` line of the daemon's stderr.
fn cache_sizes(stderr: &str) -> Option<HashMap<&'static str, u64>> {
    let line = stderr.lines().rev().find(|l| l.contains("stats:"))?;
    let mut sizes = HashMap::new();
    for key in CACHES {
        let value = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))?
            .parse()
            .ok()?;
        sizes.insert(key, value);
    }
    Some(sizes)
}

/// Waits for a stats line newer than the current last one and returns its sizes.
fn next_sizes(daemon: &Daemon) -> HashMap<&'static str, u64> {
    let seen = daemon.stderr().matches("stats:").count();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stderr = daemon.stderr();
        if stderr.matches("stats:").count() > seen {
            if let Some(sizes) = cache_sizes(&stderr) {
                return sizes;
            }
        }
        assert!(Instant::now() < deadline, "no new stats line:\n{stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The daemon's lines about `cgroup_path`, once its query record is out (or after a deadline):
/// when a client fails, the daemon's account of its queries says why.
fn daemon_lines_of(daemon: &Daemon, cgroup_path: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lines: Vec<(serde_json::Value, String)> = daemon
            .lines()
            .into_iter()
            .filter(|(v, _)| v["cgroup_path"] == cgroup_path)
            .collect();
        if lines.iter().any(|(v, _)| v["event"] == "query") || Instant::now() >= deadline {
            return lines.into_iter().map(|(_, l)| l + "\n").collect();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thousand_short_lived_cgroups_keep_attribution_and_caches_shrink_back() {
    if skip_unless_root("a_thousand_short_lived_cgroups_keep_attribution_and_caches_shrink_back") {
        return;
    }
    let world = World::new(WorldConfig::default());
    let daemon = Daemon::start_with(&["--state-grace", "1s", "--stats-interval", "1s"]);
    let server = format!("@{}", world.server_v4);
    // Warm the caches with the world's own cgroup, then take the starting sizes.
    world
        .run_client(&[
            "dig",
            &server,
            "www.test.internal",
            "A",
            "+tries=1",
            "+time=2",
        ])
        .assert_success();
    let start = next_sizes(&daemon);

    let prefix = format!("dp-churn-{}", std::process::id());
    let prefix_dir = cgroup2_root().join(&prefix);
    fs::create_dir(&prefix_dir).expect("prefix cgroup");
    let prefix_guard = Cgroup {
        dir: prefix_dir,
        path: format!("/{prefix}"),
    };
    // All cgroups live through the queries, then go together: while they live the cgroup cache
    // must hold them all, once they are gone it must let them go.
    let mut cgroups = Vec::with_capacity(CGROUPS);
    for n in 0..CGROUPS {
        let rel = format!("{prefix}/pod{n}");
        let dir = cgroup2_root().join(&rel);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        cgroups.push(Cgroup {
            dir,
            path: format!("/{rel}"),
        });
    }
    let mut expected: HashMap<String, u32> = HashMap::new();
    for batch in cgroups.chunks(BATCH) {
        let mut running = Vec::new();
        for cgroup in batch {
            let name = format!("churn{}.test.internal", expected.len());
            // Two tries: CI once saw one of these digs fail on a fresh machine, and a query lost
            // on the way is not what this test is about (the daemon only watches). Both tries
            // come from the same process, so attribution is checked all the same.
            let mut cmd = client_command_in(
                cgroup,
                &world.client_ns,
                &["dig", &server, &name, "A", "+tries=2", "+time=2"],
            );
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            let child = cmd.spawn().expect("spawning dig");
            expected.insert(cgroup.path.clone(), child.id());
            running.push((cgroup, child));
        }
        for (cgroup, child) in running {
            let out = child.wait_with_output().expect("waiting for dig");
            assert!(
                out.status.success(),
                "dig in {} failed ({}):\n{}{}\nwhat the daemon saw of it:\n{}",
                cgroup.path,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                daemon_lines_of(&daemon, &cgroup.path)
            );
        }
    }

    // Every query has its record, attributed to the cgroup it was made in (now gone).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found: HashMap<String, Option<u64>> = HashMap::new();
    while found.len() < CGROUPS {
        found.clear();
        for (v, _) in daemon.lines() {
            if v["event"] != "query" {
                continue;
            }
            if let Some(path) = v["cgroup_path"].as_str() {
                if expected.contains_key(path) {
                    found.insert(path.to_owned(), v["pid"].as_u64());
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "records for {} of {CGROUPS} cgroups; daemon stderr:\n{}",
            found.len(),
            daemon.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (path, pid) in &expected {
        assert_eq!(found[path], Some(u64::from(*pid)), "record of {path}");
    }
    let alive = next_sizes(&daemon);
    assert!(
        alive["cgroups_known"] >= start["cgroups_known"] + CGROUPS as u64,
        "the cgroup cache does not hold the live cgroups: {alive:?} vs start {start:?}"
    );
    // Siblings: any order goes; their parent last.
    drop(cgroups);
    drop(prefix_guard);

    // With the cgroups gone and the grace period over, the caches come back down.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = next_sizes(&daemon);
        if CACHES.iter().all(|k| now[k] <= start[k]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "caches did not shrink back: start {start:?}, with the cgroups {alive:?}, now {now:?}"
        );
    }
    let stopped = daemon.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "{}",
        stopped.stderr
    );
}
