//! Conntrack insert failures, forced for real: a pod netns resolves through a node netns that
//! DNATs the DNS service VIP to two backends (kube-proxy's iptables mode), while the node's
//! conntrack table is too small for the flows through it. New flows then fail to be confirmed
//! (`chaintoolong`), the kernel drops their first packet, and the client waits its retry
//! interval before it asks again: the classic 5 s DNS stall of Kubernetes pods.
//!
//! The table is made small through the machine-global hash size
//! (`/sys/module/nf_conntrack/parameters/hashsize`), which would disturb any other test that
//! relies on conntrack: that is why these tests are a binary of their own (cargo runs test
//! binaries one after another), why they hold a lock (in-process and a file lock, against a
//! second copy of this binary) while they run, and why the hash size is restored by a guard
//! that also runs when a test fails.
//!
//! They need root and skip with a message otherwise; CI runs them as root.

mod support;

use std::{
    collections::HashSet,
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd as _,
    path::Path,
    sync::{Mutex, MutexGuard},
};

use support::{
    conntrack_hashsize, conntrack_stats, musl_gai, netns_inode, parse_rfc3339_ns, skip_unless_root,
    ClientRun, ConntrackFlush, Daemon, HashsizeGuard, LookupRecord, NodeWorld, QueryRecord,
    DIAGNOSIS_CODES, HASHSIZE_SAVED, RECORD_TIMEOUT, WWW_V4,
};

/// Serialises the tests of this binary, and this binary against another copy of itself.
struct Serial {
    _in_process: MutexGuard<'static, ()>,
    /// flock(LOCK_EX) held while the file is open.
    _file: fs::File,
}

fn serial() -> Serial {
    static LOCK: Mutex<()> = Mutex::new(());
    let in_process = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let path = "/run/dnsprobe-test-conntrack.lock";
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {path}: {e}"));
    // SAFETY: a valid open fd; flock blocks until the lock is ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {path}: {}", std::io::Error::last_os_error());
    Serial {
        _in_process: in_process,
        _file: file,
    }
}

/// Unreplied UDP flows per flood: with 512 hash buckets, chains grow past the kernel's limit.
const FLOOD_FLOWS: u16 = 40_000;
/// Floods before the test gives up on forcing a failure (unreplied UDP flows expire after
/// 30 s, so a later round refills the table).
const FLOODS: usize = 3;
/// Lookups tried after each flood.
const LOOKUPS_PER_FLOOD: usize = 8;
/// musl's retry interval with `options timeout:1 attempts:5`.
const RESOLV: &str = "options timeout:1 attempts:5";

fn time_ns(time: &str) -> i128 {
    parse_rfc3339_ns(time).unwrap_or_else(|| panic!("`{time}` is not RFC 3339"))
}

fn is_symbolized(location: &str) -> bool {
    location.split_once("+0x").is_some_and(|(name, off)| {
        !name.is_empty()
            && !name.starts_with("0x")
            && !off.is_empty()
            && off.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A query record with a conntrack drop that the client followed by another send of the same
/// query: the drop, and the resend it caused, in one record.
fn resent_after_conntrack_drop(r: &QueryRecord) -> bool {
    let sends = r.send_times_ns();
    r.drops
        .iter()
        .any(|d| d.kind == "conntrack_insert_failed" && sends.iter().any(|&s| s > time_ns(&d.time)))
}

fn of_pid(records: &[QueryRecord], run: &ClientRun) -> Vec<QueryRecord> {
    records
        .iter()
        .filter(|r| r.pid == Some(run.pid))
        .cloned()
        .collect()
}

/// Runs musl's getaddrinfo for www in the pod and waits until both its queries have records
/// (answered, or ended by the daemon's query timeout).
fn resolve(world: &NodeWorld, daemon: &Daemon, gai: &str) -> (ClientRun, Vec<QueryRecord>) {
    let run = world.run_client(&[gai, "www.test.internal"]);
    let records = daemon.wait_for(
        &world.cgroup.path,
        &format!("the A and AAAA of pid {}", run.pid),
        |recs| {
            let mine = of_pid(recs, &run);
            mine.iter().any(|r| r.qtype == "A") && mine.iter().any(|r| r.qtype == "AAAA")
        },
        RECORD_TIMEOUT,
    );
    let mine = of_pid(&records, &run);
    (run, mine)
}

#[test]
fn conntrack_insert_failure_is_reported_linked_to_its_query_and_explains_the_wait() {
    if skip_unless_root(
        "conntrack_insert_failure_is_reported_linked_to_its_query_and_explains_the_wait",
    ) {
        return;
    }
    let _serial = serial();
    let gai = musl_gai().to_string_lossy().into_owned();
    let world = NodeWorld::new(RESOLV);
    let node_netns = netns_inode(&world.node_ns);
    let backends: HashSet<String> = world
        .backend_v4
        .iter()
        .map(|b| SocketAddr::new(IpAddr::V4(*b), 53).to_string())
        .collect();
    // Started after the node netns exists: the daemon's first conntrack baseline includes it.
    let daemon = Daemon::start();

    // Before the flood: a healthy lookup through the NAT.
    let (healthy, healthy_records) = resolve(&world, &daemon, &gai);
    healthy.assert_success();
    assert!(healthy.stdout.lines().any(|l| l == WWW_V4), "{healthy:?}");
    assert!(
        healthy_records.iter().all(|r| r.drops.is_empty()),
        "drops before the flood: {healthy_records:?}"
    );

    let before = conntrack_stats(&world.node_ns);
    let hashsize = HashsizeGuard::set("1");
    let old_hashsize = hashsize.old().to_owned();
    assert_ne!(
        conntrack_hashsize(),
        old_hashsize,
        "the hash size did not change"
    );
    let flush = ConntrackFlush(world.node_ns.clone());
    let mut runs: Vec<ClientRun> = Vec::new();
    let mut found = None;
    'floods: for round in 0..FLOODS {
        let start = conntrack_stats(&world.node_ns);
        world.flood(FLOOD_FLOWS);
        let after = conntrack_stats(&world.node_ns);
        // Premise (PLATFORM.md): a full table makes new flows fail in the node netns.
        assert!(
            after.insert_failed > start.insert_failed && after.chaintoolong > start.chaintoolong,
            "flood {round} made no conntrack insert fail: {start:?} -> {after:?}"
        );
        for _ in 0..LOOKUPS_PER_FLOOD {
            let (run, records) = resolve(&world, &daemon, &gai);
            let hit = records
                .iter()
                .find(|r| resent_after_conntrack_drop(r))
                .cloned();
            runs.push(run);
            if let Some(q) = hit {
                found = Some((runs.len() - 1, q));
                break 'floods;
            }
        }
    }
    // Restore the machine before looking closer (the guards would on a panic too).
    drop(flush);
    drop(hashsize);
    assert_eq!(conntrack_hashsize(), old_hashsize, "hash size not restored");
    let (run_index, dropped) = found.unwrap_or_else(|| {
        panic!(
            "no lookup of {} after {FLOODS} floods had a conntrack drop followed by a resend; \
             node conntrack {:?} -> {:?}",
            runs.len(),
            before,
            conntrack_stats(&world.node_ns)
        )
    });
    let run = &runs[run_index];

    let lookups = world.settle_lookups(&daemon);
    let records = daemon.records(&world.cgroup.path);
    let context = format!(
        "the query dropped and resent: {dropped:#?}\nlookups:\n{}\nquery records:\n{}",
        lookups
            .iter()
            .map(|l| format!("  {l:?}"))
            .collect::<Vec<_>>()
            .join("\n"),
        records
            .iter()
            .map(|r| format!("  {r:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };

    // Every drop of every query: a conntrack insert failure in the node netns, of that query's
    // packet (the client's address and port, the DNS id), already DNATed to a backend.
    for r in &records {
        let sends = r.send_times_ns();
        for d in &r.drops {
            check(d.packet == "query", format!("drop packet: {d:?}"));
            check(d.reason == "NETFILTER_DROP", format!("drop reason: {d:?}"));
            check(
                d.kind == "conntrack_insert_failed",
                format!("a drop during the flood is not conntrack_insert_failed: {d:?}"),
            );
            check(
                d.detail
                    .as_deref()
                    .is_some_and(|x| x.starts_with("chaintoolong")),
                format!("drop detail is not chaintoolong: {d:?}"),
            );
            check(is_symbolized(&d.location), format!("drop location: {d:?}"));
            check(
                d.netns == node_netns,
                format!("drop netns is not the node's ({node_netns}): {d:?}"),
            );
            check(
                d.src == r.client,
                format!("drop src is not the client {}: {d:?}", r.client),
            );
            check(
                backends.contains(&d.dst),
                format!("drop dst is no backend {backends:?}: {d:?}"),
            );
            check(
                d.dns_id == Some(r.id),
                format!("drop dns_id is not {}: {d:?}", r.id),
            );
            let t = time_ns(&d.time);
            check(
                t >= sends[0],
                format!("drop before the first send {sends:?}: {d:?}"),
            );
        }
        check(
            r.drops.len() <= sends.len(),
            format!("more drops than sends: {r:?}"),
        );
        let want_outcome = if r.rcode.is_some() {
            "answered"
        } else if r.drops.is_empty() {
            "unanswered"
        } else {
            "dropped"
        };
        check(
            r.outcome == want_outcome,
            format!("outcome, want {want_outcome}: {r:?}"),
        );
    }

    // The query found: its first conntrack drop, and the send after it.
    let sends = dropped.send_times_ns();
    let first_drop = dropped
        .drops
        .iter()
        .find(|d| d.kind == "conntrack_insert_failed")
        .expect("found by its drop");
    let drop_t = time_ns(&first_drop.time);
    let resend = *sends
        .iter()
        .find(|&&s| s > drop_t)
        .expect("found by its resend");
    let waited = u64::try_from(resend - sends[0]).expect("resend after the first send");
    // musl's retry interval is 200 ms here.
    check(
        (100_000_000..=1_000_000_000).contains(&waited),
        format!("the client waited {waited} ns before it resent"),
    );

    let mine: Vec<&LookupRecord> = lookups.iter().filter(|l| l.pid == Some(run.pid)).collect();
    check(
        mine.len() == 1,
        format!("lookups of pid {}: {}", run.pid, mine.len()),
    );
    if let Some(l) = mine.first() {
        let ct = l.diagnoses("conntrack_insert_failed");
        let total_drops: usize = of_pid(&records, run).iter().map(|r| r.drops.len()).sum();
        check(
            ct.len() == total_drops,
            format!(
                "{} conntrack_insert_failed diagnoses for {total_drops} drops",
                ct.len()
            ),
        );
        let about = ct.iter().find(|d| {
            d.evidence["id"].as_u64() == Some(u64::from(dropped.id))
                && d.evidence["resolver_waited_ns"].as_u64() == Some(waited)
        });
        check(
            about.is_some(),
            format!(
                "no conntrack_insert_failed for id {} saying the resolver waited {waited} ns",
                dropped.id
            ),
        );
        if let Some(d) = about {
            let e = &d.evidence;
            check(e["packet"] == "query", format!("evidence packet: {e}"));
            check(
                e["reason"] == "NETFILTER_DROP",
                format!("evidence reason: {e}"),
            );
            check(
                e["netns"].as_u64() == Some(u64::from(node_netns)),
                format!("evidence netns: {e}"),
            );
            check(
                e["detail"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("chaintoolong")),
                format!("evidence detail: {e}"),
            );
            check(
                d.message.contains("chaintoolong") && d.message.contains("waited"),
                format!(
                    "message does not say conntrack made the resolver wait: {}",
                    d.message
                ),
            );
        }
        // The resend is the timeout the drop caused.
        let resend_diag = l.diagnoses("resend_after_timeout");
        check(
            resend_diag.iter().any(|d| {
                d.evidence["resends"].as_array().is_some_and(|a| {
                    a.iter().any(|x| {
                        x["id"].as_u64() == Some(u64::from(dropped.id))
                            && x["waited_ns"].as_u64()
                                == Some(u64::try_from(sends[1] - sends[0]).unwrap_or(0))
                    })
                })
            }),
            format!(
                "no resend_after_timeout for id {}: {resend_diag:?}",
                dropped.id
            ),
        );
        check(
            !l.has("packet_drop"),
            format!("conntrack drops called packet_drop: {l:?}"),
        );
    }

    // Lookups without drops carry no drop diagnosis; the one before the flood carries none.
    for l in &lookups {
        let drops: usize = records
            .iter()
            .filter(|r| r.pid == l.pid)
            .map(|r| r.drops.len())
            .sum();
        if drops == 0 {
            check(
                !l.has("conntrack_insert_failed") && !l.has("packet_drop"),
                format!("a lookup without drops has a drop diagnosis: {l:?}"),
            );
        }
        check(
            !l.has("packet_drop"),
            format!("packet_drop during the flood: {l:?}"),
        );
    }
    let healthy_lookups: Vec<&LookupRecord> = lookups
        .iter()
        .filter(|l| l.pid == Some(healthy.pid))
        .collect();
    check(
        healthy_lookups.len() == 1,
        format!("lookups of the healthy client: {}", healthy_lookups.len()),
    );
    for l in healthy_lookups {
        check(
            DIAGNOSIS_CODES.iter().all(|c| !l.has(c)),
            format!("the lookup before the flood has a diagnosis: {l:?}"),
        );
    }
    // Every drop of the client's DNS was linked to its query.
    let unlinked = daemon.drop_events(&[IpAddr::V4(world.client_v4)]);
    check(
        unlinked.is_empty(),
        format!("drops not linked to a query: {unlinked:?}"),
    );

    if !failures.is_empty() {
        panic!(
            "{} expectation(s) failed:\n- {}\n\n{context}",
            failures.len(),
            failures.join("\n- ")
        );
    }
}

/// The guard that changes the hash size restores it when the test holding it panics.
#[test]
fn hashsize_is_restored_when_a_test_fails() {
    if skip_unless_root("hashsize_is_restored_when_a_test_fails") {
        return;
    }
    let _serial = serial();
    let before = conntrack_hashsize();
    let outcome = std::panic::catch_unwind(|| {
        let _guard = HashsizeGuard::set("1");
        assert_ne!(conntrack_hashsize(), before, "the hash size did not change");
        panic!("a conntrack test failing on purpose (this panic is expected)");
    });
    let payload = outcome.expect_err("the closure panics");
    let message = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    assert!(
        message.contains("on purpose"),
        "it failed otherwise: {message}"
    );
    assert_eq!(
        conntrack_hashsize(),
        before,
        "the hash size was not restored"
    );
    assert!(
        !Path::new(HASHSIZE_SAVED).exists(),
        "the saved value was left behind after a successful restore"
    );
}
