//! Names pods and containers from the Kubernetes API (`--kube-api`): one list+watch of the pods
//! bound to this node (`fieldSelector=spec.nodeName=<node>`) keeps an index from pod UID to
//! namespace and name, and from container id to container name.
//!
//! The `kube` crate's watcher does the list, the watch, resuming from the last resourceVersion,
//! relisting after `410 Gone` and bookmarks; this module only keeps the index and decides what
//! an error means. Once started, nothing here is fatal: the API server may go away for a while
//! (upgrades, network trouble), and the pod log directory still names pods meanwhile.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{watcher, WatchStreamExt as _};

use crate::pods::PodMeta;

/// The annotation the kubelet puts on a static pod's mirror in the API: its value is the static
/// pod's own UID (a hash of its manifest), which is the UID its cgroups are named by.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// How long start-up waits for the first list before capture starts anyway (pods are then named
/// from the log directory until the list arrives).
const SYNC_WAIT: Duration = Duration::from_secs(5);
/// Watch errors are logged at most this often (a down API server fails every retry).
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Gone entries past their grace are swept at most this often (a sweep walks the whole index).
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
    #[error("--kube-api: reading the kubeconfig {path}")]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--kube-api: loading the kubeconfig")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    #[error("--kube-api: no in-cluster configuration (service-account token, CA, KUBERNETES_SERVICE_HOST/PORT); outside a pod pass --kubeconfig or set KUBECONFIG")]
    InCluster(#[source] kube::config::InClusterError),
    #[error("--kube-api: no usable configuration (KUBECONFIG, ~/.kube/config or in-cluster)")]
    Infer(#[source] kube::config::InferConfigError),
    #[error("--kube-api: building the API client")]
    Client(#[source] kube::Error),
}

/// What `--kube-api` needs (from the command line; see `RunArgs::kube_api_config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeApiConfig {
    /// A kubeconfig file; None: `KUBECONFIG` if set, else the in-cluster configuration.
    pub kubeconfig: Option<PathBuf>,
    /// Only pods bound to this node are watched.
    pub node_name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodIndexConfig {
    /// How long deleted pods (and replaced containers) are still answered, so that records
    /// written after a pod went away are still named. The same as the log directory's.
    pub grace: Duration,
    /// Pods kept at most, and containers kept at most; beyond, the longest-gone, then the least
    /// recently updated, are evicted (and counted).
    pub max_entries: usize,
}

impl Default for PodIndexConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(300),
            max_entries: 1 << 16,
        }
    }
}

#[derive(Debug)]
struct PodRecord {
    meta: PodMeta,
    /// The static pod UID this mirror pod stands for (cgroups carry that one, not the API's).
    mirror_of: Option<String>,
    /// Container ids of the pod as last seen.
    containers: Vec<String>,
    updated: Instant,
    gone_since: Option<Instant>,
    /// The list the pod was last seen in (to find pods deleted while the watch was down).
    listed_in: u64,
}

#[derive(Debug)]
struct ContainerRecord {
    name: String,
    updated: Instant,
    gone_since: Option<Instant>,
}

/// Gone entries go first (`false` < `true`), longest gone first, then the least recently updated.
type EvictionRank = (bool, Option<Instant>, Instant);

fn rank(gone_since: Option<Instant>, updated: Instant) -> EvictionRank {
    (gone_since.is_none(), gone_since, updated)
}

/// Pods of this node as the API server last described them.
#[derive(Debug)]
pub struct PodIndex {
    config: PodIndexConfig,
    /// By API UID.
    pods: HashMap<String, PodRecord>,
    /// Static pod UID (as in cgroups) -> API UID of its mirror pod.
    mirrors: HashMap<String, String>,
    containers: HashMap<String, ContainerRecord>,
    list_generation: u64,
    evictions: u64,
    last_sweep: Option<Instant>,
}

/// `containerd://<id>`, `cri-o://<id>`, `docker://<id>` -> `<id>` (the id cgroup paths carry).
pub fn strip_container_id(raw: &str) -> Option<String> {
    let id = raw.split_once("://").map_or(raw, |(_, id)| id).trim();
    (!id.is_empty()).then(|| id.to_ascii_lowercase())
}

/// Pod UIDs are compared in the canonical form cgroup paths are parsed into.
fn canonical_uid(uid: &str) -> String {
    uid.trim().to_ascii_lowercase().replace('_', "-")
}

impl PodIndex {
    pub fn new(config: PodIndexConfig) -> Self {
        Self {
            config,
            pods: HashMap::new(),
            mirrors: HashMap::new(),
            containers: HashMap::new(),
            list_generation: 0,
            evictions: 0,
            last_sweep: None,
        }
    }

    /// Pods plus containers held (live and within their grace).
    pub fn len(&self) -> usize {
        self.pods.len() + self.containers.len()
    }

    /// Entries dropped because the index was full.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// A pod was added or changed (or listed).
    pub fn apply(&mut self, pod: &Pod, now: Instant) {
        self.sweep_if_due(now);
        let meta = &pod.metadata;
        let (Some(uid), Some(name)) = (meta.uid.as_deref(), meta.name.as_deref()) else {
            return; // nothing to index by, or nothing to say
        };
        let uid = canonical_uid(uid);
        let mirror_of = meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(MIRROR_ANNOTATION))
            .map(|h| canonical_uid(h))
            .filter(|h| !h.is_empty());
        let containers = container_names(pod);
        let ids: Vec<String> = containers.iter().map(|(id, _)| id.clone()).collect();

        // Containers the pod no longer has (restarted: a new id) keep their name for the grace.
        if let Some(old) = self.pods.get(&uid) {
            for id in old.containers.iter().filter(|id| !ids.contains(id)) {
                if let Some(c) = self.containers.get_mut(id) {
                    c.gone_since.get_or_insert(now);
                }
            }
        }
        for (id, container) in containers {
            if !self.containers.contains_key(&id) {
                self.make_room_for_container(now);
            }
            self.containers.insert(
                id,
                ContainerRecord {
                    name: container,
                    updated: now,
                    gone_since: None,
                },
            );
        }
        if let Some(hash) = &mirror_of {
            self.mirrors.insert(hash.clone(), uid.clone());
        }
        if !self.pods.contains_key(&uid) {
            self.make_room_for_pod(now);
        }
        let record = PodRecord {
            meta: PodMeta {
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: name.to_owned(),
                // Records carry the UID the cgroup says; for a static pod that is the hash.
                uid: mirror_of.clone().unwrap_or_else(|| uid.clone()),
            },
            mirror_of,
            containers: ids,
            updated: now,
            gone_since: None,
            listed_in: self.list_generation,
        };
        self.pods.insert(uid, record);
    }

    /// A pod was deleted: it and its containers are still answered for the grace period.
    pub fn delete(&mut self, pod: &Pod, now: Instant) {
        let Some(uid) = pod.metadata.uid.as_deref().map(canonical_uid) else {
            return;
        };
        self.mark_gone(&uid, now);
        self.sweep_if_due(now);
    }

    /// A new list starts (the watcher started over): pods it does not list were deleted meanwhile.
    pub fn begin_list(&mut self) {
        self.list_generation += 1;
    }

    /// The list is complete: pods not in it are marked gone (their grace starts now).
    pub fn end_list(&mut self, now: Instant) {
        let unlisted: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| p.gone_since.is_none() && p.listed_in != self.list_generation)
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in unlisted {
            self.mark_gone(&uid, now);
        }
    }

    fn mark_gone(&mut self, uid: &str, now: Instant) {
        let Some(pod) = self.pods.get_mut(uid) else {
            return;
        };
        pod.gone_since.get_or_insert(now);
        for id in &pod.containers {
            if let Some(c) = self.containers.get_mut(id) {
                c.gone_since.get_or_insert(now);
            }
        }
    }

    fn alive(&self, gone_since: Option<Instant>, now: Instant) -> bool {
        gone_since.is_none_or(|t| now.saturating_duration_since(t) < self.config.grace)
    }

    /// Namespace and name of the pod whose cgroups carry `uid` (a static pod's hash included).
    pub fn lookup_pod_at(&self, uid: &str, now: Instant) -> Option<PodMeta> {
        let uid = canonical_uid(uid);
        // A mirror pod answers for its static pod; a pod of that UID in the API would be the
        // same pod, so either order is right.
        let record = self
            .pods
            .get(&uid)
            .or_else(|| self.mirrors.get(&uid).and_then(|api| self.pods.get(api)))?;
        self.alive(record.gone_since, now)
            .then(|| record.meta.clone())
    }

    pub fn container_name_at(&self, id: &str, now: Instant) -> Option<String> {
        let record = self.containers.get(&id.to_ascii_lowercase())?;
        self.alive(record.gone_since, now)
            .then(|| record.name.clone())
    }

    /// Drops entries gone for longer than the grace (lookups already ignore them; this frees them).
    fn sweep_if_due(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(now);
        let grace = self.config.grace;
        let expired =
            |gone: Option<Instant>| gone.is_some_and(|t| now.saturating_duration_since(t) >= grace);
        let dropped: Vec<String> = self
            .pods
            .iter()
            .filter(|(_, p)| expired(p.gone_since))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in dropped {
            self.remove_pod(&uid);
        }
        self.containers.retain(|_, c| !expired(c.gone_since));
    }

    fn remove_pod(&mut self, uid: &str) {
        if let Some(pod) = self.pods.remove(uid) {
            // The alias may point at a newer mirror of the same static pod by now.
            if let Some(hash) = pod.mirror_of {
                if self.mirrors.get(&hash).map(String::as_str) == Some(uid) {
                    self.mirrors.remove(&hash);
                }
            }
        }
    }

    fn make_room_for_pod(&mut self, now: Instant) {
        self.sweep_if_due(now);
        while self.pods.len() >= self.config.max_entries.max(1) {
            let Some(victim) = self
                .pods
                .iter()
                .min_by_key(|(_, p)| rank(p.gone_since, p.updated))
                .map(|(uid, _)| uid.clone())
            else {
                return;
            };
            self.remove_pod(&victim);
            self.evictions += 1;
        }
    }

    fn make_room_for_container(&mut self, now: Instant) {
        self.sweep_if_due(now);
        while self.containers.len() >= self.config.max_entries.max(1) {
            let Some(victim) = self
                .containers
                .iter()
                .min_by_key(|(_, c)| rank(c.gone_since, c.updated))
                .map(|(id, _)| id.clone())
            else {
                return;
            };
            self.containers.remove(&victim);
            self.evictions += 1;
        }
    }
}

/// (container id, container name) of every container the pod's status lists: regular, init and
/// ephemeral. Containers not started yet have no id and are left out.
fn container_names(pod: &Pod) -> Vec<(String, String)> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    [
        &status.container_statuses,
        &status.init_container_statuses,
        &status.ephemeral_container_statuses,
    ]
    .into_iter()
    .flatten()
    .flatten()
    .filter_map(|c| {
        let id = strip_container_id(c.container_id.as_deref()?)?;
        Some((id, c.name.clone()))
    })
    .collect()
}

/// The index, shared between the watcher task and the attributor (both on the daemon's one
/// runtime thread; the lock is never held across an await).
#[derive(Debug, Clone)]
pub struct PodIndexHandle(Arc<Mutex<PodIndex>>);

impl PodIndexHandle {
    pub fn new(index: PodIndex) -> Self {
        Self(Arc::new(Mutex::new(index)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PodIndex> {
        // The index holds no invariant a panic half-way could break badly: keep using it.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn lookup_pod(&self, uid: &str) -> Option<PodMeta> {
        self.lock().lookup_pod_at(uid, Instant::now())
    }

    pub fn container_name(&self, id: &str) -> Option<String> {
        self.lock().container_name_at(id, Instant::now())
    }
}

/// Says a repeated error once per interval, with how many were not said meanwhile.
#[derive(Debug, Default)]
struct RateLimitedLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// Some(number suppressed since the last one said) when this one is to be said.
    fn admit(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < interval)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

async fn client_config(config: &KubeApiConfig) -> Result<kube::Config, KubeApiError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};
    if let Some(path) = &config.kubeconfig {
        let kubeconfig =
            Kubeconfig::read_from(path).map_err(|source| KubeApiError::ReadKubeconfig {
                path: path.clone(),
                source,
            })?;
        return kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(KubeApiError::Kubeconfig);
    }
    // In a pod, the service account is what the DaemonSet was granted; KUBECONFIG set by hand
    // wins over it (testing from a workstation, or a node with its own credentials).
    if std::env::var_os("KUBECONFIG").is_none()
        && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
    {
        return kube::Config::incluster().map_err(KubeApiError::InCluster);
    }
    kube::Config::infer().await.map_err(KubeApiError::Infer)
}

/// Builds the client (failing here is fatal: the user asked for the API), starts the watcher
/// task, and waits a little for the first list so that the first records are named.
pub async fn start(config: KubeApiConfig) -> Result<PodIndexHandle, KubeApiError> {
    let client_config = client_config(&config).await?;
    let server = client_config.cluster_url.to_string();
    let client = kube::Client::try_from(client_config).map_err(KubeApiError::Client)?;
    let index = PodIndexHandle::new(PodIndex::new(PodIndexConfig::default()));
    let (synced_tx, mut synced_rx) = tokio::sync::watch::channel(false);
    tracing::info!(
        "--kube-api: watching the pods of node {} at {server}",
        config.node_name
    );
    tokio::spawn(watch_pods(
        client,
        config.node_name.clone(),
        index.clone(),
        synced_tx,
    ));
    let waited = tokio::time::timeout(SYNC_WAIT, synced_rx.wait_for(|synced| *synced)).await;
    if !matches!(waited, Ok(Ok(_))) {
        tracing::warn!(
            "--kube-api: no pod list from the API server within {SYNC_WAIT:?}; starting anyway \
             (pods are named from the log directories until it answers)"
        );
    }
    Ok(index)
}

/// Runs for the daemon's life: the watcher retries with backoff by itself, so errors are only
/// reported here.
async fn watch_pods(
    client: kube::Client,
    node_name: String,
    index: PodIndexHandle,
    synced: tokio::sync::watch::Sender<bool>,
) {
    let api: kube::Api<Pod> = kube::Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let mut errors = RateLimitedLog::default();
    let mut lists = 0u64;
    let mut evictions_log = RateLimitedLog::default();
    let mut reported_evictions = 0u64;
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event {
            Ok(watcher::Event::Init) => index.lock().begin_list(),
            Ok(watcher::Event::InitApply(pod) | watcher::Event::Apply(pod)) => {
                let evictions = {
                    let mut index = index.lock();
                    index.apply(&pod, now);
                    index.evictions()
                };
                // A node has far fewer pods than the bound: say so if it is ever reached.
                if evictions > reported_evictions
                    && evictions_log.admit(now, ERROR_LOG_INTERVAL).is_some()
                {
                    tracing::warn!(
                        "--kube-api: the pod index is full; {evictions} entries evicted so far"
                    );
                    reported_evictions = evictions;
                }
            }
            Ok(watcher::Event::Delete(pod)) => index.lock().delete(&pod, now),
            Ok(watcher::Event::InitDone) => {
                let len = {
                    let mut index = index.lock();
                    index.end_list(now);
                    index.len()
                };
                lists += 1;
                if lists == 1 {
                    tracing::info!("--kube-api: listed the pods of node {node_name} ({len} pods and containers known)");
                } else {
                    tracing::debug!("--kube-api: relisted the pods of node {node_name}");
                }
                synced.send_replace(true);
            }
            Err(err) => {
                if let Some(suppressed) = errors.admit(now, ERROR_LOG_INTERVAL) {
                    let more = if suppressed > 0 {
                        format!(" ({suppressed} more since the last report)")
                    } else {
                        String::new()
                    };
                    tracing::warn!(
                        "--kube-api: watching pods: {}{more}; retrying",
                        error_chain(&err)
                    );
                }
            }
        }
    }
    tracing::error!(
        "--kube-api: the pod watch ended; pods are named from the log directories only"
    );
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerStatus, PodStatus};
    use kube::api::ObjectMeta;

    const UID: &str = "0f3a6c1e-2b7d-4e8f-9a0b-1c2d3e4f5a6b";
    const UID2: &str = "1f3a6c1e-2b7d-4e8f-9a0b-1c2d3e4f5a6b";
    const HASH: &str = "6d1f1b5c0d2a4b3c8e9f0a1b2c3d4e5f";

    fn id(n: u8) -> String {
        format!("{:064x}", u64::from(n) + 0xabc0)
    }

    fn status(name: &str, container_id: Option<String>) -> ContainerStatus {
        ContainerStatus {
            name: name.to_owned(),
            container_id,
            ..ContainerStatus::default()
        }
    }

    fn pod(ns: &str, name: &str, uid: &str, containers: &[(&str, String)]) -> Pod {
        Pod {
            metadata: ObjectMeta {
                namespace: Some(ns.to_owned()),
                name: Some(name.to_owned()),
                uid: Some(uid.to_owned()),
                ..ObjectMeta::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(
                    containers
                        .iter()
                        .map(|(n, id)| status(n, Some(format!("containerd://{id}"))))
                        .collect(),
                ),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn index(grace_ms: u64, max: usize) -> PodIndex {
        PodIndex::new(PodIndexConfig {
            grace: ms(grace_ms),
            max_entries: max,
        })
    }

    #[test]
    fn container_id_prefixes() {
        let id = id(1);
        for raw in [
            format!("containerd://{id}"),
            format!("cri-o://{id}"),
            format!("docker://{id}"),
            id.clone(),
            id.to_uppercase(),
        ] {
            assert_eq!(
                strip_container_id(&raw).as_deref(),
                Some(id.as_str()),
                "{raw}"
            );
        }
        assert_eq!(strip_container_id("containerd://"), None);
        assert_eq!(strip_container_id(""), None);
    }

    #[test]
    fn add_update_and_lookup() {
        let mut ix = index(5_000, 100);
        let t0 = Instant::now();
        ix.apply(&pod("shop", "web-0", UID, &[("app", id(1))]), t0);
        let meta = ix.lookup_pod_at(UID, t0).unwrap();
        assert_eq!(
            (meta.namespace.as_str(), meta.name.as_str()),
            ("shop", "web-0")
        );
        assert_eq!(meta.uid, UID);
        // Underscored and upper-case spellings (systemd slices) find the same pod.
        assert!(ix.lookup_pod_at(&UID.replace('-', "_"), t0).is_some());
        assert!(ix.lookup_pod_at(&UID.to_uppercase(), t0).is_some());
        assert_eq!(ix.container_name_at(&id(1), t0).as_deref(), Some("app"));
        assert_eq!(ix.lookup_pod_at(UID2, t0), None);

        // Init and ephemeral containers are named too; the restarted container's old id stays
        // for the grace, then goes.
        let mut p = pod("shop", "web-0", UID, &[("app", id(2))]);
        let st = p.status.as_mut().unwrap();
        st.init_container_statuses = Some(vec![
            status_with("init", &format!("cri-o://{}", id(3))),
            status("not-started", None),
        ]);
        st.ephemeral_container_statuses =
            Some(vec![status_with("debug", &format!("docker://{}", id(4)))]);
        ix.apply(&p, t0 + ms(1_000));
        assert_eq!(
            ix.container_name_at(&id(2), t0 + ms(1_000)).as_deref(),
            Some("app")
        );
        assert_eq!(
            ix.container_name_at(&id(3), t0 + ms(1_000)).as_deref(),
            Some("init")
        );
        assert_eq!(
            ix.container_name_at(&id(4), t0 + ms(1_000)).as_deref(),
            Some("debug")
        );
        assert_eq!(
            ix.container_name_at(&id(1), t0 + ms(5_999)).as_deref(),
            Some("app")
        );
        assert_eq!(ix.container_name_at(&id(1), t0 + ms(6_000)), None);
        assert_eq!(
            ix.container_name_at(&id(2), t0 + ms(60_000)).as_deref(),
            Some("app")
        );
        assert_eq!(ix.len(), 5);
        ix.sweep_if_due(t0 + ms(60_000));
        assert_eq!(
            ix.len(),
            4,
            "the replaced container is swept after its grace"
        );
    }

    fn status_with(name: &str, container_id: &str) -> ContainerStatus {
        status(name, Some(container_id.to_owned()))
    }

    #[test]
    fn deleted_pods_are_kept_for_the_grace_period() {
        let mut ix = index(5_000, 100);
        let t0 = Instant::now();
        let p = pod("shop", "web-0", UID, &[("app", id(1))]);
        ix.apply(&p, t0);
        ix.delete(&p, t0 + ms(1_000));
        assert!(ix.lookup_pod_at(UID, t0 + ms(5_999)).is_some());
        assert!(ix.container_name_at(&id(1), t0 + ms(5_999)).is_some());
        assert_eq!(ix.lookup_pod_at(UID, t0 + ms(6_000)), None);
        assert_eq!(ix.container_name_at(&id(1), t0 + ms(6_000)), None);
        assert_eq!(ix.len(), 2, "not swept before the next change");
        // Any change later sweeps it.
        ix.apply(&pod("shop", "web-1", UID2, &[]), t0 + ms(7_000));
        assert_eq!(ix.len(), 1);
        assert_eq!(ix.evictions(), 0, "expiry is not eviction");
        // A pod re-added (the same UID seen again) is live again.
        ix.apply(&p, t0 + ms(8_000));
        assert!(ix.lookup_pod_at(UID, t0 + ms(60_000)).is_some());
    }

    #[test]
    fn a_relist_marks_unlisted_pods_gone() {
        let mut ix = index(5_000, 100);
        let t0 = Instant::now();
        ix.begin_list();
        ix.apply(&pod("a", "kept", UID, &[("app", id(1))]), t0);
        ix.apply(&pod("a", "deleted-meanwhile", UID2, &[("app", id(2))]), t0);
        ix.end_list(t0);
        // The watch broke and history was compacted: the watcher lists again.
        ix.begin_list();
        ix.apply(&pod("a", "kept", UID, &[("app", id(1))]), t0 + ms(1_000));
        ix.end_list(t0 + ms(1_000));
        assert!(ix.lookup_pod_at(UID2, t0 + ms(5_999)).is_some());
        assert_eq!(ix.lookup_pod_at(UID2, t0 + ms(6_000)), None);
        assert_eq!(ix.container_name_at(&id(2), t0 + ms(6_000)), None);
        assert!(ix.lookup_pod_at(UID, t0 + ms(60_000)).is_some());
    }

    #[test]
    fn mirror_pods_answer_for_their_static_pod() {
        let mut ix = index(5_000, 100);
        let t0 = Instant::now();
        let mut mirror = pod(
            "kube-system",
            "kube-apiserver-node1",
            UID,
            &[("kube-apiserver", id(1))],
        );
        mirror.metadata.annotations =
            Some([(MIRROR_ANNOTATION.to_owned(), HASH.to_owned())].into());
        ix.apply(&mirror, t0);
        let meta = ix.lookup_pod_at(HASH, t0).unwrap();
        assert_eq!(meta.name, "kube-apiserver-node1");
        assert_eq!(meta.uid, HASH, "records carry the UID the cgroups carry");
        assert_eq!(
            ix.container_name_at(&id(1), t0).as_deref(),
            Some("kube-apiserver")
        );

        // The kubelet recreates a deleted mirror pod: new API UID, same static pod.
        let mut again = mirror.clone();
        again.metadata.uid = Some(UID2.to_owned());
        ix.delete(&mirror, t0 + ms(1_000));
        ix.apply(&again, t0 + ms(1_000));
        ix.sweep_if_due(t0 + ms(10_000));
        assert_eq!(ix.lookup_pod_at(UID, t0 + ms(10_000)), None);
        assert_eq!(
            ix.lookup_pod_at(HASH, t0 + ms(10_000)).unwrap().name,
            "kube-apiserver-node1",
            "sweeping the old mirror keeps the new one's alias"
        );
    }

    #[test]
    fn bounded_with_evictions_counted() {
        let mut ix = index(5_000, 3);
        let t0 = Instant::now();
        let uids: Vec<String> = (0..5)
            .map(|i| format!("aaaaaaaa-bbbb-4ccc-8ddd-00000000000{i}"))
            .collect();
        for (i, uid) in uids.iter().enumerate() {
            let n = u8::try_from(i).unwrap();
            ix.apply(
                &pod("a", &format!("web-{i}"), uid, &[("app", id(n))]),
                t0 + ms(u64::from(n)),
            );
        }
        assert_eq!(ix.len(), 6, "three pods and three containers");
        assert_eq!(
            ix.evictions(),
            4,
            "the two oldest pods and their containers"
        );
        assert_eq!(ix.lookup_pod_at(&uids[0], t0), None);
        assert!(ix.lookup_pod_at(&uids[4], t0).is_some());

        // Gone entries go before live ones, however recently updated.
        let gone = pod("a", "web-2", &uids[2], &[("app", id(2))]);
        ix.delete(&gone, t0 + ms(10));
        ix.apply(&pod("a", "new", UID, &[("app", id(9))]), t0 + ms(20));
        assert_eq!(ix.lookup_pod_at(&uids[2], t0 + ms(20)), None);
        assert_eq!(ix.container_name_at(&id(2), t0 + ms(20)), None);
        assert!(ix.lookup_pod_at(&uids[3], t0 + ms(20)).is_some());
        assert!(ix.lookup_pod_at(UID, t0 + ms(20)).is_some());
        assert_eq!(ix.evictions(), 6);
    }

    #[test]
    fn pods_without_uid_or_name_are_skipped() {
        let mut ix = index(5_000, 100);
        let mut p = pod("a", "x", UID, &[]);
        p.metadata.uid = None;
        ix.apply(&p, Instant::now());
        ix.delete(&p, Instant::now());
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn errors_are_rate_limited() {
        let mut log = RateLimitedLog::default();
        let t0 = Instant::now();
        assert_eq!(log.admit(t0, ms(1_000)), Some(0));
        assert_eq!(log.admit(t0 + ms(10), ms(1_000)), None);
        assert_eq!(log.admit(t0 + ms(999), ms(1_000)), None);
        assert_eq!(log.admit(t0 + ms(1_000), ms(1_000)), Some(2));
        assert_eq!(log.admit(t0 + ms(3_000), ms(1_000)), Some(0));
    }

    #[tokio::test]
    async fn a_bad_kubeconfig_is_an_error_naming_the_flag() {
        let err = start(KubeApiConfig {
            kubeconfig: Some(PathBuf::from("/nonexistent/kubeconfig")),
            node_name: "node1".into(),
        })
        .await
        .unwrap_err();
        let text = error_chain(&err);
        assert!(text.contains("--kube-api"), "{text}");
        assert!(text.contains("/nonexistent/kubeconfig"), "{text}");
    }
}
