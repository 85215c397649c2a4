//! Start, stop and coexistence: two daemons at once both see the traffic (their programs are
//! multi-attached, next to each other and to anything else on the cgroup); SIGINT and SIGTERM
//! detach the programs and print the final summary within a second; nothing stays attached
//! (checked with bpftool); a daemon started right after works.
//!
//! It counts the programs attached to the cgroup v2 root, which other daemons would change, so
//! it is a test binary of its own (test binaries run one after another).

mod support;

use std::time::Duration;

use support::{cgroup2_root, skip_unless_root, Daemon, World, WorldConfig, RECORD_TIMEOUT, WWW};

/// Names of dnsprobe's programs attached to the cgroup v2 root, one per attachment, from
/// `bpftool cgroup show` (its name column is truncated to 15 characters by the kernel).
fn attached_dnsprobe_programs() -> Vec<String> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup2_root())
        .output()
        .expect("running bpftool (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "bpftool cgroup show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool JSON ({e}): {text}"))
    };
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| n.starts_with("dns_egress") || n.starts_with("dns_ingress"))
        .map(str::to_owned)
        .collect()
}

/// Whether a dnsprobe drop program is still loaded anywhere.
fn drop_program_loaded() -> bool {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .expect("running bpftool");
    // A failing bpftool must not read as "nothing loaded".
    assert!(
        out.status.success(),
        "bpftool prog show failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("bpftool JSON ({e}): {text}"))
    };
    value
        .as_array()
        .into_iter()
        .flatten()
        .any(|p| p["name"].as_str() == Some("dns_drop"))
}

fn dig_and_wait(world: &World, daemons: &[&Daemon], name: &str) {
    let server = format!("@{}", world.server_v4);
    world
        .run_client(&["dig", &server, name, "A", "+tries=1", "+time=2"])
        .assert_success();
    for (i, daemon) in daemons.iter().enumerate() {
        daemon.wait_for(
            &world.cgroup.path,
            &format!("daemon {i}'s record of {name}"),
            |records| records.iter().any(|r| r.qname == name),
            RECORD_TIMEOUT,
        );
    }
}

#[test]
fn two_daemons_coexist_stop_cleanly_and_a_third_starts_after() {
    if skip_unless_root("two_daemons_coexist_stop_cleanly_and_a_third_starts_after") {
        return;
    }
    let world = World::new(WorldConfig::default());
    let before = attached_dnsprobe_programs();
    assert!(
        before.is_empty(),
        "dnsprobe programs already attached before the test: {before:?}"
    );

    let first = Daemon::start();
    let second = Daemon::start();
    let attached = attached_dnsprobe_programs();
    assert_eq!(
        attached.len(),
        4,
        "two daemons should have two programs each on the root: {attached:?}"
    );
    assert!(drop_program_loaded(), "the drop program is not loaded");
    dig_and_wait(&world, &[&first, &second], WWW);

    // SIGINT: detached and summarised within a second, the other daemon unharmed.
    let stopped = first.stop_with(libc::SIGINT);
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "exit after SIGINT: {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert!(
        stopped.took < Duration::from_secs(1),
        "SIGINT took {:?}",
        stopped.took
    );
    assert!(stopped.stderr.contains("summary:"), "{}", stopped.stderr);
    assert_eq!(attached_dnsprobe_programs().len(), 2);
    let name = format!("after-first.{}", WWW);
    dig_and_wait(&world, &[&second], &name);

    // SIGTERM: the same, and then nothing of dnsprobe is left in the kernel.
    let stopped = second.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "exit after SIGTERM: {:?}\n{}",
        stopped.status,
        stopped.stderr
    );
    assert!(
        stopped.took < Duration::from_secs(1),
        "SIGTERM took {:?}",
        stopped.took
    );
    assert!(stopped.stderr.contains("summary:"), "{}", stopped.stderr);
    let left = attached_dnsprobe_programs();
    assert!(left.is_empty(), "programs left attached: {left:?}");
    // Program objects go when their last reference does; the kernel frees them at once.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while drop_program_loaded() {
        assert!(
            std::time::Instant::now() < deadline,
            "the drop program is still loaded after both daemons exited"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A daemon started right after works.
    let third = Daemon::start();
    let name = format!("after-second.{}", WWW);
    dig_and_wait(&world, &[&third], &name);
    third.stop();
    assert!(attached_dnsprobe_programs().is_empty());
}
