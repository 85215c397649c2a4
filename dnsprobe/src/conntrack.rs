//! Tells conntrack insert failures apart from other netfilter drops.
//!
//! Both reach `kfree_skb` as NETFILTER_DROP from `nf_hook_slow`; what differs is that an insert
//! failure bumps the `insert_failed` counter of the network namespace it happened in. So the
//! counters of every namespace are sampled (at start, then periodically as a baseline) and read
//! again when a DNS packet is dropped by netfilter: a rise since the baseline means conntrack.

use std::{
    collections::HashMap,
    fs, io,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("network namespace {0} is not known (no process or /run/netns entry holds it)")]
    UnknownNetns(u32),
    #[error("entering network namespace {inum} through {path}")]
    Enter {
        inum: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading conntrack statistics of network namespace {inum}")]
    Read {
        inum: u32,
        #[source]
        source: io::Error,
    },
    #[error("conntrack statistics have no `{0}` column")]
    NoColumn(&'static str),
    #[error("the statistics reader thread panicked")]
    ThreadPanicked,
}

/// Sums of the per-CPU conntrack counters of one namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackCounters {
    pub insert_failed: u64,
    /// `chainlength` column: inserts refused because a hash chain grew too long.
    pub chaintoolong: u64,
    pub clash_resolved: u64,
    pub drop: u64,
}

/// Parses `/proc/net/stat/nf_conntrack`: a header of column names, then one line per CPU of
/// hexadecimal values. Columns are found by name since their set changes between kernels.
pub fn parse_stat(text: &str) -> Result<ConntrackCounters, ConntrackError> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .map(|h| h.split_whitespace().collect())
        .unwrap_or_default();
    let col = |name: &'static str| header.iter().position(|h| *h == name);
    let insert_failed = col("insert_failed").ok_or(ConntrackError::NoColumn("insert_failed"))?;
    let chain = col("chainlength");
    let clash = col("clashres");
    let drop = col("drop");
    let mut sum = ConntrackCounters::default();
    for line in lines {
        let values: Vec<u64> = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16).unwrap_or(0))
            .collect();
        let get = |i: Option<usize>| i.and_then(|i| values.get(i)).copied().unwrap_or(0);
        sum.insert_failed += get(Some(insert_failed));
        sum.chaintoolong += get(chain);
        sum.clash_resolved += get(clash);
        sum.drop += get(drop);
    }
    Ok(sum)
}

/// How a netfilter drop of a DNS packet is explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetfilterVerdict {
    /// `insert_failed` of the namespace rose since the last reading.
    InsertFailed {
        insert_failed_delta: u64,
        /// `chaintoolong` when that counter rose too, else `clash`.
        detail: &'static str,
    },
    /// The counter did not move: a rule (or another hook) dropped it.
    OtherNetfilter,
    /// No baseline for this namespace, or its counters could not be read.
    Unknown(String),
}

/// A way into a network namespace's /proc/net.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NetnsHandle {
    /// A process in it: `/proc/<pid>/net` shows that namespace, readable without setns (so
    /// without CAP_SYS_ADMIN).
    Process(PathBuf),
    /// A bind-mounted namespace file (`/run/netns/<name>`) of a namespace that may have no
    /// process: entered with setns on a short-lived thread.
    File(PathBuf),
}

struct Baseline {
    counters: ConntrackCounters,
}

/// Finds network namespaces by inode number and keeps a baseline of their conntrack counters.
pub struct ConntrackWatch {
    proc_root: PathBuf,
    named_netns_dir: PathBuf,
    /// inum -> how to read the namespace's counters.
    handles: HashMap<u32, NetnsHandle>,
    baselines: HashMap<u32, Baseline>,
    last_refresh: Option<Instant>,
    refresh_every: Duration,
    /// The last verdict per namespace: a storm of drops reuses it instead of re-reading the
    /// counters (each read costs a thread and a setns) for every packet.
    recent_verdicts: HashMap<u32, (Instant, NetfilterVerdict)>,
    /// pid -> network namespace, as the last walk of /proc found them: a node has hundreds of
    /// processes and a handful of namespaces, and reading every process's `ns/net` at every
    /// refresh was most of what an idle daemon did (about 5 µs per process here).
    pid_netns: HashMap<u32, u32>,
    /// Refreshes since the last walk that read every process's namespace again.
    walks_since_full: u32,
    /// `ns/net` links read, for tests of the cache.
    netns_reads: u64,
    pub read_errors: u64,
}

/// Drops in one namespace closer together than this share one reading of its counters.
const VERDICT_REUSE: Duration = Duration::from_millis(50);

/// Namespaces tracked at most; beyond that the oldest baselines are rebuilt from scratch.
const MAX_NAMESPACES: usize = 16_384;

/// Every this many refreshes, the walk of /proc reads every process's namespace again rather
/// than only new processes'. Between two such walks, a process known already that moved to a
/// namespace of its own (`unshare`, `setns`) is not noticed; a reused pid is, where it
/// matters (see [`ConntrackWatch::discover`]).
const FULL_WALK_EVERY: u32 = 6;

impl ConntrackWatch {
    pub fn new(refresh_every: Duration) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            named_netns_dir: PathBuf::from("/run/netns"),
            handles: HashMap::new(),
            baselines: HashMap::new(),
            last_refresh: None,
            refresh_every,
            recent_verdicts: HashMap::new(),
            pid_netns: HashMap::new(),
            walks_since_full: 0,
            netns_reads: 0,
            read_errors: 0,
        }
    }

    pub fn namespaces(&self) -> usize {
        self.baselines.len()
    }

    /// Re-reads the baseline of every namespace when `refresh_every` has passed.
    pub fn refresh_if_due(&mut self) {
        if self
            .last_refresh
            .is_some_and(|at| at.elapsed() < self.refresh_every)
        {
            return;
        }
        self.last_refresh = Some(Instant::now());
        self.walks_since_full += 1;
        let full = self.walks_since_full >= FULL_WALK_EVERY;
        self.discover(full);
        let handles = &self.handles;
        self.baselines.retain(|inum, _| handles.contains_key(inum));
        self.recent_verdicts
            .retain(|inum, _| handles.contains_key(inum));
        let inums: Vec<u32> = self.handles.keys().copied().collect();
        for inum in inums {
            match self.read(inum) {
                Ok(counters) => {
                    self.baselines.insert(inum, Baseline { counters });
                }
                Err(_) => self.read_errors += 1,
            }
        }
    }

    /// Explains a netfilter drop seen in namespace `inum`, and moves the baseline forward.
    pub fn classify(&mut self, inum: u32) -> NetfilterVerdict {
        if let Some((at, verdict)) = self.recent_verdicts.get(&inum) {
            if at.elapsed() < VERDICT_REUSE {
                return verdict.clone();
            }
        }
        let verdict = self.read_verdict(inum);
        if self.recent_verdicts.len() >= MAX_NAMESPACES {
            self.recent_verdicts.clear();
        }
        self.recent_verdicts
            .insert(inum, (Instant::now(), verdict.clone()));
        verdict
    }

    fn read_verdict(&mut self, inum: u32) -> NetfilterVerdict {
        if !self.handles.contains_key(&inum) {
            self.discover(true);
        }
        let now = match self.read(inum) {
            Ok(c) => c,
            Err(e) => {
                self.read_errors += 1;
                return NetfilterVerdict::Unknown(format!("{:#}", anyhow::Error::from(e)));
            }
        };
        let previous = self
            .baselines
            .insert(inum, Baseline { counters: now })
            .map(|b| b.counters);
        let Some(before) = previous else {
            return NetfilterVerdict::Unknown(format!(
                "no earlier conntrack reading of network namespace {inum}"
            ));
        };
        let delta = now.insert_failed.saturating_sub(before.insert_failed);
        if delta == 0 {
            return NetfilterVerdict::OtherNetfilter;
        }
        let detail = if now.chaintoolong > before.chaintoolong {
            "chaintoolong"
        } else {
            "clash"
        };
        NetfilterVerdict::InsertFailed {
            insert_failed_delta: delta,
            detail,
        }
    }

    /// Maps namespace inode numbers to ways into them: a process where there is one, else a
    /// named namespace file. Unless `full`, a process seen by an earlier walk is taken to be
    /// where it was then; only the process chosen as a namespace's way in is checked, so that
    /// a reused pid cannot pass one namespace's counters off as another's.
    fn discover(&mut self, full: bool) {
        if full {
            self.walks_since_full = 0;
        }
        if self.baselines.len() >= MAX_NAMESPACES {
            self.baselines.clear();
        }
        let mut pid_netns: HashMap<u32, u32> = HashMap::with_capacity(self.pid_netns.len());
        // inum -> the process that leads into it, and whether its namespace was read just now.
        let mut ways_in: HashMap<u32, (u32, bool)> = HashMap::new();
        if let Ok(entries) = fs::read_dir(&self.proc_root) {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let known = if full {
                    None
                } else {
                    self.pid_netns.get(&pid).copied()
                };
                let (inum, fresh) = match known {
                    Some(inum) => (inum, false),
                    None => match self.netns_of(pid) {
                        Some(inum) => (inum, true),
                        None => continue,
                    },
                };
                pid_netns.insert(pid, inum);
                // The lowest pid: most likely the namespace's first process and its last to
                // go, so the way in rarely changes.
                let way_in = ways_in.entry(inum).or_insert((pid, fresh));
                if pid < way_in.0 {
                    *way_in = (pid, fresh);
                }
            }
        }
        let stale = ways_in
            .iter()
            .filter(|(_, (_, fresh))| !fresh)
            .any(|(&inum, &(pid, _))| self.netns_of(pid) != Some(inum));
        if stale && !full {
            // A pid now names another process, or the process moved: what else was taken
            // from the last walk cannot be trusted either.
            return self.discover(true);
        }
        self.pid_netns = pid_netns;
        let mut found: HashMap<u32, NetnsHandle> = ways_in
            .into_iter()
            .map(|(inum, (pid, _))| {
                let net = self.proc_root.join(pid.to_string()).join("net");
                (inum, NetnsHandle::Process(net))
            })
            .collect();
        if let Ok(entries) = fs::read_dir(&self.named_netns_dir) {
            for entry in entries.flatten() {
                if let Ok(meta) = fs::metadata(entry.path()) {
                    if let Ok(inum) = u32::try_from(meta.ino()) {
                        found
                            .entry(inum)
                            .or_insert_with(|| NetnsHandle::File(entry.path()));
                    }
                }
            }
        }
        // Processes come and go: a fresh scan replaces the old handles.
        self.handles = found;
    }

    /// The network namespace of process `pid`.
    fn netns_of(&mut self, pid: u32) -> Option<u32> {
        self.netns_reads += 1;
        netns_inum(&self.proc_root.join(pid.to_string()).join("ns/net"))
    }

    fn read(&self, inum: u32) -> Result<ConntrackCounters, ConntrackError> {
        match self.handles.get(&inum) {
            Some(NetnsHandle::Process(net)) => {
                let text = fs::read_to_string(net.join("stat/nf_conntrack"))
                    .map_err(|source| ConntrackError::Read { inum, source })?;
                parse_stat(&text)
            }
            Some(NetnsHandle::File(path)) => read_in_netns(inum, path),
            None => Err(ConntrackError::UnknownNetns(inum)),
        }
    }
}

/// The namespace a `ns/net` link names (`net:[4026531840]`).
fn netns_inum(link: &Path) -> Option<u32> {
    fs::read_link(link)
        .ok()?
        .to_str()?
        .strip_prefix("net:[")?
        .strip_suffix(']')?
        .parse::<u32>()
        .ok()
}

/// Reads the conntrack statistics as seen from inside a namespace. `setns` changes only the
/// calling thread, so a short-lived thread does it and the daemon's threads never move.
pub fn read_in_netns(inum: u32, handle: &Path) -> Result<ConntrackCounters, ConntrackError> {
    let handle = handle.to_owned();
    std::thread::spawn(move || -> Result<ConntrackCounters, ConntrackError> {
        let enter = |source| ConntrackError::Enter {
            inum,
            path: handle.clone(),
            source,
        };
        let file = fs::File::open(&handle).map_err(enter)?;
        // SAFETY: valid fd of a namespace file; affects only this thread, which exits after.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(enter(io::Error::last_os_error()));
        }
        let text = fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")
            .map_err(|source| ConntrackError::Read { inum, source })?;
        parse_stat(&text)
    })
    .join()
    .map_err(|_| ConntrackError::ThreadPanicked)?
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000001 00000000 00000000 00000000 00000000 00000000 00000002 00000000 0000000a 00000003 00000000 00000000  00000000 00000000 00000000 00000000
00000010  00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000005 00000000 00000000 00000000  00000000 00000000 00000000 00000000
";

    #[test]
    fn sums_per_cpu_columns_by_name() {
        let c = parse_stat(STAT).unwrap();
        assert_eq!(c.insert_failed, 15);
        assert_eq!(c.chaintoolong, 3);
        assert_eq!(c.clash_resolved, 1);
        assert_eq!(c.drop, 3);
    }

    #[test]
    fn missing_column_is_an_error() {
        assert!(matches!(
            parse_stat("entries found\n0 0\n"),
            Err(ConntrackError::NoColumn("insert_failed"))
        ));
    }

    /// A made-up /proc: processes with an `ns/net` link and their namespace's statistics.
    struct FakeProc {
        root: PathBuf,
    }

    impl FakeProc {
        fn new() -> Self {
            static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "dnsprobe-conntrack-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            fs::create_dir_all(root.join("self")).unwrap();
            Self { root }
        }

        /// Process `pid` in namespace `inum`, created or moved there.
        fn put(&self, pid: u32, inum: u32) {
            let dir = self.root.join(pid.to_string());
            fs::create_dir_all(dir.join("ns")).unwrap();
            fs::create_dir_all(dir.join("net/stat")).unwrap();
            let link = dir.join("ns/net");
            let _ = fs::remove_file(&link);
            std::os::unix::fs::symlink(format!("net:[{inum}]"), &link).unwrap();
            fs::write(dir.join("net/stat/nf_conntrack"), STAT).unwrap();
        }

        fn remove(&self, pid: u32) {
            fs::remove_dir_all(self.root.join(pid.to_string())).unwrap();
        }

        fn watch(&self) -> ConntrackWatch {
            let mut watch = ConntrackWatch::new(Duration::ZERO);
            watch.proc_root = self.root.clone();
            watch.named_netns_dir = self.root.join("no-named-namespaces");
            watch
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    /// Which process leads into each namespace.
    fn ways_in(watch: &ConntrackWatch) -> Vec<(u32, String)> {
        let mut ways: Vec<(u32, String)> = watch
            .handles
            .iter()
            .map(|(inum, handle)| match handle {
                NetnsHandle::Process(net) => {
                    let pid = net.parent().unwrap().file_name().unwrap();
                    (*inum, pid.to_string_lossy().into_owned())
                }
                NetnsHandle::File(path) => (*inum, path.display().to_string()),
            })
            .collect();
        ways.sort();
        ways
    }

    #[test]
    fn later_walks_read_only_new_processes_and_the_ways_in() {
        let proc = FakeProc::new();
        for pid in 100..110 {
            proc.put(pid, 111);
        }
        proc.put(200, 222);
        let mut watch = proc.watch();
        watch.refresh_if_due();
        assert_eq!(watch.netns_reads, 11, "the first walk reads every process");
        assert_eq!(watch.namespaces(), 2);
        // A new process, one gone: the new one is read, then one check per namespace.
        proc.put(300, 333);
        proc.remove(109);
        watch.refresh_if_due();
        assert_eq!(watch.netns_reads, 11 + 1 + 2);
        assert_eq!(
            ways_in(&watch),
            [
                (111, "100".into()),
                (222, "200".into()),
                (333, "300".into())
            ]
        );
        assert_eq!(watch.namespaces(), 3);
        assert!(!watch.pid_netns.contains_key(&109));
    }

    #[test]
    fn a_way_in_that_moved_triggers_a_full_walk() {
        let proc = FakeProc::new();
        proc.put(100, 111);
        proc.put(101, 111);
        proc.put(200, 222);
        let mut watch = proc.watch();
        watch.refresh_if_due();
        let reads = watch.netns_reads;
        // Pid 100 now names a process of another namespace: it must not read as 111's.
        proc.put(100, 444);
        watch.refresh_if_due();
        assert_eq!(
            ways_in(&watch),
            [
                (111, "101".into()),
                (222, "200".into()),
                (444, "100".into())
            ]
        );
        // One or two checks (they stop at the first moved) found it, then every process was
        // read again.
        assert!(
            (reads + 1 + 3..=reads + 2 + 3).contains(&watch.netns_reads),
            "{} reads after {reads}",
            watch.netns_reads
        );
        assert_eq!(watch.walks_since_full, 0);
    }

    #[test]
    fn a_process_that_moved_is_found_by_the_next_full_walk() {
        let proc = FakeProc::new();
        proc.put(100, 111);
        proc.put(101, 111);
        let mut watch = proc.watch();
        watch.refresh_if_due();
        // Not the way into 111, so only a full walk notices it in a namespace of its own.
        proc.put(101, 555);
        let mut walks = 1;
        while !watch.handles.contains_key(&555) {
            assert!(walks <= FULL_WALK_EVERY, "not found after {walks} walks");
            watch.refresh_if_due();
            walks += 1;
        }
        assert_eq!(walks, FULL_WALK_EVERY);
        assert_eq!(ways_in(&watch), [(111, "100".into()), (555, "101".into())]);
        // A drop in a namespace not known yet starts a full walk at once.
        proc.put(101, 666);
        assert!(matches!(watch.classify(666), NetfilterVerdict::Unknown(_)));
        assert!(watch.handles.contains_key(&666));
    }

    #[test]
    fn reads_own_namespace() {
        let inum = netns_inum(Path::new("/proc/self/ns/net")).expect("own netns");
        if !Path::new("/proc/net/stat/nf_conntrack").exists() {
            // Without the conntrack module there is nothing to read; the error must say so.
            assert!(read_in_netns(inum, Path::new("/proc/self/ns/net")).is_err());
            return;
        }
        let mut watch = ConntrackWatch::new(Duration::from_secs(3600));
        watch.refresh_if_due();
        assert!(watch.namespaces() >= 1);
        // Nothing raced an insert here: the verdict must not blame conntrack.
        assert_eq!(watch.classify(inum), NetfilterVerdict::OtherNetfilter);
    }
}
