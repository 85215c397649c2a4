//! The Prometheus endpoint end to end: a real daemon serving `--metrics-addr`, real clients
//! making a known set of queries to a scripted server, and a scrape over plain HTTP parsed with
//! an OpenMetrics parser. Also: bad `--metrics-addr` values and a taken port fail at start-up,
//! before anything is attached.
//!
//! The daemon sees every DNS query of the machine, parallel tests' included, and metrics carry
//! no cgroup: series are picked by this test's server address, which is unique to its world.

mod support;

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use openmetrics_parser::{
    openmetrics::parse_openmetrics, HistogramValue, MetricsExposition, OpenMetricsType,
    OpenMetricsValue,
};
use support::{
    poll_until, skip_unless_root, Daemon, Family, QueryRecord, Resolver, Script, ScriptedServer,
    World, WorldConfig, RECORD_TIMEOUT,
};

/// Answered at once, NOERROR.
const FAST: &str = "fast.metrics.test.";
const FAST_QUERIES: usize = 5;
/// Answered NOERROR after [`SLOW_DELAY`].
const SLOW: &str = "slow.metrics.test.";
const SLOW_DELAY: Duration = Duration::from_millis(300);
/// Never answered.
const LOST: &str = "lost.metrics.test.";
const LOST_QUERIES: usize = 2;
/// Names without a script: NXDOMAIN at once.
const NX_QUERIES: usize = 3;
const ALL_QUERIES: usize = FAST_QUERIES + 1 + LOST_QUERIES + NX_QUERIES;

/// How long a scrape may take, connection to last byte.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a daemon that should refuse its flags may take to exit.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(10);

type Exposition = MetricsExposition<OpenMetricsType, OpenMetricsValue>;

/// One `GET /metrics`, parsed.
struct Scrape {
    head: String,
    body: String,
    exposition: Exposition,
}

/// `GET /metrics` over a fresh connection (the endpoint closes it after each response).
fn scrape(addr: SocketAddr) -> Result<Scrape, String> {
    let mut stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(SCRAPE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SCRAPE_TIMEOUT)))
        .map_err(|e| format!("setting timeouts: {e}"))?;
    stream
        .write_all(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\
              Accept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n",
        )
        .map_err(|e| format!("sending the request to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("reading the response from {addr}: {e}"))?;
    let response = String::from_utf8(response).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of the response head: {response}"))?;
    let exposition = parse_exposition(body)?;
    Ok(Scrape {
        head: head.to_owned(),
        body: body.to_owned(),
        exposition,
    })
}

/// The `# UNIT` lines of the histograms (a family is written once it has a series).
const HISTOGRAM_UNITS: [&str; 2] = [
    "# UNIT dnsprobe_query_duration_seconds seconds",
    "# UNIT dnsprobe_name_query_duration_seconds seconds",
];

/// Parses the exposition with the OpenMetrics parser the unit tests use. That parser refuses a
/// `# UNIT` line on a histogram, which OpenMetrics 1.0 allows (and the daemon writes): those
/// lines are left out for it.
fn parse_exposition(body: &str) -> Result<Exposition, String> {
    let text: String = body
        .lines()
        .filter(|l| !HISTOGRAM_UNITS.contains(l))
        .map(|l| format!("{l}\n"))
        .collect();
    parse_openmetrics(&text).map_err(|e| format!("not OpenMetrics ({e:?}):\n{body}"))
}

/// The samples of `family` whose `server` label is `server`, with all their labels.
fn series_of<'a>(
    exposition: &'a Exposition,
    family: &str,
    server: &str,
) -> Vec<(BTreeMap<String, String>, &'a OpenMetricsValue)> {
    let Some(family) = exposition.families.get(family) else {
        return Vec::new();
    };
    family
        .iter_samples()
        .filter_map(|sample| {
            let labels: BTreeMap<String, String> = sample
                .get_labelset()
                .expect("a parsed sample has label names")
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (labels.get("server").map(String::as_str) == Some(server))
                .then_some((labels, &sample.value))
        })
        .collect()
}

/// The value of the counter `family` with exactly these labels.
fn counter(exposition: &Exposition, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let family = exposition.families.get(family)?;
    family.iter_samples().find_map(|sample| {
        let set = sample.get_labelset().ok()?;
        let matches = set.iter().count() == labels.len()
            && labels
                .iter()
                .all(|(k, v)| set.get_label_value(k) == Some(*v));
        match (&sample.value, matches) {
            (OpenMetricsValue::Counter(c), true) => Some(c.value.as_f64()),
            _ => None,
        }
    })
}

/// The one counter sample of `family` for `server`; panics if there are others for it.
fn server_counter(exposition: &Exposition, family: &str, server: &str, body: &str) -> f64 {
    let series = series_of(exposition, family, server);
    assert_eq!(
        series.len(),
        1,
        "one {family} series for {server} (host, qtype A):\n{body}"
    );
    let (labels, value) = &series[0];
    assert_eq!(
        labels_of(labels),
        [
            ("namespace", ""),
            ("pod", ""),
            ("qtype", "A"),
            ("server", server)
        ],
        "{family}:\n{body}"
    );
    match value {
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        other => panic!("{family} is not a counter: {other:?}"),
    }
}

fn labels_of(labels: &BTreeMap<String, String>) -> Vec<(&str, &str)> {
    labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

/// The cumulative count of the bucket with upper bound `le`.
fn bucket(h: &HistogramValue, le: f64) -> u64 {
    let b = h
        .buckets
        .iter()
        .find(|b| b.upper_bound == le)
        .unwrap_or_else(|| panic!("no bucket le={le}: {h:?}"));
    let count = b.count.as_f64();
    assert!(
        count >= 0.0 && count.fract() == 0.0,
        "bucket le={le}: {h:?}"
    );
    count as u64
}

/// A port that was free a moment ago (the daemon refuses port 0: Prometheus needs a fixed one).
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// Where the daemon says it serves metrics: its `serving metrics on http://ADDR/metrics` line.
fn served_addr(stderr: &str) -> SocketAddr {
    stderr
        .lines()
        .find_map(|l| {
            let rest = &l[l.find("serving metrics on http://")? + 26..];
            rest[..rest.find("/metrics")?].parse().ok()
        })
        .unwrap_or_else(|| panic!("no `serving metrics on http://ADDR/metrics` line:\n{stderr}"))
}

/// A daemon serving metrics on a loopback port, given as a port alone (`--metrics-addr 9153`
/// style). A port picked free may be taken before the daemon binds it: then it is retried.
fn start_daemon_with_metrics() -> (Daemon, SocketAddr) {
    let mut failures = Vec::new();
    for _ in 0..3 {
        let port = free_port().to_string();
        match Daemon::try_start_with(&["--metrics-addr", &port]) {
            Ok(daemon) => {
                let addr = served_addr(&daemon.stderr());
                return (daemon, addr);
            }
            Err(why) if why.contains("--metrics-addr") => failures.push(why),
            Err(why) => panic!("{why}"),
        }
    }
    panic!(
        "could not bind a free port in 3 tries:\n{}",
        failures.join("\n")
    );
}

fn dig(world: &World, name: &str, time_s: u32) -> support::ClientRun {
    world.dig(Family::V4, name, "A", time_s)
}

#[test]
fn scrape_counts_exactly_this_worlds_queries() {
    if skip_unless_root("scrape_counts_exactly_this_worlds_queries") {
        return;
    }
    let started = Instant::now();
    // The world first: nothing of it asks its server anything before the daemon runs.
    let world = World::new(WorldConfig {
        resolver: Resolver::Scripted,
        ..Default::default()
    });
    let _server = ScriptedServer::start(
        &world,
        vec![
            (
                FAST,
                Script::Answer {
                    addrs: vec!["10.1.2.3".parse().unwrap()],
                    delay: Duration::ZERO,
                },
            ),
            (
                SLOW,
                Script::Answer {
                    addrs: vec!["10.1.2.4".parse().unwrap()],
                    delay: SLOW_DELAY,
                },
            ),
            (LOST, Script::Ignore),
        ],
    );
    let (daemon, addr) = start_daemon_with_metrics();
    assert_eq!(
        addr.ip(),
        Ipv4Addr::LOCALHOST,
        "a port alone listens on loopback"
    );
    let server = world.server_field(Family::V4);

    // Before any query, the server has no series; the internal counters are there from the
    // start.
    let before = scrape(addr).unwrap_or_else(|e| panic!("first scrape: {e}"));
    assert!(
        before.head.starts_with("HTTP/1.1 200 OK\r\n"),
        "{}",
        before.head
    );
    assert!(
        before.head.contains(
            "Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
        ),
        "{}",
        before.head
    );
    assert!(
        before
            .head
            .contains(&format!("Content-Length: {}\r\n", before.body.len())),
        "{}",
        before.head
    );
    assert!(before.body.ends_with("# EOF\n"), "{}", before.body);
    assert_eq!(
        counter(
            &before.exposition,
            "dnsprobe_ringbuf_lost_events",
            &[("ring", "dns")]
        ),
        Some(0.0),
        "{}",
        before.body
    );
    for family in [
        "dnsprobe_query_duration_seconds",
        "dnsprobe_queries",
        "dnsprobe_unanswered_queries",
    ] {
        assert!(
            series_of(&before.exposition, family, &server).is_empty(),
            "{family} has series for {server} before any query:\n{}",
            before.body
        );
    }

    for _ in 0..FAST_QUERIES {
        let run = dig(&world, FAST, 2);
        run.assert_success();
        assert!(run.stdout.contains("status: NOERROR"), "{}", run.stdout);
    }
    for i in 0..NX_QUERIES {
        let run = dig(&world, &format!("nx-{i}.metrics.test."), 2);
        run.assert_success();
        assert!(run.stdout.contains("status: NXDOMAIN"), "{}", run.stdout);
    }
    let run = dig(&world, SLOW, 2);
    run.assert_success();
    assert!(run.stdout.contains("status: NOERROR"), "{}", run.stdout);
    for _ in 0..LOST_QUERIES {
        // dig gives up after 1 s; the daemon calls the query unanswered after 2 s.
        let run = dig(&world, LOST, 1);
        assert!(!run.status.success(), "{LOST} was answered: {}", run.stdout);
    }

    let records = daemon.wait_for(
        &world.cgroup.path,
        &format!("{ALL_QUERIES} query records"),
        |r| r.len() >= ALL_QUERIES,
        RECORD_TIMEOUT,
    );
    assert_eq!(
        records.len(),
        ALL_QUERIES,
        "{}",
        support::format_records(&records)
    );
    let by = |f: &dyn Fn(&QueryRecord) -> bool| -> Vec<&QueryRecord> {
        records.iter().filter(|r| f(r)).collect()
    };
    let noerror = by(&|r| r.outcome == "answered" && r.rcode.as_deref() == Some("NOERROR"));
    let nxdomain = by(&|r| r.outcome == "answered" && r.rcode.as_deref() == Some("NXDOMAIN"));
    let unanswered = by(&|r| r.outcome == "unanswered");
    assert_eq!(noerror.len(), FAST_QUERIES + 1, "{records:#?}");
    assert_eq!(nxdomain.len(), NX_QUERIES, "{records:#?}");
    assert_eq!(unanswered.len(), LOST_QUERIES, "{records:#?}");
    let latency_s = |r: &QueryRecord| r.latency_ns.expect("answered has a latency") as f64 / 1e9;
    let slow = noerror
        .iter()
        .find(|r| r.qname == SLOW)
        .expect("the slow query's record");
    // The server answers 300 ms after its kernel got the query: 0.25 < latency <= 0.5.
    assert!(
        (SLOW_DELAY.as_secs_f64()..0.5).contains(&latency_s(slow)),
        "slow query: {slow:?}"
    );

    // Once the records are written the metrics sink has counted them too (the same pipeline
    // hands each finished query to both); wait anyway, with a deadline, in case it lags.
    let after = poll_until(
        &format!("dnsprobe_queries_total{{server=\"{server}\"}} >= {ALL_QUERIES}"),
        Duration::from_secs(10),
        || {
            let s = scrape(addr)?;
            let total: f64 = series_of(&s.exposition, "dnsprobe_queries", &server)
                .iter()
                .map(|(_, v)| match v {
                    OpenMetricsValue::Counter(c) => c.value.as_f64(),
                    _ => 0.0,
                })
                .sum();
            if total >= ALL_QUERIES as f64 {
                Ok(s)
            } else {
                Err(s.body)
            }
        },
    );
    let (exposition, body) = (&after.exposition, after.body.as_str());
    assert!(
        body.lines().any(|l| l == HISTOGRAM_UNITS[0]),
        "the duration histogram has its unit:\n{body}"
    );
    assert!(
        body.lines()
            .any(|l| l == "# TYPE dnsprobe_query_duration_seconds histogram"),
        "{body}"
    );

    // Counters: every query, and the unanswered ones.
    assert_eq!(
        server_counter(exposition, "dnsprobe_queries", &server, body),
        ALL_QUERIES as f64,
        "{body}"
    );
    assert_eq!(
        server_counter(exposition, "dnsprobe_unanswered_queries", &server, body),
        LOST_QUERIES as f64,
        "{body}"
    );

    // Histograms: one series per response code, none for the unanswered queries.
    let durations = series_of(exposition, "dnsprobe_query_duration_seconds", &server);
    let mut rcodes: Vec<&str> = durations
        .iter()
        .map(|(l, _)| l.get("rcode").map(String::as_str).unwrap_or("?"))
        .collect();
    rcodes.sort_unstable();
    assert_eq!(rcodes, ["NOERROR", "NXDOMAIN"], "{body}");
    let histogram = |rcode: &str| -> &HistogramValue {
        let (labels, value) = durations
            .iter()
            .find(|(l, _)| l.get("rcode").map(String::as_str) == Some(rcode))
            .expect("found above");
        assert_eq!(
            labels_of(labels),
            [
                ("namespace", ""),
                ("pod", ""),
                ("qtype", "A"),
                ("rcode", rcode),
                ("server", server.as_str())
            ],
            "{body}"
        );
        match value {
            OpenMetricsValue::Histogram(h) => h,
            other => panic!("not a histogram: {other:?}"),
        }
    };
    let ok = histogram("NOERROR");
    assert_eq!(ok.count, Some((FAST_QUERIES + 1) as u64), "{body}");
    assert_eq!(
        histogram("NXDOMAIN").count,
        Some(NX_QUERIES as u64),
        "{body}"
    );
    // The slow answer is above 0.25 s and within 0.5 s; the fast ones are in the lower buckets.
    assert_eq!(bucket(ok, 0.25), FAST_QUERIES as u64, "{body}");
    assert!(bucket(ok, 0.1) <= FAST_QUERIES as u64, "{body}");
    assert_eq!(bucket(ok, 0.5), (FAST_QUERIES + 1) as u64, "{body}");
    assert_eq!(
        bucket(ok, f64::INFINITY),
        (FAST_QUERIES + 1) as u64,
        "{body}"
    );
    // Every bucket and the sum agree with the latencies of the records.
    for b in &ok.buckets {
        let want = noerror
            .iter()
            .filter(|r| latency_s(r) <= b.upper_bound)
            .count();
        assert_eq!(
            b.count.as_f64(),
            want as f64,
            "bucket le={} against the records {noerror:?}:\n{body}",
            b.upper_bound
        );
    }
    let sum: f64 = noerror.iter().map(|r| latency_s(r)).sum();
    let got = ok.sum.expect("a histogram sum").as_f64();
    assert!(
        (got - sum).abs() < 1e-6,
        "sum {got} != {sum} of the records"
    );

    // The internal counters: nothing was lost (not even by parallel tests: 4 MiB rings).
    for ring in ["dns", "drops"] {
        assert_eq!(
            counter(
                exposition,
                "dnsprobe_ringbuf_lost_events",
                &[("ring", ring)]
            ),
            Some(0.0),
            "ring {ring}:\n{body}"
        );
    }

    // Lookups: counted by diagnosis across the machine, so at least this world's.
    let lookups = daemon.wait_until(
        "the lookups of the unanswered queries",
        RECORD_TIMEOUT,
        |d| {
            let lookups = d.lookups(&world.cgroup.path);
            (lookups.iter().filter(|l| l.has("no_response")).count() >= LOST_QUERIES)
                .then_some(lookups)
        },
    );
    let latest = scrape(addr).unwrap_or_else(|e| panic!("last scrape: {e}"));
    let mut ours: BTreeMap<&str, usize> = BTreeMap::new();
    for l in &lookups {
        if l.diagnosis.is_empty() {
            *ours.entry("none").or_default() += 1;
        }
        for code in l.codes() {
            *ours.entry(code).or_default() += 1;
        }
    }
    assert!(
        ours.get("no_response") >= Some(&LOST_QUERIES),
        "{lookups:#?}"
    );
    for (code, n) in ours {
        let got = counter(
            &latest.exposition,
            "dnsprobe_lookups",
            &[("diagnosis", code)],
        )
        .unwrap_or(0.0);
        assert!(
            got >= n as f64,
            "dnsprobe_lookups_total{{diagnosis=\"{code}\"}} is {got}, this world alone had {n}:\n{}",
            latest.body
        );
    }

    let stopped = daemon.stop();
    assert!(
        stopped.status.is_some_and(|s| s.success()),
        "{:?}: {}",
        stopped.status,
        stopped.stderr
    );
    // The endpoint goes with the daemon.
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err(),
        "{addr} still accepts connections after the daemon stopped"
    );
    eprintln!("scrape test took {:?}", started.elapsed());
}

/// Kills and reaps the child on drop, should a daemon expected to fail keep running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Runs `dnsprobe ARGS` expecting it to exit by itself within [`REFUSE_TIMEOUT`]; returns its
/// status, stderr and how long it took.
fn run_to_exit(args: &[&str]) -> (ExitStatus, String, Duration) {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_dnsprobe"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning dnsprobe");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut child = KillOnDrop(child);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("waiting for dnsprobe") {
            break status;
        }
        if start.elapsed() > REFUSE_TIMEOUT {
            drop(child);
            let text = reader.join().unwrap_or_default();
            panic!("dnsprobe {args:?} still ran after {REFUSE_TIMEOUT:?}; stderr:\n{text}");
        }
        thread::sleep(Duration::from_millis(10));
    };
    let took = start.elapsed();
    (status, reader.join().unwrap_or_default(), took)
}

#[test]
fn bad_metrics_addr_is_refused_naming_the_flag() {
    // Refused while parsing the command line, before privileges are checked: no root needed.
    for (value, why) in [
        ("0", "port 0"),
        (":0", "port 0"),
        ("0.0.0.0:0", "port 0"),
        ("99999", "out of range"),
        ("localhost:9153", "not a port or an IP address with a port"),
        ("127.0.0.1", "not a port or an IP address with a port"),
        ("", "not a port or an IP address with a port"),
    ] {
        for command in ["run", "top"] {
            let (status, stderr, took) = run_to_exit(&[command, "--metrics-addr", value]);
            let what = format!("dnsprobe {command} --metrics-addr '{value}' ({status}, {took:?})");
            assert_eq!(status.code(), Some(2), "{what}: usage error\n{stderr}");
            assert!(stderr.contains("--metrics-addr"), "{what}:\n{stderr}");
            assert!(stderr.contains(why), "{what}: want `{why}`:\n{stderr}");
            assert!(!stderr.contains("capture started"), "{what}:\n{stderr}");
            assert!(took < Duration::from_secs(5), "{what}: slow to refuse");
        }
    }
}

#[test]
fn taken_metrics_port_fails_before_capture() {
    if skip_unless_root("taken_metrics_port_fails_before_capture") {
        return;
    }
    // Held for the whole test: the daemon cannot bind it.
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding 127.0.0.1:0");
    let addr = holder
        .local_addr()
        .expect("the holder's address")
        .to_string();
    let (status, stderr, took) = run_to_exit(&[
        "run",
        "--format",
        "json",
        "--metrics-addr",
        &addr,
        "--query-timeout",
        "2s",
    ]);
    let what = format!("dnsprobe run --metrics-addr {addr} ({status}, {took:?})");
    assert_eq!(status.code(), Some(1), "{what}:\n{stderr}");
    assert!(
        stderr.contains("--metrics-addr") && stderr.contains(&addr),
        "{what}: the error names the flag and the address:\n{stderr}"
    );
    assert!(
        !stderr.contains("capture started") && !stderr.contains("attached"),
        "{what}: failed only after attaching:\n{stderr}"
    );
    drop(holder);
}
