//! Prometheus metrics of finished queries, lookups and drops, and the HTTP endpoint that serves
//! them (`--metrics-addr`).
//!
//! Every label set is bounded, since a node can run thousands of short-lived pods and a client
//! can ask for any name and type:
//! - `namespace`/`pod`: at most `max_pods` pods get series of their own; the rest share
//!   `pod="_other"` in their namespace. Series of a pod not seen for `idle` are removed, so a
//!   node's pod churn does not accumulate. A process outside any pod has `namespace=""` and
//!   `pod=""` (Prometheus treats an empty label as absent, so `{pod=""}` selects host traffic and
//!   cannot collide with a real pod name).
//! - `qtype`: types hickory knows by name, else `other`; `rcode`: the 24 assigned codes, else
//!   `other`; `server`: at most `max_servers` addresses, else `_other`.
//! - `qname` only with `top_names > 0`, in separate families: the busiest names of the previous
//!   window get series of their own, every other name counts as `qname="_other"`.
//!
//! Per query the sink does a few hash look-ups on keys it already has (pod UID, server address,
//! type) and reaches the series through cached handles: label strings are built only when a
//! series is created.

use std::{
    borrow::Cow,
    collections::{hash_map::Entry, HashSet},
    fmt,
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt as _};
use hickory_proto::rr::RecordType;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        histogram::Histogram,
        MetricType,
    },
    registry::{Registry, Unit},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpListener,
    sync::Semaphore,
};

use crate::{
    attribute::Workload,
    capture::KernelStats,
    correlate::{DropRecord, DroppedPacket, FinishedQuery, Outcome},
    decode::{qtype_name, rcode_name},
    lookup::{LateArrival, LookupRecord},
    pipeline::{Pipeline, Sink},
};

/// Query duration bucket bounds in seconds: a node-local cache answers in well under a
/// millisecond, cluster DNS in a few, upstreams in tens to hundreds; resolvers retry after 1-5 s,
/// so the top buckets separate retried and timed-out lookups.
const DURATION_BUCKETS: [f64; 15] = [
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Label value of the series that collects what is over a cap.
const OTHER: &str = "_other";
/// Namespaces whose overflow pods keep their namespace label; beyond this they share
/// `namespace="_other"` too, so the overflow itself stays bounded.
const MAX_OVERFLOW_NAMESPACES: usize = 64;
/// Distinct drop (reason, kind, packet) series; kernel reasons are an enum of about a hundred.
const MAX_DROP_SERIES: usize = 256;
/// How often idle pods and servers are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Names counted per window to find the busiest, per name shown.
const NAME_CANDIDATES_PER_SLOT: usize = 10;
const MIN_NAME_CANDIDATES: usize = 1024;

/// An HTTP request head larger than this is refused (a scrape's is a few hundred bytes).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Scrapes served at once; further connections wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// What the OpenMetrics text encoder produces; Prometheus accepts it for every scrape protocol.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("listening on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("reading the listening address")]
    LocalAddr(#[source] io::Error),
    #[error("encoding metrics")]
    Encode(#[source] fmt::Error),
    #[error("metrics connection")]
    Connection(#[source] io::Error),
    #[error("metrics connection timed out")]
    Timeout,
}

/// Limits of the label sets.
#[derive(Debug, Clone)]
pub struct MetricsConfig {
    /// Pods with series of their own; later ones count as `pod="_other"`.
    pub max_pods: usize,
    /// DNS server addresses with series of their own; later ones count as `server="_other"`.
    pub max_servers: usize,
    /// Series of a pod or server are removed once it has sent nothing for this long.
    pub idle: Duration,
    /// Names with a `qname` series of their own; 0 leaves the qname families out.
    pub top_names: usize,
    /// The busiest names of one window of this length are the named series of the next.
    pub name_window: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_pods: 1000,
            max_servers: 64,
            idle: Duration::from_secs(600),
            top_names: 0,
            name_window: Duration::from_secs(60),
        }
    }
}

/// Totals kept by the kernel programs and the pipeline, handed over by the run loop.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct InternalStats {
    /// DNS events lost because the ring buffer was full (`KernelStats::ringbuf_full`).
    pub lost_events: u64,
    /// Drop events lost because the drop ring buffer was full
    /// (`KernelStats::drop_ringbuf_full`).
    pub lost_drop_events: u64,
    /// Pending queries evicted to stay under `--max-inflight` (`TrackerStats::evicted`).
    pub evicted_queries: u64,
    /// Open lookups closed early to stay under the cap (`LookupStats::evicted`).
    pub evicted_lookups: u64,
    /// Ring records that did not decode as DNS (`PipelineStats::malformed`).
    pub malformed_messages: u64,
    /// DNS-port packets whose headers the kernel could not read (`KernelStats::unparseable`).
    pub unparseable_packets: u64,
    /// Responses that came after their query ended (`PipelineStats::late_arrivals`).
    pub late_responses: u64,
}

impl InternalStats {
    /// The totals as the pipeline and the kernel programs keep them.
    pub fn collect(pipeline: &Pipeline, kernel: &KernelStats) -> Self {
        Self {
            lost_events: kernel.ringbuf_full,
            lost_drop_events: kernel.drop_ringbuf_full,
            evicted_queries: pipeline.tracker.stats().evicted,
            evicted_lookups: pipeline.lookups.stats().evicted,
            malformed_messages: pipeline.stats.malformed,
            unparseable_packets: kernel.unparseable,
            late_responses: pipeline.stats.late_arrivals,
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SeriesLabels {
    namespace: String,
    pod: String,
    qtype: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    namespace: String,
    pod: String,
    qtype: String,
    rcode: String,
    server: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: String,
    kind: String,
    packet: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DiagnosisLabels {
    diagnosis: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NameLabels {
    qname: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// The registered families; the registry holds clones sharing the same series.
struct Families {
    duration: HistogramFamily<DurationLabels>,
    queries: Family<SeriesLabels, Counter>,
    unanswered: Family<SeriesLabels, Counter>,
    resends: Family<PodLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    lookups: Family<DiagnosisLabels, Counter>,
    name_queries: Family<NameLabels, Counter>,
    name_duration: HistogramFamily<NameLabels>,
}

impl Families {
    fn new() -> Self {
        Self {
            duration: Family::new_with_constructor(duration_histogram),
            queries: Family::default(),
            unanswered: Family::default(),
            resends: Family::default(),
            drops: Family::default(),
            lookups: Family::default(),
            name_queries: Family::default(),
            name_duration: Family::new_with_constructor(duration_histogram),
        }
    }

    fn register(&self, registry: &mut Registry, with_names: bool) {
        registry.register_with_unit(
            "query_duration",
            "Time from a query's first send to its response, of answered queries",
            Unit::Seconds,
            self.duration.clone(),
        );
        registry.register(
            "queries",
            "Finished queries (answered or not); evicted ones are counted in dnsprobe_evicted_total",
            self.queries.clone(),
        );
        registry.register(
            "unanswered_queries",
            "Queries that timed out without a response, including those with a kernel drop",
            self.unanswered.clone(),
        );
        registry.register(
            "resends",
            "Sends of a query after its first one (client retries on the same socket)",
            self.resends.clone(),
        );
        registry.register(
            "dropped_packets",
            "DNS packets the kernel dropped, by drop reason and what dnsprobe concluded",
            self.drops.clone(),
        );
        registry.register(
            "lookups",
            "Finished lookups, once per diagnosis code they got (\"none\" for a healthy lookup)",
            self.lookups.clone(),
        );
        if with_names {
            registry.register(
                "name_queries",
                "Finished queries by name, for the busiest names of the previous window",
                self.name_queries.clone(),
            );
            registry.register_with_unit(
                "name_query_duration",
                "Time to a response of answered queries, for the busiest names of the previous window",
                Unit::Seconds,
                self.name_duration.clone(),
            );
        }
    }
}

/// What the scrape side needs: the registry and the totals the run loop hands over.
#[derive(Clone, Debug)]
pub struct MetricsHandle {
    registry: Arc<Registry>,
    internal: Arc<Mutex<InternalStats>>,
}

impl MetricsHandle {
    /// Stores the latest kernel and pipeline totals; scrapes report them as counters.
    pub fn set_internal(&self, stats: InternalStats) {
        *self.internal.lock().unwrap_or_else(PoisonError::into_inner) = stats;
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .map_err(MetricsError::Encode)?;
        Ok(out)
    }
}

/// Reports the totals of `InternalStats` at scrape time: they are absolute counts kept
/// elsewhere, so reporting them as they are is exact, where replaying deltas into a `Counter`
/// would need state of its own.
#[derive(Debug)]
struct InternalCollector(Arc<Mutex<InternalStats>>);

impl Collector for InternalCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let s = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        encode_counters(
            &mut encoder,
            "ringbuf_lost_events",
            "Events lost because a kernel ring buffer was full.",
            Some("ring"),
            &[("dns", s.lost_events), ("drops", s.lost_drop_events)],
        )?;
        encode_counters(
            &mut encoder,
            "evicted",
            "Pending queries and open lookups dropped to stay under their caps.",
            Some("state"),
            &[("query", s.evicted_queries), ("lookup", s.evicted_lookups)],
        )?;
        encode_counters(
            &mut encoder,
            "malformed_messages",
            "Captured DNS messages that could not be decoded.",
            None,
            &[("", s.malformed_messages)],
        )?;
        encode_counters(
            &mut encoder,
            "unparseable_packets",
            "DNS-port packets whose headers the kernel program could not read.",
            None,
            &[("", s.unparseable_packets)],
        )?;
        encode_counters(
            &mut encoder,
            "late_responses",
            "Responses that arrived after their query ended (after its timeout, or duplicates).",
            None,
            &[("", s.late_responses)],
        )
    }
}

/// One counter metric: unlabelled when `label` is `None` (then only the first value counts).
fn encode_counters(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: Option<&'static str>,
    values: &[(&'static str, u64)],
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    match label {
        None => {
            let value = values.first().map(|(_, v)| *v).unwrap_or_default();
            ConstCounter::new(value).encode(metric)
        }
        Some(label) => {
            for (label_value, value) in values {
                let labels = [(label, *label_value)];
                let family = metric.encode_family(&labels)?;
                ConstCounter::new(*value).encode(family)?;
            }
            Ok(())
        }
    }
}

type Id = u64;

/// Where a pod's series go.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PodKey {
    Uid(String),
    Overflow(String),
    Host,
}

struct PodEntry {
    key: PodKey,
    labels: PodLabels,
    /// Whether the labels carry the pod's name (not yet known for a pod that just started).
    named: bool,
    last_epoch: u64,
    resends: Counter,
}

/// Pods by UID, capped; ids are never reused, so a cached series never outlives its pod's id.
struct PodTable {
    by_uid: HashMap<String, Id>,
    overflow: HashMap<String, Id>,
    host: Option<Id>,
    entries: HashMap<Id, PodEntry>,
    next_id: Id,
    max_pods: usize,
}

impl PodTable {
    fn new(max_pods: usize) -> Self {
        Self {
            by_uid: HashMap::new(),
            overflow: HashMap::new(),
            host: None,
            entries: HashMap::new(),
            next_id: 0,
            max_pods,
        }
    }

    /// The pod's entry id, or `Err(stale)` when its entry must be relabelled first (its name
    /// became known since the series were made).
    fn find(&mut self, workload: Option<&Workload>, epoch: u64) -> Result<Option<Id>, Id> {
        let id = match workload.and_then(|w| w.pod.as_ref()) {
            None => self.host,
            Some(pod) => match self.by_uid.get(pod.uid.as_str()) {
                Some(&id) => {
                    if pod.name.is_some() && self.entries.get(&id).is_some_and(|e| !e.named) {
                        return Err(id);
                    }
                    Some(id)
                }
                None if self.by_uid.len() >= self.max_pods => {
                    let ns = pod.namespace.as_deref().unwrap_or_default();
                    match self.overflow.get(ns) {
                        Some(&id) => Some(id),
                        // The last overflow place is `_other`'s (see `create`).
                        None if self.overflow_full() => self.overflow.get(OTHER).copied(),
                        None => None,
                    }
                }
                None => None,
            },
        };
        if let Some(entry) = id.and_then(|id| self.entries.get_mut(&id)) {
            entry.last_epoch = epoch;
        }
        Ok(id)
    }

    fn create(&mut self, workload: Option<&Workload>, epoch: u64, families: &Families) -> Id {
        let (key, labels, named) = match workload.and_then(|w| w.pod.as_ref()) {
            None => (
                PodKey::Host,
                PodLabels {
                    namespace: String::new(),
                    pod: String::new(),
                },
                true,
            ),
            Some(pod) if self.by_uid.len() < self.max_pods => (
                PodKey::Uid(pod.uid.clone()),
                PodLabels {
                    namespace: pod.namespace.clone().unwrap_or_default(),
                    // The UID stands in until the kubelet's directories name the pod.
                    pod: pod.name.clone().unwrap_or_else(|| pod.uid.clone()),
                },
                pod.name.is_some(),
            ),
            Some(pod) => {
                let ns = if self.overflow_full() {
                    OTHER.to_owned()
                } else {
                    pod.namespace.clone().unwrap_or_default()
                };
                (
                    PodKey::Overflow(ns.clone()),
                    PodLabels {
                        namespace: ns,
                        pod: OTHER.to_owned(),
                    },
                    true,
                )
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        match &key {
            PodKey::Uid(uid) => {
                self.by_uid.insert(uid.clone(), id);
            }
            PodKey::Overflow(ns) => {
                self.overflow.insert(ns.clone(), id);
            }
            PodKey::Host => self.host = Some(id),
        }
        let resends = families.resends.get_or_create_owned(&labels);
        self.entries.insert(
            id,
            PodEntry {
                key,
                labels,
                named,
                last_epoch: epoch,
                resends,
            },
        );
        id
    }

    /// Whether only `_other`'s place is left among the overflow namespaces.
    fn overflow_full(&self) -> bool {
        self.overflow.len() + 1 >= MAX_OVERFLOW_NAMESPACES
    }

    fn remove(&mut self, id: Id, families: &Families) {
        let Some(entry) = self.entries.remove(&id) else {
            return;
        };
        match &entry.key {
            PodKey::Uid(uid) => {
                self.by_uid.remove(uid);
            }
            PodKey::Overflow(ns) => {
                self.overflow.remove(ns);
            }
            PodKey::Host => self.host = None,
        }
        families.resends.remove(&entry.labels);
    }
}

struct ServerEntry {
    label: String,
    last_epoch: u64,
}

/// DNS server addresses, capped like pods.
struct ServerTable {
    by_addr: HashMap<SocketAddr, Id>,
    overflow: Option<Id>,
    entries: HashMap<Id, ServerEntry>,
    next_id: Id,
    max_servers: usize,
}

impl ServerTable {
    fn new(max_servers: usize) -> Self {
        Self {
            by_addr: HashMap::new(),
            overflow: None,
            entries: HashMap::new(),
            next_id: 0,
            max_servers,
        }
    }

    fn get(&mut self, addr: SocketAddr, epoch: u64) -> Id {
        let existing = match self.by_addr.get(&addr) {
            Some(&id) => Some(id),
            None if self.by_addr.len() >= self.max_servers => self.overflow,
            None => None,
        };
        let id = match existing {
            Some(id) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let label = if self.by_addr.len() >= self.max_servers {
                    self.overflow = Some(id);
                    OTHER.to_owned()
                } else {
                    self.by_addr.insert(addr, id);
                    addr.to_string()
                };
                self.entries.insert(
                    id,
                    ServerEntry {
                        label,
                        last_epoch: epoch,
                    },
                );
                id
            }
        };
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.last_epoch = epoch;
        }
        id
    }

    fn remove(&mut self, id: Id) {
        self.entries.remove(&id);
        self.by_addr.retain(|_, v| *v != id);
        if self.overflow == Some(id) {
            self.overflow = None;
        }
    }
}

/// A query type as a series key: `None` for types without a mnemonic (any of 65536 values).
type QtypeKey = Option<u16>;

fn qtype_key(qtype: u16) -> QtypeKey {
    match RecordType::from(qtype) {
        RecordType::Unknown(_) => None,
        _ => Some(qtype),
    }
}

fn qtype_label(key: QtypeKey) -> String {
    key.map(qtype_name).unwrap_or_else(|| "other".to_owned())
}

/// Response codes past the assigned ones (extended RCODEs of up to 12 bits) share one series.
fn rcode_key(rcode: Option<u16>) -> Option<u16> {
    rcode.filter(|r| *r <= 23)
}

fn rcode_label(key: Option<u16>) -> String {
    key.map(rcode_name).unwrap_or_else(|| "other".to_owned())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SeriesKey {
    pod: Id,
    qtype: QtypeKey,
    server: Id,
}

/// Cached handles of one (pod, type, server) and the labels to remove them by.
struct Series {
    labels: SeriesLabels,
    queries: Counter,
    unanswered: Counter,
    /// By response code; a handful at most, so a list beats a map.
    durations: Vec<(Option<u16>, DurationLabels, Histogram)>,
}

struct NameSeries {
    labels: NameLabels,
    queries: Counter,
    duration: Histogram,
}

impl NameSeries {
    fn new(name: &str, families: &Families) -> Self {
        let labels = NameLabels {
            qname: name.to_owned(),
        };
        Self {
            queries: families.name_queries.get_or_create_owned(&labels),
            duration: families.name_duration.get_or_create_owned(&labels),
            labels,
        }
    }

    fn remove(&self, families: &Families) {
        families.name_queries.remove(&self.labels);
        families.name_duration.remove(&self.labels);
    }
}

/// The bounded top-N of names. Counting uses the Misra-Gries summary: with `capacity`
/// counters, any name with more than 1/(capacity+1) of the window's queries is kept, in
/// amortised constant time and bounded memory even under a flood of random names.
struct NameTop {
    slots: usize,
    capacity: usize,
    window: Duration,
    window_start: Instant,
    counts: HashMap<String, u64>,
    named: HashMap<String, NameSeries>,
    other: NameSeries,
}

impl NameTop {
    fn new(slots: usize, window: Duration, now: Instant, families: &Families) -> Self {
        Self {
            slots,
            capacity: (slots * NAME_CANDIDATES_PER_SLOT).max(MIN_NAME_CANDIDATES),
            window,
            window_start: now,
            counts: HashMap::new(),
            named: HashMap::new(),
            other: NameSeries::new(OTHER, families),
        }
    }

    fn observe(&mut self, qname: &str, latency_s: Option<f64>, families: &Families) {
        // Resolvers mostly send lower case already: copy only when they did not.
        let name: Cow<'_, str> = if qname.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(qname.to_ascii_lowercase())
        } else {
            Cow::Borrowed(qname)
        };
        if let Some(count) = self.counts.get_mut(name.as_ref()) {
            *count += 1;
        } else if self.counts.len() < self.capacity {
            self.counts.insert(name.clone().into_owned(), 1);
        } else {
            self.counts.retain(|_, c| {
                *c -= 1;
                *c > 0
            });
        }
        // Free slots are filled as names come, so a fresh start shows names before the first
        // window ends.
        if !self.named.contains_key(name.as_ref()) && self.named.len() < self.slots {
            let owned = name.clone().into_owned();
            let series = NameSeries::new(&owned, families);
            self.named.insert(owned, series);
        }
        let series = self.named.get(name.as_ref()).unwrap_or(&self.other);
        series.queries.inc();
        if let Some(latency) = latency_s {
            series.duration.observe(latency);
        }
    }

    /// At a window's end its busiest names become the named series; the others' are removed.
    fn rotate_if_due(&mut self, now: Instant, families: &Families) {
        if now.saturating_duration_since(self.window_start) < self.window {
            return;
        }
        self.window_start = now;
        let mut ranked: Vec<(String, u64)> = self.counts.drain().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        ranked.truncate(self.slots);
        let keep: HashSet<&str> = ranked.iter().map(|(n, _)| n.as_str()).collect();
        self.named.retain(|name, series| {
            let kept = keep.contains(name.as_str());
            if !kept {
                series.remove(families);
            }
            kept
        });
        for (name, _) in ranked {
            self.named
                .entry(name)
                .or_insert_with_key(|name| NameSeries::new(name, families));
        }
    }
}

/// The metrics sink. Give the pipeline this, and `handle()` to the HTTP server and the run loop
/// (which hands it `InternalStats` through `MetricsHandle::set_internal`).
pub struct Metrics {
    families: Families,
    handle: MetricsHandle,
    pods: PodTable,
    servers: ServerTable,
    series: HashMap<SeriesKey, Series>,
    drops: Vec<(DropLabels, Counter)>,
    lookups: HashMap<&'static str, Counter>,
    names: Option<NameTop>,
    /// Advances at each sweep; entries remember the epoch they were last used in.
    epoch: u64,
    idle_epochs: u64,
    last_sweep: Instant,
}

impl Metrics {
    pub fn new(cfg: &MetricsConfig) -> Self {
        let now = Instant::now();
        let families = Families::new();
        let mut registry = Registry::with_prefix("dnsprobe");
        families.register(&mut registry, cfg.top_names > 0);
        let internal = Arc::new(Mutex::new(InternalStats::default()));
        registry.register_collector(Box::new(InternalCollector(internal.clone())));
        let names = (cfg.top_names > 0)
            .then(|| NameTop::new(cfg.top_names, cfg.name_window, now, &families));
        Self {
            handle: MetricsHandle {
                registry: Arc::new(registry),
                internal,
            },
            pods: PodTable::new(cfg.max_pods.max(1)),
            servers: ServerTable::new(cfg.max_servers.max(1)),
            series: HashMap::new(),
            drops: Vec::new(),
            lookups: HashMap::new(),
            names,
            epoch: 0,
            idle_epochs: cfg.idle.as_secs().div_ceil(SWEEP_EVERY.as_secs()).max(1),
            last_sweep: now,
            families,
        }
    }

    /// The scrape side; clones share everything.
    pub fn handle(&self) -> MetricsHandle {
        self.handle.clone()
    }

    fn pod_id(&mut self, workload: Option<&Workload>) -> Id {
        match self.pods.find(workload, self.epoch) {
            Ok(Some(id)) => id,
            Ok(None) => self.pods.create(workload, self.epoch, &self.families),
            Err(stale) => {
                self.remove_pods_and_servers(&HashSet::from([stale]), &HashSet::new());
                self.pods.create(workload, self.epoch, &self.families)
            }
        }
    }

    fn count_drop(&mut self, drop: &DropRecord) {
        let packet = match drop.packet {
            DroppedPacket::Query => "query",
            DroppedPacket::Response => "response",
        };
        let found = self
            .drops
            .iter()
            .find(|(l, _)| l.packet == packet && l.reason == drop.reason && l.kind == drop.kind);
        let counter = match found {
            Some((_, counter)) => counter.clone(),
            None => {
                let labels = if self.drops.len() < MAX_DROP_SERIES {
                    DropLabels {
                        reason: drop.reason.clone(),
                        kind: drop.kind.clone(),
                        packet,
                    }
                } else {
                    DropLabels {
                        reason: OTHER.to_owned(),
                        kind: OTHER.to_owned(),
                        packet,
                    }
                };
                let counter = self.families.drops.get_or_create_owned(&labels);
                if !self.drops.iter().any(|(l, _)| *l == labels) {
                    self.drops.push((labels, counter.clone()));
                }
                counter
            }
        };
        counter.inc();
    }

    fn count_diagnosis(&mut self, code: &'static str) {
        let families = &self.families;
        self.lookups
            .entry(code)
            .or_insert_with(|| {
                families
                    .lookups
                    .get_or_create_owned(&DiagnosisLabels { diagnosis: code })
            })
            .inc();
    }

    /// Removes the series of pods and servers idle for longer than `idle`, and rotates the
    /// name window. Cheap when nothing is due: called at every flush.
    fn housekeeping(&mut self, now: Instant) {
        if let Some(names) = &mut self.names {
            names.rotate_if_due(now, &self.families);
        }
        if now.saturating_duration_since(self.last_sweep) >= SWEEP_EVERY {
            self.last_sweep = now;
            self.sweep();
        }
    }

    fn sweep(&mut self) {
        self.epoch += 1;
        let idle = |last: u64| self.epoch.saturating_sub(last) > self.idle_epochs;
        let pods: HashSet<Id> = self
            .pods
            .entries
            .iter()
            .filter(|(_, e)| idle(e.last_epoch))
            .map(|(id, _)| *id)
            .collect();
        let servers: HashSet<Id> = self
            .servers
            .entries
            .iter()
            .filter(|(_, e)| idle(e.last_epoch))
            .map(|(id, _)| *id)
            .collect();
        self.remove_pods_and_servers(&pods, &servers);
    }

    fn remove_pods_and_servers(&mut self, pods: &HashSet<Id>, servers: &HashSet<Id>) {
        if pods.is_empty() && servers.is_empty() {
            return;
        }
        let families = &self.families;
        self.series.retain(|key, series| {
            let keep = !pods.contains(&key.pod) && !servers.contains(&key.server);
            if !keep {
                families.queries.remove(&series.labels);
                families.unanswered.remove(&series.labels);
                for (_, labels, _) in &series.durations {
                    families.duration.remove(labels);
                }
            }
            keep
        });
        for id in pods {
            self.pods.remove(*id, &self.families);
        }
        for id in servers {
            self.servers.remove(*id);
        }
    }
}

impl Sink for Metrics {
    fn query(&mut self, q: &FinishedQuery) {
        let pod = self.pod_id(q.sender.names.workload.as_deref());
        let server = self.servers.get(q.server, self.epoch);
        let key = SeriesKey {
            pod,
            qtype: qtype_key(q.qtype),
            server,
        };
        let series = match self.series.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                let pod_labels = self.pods.entries.get(&pod).map(|p| &p.labels);
                let labels = SeriesLabels {
                    namespace: pod_labels.map(|l| l.namespace.clone()).unwrap_or_default(),
                    pod: pod_labels.map(|l| l.pod.clone()).unwrap_or_default(),
                    qtype: qtype_label(key.qtype),
                    server: self
                        .servers
                        .entries
                        .get(&server)
                        .map(|s| s.label.clone())
                        .unwrap_or_default(),
                };
                e.insert(Series {
                    queries: self.families.queries.get_or_create_owned(&labels),
                    unanswered: self.families.unanswered.get_or_create_owned(&labels),
                    labels,
                    durations: Vec::new(),
                })
            }
        };
        series.queries.inc();
        let latency_s = match q.outcome {
            Outcome::Answered => q.latency_ns().map(|ns| ns as f64 / 1e9),
            Outcome::Unanswered | Outcome::Dropped => {
                series.unanswered.inc();
                None
            }
        };
        if let Some(latency) = latency_s {
            let rcode = rcode_key(q.rcode);
            let index = match series.durations.iter().position(|(r, _, _)| *r == rcode) {
                Some(index) => index,
                None => {
                    let l = &series.labels;
                    let labels = DurationLabels {
                        namespace: l.namespace.clone(),
                        pod: l.pod.clone(),
                        qtype: l.qtype.clone(),
                        rcode: rcode_label(rcode),
                        server: l.server.clone(),
                    };
                    let h = self.families.duration.get_or_create_owned(&labels);
                    series.durations.push((rcode, labels, h));
                    series.durations.len() - 1
                }
            };
            series.durations[index].2.observe(latency);
        }
        let resends = q.send_ts_ns.len().saturating_sub(1) as u64;
        if resends > 0 {
            if let Some(entry) = self.pods.entries.get(&pod) {
                entry.resends.inc_by(resends);
            }
        }
        for drop in &q.drops {
            self.count_drop(drop);
        }
        if let Some(names) = &mut self.names {
            names.observe(&q.qname, latency_s, &self.families);
        }
    }

    fn lookup(&mut self, lookup: &LookupRecord) {
        if lookup.diagnosis.is_empty() {
            self.count_diagnosis("none");
        }
        for diagnosis in &lookup.diagnosis {
            self.count_diagnosis(diagnosis.code);
        }
    }

    fn packet_drop(&mut self, drop: &DropRecord) {
        self.count_drop(drop);
    }

    /// Nothing here: the pipeline hands sinks only late responses no lookup took, so
    /// counting them would undercount. `InternalStats::late_responses` has them all.
    fn late(&mut self, _late: &LateArrival) {}

    fn flush(&mut self) {
        self.housekeeping(Instant::now());
    }
}

/// Parses `--metrics-addr`: a port alone (`9153` or `:9153`) listens on loopback only, so the
/// endpoint is not exposed unless an address is given (`0.0.0.0:9153`, `[::]:9153`).
pub fn parse_metrics_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let port_only = s.strip_prefix(':').unwrap_or(s);
    let addr = if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
        let port = port_only
            .parse::<u16>()
            .map_err(|_| format!("port `{port_only}` is out of range (1-65535)"))?;
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)
    } else {
        s.parse::<SocketAddr>().map_err(|_| {
            format!(
                "`{s}` is not a port or an IP address with a port \
                 (9153, 127.0.0.1:9153, 0.0.0.0:9153, [::1]:9153)"
            )
        })?
    };
    if addr.port() == 0 {
        return Err("port 0 is not a fixed port; Prometheus needs one to scrape".into());
    }
    Ok(addr)
}

/// The bound `/metrics` listener.
pub struct MetricsServer {
    listener: TcpListener,
    read_timeout: Duration,
}

impl MetricsServer {
    /// Binds now, so that a busy or forbidden address fails at start-up.
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Self {
            listener,
            read_timeout: READ_TIMEOUT,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        self.listener.local_addr().map_err(MetricsError::LocalAddr)
    }

    /// Serves scrapes until `shutdown` completes. Each connection is its own task, so a slow
    /// scraper holds up no other; at most `MAX_CONNECTIONS` are served at once.
    pub async fn run(
        self,
        handle: MetricsHandle,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), MetricsError> {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let read_timeout = self.read_timeout;
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                permit = limit.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => return Ok(()),
                },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, say: the next accept may work once
                        // connections close, so back off instead of giving up.
                        tracing::warn!("metrics endpoint: accepting a connection: {err}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let handle = handle.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(err) = handle_connection(stream, &handle, read_timeout).await {
                    tracing::debug!("metrics endpoint: {peer}: {err}");
                }
            });
        }
    }
}

/// One request, one response, then the connection closes: Prometheus needs nothing more, and
/// no keep-alive state means nothing to bound.
async fn handle_connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    handle: &MetricsHandle,
    read_timeout: Duration,
) -> Result<(), MetricsError> {
    let head = tokio::time::timeout(read_timeout, read_head(&mut stream))
        .await
        .map_err(|_| MetricsError::Timeout)?
        .map_err(MetricsError::Connection)?;
    let response = respond(head.as_deref(), handle);
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| MetricsError::Timeout)?
    .map_err(MetricsError::Connection)
}

/// Reads up to the end of the request head; `None` when it is larger than `MAX_REQUEST_HEAD`.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut len = 0;
    loop {
        if len == buf.len() {
            return Ok(None);
        }
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            buf.truncate(len);
            return Ok(Some(buf));
        }
        // Look again only where the new bytes could complete the blank line.
        let from = len.saturating_sub(3);
        len += n;
        if buf[from..len].windows(4).any(|w| w == b"\r\n\r\n") {
            buf.truncate(len);
            return Ok(Some(buf));
        }
    }
}

fn respond(head: Option<&[u8]>, handle: &MetricsHandle) -> Vec<u8> {
    let Some(head) = head else {
        return response(
            "431 Request Header Fields Too Large",
            "text/plain",
            b"",
            true,
        );
    };
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .unwrap_or_default()
        .strip_suffix(b"\r")
        .unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return response("400 Bad Request", "text/plain", b"bad request\n", true);
    };
    if !version.starts_with(b"HTTP/1.") {
        return response("400 Bad Request", "text/plain", b"bad request\n", true);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let with_body = match method {
        b"GET" => true,
        b"HEAD" => false,
        _ => {
            return response(
                "405 Method Not Allowed\r\nAllow: GET, HEAD",
                "text/plain",
                b"only GET and HEAD\n",
                true,
            )
        }
    };
    if path != b"/metrics" {
        return response(
            "404 Not Found",
            "text/plain",
            b"not found; try /metrics\n",
            with_body,
        );
    }
    match handle.encode() {
        Ok(text) => response("200 OK", CONTENT_TYPE, text.as_bytes(), with_body),
        Err(err) => {
            tracing::warn!("metrics endpoint: {err}");
            response(
                "500 Internal Server Error",
                "text/plain",
                b"encoding failed\n",
                with_body,
            )
        }
    }
}

/// `status` may carry extra header lines after the status text.
fn response(status: &str, content_type: &str, body: &[u8], with_body: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        out.extend_from_slice(body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::correlate::fixtures::{pod, query};

    use crate::{attribute::PodIdentity, lookup::Diagnosis};

    fn drop_record(kind: &str) -> DropRecord {
        DropRecord {
            ts_ns: 1,
            packet: DroppedPacket::Query,
            reason: "NETFILTER_DROP".into(),
            kind: kind.into(),
            detail: None,
            location: "nf_hook_slow".into(),
            netns_inum: 1,
            src: "10.0.0.1:4000".parse().unwrap(),
            dst: "10.96.0.10:53".parse().unwrap(),
            dns_id: Some(1),
        }
    }

    fn lookup(codes: &[&'static str]) -> LookupRecord {
        LookupRecord {
            event: "lookup",
            time_ns: 0,
            name: "api.example.com.".into(),
            duration_ns: 1,
            queries: 1,
            search_expansions: 0,
            final_rcode: None,
            answers: Default::default(),
            pid: None,
            comm: None,
            cgroup_id: 1,
            cgroup_path: None,
            workload: None,
            resolver: None,
            diagnosis: codes
                .iter()
                .map(|code| Diagnosis {
                    code,
                    message: String::new(),
                    evidence: serde_json::Value::Null,
                })
                .collect(),
        }
    }

    /// The value of the one sample line that starts with `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    }

    const WEB: &str = r#"namespace="prod",pod="web-1",qtype="A""#;

    #[test]
    fn queries_fill_histogram_and_counters() {
        let mut m = Metrics::new(&MetricsConfig::default());
        m.query(&query(pod("prod", "web-1"), "a.test.", Some(2), Some(0)));
        m.query(&query(pod("prod", "web-1"), "a.test.", Some(30), Some(0)));
        m.query(&query(pod("prod", "web-1"), "a.test.", Some(700), Some(2)));
        let mut resent = query(pod("prod", "web-1"), "a.test.", None, None);
        resent.send_ts_ns = smallvec::smallvec![1, 2, 3];
        m.query(&resent);
        let mut dropped = query(pod("prod", "web-1"), "a.test.", None, None);
        dropped.outcome = Outcome::Dropped;
        dropped.drops = vec![drop_record("conntrack_insert_failed")];
        m.query(&dropped);
        m.query(&query(None, "host.test.", Some(1), Some(3)));
        let text = m.handle().encode().unwrap();

        let server = r#"server="10.96.0.10:53""#;
        let noerror = format!(r#"{{{WEB},rcode="NOERROR",{server}"#);
        assert_eq!(
            sample(
                &text,
                &format!("dnsprobe_query_duration_seconds_count{noerror}}}")
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"dnsprobe_query_duration_seconds_bucket{{le="0.0025",{}}}"#,
                    &noerror[1..]
                )
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"dnsprobe_query_duration_seconds_bucket{{le="0.05",{}}}"#,
                    &noerror[1..]
                )
            ),
            Some(2.0)
        );
        let servfail = format!(r#"{{{WEB},rcode="SERVFAIL",{server}}}"#);
        assert_eq!(
            sample(
                &text,
                &format!("dnsprobe_query_duration_seconds_sum{servfail}")
            ),
            Some(0.7)
        );
        assert_eq!(
            sample(&text, &format!("dnsprobe_queries_total{{{WEB},{server}}}")),
            Some(5.0)
        );
        assert_eq!(
            sample(
                &text,
                &format!("dnsprobe_unanswered_queries_total{{{WEB},{server}}}")
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_resends_total{namespace="prod",pod="web-1"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_dropped_packets_total{reason="NETFILTER_DROP",kind="conntrack_insert_failed",packet="query"}"#
            ),
            Some(1.0)
        );
        // Host processes have empty pod labels.
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"dnsprobe_query_duration_seconds_count{{namespace="",pod="",qtype="A",rcode="NXDOMAIN",{server}}}"#
                )
            ),
            Some(1.0)
        );
        assert!(!text.contains("qname"), "no qname label unless asked for");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn unusual_types_and_codes_share_a_series() {
        let mut m = Metrics::new(&MetricsConfig::default());
        for qtype in [1000u16, 2000, 3000] {
            let mut q = query(pod("prod", "web-1"), "a.test.", Some(1), Some(1000 + qtype));
            q.qtype = qtype;
            m.query(&q);
        }
        let text = m.handle().encode().unwrap();
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_query_duration_seconds_count{namespace="prod",pod="web-1",qtype="other",rcode="other",server="10.96.0.10:53"}"#
            ),
            Some(3.0),
            "{text}"
        );
    }

    #[test]
    fn lookups_count_each_diagnosis() {
        let mut m = Metrics::new(&MetricsConfig::default());
        m.lookup(&lookup(&[]));
        m.lookup(&lookup(&["search_list_expansion", "slow_upstream"]));
        m.lookup(&lookup(&["slow_upstream"]));
        m.packet_drop(&drop_record("netfilter_drop"));
        let text = m.handle().encode().unwrap();
        assert_eq!(
            sample(&text, r#"dnsprobe_lookups_total{diagnosis="none"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_lookups_total{diagnosis="slow_upstream"}"#
            ),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_lookups_total{diagnosis="search_list_expansion"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_dropped_packets_total{reason="NETFILTER_DROP",kind="netfilter_drop",packet="query"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn internal_totals_are_counters() {
        let m = Metrics::new(&MetricsConfig::default());
        m.handle().set_internal(InternalStats {
            lost_events: 5,
            lost_drop_events: 1,
            evicted_queries: 7,
            evicted_lookups: 2,
            malformed_messages: 3,
            unparseable_packets: 4,
            late_responses: 6,
        });
        let text = m.handle().encode().unwrap();
        assert!(
            text.contains("# TYPE dnsprobe_ringbuf_lost_events counter"),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"dnsprobe_ringbuf_lost_events_total{ring="dns"}"#),
            Some(5.0)
        );
        assert_eq!(
            sample(&text, r#"dnsprobe_ringbuf_lost_events_total{ring="drops"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"dnsprobe_evicted_total{state="query"}"#),
            Some(7.0)
        );
        assert_eq!(
            sample(&text, r#"dnsprobe_evicted_total{state="lookup"}"#),
            Some(2.0)
        );
        assert_eq!(
            sample(&text, "dnsprobe_malformed_messages_total"),
            Some(3.0)
        );
        assert_eq!(
            sample(&text, "dnsprobe_unparseable_packets_total"),
            Some(4.0)
        );
        assert_eq!(sample(&text, "dnsprobe_late_responses_total"), Some(6.0));
    }

    fn label_values(text: &str, label: &str) -> HashSet<String> {
        let needle = format!("{label}=\"");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let rest = &l[l.find(&needle)? + needle.len()..];
                Some(rest[..rest.find('"')?].to_owned())
            })
            .collect()
    }

    #[test]
    fn pod_cap_holds() {
        let mut m = Metrics::new(&MetricsConfig {
            max_pods: 3,
            ..Default::default()
        });
        for i in 0..50 {
            m.query(&query(
                pod("prod", &format!("web-{i}")),
                "a.test.",
                Some(1),
                Some(0),
            ));
        }
        for i in 0..200 {
            // More namespaces than overflow namespaces are kept.
            m.query(&query(
                pod(&format!("ns-{i}"), "p"),
                "a.test.",
                Some(1),
                Some(0),
            ));
        }
        let text = m.handle().encode().unwrap();
        let pods = label_values(&text, "pod");
        assert_eq!(
            pods,
            HashSet::from(["web-0", "web-1", "web-2", OTHER].map(String::from)),
        );
        let namespaces = label_values(&text, "namespace");
        assert!(
            namespaces.len() <= MAX_OVERFLOW_NAMESPACES + 1,
            "{namespaces:?}"
        );
        assert!(namespaces.contains(OTHER));
        // Every query is still counted, on some series.
        let total: f64 = text
            .lines()
            .filter(|l| l.starts_with("dnsprobe_queries_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(total, 250.0);
        assert!(m.series.len() <= 3 + MAX_OVERFLOW_NAMESPACES);
    }

    #[test]
    fn idle_pods_lose_their_series_and_make_room() {
        let mut m = Metrics::new(&MetricsConfig {
            max_pods: 1,
            idle: SWEEP_EVERY,
            ..Default::default()
        });
        m.query(&query(pod("prod", "old"), "a.test.", Some(1), Some(0)));
        m.sweep();
        m.sweep();
        let text = m.handle().encode().unwrap();
        assert!(!text.contains(r#"pod="old""#), "{text}");
        m.query(&query(pod("prod", "new"), "a.test.", Some(1), Some(0)));
        let text = m.handle().encode().unwrap();
        assert!(text.contains(r#"pod="new""#), "{text}");
        assert!(!text.contains(OTHER), "the idle pod's place was freed");
    }

    #[test]
    fn pod_named_later_is_relabelled() {
        let mut m = Metrics::new(&MetricsConfig::default());
        let unnamed = Some(Arc::new(Workload {
            pod: Some(PodIdentity {
                namespace: None,
                name: None,
                uid: "uid-prod-web-1".into(),
                qos: None,
            }),
            ..Default::default()
        }));
        m.query(&query(unnamed, "a.test.", Some(1), Some(0)));
        assert!(m
            .handle()
            .encode()
            .unwrap()
            .contains(r#"pod="uid-prod-web-1""#));
        m.query(&query(pod("prod", "web-1"), "a.test.", Some(1), Some(0)));
        let text = m.handle().encode().unwrap();
        assert!(!text.contains("uid-prod-web-1"), "{text}");
        assert!(text.contains(WEB));
    }

    #[test]
    fn top_names_are_bounded_and_ranked_per_window() {
        let window = Duration::from_secs(60);
        let mut m = Metrics::new(&MetricsConfig {
            top_names: 2,
            name_window: window,
            ..Default::default()
        });
        let start = Instant::now();
        // The first names take the free slots.
        for name in [
            "a.test.", "b.test.", "C.Test.", "c.test.", "c.test.", "d.test.",
        ] {
            m.query(&query(pod("prod", "web-1"), name, Some(1), Some(0)));
        }
        let text = m.handle().encode().unwrap();
        assert_eq!(
            label_values(&text, "qname"),
            HashSet::from(["a.test.", "b.test.", OTHER].map(String::from))
        );
        assert_eq!(
            sample(&text, r#"dnsprobe_name_queries_total{qname="_other"}"#),
            Some(4.0)
        );
        // At the window's end the busiest names take over.
        m.housekeeping(start + window + Duration::from_secs(1));
        m.query(&query(pod("prod", "web-1"), "c.test.", Some(1), Some(0)));
        let text = m.handle().encode().unwrap();
        let names = label_values(&text, "qname");
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(names.contains("c.test."), "{names:?}");
        assert_eq!(
            sample(&text, r#"dnsprobe_name_queries_total{qname="c.test."}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"dnsprobe_name_query_duration_seconds_count{qname="c.test."}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn name_counting_stays_bounded_under_random_names() {
        let mut m = Metrics::new(&MetricsConfig {
            top_names: 1,
            ..Default::default()
        });
        for i in 0..5_000 {
            m.query(&query(None, &format!("r{i}.test."), None, None));
            m.query(&query(None, "hot.test.", None, None));
        }
        let names = m.names.as_ref().unwrap();
        assert!(names.counts.len() <= names.capacity);
        assert!(
            names.counts.contains_key("hot.test."),
            "a heavy name survives"
        );
    }

    #[test]
    fn metrics_addr_parsing() {
        let loopback = |p| SocketAddr::new(Ipv4Addr::LOCALHOST.into(), p);
        assert_eq!(parse_metrics_addr("9153"), Ok(loopback(9153)));
        assert_eq!(parse_metrics_addr(":9153"), Ok(loopback(9153)));
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9153"),
            Ok("0.0.0.0:9153".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9153"),
            Ok("[::1]:9153".parse().unwrap())
        );
        assert_eq!(
            parse_metrics_addr("[::]:9153"),
            Ok("[::]:9153".parse().unwrap())
        );
        assert!(parse_metrics_addr("99999")
            .unwrap_err()
            .contains("out of range"));
        assert!(parse_metrics_addr("0").unwrap_err().contains("port 0"));
        assert!(parse_metrics_addr("localhost:9153").is_err());
        assert!(parse_metrics_addr("::1:9153").is_err());
        assert!(parse_metrics_addr("").is_err());
        assert!(parse_metrics_addr("10.0.0.1").is_err());
    }

    #[test]
    fn bad_metrics_addr_names_the_flag() {
        #[derive(clap::Parser, Debug)]
        struct Args {
            #[arg(long, value_parser = parse_metrics_addr)]
            metrics_addr: Option<SocketAddr>,
        }
        let err = <Args as clap::Parser>::try_parse_from(["x", "--metrics-addr", "nope"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--metrics-addr"), "{err}");
        assert!(err.contains("not a port"), "{err}");
    }

    async fn fetch(addr: SocketAddr, request: &[u8]) -> (String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let response = String::from_utf8(response).unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        (head.to_owned(), body.to_owned())
    }

    async fn start_server(handle: MetricsHandle) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let mut server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        server.read_timeout = Duration::from_millis(200);
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(handle, async {
            let _ = stopped.await;
        }));
        (addr, stop)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn scrape_over_http_parses_as_openmetrics() {
        use openmetrics_parser::{openmetrics::parse_openmetrics, OpenMetricsValue};

        let mut m = Metrics::new(&MetricsConfig {
            top_names: 5,
            ..Default::default()
        });
        for latency in [1, 3, 40] {
            m.query(&query(
                pod("prod", "web-1"),
                "a.test.",
                Some(latency),
                Some(0),
            ));
        }
        m.query(&query(pod("prod", "web-1"), "a.test.", None, None));
        m.lookup(&lookup(&["slow_upstream"]));
        m.handle().set_internal(InternalStats {
            lost_events: 9,
            ..Default::default()
        });
        let (addr, stop) = start_server(m.handle()).await;

        // Scrapes at once, each on its own connection.
        let scrapes = (0..8).map(|_| {
            tokio::spawn(fetch(
                addr,
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text\r\n\r\n",
            ))
        });
        let mut bodies = Vec::new();
        for scrape in scrapes {
            let (head, body) = scrape.await.unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(
                head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
                "{head}"
            );
            assert!(
                head.contains(&format!("Content-Length: {}", body.len())),
                "{head}"
            );
            bodies.push(body);
        }
        assert!(bodies.iter().all(|b| *b == bodies[0]));
        // OpenMetrics 1.0 forbids a unit only on Info and StateSet families, but this parser
        // also refuses one on histograms: leave those lines out for it.
        let without_histogram_units: String = bodies[0]
            .lines()
            .filter(|l| *l != "# UNIT dnsprobe_query_duration_seconds seconds")
            .filter(|l| *l != "# UNIT dnsprobe_name_query_duration_seconds seconds")
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(
            without_histogram_units.len() < bodies[0].len(),
            "the units were there"
        );
        let exposition = parse_openmetrics(&without_histogram_units).unwrap();
        let labels = ["prod", "web-1", "A", "NOERROR", "10.96.0.10:53"].map(String::from);
        let family = &exposition.families["dnsprobe_query_duration_seconds"];
        let OpenMetricsValue::Histogram(h) =
            &family.get_sample_by_label_values(&labels).unwrap().value
        else {
            panic!("not a histogram")
        };
        assert_eq!(h.count, Some(3));
        assert!((h.sum.unwrap().as_f64() - 0.044).abs() < 1e-9);
        let counter = |family: &str, labels: &[&str]| {
            let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
            match &exposition.families[family]
                .get_sample_by_label_values(&labels)
                .unwrap()
                .value
            {
                OpenMetricsValue::Counter(c) => c.value.as_f64(),
                other => panic!("{family}: {other:?}"),
            }
        };
        let series = ["prod", "web-1", "A", "10.96.0.10:53"];
        assert_eq!(counter("dnsprobe_queries", &series), 4.0);
        assert_eq!(counter("dnsprobe_unanswered_queries", &series), 1.0);
        assert_eq!(counter("dnsprobe_lookups", &["slow_upstream"]), 1.0);
        assert_eq!(counter("dnsprobe_ringbuf_lost_events", &["dns"]), 9.0);
        assert_eq!(counter("dnsprobe_name_queries", &["a.test."]), 4.0);
        let _ = stop.send(());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn bad_requests_get_errors_not_panics() {
        let m = Metrics::new(&MetricsConfig::default());
        let (addr, stop) = start_server(m.handle()).await;
        let (head, _) = fetch(addr, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        let (head, _) = fetch(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 405"), "{head}");
        let (head, body) = fetch(addr, b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(body.is_empty());
        let (head, _) = fetch(addr, b"\x00\xff garbage\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        let (head, _) = fetch(addr, b"GET /metrics\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 400"), "{head}");
        // Exactly the limit: more would be left unread, and closing a socket with unread data
        // resets the connection, which may discard the response at the client.
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.resize(MAX_REQUEST_HEAD, b'a');
        let (head, _) = fetch(addr, &huge).await;
        assert!(head.starts_with("HTTP/1.1 431"), "{head}");
        // A client that says nothing is cut off by the read timeout, and the server goes on.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut buf))
            .await
            .expect("the server closes a silent connection")
            .unwrap_or(0);
        assert_eq!(n, 0);
        let (head, _) = fetch(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let _ = stop.send(());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn server_reports_bind_errors_and_stops_on_shutdown() {
        let m = Metrics::new(&MetricsConfig::default());
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let Err(err) = MetricsServer::bind(addr).await else {
            panic!("bound {addr} twice");
        };
        assert!(matches!(err, MetricsError::Bind { .. }), "{err}");
        assert!(err.to_string().contains(&addr.to_string()), "{err}");
        // A finished shutdown future ends the loop at once.
        tokio::time::timeout(Duration::from_secs(5), server.run(m.handle(), async {}))
            .await
            .expect("run returns on shutdown")
            .unwrap();
    }
}
