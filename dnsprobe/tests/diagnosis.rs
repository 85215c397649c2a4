//! Lookups and their diagnosis, end to end against the real kernel with real peers: musl and
//! glibc clients in a pod-like netns (search list, ndots:5) behind unbound as the cluster DNS,
//! a scripted upstream, iptables, a client that gives up before its answer comes, a truncated
//! answer and the TCP fallback, a server that never answers.
//!
//! Each diagnosis code is provoked by one test here and shown absent on healthy lookups by
//! `healthy_lookups_have_no_diagnosis` (and, for contrast, on the other lookups of each test).
//! `conntrack_insert_failed` is provoked in `conntrack_race.rs`, which changes machine-global
//! state and so runs as its own binary.
//!
//! They need root (eBPF, namespaces) and skip with a message otherwise; CI runs them as root.

mod support;

use std::{net::IpAddr, time::Duration};

use serde_json::{json, Value};
use support::{
    glibc_gai, musl_gai, netns_inode, parse_rfc3339_ns, skip_unless_root, ClientRun, Daemon,
    Family, IptablesRule, LookupRecord, QueryRecord, Resolver, Script, ScriptedServer, World,
    WorldConfig, BIG, BIG_V4, DIAGNOSIS_CODES, RECORD_TIMEOUT, WWW, WWW_V4, WWW_V6,
};

/// resolv.conf of a pod in namespace `shop`, as the kubelet writes it.
const POD_RESOLV: &str =
    "search shop.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5";
const POD_SEARCH: [&str; 3] = [
    "shop.svc.cluster.local.",
    "svc.cluster.local.",
    "cluster.local.",
];
/// An external name the upstream knows; fewer than five dots, so it is searched first.
const API: &str = "api.example.com.";
const API_V4: &str = "198.51.100.7";
/// How long the upstream takes to fail AAAA queries for [`API`].
const AAAA_SERVFAIL_AFTER: Duration = Duration::from_millis(1500);
/// The daemon's default `--slow-threshold`.
const SLOW_THRESHOLD_NS: u64 = 500_000_000;
/// How far a lookup's duration may be from what the client measured around getaddrinfo: the
/// client's clock starts before its first send and stops after its last receive (both on
/// CLOCK_MONOTONIC, the kernel's packet clock).
const DURATION_SLACK_NS: u64 = 50_000_000;

// ---------------------------------------------------------------------------------------------
// Helpers

/// Collects failed expectations, so that one run reports everything that is wrong with a record
/// instead of the first thing only.
struct Checks {
    failures: Vec<String>,
}

impl Checks {
    fn new() -> Self {
        Self {
            failures: Vec::new(),
        }
    }

    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }

    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, actual: T, expected: T) {
        if actual != expected {
            self.failures
                .push(format!("{what}: got {actual:?}, want {expected:?}"));
        }
    }

    /// Panics with every failure and the records they are about.
    fn finish(self, context: &str) {
        if !self.failures.is_empty() {
            panic!(
                "{} expectation(s) failed:\n- {}\n\n{context}",
                self.failures.len(),
                self.failures.join("\n- ")
            );
        }
    }
}

fn show<T: std::fmt::Debug>(what: &str, items: &[T]) -> String {
    let mut out = format!("{what}:\n");
    for item in items {
        out.push_str(&format!("  {item:?}\n"));
    }
    out
}

fn of_pid(records: &[QueryRecord], run: &ClientRun) -> Vec<QueryRecord> {
    records
        .iter()
        .filter(|r| r.pid == Some(run.pid))
        .cloned()
        .collect()
}

fn lookups_of(lookups: &[LookupRecord], run: &ClientRun) -> Vec<LookupRecord> {
    lookups
        .iter()
        .filter(|l| l.pid == Some(run.pid))
        .cloned()
        .collect()
}

/// Waits until the query records of `run`'s process satisfy `done`; returns them.
fn wait_for_queries(
    daemon: &Daemon,
    world: &World,
    run: &ClientRun,
    what: &str,
    done: impl Fn(&[QueryRecord]) -> bool,
) -> Vec<QueryRecord> {
    let records = daemon.wait_for(
        &world.cgroup.path,
        &format!("{what} (pid {} {:?})", run.pid, run.argv),
        |recs| done(&of_pid(recs, run)),
        RECORD_TIMEOUT,
    );
    of_pid(&records, run)
}

/// `name+0xoffset`, as the daemon writes a kernel code location it found in /proc/kallsyms.
fn is_symbolized(location: &str) -> bool {
    location.split_once("+0x").is_some_and(|(name, off)| {
        !name.is_empty()
            && !name.starts_with("0x")
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
            && !off.is_empty()
            && off.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

fn time_ns(time: &str) -> i128 {
    parse_rfc3339_ns(time).unwrap_or_else(|| panic!("`{time}` is not RFC 3339"))
}

/// When the response of an answered query arrived (ns since the epoch, kernel clock).
fn response_ns(r: &QueryRecord) -> i128 {
    time_ns(&r.time) + i128::from(r.latency_ns.unwrap_or_else(|| panic!("unanswered: {r:?}")))
}

fn lower(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The codes a lookup must not carry.
fn check_absent(c: &mut Checks, l: &LookupRecord, codes: &[&str]) {
    for code in codes {
        c.check(!l.has(code), || {
            format!("lookup of {} has `{code}`: {:?}", l.name, l.diagnoses(code))
        });
    }
}

/// Checks common to every lookup record of a client: who, where, when, resolver config.
fn check_identity(c: &mut Checks, world: &World, l: &LookupRecord, run: &ClientRun) {
    c.eq("lookup event", l.event.as_str(), "lookup");
    c.eq("lookup pid", l.pid, Some(run.pid));
    c.eq(
        "lookup cgroup_path",
        l.cgroup_path.as_deref(),
        Some(world.cgroup.path.as_str()),
    );
    c.eq("lookup cgroup_id", l.cgroup_id, world.cgroup.id());
}

/// A pod-like world: pod resolv.conf, unbound as the cluster DNS, a scripted upstream and a
/// pause process.
struct Pod {
    _pause: support::Pause,
    upstream: ScriptedServer,
    world: World,
}

fn alpine_pod() -> Pod {
    let world = World::new(WorldConfig {
        resolver: Resolver::ClusterDns,
        nameserver: Family::V4,
        resolv_extra: POD_RESOLV,
    });
    // The upstream: A at once, AAAA SERVFAIL after 1.5 s (the case of an upstream that fails
    // IPv6 slowly). unbound as the cluster DNS relays that SERVFAIL and keeps it cached for a
    // few seconds, so the client's retries get it back at once.
    let upstream = ScriptedServer::start_upstream(
        &world,
        vec![(
            API,
            Script::ByType {
                a: Box::new(Script::Answer {
                    addrs: vec![API_V4.parse().unwrap()],
                    delay: Duration::ZERO,
                }),
                aaaa: Box::new(Script::Servfail {
                    delay: AAAA_SERVFAIL_AFTER,
                }),
            },
        )],
    );
    let pause = world.start_pause();
    Pod {
        world,
        upstream,
        _pause: pause,
    }
}

/// The search-list expansions of [`API`] the pod's resolv.conf makes, in order.
fn api_expansions() -> Vec<String> {
    POD_SEARCH.iter().map(|d| format!("{API}{d}")).collect()
}

/// What every client asks in the Alpine pod before it asks [`API`] itself: A and AAAA of each
/// expansion, NXDOMAIN at once from the cluster DNS. Checks the world, not the daemon.
fn assert_expansion_queries(records: &[QueryRecord]) {
    for name in api_expansions() {
        for qtype in ["A", "AAAA"] {
            let found: Vec<&QueryRecord> = records
                .iter()
                .filter(|r| r.qname == name && r.qtype == qtype)
                .collect();
            assert_eq!(found.len(), 1, "{qtype} {name}: {found:?}");
            assert_eq!(
                found[0].rcode.as_deref(),
                Some("NXDOMAIN"),
                "{:?}",
                found[0]
            );
        }
    }
}

/// The diagnosis every Alpine-pod lookup of [`API`] must have, whatever the client library:
/// the six expansions and the slow SERVFAIL of the upstream.
fn check_expansion_and_slow_upstream(
    c: &mut Checks,
    world: &World,
    l: &LookupRecord,
    records: &[QueryRecord],
) {
    c.eq("search_expansions", l.search_expansions, 6);
    match &l.resolver {
        Some(r) => {
            c.eq(
                "resolver.search",
                r.search.clone(),
                POD_SEARCH.map(String::from).to_vec(),
            );
            c.eq("resolver.ndots", r.ndots, 5);
        }
        None => c.check(false, || "lookup has no resolver config".into()),
    }
    let first = records
        .iter()
        .map(|r| time_ns(&r.time))
        .min()
        .expect("records");
    c.eq("lookup time (the first send)", time_ns(&l.time), first);
    if l.has("search_list_expansion") {
        let e = &l.diagnosis("search_list_expansion").evidence;
        c.eq(
            "search_list_expansion extra_queries",
            e["extra_queries"].as_u64(),
            Some(6),
        );
        c.eq(
            "search_list_expansion names",
            lower(&e["names"]),
            api_expansions(),
        );
        c.eq(
            "search_list_expansion rcodes",
            lower(&e["rcodes"]),
            vec!["NXDOMAIN".to_owned(); 6],
        );
        c.eq("search_list_expansion ndots", e["ndots"].as_u64(), Some(5));
        // From the first expansion to the first query for the name itself.
        let own = records
            .iter()
            .filter(|r| r.qname == API)
            .map(|r| time_ns(&r.time))
            .min()
            .expect("a query for the name itself");
        c.eq(
            "search_list_expansion cost_ns",
            e["cost_ns"].as_u64().map(i128::from),
            Some(own - first),
        );
    } else {
        c.check(false, || "no search_list_expansion diagnosis".into());
    }
    let slow: Vec<&QueryRecord> = records
        .iter()
        .filter(|r| r.latency_ns.is_some_and(|l| l >= SLOW_THRESHOLD_NS))
        .collect();
    let slow_diags = l.diagnoses("slow_upstream");
    c.eq("slow_upstream diagnoses", slow_diags.len(), 1);
    if let Some(d) = slow_diags.first() {
        let e = &d.evidence;
        c.eq(
            "slow_upstream server",
            e["server"].as_str().map(str::to_owned),
            Some(world.server_field(Family::V4)),
        );
        c.eq(
            "slow_upstream count",
            e["count"].as_u64(),
            Some(slow.len() as u64),
        );
        c.eq(
            "slow_upstream max_latency_ns",
            e["max_latency_ns"].as_u64(),
            slow.iter().filter_map(|r| r.latency_ns).max(),
        );
        c.eq(
            "slow_upstream threshold_ns",
            e["threshold_ns"].as_u64(),
            Some(SLOW_THRESHOLD_NS),
        );
    }
}

fn check_duration(c: &mut Checks, l: &LookupRecord, client_ns: u64) {
    c.check(
        l.duration_ns.abs_diff(client_ns) <= DURATION_SLACK_NS,
        || {
            format!(
                "lookup duration_ns {} is not what the client measured around getaddrinfo ({} ns, \
             allowed difference {DURATION_SLACK_NS} ns)",
                l.duration_ns, client_ns
            )
        },
    );
}

// ---------------------------------------------------------------------------------------------
// The Alpine case

/// musl in a pod (ndots:5, three search domains) asks for an external name whose AAAA the
/// upstream fails slowly. musl asks A and AAAA of every expansion, then of the name; it does not
/// accept a SERVFAIL: it asks again at once (a few times), again at each retry interval
/// (timeout / attempts = 2.5 s), and gives up after its 5 s timeout. One lookup record must tell
/// all of that, and last as long as the client waited.
#[test]
fn alpine_musl_lookup_shows_expansions_servfail_retries_and_the_clients_wait() {
    if skip_unless_root("alpine_musl_lookup_shows_expansions_servfail_retries_and_the_clients_wait")
    {
        return;
    }
    let gai = musl_gai().to_string_lossy().into_owned();
    let pod = alpine_pod();
    let world = &pod.world;
    let daemon = Daemon::start();
    let run = world.run_client(&[&gai, "api.example.com"]);
    let client_ns = run.getaddrinfo_ns();
    // Premises about the world and musl (not the daemon): the upstream was slow, and musl
    // waited for its whole timeout because no AAAA answer was acceptable.
    assert!(
        client_ns >= AAAA_SERVFAIL_AFTER.as_nanos() as u64,
        "musl returned after {client_ns} ns: {run:?}"
    );
    wait_for_queries(&daemon, world, &run, "musl's queries", |recs| {
        recs.iter().any(|r| r.qname == API && r.qtype == "A")
            && recs
                .iter()
                .filter(|r| r.qname == API && r.qtype == "AAAA" && r.outcome == "answered")
                .count()
                >= 2
    });
    let lookups = world.settle_lookups(&daemon);
    // Everything the client sent has its record by now (see settle_lookups).
    let records = of_pid(&daemon.records(&world.cgroup.path), &run);
    let mine = lookups_of(&lookups, &run);
    let context = format!(
        "{}{}client: {client_ns} ns in getaddrinfo, {run:?}",
        show("lookups of the client", &mine),
        show("query records of the client", &records)
    );

    assert_expansion_queries(&records);
    let a: Vec<&QueryRecord> = records
        .iter()
        .filter(|r| r.qname == API && r.qtype == "A")
        .collect();
    assert_eq!(a.len(), 1, "{context}");
    assert_eq!(a[0].rcode.as_deref(), Some("NOERROR"), "{context}");
    let aaaa: Vec<&QueryRecord> = records
        .iter()
        .filter(|r| r.qname == API && r.qtype == "AAAA")
        .collect();
    assert!(
        aaaa.iter().all(|r| r.rcode.as_deref() == Some("SERVFAIL")),
        "{context}"
    );
    // musl asked again after SERVFAIL, on the same socket with the same id.
    assert!(aaaa.len() >= 2, "{context}");
    assert!(
        aaaa.iter()
            .all(|r| r.id == aaaa[0].id && r.client == aaaa[0].client),
        "{context}"
    );
    assert!(
        aaaa[0].latency_ns.unwrap_or_default() >= AAAA_SERVFAIL_AFTER.as_nanos() as u64,
        "{context}"
    );
    // The upstream saw the AAAA question once: the cluster DNS answered the retries.
    let upstream_aaaa = pod
        .upstream
        .served()
        .iter()
        .filter(|s| s.qname == API && s.qtype == "AAAA")
        .count();
    assert_eq!(upstream_aaaa, 1, "{context}");

    let mut c = Checks::new();
    let for_name: Vec<&LookupRecord> = mine.iter().filter(|l| l.name == API).collect();
    c.check(mine.len() == 1 && for_name.len() == 1, || {
        format!(
            "want exactly one lookup record of pid {} (for {API}), got {}: one getaddrinfo \
             call was split",
            run.pid,
            mine.len()
        )
    });
    let Some(l) = for_name.first() else {
        c.finish(&context);
        panic!("no lookup of {API}\n{context}");
    };
    check_identity(&mut c, world, l, &run);
    c.eq("lookup comm", l.comm.as_deref(), Some("gai-musl"));
    c.eq(
        "lookup queries (every query of the client)",
        l.queries,
        records.len(),
    );
    check_expansion_and_slow_upstream(&mut c, world, l, &records);
    // Every SERVFAIL but the last was followed by the same question again.
    if l.has("servfail_retry") {
        let e = &l.diagnosis("servfail_retry").evidence;
        c.eq(
            "servfail_retry retries",
            e["retries"].as_u64(),
            Some(aaaa.len() as u64 - 1),
        );
        c.eq(
            "servfail_retry questions",
            lower(&e["questions"]),
            vec![format!("AAAA {API}")],
        );
    } else {
        c.check(false, || "no servfail_retry diagnosis".into());
    }
    check_absent(
        &mut c,
        l,
        &[
            "conntrack_insert_failed",
            "packet_drop",
            "late_response",
            "truncated_tcp_fallback",
            "no_response",
        ],
    );
    check_duration(&mut c, l, client_ns);
    c.finish(&context);
}

/// The same pod and upstream with a glibc client: glibc takes the SERVFAIL of AAAA as final
/// once it has the A answer, so it does not ask again, and it returns after the 1.5 s of the
/// upstream, with the A address.
#[test]
fn alpine_pod_with_glibc_has_no_servfail_retry() {
    if skip_unless_root("alpine_pod_with_glibc_has_no_servfail_retry") {
        return;
    }
    let gai = glibc_gai().to_string_lossy().into_owned();
    let pod = alpine_pod();
    let world = &pod.world;
    let daemon = Daemon::start();
    let run = world.run_client(&[&gai, "api.example.com"]);
    run.assert_success();
    assert_eq!(run.stdout.trim(), API_V4, "{run:?}");
    let client_ns = run.getaddrinfo_ns();
    wait_for_queries(&daemon, world, &run, "glibc's queries", |recs| {
        recs.iter().any(|r| r.qname == API && r.qtype == "AAAA")
            && recs.iter().any(|r| r.qname == API && r.qtype == "A")
    });
    let lookups = world.settle_lookups(&daemon);
    let records = of_pid(&daemon.records(&world.cgroup.path), &run);
    let mine = lookups_of(&lookups, &run);
    let context = format!(
        "{}{}client: {} ns in getaddrinfo",
        show("lookups of the client", &mine),
        show("query records of the client", &records),
        client_ns
    );
    // glibc's pattern: A and AAAA of each expansion and of the name, each sent once; the slow
    // SERVFAIL is not asked again.
    assert_expansion_queries(&records);
    assert_eq!(records.len(), 8, "{context}");
    assert!(records.iter().all(|r| r.sends == 1), "{context}");
    let aaaa: Vec<&QueryRecord> = records
        .iter()
        .filter(|r| r.qname == API && r.qtype == "AAAA")
        .collect();
    assert_eq!(aaaa.len(), 1, "{context}");
    assert_eq!(aaaa[0].rcode.as_deref(), Some("SERVFAIL"), "{context}");
    assert!(
        client_ns >= AAAA_SERVFAIL_AFTER.as_nanos() as u64,
        "{context}"
    );

    let mut c = Checks::new();
    c.eq("lookups of the client", mine.len(), 1);
    let Some(l) = mine.first() else {
        c.finish(&context);
        return;
    };
    check_identity(&mut c, world, l, &run);
    c.eq("lookup name", l.name.as_str(), API);
    c.eq("lookup comm", l.comm.as_deref(), Some("gai-glibc"));
    c.eq("lookup queries", l.queries, 8);
    c.eq(
        "lookup final_rcode",
        l.final_rcode.as_deref(),
        Some("NOERROR"),
    );
    c.eq("lookup answers", l.answers.clone(), vec![API_V4.to_owned()]);
    check_expansion_and_slow_upstream(&mut c, world, l, &records);
    check_absent(
        &mut c,
        l,
        &[
            "servfail_retry",
            "conntrack_insert_failed",
            "packet_drop",
            "resend_after_timeout",
            "late_response",
            "truncated_tcp_fallback",
            "no_response",
        ],
    );
    check_duration(&mut c, l, client_ns);
    c.finish(&context);
}

// ---------------------------------------------------------------------------------------------
// Healthy lookups

/// Fully qualified names answered at once, asked by musl, glibc and dig from a pod with the
/// search list: one lookup each, no diagnosis at all, lasting what the client measured.
#[test]
fn healthy_lookups_have_no_diagnosis() {
    if skip_unless_root("healthy_lookups_have_no_diagnosis") {
        return;
    }
    let musl = musl_gai().to_string_lossy().into_owned();
    let glibc = glibc_gai().to_string_lossy().into_owned();
    let pod = alpine_pod();
    let world = &pod.world;
    let daemon = Daemon::start();
    let server = format!("@{}", world.server_v4);
    let runs = [
        world.run_client(&[&musl, WWW]),
        world.run_client(&[&glibc, WWW]),
        world.run_client(&["dig", &server, WWW, "A", "+tries=1", "+time=2"]),
    ];
    for run in &runs {
        run.assert_success();
        let want = if run.argv[0] == "dig" { 1 } else { 2 };
        wait_for_queries(&daemon, world, run, "the healthy queries", |recs| {
            recs.len() >= want
        });
    }
    let lookups = world.settle_lookups(&daemon);
    let records = daemon.records(&world.cgroup.path);
    let context = format!(
        "{}{}",
        show("lookups", &lookups),
        show("query records", &records)
    );
    let mut c = Checks::new();
    for run in &runs {
        let mine = lookups_of(&lookups, run);
        let queries = of_pid(&records, run);
        c.eq(&format!("lookups of {:?}", run.argv), mine.len(), 1);
        let Some(l) = mine.first() else { continue };
        check_identity(&mut c, world, l, run);
        c.eq("lookup name", l.name.as_str(), WWW);
        c.eq("lookup queries", l.queries, queries.len());
        c.eq("lookup search_expansions", l.search_expansions, 0);
        c.eq(
            "lookup final_rcode",
            l.final_rcode.as_deref(),
            Some("NOERROR"),
        );
        let mut answers = l.answers.clone();
        answers.sort();
        let want: Vec<String> = if run.argv[0] == "dig" {
            vec![WWW_V4.into()]
        } else {
            vec![WWW_V4.into(), WWW_V6.into()]
        };
        c.eq("lookup answers", answers, want);
        c.check(l.diagnosis.is_empty(), || {
            format!(
                "healthy lookup of {:?} has a diagnosis: {:?}",
                run.argv, l.diagnosis
            )
        });
        check_absent(&mut c, l, &DIAGNOSIS_CODES);
        if run.argv[0] == "dig" {
            let wall = u64::try_from(run.finished_ns - run.started_ns).unwrap_or(u64::MAX);
            c.check(l.duration_ns > 0 && l.duration_ns < wall, || {
                format!(
                    "dig lookup duration {} ns, dig ran {wall} ns",
                    l.duration_ns
                )
            });
        } else {
            let client_ns = run.getaddrinfo_ns();
            c.check(l.duration_ns > 0 && l.duration_ns <= client_ns, || {
                format!(
                    "lookup of {:?} lasted {} ns, longer than getaddrinfo ({client_ns} ns)",
                    run.argv, l.duration_ns
                )
            });
            check_duration(&mut c, l, client_ns);
        }
    }
    c.finish(&context);
}

// ---------------------------------------------------------------------------------------------
// Drops

/// An iptables rule in the server netns drops DNS from the client. The drops are netfilter
/// drops (`NETFILTER_DROP` at `nf_hook_slow`, just like a conntrack insert failure), but the
/// conntrack counters did not move, so they must not be called a conntrack failure.
#[test]
fn iptables_drop_rule_is_a_packet_drop_not_a_conntrack_failure() {
    if skip_unless_root("iptables_drop_rule_is_a_packet_drop_not_a_conntrack_failure") {
        return;
    }
    let gai = musl_gai().to_string_lossy().into_owned();
    // musl gives up after 1 s, having sent each query twice (retry interval 500 ms).
    let world = World::new(WorldConfig {
        resolv_extra: "options timeout:1 attempts:2",
        ..WorldConfig::default()
    });
    let client = world.client_v4.to_string();
    let _rule = IptablesRule::append(
        &world.server_ns,
        "filter",
        "INPUT",
        &["-p", "udp", "--dport", "53", "-s", &client, "-j", "DROP"],
    );
    let daemon = Daemon::start();
    let run = world.run_client(&[&gai, "www.test.internal"]);
    assert!(
        !run.status.success(),
        "got an answer through the DROP rule: {run:?}"
    );
    wait_for_queries(&daemon, &world, &run, "the dropped A and AAAA", |recs| {
        recs.len() >= 2
    });
    let lookups = world.settle_lookups(&daemon);
    // Read again after settling: the records written meanwhile belong to the check too.
    let records = of_pid(&daemon.records(&world.cgroup.path), &run);
    let mine = lookups_of(&lookups, &run);
    let context = format!(
        "{}{}",
        show("lookups of the client", &mine),
        show("query records of the client", &records)
    );
    let server_netns = netns_inode(&world.server_ns);
    let server = world.server_field(Family::V4);
    let mut c = Checks::new();
    c.eq("query records", records.len(), 2);
    for r in &records {
        c.eq("outcome", r.outcome.as_str(), "dropped");
        c.eq("rcode", r.rcode.as_deref(), None);
        c.eq("sends", r.sends, 2);
        c.eq("drops per query (one per send)", r.drops.len(), 2);
        let sends = r.send_times_ns();
        for (i, d) in r.drops.iter().enumerate() {
            c.eq("drop packet", d.packet.as_str(), "query");
            c.eq("drop reason", d.reason.as_str(), "NETFILTER_DROP");
            c.eq("drop kind", d.kind.as_str(), "netfilter_drop");
            c.check(
                !d.detail
                    .as_deref()
                    .unwrap_or_default()
                    .contains("chaintoolong"),
                || format!("drop detail blames conntrack: {d:?}"),
            );
            // A kernel symbol and offset: `nf_hook_slow+0x7d` (iptables-legacy) or
            // `nft_do_chain+0x46f` (iptables-nft).
            c.check(is_symbolized(&d.location), || {
                format!("drop location is not a symbol+offset: {d:?}")
            });
            c.eq("drop netns (the server's)", d.netns, server_netns);
            c.eq("drop src", d.src.as_str(), r.client.as_str());
            c.eq("drop dst", d.dst.as_str(), server.as_str());
            c.eq("drop dns_id", d.dns_id, Some(r.id));
            let t = time_ns(&d.time);
            c.check(
                sends.get(i).is_some_and(|&s| t >= s)
                    && sends.get(i + 1).is_none_or(|&next| t < next),
                || format!("drop {i} at {t} is not of send {i} ({sends:?})"),
            );
        }
    }
    c.eq("lookups of the client", mine.len(), 1);
    if let Some(l) = mine.first() {
        check_identity(&mut c, &world, l, &run);
        c.eq("lookup final_rcode", l.final_rcode.as_deref(), None);
        let drops = l.diagnoses("packet_drop");
        c.eq(
            "packet_drop diagnoses (one per dropped packet)",
            drops.len(),
            4,
        );
        for d in drops {
            let e = &d.evidence;
            c.check(
                records
                    .iter()
                    .any(|r| e["id"].as_u64() == Some(u64::from(r.id))),
                || format!("packet_drop of an unknown id: {d:?}"),
            );
            c.eq(
                "packet_drop reason",
                e["reason"].as_str(),
                Some("NETFILTER_DROP"),
            );
            c.eq("packet_drop packet", e["packet"].as_str(), Some("query"));
            c.eq(
                "packet_drop netns",
                e["netns"].as_u64(),
                Some(u64::from(server_netns)),
            );
            c.check(d.message.contains("NETFILTER_DROP"), || {
                format!("message: {d:?}")
            });
        }
        c.check(l.has("no_response"), || "no no_response diagnosis".into());
        if l.has("resend_after_timeout") {
            let resends = &l.diagnosis("resend_after_timeout").evidence["resends"];
            for r in &records {
                let sends = r.send_times_ns();
                let waited = sends.get(1).map(|s| (s - sends[0]) as u64);
                c.check(
                    resends.as_array().is_some_and(|a| {
                        a.iter().any(|x| {
                            x["id"].as_u64() == Some(u64::from(r.id))
                                && x["waited_ns"].as_u64() == waited
                        })
                    }),
                    || {
                        format!(
                            "resend_after_timeout lacks id {} waited {waited:?}: {resends}",
                            r.id
                        )
                    },
                );
            }
        } else {
            c.check(false, || "no resend_after_timeout diagnosis".into());
        }
        check_absent(
            &mut c,
            l,
            &[
                "conntrack_insert_failed",
                "late_response",
                "truncated_tcp_fallback",
            ],
        );
    }
    // Every drop of this client's DNS belonged to a pending query.
    let unlinked = daemon.drop_events(&[IpAddr::V4(world.client_v4)]);
    c.check(unlinked.is_empty(), || {
        format!("drops not linked to their query: {unlinked:?}")
    });
    c.finish(&context);
}

// ---------------------------------------------------------------------------------------------
// Late responses

/// A world whose scripted server answers `late.test.internal.` after `delay`, a daemon with
/// `args`, and a dig that gives up after 1 s: the answer reaches a closed socket.
struct Late {
    world: World,
    server: ScriptedServer,
    daemon: Daemon,
    run: ClientRun,
}

const LATE: &str = "late.test.internal.";

fn late_answer(delay: Duration, args: &[&str]) -> Late {
    let world = World::new(WorldConfig {
        resolver: Resolver::Scripted,
        ..WorldConfig::default()
    });
    let server = ScriptedServer::start(
        &world,
        vec![(
            LATE,
            Script::Answer {
                addrs: vec![WWW_V4.parse().unwrap()],
                delay,
            },
        )],
    );
    let daemon = Daemon::start_with(args);
    let run = world.dig(Family::V4, LATE, "A", 1);
    assert!(!run.status.success(), "dig got the late answer: {run:?}");
    Late {
        world,
        server,
        daemon,
        run,
    }
}

impl Late {
    /// The server's own view: when it received the query and sent the answer.
    fn served(&self) -> (i128, i128) {
        let served = self.server.served();
        let s = served
            .iter()
            .find(|s| s.qname == LATE)
            .unwrap_or_else(|| panic!("the server never saw {LATE}"));
        (s.rx_ns, s.tx_ns.expect("the server answered"))
    }
}

/// Checks a `late_response` diagnosis or event against the query and the server's log.
fn check_late_item(
    c: &mut Checks,
    id: u64,
    why: &str,
    after_ns: u64,
    q: &QueryRecord,
    served: (i128, i128),
) {
    c.eq("late response id", id, u64::from(q.id));
    // The client's socket is gone: the kernel drops the answer with NO_SOCKET.
    c.eq("late response why", why, "NO_SOCKET");
    let server_view = served.1 - served.0;
    c.check((i128::from(after_ns) - server_view).abs() < 20_000_000, || {
        format!(
            "late response after_first_send_ns {after_ns}, the server held the query {server_view} ns"
        )
    });
}

/// dig gives up after 1 s; the answer comes at 1.5 s, while the daemon still waits for it
/// (its query timeout is 2 s). The kernel drops it (NO_SOCKET) and the daemon ties that drop to
/// the query: the lookup says the answer came late and that the query got none, and does not
/// call it a network drop.
#[test]
fn answer_to_a_client_that_gave_up_is_a_late_response() {
    if skip_unless_root("answer_to_a_client_that_gave_up_is_a_late_response") {
        return;
    }
    let late = late_answer(Duration::from_millis(1500), &[]);
    let Late {
        world, daemon, run, ..
    } = &late;
    wait_for_queries(daemon, world, run, "dig's query", |recs| !recs.is_empty());
    let lookups = world.settle_lookups(daemon);
    let records = of_pid(&daemon.records(&world.cgroup.path), run);
    let mine = lookups_of(&lookups, run);
    let context = format!(
        "{}{}",
        show("lookups of dig", &mine),
        show("query records of dig", &records)
    );
    let mut c = Checks::new();
    c.eq("query records", records.len(), 1);
    let q = &records[0];
    c.eq("outcome", q.outcome.as_str(), "unanswered");
    c.eq("drops", q.drops.len(), 1);
    if let Some(d) = q.drops.first() {
        c.eq("drop packet", d.packet.as_str(), "response");
        c.eq("drop reason", d.reason.as_str(), "NO_SOCKET");
        c.eq("drop dst (the client)", d.dst.as_str(), q.client.as_str());
        c.eq("drop dns_id", d.dns_id, Some(q.id));
    }
    c.eq("lookups of dig", mine.len(), 1);
    if let Some(l) = mine.first() {
        check_identity(&mut c, world, l, run);
        c.eq("lookup name", l.name.as_str(), LATE);
        if l.has("late_response") {
            let items = &l.diagnosis("late_response").evidence["responses"];
            c.eq("late responses", items.as_array().map(Vec::len), Some(1));
            let item = &items[0];
            check_late_item(
                &mut c,
                item["id"].as_u64().unwrap_or_default(),
                item["why"].as_str().unwrap_or_default(),
                item["after_first_send_ns"].as_u64().unwrap_or_default(),
                q,
                late.served(),
            );
        } else {
            c.check(false, || "no late_response diagnosis".into());
        }
        c.check(l.has("no_response"), || "no no_response diagnosis".into());
        check_absent(
            &mut c,
            l,
            &[
                "packet_drop",
                "conntrack_insert_failed",
                "resend_after_timeout",
                "servfail_retry",
                "truncated_tcp_fallback",
            ],
        );
    }
    c.finish(&context);
}

/// The answer comes at 3 s, after the daemon's own 2 s query timeout ended the query. With a
/// lookup idle time (2.5 s) that keeps the lookup open until about 4.5 s, the late answer
/// joins it.
#[test]
fn answer_after_the_query_timeout_joins_the_open_lookup() {
    if skip_unless_root("answer_after_the_query_timeout_joins_the_open_lookup") {
        return;
    }
    let late = late_answer(Duration::from_secs(3), &["--lookup-idle", "2500ms"]);
    let Late {
        world, daemon, run, ..
    } = &late;
    wait_for_queries(daemon, world, run, "dig's query", |recs| !recs.is_empty());
    // The lookup closes 2.5 s after the query timed out; the late answer came before that.
    let lookup = daemon.wait_until("dig's lookup", RECORD_TIMEOUT, |d| {
        lookups_of(&d.lookups(&world.cgroup.path), run)
            .into_iter()
            .next()
    });
    let records = of_pid(&daemon.records(&world.cgroup.path), run);
    let context = format!(
        "lookup: {lookup:#?}\n{}",
        show("query records of dig", &records)
    );
    let mut c = Checks::new();
    c.eq("query records", records.len(), 1);
    let q = &records[0];
    c.eq("outcome", q.outcome.as_str(), "unanswered");
    c.check(q.drops.is_empty(), || {
        format!(
            "the query ended before its answer came, yet has drops: {:?}",
            q.drops
        )
    });
    if lookup.has("late_response") {
        let items = &lookup.diagnosis("late_response").evidence["responses"];
        c.eq("late responses", items.as_array().map(Vec::len), Some(1));
        let item = &items[0];
        check_late_item(
            &mut c,
            item["id"].as_u64().unwrap_or_default(),
            item["why"].as_str().unwrap_or_default(),
            item["after_first_send_ns"].as_u64().unwrap_or_default(),
            q,
            late.served(),
        );
    } else {
        c.check(false, || "no late_response diagnosis".into());
    }
    c.check(lookup.has("no_response"), || {
        "no no_response diagnosis".into()
    });
    check_absent(&mut c, &lookup, &["packet_drop", "conntrack_insert_failed"]);
    // It went into the lookup, so it is not also an event of its own.
    let events = daemon.late_events(world.cgroup.id());
    c.check(events.is_empty(), || {
        format!("late_response events: {events:?}")
    });
    c.finish(&context);
}

/// The answer comes at 3 s; with a short lookup idle time (100 ms) the lookup was written at
/// about 2.1 s, so the late answer is written as a `late_response` event of its own.
#[test]
fn answer_after_the_lookup_ended_is_a_late_response_event() {
    if skip_unless_root("answer_after_the_lookup_ended_is_a_late_response_event") {
        return;
    }
    let late = late_answer(Duration::from_secs(3), &["--lookup-idle", "100ms"]);
    let Late {
        world, daemon, run, ..
    } = &late;
    let records = wait_for_queries(daemon, world, run, "dig's query", |recs| !recs.is_empty());
    let q = records[0].clone();
    let event = daemon.wait_until("the late_response event", RECORD_TIMEOUT, |d| {
        d.late_events(world.cgroup.id()).into_iter().next()
    });
    let lookups = lookups_of(&daemon.lookups(&world.cgroup.path), run);
    let context = format!(
        "event: {event:?}\n{}query: {q:?}",
        show("lookups of dig", &lookups)
    );
    let mut c = Checks::new();
    c.eq(
        "late_response events",
        daemon.late_events(world.cgroup.id()).len(),
        1,
    );
    c.eq("event", event.event.as_str(), "late_response");
    c.eq("event qname", event.qname.as_str(), LATE);
    c.eq("event qtype", event.qtype.as_str(), "A");
    c.eq("event pid", event.pid, Some(run.pid));
    check_late_item(
        &mut c,
        u64::from(event.id),
        &event.why,
        event.after_first_send_ns,
        &q,
        late.served(),
    );
    // The lookup itself was written before the answer came: no_response, no late_response.
    c.eq("lookups of dig", lookups.len(), 1);
    if let Some(l) = lookups.first() {
        c.check(l.has("no_response"), || "no no_response diagnosis".into());
        check_absent(&mut c, l, &["late_response", "packet_drop"]);
        let written = time_ns(&l.time) + i128::from(l.duration_ns);
        c.check(written < time_ns(&event.time), || {
            format!("the lookup ended at {written}, after the late answer")
        });
    }
    c.finish(&context);
}

// ---------------------------------------------------------------------------------------------
// Truncation and no answer

/// glibc (no EDNS) asks for a name whose A answer does not fit 512 bytes: unbound answers with
/// TC, and glibc asks again over TCP. The lookup says so, naming both queries.
#[test]
fn truncated_answer_and_tcp_fallback() {
    if skip_unless_root("truncated_answer_and_tcp_fallback") {
        return;
    }
    let gai = glibc_gai().to_string_lossy().into_owned();
    let world = World::new(WorldConfig::default());
    let daemon = Daemon::start();
    let big = world.run_client(&[&gai, "big.test.internal"]);
    big.assert_success();
    let mut got: Vec<&str> = big.stdout.lines().collect();
    got.sort();
    let mut want = BIG_V4.to_vec();
    want.sort();
    assert_eq!(got, want, "{big:?}");
    // A healthy lookup in the same world, for contrast.
    let small = world.run_client(&[&gai, "www.test.internal"]);
    small.assert_success();
    wait_for_queries(&daemon, &world, &big, "the UDP and TCP queries", |recs| {
        recs.iter()
            .any(|r| r.transport == "tcp" && r.outcome == "answered")
    });
    wait_for_queries(&daemon, &world, &small, "the healthy queries", |recs| {
        recs.len() >= 2
    });
    // glibc discards the UDP answer it did not read when it switches to TCP; that query ends at
    // the daemon's query timeout. Wait for every query before settling.
    daemon.wait_for(
        &world.cgroup.path,
        "every query of the truncated lookup",
        |recs| {
            let mine = of_pid(recs, &big);
            !mine.is_empty()
                && mine.iter().all(|r| r.qname == BIG)
                && mine
                    .iter()
                    .filter(|r| r.transport == "udp" && r.qtype == "AAAA")
                    .count()
                    == mine
                        .iter()
                        .filter(|r| r.transport == "udp" && r.qtype == "A")
                        .count()
        },
        RECORD_TIMEOUT,
    );
    let lookups = world.settle_lookups(&daemon);
    let records = of_pid(&daemon.records(&world.cgroup.path), &big);
    let mine = lookups_of(&lookups, &big);
    let context = format!(
        "{}{}{}",
        show("lookups of the client", &mine),
        show("query records of the client", &records),
        show(
            "lookups of the healthy client",
            &lookups_of(&lookups, &small)
        ),
    );
    let udp: Vec<&QueryRecord> = records
        .iter()
        .filter(|r| r.transport == "udp" && r.qtype == "A")
        .collect();
    let tcp: Vec<&QueryRecord> = records.iter().filter(|r| r.transport == "tcp").collect();
    // Premise: every UDP answer for A was truncated and asked again over TCP.
    assert!(
        !udp.is_empty() && udp.iter().all(|r| r.truncated),
        "{context}"
    );
    assert_eq!(tcp.len(), udp.len(), "{context}");

    let mut c = Checks::new();
    for t in &tcp {
        c.eq("tcp outcome", t.outcome.as_str(), "answered");
        c.eq("tcp rcode", t.rcode.as_deref(), Some("NOERROR"));
        c.eq("tcp truncated", t.truncated, false);
        c.eq(
            "tcp server",
            t.server.as_str(),
            world.server_field(Family::V4).as_str(),
        );
    }
    c.eq("lookups of the client", mine.len(), 1);
    if let Some(l) = mine.first() {
        check_identity(&mut c, &world, l, &big);
        c.eq("lookup name", l.name.as_str(), BIG);
        c.eq("lookup queries", l.queries, records.len());
        c.eq(
            "lookup final_rcode",
            l.final_rcode.as_deref(),
            Some("NOERROR"),
        );
        let fallbacks = l.diagnoses("truncated_tcp_fallback");
        c.eq(
            "truncated_tcp_fallback diagnoses",
            fallbacks.len(),
            udp.len(),
        );
        for u in &udp {
            // The TCP query that followed this UDP answer.
            let t = tcp
                .iter()
                .filter(|t| time_ns(&t.time) >= response_ns(u))
                .min_by_key(|t| time_ns(&t.time))
                .expect("a TCP query after each truncated answer");
            let extra = response_ns(t) - response_ns(u);
            let want = json!({"udp_id": u.id, "tcp_id": t.id, "extra_ns": extra});
            c.check(
                fallbacks.iter().any(|d| {
                    d.evidence["udp_id"] == want["udp_id"]
                        && d.evidence["tcp_id"] == want["tcp_id"]
                        && d.evidence["extra_ns"] == want["extra_ns"]
                }),
                || format!("no truncated_tcp_fallback with evidence {want}: {fallbacks:?}"),
            );
        }
        check_absent(
            &mut c,
            l,
            &[
                "servfail_retry",
                "slow_upstream",
                "conntrack_insert_failed",
                "packet_drop",
            ],
        );
    }
    let healthy = lookups_of(&lookups, &small);
    c.eq("lookups of the healthy client", healthy.len(), 1);
    if let Some(l) = healthy.first() {
        check_absent(&mut c, l, &DIAGNOSIS_CODES);
    }
    c.finish(&context);
}

/// A server that never answers; musl (timeout 1 s, 2 attempts) sends A and AAAA twice and
/// gives up after 1 s. The lookup says that no query was answered and that they were sent
/// again, and lasts as long as the client waited (not as long as the daemon waited).
#[test]
fn server_that_never_answers_is_no_response() {
    if skip_unless_root("server_that_never_answers_is_no_response") {
        return;
    }
    let gai = musl_gai().to_string_lossy().into_owned();
    let world = World::new(WorldConfig {
        resolver: Resolver::Scripted,
        nameserver: Family::V4,
        resolv_extra: "options timeout:1 attempts:2",
    });
    let never = "never.test.internal.";
    let _server = ScriptedServer::start(&world, vec![(never, Script::Ignore)]);
    let daemon = Daemon::start();
    let run = world.run_client(&[&gai, "never.test.internal"]);
    assert!(!run.status.success(), "{run:?}");
    let client_ns = run.getaddrinfo_ns();
    wait_for_queries(&daemon, &world, &run, "the unanswered A and AAAA", |recs| {
        recs.len() >= 2
    });
    let lookups = world.settle_lookups(&daemon);
    let records = of_pid(&daemon.records(&world.cgroup.path), &run);
    let mine = lookups_of(&lookups, &run);
    let context = format!(
        "{}{}client: {client_ns} ns in getaddrinfo",
        show("lookups of the client", &mine),
        show("query records of the client", &records)
    );
    assert_eq!(records.len(), 2, "{context}");
    assert!(
        records
            .iter()
            .all(|r| r.outcome == "unanswered" && r.sends == 2),
        "{context}"
    );
    let mut c = Checks::new();
    c.eq("lookups of the client", mine.len(), 1);
    if let Some(l) = mine.first() {
        check_identity(&mut c, &world, l, &run);
        c.eq("lookup name", l.name.as_str(), never);
        c.eq("lookup queries", l.queries, 2);
        c.eq("lookup final_rcode", l.final_rcode.as_deref(), None);
        c.check(l.answers.is_empty(), || format!("answers {:?}", l.answers));
        if l.has("no_response") {
            let e = &l.diagnosis("no_response").evidence["queries"];
            let mut ids: Vec<u64> = e
                .as_array()
                .map(|a| a.iter().filter_map(|q| q["id"].as_u64()).collect())
                .unwrap_or_default();
            ids.sort();
            let mut want: Vec<u64> = records.iter().map(|r| u64::from(r.id)).collect();
            want.sort();
            c.eq("no_response ids", ids, want);
            for q in e.as_array().into_iter().flatten() {
                c.eq("no_response sends", q["sends"].as_u64(), Some(2));
                c.eq(
                    "no_response server",
                    q["server"].as_str(),
                    Some(world.server_field(Family::V4).as_str()),
                );
            }
        } else {
            c.check(false, || "no no_response diagnosis".into());
        }
        if l.has("resend_after_timeout") {
            let resends = &l.diagnosis("resend_after_timeout").evidence["resends"];
            c.eq("resends", resends.as_array().map(Vec::len), Some(2));
            for r in &records {
                let sends = r.send_times_ns();
                let waited = (sends[1] - sends[0]) as u64;
                c.check(
                    resends.as_array().is_some_and(|a| {
                        a.iter().any(|x| {
                            x["id"].as_u64() == Some(u64::from(r.id))
                                && x["waited_ns"].as_u64() == Some(waited)
                        })
                    }),
                    || {
                        format!(
                            "resend_after_timeout lacks id {} waited {waited}: {resends}",
                            r.id
                        )
                    },
                );
            }
        } else {
            c.check(false, || "no resend_after_timeout diagnosis".into());
        }
        check_absent(
            &mut c,
            l,
            &[
                "search_list_expansion",
                "servfail_retry",
                "slow_upstream",
                "conntrack_insert_failed",
                "packet_drop",
                "late_response",
                "truncated_tcp_fallback",
            ],
        );
        check_duration(&mut c, l, client_ns);
    }
    c.finish(&context);
}
