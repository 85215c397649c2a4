//! Least privilege: dnsprobe captures with exactly CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (on
//! kernels that charge BPF memory to the memory cgroup, as this one does), and without any one
//! of them it refuses to start with a message naming the missing capability.

mod support;

use std::time::Duration;

use support::{counter, skip_unless_root, Daemon, World, WorldConfig, RECORD_TIMEOUT, WWW};

const NEEDED: [&str; 3] = ["bpf", "perfmon", "net_admin"];

/// `setpriv` arguments that leave the process exactly `caps` (as root, permitted and effective
/// capabilities after exec are the bounding set).
fn setpriv(caps: &[&str]) -> Vec<String> {
    let set: Vec<String> = caps.iter().map(|c| format!("+{c}")).collect();
    let bounding = if set.is_empty() {
        "-all".to_owned()
    } else {
        format!("-all,{}", set.join(","))
    };
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={bounding}"),
    ]
}

#[test]
fn captures_with_only_the_documented_capabilities() {
    if skip_unless_root("captures_with_only_the_documented_capabilities") {
        return;
    }
    let world = World::new(WorldConfig::default());
    let wrapper = setpriv(&NEEDED);
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let daemon = Daemon::try_start_wrapped(&wrapper, &[])
        .unwrap_or_else(|e| panic!("dnsprobe did not start with {NEEDED:?}: {e}"));
    // The capabilities really are that narrow.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).expect("daemon status");
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .expect("CapEff");
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(eff, (1 << 12) | (1 << 38) | (1 << 39), "CapEff {eff:#x}");

    let server = format!("@{}", world.server_v4);
    let run = world.run_client(&["dig", &server, WWW, "A", "+tries=1", "+time=2"]);
    run.assert_success();
    let records = daemon.wait_for(
        &world.cgroup.path,
        "the dig record",
        |r| r.iter().any(|r| r.qname == WWW),
        RECORD_TIMEOUT,
    );
    let r = records.iter().find(|r| r.qname == WWW).expect("record");
    assert_eq!(r.rcode.as_deref(), Some("NOERROR"), "{r:?}");
    assert_eq!(r.pid, Some(run.pid), "{r:?}");
    assert_eq!(
        r.cgroup_path.as_deref(),
        Some(world.cgroup.path.as_str()),
        "{r:?}"
    );
    let stopped = daemon.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    // Without CAP_DAC_READ_SEARCH the cgroup above was found by reading the tree, and the
    // daemon said why.
    assert!(
        counter(&stopped.stderr, "summary:", "cgroup_walks").is_some_and(|w| w > 0),
        "{}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("CAP_DAC_READ_SEARCH"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn each_missing_capability_is_named_at_start_up() {
    if skip_unless_root("each_missing_capability_is_named_at_start_up") {
        return;
    }
    for missing in NEEDED {
        let caps: Vec<&str> = NEEDED.iter().copied().filter(|c| *c != missing).collect();
        let mut cmd = std::process::Command::new("setpriv");
        cmd.args(&setpriv(&caps)[1..])
            .arg(env!("CARGO_BIN_EXE_dnsprobe"))
            .args(["run", "--format", "json", "--output", "/dev/null"]);
        let started = std::time::Instant::now();
        let out = cmd.output().expect("running setpriv");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let name = format!("CAP_{}", missing.to_ascii_uppercase());
        assert!(!out.status.success(), "started without {name}: {stderr}");
        assert!(
            stderr.contains(&name),
            "the error does not name {name}: {stderr}"
        );
        assert!(
            !stderr.contains("capture started"),
            "capture started without {name}: {stderr}"
        );
        assert!(started.elapsed() < Duration::from_secs(5), "slow refusal");
    }
}
