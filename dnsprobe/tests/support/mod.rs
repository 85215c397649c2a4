//! Shared helpers of the integration tests: a small world of two network namespaces (a client
//! and a DNS server joined by a veth pair), a cgroup for the client processes, the daemon under
//! test, and a scripted DNS server for behaviour no real server shows on demand.
//!
//! Every resource is owned by a guard whose `Drop` removes it, so a failing (panicking) test
//! leaves nothing behind. Names and subnets are unique per process and per world because the
//! tests of a binary run in parallel threads, and every daemon sees the DNS traffic of all of
//! them: tests only ever look at the records of their own cgroup.

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
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(child, libc::SIGTERM);
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

/// The cgroup v2 root, from /proc/self/mountinfo (never hard-coded: it is
/// /sys/fs/cgroup/unified on hybrid machines and /sys/fs/cgroup elsewhere).
pub fn cgroup2_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let info =
            fs::read_to_string("/proc/self/mountinfo").expect("reading /proc/self/mountinfo");
        info.lines()
            .find_map(|line| {
                // `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`
                let (left, right) = line.split_once(" - ")?;
                if right.split_whitespace().next()? != "cgroup2" {
                    return None;
                }
                left.split_whitespace().nth(4).map(unescape_mountinfo)
            })
            .expect("no cgroup2 mount in /proc/self/mountinfo")
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let digits = std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(digits, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    PathBuf::from(String::from_utf8_lossy(&out).into_owned())
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

static NEXT_WORLD: AtomicU32 = AtomicU32::new(0);

/// A client netns and a server netns joined by a veth pair, a cgroup for the clients, the
/// client's resolv.conf and, if asked, unbound in the server netns. No default routes: nothing
/// a test sends can leave the two namespaces.
///
/// Fields drop in declaration order: clients (cgroup) first, then the resolver, then the
/// namespaces, then files.
pub struct World {
    pub cgroup: Cgroup,
    unbound: Option<Proc>,
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
        if config.resolver == Resolver::Unbound {
            world.start_unbound();
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

    fn start_unbound(&mut self) {
        let conf = self.dir.path().join("unbound.conf");
        let text = format!(
            r#"server:
    interface: {v4}
    interface: {v6}
    port: 53
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
remote-control:
    control-enable: no
"#,
            v4 = self.server_v4,
            v6 = self.server_v6,
            dir = self.dir.path().display(),
            zone = ZONE,
            www = WWW,
            www_v4 = WWW_V4,
            www_v6 = WWW_V6,
            multi = MULTI,
            m0 = MULTI_V4[0],
            m1 = MULTI_V4[1],
            m2 = MULTI_V4[2],
        );
        fs::write(&conf, text).expect("writing unbound.conf");
        let log_path = self.dir.path().join("unbound.log");
        let log = fs::File::create(&log_path).expect("creating unbound.log");
        let log_err = log.try_clone().expect("cloning the unbound.log handle");
        let conf_s = conf.to_string_lossy().into_owned();
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.server_ns,
            "unbound",
            "-d",
            "-c",
            &conf_s,
        ])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
        die_with_parent(&mut cmd, libc::SIGKILL);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting unbound (is it installed?): {e}"));
        self.unbound = Some(Proc {
            child,
            what: format!("unbound of world {}", self.tag),
        });

        // Ready when it answers from the client netns on both addresses. These probes run in
        // the test's own cgroup, not the world's, so they never show up as the world's records.
        let deadline = Instant::now() + RESOLVER_START_TIMEOUT;
        for family in [Family::V4, Family::V6] {
            let server = format!("@{}", self.server_ip(family));
            loop {
                let out = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.client_ns,
                        "dig",
                        &server,
                        "www.test.internal",
                    ])
                    .args(["A", "+short", "+tries=1", "+time=1"])
                    .stdin(Stdio::null())
                    .output()
                    .expect("running dig (is bind9-dnsutils installed?)");
                if String::from_utf8_lossy(&out.stdout).trim() == WWW_V4 {
                    break;
                }
                if let Some(Ok(Some(status))) = self.unbound.as_mut().map(|p| p.child.try_wait()) {
                    panic!(
                        "unbound exited ({status}): {}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                if Instant::now() >= deadline {
                    panic!(
                        "unbound did not answer on {server} within {RESOLVER_START_TIMEOUT:?}; \
                         log: {}",
                        fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// A command line that joins the world's cgroup, then execs `ip netns exec` into the
    /// client netns. The cgroup is joined first because `ip netns exec` remounts /sys, which
    /// hides the cgroup tree. Both `sh`'s `exec` and `ip netns exec` replace the process
    /// without forking, so the spawned pid is the client's own pid.
    pub fn client_command(&self, argv: &[&str]) -> Command {
        let procs = self.cgroup.dir.join("cgroup.procs");
        let script = format!(
            "echo $$ > '{}' && exec ip netns exec '{}' \"$@\"",
            procs.display(),
            self.client_ns
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).arg("sh").args(argv);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Runs a client in the world and waits for it to exit.
    pub fn run_client(&self, argv: &[&str]) -> ClientRun {
        let mut cmd = self.client_command(argv);
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

    /// `dig @server NAME TYPE +tries=1 +time=T` in the world.
    pub fn dig(&self, family: Family, name: &str, qtype: &str, time_s: u32) -> ClientRun {
        let server = format!("@{}", self.server_ip(family));
        let time = format!("+time={time_s}");
        self.run_client(&["dig", &server, name, qtype, "+tries=1", &time])
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
        let n = NEXT_WORLD.fetch_add(1, Ordering::Relaxed);
        let dir = TempDir::new(&format!("{}-{n}-daemon", std::process::id()));
        let output = dir.path().join("records.jsonl");
        let timeout = format!("{}ms", QUERY_TIMEOUT.as_millis());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dnsprobe"));
        cmd.args(["run", "--format", "json", "--output"])
            .arg(&output)
            .args(["--query-timeout", &timeout])
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
        daemon.wait_started();
        daemon
    }

    fn wait_started(&mut self) {
        let deadline = Instant::now() + DAEMON_START_TIMEOUT;
        let (lock, cvar) = &*self.log;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if state.text.contains("capture started") {
                return;
            }
            let now = Instant::now();
            if state.closed || now >= deadline {
                let text = state.text.clone();
                drop(state);
                let status = self
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                panic!(
                    "dnsprobe did not log `capture started` within {DAEMON_START_TIMEOUT:?} \
                     (exit status: {status:?}); stderr:\n{text}"
                );
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

    /// Every query record of `cgroup_path` written so far (complete lines only: the daemon
    /// may be in the middle of one). Panics on a record of that cgroup that breaks the
    /// record contract.
    pub fn records(&self, cgroup_path: &str) -> Vec<QueryRecord> {
        let text = match fs::read_to_string(&self.output) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("reading {}: {e}", self.output.display()),
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

    fn stop_inner(&mut self) -> Stopped {
        let start = Instant::now();
        let status = self
            .child
            .take()
            .and_then(|mut child| stop_child(&mut child, Duration::from_secs(10)));
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
        let scripts: Scripts = Arc::new(
            scripts
                .into_iter()
                .map(|(name, s)| (normalize_name(name), s))
                .collect(),
        );
        let addrs = [IpAddr::V4(world.server_v4), IpAddr::V6(world.server_v6)];
        let sockets = sockets_in_netns(&world.server_ns, &addrs);
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
        let (addrs, delay, rcode) = match scripts.get(&qname) {
            None => (Vec::new(), Duration::ZERO, ResponseCode::NXDomain),
            Some(Script::Ignore) => continue,
            Some(Script::AnswerSecondCopy { .. }) if copy < 2 => continue,
            Some(Script::AnswerSecondCopy { addrs }) => {
                (addrs.clone(), Duration::ZERO, ResponseCode::NoError)
            }
            Some(Script::Answer { addrs, delay }) => (addrs.clone(), *delay, ResponseCode::NoError),
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
