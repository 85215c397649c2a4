//! Names the cgroup of each query: cgroup v2 ids are the inode numbers of the cgroup
//! directories, so a walk of the hierarchy maps ids to paths (or, with `CAP_DAC_READ_SEARCH`,
//! one file handle opens the one directory).

use std::{
    collections::HashSet,
    fs, io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt as _};

/// Who sent a query, in Kubernetes terms, as far as the node can tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerIdentity>,
    /// The systemd unit of a host process (`sshd.service`), when not in a pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_unit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PodIdentity {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: String,
    pub qos: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ContainerIdentity {
    pub id: String,
    pub name: Option<String>,
    pub runtime: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AttributeError {
    #[error("reading /proc/self/mountinfo")]
    MountInfo(#[source] std::io::Error),
    #[error("no cgroup v2 (cgroup2) mount in /proc/self/mountinfo; pass --cgroup-root")]
    NoCgroup2Mount,
    #[error("{path} is not a cgroup v2 directory: {reason}")]
    NotCgroup2 { path: PathBuf, reason: String },
}

/// Finds the cgroup v2 mount point from the mount table (its place differs between hosts).
pub fn find_cgroup2_root() -> Result<PathBuf, AttributeError> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(AttributeError::MountInfo)?;
    cgroup2_mount_in(&mountinfo).ok_or(AttributeError::NoCgroup2Mount)
}

fn cgroup2_mount_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Optional fields end at " - "; the filesystem type follows it.
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4].iter().all(u8::is_ascii_digit)
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `path` is a cgroup v2 directory (it has `cgroup.procs` and `cgroup.controllers`).
pub fn check_cgroup2_dir(path: &Path) -> Result<(), AttributeError> {
    let not = |reason: String| AttributeError::NotCgroup2 {
        path: path.to_owned(),
        reason,
    };
    let meta = fs::metadata(path).map_err(|e| not(e.to_string()))?;
    if !meta.is_dir() {
        return Err(not("not a directory".into()));
    }
    if !path.join("cgroup.controllers").exists() {
        return Err(not(
            "no cgroup.controllers file (a cgroup v1 hierarchy?)".into()
        ));
    }
    Ok(())
}

/// The top of the cgroup v2 hierarchy `dir` is in, as mounted here: `dir` itself or its
/// highest ancestor that is a cgroup on the same filesystem. Paths are reported relative to
/// it even when the programs attach below it, so that they read the same whatever the attach
/// point, and a pod's cgroup keeps the kubepods slices above it that name its QoS class.
pub fn cgroup2_mount_of(dir: &Path) -> PathBuf {
    let dev = |path: &Path| fs::metadata(path).ok().map(|m| m.dev());
    // Absolute, so that a relative `dir` has its parents too.
    let mut top = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    while let Some(parent) = top.parent() {
        if !parent.join("cgroup.controllers").exists() || dev(parent) != dev(&top) {
            break;
        }
        top = parent.to_path_buf();
    }
    top
}

/// Maps cgroup ids to paths relative to the root (`/` is the root itself).
pub struct CgroupPaths {
    root: PathBuf,
    by_id: HashMap<u64, Arc<str>>,
    /// Ids a fresh walk did not find, with when: not walked for again until `NEGATIVE_TTL`.
    missing: HashMap<u64, Instant>,
    walks: u64,
    /// Finds one cgroup by its id without a walk; `None` where the kernel will not (no
    /// `CAP_DAC_READ_SEARCH`, or the root is no cgroup2 mount) and the walk is all there is.
    handles: Option<CgroupHandles>,
}

/// A cgroup v2 id is also the kernfs node id that the file handles of its filesystem carry
/// (`FILEID_KERNFS`), so `open_by_handle_at` opens one cgroup's directory by its id, and the
/// link under /proc/self/fd names it: two system calls for a new pod's cgroup, where a walk
/// reads every directory of the hierarchy. It needs `CAP_DAC_READ_SEARCH`.
struct CgroupHandles {
    /// The root, open: where the handles are decoded, and whose path is cut from the links.
    mount: OwnedFd,
    prefix: PathBuf,
}

/// `struct file_handle` with the 8 bytes of a kernfs handle: the node id.
#[repr(C)]
struct KernfsHandle {
    handle_bytes: u32,
    handle_type: i32,
    id: u64,
}

/// `FILEID_KERNFS` in include/linux/exportfs.h.
const FILEID_KERNFS: i32 = 0xfe;
/// `CGROUP2_SUPER_MAGIC` in include/uapi/linux/magic.h.
const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;

enum HandleLookup {
    /// The path relative to the root.
    Found(String),
    /// No cgroup has this id any more.
    Gone,
    /// Not found this way (outside the root): a walk may still tell.
    Unknown,
}

impl CgroupHandles {
    /// `None` unless `root` is a cgroup2 mount: other filesystems read a kernfs handle as
    /// stale, which would pass for a cgroup that is gone.
    fn open(root: &Path) -> Option<Self> {
        let prefix = fs::canonicalize(root).ok()?;
        let dir = fs::File::open(&prefix).ok()?;
        // SAFETY: statfs is plain data, for which all zeroes is a valid value.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid descriptor and a pointer to a statfs the call may fill.
        if unsafe { libc::fstatfs(dir.as_raw_fd(), &mut st) } != 0
            || u64::try_from(st.f_type).ok() != Some(CGROUP2_SUPER_MAGIC)
        {
            return None;
        }
        Some(Self {
            mount: dir.into(),
            prefix,
        })
    }

    /// An error means the kernel refuses handles altogether (no `CAP_DAC_READ_SEARCH`, or a
    /// kernel whose cgroup2 has no file handles).
    fn lookup(&self, id: u64) -> Result<HandleLookup, io::Error> {
        let mut handle = KernfsHandle {
            handle_bytes: 8,
            handle_type: FILEID_KERNFS,
            id,
        };
        // SAFETY: `handle` is a file_handle header followed by the `handle_bytes` bytes it
        // announces; the kernel reads it and returns a new descriptor or -1.
        let fd = unsafe {
            libc::open_by_handle_at(
                self.mount.as_raw_fd(),
                (&raw mut handle).cast::<libc::file_handle>(),
                libc::O_PATH | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ESTALE | libc::ENOENT) => Ok(HandleLookup::Gone),
                // The kernel will not, for any id: no capability, or no handles here.
                Some(
                    libc::EPERM | libc::EACCES | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS,
                ) => Err(err),
                // Out of descriptors or memory, say: only this lookup failed.
                _ => Ok(HandleLookup::Unknown),
            };
        }
        // SAFETY: the descriptor was just returned to this function and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let Ok(link) = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) else {
            return Ok(HandleLookup::Unknown);
        };
        // A directory removed since it was opened.
        if link.as_os_str().as_encoded_bytes().ends_with(b" (deleted)") {
            return Ok(HandleLookup::Gone);
        }
        Ok(match link.strip_prefix(&self.prefix) {
            Ok(rel) => HandleLookup::Found(format!("/{}", rel.to_string_lossy())),
            Err(_) => HandleLookup::Unknown,
        })
    }
}

/// How long an id that no walk found is not looked for again (walks cost a directory scan).
const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Entries kept before the map is rebuilt from scratch by the next walk.
const MAX_ENTRIES: usize = 1 << 16;
/// A walk never goes deeper than this (cgroup trees are shallow; this bounds symlink-free loops).
const MAX_DEPTH: usize = 32;

impl CgroupPaths {
    pub fn new(root: PathBuf) -> Self {
        Self {
            by_id: HashMap::new(),
            missing: HashMap::new(),
            walks: 0,
            handles: CgroupHandles::open(&root),
            root,
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn walks(&self) -> u64 {
        self.walks
    }

    /// Forgets cgroups whose directory is gone (their records were written with the path
    /// already), and old negative entries. Costs one stat per known cgroup.
    pub fn prune(&mut self) {
        let root = &self.root;
        self.by_id
            .retain(|_, rel| root.join(rel.trim_start_matches('/')).exists());
        self.missing
            .retain(|_, at| crate::coarse::elapsed(at) < NEGATIVE_TTL);
    }

    pub fn resolve(&mut self, id: u64) -> Option<Arc<str>> {
        if let Some(path) = self.by_id.get(&id) {
            return Some(path.clone());
        }
        if let Some(when) = self.missing.get(&id) {
            if crate::coarse::elapsed(when) < NEGATIVE_TTL {
                return None;
            }
        }
        match self.handles.as_ref().map(|h| h.lookup(id)) {
            Some(Ok(HandleLookup::Found(path))) => {
                self.missing.remove(&id);
                self.make_room();
                let path: Arc<str> = Arc::from(path);
                self.by_id.insert(id, path.clone());
                return Some(path);
            }
            Some(Ok(HandleLookup::Gone)) => {
                self.remember_missing(id);
                return None;
            }
            Some(Ok(HandleLookup::Unknown)) | None => {}
            Some(Err(e)) => {
                let hint = match e.raw_os_error() {
                    Some(libc::EPERM | libc::EACCES) => "; it needs CAP_DAC_READ_SEARCH",
                    _ => "",
                };
                tracing::info!(
                    "new cgroups are found by reading the whole cgroup tree: open_by_handle_at \
                     was refused ({e}{hint})"
                );
                self.handles = None;
            }
        }
        self.walk();
        match self.by_id.get(&id) {
            Some(path) => {
                self.missing.remove(&id);
                Some(path.clone())
            }
            None => {
                self.remember_missing(id);
                None
            }
        }
    }

    fn remember_missing(&mut self, id: u64) {
        if self.missing.len() >= MAX_ENTRIES {
            self.missing.clear();
        }
        self.missing.insert(id, crate::coarse::now());
    }

    /// A full map starts again from empty rather than grow: whatever is still in use is found
    /// again.
    fn make_room(&mut self) {
        if self.by_id.len() >= MAX_ENTRIES {
            self.by_id.clear();
        }
    }

    fn walk(&mut self) {
        self.walks += 1;
        self.make_room();
        let mut seen_dirs = HashSet::new();
        let mut stack = vec![(self.root.clone(), String::from("/"), 0usize)];
        while let Some((dir, rel, depth)) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue; // vanished while walking
            };
            if !seen_dirs.insert(meta.ino()) {
                continue;
            }
            self.by_id.insert(meta.ino(), Arc::from(rel.as_str()));
            if depth >= MAX_DEPTH {
                continue;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(ft) = entry.file_type() else { continue };
                if !ft.is_dir() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let child_rel = if rel == "/" {
                    format!("/{name}")
                } else {
                    format!("{rel}/{name}")
                };
                stack.push((entry.path(), child_rel, depth + 1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_among_other_mounts() {
        let mountinfo = "\
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
33 24 0:28 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 33 0:30 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";
        assert_eq!(
            cgroup2_mount_in(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount_in("24 30 0:22 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\04"), "/end\\04");
    }

    #[test]
    fn the_mount_of_a_cgroup_is_its_highest_cgroup_ancestor() {
        let dir = std::env::temp_dir().join(format!("dnsprobe-mount-{}", std::process::id()));
        fs::create_dir_all(dir.join("top/a/b")).unwrap();
        for cgroup in ["top", "top/a", "top/a/b"] {
            fs::write(dir.join(cgroup).join("cgroup.controllers"), "").unwrap();
        }
        let top = fs::canonicalize(dir.join("top")).unwrap();
        assert_eq!(cgroup2_mount_of(&top.join("a/b")), top);
        assert_eq!(cgroup2_mount_of(&top.join("a")), top);
        assert_eq!(cgroup2_mount_of(&top), top);
        // Given relative to the working directory (tests share it: no `set_current_dir`).
        let cwd = std::env::current_dir().unwrap();
        let relative: PathBuf = cwd
            .components()
            .skip(1)
            .map(|_| Path::new(".."))
            .collect::<PathBuf>()
            .join(top.strip_prefix("/").unwrap())
            .join("a/b");
        assert_eq!(cgroup2_mount_of(&relative), top);
        fs::remove_dir_all(&dir).unwrap();
    }

    /// On the real cgroup2 mount, as root: ids resolve by handle, a removed cgroup's id reads
    /// as gone, and neither reads the tree.
    #[test]
    fn cgroup_ids_resolve_by_handle_without_a_walk() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (open_by_handle_at)");
            return;
        }
        let root = find_cgroup2_root().unwrap();
        let dir = root.join(format!("dp-unit-handles-{}/a", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let id = fs::metadata(&dir).unwrap().ino();
        let gone = fs::metadata(dir.parent().unwrap()).unwrap().ino();
        let mut paths = CgroupPaths::new(root.clone());
        let found = paths.resolve(id);
        fs::remove_dir(&dir).unwrap();
        fs::remove_dir(dir.parent().unwrap()).unwrap();
        let expected = format!("/dp-unit-handles-{}/a", std::process::id());
        assert_eq!(found.as_deref(), Some(expected.as_str()));
        assert_eq!(paths.resolve(gone), None);
        assert_eq!(paths.walks(), 0);
    }

    #[test]
    fn resolves_ids_of_a_directory_tree() {
        let dir = std::env::temp_dir().join(format!("dnsprobe-attr-{}", std::process::id()));
        fs::create_dir_all(dir.join("a/b")).unwrap();
        let id_b = fs::metadata(dir.join("a/b")).unwrap().ino();
        let id_root = fs::metadata(&dir).unwrap().ino();
        let mut paths = CgroupPaths::new(dir.clone());
        assert_eq!(paths.resolve(id_b).as_deref(), Some("/a/b"));
        assert_eq!(paths.resolve(id_root).as_deref(), Some("/"));
        let walks = paths.walks();
        // A miss is walked for once, then remembered.
        assert_eq!(paths.resolve(u64::MAX), None);
        assert_eq!(paths.resolve(u64::MAX), None);
        assert_eq!(paths.walks(), walks + 1);
        // Known entries survive the directory's removal.
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(paths.resolve(id_b).as_deref(), Some("/a/b"));
    }
}

/// Process names by pid. The kernel hook sees the sending *thread's* comm, which for threaded
/// clients is a worker name (`isc-net-0000` for dig); users look for the program, which is the
/// comm of the thread group in /proc. Read once per process and remembered briefly.
pub struct ProcessNames {
    proc_root: PathBuf,
    by_pid: HashMap<u32, ProcessName>,
}

struct ProcessName {
    /// The thread comm this entry was read for: a different one means the pid was reused.
    thread_comm: Option<String>,
    name: Option<Arc<str>>,
    read_at: Instant,
}

const PROCESS_NAME_TTL: Duration = Duration::from_secs(30);

impl ProcessNames {
    pub fn new(proc_root: PathBuf) -> Self {
        Self {
            proc_root,
            by_pid: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_pid.len()
    }

    /// Forgets names read longer ago than `grace` (or their TTL): processes come and go.
    pub fn prune(&mut self, grace: Duration) {
        let keep = grace.min(PROCESS_NAME_TTL);
        self.by_pid
            .retain(|_, e| crate::coarse::elapsed(e.read_at) < keep);
    }

    /// The process's name, or `None` if it exited before it could be read.
    pub fn resolve(&mut self, pid: u32, thread_comm: Option<&str>) -> Option<Arc<str>> {
        if let Some(entry) = self.by_pid.get(&pid) {
            if entry.thread_comm.as_deref() == thread_comm
                && crate::coarse::elapsed(entry.read_at) < PROCESS_NAME_TTL
            {
                return entry.name.clone();
            }
        }
        if self.by_pid.len() >= MAX_ENTRIES {
            self.by_pid
                .retain(|_, e| crate::coarse::elapsed(e.read_at) < PROCESS_NAME_TTL);
            if self.by_pid.len() >= MAX_ENTRIES {
                self.by_pid.clear();
            }
        }
        let name = fs::read_to_string(self.proc_root.join(pid.to_string()).join("comm"))
            .ok()
            .map(|s| Arc::from(s.trim_end_matches('\n')))
            .filter(|s: &Arc<str>| !s.is_empty());
        self.by_pid.insert(
            pid,
            ProcessName {
                thread_comm: thread_comm.map(str::to_owned),
                name: name.clone(),
                read_at: crate::coarse::now(),
            },
        );
        name
    }
}

#[cfg(test)]
mod process_tests {
    use super::*;

    #[test]
    fn reads_own_process_name() {
        let mut names = ProcessNames::new(PathBuf::from("/proc"));
        let me = std::process::id();
        let expected = fs::read_to_string(format!("/proc/{me}/comm")).unwrap();
        assert_eq!(
            names.resolve(me, Some("worker")).as_deref(),
            Some(expected.trim_end())
        );
        assert_eq!(names.len(), 1);
        // A pid that cannot exist (above pid_max) has no name.
        assert_eq!(names.resolve(u32::MAX, None), None);
    }
}

/// Names the workload behind each cgroup: the layout of its path says pod UID, QoS class and
/// container id; the kubelet's log directories say namespace, pod name and container name.
/// Results are kept per cgroup id, so a record written after its cgroup vanished keeps the
/// attribution seen while it lived.
pub struct Attributor {
    pods: crate::pods::PodDirectory,
    /// With `--kube-api`: asked first, the log directories being the fallback (the API may be
    /// unreachable, or not have caught up with a pod yet).
    kube: Option<crate::kubeapi::PodIndexHandle>,
    by_cgroup: HashMap<u64, (std::sync::Arc<Workload>, Instant)>,
    reported_error: Option<String>,
}

/// How long a cgroup's attribution is trusted before it is worked out again (a pod's name can
/// appear in the log directory a moment after its first query).
const WORKLOAD_TTL: Duration = Duration::from_secs(30);
/// Attributions re-tried sooner while the pod is not yet named.
const UNNAMED_TTL: Duration = Duration::from_secs(2);

impl Attributor {
    pub fn new(pods: crate::pods::PodDirectory) -> Self {
        Self {
            pods,
            kube: None,
            by_cgroup: HashMap::new(),
            reported_error: None,
        }
    }

    /// Names pods from the API index first (see [`crate::kubeapi`]), when there is one.
    pub fn with_kube_index(mut self, index: Option<crate::kubeapi::PodIndexHandle>) -> Self {
        self.kube = index;
        self
    }

    pub fn len(&self) -> usize {
        self.by_cgroup.len()
    }

    pub fn pod_directory_entries(&self) -> usize {
        self.pods.len()
    }

    pub fn pod_directory_evictions(&self) -> u64 {
        self.pods.evictions()
    }

    /// Forgets attributions made longer ago than `grace`: a cgroup still in use is simply
    /// attributed again (cheap), one that is gone stops taking room. Records keep what their
    /// query was attributed to when it was sent.
    pub fn prune(&mut self, grace: Duration) {
        self.by_cgroup
            .retain(|_, (_, at)| crate::coarse::elapsed(at) < grace);
    }

    pub fn pod_directory_scans(&self) -> u64 {
        self.pods.scans()
    }

    /// Keeps the pod directory fresh, and says once why it cannot be read (not a Kubernetes
    /// node, or the directory is not mounted into the daemon's container).
    pub fn refresh_if_due(&mut self) {
        self.pods.refresh_if_due();
        let error = self.pods.last_error().map(str::to_owned);
        if error != self.reported_error {
            if let Some(e) = &error {
                tracing::info!("pods cannot be named from the kubelet's log directories: {e}");
            }
            self.reported_error = error;
        }
    }

    pub fn workload(
        &mut self,
        cgroup_id: u64,
        cgroup_path: Option<&str>,
    ) -> Option<std::sync::Arc<Workload>> {
        if let Some((w, at)) = self.by_cgroup.get(&cgroup_id) {
            let named = w.pod.as_ref().is_none_or(|p| p.name.is_some());
            let ttl = if named { WORKLOAD_TTL } else { UNNAMED_TTL };
            if crate::coarse::elapsed(at) < ttl {
                return Some(w.clone());
            }
        }
        let path = cgroup_path?;
        let workload = std::sync::Arc::new(self.describe(path));
        if self.by_cgroup.len() >= MAX_ENTRIES {
            self.by_cgroup
                .retain(|_, (_, at)| crate::coarse::elapsed(at) < WORKLOAD_TTL);
            if self.by_cgroup.len() >= MAX_ENTRIES {
                self.by_cgroup.clear();
            }
        }
        self.by_cgroup
            .insert(cgroup_id, (workload.clone(), crate::coarse::now()));
        Some(workload)
    }

    fn describe(&mut self, path: &str) -> Workload {
        use crate::pods::{self, Workload as Layout};
        match pods::parse_cgroup_path(path) {
            Layout::Pod(pod) => {
                let kube = self.kube.as_ref();
                let meta = kube
                    .and_then(|k| k.lookup_pod(&pod.uid))
                    .or_else(|| self.pods.lookup_pod(&pod.uid));
                let container = pod.container.as_ref().map(|c| ContainerIdentity {
                    id: c.id.clone(),
                    name: kube
                        .and_then(|k| k.container_name(&c.id))
                        .or_else(|| self.pods.container_name(&c.id)),
                    runtime: Some(c.runtime.as_str().to_owned()),
                });
                Workload {
                    pod: Some(PodIdentity {
                        namespace: meta.as_ref().map(|m| m.namespace.clone()),
                        name: meta.as_ref().map(|m| m.name.clone()),
                        uid: pod.uid.clone(),
                        qos: Some(pod.qos.as_str().to_owned()),
                    }),
                    container,
                    host_unit: None,
                }
            }
            Layout::Host { unit } => Workload {
                host_unit: Some(unit.unwrap_or_else(|| "host".to_owned())),
                ..Workload::default()
            },
            Layout::Other => Workload::default(),
        }
    }
}
