//! `cargo xtask bench`: the benchmark suite (a benchmark, not a test; see docs/benchmarks.md).
//!
//! It builds its own world (two network namespaces joined by a veth pair, unbound in the
//! server namespace, dnsperf in the client namespace), measures each figure against a baseline
//! taken in the same run, prints a table and writes it with the machine and commit to
//! `target/bench/`. Everything it creates (namespaces, processes, the temp dir, sysctls) is
//! owned by a guard whose `Drop` removes it, also on error, panic and Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Seconds of load per measurement cell (default 10; 3 with --quick).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// Comma-separated query rates in queries/s; `max` means unlimited.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1000,10000,20000,50000,100000,max"
    )]
    rates: Vec<String>,
    /// Short cells (3 s) for a quick look; the figures are noisier.
    #[arg(long)]
    quick: bool,
    /// dnsperf clients (sockets) per run.
    #[arg(long, default_value_t = 4)]
    clients: u32,
    /// Which parts to run (1: load, 2: non-DNS traffic, 3: memory bound).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    parts: Vec<u32>,
    /// Seconds of fuzzing the `pipeline` target after the benchmarks (0: none).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub fuzz: u32,
}

/// Daemon CPU per answered query allowed with JSON output (µs).
const TARGET_CPU_US: f64 = 1.5;
/// Highest fixed rate at which every query must be reported with no lost events.
const TARGET_COMPLETE_UP_TO: u32 = 100_000;
/// Rate at which the throughput ratio is judged, and its target.
const TARGET_RATIO_RATE: u32 = 20_000;
const TARGET_RATIO: f64 = 0.97;
const TARGET_TCP_RATIO: f64 = 0.99;
const TARGET_UDP64_RATIO: f64 = 0.95;
const TARGET_PROG_FLOOR_FACTOR: f64 = 1.3;
/// Part 3: queries that are never answered, their rate, the RSS bound and the small cap.
const UNANSWERED_QUERIES: u32 = 100_000;
const UNANSWERED_RATE: u32 = 20_000;
const RSS_BOUND_KIB: u64 = 64 * 1024;
const SMALL_INFLIGHT: u32 = 10_000;
/// The names unbound serves and dnsperf asks.
const ZONE: &str = "bench.test.";
const NAMES: u32 = 64;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Ctrl-C and SIGTERM set a flag that every wait checks, so the run unwinds through its guards.
/// Children run in their own process group and do not see the terminal's Ctrl-C.
fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs a setup command quietly; a failure names the command and its stderr.
fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "`{}` exited with {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args)).map(drop)
}

/// A child process with its stdout and stderr collected line by line; killed on drop.
struct Proc {
    name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn collect(pipe: impl Read + Send + 'static, sink: Arc<Mutex<Vec<String>>>) -> JoinHandle<()> {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    })
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Proc> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("{name}: cannot start `{}`", describe(cmd)))?;
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(p) = child.stdout.take() {
            readers.push(collect(p, stdout.clone()));
        }
        if let Some(p) = child.stderr.take() {
            readers.push(collect(p, stderr.clone()));
        }
        Ok(Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            readers,
            status: None,
        })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn lines(&self, stderr: bool) -> Vec<String> {
        let v = if stderr { &self.stderr } else { &self.stdout };
        v.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tail(&self) -> String {
        let mut all = self.lines(false);
        all.extend(self.lines(true));
        let start = all.len().saturating_sub(15);
        all[start..].join("\n")
    }

    /// Waits until a line of stdout or stderr contains `pat`.
    fn wait_line(&mut self, pat: &str, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            check_stop()?;
            if self
                .lines(true)
                .iter()
                .chain(&self.lines(false))
                .any(|l| l.contains(pat))
            {
                return Ok(());
            }
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "{} exited ({st}) before printing `{pat}`:\n{}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() >= end {
                bail!(
                    "{} did not print `{pat}` within {timeout:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits for the exit and for all output to be read.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let end = Instant::now() + timeout;
        let st = loop {
            check_stop()?;
            if let Some(st) = self.child.try_wait()? {
                break st;
            }
            if Instant::now() >= end {
                bail!(
                    "{} still running after {timeout:?}:\n{}",
                    self.name,
                    self.tail()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        self.status = Some(st);
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Ok(st)
    }

    fn stop(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait(EXIT_TIMEOUT)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// A temp directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A sysctl restored to its old value on drop.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Result<Sysctl> {
        let path = PathBuf::from(path);
        let old = fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned();
        fs::write(&path, value).with_context(|| format!("writing {}", path.display()))?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = fs::write(&self.path, &self.old) {
            eprintln!("xtask: bench: cannot restore {}: {e}", self.path.display());
        }
    }
}

/// Two network namespaces joined by a veth pair, no route out; deleted on drop.
struct World {
    cli: String,
    srv: String,
    veth_c: String,
    cli_ip: String,
    srv_ip: String,
    /// A second server address where nothing ever answers (part 3).
    sink_ip: String,
}

impl World {
    fn new() -> Result<World> {
        let id = std::process::id();
        let net = 200 + id % 50;
        let sub = (id / 50) % 250;
        let w = World {
            cli: format!("dpbench-{id}-c"),
            srv: format!("dpbench-{id}-s"),
            veth_c: format!("dpb{}c", id % 100_000),
            cli_ip: format!("10.{net}.{sub}.1"),
            srv_ip: format!("10.{net}.{sub}.2"),
            sink_ip: format!("10.{net}.{sub}.3"),
        };
        let veth_s = format!("dpb{}s", id % 100_000);
        ip(&["netns", "add", &w.cli])?;
        ip(&["netns", "add", &w.srv])?;
        ip(&[
            "link", "add", &w.veth_c, "netns", &w.cli, "type", "veth", "peer", "name", &veth_s,
            "netns", &w.srv,
        ])?;
        for (ns, dev, addrs) in [
            (&w.cli, &w.veth_c, vec![&w.cli_ip]),
            (&w.srv, &veth_s, vec![&w.srv_ip, &w.sink_ip]),
        ] {
            for a in addrs {
                ip(&["-n", ns, "addr", "add", &format!("{a}/24"), "dev", dev])?;
            }
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(w)
    }

    fn exec(&self, ns: &str, prog: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, prog]);
        cmd
    }
}

impl Drop for World {
    fn drop(&mut self) {
        for ns in [&self.cli, &self.srv] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn write_unbound_conf(dir: &Path, w: &World) -> Result<PathBuf> {
    let mut c = String::new();
    let _ = writeln!(c, "server:");
    for line in [
        format!("interface: {}", w.srv_ip),
        "port: 53".into(),
        "num-threads: 1".into(),
        "do-daemonize: no".into(),
        "username: \"\"".into(),
        "chroot: \"\"".into(),
        format!("directory: \"{}\"", dir.display()),
        "pidfile: \"\"".into(),
        "use-syslog: no".into(),
        "logfile: \"\"".into(),
        "verbosity: 0".into(),
        "do-ip6: no".into(),
        "access-control: 0.0.0.0/0 allow".into(),
        "so-rcvbuf: 8m".into(),
        "so-sndbuf: 8m".into(),
        "ratelimit: 0".into(),
        "ip-ratelimit: 0".into(),
        "module-config: \"iterator\"".into(),
        format!("local-zone: \"{ZONE}\" static"),
    ] {
        let _ = writeln!(c, "  {line}");
    }
    for i in 0..NAMES {
        let _ = writeln!(
            c,
            "  local-data: \"n{i}.{ZONE} 300 IN A 10.9.{}.{}\"",
            i / 250,
            i % 250 + 1
        );
    }
    let _ = writeln!(c, "remote-control:\n  control-enable: no");
    let path = dir.join("unbound.conf");
    fs::write(&path, c)?;
    Ok(path)
}

fn start_unbound(w: &World, dir: &Path) -> Result<Proc> {
    let conf = write_unbound_conf(dir, w)?;
    let mut cmd = w.exec(&w.srv, "unbound");
    cmd.arg("-d").arg("-c").arg(&conf);
    let mut p = Proc::spawn("unbound", &mut cmd)?;
    let end = Instant::now() + START_TIMEOUT;
    loop {
        check_stop()?;
        if let Some(st) = p.child.try_wait()? {
            bail!("unbound exited ({st}):\n{}", p.tail());
        }
        let out = w
            .exec(&w.cli, "dig")
            .args([
                &format!("@{}", w.srv_ip),
                &format!("n0.{ZONE}"),
                "+short",
                "+time=1",
                "+tries=1",
            ])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("10.9.0.1") {
            return Ok(p);
        }
        if Instant::now() >= end {
            bail!(
                "unbound did not answer within {START_TIMEOUT:?}:\n{}",
                p.tail()
            );
        }
        sleep(Duration::from_millis(200))?;
    }
}

/// user+sys clock ticks of a process (all its threads) from /proc/<pid>/stat.
fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The comm field may hold spaces; fields after its closing parenthesis are fixed.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("odd /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// VmHWM (peak RSS) in KiB.
fn peak_rss_kib(pid: i32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmHWM")?
        .parse()
        .context("VmHWM")
}

/// `key=value` from the daemon's `summary:` line.
fn summary_field(summary: &str, key: &str) -> Option<u64> {
    summary
        .split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
}

/// The first number on the line of `text` that contains `label`.
fn number_after(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(label))?;
    let rest = &line[line.find(label)? + label.len()..];
    rest.split_whitespace().next()?.parse().ok()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Observer {
    None,
    Dnsprobe,
    Tcpdump,
}

impl Observer {
    fn label(self) -> &'static str {
        match self {
            Observer::None => "baseline",
            Observer::Dnsprobe => "dnsprobe",
            Observer::Tcpdump => "tcpdump",
        }
    }
}

/// One running observer with its CPU and memory probes.
struct Running {
    proc: Proc,
    kind: Observer,
}

#[derive(Debug, Default, Clone)]
struct ObsResult {
    /// dnsprobe: queries=, answered=, lost_events=, evicted=; tcpdump: packets captured, dropped.
    reported: u64,
    answered: u64,
    lost: u64,
    evicted: u64,
    cpu_s: f64,
    rss_kib: u64,
}

fn start_dnsprobe(daemon: &Path, extra: &[&str]) -> Result<Running> {
    let mut cmd = Command::new(daemon);
    cmd.args(["run", "--format", "json", "--output", "/dev/null"])
        .args(extra);
    let mut proc = Proc::spawn("dnsprobe", &mut cmd)?;
    proc.wait_line("capture started", START_TIMEOUT)?;
    Ok(Running {
        proc,
        kind: Observer::Dnsprobe,
    })
}

fn start_observer(kind: Observer, w: &World, daemon: &Path) -> Result<Option<Running>> {
    match kind {
        Observer::None => Ok(None),
        Observer::Dnsprobe => {
            start_dnsprobe(daemon, &["--query-timeout", "2s", "--stats-interval", "0s"]).map(Some)
        }
        Observer::Tcpdump => {
            let mut cmd = w.exec(&w.cli, "tcpdump");
            cmd.args([
                "-n",
                "-i",
                &w.veth_c,
                "-w",
                "/dev/null",
                "udp",
                "port",
                "53",
            ]);
            let mut proc = Proc::spawn("tcpdump", &mut cmd)?;
            proc.wait_line("listening on", START_TIMEOUT)?;
            Ok(Some(Running { proc, kind }))
        }
    }
}

/// Stops the observer and reads its counts; `t0` is its CPU ticks before the load window.
fn finish_observer(mut r: Running, t0: u64) -> Result<ObsResult> {
    let pid = r.proc.pid();
    let t1 = cpu_ticks(pid)?;
    let rss = peak_rss_kib(pid)?;
    let st = r.proc.stop()?;
    let mut res = ObsResult {
        cpu_s: (t1.saturating_sub(t0)) as f64 / clk_tck(),
        rss_kib: rss,
        ..Default::default()
    };
    let text = {
        let mut l = r.proc.lines(true);
        l.extend(r.proc.lines(false));
        l.join("\n")
    };
    match r.kind {
        Observer::Dnsprobe => {
            let line = text
                .lines()
                .find(|l| l.contains("summary: "))
                .with_context(|| {
                    format!("dnsprobe ({st}) printed no summary:\n{}", r.proc.tail())
                })?;
            let get = |k: &str| {
                summary_field(line, k).with_context(|| format!("summary has no `{k}=`: {line}"))
            };
            res.reported = get("queries")?;
            res.answered = get("answered")?;
            res.lost = get("lost_events")?;
            res.evicted = get("evicted")?;
        }
        Observer::Tcpdump => {
            res.reported = number_before(&text, "packets captured").unwrap_or(0);
            res.lost = number_before(&text, "packets dropped by kernel").unwrap_or(0);
        }
        Observer::None => {}
    }
    Ok(res)
}

/// The number just before `label` on its line (tcpdump's "123 packets captured").
fn number_before(text: &str, label: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains(label))?;
    line[..line.find(label)?]
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[derive(Debug, Clone)]
struct Perf {
    sent: u64,
    completed: u64,
    qps: f64,
}

fn dnsperf(w: &World, qfile: &Path, secs: u64, rate: Option<u32>, clients: u32) -> Result<Perf> {
    let mut cmd = w.exec(&w.cli, "dnsperf");
    cmd.args(["-s", &w.srv_ip, "-l", &secs.to_string()])
        .args(["-c", &clients.to_string(), "-q", "1000"])
        .arg("-d")
        .arg(qfile);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string()]);
    }
    let mut p = Proc::spawn("dnsperf", &mut cmd)?;
    let st = p.wait(Duration::from_secs(secs + 60))?;
    let out = p.lines(false).join("\n");
    if !st.success() {
        bail!("dnsperf exited with {st}:\n{}", p.tail());
    }
    let get = |label: &str| {
        number_after(&out, label).with_context(|| format!("dnsperf printed no `{label}`:\n{out}"))
    };
    Ok(Perf {
        sent: get("Queries sent:")? as u64,
        completed: get("Queries completed:")? as u64,
        qps: get("Queries per second:")?,
    })
}

struct LoadRow {
    rate: Option<u32>,
    kind: Observer,
    perf: Perf,
    obs: Option<ObsResult>,
    ratio: f64,
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

fn rate_label(rate: Option<u32>) -> String {
    match rate {
        Some(r) if r % 1000 == 0 => format!("{}k", r / 1000),
        Some(r) => r.to_string(),
        None => "max".into(),
    }
}

fn part1(
    w: &World,
    dir: &Path,
    daemon: &Path,
    rates: &[Option<u32>],
    secs: u64,
    clients: u32,
    out: &mut String,
) -> Result<()> {
    let qfile = dir.join("queries.txt");
    let mut q = String::new();
    for i in 0..NAMES {
        let _ = writeln!(q, "n{i}.{ZONE} A");
    }
    fs::write(&qfile, q)?;
    let mut rows = Vec::new();
    for &rate in rates {
        let mut base_qps = 0.0;
        for kind in [Observer::None, Observer::Dnsprobe, Observer::Tcpdump] {
            eprintln!(
                "xtask: bench: part 1: rate {} with {} ({secs} s)",
                rate_label(rate),
                kind.label()
            );
            let running = start_observer(kind, w, daemon)?;
            let t0 = match &running {
                Some(r) => cpu_ticks(r.proc.pid())?,
                None => 0,
            };
            let perf = dnsperf(w, &qfile, secs, rate, clients)?;
            // Let the observer drain what the last answers produced.
            sleep(Duration::from_millis(500))?;
            let obs = running.map(|r| finish_observer(r, t0)).transpose()?;
            if kind == Observer::None {
                base_qps = perf.qps;
            }
            let ratio = if base_qps > 0.0 {
                perf.qps / base_qps
            } else {
                0.0
            };
            rows.push(LoadRow {
                rate,
                kind,
                perf,
                obs,
                ratio,
            });
        }
    }
    let _ = writeln!(out, "## 1. Completeness and cost under load\n");
    let _ = writeln!(
        out,
        "Cell length {secs} s, {clients} dnsperf clients, unbound with 1 thread. `reported`: \
         dnsprobe's `queries=` (tcpdump: packets captured, i.e. queries + responses); `lost`: \
         dnsprobe's `lost_events=` (tcpdump: packets dropped by kernel).\n"
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:>5} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>8} {:>6}  verdicts",
        "rate",
        "observer",
        "sent",
        "answered",
        "qps",
        "reported",
        "answered",
        "lost",
        "cpu µs/q",
        "rss MiB",
        "ratio"
    );
    let _ = writeln!(
        out,
        "{:>5} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>8} {:>6}",
        "", "", "(dnsperf)", "(dnsperf)", "(dnsperf)", "(obs)", "(obs)", "(obs)", "", "", ""
    );
    for r in &rows {
        let (rep, ans, lost, cpu, rss) = match &r.obs {
            Some(o) => {
                let cpu_us = if r.perf.completed > 0 {
                    o.cpu_s * 1e6 / r.perf.completed as f64
                } else {
                    f64::NAN
                };
                (
                    o.reported.to_string(),
                    if r.kind == Observer::Dnsprobe {
                        o.answered.to_string()
                    } else {
                        "-".into()
                    },
                    o.lost.to_string(),
                    format!("{cpu_us:.2}"),
                    format!("{:.1}", o.rss_kib as f64 / 1024.0),
                )
            }
            None => ("-".into(), "-".into(), "-".into(), "-".into(), "-".into()),
        };
        let mut verdicts = Vec::new();
        if let (Observer::Dnsprobe, Some(o)) = (r.kind, &r.obs) {
            if r.rate.is_some_and(|x| x <= TARGET_COMPLETE_UP_TO) {
                let ok = o.reported >= r.perf.sent && o.lost == 0;
                verdicts.push(format!("complete {}", verdict(ok)));
            }
            let cpu_us = o.cpu_s * 1e6 / r.perf.completed.max(1) as f64;
            verdicts.push(format!("cpu {}", verdict(cpu_us <= TARGET_CPU_US)));
            if r.rate == Some(TARGET_RATIO_RATE) {
                verdicts.push(format!("ratio {}", verdict(r.ratio >= TARGET_RATIO)));
            }
        }
        let _ = writeln!(
            out,
            "{:>5} {:<9} {:>9} {:>9} {:>9.0} {:>9} {:>9} {:>6} {:>9} {:>8} {:>6.3}  {}",
            rate_label(r.rate),
            r.kind.label(),
            r.perf.sent,
            r.perf.completed,
            r.perf.qps,
            rep,
            ans,
            lost,
            cpu,
            rss,
            r.ratio,
            verdicts.join(", ")
        );
    }
    let _ = writeln!(out, "```\n");
    Ok(())
}

const SINK_PY: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    s.recv(4096)
"#;

const FLOOD_PY: &str = r#"
import socket, struct, sys, time
dst, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(64)]
t0 = time.monotonic()
sent = 0
for i in range(n):
    if i % 100 == 0:
        d = t0 + i / rate - time.monotonic()
        if d > 0:
            time.sleep(d)
    name = b"".join(bytes([len(l)]) + l for l in [b"u%d" % i, b"noanswer", b"bench", b"test"])
    q = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + name + b"\0" + struct.pack(">HH", 1, 1)
    socks[i % 64].sendto(q, (dst, 53))
    sent += 1
print("sent %d in %.2f s" % (sent, time.monotonic() - t0), flush=True)
"#;

fn part3(w: &World, daemon: &Path, out: &mut String) -> Result<()> {
    let mut sink_cmd = w.exec(&w.srv, "python3");
    sink_cmd.args(["-c", SINK_PY, &w.sink_ip]);
    let mut sink = Proc::spawn("sink", &mut sink_cmd)?;
    sink.wait_line("ready", START_TIMEOUT)?;
    let mut rows = Vec::new();
    for cap in [None, Some(SMALL_INFLIGHT)] {
        eprintln!(
            "xtask: bench: part 3: {UNANSWERED_QUERIES} unanswered queries, max-inflight {}",
            cap.map_or("default".into(), |c| c.to_string())
        );
        let cap_s = cap.map(|c| c.to_string());
        let mut extra = vec!["--query-timeout", "60s", "--stats-interval", "0s"];
        if let Some(c) = &cap_s {
            extra.extend(["--max-inflight", c.as_str()]);
        }
        let r = start_dnsprobe(daemon, &extra)?;
        let t0 = cpu_ticks(r.proc.pid())?;
        let mut flood_cmd = w.exec(&w.cli, "python3");
        flood_cmd.args([
            "-c",
            FLOOD_PY,
            &w.sink_ip,
            &UNANSWERED_QUERIES.to_string(),
            &UNANSWERED_RATE.to_string(),
        ]);
        let mut flood = Proc::spawn("flood", &mut flood_cmd)?;
        let st = flood.wait(Duration::from_secs(300))?;
        if !st.success() {
            bail!("query flood exited with {st}:\n{}", flood.tail());
        }
        let flood_line = flood.lines(false).join(" ");
        sleep(Duration::from_secs(1))?;
        let o = finish_observer(r, t0)?;
        rows.push((cap, flood_line, o));
    }
    drop(sink);
    let _ = writeln!(out, "## 3. Memory bound\n");
    let _ = writeln!(
        out,
        "{UNANSWERED_QUERIES} queries at {UNANSWERED_RATE}/s (64 sockets, distinct names) to \
         a server address that receives and never answers; daemon with `--query-timeout 60s` \
         so nothing times out and only the in-flight cap bounds the state.\n"
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:<13} {:>9} {:>9} {:>9} {:>9} {:>8}  verdicts",
        "max-inflight", "queries", "lost", "evicted", "expected", "rss MiB"
    );
    for (cap, flood_line, o) in &rows {
        let cap_n = cap.unwrap_or(65_536);
        let expected = o.reported.saturating_sub(u64::from(cap_n));
        let rss_ok = o.rss_kib < RSS_BOUND_KIB;
        let capped = o.evicted >= expected;
        let _ = writeln!(
            out,
            "{:<13} {:>9} {:>9} {:>9} {:>9} {:>8.1}  rss<64MiB {}, capped {}   ({})",
            cap.map_or(format!("{cap_n} (dflt)"), |c| c.to_string()),
            o.reported,
            o.lost,
            o.evicted,
            expected,
            o.rss_kib as f64 / 1024.0,
            verdict(rss_ok),
            verdict(capped),
            flood_line.trim()
        );
    }
    let _ = writeln!(
        out,
        "```\n\n`queries`, `lost`, `evicted`: the daemon's summary; `expected` = queries − cap: \
         the evictions a cap of that size must make. Queries the daemon never saw (lost events) \
         cannot be tracked, so `queries` may be below the {UNANSWERED_QUERIES} sent.\n"
    );
    Ok(())
}

fn machine_info(root: &Path) -> String {
    let run = |prog: &str, args: &[&str]| {
        Command::new(prog)
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    let dirty = if run("git", &["status", "--porcelain"]).is_empty() {
        ""
    } else {
        " (working tree has uncommitted changes)"
    };
    format!(
        "- date: {}\n- kernel: {}\n- cpus: {}\n- cpu model: {}\n- commit: {}{}\n",
        run("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        run("uname", &["-r"]),
        run("nproc", &[]),
        cpu,
        run("git", &["rev-parse", "HEAD"]),
        dirty
    )
}

fn parse_rates(rates: &[String]) -> Result<Vec<Option<u32>>> {
    rates
        .iter()
        .map(|r| {
            let r = r.trim();
            if r == "max" {
                return Ok(None);
            }
            let (num, mult) = match r.strip_suffix('k') {
                Some(n) => (n, 1000),
                None => (r, 1),
            };
            let n: u32 = num
                .parse()
                .with_context(|| format!("--rates: `{r}` is not a rate"))?;
            Ok(Some(n * mult))
        })
        .collect()
}

/// Runs the benchmark with the already built release daemon.
pub fn bench(args: &BenchArgs, root: &Path, daemon: &Path) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench needs root: it loads eBPF programs and creates network namespaces");
    }
    install_signal_handlers();
    let secs = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
    let rates = parse_rates(&args.rates)?;
    let dir = TempDir(std::env::temp_dir().join(format!("dnsprobe-bench-{}", std::process::id())));
    fs::create_dir_all(&dir.0)?;
    let world = World::new().context("building the namespaces")?;
    let mut report = String::new();
    let _ = writeln!(report, "# dnsprobe benchmark\n");
    let _ = writeln!(report, "{}", machine_info(root));
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench {}`\n",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );

    if args.parts.contains(&1) {
        let unbound = start_unbound(&world, &dir.0)?;
        part1(
            &world,
            &dir.0,
            daemon,
            &rates,
            secs,
            args.clients,
            &mut report,
        )?;
        drop(unbound);
    }
    if args.parts.contains(&2) {
        part2(&world, daemon, secs, &mut report)?;
    }
    if args.parts.contains(&3) {
        part3(&world, daemon, &mut report)?;
    }

    println!("{report}");
    let out_dir = root.join("target").join("bench");
    fs::create_dir_all(&out_dir)?;
    let stamp = Command::new("date")
        .args(["-u", "+%Y%m%dT%H%M%SZ"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    let path = out_dir.join(format!("results-{stamp}.md"));
    fs::write(&path, &report)?;
    fs::write(out_dir.join("latest.md"), &report)?;
    eprintln!("xtask: bench: results written to {}", path.display());
    Ok(())
}

fn iperf(w: &World, secs: u64, udp64: bool) -> Result<f64> {
    let mut cmd = w.exec(&w.cli, "iperf3");
    cmd.args(["-c", &w.srv_ip, "-t", &secs.to_string(), "-f", "k"]);
    if udp64 {
        cmd.args(["-u", "-l", "64", "-b", "0"]);
    }
    let mut p = Proc::spawn("iperf3", &mut cmd)?;
    let st = p.wait(Duration::from_secs(secs + 60))?;
    if !st.success() {
        bail!("iperf3 exited with {st}:\n{}", p.tail());
    }
    let out = p.lines(false);
    let line = out
        .iter()
        .rev()
        .find(|l| l.contains("receiver"))
        .with_context(|| format!("iperf3 printed no receiver line:\n{}", out.join("\n")))?;
    if udp64 {
        // `... Kbits/sec  0.002 ms  lost/total (x%)  receiver`: packets that arrived per second.
        let tok = line
            .split_whitespace()
            .find(|t| t.contains('/') && t.split('/').all(|n| n.parse::<u64>().is_ok()))
            .with_context(|| format!("no lost/total in `{line}`"))?;
        let (lost, total) = tok.split_once('/').context("lost/total")?;
        let got = total.parse::<u64>()?.saturating_sub(lost.parse()?);
        Ok(got as f64 / secs as f64)
    } else {
        number_before(line, "Kbits/sec")
            .map(|k| k as f64 / 1e6)
            .with_context(|| format!("no Kbits/sec in `{line}`"))
    }
}

/// Sum of run_time_ns and run_cnt of the daemon's cgroup_skb programs (bpftool text). This
/// bpftool shows no owning pids, so the newest `dns_egress` and `dns_ingress` are taken: the
/// daemon started last (the machine must be quiet: no other dnsprobe starting meanwhile).
fn prog_stats() -> Result<(u64, u64)> {
    let text = sh(Command::new("bpftool").args(["prog", "show"]))?;
    // name -> (id, run_time_ns, run_cnt) of the highest id.
    let mut newest: Vec<(&str, u64, u64, u64)> = Vec::new();
    for head in text.lines().filter(|l| l.contains("cgroup_skb")) {
        let t: Vec<&str> = head.split_whitespace().collect();
        let field = |k: &str| {
            t.iter()
                .position(|x| *x == k)
                .and_then(|i| t.get(i + 1)?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let Some(name) = t
            .iter()
            .position(|x| *x == "name")
            .and_then(|i| t.get(i + 1).copied())
        else {
            continue;
        };
        if name != "dns_egress" && name != "dns_ingress" {
            continue;
        }
        let id = t
            .first()
            .and_then(|x| x.trim_end_matches(':').parse().ok())
            .unwrap_or(0);
        let entry = (name, id, field("run_time_ns"), field("run_cnt"));
        match newest.iter_mut().find(|e| e.0 == name) {
            Some(e) if e.1 < id => *e = entry,
            Some(_) => {}
            None => newest.push(entry),
        }
    }
    Ok(newest
        .iter()
        .fold((0, 0), |(ns, cnt), e| (ns + e.2, cnt + e.3)))
}

fn part2(w: &World, daemon: &Path, secs: u64, out: &mut String) -> Result<()> {
    let mut srv_cmd = w.exec(&w.srv, "iperf3");
    srv_cmd.args(["-s", "--forceflush", "-B", &w.srv_ip]);
    let mut server = Proc::spawn("iperf3 server", &mut srv_cmd)?;
    server.wait_line("Server listening", START_TIMEOUT)?;
    let mut rows = Vec::new();
    let mut prog_ns = None;
    for udp64 in [false, true] {
        let label = if udp64 {
            "udp 64 B (pkt/s)"
        } else {
            "tcp bulk (Gbit/s)"
        };
        eprintln!("xtask: bench: part 2: {label} without dnsprobe ({secs} s)");
        let base = iperf(w, secs, udp64)?;
        eprintln!("xtask: bench: part 2: {label} with dnsprobe ({secs} s)");
        let d = start_dnsprobe(daemon, &["--query-timeout", "2s", "--stats-interval", "0s"])?;
        let stats = if udp64 {
            Some(Sysctl::set("/proc/sys/kernel/bpf_stats_enabled", "1")?)
        } else {
            None
        };
        let before = prog_stats()?;
        let with = iperf(w, secs, udp64)?;
        let after = prog_stats()?;
        drop(stats);
        if udp64 {
            let runs = after.1.saturating_sub(before.1);
            if runs > 0 {
                prog_ns = Some((after.0.saturating_sub(before.0) as f64 / runs as f64, runs));
            }
        }
        let mut d = d;
        d.proc.stop()?;
        let target = if udp64 {
            TARGET_UDP64_RATIO
        } else {
            TARGET_TCP_RATIO
        };
        rows.push((label, base, with, target));
    }
    drop(server);
    let _ = writeln!(out, "## 2. Cost to traffic that is not DNS\n");
    let _ = writeln!(
        out,
        "iperf3 client namespace -> server namespace, {secs} s each.\n"
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:<18} {:>12} {:>12} {:>7}  verdict",
        "traffic", "without", "with", "ratio"
    );
    for (label, base, with, target) in rows {
        let ratio = if base > 0.0 { with / base } else { 0.0 };
        let _ = writeln!(
            out,
            "{label:<18} {base:>12.2} {with:>12.2} {ratio:>7.3}  >= {target}: {}",
            verdict(ratio >= target)
        );
    }
    match prog_ns {
        Some((ns, runs)) => {
            let _ = writeln!(
                out,
                "kernel programs: {ns:.1} ns per run on average over {runs} runs (cgroup_skb, \
                 kernel.bpf_stats_enabled during the 64-byte UDP flood)"
            );
        }
        None => {
            let _ = writeln!(out, "kernel programs: no runs counted by bpf_stats");
        }
    }
    let _ = writeln!(
        out,
        "```\n\nNOT YET MEASURED: the floor (a cgroup_skb program that only returns 1, measured \
         the same way), so the target of at most {TARGET_PROG_FLOOR_FACTOR} x the floor is not \
         judged.\n"
    );
    Ok(())
}
