//! The live view end to end: `dnsprobe top` in a real terminal (a tmux pane), a fake pod whose
//! DNS server answers slowly, and the screen: the pod must show up among the slowest pods with
//! the latency the server caused, and `q` must end the view, detach and exit cleanly.

mod support;

use std::{
    fs,
    time::{Duration, Instant},
};

use support::{
    poll_until, query_records, run_client_in, shell_quote, skip_unless_root, FakePod, QueryRecord,
    Resolver, Script, ScriptedServer, TempDir, Tmux, World, WorldConfig, RECORD_TIMEOUT,
};

/// Answered by the scripted server after [`DELAY`].
const SLOW: &str = "slow.top.test.";
const DELAY: Duration = Duration::from_millis(400);
const QUERIES: usize = 4;
/// Big enough that the slowest-pods table has room for a dozen rows (parallel tests' clients
/// show up too: the daemon sees the whole machine).
const WIDTH: u16 = 120;
const HEIGHT: u16 = 60;
/// From spawn to the first frame: loading and attaching the eBPF programs on a busy machine.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The rows of the section titled `title`: the lines after its title and column header, up to
/// the next section's title (a border line).
fn section<'a>(screen: &'a str, title: &str) -> Option<Vec<&'a str>> {
    let lines: Vec<&str> = screen.lines().collect();
    let start = lines.iter().position(|l| l.contains(title))?;
    Some(
        lines[start + 1..]
            .iter()
            .skip(1)
            .take_while(|l| !l.contains("───"))
            .copied()
            .collect(),
    )
}

/// A latency as the view prints it (`400ms`, `1.25s`, `3.1ms`, `0.42ms`) in milliseconds.
fn parse_latency_ms(cell: &str) -> Option<f64> {
    if let Some(ms) = cell.strip_suffix("ms") {
        return ms.parse().ok();
    }
    cell.strip_suffix('s')?.parse::<f64>().ok().map(|s| s * 1e3)
}

/// The cells of a slowest-pods row: POD Q FAIL NX P50 P99 MAX [DIAGNOSIS].
struct Row {
    queries: u64,
    failures: u64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    line: String,
}

fn parse_row(line: &str, label: &str) -> Option<Row> {
    let rest = line.strip_prefix(label)?;
    // The label column is padded with spaces: the label must end there.
    if !rest.starts_with(' ') {
        return None;
    }
    let cells: Vec<&str> = rest.split_whitespace().collect();
    Some(Row {
        queries: cells.first()?.parse().ok()?,
        failures: cells.get(1)?.parse().ok()?,
        p50_ms: parse_latency_ms(cells.get(3)?)?,
        p99_ms: parse_latency_ms(cells.get(4)?)?,
        max_ms: parse_latency_ms(cells.get(5)?)?,
        line: line.to_owned(),
    })
}

/// How the view prints the largest latency of the records (`fmt_latency` in top.rs) for
/// 10 ms <= latency < 1 s: whole milliseconds.
fn printed_ms(records: &[QueryRecord]) -> f64 {
    let max_ns = records
        .iter()
        .filter_map(|r| r.latency_ns)
        .max()
        .expect("answered records");
    format!("{:.0}", max_ns as f64 / 1e6)
        .parse()
        .expect("a number")
}

#[test]
fn top_shows_the_slow_pod_and_quits_on_q() {
    if skip_unless_root("top_shows_the_slow_pod_and_quits_on_q") {
        return;
    }
    let started = Instant::now();
    let world = World::new(WorldConfig {
        resolver: Resolver::Scripted,
        ..Default::default()
    });
    let _server = ScriptedServer::start(
        &world,
        vec![(
            SLOW,
            Script::Answer {
                addrs: vec!["10.1.2.3".parse().unwrap()],
                delay: DELAY,
            },
        )],
    );
    let pod = FakePod::new("shop", &format!("slow-{}", std::process::id()), "app");
    let label = format!("{}/{}", pod.namespace, pod.name);

    let files = TempDir::new(&format!("{}-top", std::process::id()));
    let output = files.path().join("records.jsonl");
    let stderr_file = files.path().join("stderr");
    let status_file = files.path().join("status");
    // The view draws on the pane; records go to a file, so the test knows when the queries
    // finished, and stderr (silenced while the view runs, then the summary) to another. The
    // shell stays to write the exit status. `timeout` ends the view should this test be killed
    // before its guards run (it sends SIGTERM, on which the daemon detaches and exits).
    let command = format!(
        "timeout --foreground 300 {bin} top --format json --output {out} --query-timeout 2s \
         --pod-log-dir {pods} --container-log-dir {containers} 2>{err}; echo \"exit $?\" > {status}",
        bin = shell_quote(env!("CARGO_BIN_EXE_dnsprobe")),
        out = shell_quote(&output.to_string_lossy()),
        pods = shell_quote(&pod.pod_log_dir().to_string_lossy()),
        containers = shell_quote(&pod.container_log_dir().to_string_lossy()),
        err = shell_quote(&stderr_file.to_string_lossy()),
        status = shell_quote(&status_file.to_string_lossy()),
    );
    let tmux = Tmux::start(WIDTH, HEIGHT, &command);
    let diagnostics = || {
        format!(
            "stderr: {}\nexit: {}",
            fs::read_to_string(&stderr_file).unwrap_or_default(),
            fs::read_to_string(&status_file).unwrap_or_default()
        )
    };

    // The header is drawn once capture runs (the view starts after the programs attached).
    let screen = poll_until("the live view's header", START_TIMEOUT, || {
        let screen = tmux
            .capture()
            .ok_or_else(|| format!("the session ended\n{}", diagnostics()))?;
        let lines: Vec<&str> = screen.lines().collect();
        match lines.first() {
            Some(l) if l.starts_with("dnsprobe top") && l.contains("(q to quit)") => Ok(screen),
            _ => Err(format!("{screen}\n{}", diagnostics())),
        }
    });
    assert_eq!(
        screen.lines().count(),
        usize::from(HEIGHT),
        "the view fills the pane:\n{screen}"
    );
    assert!(screen.contains("Slowest pods"), "{screen}");
    assert!(screen.contains("Most failing pods"), "{screen}");

    // The pod's client: several queries, each answered after the server's delay.
    let server = format!("@{}", world.server_v4);
    for _ in 0..QUERIES {
        let run = run_client_in(
            pod.cgroup(),
            &world.client_ns,
            &["dig", &server, SLOW, "A", "+tries=1", "+time=3"],
        );
        run.assert_success();
        assert!(run.stdout.contains("status: NOERROR"), "{}", run.stdout);
    }
    let records = poll_until("the pod's query records", RECORD_TIMEOUT, || {
        let records = query_records(&output, &pod.cgroup().path);
        if records.len() >= QUERIES {
            Ok(records)
        } else {
            Err(format!("{records:#?}\n{}", diagnostics()))
        }
    });
    assert_eq!(records.len(), QUERIES, "{records:#?}");
    for r in &records {
        assert_eq!(r.outcome, "answered", "{r:?}");
        let latency = r.latency_ns.expect("answered has a latency");
        assert!(
            latency >= DELAY.as_nanos() as u64 && latency < 3 * DELAY.as_nanos() as u64,
            "latency of a query the server answered after {DELAY:?}: {r:?}"
        );
    }
    let want_max_ms = printed_ms(&records);

    // The view redraws every second: wait until its slowest-pods table has the pod's row
    // with all of its queries.
    let (row, screen) = poll_until(
        &format!("the row of {label} with {QUERIES} queries among the slowest pods"),
        Duration::from_secs(15),
        || {
            let screen = tmux
                .capture()
                .ok_or_else(|| format!("the session ended\n{}", diagnostics()))?;
            let rows = section(&screen, "Slowest pods").unwrap_or_default();
            match rows.iter().find_map(|l| parse_row(l, &label)) {
                Some(row) if row.queries == QUERIES as u64 => Ok((row, screen)),
                _ => Err(screen),
            }
        },
    );
    let what = format!("row `{}` of\n{screen}", row.line);
    assert_eq!(row.failures, 0, "{what}");
    let delay_ms = DELAY.as_secs_f64() * 1e3;
    for (name, ms) in [
        ("P50", row.p50_ms),
        ("P99", row.p99_ms),
        ("MAX", row.max_ms),
    ] {
        assert!(
            (delay_ms..3.0 * delay_ms).contains(&ms),
            "{name} {ms} ms is not the server's delay of {delay_ms} ms: {what}"
        );
    }
    assert_eq!(
        row.max_ms, want_max_ms,
        "MAX is the largest latency of the records: {what}"
    );
    // All answers took about the same: the quantiles are the largest of them (a quantile is
    // its bucket's bound, capped at the largest latency).
    assert_eq!(row.p99_ms, row.max_ms, "{what}");
    // Not a failing pod.
    let failing = section(&screen, "Most failing pods").expect("the failing pods section");
    assert!(
        !failing.iter().any(|l| l.starts_with(&label)),
        "{label} among the failing pods: {screen}"
    );
    // The names table has the slow name.
    let names = section(&screen, "Names").expect("the names section");
    assert!(
        names.iter().any(|l| l.starts_with(SLOW)),
        "{SLOW} not among the names:\n{screen}"
    );

    // q quits: the view ends, the daemon detaches and exits 0, and the pane closes.
    tmux.send_keys(&["q"]);
    let exit = poll_until(
        "dnsprobe top to exit after q",
        Duration::from_secs(15),
        || match fs::read_to_string(&status_file) {
            Ok(s) if s.ends_with('\n') => Ok(s),
            _ => Err(format!(
                "{}\n{}",
                tmux.capture().unwrap_or_else(|| "(no session)".into()),
                diagnostics()
            )),
        },
    );
    assert_eq!(exit.trim(), "exit 0", "{}", diagnostics());
    let stderr = fs::read_to_string(&stderr_file).unwrap_or_default();
    let summary = stderr
        .lines()
        .find(|l| l.starts_with("summary: "))
        .unwrap_or_else(|| panic!("no summary line after detaching:\n{stderr}"));
    assert!(
        summary.contains(" queries=") || summary.starts_with("summary: queries="),
        "summary without its query count: {summary}"
    );
    poll_until("the session to close", Duration::from_secs(10), || {
        if tmux.has_session() {
            Err(tmux.capture().unwrap_or_default())
        } else {
            Ok(())
        }
    });
    // Nothing of the view is left running (the tmux server exits with its last session).
    poll_until(
        "the tmux server to exit",
        Duration::from_secs(10),
        || match tmux.pids() {
            pids if pids.is_empty() => Ok(()),
            pids => Err(format!("still running: {pids:?}")),
        },
    );
    eprintln!("top test took {:?}", started.elapsed());
}
