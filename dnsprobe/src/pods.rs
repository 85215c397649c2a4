//! Names the Kubernetes workload behind a cgroup v2 path, and names pods and containers from
//! the kubelet's log directories.
//!
//! Layouts recognised (paths relative to the cgroup v2 root; `<uid>` is the pod UID, `<id>` a
//! 64-hex container id):
//!
//! - systemd cgroup driver: `/kubepods.slice/kubepods-burstable.slice/
//!   kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope` (also `kubepods-besteffort`,
//!   and Guaranteed pods right under `kubepods.slice` as `kubepods-pod<uid>.slice`). systemd
//!   reserves `-` for nesting, so the UID is written with `_` instead. Container scopes are
//!   `cri-containerd-<id>.scope`, `crio-<id>.scope` and `docker-<id>.scope`; `crio-conmon-<id>.scope`
//!   is CRI-O's monitor process, inside the pod but not inside a container.
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`, `/kubepods/besteffort/pod<uid>/<id>`,
//!   `/kubepods/pod<uid>/<id>` (CRI-O names the leaf `crio-<id>`).
//! - A kubelet with systemd naming in front of a runtime that manages cgroups itself (containerd
//!   or CRI-O not set to the systemd driver): the runtime gets `slice:prefix:id` and, not asking
//!   systemd, makes it one directory under its own cgroup:
//!   `/system.slice/containerd.service/kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`.
//!
//! The kubepods part may sit anywhere in the path: kind nodes (`/kubelet.slice/kubelet-kubepods.slice/
//! kubelet-kubepods-burstable.slice/...`), nodes that run in a container (`/docker/<id>/kubepods/...`).
//! The outermost pod wins: it is the one the local kubelet runs (a pod that runs a nested cluster
//! has its own kubepods tree inside). Cgroups below a container's (a container that makes
//! sub-cgroups) belong to that container.
//!
//! A pod's sandbox ("pause") container has a cgroup of the same shape as the others, so the path
//! cannot tell it apart: its id has no entry in /var/log/containers, which is how
//! [`PodDirectory::container_name`] tells it (it answers None). The pause process sends no DNS.

use std::{
    collections::HashMap,
    fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::Serialize;

/// What a cgroup path says about who sent a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// A process of a Kubernetes pod.
    Pod(PodRef),
    /// A process of the host: under a systemd slice, or the root cgroup. `unit` is the innermost
    /// systemd unit (`.service`, `.scope`, ...) on the path, if any.
    Host { unit: Option<String> },
    /// A path of no known layout (nothing is guessed).
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRef {
    /// The pod UID in its canonical form (dashes; lower-case hex). Static pods have a 32-hex
    /// UID (a hash of their manifest) instead of a UUID.
    pub uid: String,
    pub qos: QosClass,
    /// None for the pod-level cgroup, CRI-O's conmon, or a child cgroup of no known shape.
    pub container: Option<ContainerRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerRef {
    /// 64 lower-case hex digits.
    pub id: String,
    pub runtime: Runtime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Guaranteed => "guaranteed",
            Self::Burstable => "burstable",
            Self::BestEffort => "besteffort",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Runtime {
    #[serde(rename = "containerd")]
    Containerd,
    #[serde(rename = "cri-o")]
    CriO,
    #[serde(rename = "docker")]
    Docker,
    /// A bare id (cgroupfs driver: containerd and Docker name the leaf alike).
    #[serde(rename = "unknown")]
    Unknown,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::CriO => "cri-o",
            Self::Docker => "docker",
            Self::Unknown => "unknown",
        }
    }
}

/// Names the workload of a cgroup v2 path (relative to the cgroup v2 root, `/` being the root).
pub fn parse_cgroup_path(path: &str) -> Workload {
    let segments: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    if let Some(pod) = find_pod(&segments) {
        return Workload::Pod(pod);
    }
    // A kubepods path that did not parse is not a host process: say nothing rather than guess.
    if segments.iter().any(|s| s.contains("kubepods")) {
        return Workload::Other;
    }
    match segments.first() {
        None => Workload::Host { unit: None },
        Some(first) if first.ends_with(".slice") || *first == "init.scope" => Workload::Host {
            unit: segments
                .iter()
                .rev()
                .find(|s| is_systemd_unit(s))
                .map(|s| (*s).to_owned()),
        },
        Some(_) => Workload::Other,
    }
}

/// systemd unit types that own cgroups with processes in them (slices never hold processes).
fn is_systemd_unit(segment: &str) -> bool {
    [".service", ".scope", ".socket", ".mount", ".swap"]
        .iter()
        .any(|suffix| segment.len() > suffix.len() && segment.ends_with(suffix))
}

fn find_pod(segments: &[&str]) -> Option<PodRef> {
    for (k, segment) in segments.iter().enumerate() {
        if let Some((uid, qos)) = systemd_pod(segments, k).or_else(|| cgroupfs_pod(segments, k)) {
            let container = segments.get(k + 1).and_then(|s| container_segment(s));
            return Some(PodRef {
                uid,
                qos,
                container,
            });
        }
        if let Some(pod) = colon_form(segment) {
            return Some(pod);
        }
    }
    None
}

/// Splits the part of a pod slice name before `-pod<uid>` into the slice prefix (`""`, or e.g.
/// `"kubelet-"` when the kubelet's cgroup root is `/kubelet`) and the QoS class.
fn split_qos(base: &str) -> Option<(&str, QosClass)> {
    [
        ("kubepods-burstable", QosClass::Burstable),
        ("kubepods-besteffort", QosClass::BestEffort),
        ("kubepods", QosClass::Guaranteed),
    ]
    .into_iter()
    .find_map(|(name, qos)| {
        let prefix = base.strip_suffix(name)?;
        (prefix.is_empty() || prefix.ends_with('-')).then_some((prefix, qos))
    })
}

/// `<prefix>kubepods[-<qos>]-pod<uid>.slice` with its parent slices in place.
fn systemd_pod(segments: &[&str], k: usize) -> Option<(String, QosClass)> {
    let stem = segments[k].strip_suffix(".slice")?;
    let (base, raw_uid) = stem.rsplit_once("-pod")?;
    let uid = parse_uid(raw_uid)?;
    let (prefix, qos) = split_qos(base)?;
    let slice_is = |i: usize, name: &str| {
        segments[i]
            .strip_suffix(".slice")
            .and_then(|s| s.strip_prefix(prefix))
            == Some(name)
    };
    let parents_ok = match qos {
        QosClass::Guaranteed => k >= 1 && slice_is(k - 1, "kubepods"),
        QosClass::Burstable | QosClass::BestEffort => {
            k >= 2 && slice_is(k - 1, &base[prefix.len()..]) && slice_is(k - 2, "kubepods")
        }
    };
    parents_ok.then_some((uid, qos))
}

/// `pod<uid>` under `kubepods/` or `kubepods/{burstable,besteffort}/`.
fn cgroupfs_pod(segments: &[&str], k: usize) -> Option<(String, QosClass)> {
    let uid = parse_uid(segments[k].strip_prefix("pod")?)?;
    let parent = *segments[..k].last()?;
    let grandparent = k.checked_sub(2).map(|i| segments[i]);
    let qos = match (parent, grandparent) {
        ("kubepods", _) => QosClass::Guaranteed,
        ("burstable", Some("kubepods")) => QosClass::Burstable,
        ("besteffort", Some("kubepods")) => QosClass::BestEffort,
        _ => return None,
    };
    Some((uid, qos))
}

/// `<prefix>kubepods[-<qos>]-pod<uid>.slice:<runtime prefix>:<id>` as one directory.
fn colon_form(segment: &str) -> Option<PodRef> {
    let mut parts = segment.split(':');
    let (slice, runtime_prefix, id) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !is_container_id(id) {
        return None;
    }
    let (base, raw_uid) = slice.strip_suffix(".slice")?.rsplit_once("-pod")?;
    let uid = parse_uid(raw_uid)?;
    let (_, qos) = split_qos(base)?;
    let runtime = match runtime_prefix {
        "cri-containerd" => Some(Runtime::Containerd),
        "crio" => Some(Runtime::CriO),
        "docker" => Some(Runtime::Docker),
        "crio-conmon" => None,
        _ => Some(Runtime::Unknown),
    };
    Some(PodRef {
        uid,
        qos,
        container: runtime.map(|runtime| ContainerRef {
            id: id.to_owned(),
            runtime,
        }),
    })
}

/// The cgroup right below a pod's: a container, or None (conmon, or a name of no known shape).
fn container_segment(segment: &str) -> Option<ContainerRef> {
    let stem = segment.strip_suffix(".scope").unwrap_or(segment);
    if stem.starts_with("crio-conmon-") {
        return None;
    }
    let named = [
        ("cri-containerd-", Runtime::Containerd),
        ("crio-", Runtime::CriO),
        ("docker-", Runtime::Docker),
    ]
    .into_iter()
    .find_map(|(prefix, runtime)| stem.strip_prefix(prefix).map(|id| (id, runtime)));
    let (id, runtime) = match named {
        Some(found) => found,
        // cgroupfs names the leaf by the bare id (never as a .scope).
        None if stem.len() == segment.len() => (stem, Runtime::Unknown),
        None => return None,
    };
    is_container_id(id).then(|| ContainerRef {
        id: id.to_owned(),
        runtime,
    })
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

/// A container id as CRI runtimes make them: 64 lower-case hex digits.
fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(is_lower_hex)
}

/// A pod UID as written in a cgroup or log directory name: a UUID with `-` or `_` between the
/// groups, or the 32-hex hash the kubelet gives static pods. Returns the canonical form.
fn parse_uid(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    match bytes.len() {
        36 => {
            let ok = bytes.iter().enumerate().all(|(i, &b)| match i {
                8 | 13 | 18 | 23 => b == b'-' || b == b'_',
                _ => is_lower_hex(b),
            });
            ok.then(|| raw.replace('_', "-"))
        }
        32 => bytes
            .iter()
            .all(|&b| is_lower_hex(b))
            .then(|| raw.to_owned()),
        _ => None,
    }
}

/// Where the kubelet writes pod logs: `<namespace>_<pod-name>_<pod-uid>/<container>/<n>.log`.
pub const DEFAULT_PODS_DIR: &str = "/var/log/pods";
/// Where the kubelet links container logs: `<pod-name>_<namespace>_<container>-<id>.log`.
pub const DEFAULT_CONTAINERS_DIR: &str = "/var/log/containers";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodDirectoryConfig {
    /// How long entries whose log directory or link vanished are still answered, so that late
    /// records of a deleted pod are still named.
    pub grace: Duration,
    /// Entries (pods plus containers) kept at most; beyond, the longest-gone, then the oldest,
    /// are evicted. Also the most directory entries one scan reads per directory.
    pub max_entries: usize,
    /// A miss rescans the directories at most this often (a flood of unknown pods must not
    /// cost a directory scan per packet).
    pub min_scan_interval: Duration,
    /// Lookups rescan this often even when they hit, to notice pods that went away.
    pub refresh_interval: Duration,
}

impl Default for PodDirectoryConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(300),
            max_entries: 1 << 16,
            min_scan_interval: Duration::from_secs(1),
            refresh_interval: Duration::from_secs(30),
        }
    }
}

#[derive(Debug)]
struct Entry<T> {
    value: T,
    /// The scan that last saw it.
    seen_in: u64,
    /// When a scan first missed it.
    gone_since: Option<Instant>,
}

/// Sorts first what goes first: gone entries (`false` < `true`), then the least recently seen.
type EvictionRank = (bool, u64, Option<Instant>);

impl<T> Entry<T> {
    fn eviction_rank(&self) -> EvictionRank {
        (self.gone_since.is_none(), self.seen_in, self.gone_since)
    }
}

/// Names pods and containers from the kubelet's log directories (no API server needed).
#[derive(Debug)]
pub struct PodDirectory {
    pods_dir: PathBuf,
    containers_dir: PathBuf,
    config: PodDirectoryConfig,
    /// By canonical pod UID.
    pods: HashMap<String, Entry<PodMeta>>,
    /// Container id -> container name.
    containers: HashMap<String, Entry<String>>,
    last_scan: Option<Instant>,
    scans: u64,
    evictions: u64,
    last_error: Option<String>,
}

impl PodDirectory {
    pub fn new(pods_dir: PathBuf, containers_dir: PathBuf) -> Self {
        Self::with_config(pods_dir, containers_dir, PodDirectoryConfig::default())
    }

    pub fn with_config(
        pods_dir: PathBuf,
        containers_dir: PathBuf,
        config: PodDirectoryConfig,
    ) -> Self {
        Self {
            pods_dir,
            containers_dir,
            config,
            pods: HashMap::new(),
            containers: HashMap::new(),
            last_scan: None,
            scans: 0,
            evictions: 0,
            last_error: None,
        }
    }

    /// Namespace and name of a pod by UID (dashes or underscores).
    pub fn lookup_pod(&mut self, uid: &str) -> Option<PodMeta> {
        self.lookup_pod_at(uid, Instant::now())
    }

    /// The name of a container by id; None for a pod's sandbox (it has no log).
    pub fn container_name(&mut self, container_id: &str) -> Option<String> {
        self.container_name_at(container_id, Instant::now())
    }

    /// Rescans when `refresh_interval` has passed since the last scan (for a caller's timer;
    /// lookups do the same by themselves).
    pub fn refresh_if_due(&mut self) {
        self.refresh_at(Instant::now());
    }

    /// Cached entries: pods plus containers.
    pub fn len(&self) -> usize {
        self.pods.len() + self.containers.len()
    }

    /// Directory scans done so far.
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// Entries dropped because the cache was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Why the last scan could not read a directory (absent on a host without a kubelet, say);
    /// None once a scan read both.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    fn lookup_pod_at(&mut self, uid: &str, now: Instant) -> Option<PodMeta> {
        let key = parse_uid(&uid.to_ascii_lowercase())?;
        self.refresh_at(now);
        let grace = self.config.grace;
        if let Some(meta) = live(&mut self.pods, &key, now, grace) {
            return Some(meta);
        }
        if self.scan_allowed(now) {
            self.scan(now);
            return live(&mut self.pods, &key, now, grace);
        }
        None
    }

    fn container_name_at(&mut self, container_id: &str, now: Instant) -> Option<String> {
        let key = container_id.to_ascii_lowercase();
        if !is_container_id(&key) {
            return None;
        }
        self.refresh_at(now);
        let grace = self.config.grace;
        if let Some(name) = live(&mut self.containers, &key, now, grace) {
            return Some(name);
        }
        if self.scan_allowed(now) {
            self.scan(now);
            return live(&mut self.containers, &key, now, grace);
        }
        None
    }

    fn refresh_at(&mut self, now: Instant) {
        let due = self.last_scan.is_some_and(|last| {
            now.saturating_duration_since(last) >= self.config.refresh_interval
        });
        if due {
            self.scan(now);
        }
    }

    fn scan_allowed(&self, now: Instant) -> bool {
        self.last_scan
            .is_none_or(|last| now.saturating_duration_since(last) >= self.config.min_scan_interval)
    }

    fn scan(&mut self, now: Instant) {
        self.scans += 1;
        self.last_scan = Some(now);
        let generation = self.scans;
        let (limit, grace) = (self.config.max_entries, self.config.grace);
        let mut errors = Vec::new();

        match read_names(&self.pods_dir, limit, true) {
            Ok(names) => {
                for meta in names.iter().filter_map(|n| parse_pod_dir_name(n)) {
                    see(&mut self.pods, meta.uid.clone(), meta, generation);
                }
                age_out(&mut self.pods, generation, now, grace);
            }
            Err(e) => errors.push(format!("reading {}: {e}", self.pods_dir.display())),
        }
        match read_names(&self.containers_dir, limit, false) {
            Ok(names) => {
                for (id, name) in names.iter().filter_map(|n| parse_container_log_name(n)) {
                    see(&mut self.containers, id, name, generation);
                }
                age_out(&mut self.containers, generation, now, grace);
            }
            Err(e) => errors.push(format!("reading {}: {e}", self.containers_dir.display())),
        }
        self.last_error = (!errors.is_empty()).then(|| errors.join("; "));
        self.enforce_cap();
    }

    /// Evicts down to `max_entries`: entries gone longest first, then the least recently seen.
    fn enforce_cap(&mut self) {
        let excess = self.len().saturating_sub(self.config.max_entries);
        if excess == 0 {
            return;
        }
        let mut ranked: Vec<(EvictionRank, bool, String)> = self
            .pods
            .iter()
            .map(|(key, entry)| (entry.eviction_rank(), true, key.clone()))
            .chain(
                self.containers
                    .iter()
                    .map(|(key, entry)| (entry.eviction_rank(), false, key.clone())),
            )
            .collect();
        ranked.sort_unstable();
        for (_, is_pod, key) in ranked.into_iter().take(excess) {
            if is_pod {
                self.pods.remove(&key);
            } else {
                self.containers.remove(&key);
            }
            self.evictions += 1;
        }
    }
}

/// The value of a cached entry unless it has been gone longer than the grace period.
fn live<T: Clone>(
    map: &mut HashMap<String, Entry<T>>,
    key: &str,
    now: Instant,
    grace: Duration,
) -> Option<T> {
    let entry = map.get(key)?;
    if entry
        .gone_since
        .is_some_and(|since| now.saturating_duration_since(since) >= grace)
    {
        map.remove(key);
        return None;
    }
    Some(entry.value.clone())
}

fn see<T>(map: &mut HashMap<String, Entry<T>>, key: String, value: T, generation: u64) {
    let entry = map.entry(key).or_insert(Entry {
        value,
        seen_in: generation,
        gone_since: None,
    });
    entry.seen_in = generation;
    entry.gone_since = None;
}

/// Marks entries this scan did not see as gone, and drops those gone past the grace period.
fn age_out<T>(map: &mut HashMap<String, Entry<T>>, generation: u64, now: Instant, grace: Duration) {
    map.retain(|_, entry| {
        if entry.seen_in == generation {
            return true;
        }
        let since = *entry.gone_since.get_or_insert(now);
        now.saturating_duration_since(since) < grace
    });
}

/// Names in a directory (at most `limit`): subdirectories when `dirs`, other entries otherwise.
fn read_names(dir: &Path, limit: usize, dirs: bool) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)?.take(limit) {
        let entry = entry?;
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() != dirs {
            continue;
        }
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    Ok(names)
}

/// `<namespace>_<pod-name>_<pod-uid>`: neither a namespace nor a pod name can hold `_`.
fn parse_pod_dir_name(name: &str) -> Option<PodMeta> {
    let mut parts = name.split('_');
    let (namespace, pod, raw_uid) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || namespace.is_empty() || pod.is_empty() {
        return None;
    }
    Some(PodMeta {
        namespace: namespace.to_owned(),
        name: pod.to_owned(),
        uid: parse_uid(raw_uid)?,
    })
}

/// `<pod-name>_<namespace>_<container-name>-<container-id>.log` -> (id, container name).
fn parse_container_log_name(name: &str) -> Option<(String, String)> {
    let (rest, id) = name.strip_suffix(".log")?.rsplit_once('-')?;
    if !is_container_id(id) {
        return None;
    }
    let mut parts = rest.split('_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || pod.is_empty() || namespace.is_empty() || container.is_empty() {
        return None;
    }
    Some((id.to_owned(), container.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    const UID: &str = "1234abcd-5678-4ef0-9abc-def012345678";
    const UID_: &str = "1234abcd_5678_4ef0_9abc_def012345678";
    const STATIC_UID: &str = "5b8ce0b63d5b4a6ca8b7fc8c1e6d9f1b";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const ID2: &str = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn pod(uid: &str, qos: QosClass, container: Option<(&str, Runtime)>) -> Workload {
        Workload::Pod(PodRef {
            uid: uid.to_owned(),
            qos,
            container: container.map(|(id, runtime)| ContainerRef {
                id: id.to_owned(),
                runtime,
            }),
        })
    }

    fn host(unit: Option<&str>) -> Workload {
        Workload::Host {
            unit: unit.map(str::to_owned),
        }
    }

    #[test]
    fn systemd_burstable_containerd() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Containerd)))
        );
    }

    #[test]
    fn systemd_besteffort_crio() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::CriO)))
        );
    }

    #[test]
    fn systemd_guaranteed_docker() {
        let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/docker-{ID}.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Docker)))
        );
    }

    #[test]
    fn systemd_slice_with_dashed_uid_is_accepted() {
        let path = format!("/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{ID}.scope");
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Containerd)))
        );
    }

    #[test]
    fn crio_conmon_is_in_the_pod_but_no_container() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, None)
        );
        let cgroupfs = format!("/kubepods/burstable/pod{UID}/crio-conmon-{ID}");
        assert_eq!(
            parse_cgroup_path(&cgroupfs),
            pod(UID, QosClass::Burstable, None)
        );
    }

    #[test]
    fn pod_level_cgroup_has_no_container() {
        let systemd = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
        );
        assert_eq!(
            parse_cgroup_path(&systemd),
            pod(UID, QosClass::BestEffort, None)
        );
        let cgroupfs = format!("/kubepods/pod{UID}/");
        assert_eq!(
            parse_cgroup_path(&cgroupfs),
            pod(UID, QosClass::Guaranteed, None)
        );
    }

    #[test]
    fn pause_container_is_shaped_like_any_container() {
        // The sandbox is told apart by PodDirectory (no log), not by its path.
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID2}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, Some((ID2, Runtime::Containerd)))
        );
    }

    #[test]
    fn unknown_child_of_a_pod_is_pod_without_container() {
        for child in [
            "xyz".to_owned(),
            format!("cri-containerd-{}.scope", &ID[..63]),
            format!("{ID}.scope"),
            format!("podman-{ID}.scope"),
            ID.to_uppercase(),
        ] {
            let path = format!("/kubepods.slice/kubepods-pod{UID_}.slice/{child}");
            assert_eq!(
                parse_cgroup_path(&path),
                pod(UID, QosClass::Guaranteed, None),
                "{child}"
            );
        }
    }

    #[test]
    fn cgroups_below_a_container_belong_to_it() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{ID}.scope/container"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::CriO)))
        );
    }

    #[test]
    fn cgroupfs_layouts() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{ID}")),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Unknown)))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{ID}")),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::Unknown)))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/{ID}")),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Unknown)))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/crio-{ID}")),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::CriO)))
        );
    }

    #[test]
    fn static_pod_uid_is_a_32_hex_hash() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{STATIC_UID}/{ID}")),
            pod(
                STATIC_UID,
                QosClass::Burstable,
                Some((ID, Runtime::Unknown))
            )
        );
        let systemd = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&systemd),
            pod(
                STATIC_UID,
                QosClass::Burstable,
                Some((ID, Runtime::Containerd))
            )
        );
    }

    #[test]
    fn colon_form_under_the_runtime_service() {
        let path = format!(
            "/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:{ID}"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Containerd)))
        );
        let crio = format!("/kubepods-besteffort-pod{UID_}.slice:crio:{ID}");
        assert_eq!(
            parse_cgroup_path(&crio),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::CriO)))
        );
        let guaranteed =
            format!("/system.slice/docker.service/kubepods-pod{UID_}.slice:docker:{ID}");
        assert_eq!(
            parse_cgroup_path(&guaranteed),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Docker)))
        );
    }

    #[test]
    fn colon_form_rejects_bad_ids() {
        let path = format!(
            "/system.slice/containerd.service/kubepods-burstable-pod{UID_}.slice:cri-containerd:abc"
        );
        assert_eq!(parse_cgroup_path(&path), Workload::Other);
        let bad_uid = format!(
            "/system.slice/containerd.service/kubepods-burstable-podxyz.slice:cri-containerd:{ID}"
        );
        assert_eq!(parse_cgroup_path(&bad_uid), Workload::Other);
    }

    #[test]
    fn kind_node_prefix() {
        let path = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Containerd)))
        );
        let guaranteed = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&guaranteed),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Containerd)))
        );
    }

    #[test]
    fn node_in_a_container_prefix() {
        let path = format!("/docker/{ID2}/kubepods/besteffort/pod{UID}/{ID}");
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::BestEffort, Some((ID, Runtime::Unknown)))
        );
        let scoped = format!(
            "/system.slice/docker-{ID2}.scope/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&scoped),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Containerd)))
        );
        // As /proc/<pid>/cgroup shows it from inside another cgroup namespace.
        let relative = format!("/../../kubepods/pod{UID}/{ID}");
        assert_eq!(
            parse_cgroup_path(&relative),
            pod(UID, QosClass::Guaranteed, Some((ID, Runtime::Unknown)))
        );
    }

    #[test]
    fn outermost_pod_wins() {
        let nested_uid = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
        let path =
            format!("/kubepods/burstable/pod{UID}/{ID}/kubepods/besteffort/pod{nested_uid}/{ID2}");
        assert_eq!(
            parse_cgroup_path(&path),
            pod(UID, QosClass::Burstable, Some((ID, Runtime::Unknown)))
        );
    }

    #[test]
    fn host_units() {
        assert_eq!(
            parse_cgroup_path("/system.slice/sshd.service"),
            host(Some("sshd.service"))
        );
        assert_eq!(
            parse_cgroup_path("/user.slice/user-0.slice/session-3.scope"),
            host(Some("session-3.scope"))
        );
        assert_eq!(
            parse_cgroup_path(
                "/user.slice/user-1000.slice/user@1000.service/app.slice/app-foo-42.scope"
            ),
            host(Some("app-foo-42.scope"))
        );
        assert_eq!(parse_cgroup_path("/"), host(None));
        assert_eq!(parse_cgroup_path(""), host(None));
        assert_eq!(parse_cgroup_path("/init.scope"), host(Some("init.scope")));
        assert_eq!(parse_cgroup_path("/system.slice"), host(None));
        assert_eq!(
            parse_cgroup_path("/system.slice/containerd.service/sub"),
            host(Some("containerd.service"))
        );
        assert_eq!(
            parse_cgroup_path("system.slice/systemd-resolved.service"),
            host(Some("systemd-resolved.service"))
        );
    }

    #[test]
    fn rejections() {
        // Not a pod UID.
        assert_eq!(
            parse_cgroup_path("/kubepods/burstable/podnotauuid/xyz"),
            Workload::Other
        );
        // A docker scope with no valid id is a host unit, never a container.
        assert_eq!(
            parse_cgroup_path("/system.slice/docker-notanid.scope"),
            host(Some("docker-notanid.scope"))
        );
        // A kubepods path that does not parse is not taken for a host process.
        assert_eq!(
            parse_cgroup_path(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podnope.slice/x.scope"
            ),
            Workload::Other
        );
        // Pod slice without its parent slices.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/foo/kubepods-burstable-pod{UID_}.slice/crio-{ID}.scope"
            )),
            Workload::Other
        );
        // QoS slice of the wrong parent.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-burstable-pod{UID_}.slice"
            )),
            Workload::Other
        );
        // pod<uid> outside kubepods.
        assert_eq!(
            parse_cgroup_path(&format!("/burstable/pod{UID}/{ID}")),
            Workload::Other
        );
        // A prefix glued to kubepods without the systemd separator.
        assert_eq!(
            parse_cgroup_path(&format!(
                "/xkubepods.slice/xkubepods-pod{UID_}.slice/crio-{ID}.scope"
            )),
            Workload::Other
        );
        // UIDs: wrong length, upper case, misplaced separators.
        for uid in [
            &UID[..35],
            "1234ABCD-5678-4ef0-9abc-def012345678",
            "1234abcd5-678-4ef0-9abc-def012345678",
            "5b8ce0b63d5b4a6ca8b7fc8c1e6d9f1",
        ] {
            assert_eq!(
                parse_cgroup_path(&format!("/kubepods/pod{uid}/{ID}")),
                Workload::Other,
                "{uid}"
            );
        }
        // QoS-level cgroups and the kubepods root hold no pod.
        assert_eq!(parse_cgroup_path("/kubepods.slice"), Workload::Other);
        assert_eq!(parse_cgroup_path("/kubepods/besteffort"), Workload::Other);
        // Other top-level trees.
        assert_eq!(parse_cgroup_path(&format!("/docker/{ID}")), Workload::Other);
        assert_eq!(parse_cgroup_path("/machine/qemu-1"), Workload::Other);
    }

    #[test]
    fn as_str_and_serialisation() {
        assert_eq!(QosClass::Guaranteed.as_str(), "guaranteed");
        assert_eq!(QosClass::Burstable.as_str(), "burstable");
        assert_eq!(QosClass::BestEffort.as_str(), "besteffort");
        for runtime in [
            Runtime::Containerd,
            Runtime::CriO,
            Runtime::Docker,
            Runtime::Unknown,
        ] {
            assert_eq!(
                serde_json::to_value(runtime).unwrap(),
                serde_json::json!(runtime.as_str())
            );
        }
        for qos in [
            QosClass::Guaranteed,
            QosClass::Burstable,
            QosClass::BestEffort,
        ] {
            assert_eq!(
                serde_json::to_value(qos).unwrap(),
                serde_json::json!(qos.as_str())
            );
        }
        assert_eq!(
            serde_json::to_value(pod(UID, QosClass::BestEffort, Some((ID, Runtime::CriO))))
                .unwrap(),
            serde_json::json!({
                "kind": "pod",
                "uid": UID,
                "qos": "besteffort",
                "container": {"id": ID, "runtime": "cri-o"},
            })
        );
        assert_eq!(
            serde_json::to_value(host(Some("sshd.service"))).unwrap(),
            serde_json::json!({"kind": "host", "unit": "sshd.service"})
        );
        assert_eq!(
            serde_json::to_value(Workload::Other).unwrap(),
            serde_json::json!({"kind": "other"})
        );
    }

    #[test]
    fn log_names() {
        assert_eq!(
            parse_pod_dir_name(&format!("kube-system_coredns-5d78c9869d-x2x7k_{UID}")),
            Some(PodMeta {
                namespace: "kube-system".into(),
                name: "coredns-5d78c9869d-x2x7k".into(),
                uid: UID.into(),
            })
        );
        assert_eq!(
            parse_pod_dir_name(&format!("default_web_{STATIC_UID}"))
                .unwrap()
                .uid,
            STATIC_UID
        );
        assert_eq!(parse_pod_dir_name(&format!("a_b_c_{UID}")), None);
        assert_eq!(parse_pod_dir_name(&format!("_web_{UID}")), None);
        assert_eq!(parse_pod_dir_name("default_web_notauid"), None);
        assert_eq!(
            parse_container_log_name(&format!("web-0_default_side-car-{ID}.log")),
            Some((ID.to_owned(), "side-car".to_owned()))
        );
        assert_eq!(
            parse_container_log_name(&format!("web-0_default_app-{ID}")),
            None
        );
        assert_eq!(parse_container_log_name("web-0_default_app-1234.log"), None);
        assert_eq!(
            parse_container_log_name(&format!("web-0_app-{ID}.log")),
            None
        );
    }

    /// A directory under the system temp dir, removed when dropped (also when a test fails).
    struct Fixture {
        root: PathBuf,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "dnsprobe-pods-{name}-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(root.join("pods")).unwrap();
            fs::create_dir_all(root.join("containers")).unwrap();
            Self { root }
        }

        fn pods(&self) -> PathBuf {
            self.root.join("pods")
        }

        fn containers(&self) -> PathBuf {
            self.root.join("containers")
        }

        /// A pod directory with one log per container, and the kubelet's links to them.
        fn add_pod(&self, namespace: &str, name: &str, uid: &str, containers: &[(&str, &str)]) {
            let pod_dir = self.pods().join(format!("{namespace}_{name}_{uid}"));
            for (container, id) in containers {
                fs::create_dir_all(pod_dir.join(container)).unwrap();
                let log = pod_dir.join(container).join("0.log");
                fs::write(&log, "").unwrap();
                std::os::unix::fs::symlink(
                    &log,
                    self.containers()
                        .join(format!("{name}_{namespace}_{container}-{id}.log")),
                )
                .unwrap();
            }
            fs::create_dir_all(&pod_dir).unwrap();
        }

        fn remove_pod(&self, namespace: &str, name: &str, uid: &str) {
            fs::remove_dir_all(self.pods().join(format!("{namespace}_{name}_{uid}"))).unwrap();
            for entry in fs::read_dir(self.containers()).unwrap() {
                let entry = entry.unwrap();
                if entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}_{namespace}_"))
                {
                    fs::remove_file(entry.path()).unwrap();
                }
            }
        }

        fn directory(&self, config: PodDirectoryConfig) -> PodDirectory {
            PodDirectory::with_config(self.pods(), self.containers(), config)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn names_pods_and_containers_from_log_dirs() {
        let fx = Fixture::new("names");
        fx.add_pod(
            "kube-system",
            "coredns-5d78c9869d-x2x7k",
            UID,
            &[("coredns", ID)],
        );
        fx.add_pod(
            "kube-system",
            "kube-apiserver-node1",
            STATIC_UID,
            &[("kube-apiserver", ID2)],
        );
        // Noise the scan must skip.
        fs::create_dir_all(fx.pods().join("not-a-pod")).unwrap();
        fs::create_dir_all(fx.pods().join("a_b_notauid")).unwrap();
        fs::write(fx.pods().join(format!("default_file_{UID}")), "").unwrap();
        fs::write(fx.containers().join("garbage.log"), "").unwrap();

        let mut dir = PodDirectory::new(fx.pods(), fx.containers());
        assert_eq!(
            dir.lookup_pod(UID),
            Some(PodMeta {
                namespace: "kube-system".into(),
                name: "coredns-5d78c9869d-x2x7k".into(),
                uid: UID.into(),
            })
        );
        // Underscored (as in systemd slices) and upper-case spellings find the same pod.
        assert_eq!(
            dir.lookup_pod(UID_).unwrap().name,
            "coredns-5d78c9869d-x2x7k"
        );
        assert_eq!(dir.lookup_pod(&UID.to_uppercase()).unwrap().uid, UID);
        assert_eq!(
            dir.lookup_pod(STATIC_UID).unwrap().name,
            "kube-apiserver-node1"
        );
        assert_eq!(dir.container_name(ID).as_deref(), Some("coredns"));
        assert_eq!(dir.container_name(ID2).as_deref(), Some("kube-apiserver"));
        assert_eq!(dir.scans(), 1, "all answered from one scan");
        assert_eq!(dir.len(), 4);
        assert!(dir.len() > 0);
        assert_eq!(dir.last_error(), None);
        // Not ids at all: answered without a scan.
        assert_eq!(dir.lookup_pod("notauid"), None);
        assert_eq!(dir.container_name("abc"), None);
        assert_eq!(dir.scans(), 1);
    }

    #[test]
    fn sandbox_and_unknown_ids_are_none() {
        let fx = Fixture::new("sandbox");
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        let mut dir = fx.directory(PodDirectoryConfig::default());
        let sandbox = "a".repeat(64);
        assert_eq!(dir.container_name(&sandbox), None);
        assert_eq!(dir.lookup_pod("aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"), None);
        assert_eq!(dir.container_name(ID).as_deref(), Some("app"));
    }

    #[test]
    fn misses_rescan_at_most_once_per_interval() {
        let fx = Fixture::new("ratelimit");
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        let mut dir = fx.directory(PodDirectoryConfig::default());
        let t0 = Instant::now();
        let unknown = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
        for i in 0..1000 {
            assert_eq!(dir.lookup_pod_at(unknown, t0 + ms(i / 2)), None);
            assert_eq!(dir.container_name_at(&"b".repeat(64), t0 + ms(i / 2)), None);
        }
        assert_eq!(
            dir.scans(),
            1,
            "a flood of misses within a second scans once"
        );

        // A pod that appears is found by the first miss after the interval, not before.
        fx.add_pod("default", "new-1", unknown, &[("app", ID2)]);
        assert_eq!(dir.lookup_pod_at(unknown, t0 + ms(999)), None);
        assert_eq!(dir.scans(), 1);
        assert_eq!(
            dir.lookup_pod_at(unknown, t0 + ms(1000)).unwrap().name,
            "new-1"
        );
        assert_eq!(dir.scans(), 2);
        // Hits do not scan.
        for i in 0..100 {
            assert!(dir.lookup_pod_at(UID, t0 + ms(1000 + i)).is_some());
            assert!(dir.container_name_at(ID2, t0 + ms(1000 + i)).is_some());
        }
        assert_eq!(dir.scans(), 2);
    }

    #[test]
    fn vanished_pods_are_kept_for_the_grace_period() {
        let fx = Fixture::new("grace");
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        fx.add_pod("default", "db-0", STATIC_UID, &[("db", ID2)]);
        let config = PodDirectoryConfig {
            grace: ms(5_000),
            refresh_interval: ms(1_000),
            ..PodDirectoryConfig::default()
        };
        let mut dir = fx.directory(config);
        let t0 = Instant::now();
        assert!(dir.lookup_pod_at(UID, t0).is_some());
        assert_eq!(dir.len(), 4);

        fx.remove_pod("default", "web-0", UID);
        // The refresh after 1 s notices; the entries are still answered within the grace.
        assert_eq!(
            dir.lookup_pod_at(UID, t0 + ms(1_000)).unwrap().name,
            "web-0"
        );
        assert_eq!(dir.scans(), 2);
        assert_eq!(
            dir.container_name_at(ID, t0 + ms(5_999)).as_deref(),
            Some("app")
        );
        assert_eq!(
            dir.lookup_pod_at(UID, t0 + ms(5_999)).unwrap().name,
            "web-0"
        );
        // Gone since t0+1s: past the grace at t0+6s, dropped, and the miss finds nothing.
        assert_eq!(dir.lookup_pod_at(UID, t0 + ms(6_000)), None);
        assert_eq!(dir.container_name_at(ID, t0 + ms(6_000)), None);
        assert_eq!(dir.len(), 2, "only db-0 and its container remain");
        assert!(dir.lookup_pod_at(STATIC_UID, t0 + ms(6_000)).is_some());
        assert_eq!(dir.evictions(), 0, "expiry is not eviction");

        // A pod that comes back (its directory reappears) is live again.
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        assert!(dir.lookup_pod_at(UID, t0 + ms(8_000)).is_some());
    }

    #[test]
    fn dropped_by_a_scan_when_gone_past_grace() {
        let fx = Fixture::new("scandrop");
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        let config = PodDirectoryConfig {
            grace: ms(2_000),
            refresh_interval: ms(1_000),
            ..PodDirectoryConfig::default()
        };
        let mut dir = fx.directory(config);
        let t0 = Instant::now();
        assert!(dir.lookup_pod_at(UID, t0).is_some());
        fx.remove_pod("default", "web-0", UID);
        dir.refresh_at(t0 + ms(1_000));
        assert_eq!(dir.len(), 2, "marked gone, still kept");
        dir.refresh_at(t0 + ms(2_000));
        assert_eq!(dir.len(), 2);
        dir.refresh_at(t0 + ms(3_000));
        assert_eq!(
            dir.len(),
            0,
            "gone since 1 s, grace 2 s: dropped by the scan at 3 s"
        );
        assert_eq!(dir.scans(), 4);
    }

    #[test]
    fn cache_is_capped_and_evictions_counted() {
        let fx = Fixture::new("cap");
        let uids: Vec<String> = (0..5)
            .map(|i| format!("aaaaaaaa-bbbb-4ccc-8ddd-00000000000{i}"))
            .collect();
        let ids: Vec<String> = (0..3).map(|i| format!("{}{i}", &ID[..63])).collect();
        for (i, (uid, id)) in uids.iter().zip(&ids).enumerate() {
            fx.add_pod("default", &format!("web-{i}"), uid, &[("app", id)]);
        }
        let config = PodDirectoryConfig {
            max_entries: 3,
            ..PodDirectoryConfig::default()
        };
        let mut dir = fx.directory(config);
        let t0 = Instant::now();
        dir.lookup_pod_at(&uids[0], t0);
        // Three pods and three containers read, three evicted.
        assert_eq!(dir.len(), 3);
        assert_eq!(dir.evictions(), 3);

        // Gone entries go first.
        let fx2 = Fixture::new("cap2");
        fx2.add_pod("default", "old", &uids[0], &[("app", ID)]);
        let mut dir = fx2.directory(PodDirectoryConfig {
            max_entries: 3,
            refresh_interval: ms(1_000),
            ..PodDirectoryConfig::default()
        });
        assert!(dir.lookup_pod_at(&uids[0], t0).is_some());
        fx2.remove_pod("default", "old", &uids[0]);
        fx2.add_pod("default", "new", &uids[1], &[("app", ID2)]);
        dir.refresh_at(t0 + ms(1_000));
        assert_eq!(dir.len(), 3);
        assert_eq!(dir.evictions(), 1);
        assert_eq!(
            dir.lookup_pod_at(&uids[1], t0 + ms(1_000)).unwrap().name,
            "new"
        );
        assert_eq!(
            dir.container_name_at(ID2, t0 + ms(1_000)).as_deref(),
            Some("app")
        );
    }

    #[test]
    fn defaults_and_timer_refresh() {
        assert_eq!(
            (DEFAULT_PODS_DIR, DEFAULT_CONTAINERS_DIR),
            ("/var/log/pods", "/var/log/containers")
        );
        let fx = Fixture::new("timer");
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        let mut dir = PodDirectory::new(fx.pods(), fx.containers());
        dir.refresh_if_due();
        assert_eq!(dir.scans(), 0, "nothing to refresh before the first lookup");
        assert!(dir.lookup_pod(UID).is_some());
        dir.refresh_if_due();
        assert_eq!(dir.scans(), 1, "not due within the refresh interval");
    }

    #[test]
    fn absent_directories_are_not_fatal() {
        let fx = Fixture::new("absent");
        fs::remove_dir_all(fx.pods()).unwrap();
        fs::remove_dir_all(fx.containers()).unwrap();
        let mut dir = fx.directory(PodDirectoryConfig::default());
        let t0 = Instant::now();
        assert_eq!(dir.lookup_pod_at(UID, t0), None);
        assert_eq!(dir.container_name_at(ID, t0), None);
        let err = dir.last_error().expect("error kept").to_owned();
        assert!(err.contains(&fx.pods().display().to_string()), "{err}");
        assert!(
            err.contains(&fx.containers().display().to_string()),
            "{err}"
        );
        assert_eq!(dir.scans(), 1);

        // The kubelet starts: the next allowed scan reads both and clears the error.
        fs::create_dir_all(fx.pods()).unwrap();
        fs::create_dir_all(fx.containers()).unwrap();
        fx.add_pod("default", "web-0", UID, &[("app", ID)]);
        assert!(dir.lookup_pod_at(UID, t0 + ms(1_000)).is_some());
        assert_eq!(dir.last_error(), None);
    }
}
