//! `cargo xtask bench`: the benchmark suite (a benchmark, not a test; see docs/benchmarks.md).
//!
//! It builds its own world (two network namespaces joined by a veth pair, unbound in the
//! server namespace, dnsperf in the client namespace), measures each figure against a baseline
//! taken in the same run, prints a table and writes it with the machine and commit to
//! `target/bench/`. Everything it creates (namespaces, processes, the temp dir, BPF run-time
//! statistics, the part 2 floor programs) is owned by a guard whose `Drop` removes it, also on
//! error, panic and Ctrl-C; what a bench killed outright (SIGKILL) leaves, the next one removes
//! first (`sweep_leftovers`).

use std::{
    fmt::Write as _,
    fs,
    io::{self, BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
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
    /// Which parts to run (1: load, 2: non-DNS traffic, 3: memory bound, 4: soak).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    parts: Vec<u32>,
    /// Length of the part 4 soak in seconds (default 600; 60 with --quick).
    #[arg(long, value_name = "SECS")]
    soak_secs: Option<u64>,
    /// A flag for every dnsprobe the benchmark starts, after its own (repeatable), to measure
    /// a setting: `--daemon-arg=--flush-interval=100ms`. The report's command line shows it.
    #[arg(long = "daemon-arg", value_name = "FLAG", allow_hyphen_values = true)]
    daemon_args: Vec<String>,
    /// Measure a plain release build of the daemon, without profile-guided optimisation.
    #[arg(long)]
    pub no_pgo: bool,
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
/// Part 2 measures each kind of traffic in this many sets of short cells (only the floor,
/// without, with the daemon; the order reversing from set to set), and judges the median of
/// the sets' ratios, with over without: on a shared VM the throughput drifts by several per
/// cent within tens of seconds, more than the cost measured, so the cells of a set must follow
/// each other closely and there must be enough sets for the median's confidence interval to
/// be narrow.
const PART2_SETS: usize = 20;
const PART2_SETS_QUICK: usize = 6;
const PART2_CELL_SECS: u64 = 2;
/// Windows of the programs' run time against the floor, alternating which is attached first.
const PROG_COST_WINDOWS: usize = 4;
/// Part 3: queries that are never answered, their rate, the RSS bound and the small cap.
const UNANSWERED_QUERIES: u32 = 100_000;
const UNANSWERED_RATE: u32 = 20_000;
const RSS_BOUND_KIB: u64 = 64 * 1024;
const SMALL_INFLIGHT: u32 = 10_000;
/// Part 4: the query rate of the soak, how far RSS may stray from its value after the
/// warm-up, and the longest warm-up and sampling interval.
const SOAK_RATE: u32 = 5_000;
const SOAK_RSS_TOLERANCE: f64 = 0.10;
const SOAK_MAX_WARMUP: Duration = Duration::from_secs(60);
const SOAK_MAX_INTERVAL: Duration = Duration::from_secs(10);
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

    /// To the child's whole process group (it leads one of its own, see `spawn`): what it
    /// started goes too.
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so
        // its group id cannot have been reused.
        unsafe {
            libc::kill(-self.pid(), sig);
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

/// The kernel's run-time statistics of BPF programs (`run_time_ns`, `run_cnt`), on while the
/// fd `bpf(BPF_ENABLE_STATS)` returned is open. It is the switch behind
/// `kernel.bpf_stats_enabled`, but held by a file descriptor, so the kernel turns it off again
/// when the bench ends in any way, killed outright included; a sysctl written by hand stays
/// written when no `Drop` runs.
struct BpfRunStats {
    _enabled: std::os::fd::OwnedFd,
}

impl BpfRunStats {
    fn enable() -> Result<BpfRunStats> {
        use std::os::fd::FromRawFd as _;
        const BPF_ENABLE_STATS: libc::c_long = 32;
        const BPF_STATS_RUN_TIME: u32 = 0;
        // `union bpf_attr` for this command is `enable_stats.type` alone; the kernel reads
        // only the size given.
        let attr: u32 = BPF_STATS_RUN_TIME;
        // SAFETY: the kernel reads 4 bytes from a live u32 and returns an fd or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                std::ptr::from_ref(&attr),
                std::mem::size_of::<u32>() as libc::c_uint,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error())
                .context("turning on BPF run-time statistics (bpf BPF_ENABLE_STATS)");
        }
        let fd = i32::try_from(fd).context("bpf BPF_ENABLE_STATS returned an odd fd")?;
        // SAFETY: a new fd the kernel just returned, owned by nothing else.
        Ok(BpfRunStats {
            _enabled: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }
}

/// The pid in the name of something a bench made (`{prefix}{pid}-...` or `{prefix}{pid}`).
fn owner_pid(name: &str, prefix: &str) -> Option<u32> {
    let rest = name.strip_prefix(prefix)?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

/// SIGKILLs every pid of a whitespace-separated list (`ip netns pids`, `cgroup.procs`). Only
/// positive numbers: 0 and -1 would reach a process group or every process.
fn kill_listed(pids: &str) {
    let pids = pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok());
    for pid in pids.filter(|&p| p > 0) {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// What benches killed outright left behind (SIGKILL runs no `Drop`): their network
/// namespaces, observer cgroups and temp dirs all carry the bench's pid. Each whose bench is
/// gone is removed, with the processes still in it killed first (an observer left running
/// keeps its programs attached). Run before a bench builds anything; says what it removed.
fn sweep_leftovers(netns_dir: &Path, cgroup_root: &Path, temp_dir: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let entries = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let dead = |name: &str, prefix: &str| owner_pid(name, prefix).is_some_and(|p| !pid_alive(p));
    for name in entries(netns_dir) {
        if !dead(&name, "dpbench-") {
            continue;
        }
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
            kill_listed(&String::from_utf8_lossy(&out.stdout));
        }
        let deleted = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if deleted {
            removed.push(format!("network namespace {name}"));
        }
    }
    for name in entries(cgroup_root) {
        if !dead(&name, "dp-bench-") {
            continue;
        }
        let dir = cgroup_root.join(&name);
        // cgroup.kill (Linux 5.14) kills every process in it; its pids one by one otherwise.
        if fs::write(dir.join("cgroup.kill"), "1").is_err() {
            kill_listed(&fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default());
        }
        match remove_cgroup(&dir) {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(e) => eprintln!("xtask: bench: cannot remove {}: {e}", dir.display()),
        }
    }
    for name in entries(temp_dir) {
        if dead(&name, "dnsprobe-bench-") && fs::remove_dir_all(temp_dir.join(&name)).is_ok() {
            removed.push(format!("temp dir {}", temp_dir.join(&name).display()));
        }
    }
    removed
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

/// What an observer has used of the CPU so far.
#[derive(Debug, Clone, Copy)]
struct CpuUse {
    /// user+sys of all its threads from /proc/<pid>/stat, in clock ticks (10 ms units).
    ticks: u64,
    /// Nanoseconds on a CPU of every task of its cgroup, exited threads included (see
    /// `CpuCgroup`).
    usage_ns: u64,
}

fn cpu_use(r: &Running) -> Result<CpuUse> {
    Ok(CpuUse {
        ticks: cpu_ticks(r.proc.pid())?,
        usage_ns: r.cgroup.usage_ns()?,
    })
}

/// A cgroup v2 holding one observer alone, for its CPU time: `cpu.stat`'s `usage_usec` is the
/// scheduler's runtime of every task that ran in it, exited threads included (the daemon reads
/// conntrack counters from short-lived threads), in microseconds. /proc/<pid>/stat's user+sys
/// is the same total (the kernel scales its tick samples of user and sys to that runtime) but
/// is given in 10 ms units: at 1k/s in a 40 s cell one unit is 0.25 µs per query, a sixth of the
/// target. /proc/<pid>/task/*/schedstat is exact but misses exited threads.
struct CpuCgroup {
    dir: PathBuf,
}

impl CpuCgroup {
    /// Makes an empty cgroup below the cgroup v2 root, removed on drop.
    fn make(name: &str) -> Result<CpuCgroup> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = cgroup2_root()?.join(format!("dp-bench-{}-{name}-{n}", std::process::id()));
        fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        Ok(CpuCgroup { dir })
    }

    /// Makes the cgroup and moves `pid` (all its threads) into it.
    fn join(name: &str, pid: i32) -> Result<CpuCgroup> {
        let cgroup = CpuCgroup::make(name)?;
        let procs = cgroup.dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("moving {name} ({pid}) into {}", procs.display()))?;
        Ok(cgroup)
    }

    fn usage_ns(&self) -> Result<u64> {
        let path = self.dir.join("cpu.stat");
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .with_context(|| format!("no usage_usec in {}", path.display()))?
            .trim()
            .parse()
            .with_context(|| format!("odd usage_usec in {}", path.display()))?;
        Ok(usec * 1000)
    }
}

impl Drop for CpuCgroup {
    /// Runs after the observer was stopped and reaped (it is dropped after the `Proc`); the
    /// cgroup may read populated a moment longer, so removal is retried for a while.
    fn drop(&mut self) {
        if let Err(e) = remove_cgroup(&self.dir) {
            eprintln!("xtask: bench: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Removes an emptied cgroup, retrying for up to 5 s: a process killed or reaped leaves it a
/// moment later. One already gone is fine.
fn remove_cgroup(dir: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(20)),
        }
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

/// A `kB` field of /proc/<pid>/status (`VmHWM`, `VmRSS`), in KiB.
fn status_kib(pid: i32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {key} in {path}"))?
        .parse()
        .with_context(|| format!("{key} in {path}"))
}

/// VmHWM (peak RSS) in KiB.
fn peak_rss_kib(pid: i32) -> Result<u64> {
    status_kib(pid, "VmHWM")
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
    /// After `proc`, so that it is dropped after the process is stopped.
    cgroup: CpuCgroup,
}

#[derive(Debug, Default, Clone)]
struct ObsResult {
    /// dnsprobe: queries=, answered=, lost_events=, evicted=; tcpdump: packets captured, dropped.
    reported: u64,
    answered: u64,
    lost: u64,
    evicted: u64,
    /// user+sys seconds, exact (see `CpuCgroup`).
    cpu_s: f64,
    /// user+sys seconds from /proc/<pid>/stat, in its 10 ms units.
    stat_s: f64,
    rss_kib: u64,
}

/// `--daemon-arg`, set once before the first daemon starts.
static DAEMON_ARGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

/// The daemon's flags in the cells that share them: queries time out well within a cell, and
/// no periodic stats line competes with the records.
const DAEMON_FLAGS: [&str; 4] = ["--query-timeout", "2s", "--stats-interval", "0s"];

fn start_dnsprobe(daemon: &Path, extra: &[&str]) -> Result<Running> {
    let mut cmd = Command::new(daemon);
    cmd.args(["run", "--format", "json", "--output", "/dev/null"])
        .args(extra)
        .args(DAEMON_ARGS.get().map(Vec::as_slice).unwrap_or_default());
    let mut proc = Proc::spawn("dnsprobe", &mut cmd)?;
    let cgroup = CpuCgroup::join("dnsprobe", proc.pid())?;
    proc.wait_line("capture started", START_TIMEOUT)?;
    Ok(Running {
        proc,
        kind: Observer::Dnsprobe,
        cgroup,
    })
}

fn start_observer(kind: Observer, w: &World, daemon: &Path) -> Result<Option<Running>> {
    match kind {
        Observer::None => Ok(None),
        Observer::Dnsprobe => start_dnsprobe(daemon, &DAEMON_FLAGS).map(Some),
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
            let cgroup = CpuCgroup::join("tcpdump", proc.pid())?;
            proc.wait_line("listening on", START_TIMEOUT)?;
            Ok(Some(Running { proc, kind, cgroup }))
        }
    }
}

/// Stops the observer and reads its counts; `t0` is its CPU use before the load window.
fn finish_observer(mut r: Running, t0: CpuUse) -> Result<ObsResult> {
    let pid = r.proc.pid();
    let t1 = cpu_use(&r)?;
    let rss = peak_rss_kib(pid)?;
    let st = r.proc.stop()?;
    let mut res = ObsResult {
        cpu_s: (t1.usage_ns.saturating_sub(t0.usage_ns)) as f64 / 1e9,
        stat_s: (t1.ticks.saturating_sub(t0.ticks)) as f64 / clk_tck(),
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
    let p = spawn_dnsperf(w, qfile, secs, rate, clients)?;
    finish_dnsperf(p, secs)
}

fn spawn_dnsperf(
    w: &World,
    qfile: &Path,
    secs: u64,
    rate: Option<u32>,
    clients: u32,
) -> Result<Proc> {
    let mut cmd = w.exec(&w.cli, "dnsperf");
    cmd.args(["-s", &w.srv_ip, "-l", &secs.to_string()])
        .args(["-c", &clients.to_string(), "-q", "1000"])
        .arg("-d")
        .arg(qfile);
    if let Some(r) = rate {
        cmd.args(["-Q", &r.to_string()]);
    }
    Proc::spawn("dnsperf", &mut cmd)
}

/// Waits for a dnsperf run of `secs` seconds to end and reads its totals.
fn finish_dnsperf(mut p: Proc, secs: u64) -> Result<Perf> {
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

/// dnsperf's query file: the names unbound serves, in turn.
fn write_query_file(dir: &Path) -> Result<PathBuf> {
    let qfile = dir.join("queries.txt");
    let mut q = String::new();
    for i in 0..NAMES {
        let _ = writeln!(q, "n{i}.{ZONE} A");
    }
    fs::write(&qfile, q).with_context(|| format!("writing {}", qfile.display()))?;
    Ok(qfile)
}

fn part1(
    w: &World,
    qfile: &Path,
    daemon: &Path,
    rates: &[Option<u32>],
    secs: u64,
    clients: u32,
    out: &mut String,
) -> Result<()> {
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
                Some(r) => Some(cpu_use(r)?),
                None => None,
            };
            let perf = dnsperf(w, qfile, secs, rate, clients)?;
            // Let the observer drain what the last answers produced.
            sleep(Duration::from_millis(500))?;
            let obs = running
                .zip(t0)
                .map(|(r, t0)| finish_observer(r, t0))
                .transpose()?;
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
         dnsprobe's `lost_events=` (tcpdump: packets dropped by kernel); `cpu µs/q`: user+sys \
         of every thread of the observer, exited ones included, from its own cgroup's \
         `cpu.stat` (exact), which the target is judged on; `stat µs/q`: the same window's \
         user+sys from /proc/<pid>/stat, the same total but counted in 10 ms units (one unit \
         is {:.2} µs/q in a cell of {secs} s at 1k/s).\n",
        0.01 * 1e6 / (1000.0 * secs.max(1) as f64)
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:>5} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8} {:>6}  verdicts",
        "rate",
        "observer",
        "sent",
        "answered",
        "qps",
        "reported",
        "answered",
        "lost",
        "cpu µs/q",
        "stat µs/q",
        "rss MiB",
        "ratio"
    );
    let _ = writeln!(
        out,
        "{:>5} {:<9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8} {:>6}",
        "", "", "(dnsperf)", "(dnsperf)", "(dnsperf)", "(obs)", "(obs)", "(obs)", "", "", "", ""
    );
    let mut notes = Vec::new();
    for r in &rows {
        if let Some(o) = &r.obs {
            if let Some(gap) = accounting_gap(o.cpu_s, o.stat_s, clk_tck()) {
                notes.push(format!(
                    "NOTE: {} {}: /proc/<pid>/stat reads {:.1} ms and the cgroup {:.1} ms: {:.1} ms \
                     apart, more than truncating user and system to whole clock ticks explains.",
                    rate_label(r.rate),
                    r.kind.label(),
                    o.stat_s * 1e3,
                    o.cpu_s * 1e3,
                    gap * 1e3
                ));
            }
        }
        let (rep, ans, lost, cpu, stat, rss) = match &r.obs {
            Some(o) => {
                let per_query = |s: f64| {
                    if r.perf.completed > 0 {
                        s * 1e6 / r.perf.completed as f64
                    } else {
                        f64::NAN
                    }
                };
                (
                    o.reported.to_string(),
                    if r.kind == Observer::Dnsprobe {
                        o.answered.to_string()
                    } else {
                        "-".into()
                    },
                    o.lost.to_string(),
                    format!("{:.2}", per_query(o.cpu_s)),
                    format!("{:.2}", per_query(o.stat_s)),
                    format!("{:.1}", o.rss_kib as f64 / 1024.0),
                )
            }
            None => (
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
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
            "{:>5} {:<9} {:>9} {:>9} {:>9.0} {:>9} {:>9} {:>6} {:>9} {:>9} {:>8} {:>6.3}  {}",
            rate_label(r.rate),
            r.kind.label(),
            r.perf.sent,
            r.perf.completed,
            r.perf.qps,
            rep,
            ans,
            lost,
            cpu,
            stat,
            rss,
            r.ratio,
            verdicts.join(", ")
        );
    }
    let _ = writeln!(out, "```\n");
    for note in notes {
        let _ = writeln!(out, "{note}\n");
    }
    Ok(())
}

/// How far apart the two readings of one window's CPU time are, in seconds, when that is more
/// than /proc/<pid>/stat's truncation explains: it gives user and system each in whole clock
/// ticks, so a difference of two readings may be up to two ticks off the exact one. `None` when
/// they agree.
fn accounting_gap(exact_s: f64, stat_s: f64, ticks_per_s: f64) -> Option<f64> {
    let gap = (exact_s - stat_s).abs();
    // A millisecond for the two files not being read at the same instant.
    (gap > 2.0 / ticks_per_s + 0.001).then_some(gap)
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
        let t0 = cpu_use(&r)?;
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
pub fn bench(args: &BenchArgs, root: &Path, build: &crate::pgo::DaemonBuild) -> Result<()> {
    let daemon = build.binary.as_path();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench needs root: it loads eBPF programs and creates network namespaces");
    }
    install_signal_handlers();
    let secs = args.duration.unwrap_or(if args.quick { 3 } else { 10 });
    let soak_secs = args.soak_secs.unwrap_or(if args.quick { 60 } else { 600 });
    let rates = parse_rates(&args.rates)?;
    if let Some(p) = args.parts.iter().find(|p| !(1..=4).contains(*p)) {
        bail!("--parts: there is no part {p} (parts are 1 to 4)");
    }
    // Fewer than 10 s leaves no room for a warm-up and several samples after it.
    if args.parts.contains(&4) && soak_secs < 10 {
        bail!("--soak-secs: at least 10 (to skip the soak, leave 4 out of --parts)");
    }
    let _ = DAEMON_ARGS.set(args.daemon_args.clone());
    for what in sweep_leftovers(
        Path::new("/run/netns"),
        &cgroup2_root()?,
        &std::env::temp_dir(),
    ) {
        eprintln!("xtask: bench: removed {what}, left by a bench that was killed");
    }
    let dir = TempDir(std::env::temp_dir().join(format!("dnsprobe-bench-{}", std::process::id())));
    fs::create_dir_all(&dir.0)?;
    let world = World::new().context("building the namespaces")?;
    let mut report = String::new();
    let _ = writeln!(report, "# dnsprobe benchmark\n");
    let _ = writeln!(
        report,
        "{}- daemon: {}\n",
        machine_info(root),
        build.description
    );
    let _ = writeln!(
        report,
        "Command: `cargo xtask bench {}`\n",
        std::env::args().skip(2).collect::<Vec<_>>().join(" ")
    );

    // Parts 1 and 4 query unbound; it stays up (idle) through parts 2 and 3 in between, which
    // use other ports and addresses.
    let unbound = if args.parts.contains(&1) || args.parts.contains(&4) {
        Some((start_unbound(&world, &dir.0)?, write_query_file(&dir.0)?))
    } else {
        None
    };
    if let (true, Some((_, qfile))) = (args.parts.contains(&1), &unbound) {
        part1(
            &world,
            qfile,
            daemon,
            &rates,
            secs,
            args.clients,
            &mut report,
        )?;
    }
    if args.parts.contains(&2) {
        part2(&world, daemon, secs, args.quick, &mut report)?;
    }
    if args.parts.contains(&3) {
        part3(&world, daemon, &mut report)?;
    }
    if let (true, Some((_, qfile))) = (args.parts.contains(&4), &unbound) {
        part4(&world, qfile, daemon, soak_secs, args.clients, &mut report)?;
    }
    drop(unbound);

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

/// One program of `bpftool prog show` with its cumulative bpf_stats counters.
#[derive(Debug, Clone)]
struct ProgStat {
    id: u32,
    kind: String,
    name: String,
    run_time_ns: u64,
    run_cnt: u64,
}

/// Every loaded program with its counters, from one `bpftool prog show`, so that the daemon's
/// programs and the floor are read at the same instant and the same way.
fn prog_snapshot() -> Result<Vec<ProgStat>> {
    let text = sh(Command::new("bpftool").args(["prog", "show"]))?;
    Ok(parse_prog_show(&text))
}

/// Parses bpftool's text: each program starts with a line `ID: TYPE  name NAME ... run_time_ns
/// N run_cnt N` (the counters only once the program has run with stats on), followed by
/// indented detail lines.
fn parse_prog_show(text: &str) -> Vec<ProgStat> {
    let mut progs = Vec::new();
    for head in text.lines() {
        let t: Vec<&str> = head.split_whitespace().collect();
        let Some(id) = t
            .first()
            .and_then(|x| x.strip_suffix(':'))
            .and_then(|x| x.parse().ok())
        else {
            continue;
        };
        let after = |k: &str| t.iter().position(|x| *x == k).and_then(|i| t.get(i + 1));
        let count = |k: &str| after(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        progs.push(ProgStat {
            id,
            kind: t.get(1).copied().unwrap_or_default().to_owned(),
            name: after("name").copied().unwrap_or_default().to_owned(),
            run_time_ns: count("run_time_ns"),
            run_cnt: count("run_cnt"),
        });
    }
    progs
}

/// Ids of the BPF programs a process holds: the `prog_id:` lines of /proc/<pid>/fdinfo, which
/// the kernel writes for every program and link fd. This bpftool shows no owning pids, and
/// another dnsprobe (a test, another bench) may have loaded programs of the same names.
fn held_prog_ids(pid: i32) -> Result<Vec<u32>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        // An fd closed since the listing is simply not one of them.
        let Ok(text) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("prog_id:"))
                .filter_map(|v| v.trim().parse::<u32>().ok()),
        );
    }
    Ok(ids)
}

/// The id of the daemon's `cgroup_skb` program called `name`: the one it holds, else (if its
/// fds tell nothing) the newest of that name, which is the daemon's only if no other dnsprobe
/// started meanwhile.
fn daemon_cgroup_skb(progs: &[ProgStat], held: &[u32], name: &str) -> Result<u32> {
    let named = || {
        progs
            .iter()
            .filter(|p| p.kind == "cgroup_skb" && p.name == name)
    };
    if let Some(p) = named().find(|p| held.contains(&p.id)) {
        return Ok(p.id);
    }
    let id = named()
        .map(|p| p.id)
        .max()
        .with_context(|| format!("no cgroup_skb program `{name}` in `bpftool prog show`"))?;
    eprintln!(
        "xtask: bench: part 2: the daemon holds no fd of `{name}`; taking the newest (id {id})"
    );
    Ok(id)
}

/// Run time and runs of one program between two snapshots.
#[derive(Debug, Clone, Copy, Default)]
struct Runs {
    ns: u64,
    cnt: u64,
}

impl Runs {
    fn between(before: &[ProgStat], after: &[ProgStat], id: u32) -> Result<Runs> {
        let find = |s: &[ProgStat]| {
            s.iter()
                .find(|p| p.id == id)
                .cloned()
                .with_context(|| format!("program {id} vanished from `bpftool prog show`"))
        };
        let (b, a) = (find(before)?, find(after)?);
        Ok(Runs {
            ns: a.run_time_ns.saturating_sub(b.run_time_ns),
            cnt: a.run_cnt.saturating_sub(b.run_cnt),
        })
    }

    fn add(self, o: Runs) -> Runs {
        Runs {
            ns: self.ns + o.ns,
            cnt: self.cnt + o.cnt,
        }
    }

    fn avg_ns(self) -> Option<f64> {
        (self.cnt > 0).then(|| self.ns as f64 / self.cnt as f64)
    }
}

/// One window of [`prog_cost`]; per direction (egress, ingress), the daemon's programs and the
/// floor's.
struct ProgCost {
    order: FirstRun,
    daemon: [Runs; 2],
    floor: [Runs; 2],
}

impl ProgCost {
    /// Both directions together: the daemon's average run over the floor's.
    fn ratio(&self) -> Option<f64> {
        let d = self.daemon[0].add(self.daemon[1]).avg_ns()?;
        let f = self.floor[0].add(self.floor[1]).avg_ns()?;
        Some(d / f)
    }
}

/// The mount point of cgroup v2, found as the daemon finds it (the first `cgroup2` entry of
/// /proc/self/mountinfo), since the floor must sit on the same cgroup as the daemon's programs.
fn cgroup2_root() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    info.lines()
        .find_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            if post.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            pre.split_whitespace().nth(4).map(unescape_mountinfo)
        })
        .map(PathBuf::from)
        .context("no cgroup2 mount in /proc/self/mountinfo")
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8) + (c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The part 2 floor: two `cgroup_skb` programs that only return 1 (egress and ingress), loaded
/// and attached with the raw bpf(2) syscall so that xtask needs no eBPF crate or build step.
/// Measured with bpf_stats beside the daemon's programs, they give what any cgroup_skb program
/// costs per packet here (the call and the stats' own clock reads), against which the daemon's
/// programs are judged.
mod floor {
    use std::{
        fs, io, mem,
        os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        path::Path,
    };

    use anyhow::{bail, Context as _, Result};

    // Values from include/uapi/linux/bpf.h. They are kernel ABI: enum values are only ever
    // appended to, never renumbered, so hard-coding them is as safe as the headers.
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_PROG_TYPE_CGROUP_SKB: u32 = 8;
    const BPF_CGROUP_INET_INGRESS: u32 = 0;
    const BPF_CGROUP_INET_EGRESS: u32 = 1;

    /// The size passed for every `union bpf_attr`. The kernel accepts any size: it copies
    /// min(size, its own sizeof) bytes and rejects only non-zero bytes that it does not know,
    /// so a zeroed 128-byte block holding the fields of one command at their uapi offsets is
    /// valid for every kernel that has those fields (all fields used here exist since 5.7).
    const ATTR_SIZE: usize = 128;

    /// `struct bpf_insn`: opcode, then dst_reg in the low and src_reg in the high nibble (on a
    /// little-endian machine), a 16-bit offset and a 32-bit immediate.
    #[repr(C)]
    struct Insn {
        code: u8,
        regs: u8,
        off: i16,
        imm: i32,
    }

    /// `r0 = 1; exit`: BPF_ALU64 | BPF_MOV | BPF_K with imm 1, then BPF_JMP | BPF_EXIT. A
    /// cgroup_skb program returns 1 to let the packet pass, so the floor changes no traffic.
    const PROGRAM: [Insn; 2] = [
        Insn {
            code: 0xb7,
            regs: 0,
            off: 0,
            imm: 1,
        },
        Insn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];

    /// The BPF_PROG_LOAD member of `union bpf_attr`, up to `expected_attach_type`; the
    /// `__aligned_u64` pointers are u64 here and fall on 8-byte offsets, so repr(C) lays the
    /// fields out exactly as the uapi struct (checked by the size assertion below).
    #[repr(C)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
        /// prog_btf_fd and later fields: zero means "not used".
        rest: [u8; ATTR_SIZE - 72],
    }

    /// The BPF_LINK_CREATE member; the command-specific union after `flags` stays zero (for a
    /// cgroup: no relative program, no expected revision).
    #[repr(C)]
    struct LinkCreateAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u8; ATTR_SIZE - 16],
    }

    /// The BPF_OBJ_GET_INFO_BY_FD member.
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        rest: [u8; ATTR_SIZE - 16],
    }

    /// The head of `struct bpf_prog_info`. The kernel fills only `info_len` bytes, so asking for
    /// these 8 is enough to learn the id without mirroring the whole (growing) struct.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfoHead {
        prog_type: u32,
        id: u32,
    }

    const _: () = assert!(mem::size_of::<ProgLoadAttr>() == ATTR_SIZE);
    const _: () = assert!(mem::size_of::<LinkCreateAttr>() == ATTR_SIZE);
    const _: () = assert!(mem::size_of::<InfoAttr>() == ATTR_SIZE);
    const _: () = assert!(mem::size_of::<Insn>() == 8);

    /// bpf(2) with one of the attr structs above; the new fd (or 0) on success.
    ///
    /// # Safety
    /// `attr` must be the struct that matches `cmd`, and every pointer in it must be valid for
    /// the duration of the call.
    unsafe fn bpf<A>(cmd: libc::c_long, attr: &mut A) -> io::Result<libc::c_long> {
        // SAFETY: per this function's contract; the kernel reads and writes at most
        // size_of::<A>() bytes of `attr`.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut A,
                mem::size_of::<A>() as libc::c_long,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// Takes ownership of an fd the kernel just returned.
    fn owned(fd: libc::c_long) -> Result<OwnedFd> {
        let raw = i32::try_from(fd).context("bpf(2) returned an fd out of range")?;
        // SAFETY: the kernel returned this fd just now and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    fn load(name: &str, attach_type: u32) -> Result<OwnedFd> {
        let license = b"GPL\0";
        let mut prog_name = [0u8; 16];
        prog_name[..name.len()].copy_from_slice(name.as_bytes());
        let mut log = vec![0u8; 64 * 1024];
        // The first try has no log (the kernel's usual fast path); if it fails, the second asks
        // for the verifier's log so that the error says why.
        for log_level in [0u32, 1] {
            let mut attr = ProgLoadAttr {
                prog_type: BPF_PROG_TYPE_CGROUP_SKB,
                insn_cnt: PROGRAM.len() as u32,
                insns: PROGRAM.as_ptr() as u64,
                license: license.as_ptr() as u64,
                log_level,
                log_size: if log_level > 0 { log.len() as u32 } else { 0 },
                log_buf: if log_level > 0 {
                    log.as_mut_ptr() as u64
                } else {
                    0
                },
                kern_version: 0,
                prog_flags: 0,
                prog_name,
                prog_ifindex: 0,
                expected_attach_type: attach_type,
                rest: [0; ATTR_SIZE - 72],
            };
            // SAFETY: BPF_PROG_LOAD with its attr; PROGRAM, license and log outlive the call.
            match unsafe { bpf(BPF_PROG_LOAD, &mut attr) } {
                Ok(fd) => return owned(fd),
                Err(e) if log_level > 0 => {
                    let end = log.iter().position(|&c| c == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    return Err(e).with_context(|| {
                        format!("BPF_PROG_LOAD of the floor `{name}`; verifier log:\n{text}")
                    });
                }
                Err(_) => {}
            }
        }
        bail!("BPF_PROG_LOAD of the floor `{name}` failed")
    }

    fn prog_id(prog: &OwnedFd) -> Result<u32> {
        let mut head = ProgInfoHead::default();
        let mut attr = InfoAttr {
            bpf_fd: prog.as_raw_fd() as u32,
            info_len: mem::size_of::<ProgInfoHead>() as u32,
            info: &mut head as *mut ProgInfoHead as u64,
            rest: [0; ATTR_SIZE - 16],
        };
        // SAFETY: BPF_OBJ_GET_INFO_BY_FD with its attr; `head` outlives the call and is
        // info_len bytes long.
        unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }
            .context("BPF_OBJ_GET_INFO_BY_FD on the floor program")?;
        debug_assert_eq!(head.prog_type, BPF_PROG_TYPE_CGROUP_SKB);
        Ok(head.id)
    }

    /// A BPF link, not BPF_PROG_ATTACH: links always attach in multi mode, so the floor sits
    /// beside the daemon's programs whatever mode they used, and closing the link's fd (it is
    /// never pinned) detaches it, so the kernel cleans up even if xtask is killed.
    fn link(prog: &OwnedFd, cgroup: &fs::File, attach_type: u32) -> Result<OwnedFd> {
        let mut attr = LinkCreateAttr {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            flags: 0,
            rest: [0; ATTR_SIZE - 16],
        };
        // SAFETY: BPF_LINK_CREATE with its attr, which holds no pointers.
        let fd = unsafe { bpf(BPF_LINK_CREATE, &mut attr) }
            .context("BPF_LINK_CREATE of the floor on the cgroup")?;
        owned(fd)
    }

    /// One attached floor program. Field order is drop order: the link (detach) goes first,
    /// then the program's last reference.
    pub struct Prog {
        pub id: u32,
        _link: OwnedFd,
        _prog: OwnedFd,
    }

    /// The egress and ingress floor programs, attached while this lives (RAII: dropping it,
    /// also on error or panic, closes the fds and so detaches and unloads them).
    pub struct Floor {
        pub egress: Prog,
        pub ingress: Prog,
    }

    impl Floor {
        pub fn attach(cgroup: &Path) -> Result<Floor> {
            let dir = fs::File::open(cgroup)
                .with_context(|| format!("opening the cgroup {}", cgroup.display()))?;
            let one = |name: &str, attach_type: u32| -> Result<Prog> {
                let prog = load(name, attach_type)?;
                let id = prog_id(&prog)?;
                let link = link(&prog, &dir, attach_type)
                    .with_context(|| format!("{name} on {}", cgroup.display()))?;
                Ok(Prog {
                    id,
                    _link: link,
                    _prog: prog,
                })
            };
            Ok(Floor {
                egress: one("dpb_floor_eg", BPF_CGROUP_INET_EGRESS)?,
                ingress: one("dpb_floor_in", BPF_CGROUP_INET_INGRESS)?,
            })
        }
    }
}

/// Which of the daemon's programs and the floor was attached first, and so runs first on every
/// packet: the first to read a packet may pay for bringing it into the cache, so the windows
/// alternate and the verdict takes both orders alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstRun {
    Daemon,
    Floor,
}

impl FirstRun {
    fn label(self) -> &'static str {
        match self {
            FirstRun::Daemon => "dnsprobe",
            FirstRun::Floor => "floor",
        }
    }
}

/// One window with bpf_stats on: a daemon of its own and the floor attached beside it in
/// `order`, under the 64-byte UDP flood. Runs apart from the ratio cells, because the stats
/// and the floor slow the traffic and must not bias the throughput ratio.
fn prog_cost(
    w: &World,
    daemon: &Path,
    cgroup: &Path,
    secs: u64,
    order: FirstRun,
) -> Result<ProgCost> {
    // Declared first, so dropped last: the statistics go off on every path out of here.
    let stats = BpfRunStats::enable()?;
    let start = || start_dnsprobe(daemon, &DAEMON_FLAGS);
    let attach = || floor::Floor::attach(cgroup).context("attaching the floor programs");
    let (mut d, floor) = match order {
        FirstRun::Daemon => {
            let d = start()?;
            (d, attach()?)
        }
        FirstRun::Floor => {
            let f = attach()?;
            (start()?, f)
        }
    };
    // Resolved before the flood, so that a missing program fails fast.
    let snap = prog_snapshot()?;
    let held = held_prog_ids(d.proc.pid())?;
    let daemon_ids = [
        daemon_cgroup_skb(&snap, &held, "dns_egress")?,
        daemon_cgroup_skb(&snap, &held, "dns_ingress")?,
    ];
    let floor_ids = [floor.egress.id, floor.ingress.id];
    let before = prog_snapshot()?;
    iperf(w, secs, true)?;
    let after = prog_snapshot()?;
    drop(floor);
    d.proc.stop()?;
    drop(stats);
    let runs = |ids: [u32; 2]| -> Result<[Runs; 2]> {
        Ok([
            Runs::between(&before, &after, ids[0])?,
            Runs::between(&before, &after, ids[1])?,
        ])
    };
    Ok(ProgCost {
        order,
        daemon: runs(daemon_ids)?,
        floor: runs(floor_ids)?,
    })
}

/// The middle value (the mean of the two middle ones for an even count); 0 for none.
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The middle value's distribution-free confidence interval: the values of ranks k and n+1-k
/// (sorted, counted from 1) for the largest k whose two tails together hold at most 5 % of
/// Binomial(n, 1/2); with fewer than six values no such k exists and it is the whole range.
/// Returns the interval and the probability that it holds the true median.
fn median_interval(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    // P(X <= j) for X ~ Binomial(n, 1/2), j = 0, 1, ...
    let mut below = Vec::with_capacity(n + 1);
    let (mut term, mut sum) = (0.5f64.powi(n as i32), 0.0);
    for j in 0..=n {
        sum += term;
        below.push(sum);
        term = term * (n - j) as f64 / (j + 1) as f64;
    }
    // The interval [v(k), v(n+1-k)] misses the median with probability 2 P(X <= k-1).
    let k = (1..=n.div_ceil(2))
        .rev()
        .find(|&k| 2.0 * below[k - 1] <= 0.05)
        .unwrap_or(1);
    let coverage = 1.0 - 2.0 * below[k - 1];
    Some((v[k - 1], v[n - k], coverage))
}

/// Which cell of a part 2 set: nothing attached, only the floor, or dnsprobe.
#[derive(Debug, Clone, Copy)]
enum Arm {
    Without,
    Floor,
    With,
    /// dnsprobe attached (`--cgroup-root`) to an empty cgroup, so the traffic is outside what
    /// it observes: what a node's other traffic pays when dnsprobe watches only the pods.
    Elsewhere,
}

impl Arm {
    fn label(self) -> &'static str {
        match self {
            Arm::Without => "without dnsprobe",
            Arm::Floor => "with only the floor",
            Arm::With => "with dnsprobe",
            Arm::Elsewhere => "with dnsprobe attached elsewhere",
        }
    }
}

/// `with[i] / base[i]` for each set (0 where the base measured nothing).
fn ratios_of(base: &[f64], with: &[f64]) -> Vec<f64> {
    base.iter()
        .zip(with)
        .map(|(&b, &w)| if b > 0.0 { w / b } else { 0.0 })
        .collect()
}

fn part2(w: &World, daemon: &Path, secs: u64, quick: bool, out: &mut String) -> Result<()> {
    let cgroup = cgroup2_root()?;
    // Nothing ever runs in it: the iperf3 traffic stays outside what dnsprobe observes there.
    let empty = CpuCgroup::make("elsewhere")?;
    let elsewhere = empty.dir.to_string_lossy().into_owned();
    let mut srv_cmd = w.exec(&w.srv, "iperf3");
    srv_cmd.args(["-s", "--forceflush", "-B", &w.srv_ip]);
    let mut server = Proc::spawn("iperf3 server", &mut srv_cmd)?;
    server.wait_line("Server listening", START_TIMEOUT)?;
    let set_count = if quick { PART2_SETS_QUICK } else { PART2_SETS };
    let cell_secs = PART2_CELL_SECS;
    let mut rows = Vec::new();
    for udp64 in [false, true] {
        let label = if udp64 {
            "udp 64 B (pkt/s)"
        } else {
            "tcp bulk (Gbit/s)"
        };
        // Each set's cell without, with dnsprobe, with only the floor, and with dnsprobe
        // attached elsewhere.
        let (mut bases, mut withs, mut floors) = (Vec::new(), Vec::new(), Vec::new());
        let mut elsewheres = Vec::new();
        // The daemon's share of one CPU in each cell with it.
        let mut daemon_cpu = Vec::new();
        for set in 0..set_count {
            let mut cell = |arm: Arm| -> Result<f64> {
                let n = set + 1;
                eprintln!(
                    "xtask: bench: part 2: {label} {}, set {n} of {set_count} ({cell_secs} s)",
                    arm.label()
                );
                match arm {
                    Arm::Without => iperf(w, cell_secs, udp64),
                    Arm::Floor => {
                        let _floor = floor::Floor::attach(&cgroup)
                            .context("attaching the floor programs")?;
                        iperf(w, cell_secs, udp64)
                    }
                    Arm::With => {
                        let mut d = start_dnsprobe(daemon, &DAEMON_FLAGS)?;
                        let t0 = cpu_use(&d)?;
                        let started = Instant::now();
                        let with = iperf(w, cell_secs, udp64)?;
                        let t1 = cpu_use(&d)?;
                        daemon_cpu.push(
                            t1.usage_ns.saturating_sub(t0.usage_ns) as f64
                                / started.elapsed().as_nanos().max(1) as f64,
                        );
                        d.proc.stop()?;
                        Ok(with)
                    }
                    Arm::Elsewhere => {
                        let mut flags = DAEMON_FLAGS.to_vec();
                        flags.extend(["--cgroup-root", &elsewhere]);
                        let mut d = start_dnsprobe(daemon, &flags)?;
                        let with = iperf(w, cell_secs, udp64)?;
                        d.proc.stop()?;
                        Ok(with)
                    }
                }
            };
            // Alternating the order cancels a slow drift of the machine; the cell without
            // stays next to dnsprobe's cell, which the verdict compares it with.
            let (floor, away, base, with) = if set % 2 == 0 {
                let floor = cell(Arm::Floor)?;
                let away = cell(Arm::Elsewhere)?;
                let base = cell(Arm::Without)?;
                (floor, away, base, cell(Arm::With)?)
            } else {
                let with = cell(Arm::With)?;
                let base = cell(Arm::Without)?;
                let away = cell(Arm::Elsewhere)?;
                (cell(Arm::Floor)?, away, base, with)
            };
            bases.push(base);
            withs.push(with);
            floors.push(floor);
            elsewheres.push(away);
        }
        let target = if udp64 {
            TARGET_UDP64_RATIO
        } else {
            TARGET_TCP_RATIO
        };
        rows.push((
            label,
            [bases, withs, floors, elsewheres],
            target,
            median(&daemon_cpu),
        ));
    }
    let mut costs = Vec::new();
    for window in 0..PROG_COST_WINDOWS {
        let order = if window % 2 == 0 {
            FirstRun::Daemon
        } else {
            FirstRun::Floor
        };
        eprintln!(
            "xtask: bench: part 2: programs, window {} ({} first), bpf_stats on ({secs} s)",
            window + 1,
            order.label()
        );
        costs.push(prog_cost(w, daemon, &cgroup, secs, order)?);
    }
    drop(server);
    let _ = writeln!(out, "## 2. Cost to traffic that is not DNS\n");
    let _ = writeln!(
        out,
        "iperf3 client namespace -> server namespace, {set_count} sets of {cell_secs} s cells: \
         without anything attached, with dnsprobe (started afresh for each), with only the \
         floor (two `cgroup_skb` programs that only return 1, on the same cgroup), and with \
         dnsprobe attached elsewhere, in the order floor, elsewhere, without, with, then with, \
         without, elsewhere, floor, alternating; short, so that the cells of a set see the same \
         host. `without` and `with` are the medians of the cells, `ratio` the \
         median of the sets' ratios, which the verdict judges, and `interval` its \
         distribution-free confidence interval (order statistics; `cover` is the chance it \
         holds the true median): when the interval holds the target, another run may well \
         judge the other way. `daemon` is the daemon's own time on a CPU during the cells with \
         it (its cgroup's `cpu.stat`; the median, in % of one CPU). Under each kind of traffic, \
         three rows that judge nothing: `floor only` compares the floor's cells with those \
         without (what any `cgroup_skb` program on the root cgroup costs this traffic, its \
         `with` column being the floor's), and `dnsprobe/floor` dnsprobe's cells with the \
         floor's (what dnsprobe costs beyond that; its `without` column being the floor's), \
         and `elsewhere` the cells with dnsprobe attached (`--cgroup-root`) to an empty cgroup \
         with those without (what traffic outside the subtree dnsprobe observes pays: on a \
         node, the host's traffic when dnsprobe watches only the pods' slice; its `with` \
         column being those cells'). Every set's ratios follow the table.\n"
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:<18} {:>12} {:>12} {:>7}  {:<13} {:>5}  {:>7}  verdict",
        "traffic", "without", "with", "ratio", "interval", "cover", "daemon"
    );
    let mut listed = String::new();
    for (label, [bases, withs, floors, elsewheres], target, daemon_cpu) in rows {
        let compared = [
            (label.to_owned(), &bases, &withs),
            ("  floor only".to_owned(), &bases, &floors),
            ("  dnsprobe/floor".to_owned(), &floors, &withs),
            ("  elsewhere".to_owned(), &bases, &elsewheres),
        ];
        for (i, (row_label, base, with)) in compared.into_iter().enumerate() {
            let ratios = ratios_of(base, with);
            let ratio = median(&ratios);
            let (lo, hi, cover) = median_interval(&ratios).unwrap_or((0.0, 0.0, 0.0));
            let (daemon, judged) = if i == 0 {
                let straddles = if lo < target && target <= hi {
                    " (the interval holds the target)"
                } else {
                    ""
                };
                (
                    format!("{:.2}%", daemon_cpu * 100.0),
                    format!(">= {target}: {}{straddles}", verdict(ratio >= target)),
                )
            } else {
                ("-".to_owned(), "(reference)".to_owned())
            };
            let _ = writeln!(
                out,
                "{row_label:<18} {:>12.2} {:>12.2} {ratio:>7.3}  {:<13} {:>4.0}%  {daemon:>7}  \
                 {judged}",
                median(base),
                median(with),
                format!("{lo:.3}-{hi:.3}"),
                cover * 100.0,
            );
            let named = if i == 0 {
                label.to_owned()
            } else {
                format!("{label} {}", row_label.trim())
            };
            let _ = writeln!(
                listed,
                "{named}, sets in order: {}",
                ratios
                    .iter()
                    .map(|r| format!("{r:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
    }
    let _ = writeln!(out, "```\n");
    let _ = writeln!(out, "```\n{listed}```\n");
    write_prog_cost(&costs, secs, out);
    Ok(())
}

fn write_prog_cost(costs: &[ProgCost], secs: u64, out: &mut String) {
    let _ = writeln!(
        out,
        "Kernel programs: {} further {secs} s windows of 64-byte UDP, each with a daemon of its \
         own, BPF run-time statistics on and the floor (two `cgroup_skb` programs that only \
         return 1, on the same cgroup) attached beside it; their throughput is not reported. \
         Programs on a cgroup run in the order they were attached, and the first to read a \
         packet may pay for bringing it into the cache, so the windows alternate which is \
         attached first (`first`). `ratio` is dnsprobe's average run over the floor's, both \
         directions together; the verdict judges the median of the windows' ratios. The \
         direction rows add up all windows, to show where the cost is.\n",
        costs.len()
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:<10} {:<9} {:>12} {:>10} {:>12} {:>10} {:>7}  verdict",
        "window", "first", "dnsprobe", "ns/run", "floor", "ns/run", "ratio"
    );
    let _ = writeln!(
        out,
        "{:<10} {:<9} {:>12} {:>10} {:>12} {:>10} {:>7}",
        "", "", "(runs)", "", "(runs)", "", ""
    );
    let fmt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |x| format!("{x:.prec$}"));
    let mut row = |label: &str, first: &str, d: Runs, f: Runs, judged: &str| {
        let ratio = d.avg_ns().zip(f.avg_ns()).map(|(d, f)| d / f);
        let _ = writeln!(
            out,
            "{label:<10} {first:<9} {:>12} {:>10} {:>12} {:>10} {:>7}  {judged}",
            d.cnt,
            fmt(d.avg_ns(), 1),
            f.cnt,
            fmt(f.avg_ns(), 1),
            fmt(ratio, 2),
        );
    };
    let mut totals = [[Runs::default(); 2]; 2];
    for (i, c) in costs.iter().enumerate() {
        for (total, runs) in totals.iter_mut().zip([c.daemon, c.floor]) {
            total[0] = total[0].add(runs[0]);
            total[1] = total[1].add(runs[1]);
        }
        row(
            &format!("{}", i + 1),
            c.order.label(),
            c.daemon[0].add(c.daemon[1]),
            c.floor[0].add(c.floor[1]),
            "",
        );
    }
    let ratios: Vec<f64> = costs.iter().filter_map(ProgCost::ratio).collect();
    let judged = if ratios.len() == costs.len() && !ratios.is_empty() {
        let m = median(&ratios);
        format!(
            "median {m:.2}: prog<={TARGET_PROG_FLOOR_FACTOR}x floor {}",
            verdict(m <= TARGET_PROG_FLOOR_FACTOR)
        )
    } else {
        "not judged: a window counted no runs".to_owned()
    };
    row("egress", "all", totals[0][0], totals[1][0], "");
    row("ingress", "all", totals[0][1], totals[1][1], "");
    row(
        "both",
        "all",
        totals[0][0].add(totals[0][1]),
        totals[1][0].add(totals[1][1]),
        &judged,
    );
    let _ = writeln!(out, "```\n");
}

/// Part 4: the daemon under steady load for a long time; its memory must level off.
fn part4(
    w: &World,
    qfile: &Path,
    daemon: &Path,
    secs: u64,
    clients: u32,
    out: &mut String,
) -> Result<()> {
    let total = Duration::from_secs(secs);
    // Short runs scale both down so that several samples follow the warm-up.
    let interval = SOAK_MAX_INTERVAL.min(total / 10);
    let warmup = SOAK_MAX_WARMUP.min(total / 5);
    eprintln!(
        "xtask: bench: part 4: soak at {SOAK_RATE}/s for {secs} s, RSS every {} s",
        interval.as_secs_f64()
    );
    let mut r = start_dnsprobe(daemon, &DAEMON_FLAGS)?;
    let pid = r.proc.pid();
    let t0 = cpu_use(&r)?;
    let start = Instant::now();
    let mut samples = vec![(Duration::ZERO, status_kib(pid, "VmRSS")?)];
    let mut perf = spawn_dnsperf(w, qfile, secs, Some(SOAK_RATE), clients)?;
    let mut next = interval;
    loop {
        if perf.child.try_wait()?.is_some() {
            break;
        }
        if let Some(st) = r.proc.child.try_wait()? {
            bail!("dnsprobe exited ({st}) during the soak:\n{}", r.proc.tail());
        }
        let t = start.elapsed();
        if t >= next {
            samples.push((t, status_kib(pid, "VmRSS")?));
            next += interval;
        }
        if t > total + Duration::from_secs(60) {
            bail!("dnsperf still running {secs} s + 60 s after the start of the soak");
        }
        sleep(Duration::from_millis(100))?;
    }
    let perf = finish_dnsperf(perf, secs)?;
    // Let the observer drain what the last answers produced.
    sleep(Duration::from_millis(500))?;
    let o = finish_observer(r, t0)?;

    let after: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warmup)
        .map(|&(_, kib)| kib)
        .collect();
    let &warm = after
        .first()
        .context("the soak took no RSS sample after its warm-up")?;
    let min = after.iter().copied().min().unwrap_or(warm);
    let max = after.iter().copied().max().unwrap_or(warm);
    let dev = max.abs_diff(warm).max(min.abs_diff(warm)) as f64 / warm.max(1) as f64;
    let mib = |kib: u64| kib as f64 / 1024.0;

    let _ = writeln!(out, "## 4. Soak\n");
    let _ = writeln!(
        out,
        "dnsperf at {SOAK_RATE} queries/s for {secs} s ({clients} clients) against unbound, \
         dnsprobe as in part 1. VmRSS sampled every {} s; the reference is the first sample at \
         or after the {} s warm-up, and `dev` is the largest distance of a later sample from \
         it. `peak` is VmHWM at the end.\n",
        interval.as_secs_f64(),
        warmup.as_secs_f64()
    );
    let _ = writeln!(out, "```");
    let _ = writeln!(
        out,
        "{:>7} {:>8} {:>8} {:>8} {:>7} {:>8}  verdicts",
        "samples", "warm MiB", "min MiB", "max MiB", "dev %", "peak MiB"
    );
    let _ = writeln!(
        out,
        "{:>7} {:>8.1} {:>8.1} {:>8.1} {:>7.1} {:>8.1}  rss flat ±{:.0}% {}, zero lost {}",
        after.len(),
        mib(warm),
        mib(min),
        mib(max),
        dev * 100.0,
        mib(o.rss_kib),
        SOAK_RSS_TOLERANCE * 100.0,
        verdict(dev <= SOAK_RSS_TOLERANCE),
        verdict(o.lost == 0)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>9} {:>9} {:>9} {:>9} {:>6} {:>9}",
        "sent", "answered", "reported", "answered", "lost", "cpu µs/q"
    );
    let _ = writeln!(
        out,
        "{:>9} {:>9} {:>9} {:>9} {:>6}",
        "(dnsperf)", "(dnsperf)", "(obs)", "(obs)", "(obs)"
    );
    let _ = writeln!(
        out,
        "{:>9} {:>9} {:>9} {:>9} {:>6} {:>9.2}",
        perf.sent,
        perf.completed,
        o.reported,
        o.answered,
        o.lost,
        o.cpu_s * 1e6 / perf.completed.max(1) as f64
    );
    // The daemon sees all DNS on the machine, so a count well above dnsperf's means another
    // load (a test, another bench) ran meanwhile and the RSS and lost figures are not the soak's.
    if o.reported > perf.sent + perf.sent / 20 {
        let _ = writeln!(
            out,
            "WARNING: the daemon reported {} queries but dnsperf sent {}: other DNS traffic ran \
             on the machine during the soak, so these figures are not the soak's alone.",
            o.reported, perf.sent
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(out, "VmRSS MiB by second:");
    for row in samples.chunks(8) {
        let cells: Vec<String> = row
            .iter()
            .map(|(t, kib)| format!("{:>4.0}s {:>6.1}", t.as_secs_f64(), mib(*kib)))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  "));
    }
    let _ = writeln!(out, "```\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_leftover_is_known_by_the_pid_in_its_name() {
        assert_eq!(owner_pid("dpbench-123-c", "dpbench-"), Some(123));
        assert_eq!(owner_pid("dp-bench-77-dnsprobe-0", "dp-bench-"), Some(77));
        assert_eq!(owner_pid("dnsprobe-bench-9", "dnsprobe-bench-"), Some(9));
        assert_eq!(owner_pid("dp-bench-x-0", "dp-bench-"), None);
        assert_eq!(owner_pid("dpbench--c", "dpbench-"), None);
        assert_eq!(owner_pid("dp-idle-test", "dp-bench-"), None);
    }

    #[test]
    fn the_median_interval_is_the_order_statistics_binomial_tables_give() {
        assert_eq!(median_interval(&[]), None);
        // Twenty values: ranks 6 and 15, covering 1 - 2 P(X <= 5) = 95.9 %.
        let twenty: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        let (lo, hi, cover) = median_interval(&twenty).expect("values");
        assert_eq!((lo, hi), (6.0, 15.0));
        assert!((cover - 0.9586).abs() < 1e-4, "{cover}");
        // Six values are the fewest for 95 %: their whole range, 1 - 2/64.
        let (lo, hi, cover) = median_interval(&[3.0, 1.0, 2.0, 6.0, 5.0, 4.0]).expect("values");
        assert_eq!((lo, hi), (1.0, 6.0));
        assert!((cover - 0.96875).abs() < 1e-9, "{cover}");
        // Five cannot reach 95 %: the whole range, and what it does cover.
        let (lo, hi, cover) = median_interval(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("values");
        assert_eq!((lo, hi), (1.0, 5.0));
        assert!((cover - 0.9375).abs() < 1e-9, "{cover}");
        // Thirty: ranks 10 and 21 (2 P(X <= 9) = 4.3 %; ranks 11 and 20 would miss 9.9 %).
        let thirty: Vec<f64> = (1..=30).map(f64::from).collect();
        let (lo, hi, _) = median_interval(&thirty).expect("values");
        assert_eq!((lo, hi), (10.0, 21.0));
    }
    /// What a test made for the sweep, removed however the test ends.
    struct Made {
        netns: Vec<String>,
        cgroups: Vec<PathBuf>,
        children: Vec<Child>,
        dir: PathBuf,
    }

    impl Drop for Made {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for ns in &self.netns {
                let _ = Command::new("ip")
                    .args(["netns", "del", ns])
                    .stderr(Stdio::null())
                    .status();
            }
            for dir in &self.cgroups {
                let _ = fs::remove_dir(dir);
            }
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    /// Exits within `within`, and by a signal (the sweep's SIGKILL, not its own end).
    fn killed_within(child: &mut Child, within: Duration) -> bool {
        use std::os::unix::process::ExitStatusExt as _;
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Ok(Some(status)) = child.try_wait() {
                return status.signal() == Some(libc::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn leftovers_of_a_killed_bench_are_removed_and_a_live_benchs_kept() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (creates a network namespace and cgroups)");
            return;
        }
        // A pid that was a process and is no more.
        let mut gone = Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        assert!(!pid_alive(dead));
        let live = std::process::id();
        let cgroups = cgroup2_root().unwrap();
        let mut made = Made {
            netns: vec![format!("dpbench-{dead}-c")],
            cgroups: vec![
                cgroups.join(format!("dp-bench-{dead}-sweeptest-0")),
                cgroups.join(format!("dp-bench-{live}-sweeptest-0")),
            ],
            children: Vec::new(),
            dir: std::env::temp_dir().join(format!("dp-sweep-test-{live}")),
        };
        let temp_dead = made.dir.join(format!("dnsprobe-bench-{dead}"));
        let temp_live = made.dir.join(format!("dnsprobe-bench-{live}"));
        for dir in [&temp_dead, &temp_live] {
            fs::create_dir_all(dir).unwrap();
            fs::write(dir.join("unbound.conf"), "server:\n").unwrap();
        }
        ip(&["netns", "add", &made.netns[0]]).unwrap();
        let in_netns = Command::new("ip")
            .args(["netns", "exec", &made.netns[0], "sleep", "300"])
            .spawn()
            .unwrap();
        made.children.push(in_netns);
        for dir in &made.cgroups {
            fs::create_dir(dir).unwrap();
            let child = Command::new("sleep").arg("300").spawn().unwrap();
            fs::write(dir.join("cgroup.procs"), child.id().to_string()).unwrap();
            made.children.push(child);
        }
        // `ip netns exec` has joined the namespace once the netns lists its pid.
        let end = Instant::now() + Duration::from_secs(10);
        while !sh(Command::new("ip").args(["netns", "pids", &made.netns[0]]))
            .unwrap()
            .contains(&made.children[0].id().to_string())
        {
            assert!(Instant::now() < end, "sleep never entered the namespace");
            thread::sleep(Duration::from_millis(20));
        }

        let removed = sweep_leftovers(Path::new("/run/netns"), &cgroups, &made.dir);

        assert!(
            !Path::new("/run/netns").join(&made.netns[0]).exists(),
            "{removed:?}"
        );
        assert!(!made.cgroups[0].exists(), "{removed:?}");
        assert!(!temp_dead.exists(), "{removed:?}");
        assert!(killed_within(&mut made.children[0], Duration::from_secs(5)));
        assert!(killed_within(&mut made.children[1], Duration::from_secs(5)));
        // This test's own pid is alive: its cgroup, process and temp dir stay.
        assert!(made.cgroups[1].exists());
        assert!(temp_live.exists());
        assert_eq!(made.children[2].try_wait().unwrap(), None);
        for what in [
            format!("network namespace {}", made.netns[0]),
            format!("cgroup {}", made.cgroups[0].display()),
            format!("temp dir {}", temp_dead.display()),
        ] {
            assert!(removed.contains(&what), "{what} not in {removed:?}");
        }
    }

    #[test]
    fn stat_and_cgroup_agree_within_two_ticks() {
        // 100 ticks a second: each of user and system may lose up to 10 ms to truncation.
        assert_eq!(accounting_gap(0.0572, 0.05, 100.0), None);
        assert_eq!(accounting_gap(0.05, 0.0695, 100.0), None);
        let gap = accounting_gap(0.0822, 0.06, 100.0).expect("22 ms apart is too far");
        assert!((gap - 0.0222).abs() < 1e-9);
    }

    #[test]
    fn reads_bpftool_prog_show() {
        let text = "\
12: cgroup_skb  name dns_egress  tag 6deef7357e7b4530  gpl run_time_ns 1500 run_cnt 20
\tloaded_at 2026-11-26T01:26:12+0000  uid 0
\txlated 64B  jited 54B  memlock 4096B  map_ids 3,4
\tbtf_id 7
13: cgroup_skb  name dpb_floor_eg  tag 0123456789abcdef  gpl
\tloaded_at 2026-11-26T01:26:13+0000  uid 0
14: tracing  name kfree  tag 0123456789abcdef  gpl run_time_ns 9 run_cnt 1
";
        let p = parse_prog_show(text);
        assert_eq!(p.len(), 3);
        assert_eq!((p[0].id, p[0].kind.as_str()), (12, "cgroup_skb"));
        assert_eq!(p[0].name, "dns_egress");
        assert_eq!((p[0].run_time_ns, p[0].run_cnt), (1500, 20));
        // No counters printed yet: the program has not run with stats on.
        assert_eq!((p[1].run_time_ns, p[1].run_cnt), (0, 0));
        // Held by the daemon wins over newer programs of the same name.
        let newer = ProgStat {
            id: 40,
            ..p[0].clone()
        };
        let all = [p[0].clone(), newer];
        assert_eq!(daemon_cgroup_skb(&all, &[12], "dns_egress").ok(), Some(12));
        assert_eq!(daemon_cgroup_skb(&all, &[], "dns_egress").ok(), Some(40));
        assert!(daemon_cgroup_skb(&all, &[], "dns_ingress").is_err());
    }

    #[test]
    fn run_deltas_and_averages() {
        let snap = |ns, cnt| {
            vec![ProgStat {
                id: 5,
                kind: "cgroup_skb".into(),
                name: "x".into(),
                run_time_ns: ns,
                run_cnt: cnt,
            }]
        };
        let r = Runs::between(&snap(100, 10), &snap(400, 20), 5).ok();
        assert_eq!(r.and_then(Runs::avg_ns), Some(30.0));
        assert!(Runs::between(&snap(0, 0), &[], 5).is_err());
        assert_eq!(Runs::default().avg_ns(), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/trailing\\04"), "/trailing\\04");
    }
}
