//! Shared helpers of the integration tests: a small world of two network namespaces (a client
//! and a DNS server joined by a veth pair), a cgroup for the client processes, the daemon under
//! test, and a scripted DNS server for behaviour no real server shows on demand. Also: unbound
//! as a cluster DNS in front of a scripted upstream, a pod's pause process, a node world (pod
//! netns -> node netns with kube-proxy style DNAT -> two DNS backend netns), iptables rules,
//! conntrack counters and a guard for the machine-global conntrack hash size, and parsers of
//! the daemon's `lookup`, `drop` and `late_response` records.
//!
//! Every resource is owned by a guard whose `Drop` removes it, so a failing (panicking) test
//! leaves nothing behind. Names and subnets are unique per process and per world because the
//! tests of a binary run in parallel threads, and every daemon sees the DNS traffic of all of
//! them: tests only ever look at the records of their own cgroup.

// Each test binary uses a different part of these helpers.
#![allow(dead_code)]

use std::{
    collections::HashMap,
    fs,
    io::{BufRead as _, BufReader, Read},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Condvar, Mutex, OnceLock,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, ResponseCode},
    rr::{
        rdata::{A, AAAA},
        RData, Record, RecordType,
    },
};
use serde::Deserialize;
use serde_json::Value;

/// How long the daemon may take from spawn to `capture started` (loading eBPF on a busy
/// 2-core machine).
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a client command may run before the test gives up on it.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long unbound may take to answer its first query.
const RESOLVER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Default wait for records: a few times the daemon's query timeout, for a loaded machine.
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(20);
/// The daemon's --query-timeout in every test.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// The static zone every resolver of a world serves.
pub const ZONE: &str = "test.internal.";
pub const WWW: &str = "www.test.internal.";
pub const WWW_V4: &str = "10.1.2.3";
pub const WWW_V6: &str = "fd00::3";
pub const MULTI: &str = "multi.test.internal.";
pub const MULTI_V4: [&str; 3] = ["10.1.2.4", "10.1.2.5", "10.1.2.6"];
/// Names with the first 10 and the first 25 of [`BIG_V4`]: answers of about 210 and 450
/// bytes, which the kernel hands over in its middle and its largest event size.
pub const MID: &str = "mid.test.internal.";
pub const LARGE: &str = "large.test.internal.";
/// A name with so many A records (40) that its answer does not fit the 512 bytes of a UDP
/// answer to a client without EDNS: unbound answers such a client with the TC bit.
pub const BIG: &str = "big.test.internal.";
pub const BIG_V4: [&str; 40] = [
    "10.3.0.1",
    "10.3.0.2",
    "10.3.0.3",
    "10.3.0.4",
    "10.3.0.5",
    "10.3.0.6",
    "10.3.0.7",
    "10.3.0.8",
    "10.3.0.9",
    "10.3.0.10",
    "10.3.0.11",
    "10.3.0.12",
    "10.3.0.13",
    "10.3.0.14",
    "10.3.0.15",
    "10.3.0.16",
    "10.3.0.17",
    "10.3.0.18",
    "10.3.0.19",
    "10.3.0.20",
    "10.3.0.21",
    "10.3.0.22",
    "10.3.0.23",
    "10.3.0.24",
    "10.3.0.25",
    "10.3.0.26",
    "10.3.0.27",
    "10.3.0.28",
    "10.3.0.29",
    "10.3.0.30",
    "10.3.0.31",
    "10.3.0.32",
    "10.3.0.33",
    "10.3.0.34",
    "10.3.0.35",
    "10.3.0.36",
    "10.3.0.37",
    "10.3.0.38",
    "10.3.0.39",
    "10.3.0.40",
];
/// The zone a cluster DNS ([`Resolver::ClusterDns`]) answers itself.
pub const CLUSTER_ZONE: &str = "cluster.local.";
/// Where a cluster DNS forwards everything outside [`CLUSTER_ZONE`] and [`ZONE`]: a loopback
/// address of the world's server netns (private to that netns, so worlds cannot collide).
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 53);

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True (and says why) when the test cannot run: it needs root to load eBPF programs and to
/// build namespaces. CI runs as root, so there the tests always run.
pub fn skip_unless_root(test: &str) -> bool {
    if running_as_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root (loads eBPF programs, creates network namespaces)");
    true
}

/// Wall-clock time (CLOCK_REALTIME) in nanoseconds since the epoch: the clock of the records'
/// `time` and of the kernel's socket receive timestamps.
pub fn realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; CLOCK_REALTIME always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Parses `2026-11-25T22:41:03.123456789Z` (RFC 3339, any fraction, `Z` or `±hh:mm`) to
/// nanoseconds since the epoch.
pub fn parse_rfc3339_ns(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> { s.get(r)?.parse().ok() };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    let mut nanos: i128 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 9 {
            return None;
        }
        nanos = frac[..digits].parse::<i128>().ok()? * 10i128.pow(9 - digits as u32);
        rest = &frac[digits..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && rest.as_bytes()[3] == b':' => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days from civil (proleptic Gregorian), March-based years.
    let y = if mo <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (mo + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

// ---------------------------------------------------------------------------------------------
// Commands

/// Runs a setup command to completion; panics with its output if it fails.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot start `{program} {}`: {e}", args.join(" ")));
    if !out.status.success() {
        panic!(
            "`{program} {}` failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a cleanup command; reports a failure instead of panicking, because a panic inside a
/// `Drop` that runs while a failed test unwinds would abort the whole test binary.
fn run_cleanup(program: &str, args: &[&str]) {
    match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "cleanup: `{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("cleanup: cannot start `{program} {}`: {e}", args.join(" ")),
    }
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child, so it
        // cannot have been reused by another process.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Waits for `child` up to `timeout`; `None` if it is still running.
fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(e) => {
                eprintln!("waiting for pid {}: {e}", child.id());
                return None;
            }
        }
    }
}

/// Stops a child: SIGTERM, then SIGKILL if it has not exited after `grace`.
fn stop_child(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    stop_child_with(child, libc::SIGTERM, grace)
}

fn stop_child_with(child: &mut Child, sig: libc::c_int, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child, sig);
    if let Some(status) = wait_timeout(child, grace) {
        return Some(status);
    }
    eprintln!(
        "pid {} ignored SIGTERM for {grace:?}: killing it",
        child.id()
    );
    let _ = child.kill();
    child.wait().ok()
}

/// Makes a spawned helper die with the test thread that spawned it, should the test binary be
/// killed before its guards run. (The signal is tied to the spawning thread, which outlives
/// every guard here: each test spawns and drops its processes on its own thread.)
fn die_with_parent(cmd: &mut Command, sig: libc::c_int) {
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(mut pipe: R) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

// ---------------------------------------------------------------------------------------------
// Guards

/// A directory under the system temp dir, removed with its contents on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("dnsprobe-test-{tag}"));
        // A leftover of an earlier process with the same pid would only confuse this one.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
}

/// A directory removed on drop that this guard did not necessarily create in full, such as
/// `/etc/netns/<ns>`.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup: removing {}: {e}", self.0.display());
            }
        }
    }
}

/// A named network namespace (`ip netns add`), deleted on drop; its veth ends go with it.
struct Netns(String);

impl Netns {
    fn create(name: &str) -> Self {
        run_ok("ip", &["netns", "add", name]);
        Self(name.to_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        run_cleanup("ip", &["netns", "del", &self.0]);
    }
}

/// A process the world runs (unbound), stopped on drop.
struct Proc {
    child: Child,
    what: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        if stop_child(&mut self.child, Duration::from_secs(5)).is_none() {
            eprintln!("cleanup: could not reap {}", self.what);
        }
    }
}

/// The number `key=` says on the last line of `text` that contains `marker` (`stats:`,
/// `summary:`).
pub fn counter(text: &str, marker: &str, key: &str) -> Option<u64> {
    let line = text.lines().rev().find(|l| l.contains(marker))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// The cgroup v2 root, found as the daemon finds it (never hard-coded: it is
/// /sys/fs/cgroup/unified on hybrid machines and /sys/fs/cgroup elsewhere).
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        dnsprobe::attribute::find_cgroup2_root().expect("finding the cgroup v2 mount")
    })
}

/// A child cgroup of the cgroup v2 root that the world's clients run in. On drop, whatever
/// still runs in it is killed and the cgroup removed.
pub struct Cgroup {
    /// Absolute directory, e.g. /sys/fs/cgroup/unified/dp-test-123-0.
    pub dir: PathBuf,
    /// Relative to the cgroup v2 root, as the records' `cgroup_path`: `/dp-test-123-0`.
    pub path: String,
}

impl Cgroup {
    fn create(name: &str) -> Self {
        let dir = cgroup2_root().join(name);
        // An empty leftover of a killed earlier process with the same pid would make mkdir
        // fail; rmdir only removes a cgroup nothing runs in.
        let _ = fs::remove_dir(&dir);
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating cgroup {}: {e}", dir.display()));
        Self {
            dir,
            path: format!("/{name}"),
        }
    }

    /// The cgroup id the kernel reports (`bpf_skb_cgroup_id`): the directory's inode number.
    pub fn id(&self) -> u64 {
        fs::metadata(&self.dir)
            .unwrap_or_else(|e| panic!("stat {}: {e}", self.dir.display()))
            .ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // A client left running by a failed test would keep the cgroup busy; cgroup.kill
        // (kernel 5.14+) kills everything in it at once.
        let procs = fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            if let Err(e) = fs::write(self.dir.join("cgroup.kill"), "1") {
                eprintln!("cleanup: killing {}: {e}", self.dir.display());
            }
        }
        // rmdir fails with EBUSY until the killed processes are gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::remove_dir(&self.dir) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) if Instant::now() >= deadline => {
                    eprintln!("cleanup: removing cgroup {}: {e}", self.dir.display());
                    return;
                }
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// unbound

/// What [`Unbound::start`] needs.
pub struct UnboundSpec<'a> {
    /// The netns it runs in.
    pub netns: &'a str,
    /// Addresses it listens on (UDP and TCP port 53).
    pub listen: &'a [IpAddr],
    /// The netns the readiness probes run from (a client's).
    pub probe_netns: &'a str,
    /// Where its config and log go.
    pub dir: &'a Path,
    /// More configuration, appended after the common `server:` clause (unbound merges repeated
    /// clauses), e.g. a `forward-zone:`.
    pub extra: &'a str,
    pub what: &'a str,
}

/// An unbound serving the static zone [`ZONE`], stopped on drop.
pub struct Unbound {
    _proc: Proc,
    pub log: PathBuf,
}

impl Unbound {
    /// Starts unbound and waits until it answers [`WWW`] on every listen address, asked from
    /// `probe_netns`. The probes run in the test's own cgroup, not a world's, so they never
    /// show up among a world's records.
    pub fn start(spec: UnboundSpec) -> Self {
        let conf = spec.dir.join("unbound.conf");
        let mut text = String::from("server:\n");
        for ip in spec.listen {
            text.push_str(&format!("    interface: {ip}\n"));
        }
        let big: String = [(BIG, 40), (MID, 10), (LARGE, 25)]
            .iter()
            .flat_map(|&(name, n)| {
                BIG_V4[..n]
                    .iter()
                    .map(move |a| format!("    local-data: \"{name} 60 IN A {a}\"\n"))
            })
            .collect();
        text.push_str(&format!(
            r#"    port: 53
    do-ip4: yes
    do-ip6: yes
    do-udp: yes
    do-tcp: yes
    access-control: 0.0.0.0/0 allow
    access-control: ::/0 allow
    do-not-query-localhost: yes
    module-config: "iterator"
    chroot: ""
    username: ""
    pidfile: ""
    directory: "{dir}"
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    local-zone: "{zone}" static
    local-data: "{www} 60 IN A {www_v4}"
    local-data: "{www} 60 IN AAAA {www_v6}"
    local-data: "{multi} 60 IN A {m0}"
    local-data: "{multi} 60 IN A {m1}"
    local-data: "{multi} 60 IN A {m2}"
{big}remote-control:
    control-enable: no
"#,
            dir = spec.dir.display(),
            zone = ZONE,
            www = WWW,
            www_v4 = WWW_V4,
            www_v6 = WWW_V6,
            multi = MULTI,
            m0 = MULTI_V4[0],
            m1 = MULTI_V4[1],
            m2 = MULTI_V4[2],
        ));
        text.push_str(spec.extra);
        fs::write(&conf, text).expect("writing unbound.conf");
        let log_path = spec.dir.join("unbound.log");
        let log = fs::File::create(&log_path).expect("creating unbound.log");
        let log_err = log.try_clone().expect("cloning the unbound.log handle");
        let conf_s = conf.to_string_lossy().into_owned();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", spec.netns, "unbound", "-d", "-c", &conf_s])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting unbound (is it installed?): {e}"));
        let mut proc = Proc {
            child,
            what: spec.what.to_owned(),
        };

        let deadline = Instant::now() + RESOLVER_START_TIMEOUT;
        for ip in spec.listen {
            let server = format!("@{ip}");
            loop {
                let out = Command::new("ip")
                    .args(["netns", "exec", spec.probe_netns, "dig", &server])
                    .args(["www.test.internal", "A", "+short", "+tries=1", "+time=1"])
                    .stdin(Stdio::null())
                    .output()
                    .expect("running dig (is bind9-dnsutils installed?)");
                if String::from_utf8_lossy(&out.stdout).trim() == WWW_V4 {
                    break;
                }
                if let Ok(Some(status)) = proc.child.try_wait() {
                    panic!(
                        "{} exited ({status}): {}",
                        spec.what,
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                if Instant::now() >= deadline {
                    panic!(
                        "{} did not answer on {server} within {RESOLVER_START_TIMEOUT:?}; \
                         log: {}",
                        spec.what,
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Self {
            _proc: proc,
            log: log_path,
        }
    }
}

/// Every cgroup a test created below the cgroup v2 root, removed newest first (a cgroup goes
/// only once it has no children), also when the test fails.
#[derive(Default)]
pub struct CreatedCgroups(Vec<Cgroup>);

impl CreatedCgroups {
    /// Creates every missing cgroup on the way to `rel` (relative to the cgroup v2 root) and
    /// returns the deepest, which must be new.
    pub fn make(&mut self, rel: &str) -> &Cgroup {
        let mut path = String::new();
        for part in rel.trim_start_matches('/').split('/') {
            path = format!("{path}/{part}");
            let dir = cgroup2_root().join(path.trim_start_matches('/'));
            if !dir.exists() {
                fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
                self.0.push(Cgroup {
                    dir,
                    path: path.clone(),
                });
            }
        }
        let leaf = self.0.last().expect("a new leaf cgroup");
        assert_eq!(leaf.path, path, "the leaf cgroup already existed");
        leaf
    }

    /// A cgroup made before, by its path relative to the cgroup v2 root (`/a/b`).
    pub fn get(&self, path: &str) -> &Cgroup {
        self.0
            .iter()
            .find(|c| c.path == path)
            .unwrap_or_else(|| panic!("no cgroup {path} was made"))
    }
}

impl Drop for CreatedCgroups {
    fn drop(&mut self) {
        while let Some(cgroup) = self.0.pop() {
            drop(cgroup);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The world

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// What answers on the server address's port 53.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolver {
    /// unbound with the static zone `test.internal.`.
    Unbound,
    /// Nothing yet: the test starts a [`ScriptedServer`].
    Scripted,
    /// unbound as a cluster DNS: the static zone, NXDOMAIN for every name under
    /// `cluster.local.`, and everything else forwarded to [`UPSTREAM_V4`] in the server netns,
    /// where the test starts a [`ScriptedServer::start_upstream`].
    ClusterDns,
}

#[derive(Debug, Clone, Copy)]
pub struct WorldConfig {
    pub resolver: Resolver,
    /// Which server address the client's resolv.conf names.
    pub nameserver: Family,
    /// Extra resolv.conf lines, e.g. `options timeout:2 attempts:2`.
    pub resolv_extra: &'static str,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            resolver: Resolver::Unbound,
            nameserver: Family::V4,
            resolv_extra: "",
        }
    }
}

/// One finished client command.
#[derive(Debug)]
pub struct ClientRun {
    pub argv: Vec<String>,
    /// The pid of the process the test spawned, which after `exec` is the client itself.
    pub pid: u32,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// Wall clock just before the spawn and just after the exit, in ns since the epoch.
    pub started_ns: i128,
    pub finished_ns: i128,
}

impl ClientRun {
    pub fn assert_success(&self) -> &Self {
        assert!(
            self.status.success(),
            "client {:?} failed ({}): stdout: {} stderr: {}",
            self.argv,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

impl ClientRun {
    /// How long getaddrinfo took, as `gai.c` prints it on stderr (`getaddrinfo_ns N`).
    pub fn getaddrinfo_ns(&self) -> u64 {
        self.stderr
            .lines()
            .find_map(|l| l.strip_prefix("getaddrinfo_ns ")?.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no getaddrinfo_ns line from {:?}: {}",
                    self.argv, self.stderr
                )
            })
    }
}

/// A command line that joins `cgroup`, then execs `ip netns exec` into `netns` (see
/// [`World::client_command`]).
pub fn client_command_in(cgroup: &Cgroup, netns: &str, argv: &[&str]) -> Command {
    let procs = cgroup.dir.join("cgroup.procs");
    let script = format!(
        "echo $$ > '{}' && exec ip netns exec '{}' \"$@\"",
        procs.display(),
        netns
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script).arg("sh").args(argv);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a client in `cgroup` and `netns` and waits for it to exit.
pub fn run_client_in(cgroup: &Cgroup, netns: &str, argv: &[&str]) -> ClientRun {
    let mut cmd = client_command_in(cgroup, netns, argv);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let started_ns = realtime_ns();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning client {argv:?}: {e}"));
    let pid = child.id();
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let status = match wait_timeout(&mut child, CLIENT_TIMEOUT) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("client {argv:?} still running after {CLIENT_TIMEOUT:?}");
        }
    };
    let finished_ns = realtime_ns();
    ClientRun {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        pid,
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        started_ns,
        finished_ns,
    }
}

/// A pod's "pause" process: `sleep` in a cgroup and netns for as long as the guard lives.
pub struct Pause {
    proc: Proc,
}

impl Pause {
    pub fn start(cgroup: &Cgroup, netns: &str) -> Self {
        let mut cmd = client_command_in(cgroup, netns, &["sleep", "3600"]);
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd.spawn().expect("spawning the pause process");
        let pid = child.id();
        let proc = Proc {
            child,
            what: format!("pause process {pid}"),
        };
        // Ready once it is `sleep`, i.e. past `ip netns exec`, which set up its view of
        // /etc/resolv.conf.
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        loop {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                return Self { proc };
            }
            assert!(
                Instant::now() < deadline,
                "pause process {pid} did not become `sleep` (comm `{}`)",
                comm.trim()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);

/// A client netns and a server netns joined by a veth pair, a cgroup for the clients, the
/// client's resolv.conf and, if asked, unbound in the server netns. No default routes: nothing
/// a test sends can leave the two namespaces.
///
/// Fields drop in declaration order: clients (cgroup) first, then the resolver, then the
/// namespaces, then files.
pub struct World {
    pub cgroup: Cgroup,
    unbound: Option<Unbound>,
    _etc_netns: RemoveDirOnDrop,
    _server_netns: Netns,
    _client_netns: Netns,
    pub dir: TempDir,
    /// Unique per process and world: `<pid>-<n>`.
    pub tag: String,
    pub client_ns: String,
    pub server_ns: String,
    pub client_v4: Ipv4Addr,
    pub server_v4: Ipv4Addr,
    pub client_v6: Ipv6Addr,
    pub server_v6: Ipv6Addr,
    sentinels: AtomicU32,
}

impl World {
    pub fn new(config: WorldConfig) -> Self {
        let pid = std::process::id();
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{n}");
        // Subnets from pid and counter, so parallel tests (and test binaries) never share one:
        // a /30 per world in 10.<200 + pid % 50>.<(pid / 50) % 256>.0/24, and a /64 per world
        // in fd00:<pid high>:<pid low>::/48.
        let v4_base = [
            10u8,
            200 + (pid % 50) as u8,
            ((pid / 50) % 256) as u8,
            ((n % 64) * 4) as u8,
        ];
        let client_v4 = Ipv4Addr::new(v4_base[0], v4_base[1], v4_base[2], v4_base[3] + 1);
        let server_v4 = Ipv4Addr::new(v4_base[0], v4_base[1], v4_base[2], v4_base[3] + 2);
        let (hi, lo, net) = ((pid >> 16) as u16, pid as u16, n as u16);
        let client_v6 = Ipv6Addr::new(0xfd00, hi, lo, net, 0, 0, 0, 1);
        let server_v6 = Ipv6Addr::new(0xfd00, hi, lo, net, 0, 0, 0, 2);

        let dir = TempDir::new(&tag);
        let cgroup = Cgroup::create(&format!("dp-test-{tag}"));
        let client_ns = format!("dpt-{tag}-c");
        let server_ns = format!("dpt-{tag}-s");
        let client_netns = Netns::create(&client_ns);
        let server_netns = Netns::create(&server_ns);
        // Interface names are limited to 15 bytes: "dpt" + pid (<= 7 digits) + side + n % 1000.
        let veth_c = format!("dpt{pid}c{}", n % 1000);
        let veth_s = format!("dpt{pid}s{}", n % 1000);
        // Created directly inside the namespaces, so no end is ever left in the host netns.
        run_ok(
            "ip",
            &[
                "link", "add", &veth_c, "netns", &client_ns, "type", "veth", "peer", "name",
                &veth_s, "netns", &server_ns,
            ],
        );
        for (ns, dev, v4, v6) in [
            (&client_ns, &veth_c, client_v4, client_v6),
            (&server_ns, &veth_s, server_v4, server_v6),
        ] {
            run_ok("ip", &["-n", ns, "link", "set", "lo", "up"]);
            run_ok(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/30"), "dev", dev],
            );
            // nodad: usable at once, instead of "tentative" (unbindable) for a second or so.
            run_ok(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            );
            run_ok("ip", &["-n", ns, "link", "set", dev, "up"]);
        }

        // `ip netns exec` bind-mounts this file over /etc/resolv.conf for the client.
        let etc_dir = PathBuf::from("/etc/netns").join(&client_ns);
        let etc_netns = RemoveDirOnDrop(etc_dir.clone());
        fs::create_dir_all(&etc_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", etc_dir.display()));
        let nameserver = match config.nameserver {
            Family::V4 => IpAddr::V4(server_v4),
            Family::V6 => IpAddr::V6(server_v6),
        };
        let mut resolv = format!("nameserver {nameserver}\n");
        if !config.resolv_extra.is_empty() {
            resolv.push_str(config.resolv_extra);
            resolv.push('\n');
        }
        fs::write(etc_dir.join("resolv.conf"), resolv).expect("writing the client's resolv.conf");

        let mut world = Self {
            cgroup,
            unbound: None,
            _etc_netns: etc_netns,
            _server_netns: server_netns,
            _client_netns: client_netns,
            dir,
            tag,
            client_ns,
            server_ns,
            client_v4,
            server_v4,
            client_v6,
            server_v6,
            sentinels: AtomicU32::new(0),
        };
        match config.resolver {
            Resolver::Unbound => world.start_unbound(false),
            Resolver::ClusterDns => world.start_unbound(true),
            Resolver::Scripted => {}
        }
        world
    }

    pub fn client_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.client_v4),
            Family::V6 => IpAddr::V6(self.client_v6),
        }
    }

    pub fn server_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.server_v4),
            Family::V6 => IpAddr::V6(self.server_v6),
        }
    }

    /// The records' `server` for this family: `10.x.y.z:53` or `[fd00::2]:53`.
    pub fn server_field(&self, family: Family) -> String {
        SocketAddr::new(self.server_ip(family), 53).to_string()
    }

    fn start_unbound(&mut self, cluster_dns: bool) {
        let listen = [IpAddr::V4(self.server_v4), IpAddr::V6(self.server_v6)];
        // As a cluster DNS (CoreDNS, kube-dns): the cluster's own zone is answered locally
        // (names under it that do not exist are NXDOMAIN at once) and everything else goes to
        // one upstream, whose answer (a SERVFAIL too) is relayed as it is: unbound waits for a
        // slow upstream instead of resending to it, does not retry a SERVFAIL, and keeps the
        // failure in its cache for a few seconds, as CoreDNS's cache does.
        let extra = if cluster_dns {
            format!(
                r#"server:
    do-not-query-localhost: no
    unknown-server-time-limit: 3000
    outbound-msg-retry: 0
    local-zone: "{cluster}" static
forward-zone:
    name: "."
    forward-addr: {upstream}
"#,
                cluster = CLUSTER_ZONE,
                upstream = UPSTREAM_V4,
            )
        } else {
            String::new()
        };
        let unbound = Unbound::start(UnboundSpec {
            netns: &self.server_ns,
            listen: &listen,
            probe_netns: &self.client_ns,
            dir: self.dir.path(),
            extra: &extra,
            what: &format!("unbound of world {}", self.tag),
        });
        self.unbound = Some(unbound);
    }

    /// A command line that joins the world's cgroup, then execs `ip netns exec` into the
    /// client netns. The cgroup is joined first because `ip netns exec` remounts /sys, which
    /// hides the cgroup tree. Both `sh`'s `exec` and `ip netns exec` replace the process
    /// without forking, so the spawned pid is the client's own pid.
    pub fn client_command(&self, argv: &[&str]) -> Command {
        client_command_in(&self.cgroup, &self.client_ns, argv)
    }

    /// Runs a client in the world and waits for it to exit.
    pub fn run_client(&self, argv: &[&str]) -> ClientRun {
        run_client_in(&self.cgroup, &self.client_ns, argv)
    }

    /// A long-lived process in the world's cgroup and client netns, like a pod's pause
    /// container: the daemon reads the pod's resolv.conf through it when a client has already
    /// exited. Killed on drop.
    pub fn start_pause(&self) -> Pause {
        Pause::start(&self.cgroup, &self.client_ns)
    }

    /// `dig @server NAME TYPE +tries=1 +time=T` in the world.
    pub fn dig(&self, family: Family, name: &str, qtype: &str, time_s: u32) -> ClientRun {
        let server = format!("@{}", self.server_ip(family));
        let time = format!("+time={time_s}");
        self.run_client(&["dig", &server, name, qtype, "+tries=1", &time])
    }

    /// `dig @server(v4) www A` from inside `cgroup`, in the world's client namespace; it must
    /// succeed.
    pub fn dig_www_in(&self, cgroup: &Cgroup) -> ClientRun {
        let server = format!("@{}", self.server_ip(Family::V4));
        let run = run_client_in(
            cgroup,
            &self.client_ns,
            &["dig", &server, WWW, "A", "+tries=1", "+time=2"],
        );
        run.assert_success();
        run
    }

    /// Runs one more query from the world's cgroup, for a name nothing else asks, and waits
    /// until the daemon reported it. The daemon writes records as queries finish, so once the
    /// sentinel's is there, any extra record about the queries that finished before it would
    /// be there too. Returns the cgroup's records without the sentinel's.
    pub fn settle(&self, daemon: &Daemon) -> Vec<QueryRecord> {
        let n = self.sentinels.fetch_add(1, Ordering::Relaxed);
        let name = format!("sentinel-{}-{n}.test.internal.", self.tag);
        self.dig(Family::V4, &name, "A", 2);
        let records = daemon.wait_for(
            &self.cgroup.path,
            &format!("the sentinel query {name}"),
            |recs| recs.iter().any(|r| r.qname == name),
            RECORD_TIMEOUT,
        );
        records.into_iter().filter(|r| r.qname != name).collect()
    }

    /// Like [`World::settle`], for lookups: call it once every query of interest has its
    /// record. A sentinel lookup starts after those queries ended, so it closes after their
    /// lookups did; once its record is there, theirs are too. Returns the cgroup's lookups
    /// without the sentinel's.
    pub fn settle_lookups(&self, daemon: &Daemon) -> Vec<LookupRecord> {
        let n = self.sentinels.fetch_add(1, Ordering::Relaxed);
        let name = format!("sentinel-{}-{n}.test.internal.", self.tag);
        sentinel_lookups(
            daemon,
            &self.cgroup,
            &self.client_ns,
            self.server_ip(Family::V4),
            &name,
        )
    }
}

/// Runs a sentinel `dig` for `name` from `cgroup` in `netns` and waits for its lookup record;
/// returns the cgroup's other lookups (see [`World::settle_lookups`]).
pub fn sentinel_lookups(
    daemon: &Daemon,
    cgroup: &Cgroup,
    netns: &str,
    server: IpAddr,
    name: &str,
) -> Vec<LookupRecord> {
    let server = format!("@{server}");
    run_client_in(
        cgroup,
        netns,
        &["dig", &server, name, "A", "+tries=1", "+time=2"],
    );
    let lookups = daemon.wait_until(
        &format!("the sentinel lookup {name}"),
        RECORD_TIMEOUT,
        |d| {
            let lookups = d.lookups(&cgroup.path);
            lookups.iter().any(|l| l.name == name).then_some(lookups)
        },
    );
    lookups.into_iter().filter(|l| l.name != name).collect()
}

// ---------------------------------------------------------------------------------------------
// Netfilter and conntrack

/// The inode number of a named network namespace: the `netns` of drop records.
pub fn netns_inode(name: &str) -> u32 {
    let path = format!("/run/netns/{name}");
    let ino = fs::metadata(&path)
        .unwrap_or_else(|e| panic!("stat {path}: {e}"))
        .ino();
    u32::try_from(ino).expect("netns inode fits 32 bits")
}

/// Runs a setup command inside a named netns.
pub fn in_netns(netns: &str, argv: &[&str]) -> String {
    let mut args = vec!["netns", "exec", netns];
    args.extend_from_slice(argv);
    run_ok("ip", &args)
}

/// An iptables rule in a netns, deleted on drop (`iptables -D` with the same spec); it would
/// also go with its netns, but a test may outlive it.
pub struct IptablesRule {
    netns: String,
    table: String,
    chain: String,
    spec: Vec<String>,
}

impl IptablesRule {
    /// `iptables -t TABLE -A CHAIN SPEC...` in `netns`.
    pub fn append(netns: &str, table: &str, chain: &str, spec: &[&str]) -> Self {
        let mut argv = vec!["iptables", "-w", "-t", table, "-A", chain];
        argv.extend_from_slice(spec);
        in_netns(netns, &argv);
        Self {
            netns: netns.to_owned(),
            table: table.to_owned(),
            chain: chain.to_owned(),
            spec: spec.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Drop for IptablesRule {
    fn drop(&mut self) {
        if !Path::new("/run/netns").join(&self.netns).exists() {
            return;
        }
        let mut args: Vec<&str> = vec!["netns", "exec", &self.netns];
        args.extend(["iptables", "-w", "-t", &self.table, "-D", &self.chain]);
        args.extend(self.spec.iter().map(String::as_str));
        run_cleanup("ip", &args);
    }
}

/// Conntrack counters of a netns (per-CPU sums of `/proc/net/stat/nf_conntrack` there).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    pub entries: u64,
    pub insert_failed: u64,
    pub chaintoolong: u64,
}

pub fn conntrack_stats(netns: &str) -> ConntrackStats {
    let text = in_netns(netns, &["cat", "/proc/net/stat/nf_conntrack"]);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (entries, failed, chain) = (col("entries"), col("insert_failed"), col("chainlength"));
    let mut stats = ConntrackStats::default();
    for (i, line) in lines.enumerate() {
        let values: Vec<u64> = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16).unwrap_or(0))
            .collect();
        let get = |c: Option<usize>| c.and_then(|c| values.get(c)).copied().unwrap_or(0);
        // `entries` is the same global count on every CPU's line.
        if i == 0 {
            stats.entries = get(entries);
        }
        stats.insert_failed += get(failed);
        stats.chaintoolong += get(chain);
    }
    stats
}

// ---------------------------------------------------------------------------------------------
// A node: client netns -> node netns (kube-proxy style DNAT) -> two DNS backend netns

/// The service VIP the node DNATs to the DNS backends, as kube-proxy does for kube-dns. It
/// exists only inside the node world's namespaces.
pub const NODE_DNS_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

/// A pod netns (the client) routed through a node netns that DNATs [`NODE_DNS_VIP`]:53 to
/// two DNS backend netns (unbound in each), half the new flows each (`-m statistic`), as
/// kube-proxy's iptables mode does. No netns has a route out of the world.
///
/// Fields drop in declaration order: clients first, then resolvers, then namespaces.
pub struct NodeWorld {
    pub cgroup: Cgroup,
    _unbound: Vec<Unbound>,
    _etc_netns: RemoveDirOnDrop,
    _netns: Vec<Netns>,
    pub dir: TempDir,
    pub tag: String,
    pub client_ns: String,
    pub node_ns: String,
    pub backend_ns: [String; 2],
    pub client_v4: Ipv4Addr,
    /// The node's address on the client's link (the client's default gateway).
    pub node_v4: Ipv4Addr,
    pub backend_v4: [Ipv4Addr; 2],
    sentinels: AtomicU32,
}

impl NodeWorld {
    /// `resolv_extra`: more lines for the client's resolv.conf (its nameserver is the VIP).
    pub fn new(resolv_extra: &str) -> Self {
        let pid = std::process::id();
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{n}");
        // 10.<100 + pid % 50>.<(pid / 50) % 256>.<16 * (n % 16)>/28 per node world: three /30
        // links. (Two-netns worlds use 10.200-249.x.y.)
        let base = [
            10u8,
            100 + (pid % 50) as u8,
            ((pid / 50) % 256) as u8,
            ((n % 16) * 16) as u8,
        ];
        let ip = |off: u8| Ipv4Addr::new(base[0], base[1], base[2], base[3] + off);
        let (node_v4, client_v4) = (ip(1), ip(2));
        let (node_d1, backend1) = (ip(5), ip(6));
        let (node_d2, backend2) = (ip(9), ip(10));

        let dir = TempDir::new(&tag);
        let cgroup = Cgroup::create(&format!("dp-test-{tag}"));
        let client_ns = format!("dpt-{tag}-c");
        let node_ns = format!("dpt-{tag}-n");
        let backend_ns = [format!("dpt-{tag}-d1"), format!("dpt-{tag}-d2")];
        let mut netns = Vec::new();
        for name in [&client_ns, &node_ns, &backend_ns[0], &backend_ns[1]] {
            netns.push(Netns::create(name));
            run_ok("ip", &["-n", name, "link", "set", "lo", "up"]);
        }
        // (node end, node address, other netns, other end, other address)
        let links = [
            ("b", node_v4, &client_ns, "a", client_v4),
            ("d", node_d1, &backend_ns[0], "e", backend1),
            ("f", node_d2, &backend_ns[1], "g", backend2),
        ];
        for (node_end, node_ip, other_ns, other_end, other_ip) in links {
            // "dpt" + pid (<= 7 digits) + side + n % 100: at most 13 bytes.
            let node_dev = format!("dpt{pid}{node_end}{}", n % 100);
            let other_dev = format!("dpt{pid}{other_end}{}", n % 100);
            run_ok(
                "ip",
                &[
                    "link", "add", &node_dev, "netns", &node_ns, "type", "veth", "peer", "name",
                    &other_dev, "netns", other_ns,
                ],
            );
            for (ns, dev, addr) in [
                (&node_ns, &node_dev, node_ip),
                (other_ns, &other_dev, other_ip),
            ] {
                run_ok(
                    "ip",
                    &["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", dev],
                );
                run_ok("ip", &["-n", ns, "link", "set", dev, "up"]);
            }
            // Everything the other side sends goes to the node, which has no route further.
            run_ok(
                "ip",
                &[
                    "-n",
                    other_ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    &node_ip.to_string(),
                ],
            );
        }
        in_netns(&node_ns, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let vip = NODE_DNS_VIP.to_string();
        for proto in ["udp", "tcp"] {
            let to1 = format!("{backend1}:53");
            let to2 = format!("{backend2}:53");
            in_netns(
                &node_ns,
                &[
                    "iptables",
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    &vip,
                    "-p",
                    proto,
                    "--dport",
                    "53",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    "0.5",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to1,
                ],
            );
            in_netns(
                &node_ns,
                &[
                    "iptables",
                    "-w",
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-d",
                    &vip,
                    "-p",
                    proto,
                    "--dport",
                    "53",
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to2,
                ],
            );
        }

        let etc_dir = PathBuf::from("/etc/netns").join(&client_ns);
        let etc_netns = RemoveDirOnDrop(etc_dir.clone());
        fs::create_dir_all(&etc_dir)
            .unwrap_or_else(|e| panic!("creating {}: {e}", etc_dir.display()));
        let mut resolv = format!("nameserver {NODE_DNS_VIP}\n");
        if !resolv_extra.is_empty() {
            resolv.push_str(resolv_extra);
            resolv.push('\n');
        }
        fs::write(etc_dir.join("resolv.conf"), resolv).expect("writing the client's resolv.conf");

        let mut unbound = Vec::new();
        for (i, (ns, addr)) in backend_ns.iter().zip([backend1, backend2]).enumerate() {
            let sub = dir.path().join(format!("d{}", i + 1));
            fs::create_dir_all(&sub).expect("creating a backend dir");
            unbound.push(Unbound::start(UnboundSpec {
                netns: ns,
                listen: &[IpAddr::V4(addr)],
                probe_netns: &client_ns,
                dir: &sub,
                extra: "",
                what: &format!("unbound {} of node world {tag}", i + 1),
            }));
        }
        Self {
            cgroup,
            _unbound: unbound,
            _etc_netns: etc_netns,
            _netns: netns,
            dir,
            tag,
            client_ns,
            node_ns,
            backend_ns,
            client_v4,
            node_v4,
            backend_v4: [backend1, backend2],
            sentinels: AtomicU32::new(0),
        }
    }

    pub fn run_client(&self, argv: &[&str]) -> ClientRun {
        run_client_in(&self.cgroup, &self.client_ns, argv)
    }

    /// See [`World::settle_lookups`]; the sentinel asks the VIP.
    pub fn settle_lookups(&self, daemon: &Daemon) -> Vec<LookupRecord> {
        let n = self.sentinels.fetch_add(1, Ordering::Relaxed);
        let name = format!("sentinel-{}-{n}.test.internal.", self.tag);
        sentinel_lookups(
            daemon,
            &self.cgroup,
            &self.client_ns,
            IpAddr::V4(NODE_DNS_VIP),
            &name,
        )
    }

    /// Sends one UDP datagram from the client netns to each of `flows` distinct ports of the
    /// first backend (never a DNS port): as many new, never answered conntrack flows through
    /// the node. Sent from a thread that entered the client netns, on one socket.
    pub fn flood(&self, flows: u16) {
        let path = PathBuf::from("/run/netns").join(&self.client_ns);
        let target = self.backend_v4[0];
        thread::spawn(move || {
            let ns =
                fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            // SAFETY: a valid namespace fd; only this short-lived thread moves.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                panic!(
                    "setns into {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
            let socket = UdpSocket::bind("0.0.0.0:0").expect("binding the flood socket");
            let mut sent = 0u16;
            let mut port = 1024u16;
            while sent < flows && port < u16::MAX {
                port += 1;
                if port == 5353 {
                    continue;
                }
                // A send may fail now and then (a full queue); the flow count is approximate.
                let _ = socket.send_to(&[0u8; 8], SocketAddr::new(IpAddr::V4(target), port));
                sent += 1;
            }
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    }
}

/// Flushes the conntrack table of a netns on drop (`conntrack -F` there): the flood's
/// entries go at once instead of after their timeout.
pub struct ConntrackFlush(pub String);

impl Drop for ConntrackFlush {
    fn drop(&mut self) {
        if Path::new("/run/netns").join(&self.0).exists() {
            run_cleanup("ip", &["netns", "exec", &self.0, "conntrack", "-F"]);
        }
    }
}

/// The machine-global conntrack hash size (`/sys/module/nf_conntrack/parameters/hashsize`),
/// changed for as long as the guard lives and restored on drop, also when the test panics.
/// The value to restore is kept in a file too, so a run killed before it could restore is
/// repaired by the next one.
pub struct HashsizeGuard {
    old: String,
}

pub const HASHSIZE_PATH: &str = "/sys/module/nf_conntrack/parameters/hashsize";
pub const HASHSIZE_SAVED: &str = "/run/dnsprobe-test-conntrack-hashsize.saved";

pub fn conntrack_hashsize() -> String {
    fs::read_to_string(HASHSIZE_PATH)
        .unwrap_or_else(|e| panic!("reading {HASHSIZE_PATH}: {e}"))
        .trim()
        .to_owned()
}

impl HashsizeGuard {
    pub fn set(value: &str) -> Self {
        let current = conntrack_hashsize();
        let old = match fs::read_to_string(HASHSIZE_SAVED) {
            Ok(saved) if !saved.trim().is_empty() => {
                eprintln!(
                    "an earlier run left the conntrack hash size at {current}; its original \
                     was {}",
                    saved.trim()
                );
                saved.trim().to_owned()
            }
            _ => current,
        };
        fs::write(HASHSIZE_SAVED, &old).unwrap_or_else(|e| panic!("writing {HASHSIZE_SAVED}: {e}"));
        let guard = Self { old };
        fs::write(HASHSIZE_PATH, value)
            .unwrap_or_else(|e| panic!("writing {value} to {HASHSIZE_PATH}: {e}"));
        guard
    }

    pub fn old(&self) -> &str {
        &self.old
    }
}

impl Drop for HashsizeGuard {
    fn drop(&mut self) {
        match fs::write(HASHSIZE_PATH, &self.old) {
            Ok(()) if conntrack_hashsize_is(&self.old) => {
                let _ = fs::remove_file(HASHSIZE_SAVED);
            }
            Ok(()) => eprintln!(
                "cleanup: {HASHSIZE_PATH} reads {:?} after restoring {}",
                fs::read_to_string(HASHSIZE_PATH),
                self.old
            ),
            Err(e) => eprintln!("cleanup: restoring {HASHSIZE_PATH} to {}: {e}", self.old),
        }
    }
}

fn conntrack_hashsize_is(value: &str) -> bool {
    fs::read_to_string(HASHSIZE_PATH).is_ok_and(|v| v.trim() == value)
}

// ---------------------------------------------------------------------------------------------
// The musl client

/// `tests/support/gai.c` built with `musl-gcc -static`, once per test process. It lives in
/// cargo's per-target temp dir under its final name, because the kernel's comm of the client
/// is the first 15 bytes of that name.
pub fn musl_gai() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/gai.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gai-musl-bin");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let bin = dir.join("gai-musl");
        // Built under a private name and renamed: another test process may be running the
        // previous binary at this moment, and rename swaps the file atomically under it.
        let tmp = dir.join(format!("gai-musl.{}.tmp", std::process::id()));
        let tmp_s = tmp.to_string_lossy().into_owned();
        let src_s = src.to_string_lossy().into_owned();
        run_ok("musl-gcc", &["-static", "-O2", "-o", &tmp_s, &src_s]);
        fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
        bin
    })
}

/// `tests/support/gai.c` built with the system compiler against glibc, once per test process:
/// the same client on glibc's stub resolver. Its comm is `gai-glibc`.
pub fn glibc_gai() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/gai.c");
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gai-glibc-bin");
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let bin = dir.join("gai-glibc");
        let tmp = dir.join(format!("gai-glibc.{}.tmp", std::process::id()));
        let tmp_s = tmp.to_string_lossy().into_owned();
        let src_s = src.to_string_lossy().into_owned();
        run_ok("cc", &["-O2", "-o", &tmp_s, &src_s]);
        fs::rename(&tmp, &bin).unwrap_or_else(|e| panic!("renaming {}: {e}", tmp.display()));
        bin
    })
}

// ---------------------------------------------------------------------------------------------
// The daemon

/// The fields of a query record that the tests rely on; the daemon may add others.
#[derive(Debug, Clone, Deserialize)]
pub struct QueryRecord {
    pub event: String,
    pub time: String,
    pub qname: String,
    pub qtype: String,
    pub id: u16,
    pub transport: String,
    pub client: String,
    pub server: String,
    pub outcome: String,
    pub rcode: Option<String>,
    pub latency_ns: Option<u64>,
    pub sends: u64,
    pub answers: Vec<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    /// Not in the record contract; checked only when the daemon provides it.
    #[serde(default)]
    pub thread_comm: Option<String>,
    /// Further fields (README: "Further query fields"); tests that rely on one check it.
    #[serde(default)]
    pub send_times: Vec<String>,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub socket_cookie: Option<u64>,
    #[serde(default)]
    pub drops: Vec<DropRecord>,
}

impl QueryRecord {
    /// `send_times` in ns since the epoch; panics on a time that is not RFC 3339.
    pub fn send_times_ns(&self) -> Vec<i128> {
        self.send_times
            .iter()
            .map(|t| parse_rfc3339_ns(t).unwrap_or_else(|| panic!("send time `{t}`: {self:?}")))
            .collect()
    }
}

/// A kernel drop, as attached to a query (`drops`) or written on its own (`"event":"drop"`).
#[derive(Debug, Clone, Deserialize)]
pub struct DropRecord {
    pub time: String,
    /// `query` or `response`.
    pub packet: String,
    /// Kernel drop reason (`NETFILTER_DROP`, `NO_SOCKET`, ...).
    pub reason: String,
    /// `conntrack_insert_failed`, `netfilter_drop`, or the reason in lower case.
    pub kind: String,
    pub detail: Option<String>,
    pub location: String,
    pub netns: u32,
    pub src: String,
    pub dst: String,
    pub dns_id: Option<u16>,
}

const DROP_KEYS: &[&str] = &[
    "time", "packet", "reason", "kind", "detail", "location", "netns", "src", "dst", "dns_id",
];

/// One diagnosis of a lookup.
#[derive(Debug, Clone, Deserialize)]
pub struct Diagnosis {
    pub code: String,
    pub message: String,
    pub evidence: Value,
}

/// The resolver configuration a lookup was read with.
#[derive(Debug, Clone, Deserialize)]
pub struct ResolverJson {
    pub search: Vec<String>,
    pub ndots: u32,
}

/// A `lookup` record: what one resolver call did for one name in one process.
#[derive(Debug, Clone, Deserialize)]
pub struct LookupRecord {
    pub event: String,
    pub time: String,
    pub name: String,
    pub duration_ns: u64,
    pub queries: usize,
    pub search_expansions: usize,
    pub final_rcode: Option<String>,
    pub answers: Vec<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<String>,
    pub resolver: Option<ResolverJson>,
    pub diagnosis: Vec<Diagnosis>,
}

const LOOKUP_KEYS: &[&str] = &[
    "event",
    "time",
    "name",
    "duration_ns",
    "queries",
    "search_expansions",
    "final_rcode",
    "answers",
    "pid",
    "comm",
    "cgroup_id",
    "cgroup_path",
    "resolver",
    "diagnosis",
];

/// Every diagnosis code the daemon documents.
pub const DIAGNOSIS_CODES: [&str; 9] = [
    "search_list_expansion",
    "servfail_retry",
    "slow_upstream",
    "conntrack_insert_failed",
    "packet_drop",
    "resend_after_timeout",
    "late_response",
    "truncated_tcp_fallback",
    "no_response",
];

impl LookupRecord {
    pub fn codes(&self) -> Vec<&str> {
        self.diagnosis.iter().map(|d| d.code.as_str()).collect()
    }

    pub fn has(&self, code: &str) -> bool {
        self.diagnosis.iter().any(|d| d.code == code)
    }

    /// The (only) diagnosis with this code; panics if there is none or several.
    pub fn diagnosis(&self, code: &str) -> &Diagnosis {
        let found: Vec<&Diagnosis> = self.diagnosis.iter().filter(|d| d.code == code).collect();
        assert_eq!(found.len(), 1, "want one `{code}` diagnosis: {self:#?}");
        found[0]
    }

    /// Every diagnosis with this code.
    pub fn diagnoses(&self, code: &str) -> Vec<&Diagnosis> {
        self.diagnosis.iter().filter(|d| d.code == code).collect()
    }
}

/// A `late_response` event: a response that came after its query and its lookup had ended.
#[derive(Debug, Clone, Deserialize)]
pub struct LateEvent {
    pub event: String,
    pub time: String,
    pub qname: String,
    pub qtype: String,
    pub id: u16,
    pub why: String,
    pub after_first_send_ns: u64,
    pub pid: Option<u32>,
    pub cgroup_id: u64,
}

const LATE_KEYS: &[&str] = &[
    "event",
    "time",
    "qname",
    "qtype",
    "id",
    "why",
    "after_first_send_ns",
    "pid",
    "cgroup_id",
];

fn check_keys(value: &Value, keys: &[&str], line: &str) {
    let object = value.as_object().expect("a record is a JSON object");
    for key in keys {
        assert!(object.contains_key(*key), "record lacks `{key}`: {line}");
    }
}

/// Keys every query record must have, `null` or not: serde alone would accept a missing
/// optional field as `None`.
const RECORD_KEYS: &[&str] = &[
    "event",
    "time",
    "qname",
    "qtype",
    "id",
    "transport",
    "client",
    "server",
    "outcome",
    "rcode",
    "latency_ns",
    "sends",
    "answers",
    "pid",
    "comm",
    "cgroup_id",
    "cgroup_path",
];

/// Every query record of `cgroup_path` in the JSON lines file `output` (complete lines only:
/// the daemon may be in the middle of one); none while the file does not exist. Panics on a
/// record of that cgroup that breaks the record contract.
pub fn query_records(output: &Path, cgroup_path: &str) -> Vec<QueryRecord> {
    let text = match fs::read_to_string(output) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("reading {}: {e}", output.display()),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut out = Vec::new();
    for line in complete.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("daemon wrote a line that is not JSON ({e}): {line}"));
        // Other events (e.g. packet drops) and other cgroups' queries are not ours.
        if value.get("event").and_then(Value::as_str) != Some("query")
            || value.get("cgroup_path").and_then(Value::as_str) != Some(cgroup_path)
        {
            continue;
        }
        let object = value.as_object().expect("a record is a JSON object");
        for key in RECORD_KEYS {
            assert!(object.contains_key(*key), "record lacks `{key}`: {line}");
        }
        let record: QueryRecord = serde_json::from_value(value)
            .unwrap_or_else(|e| panic!("record breaks the contract ({e}): {line}"));
        out.push(record);
    }
    out
}

struct StderrLog {
    text: String,
    closed: bool,
}

/// `dnsprobe run --format json --output <file> --query-timeout 2s`, stopped on drop.
pub struct Daemon {
    child: Option<Child>,
    output: PathBuf,
    log: Arc<(Mutex<StderrLog>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    _dir: TempDir,
}

/// How a daemon ended, from [`Daemon::stop`].
pub struct Stopped {
    pub status: Option<ExitStatus>,
    /// From SIGTERM to exit.
    pub took: Duration,
    pub stderr: String,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// [`Daemon::start`] with more `dnsprobe run` flags (`--lookup-idle 3s`, say).
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::try_start_with(extra_args).unwrap_or_else(|why| panic!("{why}"))
    }

    /// [`Daemon::start_with`], but a daemon that exits (or does not start capturing in time)
    /// is an `Err` with its stderr instead of a panic, for a test that may retry (a port it
    /// picked was taken meanwhile, say).
    pub fn try_start_with(extra_args: &[&str]) -> Result<Self, String> {
        Self::try_start_wrapped(&[], extra_args)
    }

    /// Starts the daemon through `wrapper` (e.g. `setpriv ... --`), which execs it.
    pub fn try_start_wrapped(wrapper: &[&str], extra_args: &[&str]) -> Result<Self, String> {
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let dir = TempDir::new(&format!("{}-{n}-daemon", std::process::id()));
        let output = dir.path().join("records.jsonl");
        let timeout = format!("{}ms", QUERY_TIMEOUT.as_millis());
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(env!("CARGO_BIN_EXE_dnsprobe"));
                cmd
            }
            None => Command::new(env!("CARGO_BIN_EXE_dnsprobe")),
        };
        cmd.args(["run", "--format", "json", "--output"])
            .arg(&output)
            .args(["--query-timeout", &timeout])
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // A daemon orphaned by a killed test binary would stay attached to the cgroup root.
        die_with_parent(&mut cmd, libc::SIGTERM);
        let mut child = cmd.spawn().expect("spawning dnsprobe");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new((
            Mutex::new(StderrLog {
                text: String::new(),
                closed: false,
            }),
            Condvar::new(),
        ));
        // Drained for the daemon's whole life: a full pipe would block its logging, and the
        // text explains failures.
        let reader = {
            let log = Arc::clone(&log);
            thread::spawn(move || {
                let mut lines = BufReader::new(stderr);
                let mut line = String::new();
                loop {
                    line.clear();
                    let done = !matches!(lines.read_line(&mut line), Ok(n) if n > 0);
                    let (lock, cvar) = &*log;
                    let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
                    state.text.push_str(&line);
                    state.closed = done;
                    cvar.notify_all();
                    if done {
                        return;
                    }
                }
            })
        };
        let mut daemon = Self {
            child: Some(child),
            output,
            log,
            reader: Some(reader),
            _dir: dir,
        };
        // On an error the daemon is dropped here, which stops it if it still runs.
        daemon.wait_started()?;
        Ok(daemon)
    }

    fn wait_started(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        let (lock, cvar) = &*self.log;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.text.contains("capture started") {
                return Ok(());
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let text = state.text.clone();
                drop(state);
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                return Err(format!(
                    "dnsprobe did not log `capture started` within {DAEMON_START_TIMEOUT:?} \
                     (exit status: {status:?}); stderr:\n{text}"
                ));
            }
            state = cvar
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn stderr(&self) -> String {
        let (lock, _) = &*self.log;
        lock.lock().unwrap_or_else(|p| p.into_inner()).text.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The daemon process exists and has not exited (a zombie counts as exited).
    pub fn is_running(&self) -> bool {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // The state follows the parenthesised command name.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    }

    /// Every query record of `cgroup_path` written so far (complete lines only: the daemon
    /// may be in the middle of one). Panics on a record of that cgroup that breaks the
    /// record contract.
    pub fn records(&self, cgroup_path: &str) -> Vec<QueryRecord> {
        query_records(&self.output, cgroup_path)
    }

    /// Every complete line the daemon wrote so far, parsed (any `event`, any cgroup).
    pub fn lines(&self) -> Vec<(Value, String)> {
        let text = match fs::read_to_string(&self.output) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading {}: {e}", self.output.display()),
        };
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let value: Value = serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("daemon wrote a line that is not JSON ({e}): {line}")
                });
                (value, line.to_owned())
            })
            .collect()
    }

    /// The `lookup` records of `cgroup_path`; panics on one that breaks the record contract.
    pub fn lookups(&self, cgroup_path: &str) -> Vec<LookupRecord> {
        self.lines()
            .into_iter()
            .filter(|(v, _)| {
                v.get("event").and_then(Value::as_str) == Some("lookup")
                    && v.get("cgroup_path").and_then(Value::as_str) == Some(cgroup_path)
            })
            .map(|(v, line)| {
                check_keys(&v, LOOKUP_KEYS, &line);
                for d in v["diagnosis"].as_array().into_iter().flatten() {
                    check_keys(d, &["code", "message", "evidence"], &line);
                }
                serde_json::from_value(v)
                    .unwrap_or_else(|e| panic!("lookup breaks the contract ({e}): {line}"))
            })
            .collect()
    }

    /// The `drop` events (drops that matched no query) whose source or destination address is
    /// one of `ips`: drops carry no cgroup, so a test picks its own by its unique addresses.
    pub fn drop_events(&self, ips: &[IpAddr]) -> Vec<DropRecord> {
        self.lines()
            .into_iter()
            .filter(|(v, _)| v.get("event").and_then(Value::as_str) == Some("drop"))
            .map(|(v, line)| {
                check_keys(&v, DROP_KEYS, &line);
                let d: DropRecord = serde_json::from_value(v)
                    .unwrap_or_else(|e| panic!("drop breaks the contract ({e}): {line}"));
                d
            })
            .filter(|d| {
                [&d.src, &d.dst]
                    .iter()
                    .any(|a| a.parse::<SocketAddr>().is_ok_and(|a| ips.contains(&a.ip())))
            })
            .collect()
    }

    /// The `late_response` events of the cgroup with id `cgroup_id`.
    pub fn late_events(&self, cgroup_id: u64) -> Vec<LateEvent> {
        self.lines()
            .into_iter()
            .filter(|(v, _)| {
                v.get("event").and_then(Value::as_str) == Some("late_response")
                    && v.get("cgroup_id").and_then(Value::as_u64) == Some(cgroup_id)
            })
            .map(|(v, line)| {
                check_keys(&v, LATE_KEYS, &line);
                serde_json::from_value(v)
                    .unwrap_or_else(|e| panic!("late_response breaks the contract ({e}): {line}"))
            })
            .collect()
    }

    /// Polls until `check` returns something; panics after `timeout` with the daemon's last
    /// lines of output and its stderr.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = check(self) {
                return found;
            }
            if Instant::now() >= deadline {
                let lines = self.lines();
                let tail: Vec<&str> = lines
                    .iter()
                    .skip(lines.len().saturating_sub(80))
                    .map(|(_, l)| l.as_str())
                    .collect();
                panic!(
                    "waited {timeout:?} for {what}; the daemon's last lines:\n{}\n\
                     daemon stderr:\n{}",
                    tail.join("\n"),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// Polls the records of `cgroup_path` until `done` holds for them; panics after `timeout`
    /// with what was seen and the daemon's stderr.
    pub fn wait_for(
        &self,
        cgroup_path: &str,
        what: &str,
        done: impl Fn(&[QueryRecord]) -> bool,
        timeout: Duration,
    ) -> Vec<QueryRecord> {
        let deadline = Instant::now() + timeout;
        loop {
            let records = self.records(cgroup_path);
            if done(&records) {
                return records;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {timeout:?} for {what} in cgroup {cgroup_path}; records seen:\n{}\n\
                     daemon stderr:\n{}",
                    format_records(&records),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGTERM, then wait (SIGKILL after 10 s); reports how it went.
    pub fn stop(mut self) -> Stopped {
        self.stop_inner()
    }

    /// Like [`Daemon::stop`], with another signal (SIGINT, say).
    pub fn stop_with(mut self, sig: libc::c_int) -> Stopped {
        self.stop_inner_with(sig)
    }

    fn stop_inner(&mut self) -> Stopped {
        self.stop_inner_with(libc::SIGTERM)
    }

    fn stop_inner_with(&mut self, sig: libc::c_int) -> Stopped {
        let start = Instant::now();
        let status = self
            .child
            .take()
            .and_then(|mut child| stop_child_with(&mut child, sig, Duration::from_secs(10)));
        let took = start.elapsed();
        // The pipe closes when the daemon exits, which ends the reader.
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        Stopped {
            status,
            took,
            stderr: self.stderr(),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop_inner();
        }
    }
}

pub fn format_records(records: &[QueryRecord]) -> String {
    if records.is_empty() {
        return "(none)".to_owned();
    }
    records
        .iter()
        .map(|r| format!("{r:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// The scripted DNS server

/// What the scripted server does with queries for one name.
#[derive(Debug, Clone)]
pub enum Script {
    /// Answer with the addresses of the query's family (A: v4, AAAA: v6), `delay` after the
    /// kernel received the query.
    Answer { addrs: Vec<IpAddr>, delay: Duration },
    /// Ignore the first copy of each query (same client, id, name and type) and answer later
    /// copies at once.
    AnswerSecondCopy { addrs: Vec<IpAddr> },
    /// Never answer.
    Ignore,
    /// Answer SERVFAIL, `delay` after the kernel received the query.
    Servfail { delay: Duration },
    /// One behaviour for A queries and another for AAAA (other types: NXDOMAIN at once).
    ByType { a: Box<Script>, aaaa: Box<Script> },
}

/// One query packet the scripted server received.
#[derive(Debug, Clone)]
pub struct Served {
    pub client: SocketAddr,
    pub id: u16,
    pub qname: String,
    pub qtype: String,
    /// 1 for the first copy of this (client, id, name, type), 2 for the next...
    pub copy: u32,
    /// Kernel receive timestamp (SO_TIMESTAMPNS), CLOCK_REALTIME ns.
    pub rx_ns: i128,
    /// When the answer left, CLOCK_REALTIME ns; `None` if not answered.
    pub tx_ns: Option<i128>,
}

/// A UDP DNS server on port 53 of both server addresses of a world, answering per [`Script`]
/// (NXDOMAIN at once for names without one). Its sockets are created by a thread that has
/// entered the server netns with `setns`, which moves only that thread; a socket stays in the
/// netns it was created in, so the serving threads can run anywhere.
pub struct ScriptedServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    log: Arc<Mutex<Vec<Served>>>,
}

type Scripts = Arc<HashMap<String, Script>>;

impl ScriptedServer {
    pub fn start(world: &World, scripts: Vec<(&str, Script)>) -> Self {
        let addrs = [IpAddr::V4(world.server_v4), IpAddr::V6(world.server_v6)];
        Self::start_on(&world.server_ns, &addrs, scripts)
    }

    /// The upstream of a [`Resolver::ClusterDns`] world, on [`UPSTREAM_V4`] in its server
    /// netns.
    pub fn start_upstream(world: &World, scripts: Vec<(&str, Script)>) -> Self {
        Self::start_on(&world.server_ns, &[IpAddr::V4(UPSTREAM_V4)], scripts)
    }

    /// A scripted server on port 53 of `addrs` in `netns`.
    pub fn start_on(netns: &str, addrs: &[IpAddr], scripts: Vec<(&str, Script)>) -> Self {
        let scripts: Scripts = Arc::new(
            scripts
                .into_iter()
                .map(|(name, s)| (normalize_name(name), s))
                .collect(),
        );
        let sockets = sockets_in_netns(netns, addrs);
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let threads = sockets
            .into_iter()
            .map(|socket| {
                let (stop, log, scripts) = (Arc::clone(&stop), Arc::clone(&log), scripts.clone());
                thread::spawn(move || serve(&socket, &scripts, &stop, &log))
            })
            .collect();
        Self { stop, threads, log }
    }

    pub fn served(&self) -> Vec<Served> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for ScriptedServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn normalize_name(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// Binds UDP port 53 on `addrs` inside the named netns, from a short-lived thread that enters
/// it (setns(CLONE_NEWNET) changes only the calling thread's namespace).
fn sockets_in_netns(netns: &str, addrs: &[IpAddr]) -> Vec<UdpSocket> {
    let path = PathBuf::from("/run/netns").join(netns);
    let addrs = addrs.to_vec();
    thread::spawn(move || {
        let ns =
            fs::File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
        // SAFETY: a valid namespace fd; only this thread's network namespace changes.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            panic!(
                "setns into {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        addrs
            .iter()
            .map(|&ip| {
                let socket = UdpSocket::bind(SocketAddr::new(ip, 53))
                    .unwrap_or_else(|e| panic!("binding {ip}:53 in {}: {e}", path.display()));
                let on: libc::c_int = 1;
                // SAFETY: valid fd and option buffer of the declared size.
                let rc = unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_TIMESTAMPNS,
                        (&on as *const libc::c_int).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(rc, 0, "SO_TIMESTAMPNS: {}", std::io::Error::last_os_error());
                // Lets the serving loop notice the stop flag.
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("setting a read timeout");
                socket
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// recvmsg with the kernel's receive timestamp (CLOCK_REALTIME ns); `None` on timeout.
fn recv_timestamped(socket: &UdpSocket, buf: &mut [u8]) -> Option<(usize, SocketAddr, i128)> {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    // SAFETY: all-zero is a valid msghdr; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg describes valid, writable buffers.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted => return None,
            _ => panic!("recvmsg: {err}"),
        }
    }
    let mut rx_ns = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel just filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                rx_ns = Some(i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let from = sockaddr_to_std(&from)?;
    // Without the control message (should not happen) the user-space clock is the fallback.
    Some((n as usize, from, rx_ns.unwrap_or_else(realtime_ns)))
}

fn sockaddr_to_std(sa: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(sa as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(sa as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

fn serve(socket: &UdpSocket, scripts: &Scripts, stop: &AtomicBool, log: &Arc<Mutex<Vec<Served>>>) {
    let mut copies: HashMap<(SocketAddr, u16, String, String), u32> = HashMap::new();
    let mut senders: Vec<JoinHandle<()>> = Vec::new();
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let Some((len, from, rx_ns)) = recv_timestamped(socket, &mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..len]) else {
            continue; // not DNS: nothing of ours sends that, so just ignore it
        };
        let Some(question) = query.queries.first().cloned() else {
            continue;
        };
        let qname = normalize_name(&question.name().to_ascii());
        let qtype = question.query_type().to_string();
        let copy = {
            let c = copies
                .entry((from, query.metadata.id, qname.clone(), qtype.clone()))
                .or_insert(0);
            *c += 1;
            *c
        };
        let index = {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.push(Served {
                client: from,
                id: query.metadata.id,
                qname: qname.clone(),
                qtype: qtype.clone(),
                copy,
                rx_ns,
                tx_ns: None,
            });
            log.len() - 1
        };
        let mut script = scripts.get(&qname);
        if let Some(Script::ByType { a, aaaa }) = script {
            script = match question.query_type() {
                RecordType::A => Some(&**a),
                RecordType::AAAA => Some(&**aaaa),
                _ => None,
            };
        }
        let (addrs, delay, rcode) = match script {
            None | Some(Script::ByType { .. }) => {
                (Vec::new(), Duration::ZERO, ResponseCode::NXDomain)
            }
            Some(Script::Ignore) => continue,
            Some(Script::AnswerSecondCopy { .. }) if copy < 2 => continue,
            Some(Script::AnswerSecondCopy { addrs }) => {
                (addrs.clone(), Duration::ZERO, ResponseCode::NoError)
            }
            Some(Script::Answer { addrs, delay }) => (addrs.clone(), *delay, ResponseCode::NoError),
            Some(Script::Servfail { delay }) => (Vec::new(), *delay, ResponseCode::ServFail),
        };
        let response = build_response(&query, &addrs, rcode);
        let target_ns = rx_ns + delay.as_nanos() as i128;
        let socket = socket.try_clone().expect("cloning the server socket");
        let log = Arc::clone(log);
        // A delayed answer is sent from its own thread, so queries arriving meanwhile (the
        // AAAA next to an A) are not held up behind it.
        senders.push(thread::spawn(move || {
            if !delay.is_zero() {
                prefer_realtime_scheduling();
            }
            wait_until_realtime(target_ns);
            let sent = socket.send_to(&response, from);
            let tx_ns = realtime_ns();
            if sent.is_ok() {
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(entry) = log.get_mut(index) {
                    entry.tx_ns = Some(tx_ns);
                }
            }
        }));
    }
    for s in senders {
        let _ = s.join();
    }
}

fn build_response(query: &Message, addrs: &[IpAddr], rcode: ResponseCode) -> Vec<u8> {
    let mut response = Message::response(query.metadata.id, query.metadata.op_code);
    response.metadata.message_type = MessageType::Response;
    response.metadata.recursion_desired = query.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    response.metadata.response_code = rcode;
    if let Some(question) = query.queries.first() {
        response.add_query(question.clone());
        for &addr in addrs {
            let rdata = match (question.query_type(), addr) {
                (RecordType::A, IpAddr::V4(v4)) => RData::A(A(v4)),
                (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(v6)),
                _ => continue,
            };
            response.add_answer(Record::from_rdata(question.name().clone(), 60, rdata));
        }
    }
    // A client that sent EDNS expects it back (RFC 6891); dig warns otherwise.
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        response.set_edns(edns);
    }
    response.to_vec().expect("encoding a DNS response")
}

/// Asks for SCHED_FIFO for the calling thread, so a delayed answer is not queued behind
/// everything else on a busy machine when its time comes. Root may; if not, it just runs late
/// more often, which the latency test notices from the server's own log.
fn prefer_realtime_scheduling() {
    let param = libc::sched_param { sched_priority: 10 };
    // SAFETY: pthread_self is always valid for the calling thread; param is a valid pointer.
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
}

/// Sleeps until 3 ms before `target_ns` (CLOCK_REALTIME), then spins: a plain sleep can
/// overshoot by a scheduler tick on a busy machine, and the latency test allows 2 ms in all.
fn wait_until_realtime(target_ns: i128) {
    const SPIN: i128 = 3_000_000;
    loop {
        let left = target_ns - realtime_ns();
        if left <= 0 {
            return;
        }
        if left > SPIN {
            thread::sleep(Duration::from_nanos((left - SPIN) as u64));
        } else {
            std::hint::spin_loop();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Polling

/// Calls `check` until it returns `Ok`; panics after `timeout` with what `check` said last
/// (its `Err`), so a failure shows the state that was waited on, at the caller's line.
#[track_caller]
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(found) => return found,
            Err(last) if Instant::now() >= deadline => {
                panic!("waited {timeout:?} for {what}; last seen:\n{last}")
            }
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A fake pod

/// A fake Kubernetes pod: a container cgroup in the cgroupfs driver's layout,
/// `<prefix>/kubepods/burstable/pod<uid>/<container id>`, under a prefix cgroup unique to the
/// process and pod (the daemon finds the kubepods part anywhere in a path), and the kubelet's
/// log directories that name it. Everything is removed on drop, deepest cgroup first; whatever
/// still runs in them is killed.
pub struct FakePod {
    /// Every cgroup made for the pod, outermost first.
    cgroups: Vec<Cgroup>,
    logs: TempDir,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub container: String,
    pub container_id: String,
}

impl FakePod {
    pub fn new(namespace: &str, name: &str, container: &str) -> Self {
        let pid = std::process::id();
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let uid = format!(
            "{pid:08x}-{:04x}-4000-8000-{:012x}",
            n & 0xffff,
            u64::from(pid) * 131 + u64::from(n)
        );
        let container_id = format!(
            "{:016x}{:016x}{:016x}{:016x}",
            pid,
            n,
            u64::from(pid) ^ 0x5eed_cafe,
            u64::from(n) + 11
        );
        let logs = TempDir::new(&format!("{pid}-{n}-podlogs"));
        let pod_dir = logs
            .path()
            .join("pods")
            .join(format!("{namespace}_{name}_{uid}"))
            .join(container);
        fs::create_dir_all(&pod_dir).expect("creating the pod log dir");
        let log = pod_dir.join("0.log");
        fs::write(&log, "").expect("creating the pod log file");
        let containers = logs.path().join("containers");
        fs::create_dir_all(&containers).expect("creating the container log dir");
        std::os::unix::fs::symlink(
            &log,
            containers.join(format!("{name}_{namespace}_{container}-{container_id}.log")),
        )
        .expect("linking the container log");

        let mut pod = Self {
            cgroups: Vec::new(),
            logs,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid,
            container: container.to_owned(),
            container_id,
        };
        let layout = format!(
            "dp-fakepod-{pid}-{n}/kubepods/burstable/pod{}/{}",
            pod.uid, pod.container_id
        );
        let mut path = String::new();
        for part in layout.split('/') {
            path = if path.is_empty() {
                part.to_owned()
            } else {
                format!("{path}/{part}")
            };
            pod.cgroups.push(Cgroup::create(&path));
        }
        pod
    }

    /// The container's cgroup, where the pod's clients run.
    pub fn cgroup(&self) -> &Cgroup {
        self.cgroups.last().expect("the pod has cgroups")
    }

    /// For `--pod-log-dir`.
    pub fn pod_log_dir(&self) -> PathBuf {
        self.logs.path().join("pods")
    }

    /// For `--container-log-dir`.
    pub fn container_log_dir(&self) -> PathBuf {
        self.logs.path().join("containers")
    }
}

impl Drop for FakePod {
    fn drop(&mut self) {
        // A cgroup goes only once it has no children: innermost first.
        while let Some(cgroup) = self.cgroups.pop() {
            drop(cgroup);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A terminal

/// A detached tmux session running one command in a pane of a fixed size: a real terminal for
/// an interactive program. The server has a socket name of its own (`-L`) in a private
/// `TMUX_TMPDIR`, reads no configuration, and runs in a cgroup of its own, so nothing is
/// shared with another tmux and everything goes on drop: the server is killed (`kill-server`
/// hangs up the pane), then whatever still runs in the cgroup is killed too.
pub struct Tmux {
    socket: String,
    /// Fields drop in declaration order: processes first, then the socket's directory.
    cgroup: Cgroup,
    dir: TempDir,
}

/// The one session of a [`Tmux`].
const TMUX_SESSION: &str = "main";

impl Tmux {
    /// Starts `command` (a shell command line, run by `sh -c`) in a `width` x `height` pane.
    pub fn start(width: u16, height: u16, command: &str) -> Self {
        let pid = std::process::id();
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{pid}-{n}");
        let dir = TempDir::new(&format!("{tag}-tmux"));
        let cgroup = Cgroup::create(&format!("dp-tmux-{tag}"));
        let tmux = Self {
            socket: format!("dnsprobe-test-{tag}"),
            cgroup,
            dir,
        };
        // Started from a shell that joined the cgroup: the server it forks stays there, and
        // so does every pane process.
        let procs = tmux.cgroup.dir.join("cgroup.procs");
        let (w, h) = (width.to_string(), height.to_string());
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("echo $$ > '{}' && exec \"$@\"", procs.display()))
            .arg("sh")
            .arg("tmux");
        tmux.configure(&mut cmd);
        cmd.args(["new-session", "-d", "-s", TMUX_SESSION, "-x", &w, "-y", &h])
            .arg(format!("sh -c {}", shell_quote(command)));
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .expect("running tmux (is it installed? `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "tmux new-session failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        tmux
    }

    /// The common arguments and environment of every tmux command of this server.
    fn configure(&self, cmd: &mut Command) {
        cmd.args(["-L", &self.socket, "-f", "/dev/null"])
            .env("TMUX_TMPDIR", self.dir.path())
            .env_remove("TMUX")
            .env_remove("TMUX_PANE");
    }

    fn tmux(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("tmux");
        self.configure(&mut cmd);
        cmd.args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running tmux {args:?}: {e}"))
    }

    /// The pane's visible text, one line per row; `None` once the session is gone.
    pub fn capture(&self) -> Option<String> {
        let out = self.tmux(&["capture-pane", "-p", "-t", TMUX_SESSION]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `tmux send-keys` (key names as tmux knows them: `q`, `Escape`, `C-c`).
    pub fn send_keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", TMUX_SESSION];
        args.extend_from_slice(keys);
        let out = self.tmux(&args);
        assert!(
            out.status.success(),
            "tmux send-keys {keys:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the session still exists (it ends when the pane's command exits).
    pub fn has_session(&self) -> bool {
        self.tmux(&["has-session", "-t", TMUX_SESSION])
            .status
            .success()
    }

    /// The pids of every process of the server's cgroup (the server, the pane's processes).
    pub fn pids(&self) -> Vec<u32> {
        fs::read_to_string(self.cgroup.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Fails when the server already exited, which is fine.
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "-f", "/dev/null", "kill-server"])
            .env("TMUX_TMPDIR", self.dir.path())
            .env_remove("TMUX")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// `s` as one word for `sh`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
