//! Groups queries into lookups and explains slow or failed ones.
//!
//! A lookup is what one resolver call did for one name in one process: the search-list
//! expansions, A and AAAA, retries, resends and TCP fallback. The process's own resolv.conf
//! (read through /proc/<pid>/root, so a pod's file, not the node's) tells which query names are
//! expansions of which asked name. A lookup ends once none of its queries is pending and the
//! process has asked nothing more about the name for `idle`.

use std::{
    borrow::Cow,
    collections::VecDeque,
    fs,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use foldhash::{HashMap, HashMapExt as _};
use hashbrown::HashTable;
use serde::Serialize;
use serde_json::json;
use std::hash::BuildHasher as _;

use crate::{
    correlate::{DropRecord, FinishedQuery, Outcome, SendTimes, Sender},
    decode::Answers,
    decode::{
        qtype_name, rcode_mnemonic, rcode_name, Transport, RCODE_NOERROR, RCODE_NXDOMAIN,
        RCODE_SERVFAIL,
    },
    qname::{CaselessPrefix, QName},
};

const DEFAULT_TIMEOUT_S: u32 = 5;
const DEFAULT_ATTEMPTS: u32 = 2;
/// A send this soon after a response to the same question is a reaction to that response (a
/// retry after SERVFAIL), not a resend after waiting.
const REACTION_NS: u64 = 50_000_000;
/// Kernel drop reasons of a response that reached the client's host but not its reader: the
/// socket was closed, its receive buffer was full, or it was purged on close.
const UNREAD_RESPONSE_REASONS: &[&str] =
    &["NO_SOCKET", "SOCKET_RCVBUFF", "QUEUE_PURGE", "SOCKET_CLOSE"];

/// The parts of resolv.conf that shape a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ResolverConfig {
    /// Search domains, fully qualified and lower case (`ns.svc.cluster.local.`).
    pub search: Vec<String>,
    pub ndots: u32,
    /// `options timeout:` in seconds (glibc and musl default: 5).
    pub timeout_s: u32,
    /// `options attempts:` (default 2).
    pub attempts: u32,
}

impl ResolverConfig {
    /// The longest a resolver following this file keeps retrying one question.
    pub fn patience_ns(&self) -> u64 {
        u64::from(self.timeout_s.max(1)) * u64::from(self.attempts.max(1)) * 1_000_000_000
    }
}

impl ResolverConfig {
    pub fn parse(text: &str) -> Self {
        let mut cfg = ResolverConfig {
            search: Vec::new(),
            ndots: 1,
            timeout_s: DEFAULT_TIMEOUT_S,
            attempts: DEFAULT_ATTEMPTS,
        };
        for line in text.lines() {
            let line = line.split(['#', ';']).next().unwrap_or("");
            let mut words = line.split_whitespace();
            match words.next() {
                // The last search or domain line wins, as in glibc and musl.
                Some("search") | Some("domain") => {
                    cfg.search = words
                        .map(|d| {
                            let d = d.trim_end_matches('.').to_ascii_lowercase();
                            format!("{d}.")
                        })
                        .filter(|d| d != ".")
                        .collect();
                }
                Some("options") => {
                    for opt in words {
                        // The caps are glibc's and musl's own.
                        if let Some(n) = opt.strip_prefix("ndots:") {
                            if let Ok(n) = n.parse::<u32>() {
                                cfg.ndots = n.min(15);
                            }
                        } else if let Some(n) = opt.strip_prefix("timeout:") {
                            if let Ok(n) = n.parse::<u32>() {
                                cfg.timeout_s = n.clamp(1, 30);
                            }
                        } else if let Some(n) = opt.strip_prefix("attempts:") {
                            if let Ok(n) = n.parse::<u32>() {
                                cfg.attempts = n.clamp(1, 10);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        cfg
    }

    /// Splits a query name into the name the program asked for and the search domain added to
    /// it, if any (the longest matching domain, since domains can nest). Case is ignored; the
    /// parts keep the query's.
    pub fn split<'a>(&self, qname: &'a str) -> (&'a str, Option<&'a str>) {
        let mut best: Option<usize> = None;
        for domain in &self.search {
            let Some(cut) = qname.len().checked_sub(domain.len()) else {
                continue;
            };
            if cut > 1
                && qname.as_bytes()[cut - 1] == b'.'
                && qname.is_char_boundary(cut)
                && qname[cut..].eq_ignore_ascii_case(domain)
                && best.is_none_or(|b| cut < b)
            {
                best = Some(cut);
            }
        }
        match best {
            Some(cut) => (&qname[..cut], Some(&qname[cut..])),
            None => (qname, None),
        }
    }
}

/// Resolver configurations by process, read once per process while it lives, and by cgroup
/// (a pod's containers share one resolv.conf), for clients that exit before they are read:
/// then any live process of the cgroup, or of its parent's other children (the pod's other
/// containers, its pause container), stands in.
pub struct ResolverConfigs {
    proc_root: PathBuf,
    cgroup_root: PathBuf,
    // Shared, not copied: every query of a process looks its configuration up.
    by_pid: HashMap<u32, (Option<Arc<ResolverConfig>>, Instant)>,
    by_cgroup: HashMap<u64, (Option<Arc<ResolverConfig>>, Instant)>,
}

const RESOLVER_CONFIG_TTL: Duration = Duration::from_secs(30);
const MAX_CONFIGS: usize = 65_536;
/// Processes tried per cgroup scan before giving up (a scan must stay cheap).
const MAX_STAND_INS: usize = 16;

impl ResolverConfigs {
    pub fn new(proc_root: PathBuf, cgroup_root: PathBuf) -> Self {
        Self {
            proc_root,
            cgroup_root,
            by_pid: HashMap::new(),
            by_cgroup: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.by_pid.len() + self.by_cgroup.len()
    }

    pub fn prune(&mut self, grace: Duration) {
        let keep = grace.min(RESOLVER_CONFIG_TTL);
        self.by_pid
            .retain(|_, (_, at)| crate::coarse::elapsed(at) < keep);
        self.by_cgroup
            .retain(|_, (_, at)| crate::coarse::elapsed(at) < keep);
    }

    fn read_pid(&self, pid: u32) -> Option<Arc<ResolverConfig>> {
        let path = self
            .proc_root
            .join(pid.to_string())
            .join("root/etc/resolv.conf");
        fs::read_to_string(path)
            .ok()
            .map(|t| Arc::new(ResolverConfig::parse(&t)))
    }

    /// Reads resolv.conf through a live process of the cgroup or of its sibling cgroups.
    fn read_cgroup(&self, cgroup_path: &str) -> Option<Arc<ResolverConfig>> {
        // The root cgroup holds unrelated host processes: none of them speaks for a client.
        if cgroup_path == "/" {
            return None;
        }
        let dir = self.cgroup_root.join(cgroup_path.trim_start_matches('/'));
        let mut dirs = vec![dir.clone()];
        {
            if let Some(parent) = dir.parent().filter(|p| *p != self.cgroup_root) {
                dirs.push(parent.to_owned());
                if let Ok(entries) = fs::read_dir(parent) {
                    dirs.extend(
                        entries
                            .flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                            .map(|e| e.path())
                            .filter(|p| *p != dir)
                            .take(MAX_STAND_INS),
                    );
                }
            }
        }
        let mut tried = 0;
        for d in dirs {
            let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if let Some(cfg) = self.read_pid(pid) {
                    return Some(cfg);
                }
                tried += 1;
                if tried >= MAX_STAND_INS {
                    return None;
                }
            }
        }
        None
    }

    pub fn get(
        &mut self,
        pid: Option<u32>,
        cgroup_id: u64,
        cgroup_path: Option<&str>,
    ) -> Option<Arc<ResolverConfig>> {
        if let Some(pid) = pid {
            let fresh = self
                .by_pid
                .get(&pid)
                .filter(|(_, at)| crate::coarse::elapsed(at) < RESOLVER_CONFIG_TTL)
                .map(|(cfg, _)| cfg.clone());
            let cfg = match fresh {
                Some(cfg) => cfg,
                None => {
                    if self.by_pid.len() >= MAX_CONFIGS {
                        self.by_pid
                            .retain(|_, (_, at)| crate::coarse::elapsed(at) < RESOLVER_CONFIG_TTL);
                    }
                    let cfg = self.read_pid(pid);
                    self.by_pid.insert(pid, (cfg.clone(), crate::coarse::now()));
                    if let Some(cfg) = &cfg {
                        self.by_cgroup
                            .insert(cgroup_id, (Some(cfg.clone()), crate::coarse::now()));
                    }
                    cfg
                }
            };
            if cfg.is_some() {
                return cfg;
            }
        }
        if let Some((cfg, at)) = self.by_cgroup.get(&cgroup_id) {
            if crate::coarse::elapsed(at) < RESOLVER_CONFIG_TTL {
                return cfg.clone();
            }
        }
        if self.by_cgroup.len() >= MAX_CONFIGS {
            self.by_cgroup
                .retain(|_, (_, at)| crate::coarse::elapsed(at) < RESOLVER_CONFIG_TTL);
        }
        // Without a path nothing can be read: remembering that as "no configuration" would
        // hide the cgroup's file from the next caller that has its path (a late response
        // looks its lookup up without one).
        let path = cgroup_path?;
        let cfg = self.read_cgroup(path);
        self.by_cgroup
            .insert(cgroup_id, (cfg.clone(), crate::coarse::now()));
        cfg
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LookupKey {
    /// The process, or failing that its cgroup: a lookup never spans processes.
    pid: Option<u32>,
    cgroup_id: u64,
    /// The asked name, fully qualified: the query name without the search domain its
    /// resolver added.
    name: CaselessPrefix,
}

/// A late response or an unread one, attached to the lookup of its query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LateArrival {
    pub ts_ns: u64,
    pub id: u16,
    pub qname: QName,
    pub qtype: u16,
    /// How long after the query's first send it arrived.
    pub after_first_send_ns: u64,
    /// Why the client did not use it: `after_timeout`, `duplicate`, or a kernel drop reason
    /// (`NO_SOCKET`: the socket was closed; `SOCKET_RCVBUFF`: its buffer was full).
    pub why: String,
    pub pid: Option<u32>,
    pub cgroup_id: u64,
}

impl OpenLookup {
    fn patience_ns(&self) -> u64 {
        self.resolver
            .as_ref()
            .map(|r| r.patience_ns())
            .unwrap_or(u64::from(DEFAULT_TIMEOUT_S) * u64::from(DEFAULT_ATTEMPTS) * 1_000_000_000)
    }
}

/// Latest response code of every question (name and type) asked, `None` when unanswered: the
/// reference the incremental `OpenLookup::questions` is checked against.
#[cfg(test)]
fn latest_rcodes<'a>(
    queries: impl IntoIterator<Item = &'a LookupQuery>,
) -> HashMap<(String, u16), Option<u16>> {
    let mut latest: HashMap<(String, u16), (u64, Option<u16>)> = HashMap::new();
    for q in queries {
        let at = q.response_ts_ns.unwrap_or_else(|| q.first_send_ns());
        let e = latest
            .entry((q.qname.to_ascii_lowercase(), q.qtype))
            .or_insert((0, None));
        if at >= e.0 {
            *e = (at, q.rcode);
        }
    }
    latest.into_iter().map(|(k, (_, r))| (k, r)).collect()
}

/// Every question's latest answer is definitive: an answer or a name that does not exist.
#[cfg(test)]
fn settled<'a>(queries: impl IntoIterator<Item = &'a LookupQuery>) -> bool {
    latest_rcodes(queries).values().all(|r| is_definitive(*r))
}

/// When the client stopped waiting. Settled lookups end with their last answer. Otherwise the
/// resolver went on resending until it gave up: its retry interval shows in the spacing of
/// sends that were not reactions to a response, and it gave up one interval after its last.
fn lookup_end_ns(lookup: &OpenLookup, query_timeout_ns: u64) -> u64 {
    let queries = &lookup.queries;
    let last_response = queries.iter().filter_map(|q| q.response_ts_ns).max();
    if lookup.settled {
        return last_response.unwrap_or(lookup.last_activity_ns);
    }
    let mut by_question: HashMap<(String, u16), (Vec<u64>, Vec<u64>)> = HashMap::new();
    for q in queries {
        let e = by_question
            .entry((q.qname.to_ascii_lowercase(), q.qtype))
            .or_default();
        e.0.extend(&q.send_ts_ns);
        e.1.extend(q.response_ts_ns);
    }
    let mut interval: Option<u64> = None;
    let mut last_timed_send = 0u64;
    for (sends, responses) in by_question.values_mut() {
        sends.sort_unstable();
        let timed: Vec<u64> = sends
            .iter()
            .copied()
            .filter(|&s| {
                !responses
                    .iter()
                    .any(|&r| r <= s && s.saturating_sub(r) < REACTION_NS)
            })
            .collect();
        for pair in timed.windows(2) {
            let gap = pair[1] - pair[0];
            if gap >= REACTION_NS {
                interval = Some(interval.map_or(gap, |i| i.min(gap)));
            }
        }
        if let Some(&last) = timed.last() {
            last_timed_send = last_timed_send.max(last);
        }
    }
    let last_send = queries
        .iter()
        .flat_map(|q| q.send_ts_ns.iter().copied())
        .max()
        .unwrap_or(lookup.first_send_ns);
    let end = match (interval, last_response) {
        (Some(interval), _) => last_timed_send.saturating_add(interval),
        // Answered (with a failure) and never asked again: the client took the answer.
        (None, Some(response)) => response,
        (None, None) => {
            let timeout = lookup
                .resolver
                .as_ref()
                .map_or(DEFAULT_TIMEOUT_S, |r| r.timeout_s);
            last_send.saturating_add((u64::from(timeout) * 1_000_000_000).min(query_timeout_ns))
        }
    };
    end.max(last_response.unwrap_or(0))
}

struct OpenLookup {
    key: LookupKey,
    /// `key`'s hash in `LookupTracker::by_key`.
    key_hash: u64,
    resolver: Option<Arc<ResolverConfig>>,
    first_send_ns: u64,
    /// When the lookup last saw a query start or end (kernel time).
    last_activity_ns: u64,
    pending: u32,
    /// Every question asked so far and its latest answer, kept as queries finish: deciding
    /// whether a lookup is settled must not walk all its queries each time one ends. Empty
    /// while the lookup has one query, whose question is the only one (see
    /// [`Self::questions`]): most lookups have one, and the list cost each an allocation.
    questions: Vec<QuestionState>,
    /// Every question's latest answer is definitive (see [`settled`]).
    settled: bool,
    queries: Vec<LookupQuery>,
    /// The sender of the query sent first, which the record names; with the send time and
    /// response time it was ordered by.
    sender: Option<((u64, u64), Sender)>,
    late: Vec<LateArrival>,
    /// In `LookupTracker::by_key`: new queries and late answers of its key can still find it.
    indexed: bool,
}

/// What a lookup keeps of a finished query: what its record and its diagnoses read. The client
/// socket and the sender (kept once per lookup) are left out, which nearly halves what a busy
/// lookup holds.
#[derive(Debug, Clone)]
struct LookupQuery {
    qname: QName,
    qtype: u16,
    id: u16,
    transport: Transport,
    truncated: bool,
    outcome: Outcome,
    rcode: Option<u16>,
    server: std::net::SocketAddr,
    send_ts_ns: SendTimes,
    response_ts_ns: Option<u64>,
    answers: Answers,
    drops: Vec<DropRecord>,
}

impl LookupQuery {
    /// What a lookup keeps of `query`: copied, as the query's record is written later (see
    /// `Pipeline::write_queries`). Names and text answers are shared; a list of one answer is
    /// inline, a longer one and any drops are an allocation each.
    fn of(query: &FinishedQuery) -> Self {
        Self {
            qname: query.qname.clone(),
            qtype: query.qtype,
            id: query.id,
            transport: query.transport,
            truncated: query.truncated,
            outcome: query.outcome,
            rcode: query.rcode,
            server: query.server,
            send_ts_ns: query.send_ts_ns.clone(),
            response_ts_ns: query.response_ts_ns,
            answers: query.answers.clone(),
            drops: query.drops.clone(),
        }
    }

    fn first_send_ns(&self) -> u64 {
        self.send_ts_ns.first().copied().unwrap_or_default()
    }

    /// When its answer came, or when it was first sent if none came: the time of its
    /// question's latest state.
    fn answer_ns(&self) -> u64 {
        self.response_ts_ns.unwrap_or_else(|| self.first_send_ns())
    }

    fn latency_ns(&self) -> Option<u64> {
        self.response_ts_ns
            .map(|r| r.saturating_sub(self.first_send_ns()))
    }

    /// Queries finish in the order they were sent unless latencies differ.
    fn order(&self) -> (u64, u64) {
        (
            self.first_send_ns(),
            self.response_ts_ns.unwrap_or(u64::MAX),
        )
    }
}

/// A question's latest state as read from a lookup's list, or from its only query when it has
/// no list (see `OpenLookup::questions`).
#[derive(Debug, Clone, Copy)]
struct QuestionView<'a> {
    name: &'a QName,
    qtype: u16,
    at_ns: u64,
    rcode: Option<u16>,
}

impl<'a> QuestionView<'a> {
    fn of_query(q: &'a LookupQuery) -> Self {
        Self {
            name: &q.qname,
            qtype: q.qtype,
            at_ns: q.answer_ns(),
            rcode: q.rcode,
        }
    }

    fn of_state(q: &'a QuestionState) -> Self {
        Self {
            name: &q.name,
            qtype: q.qtype,
            at_ns: q.at_ns,
            rcode: q.rcode,
        }
    }
}

/// One question of a lookup (name and type) and its latest answer.
#[derive(Debug)]
struct QuestionState {
    /// As first sent; compared without case.
    name: QName,
    qtype: u16,
    /// When the latest answer came (or the unanswered query was first sent).
    at_ns: u64,
    rcode: Option<u16>,
}

impl OpenLookup {
    fn new(
        key: LookupKey,
        key_hash: u64,
        resolver: Option<Arc<ResolverConfig>>,
        ts_ns: u64,
    ) -> Self {
        Self {
            key,
            key_hash,
            resolver,
            first_send_ns: ts_ns,
            last_activity_ns: ts_ns,
            pending: 0,
            questions: Vec::new(),
            settled: true,
            // Not preallocated: a lookup whose queries are all still pending (an outage, a
            // flood of unanswered names) then costs no query list at all.
            queries: Vec::new(),
            sender: None,
            late: Vec::new(),
            indexed: true,
        }
    }

    fn name(&self) -> &str {
        self.key.name.as_str()
    }

    /// The queries of search-list expansions of the name rather than of the name itself.
    fn expansions(&self) -> impl Iterator<Item = &LookupQuery> {
        let name = self.name();
        self.queries.iter().filter(move |q| is_expansion(name, q))
    }

    /// Every question asked so far and its latest answer.
    fn questions(&self) -> impl Iterator<Item = QuestionView<'_>> {
        let only = match self.queries.as_slice() {
            [only] if self.questions.is_empty() => Some(QuestionView::of_query(only)),
            _ => None,
        };
        self.questions
            .iter()
            .map(QuestionView::of_state)
            .chain(only)
    }

    /// Adds a finished query, keeping `questions` and `settled` up to date.
    fn add(&mut self, finished: &FinishedQuery) {
        let query = LookupQuery::of(finished);
        let order = query.order();
        if self.sender.as_ref().is_none_or(|(first, _)| order < *first) {
            self.sender = Some((order, finished.sender.clone()));
        }
        if self.queries.is_empty() {
            // Its question is the only one: `questions` stays empty.
            self.settled = is_definitive(query.rcode);
            self.queries.push(query);
            return;
        }
        if let ([first], true) = (self.queries.as_slice(), self.questions.is_empty()) {
            // A second query: the first one's question goes into the list it did without.
            let first = QuestionView::of_query(first);
            self.questions.push(QuestionState {
                name: first.name.clone(),
                qtype: first.qtype,
                at_ns: first.at_ns,
                rcode: first.rcode,
            });
        }
        let at = query.answer_ns();
        match self
            .questions
            .iter_mut()
            .find(|q| q.qtype == query.qtype && q.name == query.qname)
        {
            Some(q) => {
                if at >= q.at_ns {
                    q.at_ns = at;
                    q.rcode = query.rcode;
                }
            }
            None => self.questions.push(QuestionState {
                name: query.qname.clone(),
                qtype: query.qtype,
                at_ns: at,
                rcode: query.rcode,
            }),
        }
        self.settled = self.questions.iter().all(|q| is_definitive(q.rcode));
        self.queries.push(query);
    }

    /// Whether this exact question got a definitive answer well before `ts_ns`: asking it
    /// again then starts a new resolver call. Within `REACTION_NS` of the answer it is the same
    /// call going on: glibc asks over TCP after a truncated answer, and may ask A and AAAA
    /// again right after.
    fn answered_before(&self, qname: &QName, qtype: u16, ts_ns: u64) -> bool {
        self.questions().any(|q| {
            q.qtype == qtype
                && *q.name == *qname
                && is_definitive(q.rcode)
                && q.at_ns.saturating_add(REACTION_NS) < ts_ns
        })
    }
}

fn is_definitive(rcode: Option<u16>) -> bool {
    matches!(rcode, Some(RCODE_NOERROR) | Some(RCODE_NXDOMAIN))
}

/// Thresholds of the diagnoses.
#[derive(Debug, Clone, Copy)]
pub struct DiagnosisConfig {
    pub slow_ns: u64,
    /// The daemon's `--query-timeout`: the longest a lookup is assumed to wait when nothing
    /// else tells.
    pub query_timeout_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnosis {
    pub code: &'static str,
    pub message: String,
    pub evidence: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LookupRecord {
    pub event: &'static str,
    pub time_ns: u64,
    /// In lower case.
    pub name: Arc<str>,
    pub duration_ns: u64,
    pub queries: usize,
    pub search_expansions: usize,
    pub final_rcode: Option<Cow<'static, str>>,
    pub answers: Answers,
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    pub cgroup_id: u64,
    pub cgroup_path: Option<Arc<str>>,
    pub workload: Option<std::sync::Arc<crate::attribute::Workload>>,
    pub resolver: Option<Arc<ResolverConfig>>,
    pub diagnosis: Vec<Diagnosis>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct LookupStats {
    pub lookups: u64,
    pub evicted: u64,
    /// Lookups closed because they reached `MAX_QUERIES_PER_LOOKUP` (a client asking one
    /// name without pause); the queries after that start a new lookup.
    pub capped: u64,
}

/// A lookup holds at most this many queries. A resolver call makes a few dozen at most
/// (search expansions x types x attempts); a client asking one name without pause (a load
/// generator, a forwarder with the name always in flight) would otherwise make one endless
/// lookup that grows with every query, and whose diagnosis at the end walks them all.
pub const MAX_QUERIES_PER_LOOKUP: usize = 128;

/// Identifies an open lookup; queries carry it from start to end (`Sender::lookup`). The low
/// 32 bits are the lookup's slot in `LookupTracker::open`, the high 32 bits the slot's
/// generation: an id outlives its lookup without ever naming the next one in its slot. 0 is
/// never an id.
pub type LookupId = u64;

/// A place for an open lookup, reused once it closes.
struct LookupSlot {
    /// Starts at 1 and moves on each time the slot is freed.
    generation: u32,
    /// Boxed: an open lookup is a few hundred bytes, and as many may be open as queries.
    lookup: Option<Box<OpenLookup>>,
}

fn lookup_id(slot: u32, generation: u32) -> LookupId {
    (u64::from(generation) << 32) | u64::from(slot)
}

/// The slot and the generation an id names.
fn split_lookup_id(id: LookupId) -> (u32, u32) {
    (id as u32, (id >> 32) as u32)
}

/// The slot `id` names, if it still holds that generation.
fn id_slot_mut(open: &mut [LookupSlot], id: LookupId) -> Option<&mut LookupSlot> {
    let (slot, generation) = split_lookup_id(id);
    open.get_mut(slot as usize)
        .filter(|s| s.generation == generation)
}

/// The open lookup `id` names, if it is still open.
fn open_lookup(open: &[LookupSlot], id: LookupId) -> Option<&OpenLookup> {
    let (slot, generation) = split_lookup_id(id);
    let slot = open
        .get(slot as usize)
        .filter(|s| s.generation == generation)?;
    slot.lookup.as_deref()
}

pub struct LookupTracker {
    /// Open lookups, found by id without hashing: every finished query looks its lookup up.
    open: Vec<LookupSlot>,
    /// Slots of `open` free for the next lookup.
    free: Vec<u32>,
    open_count: usize,
    /// The lookup new queries of a process and asked name join. A lookup taken out of here
    /// (a new resolver call began) stays in `open` until its own queries are over. Ids only,
    /// compared with the key in the lookup: a copy of every key would cost more than the
    /// table.
    by_key: HashTable<LookupId>,
    /// Seeded per tracker, so that senders cannot choose keys that collide.
    hasher: foldhash::fast::RandomState,
    /// Ids in creation order, for eviction; ids of lookups closed since are skipped then.
    order: VecDeque<LookupId>,
    configs: ResolverConfigs,
    idle_ns: u64,
    /// A lookup whose query was lost (evicted) is closed after this much silence anyway.
    stale_ns: u64,
    max_open: usize,
    diagnosis: DiagnosisConfig,
    stats: LookupStats,
    /// Lookups closed whose records [`Self::each_closed`] builds: those that closed as their
    /// last query finished, and with [`Self::deferring_records`] every one.
    #[expect(
        clippy::vec_box,
        reason = "a lookup stays boxed from its first query to its record, moved as a box"
    )]
    ended: Vec<Box<OpenLookup>>,
    defer_records: bool,
    /// Boxes of closed lookups, emptied, for the next lookups (at most [`SPARES_KEPT`]): at
    /// low rates every query is a lookup of its own, and its box and query list were a
    /// malloc and a free each, as much as a tenth of the query's cost.
    #[expect(
        clippy::vec_box,
        reason = "the boxes themselves are what is kept for reuse"
    )]
    spare_lookups: Vec<Box<OpenLookup>>,
    /// Query lists of closed lookups, emptied, for lookups whose first query finishes: given
    /// out only then, so that a pending lookup holds no list (see `OpenLookup::new`).
    spare_query_lists: Vec<Vec<LookupQuery>>,
}

/// How many emptied lookup boxes and query lists `LookupTracker` keeps for reuse, each. A few
/// dozen cover the lookups that close at one tick at low rates; at high rates lookups hold
/// many queries and close seldom.
const SPARES_KEPT: usize = 64;

/// The largest query list kept for reuse: a long lookup's list would hold its room for as
/// long as it waits, through lookups of one query.
const SPARE_LIST_CAPACITY: usize = 4;

impl LookupTracker {
    pub fn new(
        configs: ResolverConfigs,
        idle: Duration,
        query_timeout: Duration,
        max_open: usize,
        diagnosis: DiagnosisConfig,
    ) -> Self {
        let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Self {
            open: Vec::new(),
            free: Vec::new(),
            open_count: 0,
            by_key: HashTable::new(),
            hasher: Default::default(),
            order: VecDeque::new(),
            configs,
            idle_ns: ns(idle),
            stale_ns: ns(query_timeout).saturating_add(ns(idle)),
            // Slot numbers are u32.
            max_open: max_open.clamp(1, u32::MAX as usize),
            diagnosis,
            stats: LookupStats::default(),
            ended: Vec::new(),
            defer_records: false,
            spare_lookups: Vec::new(),
            spare_query_lists: Vec::new(),
        }
    }

    /// From now on a closed lookup's record is built by [`Self::each_closed`] rather than
    /// given to the caller that closed it. Building a record (its diagnosis above all) runs
    /// through about as much code as a query's whole path; done a few at a time, that code
    /// and the packet path's push each other out of the instruction cache less often.
    pub fn deferring_records(mut self) -> Self {
        self.defer_records = true;
        self
    }

    /// Closed lookups whose records wait for [`Self::each_closed`].
    pub fn closed_waiting(&self) -> usize {
        self.ended.len()
    }

    pub fn stats(&self) -> LookupStats {
        self.stats
    }

    pub fn open_lookups(&self) -> usize {
        self.open_count
    }

    fn get_mut(&mut self, id: LookupId) -> Option<&mut OpenLookup> {
        id_slot_mut(&mut self.open, id)?.lookup.as_deref_mut()
    }

    /// The open lookup of `key` (hashed to `hash`) that new queries join.
    fn find_by_key(&self, hash: u64, key: &LookupKey) -> Option<LookupId> {
        let open = &self.open;
        self.by_key
            .find(hash, |&id| {
                open_lookup(open, id).is_some_and(|l| l.key == *key)
            })
            .copied()
    }

    fn unindex(&mut self, hash: u64, id: LookupId) {
        if let Ok(entry) = self.by_key.find_entry(hash, |&i| i == id) {
            entry.remove();
        }
    }

    /// Opens a lookup in a free slot, under its key.
    fn insert(&mut self, lookup: Box<OpenLookup>) -> LookupId {
        let key_hash = lookup.key_hash;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.open.push(LookupSlot {
                    generation: 1,
                    lookup: None,
                });
                (self.open.len() - 1) as u32
            }
        };
        let entry = &mut self.open[slot as usize];
        entry.lookup = Some(lookup);
        self.open_count += 1;
        let id = lookup_id(slot, entry.generation);
        let open = &self.open;
        self.by_key.insert_unique(key_hash, id, |&i| {
            open_lookup(open, i).map_or(0, |l| l.key_hash)
        });
        id
    }

    /// Takes an open lookup out of its slot and the key index.
    fn take(&mut self, id: LookupId) -> Option<Box<OpenLookup>> {
        let slot = id_slot_mut(&mut self.open, id)?;
        let lookup = slot.lookup.take()?;
        // Never 0: 0 is no id.
        slot.generation = slot.generation.checked_add(1).unwrap_or(1);
        self.free.push(split_lookup_id(id).0);
        self.open_count -= 1;
        self.unindex(lookup.key_hash, id);
        Some(lookup)
    }

    pub fn resolver_configs(&self) -> usize {
        self.configs.len()
    }

    pub fn prune(&mut self, grace: Duration) {
        self.configs.prune(grace);
    }

    /// The lookup key of a query name and the resolver configuration that tells expansions
    /// apart.
    fn key_for(
        &mut self,
        pid: Option<u32>,
        cgroup_id: u64,
        cgroup_path: Option<&str>,
        qname: &QName,
    ) -> (LookupKey, Option<Arc<ResolverConfig>>) {
        let cfg = self.configs.get(pid, cgroup_id, cgroup_path);
        let asked = match &cfg {
            Some(cfg) => cfg.split(qname).0.len(),
            None => qname.len(),
        };
        (
            LookupKey {
                pid,
                cgroup_id,
                name: CaselessPrefix::new(qname.clone(), asked),
            },
            cfg,
        )
    }

    /// A query began: it opens its lookup or joins it. Returns the lookup's id, which the
    /// query carries (`Sender::lookup`) to [`Self::query_finished`].
    pub fn query_started(
        &mut self,
        ts_ns: u64,
        qname: &QName,
        qtype: u16,
        sender: &crate::correlate::Sender,
        out: &mut Vec<LookupRecord>,
    ) -> LookupId {
        let cgroup_path = sender.names.cgroup_path.as_deref();
        let (key, resolver) = self.key_for(sender.pid, sender.cgroup_id, cgroup_path, qname);
        let key_hash = self.hasher.hash_one(&key);
        let mut found = self.find_by_key(key_hash, &key);
        if let Some(id) = found {
            // Over by the time of this query, however late the daemon noticed: the process
            // that sends it lives.
            let over =
                open_lookup(&self.open, id).is_some_and(|l| self.over_at(l, ts_ns, |_| true));
            if over {
                self.close(id, out);
                found = None;
            }
        }
        if let Some(id) = found {
            if let Some(lookup) = self.get_mut(id) {
                let full = lookup.queries.len() + lookup.pending as usize >= MAX_QUERIES_PER_LOOKUP;
                // Nothing in flight, every question answered for good, and this very question
                // asked again: the program called its resolver anew.
                let new_call = lookup.pending == 0
                    && lookup.settled
                    && lookup.answered_before(qname, qtype, ts_ns);
                if !full && !new_call {
                    lookup.pending += 1;
                    lookup.first_send_ns = lookup.first_send_ns.min(ts_ns);
                    lookup.last_activity_ns = lookup.last_activity_ns.max(ts_ns);
                    return id;
                }
                // Taken out of the key index, no query can join it any more, nor a late answer
                // find it: it is over once nothing of it is pending. Kept open until then
                // (rather than until idle) it would hold a busy client's queries for a tick.
                lookup.indexed = false;
                let over = lookup.pending == 0;
                if full {
                    self.stats.capped += 1;
                }
                self.unindex(key_hash, id);
                if over {
                    self.close(id, out);
                }
            }
        }
        if self.open_count >= self.max_open {
            self.evict_oldest(out);
        }
        let mut lookup = match self.spare_lookups.pop() {
            Some(mut spare) => {
                *spare = OpenLookup::new(key, key_hash, resolver, ts_ns);
                spare
            }
            None => Box::new(OpenLookup::new(key, key_hash, resolver, ts_ns)),
        };
        lookup.pending = 1;
        let id = self.insert(lookup);
        self.order.push_back(id);
        id
    }

    /// A query ended (answered or timed out).
    pub fn query_finished(&mut self, query: &FinishedQuery, now_ns: u64) {
        let id = query.sender.lookup;
        let Some(lookup) = id_slot_mut(&mut self.open, id).and_then(|s| s.lookup.as_deref_mut())
        else {
            // Its lookup was evicted; the query record itself is still written.
            return;
        };
        if lookup.queries.capacity() == 0 {
            if let Some(list) = self.spare_query_lists.pop() {
                lookup.queries = list;
            }
        }
        lookup.pending = lookup.pending.saturating_sub(1);
        lookup.last_activity_ns = lookup
            .last_activity_ns
            .max(query.response_ts_ns.unwrap_or(now_ns));
        lookup.add(query);
        if !lookup.indexed && lookup.pending == 0 {
            if let Some(lookup) = self.take(id) {
                self.ended.push(lookup);
            }
        }
    }

    /// The records of lookups closed as their last query finished (see
    /// [`Self::query_finished`]), and with [`Self::deferring_records`] of all closed since,
    /// each handed to `write` as it is built: a record moved into a list and out again was
    /// copied twice for nothing.
    pub fn each_closed(&mut self, mut write: impl FnMut(LookupRecord)) {
        let mut ended = std::mem::take(&mut self.ended);
        for mut lookup in ended.drain(..) {
            if let Some(record) = self.finish(&mut lookup) {
                write(record);
            }
            self.keep_spare(lookup);
        }
        // The allocation is kept for the next ones.
        self.ended = ended;
    }

    /// A response or drop that came too late for its query. Returns it back when no lookup is
    /// open for it any more.
    ///
    /// A lookup that was over by the time it arrived is closed first (into `out`), however
    /// late the daemon noticed: the arrival is then an event of its own.
    pub fn late_arrival(
        &mut self,
        late: LateArrival,
        out: &mut Vec<LookupRecord>,
    ) -> Option<LateArrival> {
        let (key, _) = self.key_for(late.pid, late.cgroup_id, None, &late.qname);
        let mut found = self.find_by_key(self.hasher.hash_one(&key), &key);
        if let Some(id) = found {
            let over = open_lookup(&self.open, id)
                .is_some_and(|l| self.over_at(l, late.ts_ns, |pid| self.alive(pid)));
            if over {
                self.close(id, out);
                found = None;
            }
        }
        match found.and_then(|id| self.get_mut(id)) {
            Some(lookup) => {
                lookup.late.push(late);
                None
            }
            None => Some(late),
        }
    }

    /// Whether `l` was over by kernel time `now_ns`: quiet for long enough, nothing pending and
    /// nothing the resolver may still retry. `alive` tells whether the lookup's process still
    /// lives; it is asked last, as it reads /proc.
    fn over_at(
        &self,
        l: &OpenLookup,
        now_ns: u64,
        alive: impl FnOnce(Option<u32>) -> bool,
    ) -> bool {
        let idle_ns = self.idle_ns;
        let quiet = now_ns.saturating_sub(l.last_activity_ns);
        if quiet >= self.stale_ns.max(l.patience_ns().saturating_add(idle_ns)) {
            return true;
        }
        if l.pending > 0 || quiet < idle_ns {
            return false;
        }
        // A question last answered with SERVFAIL (or not at all) may still be retried by the
        // resolver (musl retries for its whole timeout): wait as long as it would, unless
        // everything got a definitive answer.
        l.settled
            || now_ns.saturating_sub(l.first_send_ns) >= l.patience_ns().saturating_add(idle_ns)
            // A resolver can only retry while its process lives: once the client has exited,
            // its lookup is over, whatever the last answer was.
            || !alive(l.key.pid)
    }

    /// Whether the process `pid` still lives (unknown processes are taken as alive).
    fn alive(&self, pid: Option<u32>) -> bool {
        pid.is_none_or(|pid| self.configs.proc_root.join(pid.to_string()).exists())
    }

    /// Closes lookups that have been quiet long enough, at kernel time `now_ns`.
    pub fn close_idle(&mut self, now_ns: u64, out: &mut Vec<LookupRecord>) {
        let done: Vec<LookupId> = self
            .open
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let id = lookup_id(slot as u32, s.generation);
                s.lookup.as_deref().map(|l| (id, l))
            })
            .filter(|(_, l)| self.over_at(l, now_ns, |pid| self.alive(pid)))
            .map(|(id, _)| id)
            .collect();
        for id in done {
            self.close(id, out);
        }
        // Closed ids linger in the eviction order until they reach its front; drop them once
        // they outnumber the open lookups, so the order stays proportional to what is open.
        if self.order.len() > 2 * self.open_count + 1024 {
            let open = &self.open;
            self.order.retain(|&id| open_lookup(open, id).is_some());
        }
    }

    /// Ends every open lookup (at shutdown).
    pub fn close_all(&mut self, out: &mut Vec<LookupRecord>) {
        let all: Vec<LookupId> = self.order.drain(..).collect();
        for id in all {
            self.close(id, out);
        }
    }

    fn close(&mut self, id: LookupId, out: &mut Vec<LookupRecord>) {
        let Some(mut lookup) = self.take(id) else {
            return;
        };
        if self.defer_records {
            self.ended.push(lookup);
        } else {
            if let Some(record) = self.finish(&mut lookup) {
                out.push(record);
            }
            self.keep_spare(lookup);
        }
    }

    /// Empties a closed lookup's box and query list, and keeps them for the next lookups
    /// unless enough are kept already.
    fn keep_spare(&mut self, mut lookup: Box<OpenLookup>) {
        let mut queries = std::mem::take(&mut lookup.queries);
        if queries.capacity() > 0
            && queries.capacity() <= SPARE_LIST_CAPACITY
            && self.spare_query_lists.len() < SPARES_KEPT
        {
            queries.clear();
            self.spare_query_lists.push(queries);
        }
        if self.spare_lookups.len() < SPARES_KEPT {
            // What it holds is let go now rather than when the box is used again; the key's
            // name, left, is one reference.
            lookup.questions = Vec::new();
            lookup.late = Vec::new();
            lookup.sender = None;
            lookup.resolver = None;
            self.spare_lookups.push(lookup);
        }
    }

    /// Closes the oldest open lookup to make room.
    fn evict_oldest(&mut self, out: &mut Vec<LookupRecord>) {
        while let Some(id) = self.order.pop_front() {
            if open_lookup(&self.open, id).is_some() {
                self.stats.evicted += 1;
                // Reported early rather than lost: what it holds so far is still true.
                self.close(id, out);
                return;
            }
        }
    }

    fn finish(&mut self, lookup: &mut OpenLookup) -> Option<LookupRecord> {
        if lookup.queries.is_empty() {
            return None;
        }
        self.stats.lookups += 1;
        // A sort moves every query even when they are in order already, as they nearly always
        // are.
        if !lookup.queries.is_sorted_by_key(LookupQuery::order) {
            lookup.queries.sort_by_key(LookupQuery::order);
        }
        Some(build_record(lookup, &self.diagnosis))
    }
}

/// A lookup none of `diagnose`'s sections has anything to say about: no search-list expansion,
/// no late answer, and every query sent once, answered in time, not SERVFAIL, not truncated
/// and with no drop. Stricter than the sections together (a truncated TCP answer, say, is
/// left to them), never looser.
fn plainly_healthy(lookup: &OpenLookup, cfg: &DiagnosisConfig) -> bool {
    lookup.late.is_empty()
        && lookup.expansions().next().is_none()
        && lookup.queries.iter().all(|q| {
            q.outcome == Outcome::Answered
                && q.rcode != Some(RCODE_SERVFAIL)
                && !q.truncated
                && q.drops.is_empty()
                && q.send_ts_ns.len() == 1
                && q.latency_ns().is_some_and(|l| l < cfg.slow_ns)
        })
}

/// Whether `q` asked a search-list expansion of its lookup's name rather than the name itself.
/// A query joins a lookup only under the name its resolver was asked, which is its own name
/// with any search domain cut off: it asked that very name exactly when the lengths agree.
/// Comparing the names byte by byte was most of the cost of closing a long lookup.
fn is_expansion(lookup_name: &str, q: &LookupQuery) -> bool {
    debug_assert!(
        q.qname
            .as_bytes()
            .get(..lookup_name.len())
            .is_some_and(|asked| asked.eq_ignore_ascii_case(lookup_name.as_bytes())),
        "{} is in the lookup of {lookup_name}",
        q.qname
    );
    q.qname.len() != lookup_name.len()
}

/// Whether two query names are the same name, without case. The final name is one of the
/// lookup's own query names, so in most lookups (one query, or A and AAAA of one name) the
/// comparison is of a name with its very self, which the addresses tell at once.
fn same_name(a: &str, b: &str) -> bool {
    std::ptr::eq(a, b) || a.eq_ignore_ascii_case(b)
}

fn build_record(lookup: &OpenLookup, cfg: &DiagnosisConfig) -> LookupRecord {
    let end_ns = lookup_end_ns(lookup, cfg.query_timeout_ns);
    let queries = &lookup.queries;
    // The decisive answer: the last one that carried data, else the last response of all.
    let with_answers = queries
        .iter()
        .filter(|q| q.rcode == Some(RCODE_NOERROR) && !q.answers.is_empty())
        .max_by_key(|q| q.response_ts_ns);
    let last_response = queries
        .iter()
        .filter(|q| q.response_ts_ns.is_some())
        .max_by_key(|q| q.response_ts_ns);
    let final_query = with_answers.or(last_response);
    // Compared without case wherever it is used.
    let final_name = final_query.map(|q| &*q.qname);
    let mut answers = Answers::new();
    if let Some(final_name) = final_name {
        for q in queries
            .iter()
            .filter(|q| same_name(&q.qname, final_name) && q.rcode == Some(RCODE_NOERROR))
        {
            for a in &q.answers {
                if !answers.contains(a) {
                    answers.push(a.clone());
                }
            }
        }
    }
    let duration_ns = end_ns.saturating_sub(lookup.first_send_ns);
    // The final name's worst latest answer: A answered but AAAA still SERVFAIL is a failed
    // lookup for musl (and a degraded one for glibc), so it must not read NOERROR.
    // A failure the resolver never asked again about, next to an answer of another type, is
    // one it accepted (glibc returns the A answer when AAAA fails); one it kept retrying (musl)
    // failed the lookup.
    let final_rcode = match final_name {
        Some(final_name) => {
            let has_answers = !answers.is_empty();
            // The resolver insisted on a question when it resent it after waiting, or asked
            // again after a failure answer.
            let insisted = |name: &str, qtype: u16, rcode: &Option<u16>| -> bool {
                let mut sends: Vec<u64> = queries
                    .iter()
                    .filter(|q| q.qtype == qtype && q.qname.eq_ignore_ascii_case(name))
                    .flat_map(|q| q.send_ts_ns.iter().copied())
                    .collect();
                sends.sort_unstable();
                let waited = sends.windows(2).any(|w| w[1] - w[0] >= REACTION_NS);
                waited || (rcode.is_some() && sends.len() > 1)
            };
            let mut worst: Option<Option<u16>> = None;
            // The latest answer of every question, kept as the queries finished.
            for QuestionView {
                name, qtype, rcode, ..
            } in lookup.questions()
            {
                if !same_name(name, final_name) {
                    continue;
                }
                let rcode = &rcode;
                let accepted_failure = has_answers
                    && !matches!(rcode, Some(RCODE_NOERROR))
                    && !insisted(name, qtype, rcode);
                if accepted_failure {
                    continue;
                }
                let rank = |r: &Option<u16>| match r {
                    Some(RCODE_NOERROR) => 0,
                    Some(RCODE_NXDOMAIN) => 1,
                    Some(_) => 2,
                    None => 3,
                };
                if worst.as_ref().is_none_or(|w| rank(rcode) > rank(w)) {
                    worst = Some(*rcode);
                }
            }
            worst.flatten()
        }
        None => None,
    };
    let diagnosis = diagnose(lookup, cfg);
    let sender = lookup.sender.as_ref().map(|(_, s)| s);
    LookupRecord {
        event: "lookup",
        time_ns: lookup.first_send_ns,
        name: lookup.key.name.to_lowercase_shared(),
        duration_ns,
        queries: queries.len(),
        search_expansions: lookup.expansions().count(),
        final_rcode: final_rcode.map(rcode_mnemonic),
        answers,
        pid: lookup.key.pid,
        // The first query's, as its process and cgroup are the lookup's (the key): not kept in
        // the open lookup, which can be the only state of an unanswered query.
        comm: sender.and_then(|s| s.names.comm.clone()),
        cgroup_id: lookup.key.cgroup_id,
        cgroup_path: sender.and_then(|s| s.names.cgroup_path.clone()),
        workload: sender.and_then(|s| s.names.workload.clone()),
        resolver: lookup.resolver.clone(),
        diagnosis,
    }
}

fn ms(ns: u64) -> String {
    format!("{:.1} ms", ns as f64 / 1e6)
}

fn describe(q: &LookupQuery) -> String {
    format!("{} {}", qtype_name(q.qtype), q.qname)
}

fn diagnose(lookup: &OpenLookup, cfg: &DiagnosisConfig) -> Vec<Diagnosis> {
    // Most lookups: no section of `diagnose_all` would find anything, and this says so in one
    // pass. Debug builds (every test) check that on each lookup.
    if plainly_healthy(lookup, cfg) {
        debug_assert!(
            diagnose_all(lookup, cfg).is_empty(),
            "a lookup taken for healthy has a diagnosis"
        );
        return Vec::new();
    }
    diagnose_all(lookup, cfg)
}

fn diagnose_all(lookup: &OpenLookup, cfg: &DiagnosisConfig) -> Vec<Diagnosis> {
    let queries = &lookup.queries;
    let mut out = Vec::new();

    // search_list_expansion: names built from the search list before (or instead of) the name.
    let expansions = lookup.expansions().count();
    if expansions > 0 {
        let first_own = queries
            .iter()
            .filter(|q| !is_expansion(lookup.name(), q))
            .map(|q| q.first_send_ns())
            .min();
        let exp_end = lookup
            .expansions()
            .map(|q| q.response_ts_ns.unwrap_or(q.first_send_ns()))
            .max()
            .unwrap_or(lookup.first_send_ns);
        let cost = first_own
            .unwrap_or(exp_end)
            .saturating_sub(lookup.first_send_ns);
        let mut names: Vec<String> = Vec::new();
        for q in lookup.expansions() {
            let n = q.qname.to_ascii_lowercase();
            if !names.contains(&n) {
                names.push(n);
            }
        }
        let rcodes: Vec<String> = lookup
            .expansions()
            .map(|q| q.rcode.map(rcode_name).unwrap_or_else(|| "none".into()))
            .collect();
        let ndots = lookup.resolver.as_ref().map(|r| r.ndots);
        out.push(Diagnosis {
            code: "search_list_expansion",
            message: format!(
                "{} of {} queries were search-list expansions of {} ({} names{}); they cost {} before the name itself was asked",
                expansions,
                queries.len(),
                lookup.name(),
                names.len(),
                ndots.map(|n| format!(", ndots:{n}")).unwrap_or_default(),
                ms(cost)
            ),
            evidence: json!({
                "extra_queries": expansions,
                "names": names,
                "rcodes": rcodes,
                "cost_ns": cost,
                "ndots": ndots,
            }),
        });
    }

    // servfail_retry: the same question asked again after a SERVFAIL.
    let mut retries = 0u32;
    let mut servfail_latencies = Vec::new();
    let mut retried: Vec<String> = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        if q.rcode != Some(RCODE_SERVFAIL) {
            continue;
        }
        servfail_latencies.push(q.latency_ns().unwrap_or_default());
        let resp = q.response_ts_ns.unwrap_or(u64::MAX);
        let asked_again = queries.iter().skip(i + 1).any(|later| {
            later.qtype == q.qtype
                && later.qname.eq_ignore_ascii_case(&q.qname)
                && later.first_send_ns() >= resp
        });
        // musl re-sends the same id on the same socket: that shows as extra sends.
        let resent_same = q.send_ts_ns.iter().filter(|&&t| t >= resp).count();
        if asked_again || resent_same > 0 {
            retries += 1;
            let d = describe(q);
            if !retried.contains(&d) {
                retried.push(d);
            }
        }
    }
    if retries > 0 {
        out.push(Diagnosis {
            code: "servfail_retry",
            message: format!(
                "the resolver asked again {retries} time(s) after SERVFAIL ({})",
                retried.join(", ")
            ),
            evidence: json!({
                "retries": retries,
                "questions": retried,
                "servfail_latencies_ns": servfail_latencies,
            }),
        });
    }

    // slow_upstream: answers slower than the threshold, per server.
    let mut slow: HashMap<SocketAddr, (u32, u64)> = HashMap::new();
    for q in queries {
        if let Some(lat) = q.latency_ns() {
            if lat >= cfg.slow_ns {
                let e = slow.entry(q.server).or_default();
                e.0 += 1;
                e.1 = e.1.max(lat);
            }
        }
    }
    let mut slow: Vec<(SocketAddr, (u32, u64))> = slow.into_iter().collect();
    slow.sort();
    for (server, (count, max)) in slow {
        out.push(Diagnosis {
            code: "slow_upstream",
            message: format!(
                "{server} answered {count} quer{} slower than {} (slowest {})",
                if count == 1 { "y" } else { "ies" },
                ms(cfg.slow_ns),
                ms(max)
            ),
            evidence: json!({"server": server.to_string(), "count": count, "max_latency_ns": max, "threshold_ns": cfg.slow_ns}),
        });
    }

    // Drops: conntrack insert failures and any other kernel reason. A response dropped because
    // nobody was listening any more is a late response, not a network problem.
    let mut unread: Vec<LateArrival> = Vec::new();
    for q in queries {
        for d in &q.drops {
            if d.packet == crate::correlate::DroppedPacket::Response
                && UNREAD_RESPONSE_REASONS.contains(&d.reason.as_str())
            {
                unread.push(LateArrival {
                    ts_ns: d.ts_ns,
                    id: q.id,
                    qname: q.qname.clone(),
                    qtype: q.qtype,
                    after_first_send_ns: d.ts_ns.saturating_sub(q.first_send_ns()),
                    why: d.reason.clone(),
                    pid: lookup.key.pid,
                    cgroup_id: lookup.key.cgroup_id,
                });
                continue;
            }
            // The wait runs from the send that was dropped (the last one before the drop) to
            // the next time the resolver asked, on this query or a new one.
            let dropped_send = q
                .send_ts_ns
                .iter()
                .copied()
                .filter(|&t| t <= d.ts_ns)
                .max()
                .unwrap_or_else(|| q.first_send_ns());
            let resend = q.send_ts_ns.iter().copied().find(|&t| t > d.ts_ns);
            let later_query = queries
                .iter()
                .filter(|l| {
                    l.qtype == q.qtype
                        && l.qname.eq_ignore_ascii_case(&q.qname)
                        && l.first_send_ns() > d.ts_ns
                })
                .map(|l| l.first_send_ns())
                .min();
            let retry_after = resend
                .or(later_query)
                .map(|t| t.saturating_sub(dropped_send));
            let evidence = json!({
                "id": q.id,
                "question": describe(q),
                "packet": d.packet.as_str(),
                "reason": d.reason,
                "detail": d.detail,
                "location": d.location,
                "netns": d.netns_inum,
                "drop_ns": d.ts_ns,
                "first_send_ns": q.first_send_ns(),
                "dropped_send_ns": dropped_send,
                "resolver_waited_ns": retry_after,
            });
            if d.kind == "conntrack_insert_failed" {
                let wait = retry_after
                    .map(|w| format!("; the resolver waited {} before asking again", ms(w)))
                    .unwrap_or_else(|| "; the resolver never asked again".into());
                out.push(Diagnosis {
                    code: "conntrack_insert_failed",
                    message: format!(
                        "the {} for {} (id {}) was dropped by conntrack: insert failed ({}) in network namespace {}{wait}",
                        d.packet.as_str(),
                        describe(q),
                        q.id,
                        d.detail.as_deref().unwrap_or("race"),
                        d.netns_inum
                    ),
                    evidence,
                });
            } else {
                out.push(Diagnosis {
                    code: "packet_drop",
                    message: format!(
                        "the kernel dropped the {} for {} (id {}): {} at {}",
                        d.packet.as_str(),
                        describe(q),
                        q.id,
                        d.reason,
                        d.location
                    ),
                    evidence,
                });
            }
        }
    }

    // resend_after_timeout: the same query sent again, or asked anew after no answer.
    let mut resends = Vec::new();
    for (i, q) in queries.iter().enumerate() {
        // Sends are in the order the ring delivered them, which across CPUs is not strictly
        // the order of their kernel timestamps.
        for pair in q.send_ts_ns.windows(2) {
            // A resend after SERVFAIL is a retry (above), not a timeout.
            let after_servfail =
                q.rcode == Some(RCODE_SERVFAIL) && q.response_ts_ns.is_some_and(|r| r <= pair[1]);
            if !after_servfail {
                resends.push(
                    json!({"id": q.id, "question": describe(q), "waited_ns": pair[1].saturating_sub(pair[0])}),
                );
            }
        }
        if q.response_ts_ns.is_none() {
            if let Some(later) = queries
                .iter()
                .skip(i + 1)
                .find(|l| l.qtype == q.qtype && l.qname.eq_ignore_ascii_case(&q.qname))
            {
                resends.push(json!({
                    "id": q.id,
                    "question": describe(q),
                    "new_id": later.id,
                    "waited_ns": later.first_send_ns().saturating_sub(q.first_send_ns()),
                }));
            }
        }
    }
    if !resends.is_empty() {
        let max_wait = resends
            .iter()
            .filter_map(|r| r["waited_ns"].as_u64())
            .max()
            .unwrap_or_default();
        out.push(Diagnosis {
            code: "resend_after_timeout",
            message: format!(
                "the resolver sent {} quer{} again after waiting for an answer (longest wait {})",
                resends.len(),
                if resends.len() == 1 { "y" } else { "ies" },
                ms(max_wait)
            ),
            evidence: json!({"resends": resends}),
        });
    }

    // late_response: answers that arrived when the client no longer listened.
    let late: Vec<&LateArrival> = lookup.late.iter().chain(unread.iter()).collect();
    if !late.is_empty() {
        let items: Vec<serde_json::Value> = late
            .iter()
            .map(|l| {
                json!({
                    "id": l.id,
                    "question": format!("{} {}", qtype_name(l.qtype), l.qname),
                    "why": l.why,
                    "after_first_send_ns": l.after_first_send_ns,
                })
            })
            .collect();
        out.push(Diagnosis {
            code: "late_response",
            message: format!(
                "{} response(s) arrived after the client stopped waiting ({})",
                late.len(),
                late.iter()
                    .map(|l| format!("id {} {}", l.id, l.why))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            evidence: json!({"responses": items}),
        });
    }

    // truncated_tcp_fallback: a truncated UDP answer followed by the same question over TCP.
    for q in queries
        .iter()
        .filter(|q| q.transport == Transport::Udp && q.truncated)
    {
        let tcp = queries.iter().find(|t| {
            t.transport == Transport::Tcp
                && t.qtype == q.qtype
                && t.qname.eq_ignore_ascii_case(&q.qname)
                && t.first_send_ns() >= q.response_ts_ns.unwrap_or(0)
        });
        let extra = tcp.and_then(|t| {
            t.response_ts_ns
                .map(|r| r.saturating_sub(q.response_ts_ns.unwrap_or(r)))
        });
        out.push(Diagnosis {
            code: "truncated_tcp_fallback",
            message: match tcp {
                Some(t) => format!(
                    "the UDP answer to {} was truncated; the resolver asked again over TCP (id {}){}",
                    describe(q),
                    t.id,
                    extra.map(|e| format!(", which took {} more", ms(e))).unwrap_or_default()
                ),
                None => format!(
                    "the UDP answer to {} was truncated and no TCP retry was seen",
                    describe(q)
                ),
            },
            evidence: json!({
                "udp_id": q.id,
                "tcp_id": tcp.map(|t| t.id),
                "extra_ns": extra,
            }),
        });
    }

    // no_response: queries that never got an answer.
    let unanswered: Vec<&LookupQuery> = queries
        .iter()
        .filter(|q| q.outcome != Outcome::Answered)
        .collect();
    if !unanswered.is_empty() {
        out.push(Diagnosis {
            code: "no_response",
            message: format!(
                "{} quer{} got no answer ({})",
                unanswered.len(),
                if unanswered.len() == 1 { "y" } else { "ies" },
                unanswered
                    .iter()
                    .map(|q| format!("{} from {}", describe(q), q.server))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            evidence: json!({
                "queries": unanswered.iter().map(|q| json!({
                    "id": q.id,
                    "question": describe(q),
                    "server": q.server.to_string(),
                    "sends": q.send_ts_ns.len(),
                    "outcome": q.outcome.as_str(),
                })).collect::<Vec<_>>(),
            }),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::{DropRecord, DroppedPacket, Sender};

    const MS: u64 = 1_000_000;

    #[test]
    fn resolv_conf_parsing() {
        let cfg = ResolverConfig::parse(
            "nameserver 10.96.0.10\nsearch NS1.svc.cluster.local svc.cluster.local. cluster.local # pods\noptions ndots:5 timeout:2\n",
        );
        assert_eq!(
            cfg.search,
            vec![
                "ns1.svc.cluster.local.",
                "svc.cluster.local.",
                "cluster.local."
            ]
        );
        assert_eq!(cfg.ndots, 5);
        assert_eq!(ResolverConfig::parse("").ndots, 1);
        // The last search line wins.
        assert_eq!(
            ResolverConfig::parse("search a.example\nsearch b.example\n").search,
            vec!["b.example."]
        );
    }

    #[test]
    fn splits_the_longest_search_domain() {
        let cfg =
            ResolverConfig::parse("search ns1.svc.cluster.local svc.cluster.local cluster.local\n");
        assert_eq!(
            cfg.split("www.example.com.ns1.svc.cluster.local."),
            ("www.example.com.", Some("ns1.svc.cluster.local."))
        );
        assert_eq!(
            cfg.split("www.example.com.cluster.local."),
            ("www.example.com.", Some("cluster.local."))
        );
        assert_eq!(cfg.split("www.example.com."), ("www.example.com.", None));
        // A name that is a search domain itself is not an expansion of anything.
        assert_eq!(cfg.split("cluster.local."), ("cluster.local.", None));
        // Label boundaries matter.
        assert_eq!(cfg.split("xcluster.local."), ("xcluster.local.", None));
    }

    fn sender() -> Sender {
        Sender {
            pid: Some(7),
            tid: Some(7),
            cgroup_id: 99,
            names: Arc::new(crate::correlate::SenderNames {
                comm: Some("gai-musl".into()),
                thread_comm: Some("gai-musl".into()),
                cgroup_path: Some("/pod".into()),
                workload: None,
            }),
            lookup: 0,
        }
    }

    fn query(
        name: &str,
        qtype: u16,
        id: u16,
        sends: &[u64],
        response: Option<u64>,
        rcode: Option<u16>,
    ) -> FinishedQuery {
        FinishedQuery {
            qname: name.into(),
            qtype,
            id,
            transport: Transport::Udp,
            client: "10.0.0.1:40000".parse().unwrap(),
            server: "10.0.0.2:53".parse().unwrap(),
            socket_cookie: 1,
            send_ts_ns: sends.into(),
            response_ts_ns: response,
            outcome: if response.is_some() {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            },
            rcode,
            truncated: false,
            answers: if rcode == Some(0) {
                smallvec::smallvec!["10.1.2.3".into()]
            } else {
                Default::default()
            },
            sender: sender(),
            drops: Vec::new(),
        }
    }

    /// The record names the process, cgroup and pod of the query sent first, whichever
    /// finished first.
    #[test]
    fn the_record_names_the_sender_of_the_first_query_sent() {
        let mut later = query("x.example.", 28, 2, &[20 * MS], Some(21 * MS), Some(0));
        later.sender.names_mut().comm = Some("second".into());
        let mut first = query("x.example.", 1, 1, &[10 * MS], Some(30 * MS), Some(0));
        first.sender.names_mut().comm = Some("first".into());
        first.sender.names_mut().cgroup_path = Some("/first".into());
        let r = build_record(&lookup("x.example.", vec![later, first]), &CFG);
        assert_eq!(r.comm.as_deref(), Some("first"));
        assert_eq!(r.cgroup_path.as_deref(), Some("/first"));
    }

    fn lookup(name: &str, queries: Vec<FinishedQuery>) -> OpenLookup {
        let key = LookupKey {
            pid: Some(7),
            cgroup_id: 99,
            name: CaselessPrefix::new(name.into(), name.len()),
        };
        let resolver = Some(Arc::new(ResolverConfig {
            search: vec!["ns1.svc.cluster.local.".into()],
            ndots: 5,
            timeout_s: 5,
            attempts: 2,
        }));
        let first = queries.iter().map(|q| q.first_send_ns()).min().unwrap();
        let mut l = OpenLookup::new(key, 0, resolver, first);
        l.last_activity_ns = 0;
        let kept: Vec<LookupQuery> = queries.iter().map(LookupQuery::of).collect();
        let expected = settled(&kept);
        for q in queries {
            l.add(&q);
        }
        assert_eq!(
            l.settled, expected,
            "incremental and recomputed settled differ"
        );
        let questions: HashMap<(String, u16), Option<u16>> = l
            .questions()
            .map(|q| ((q.name.to_ascii_lowercase(), q.qtype), q.rcode))
            .collect();
        assert_eq!(
            questions,
            latest_rcodes(&kept),
            "incremental and recomputed questions differ"
        );
        assert_eq!(
            l.questions().count(),
            questions.len(),
            "a question is listed twice"
        );
        l
    }

    fn codes(record: &LookupRecord) -> Vec<&'static str> {
        record.diagnosis.iter().map(|d| d.code).collect()
    }

    const CFG: DiagnosisConfig = DiagnosisConfig {
        slow_ns: 500 * MS,
        query_timeout_ns: 10_000 * MS,
    };

    /// Each way out of the shortcut, one at a time; the sections' own tests cover what they
    /// find, and every lookup of every debug build checks the shortcut against them.
    #[test]
    fn only_plainly_healthy_lookups_skip_the_diagnosis() {
        let one = |sends: &[u64], response: Option<u64>, rcode: Option<u16>| {
            query("www.example.com.", 1, 1, sends, response, rcode)
        };
        let ok = || one(&[0], Some(MS), Some(0));
        let healthy =
            |q: FinishedQuery| plainly_healthy(&lookup("www.example.com.", vec![q]), &CFG);
        assert!(healthy(ok()));
        assert!(healthy(one(&[0], Some(MS), Some(3))));
        assert!(!healthy(one(&[0], None, None)));
        assert!(!healthy(one(&[0], Some(MS), Some(2))));
        assert!(!healthy(one(&[0, MS], Some(2 * MS), Some(0))));
        assert!(!healthy(one(&[0], Some(600 * MS), Some(0))));
        let mut truncated = ok();
        truncated.truncated = true;
        assert!(!healthy(truncated));
        let mut dropped = ok();
        dropped.drops.push(response_to_closed_socket(2 * MS, 1));
        assert!(!healthy(dropped));
        let expanded = query(
            "www.example.com.ns1.svc.cluster.local.",
            1,
            1,
            &[0],
            Some(MS),
            Some(3),
        );
        assert!(!plainly_healthy(
            &lookup("www.example.com.", vec![expanded]),
            &CFG
        ));
    }

    #[test]
    fn healthy_lookup_has_no_diagnosis() {
        let l = lookup(
            "www.example.com.",
            vec![
                query("www.example.com.", 1, 1, &[0], Some(MS), Some(0)),
                query("www.example.com.", 28, 2, &[0], Some(MS), Some(0)),
            ],
        );
        let r = build_record(&l, &CFG);
        assert!(r.diagnosis.is_empty(), "{:?}", r.diagnosis);
        assert_eq!(r.final_rcode.as_deref(), Some("NOERROR"));
        assert_eq!(r.duration_ns, MS);
        assert_eq!(r.search_expansions, 0);
        assert_eq!(r.answers.as_slice(), ["10.1.2.3"]);
    }

    #[test]
    fn alpine_case_expansions_servfail_retries_and_slow_upstream() {
        let exp = "www.example.com.ns1.svc.cluster.local.";
        let l = lookup(
            "www.example.com.",
            vec![
                query(exp, 1, 1, &[0], Some(MS), Some(3)),
                query(exp, 28, 2, &[0], Some(MS), Some(3)),
                query("www.example.com.", 1, 3, &[2 * MS], Some(3 * MS), Some(0)),
                query(
                    "www.example.com.",
                    28,
                    4,
                    &[2 * MS],
                    Some(1502 * MS),
                    Some(2),
                ),
                // musl asks again with the same id after SERVFAIL.
                query(
                    "www.example.com.",
                    28,
                    4,
                    &[1502 * MS],
                    Some(3002 * MS),
                    Some(2),
                ),
            ],
        );
        let r = build_record(&l, &CFG);
        assert_eq!(
            codes(&r),
            vec!["search_list_expansion", "servfail_retry", "slow_upstream"]
        );
        assert_eq!(r.search_expansions, 2);
        assert_eq!(r.duration_ns, 3002 * MS);
        // AAAA never got past SERVFAIL: the lookup failed (musl's getaddrinfo says EAI_AGAIN).
        assert_eq!(r.final_rcode.as_deref(), Some("SERVFAIL"));
        assert_eq!(r.answers.as_slice(), ["10.1.2.3"]);
        let exp_diag = &r.diagnosis[0];
        assert_eq!(exp_diag.evidence["extra_queries"], 2);
        assert_eq!(exp_diag.evidence["cost_ns"], 2 * MS);
        assert_eq!(r.diagnosis[1].evidence["retries"], 1);
        assert_eq!(r.diagnosis[2].evidence["count"], 2);
    }

    #[test]
    fn unanswered_lookup_ends_one_retry_interval_after_the_last_resend() {
        // musl, timeout:1 attempts:2: resends every 500 ms, gives up after 1 s.
        let mut q = query("x.example.", 1, 9, &[0, 500 * MS], None, None);
        q.outcome = Outcome::Unanswered;
        let r = build_record(&lookup("x.example.", vec![q]), &CFG);
        assert_eq!(r.duration_ns, 1000 * MS);
        assert_eq!(r.final_rcode, None);
    }

    #[test]
    fn servfail_retries_keep_the_clock_running_until_the_resolver_gives_up() {
        // musl, timeout 5 s, attempts 2: AAAA SERVFAIL after 1.5 s, immediate retries answered
        // from cache, a timed resend at 2.5 s with its own immediate retries, then silence
        // until musl gives up at 5 s.
        let mut queries = vec![
            query("a.example.", 1, 1, &[0], Some(MS), Some(0)),
            query("a.example.", 28, 2, &[0], Some(1500 * MS), Some(2)),
            query("a.example.", 28, 2, &[1501 * MS], Some(1502 * MS), Some(2)),
            query("a.example.", 28, 2, &[2500 * MS], Some(2501 * MS), Some(2)),
            query("a.example.", 28, 2, &[2502 * MS], Some(2503 * MS), Some(2)),
        ];
        queries[0].answers = smallvec::smallvec!["10.1.2.3".into()];
        let l = lookup("a.example.", queries);
        assert!(!settled(&l.queries));
        let r = build_record(&l, &CFG);
        assert_eq!(r.duration_ns, 5000 * MS);
        assert_eq!(r.final_rcode.as_deref(), Some("SERVFAIL"));
    }

    #[test]
    fn sends_out_of_timestamp_order_do_not_overflow() {
        // Two CPUs' events can reach the ring out of timestamp order.
        let q = query(
            "x.example.",
            1,
            9,
            &[500 * MS, 400 * MS],
            Some(600 * MS),
            Some(0),
        );
        let r = build_record(&lookup("x.example.", vec![q]), &CFG);
        assert_eq!(r.final_rcode.as_deref(), Some("NOERROR"));
    }

    #[test]
    fn a_servfail_taken_as_final_ends_at_the_answer() {
        // dig +tries=1: one send, SERVFAIL, nothing more.
        let r = build_record(
            &lookup(
                "a.example.",
                vec![query("a.example.", 1, 1, &[0], Some(30 * MS), Some(2))],
            ),
            &CFG,
        );
        assert_eq!(r.duration_ns, 30 * MS);
    }

    #[test]
    fn conntrack_drop_explains_the_resend() {
        let mut q = query(
            "svc.example.",
            1,
            9,
            &[0, 5000 * MS],
            Some(5001 * MS),
            Some(0),
        );
        q.drops.push(DropRecord {
            ts_ns: MS / 10,
            packet: DroppedPacket::Query,
            reason: "NETFILTER_DROP".into(),
            kind: "conntrack_insert_failed".into(),
            detail: Some("chaintoolong".into()),
            location: "nf_hook_slow+0x4c".into(),
            netns_inum: 4026532000,
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.96.0.10:53".parse().unwrap(),
            dns_id: Some(9),
        });
        let r = build_record(&lookup("svc.example.", vec![q]), &CFG);
        assert_eq!(
            codes(&r),
            vec![
                "slow_upstream",
                "conntrack_insert_failed",
                "resend_after_timeout"
            ]
        );
        let ct = &r.diagnosis[1];
        assert_eq!(ct.evidence["resolver_waited_ns"], 5000 * MS);
        assert!(ct.message.contains("chaintoolong"), "{}", ct.message);
    }

    #[test]
    fn other_drop_is_a_packet_drop_and_no_response() {
        let mut q = query("x.example.", 1, 9, &[0], None, None);
        q.outcome = Outcome::Dropped;
        q.drops.push(DropRecord {
            ts_ns: 10,
            packet: DroppedPacket::Query,
            reason: "NETFILTER_DROP".into(),
            kind: "netfilter_drop".into(),
            detail: None,
            location: "nft_do_chain+0x46f".into(),
            netns_inum: 1,
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:53".parse().unwrap(),
            dns_id: Some(9),
        });
        let r = build_record(&lookup("x.example.", vec![q]), &CFG);
        assert_eq!(codes(&r), vec!["packet_drop", "no_response"]);
        assert_eq!(r.final_rcode, None);
    }

    /// The kernel dropping the answer to query `id` (of `query`'s client and server) for want
    /// of a socket.
    fn response_to_closed_socket(ts_ns: u64, id: u16) -> DropRecord {
        DropRecord {
            ts_ns,
            packet: DroppedPacket::Response,
            reason: "NO_SOCKET".into(),
            kind: "no_socket".into(),
            detail: None,
            location: "__udp4_lib_rcv+0x9ab".into(),
            netns_inum: 1,
            src: "10.0.0.2:53".parse().unwrap(),
            dst: "10.0.0.1:40000".parse().unwrap(),
            dns_id: Some(id),
        }
    }

    #[test]
    fn response_to_a_closed_socket_is_late_not_a_network_drop() {
        let mut q = query("gone.example.", 1, 9, &[0], None, None);
        q.drops.push(response_to_closed_socket(2000 * MS, 9));
        let r = build_record(&lookup("gone.example.", vec![q]), &CFG);
        assert_eq!(codes(&r), vec!["late_response", "no_response"]);
        assert_eq!(r.diagnosis[0].evidence["responses"][0]["why"], "NO_SOCKET");
    }

    #[test]
    fn truncated_answer_then_tcp() {
        let mut udp = query("big.example.", 16, 1, &[0], Some(MS), Some(0));
        udp.truncated = true;
        let mut tcp = query("big.example.", 16, 2, &[2 * MS], Some(4 * MS), Some(0));
        tcp.transport = Transport::Tcp;
        let r = build_record(&lookup("big.example.", vec![udp, tcp]), &CFG);
        assert_eq!(codes(&r), vec!["truncated_tcp_fallback"]);
        assert_eq!(r.diagnosis[0].evidence["tcp_id"], 2);
        assert_eq!(r.diagnosis[0].evidence["extra_ns"], 3 * MS);
    }

    #[test]
    fn late_response_is_reported() {
        let q = query("late.example.", 1, 5, &[0], None, None);
        let mut l = lookup("late.example.", vec![q]);
        l.late.push(LateArrival {
            ts_ns: 3000 * MS,
            id: 5,
            qname: "late.example.".into(),
            qtype: 1,
            after_first_send_ns: 3000 * MS,
            why: "after_timeout".into(),
            pid: Some(7),
            cgroup_id: 99,
        });
        let r = build_record(&l, &CFG);
        assert_eq!(codes(&r), vec!["late_response", "no_response"]);
    }

    #[test]
    fn tracker_groups_by_process_and_asked_name_and_closes_when_idle() {
        let dir = std::env::temp_dir().join(format!("dnsprobe-lookup-{}", std::process::id()));
        // Fake /proc/<pid>/root/etc/resolv.conf for pid 7.
        let etc = dir.join("7/root/etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(
            etc.join("resolv.conf"),
            "search ns1.svc.cluster.local\noptions ndots:5\n",
        )
        .unwrap();
        let mut t = LookupTracker::new(
            ResolverConfigs::new(dir.clone(), dir.join("nocgroup")),
            Duration::from_millis(500),
            Duration::from_secs(10),
            16,
            CFG,
        );
        let mut out = Vec::new();
        let exp = "www.example.com.ns1.svc.cluster.local.";
        let first = t.query_started(0, &exp.into(), 1, &sender(), &mut out);
        let other = t.query_started(0, &"other.example.".into(), 1, &sender(), &mut out);
        assert_ne!(first, other);
        t.query_finished(
            &with_lookup(query(exp, 1, 1, &[0], Some(MS), Some(3)), first),
            MS,
        );
        let own = t.query_started(2 * MS, &"www.example.com.".into(), 1, &sender(), &mut out);
        assert_eq!(
            own, first,
            "the expansion and the name itself are one lookup"
        );
        assert_eq!(t.open_lookups(), 2);
        // Still pending: not closed however long it waits for idle.
        t.close_idle(100 * MS, &mut out);
        assert!(out.is_empty());
        t.query_finished(
            &with_lookup(
                query("www.example.com.", 1, 3, &[2 * MS], Some(3 * MS), Some(0)),
                own,
            ),
            3 * MS,
        );
        t.close_idle(3 * MS + 499 * MS, &mut out);
        assert!(out.is_empty(), "closed before idle");
        t.close_idle(3 * MS + 500 * MS, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].name, "www.example.com.");
        assert_eq!(out[0].queries, 2);
        assert_eq!(out[0].search_expansions, 1);
        // The other lookup's query never finished: closed once stale.
        t.close_idle(11_000 * MS, &mut out);
        assert_eq!(
            out.len(),
            1,
            "a lookup without finished queries emits nothing"
        );
        assert_eq!(t.open_lookups(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    fn with_lookup(mut q: FinishedQuery, id: LookupId) -> Box<FinishedQuery> {
        q.sender.lookup = id;
        Box::new(q)
    }

    fn tracker(max_open: usize) -> LookupTracker {
        let missing = std::env::temp_dir().join("dnsprobe-lookup-test-missing");
        LookupTracker::new(
            ResolverConfigs::new(missing.clone(), missing),
            Duration::from_millis(500),
            Duration::from_secs(10),
            max_open,
            CFG,
        )
    }

    /// A tracker deferring records gives, through `each_closed`, the very records a tracker
    /// giving them at once does, in the same order, whatever closed the lookups: a new call,
    /// eviction, idleness, shutdown.
    #[test]
    fn deferred_records_are_the_records_given_at_once() {
        const NAME: &str = "www.example.com.";
        const OTHER: &str = "other.example.com.";
        let run = |mut t: LookupTracker| {
            let mut out = Vec::new();
            let name: QName = NAME.into();
            let other: QName = OTHER.into();
            let answer = |t: &mut LookupTracker, n: &str, id, sent, lookup| {
                t.query_finished(
                    &with_lookup(query(n, 1, id, &[sent], Some(sent + MS), Some(0)), lookup),
                    sent + MS,
                );
            };
            // Answered, then asked again 100 ms later: a new call closes the first lookup.
            let a = t.query_started(0, &name, 1, &sender(), &mut out);
            answer(&mut t, NAME, 1, 0, a);
            let b = t.query_started(100 * MS, &name, 1, &sender(), &mut out);
            answer(&mut t, NAME, 2, 100 * MS, b);
            // Room for one lookup: another name evicts the second.
            let c = t.query_started(200 * MS, &other, 1, &sender(), &mut out);
            answer(&mut t, OTHER, 3, 200 * MS, c);
            t.close_idle(900 * MS, &mut out);
            let d = t.query_started(1000 * MS, &other, 1, &sender(), &mut out);
            answer(&mut t, OTHER, 4, 1000 * MS, d);
            t.close_all(&mut out);
            t.each_closed(|r| out.push(r));
            assert_eq!(t.closed_waiting(), 0);
            (out, t.stats())
        };
        let (at_once, at_once_stats) = run(tracker(1));
        let (deferred, deferred_stats) = run(tracker(1).deferring_records());
        assert_eq!(
            at_once.len(),
            4,
            "the scenario closed other lookups: {at_once:?}"
        );
        assert_eq!(at_once_stats.evicted, 1, "no lookup was evicted");
        assert_eq!(deferred, at_once);
        assert_eq!(format!("{deferred_stats:?}"), format!("{at_once_stats:?}"));
    }

    /// A lookup in a reused box, with a reused query list, reads as one in new ones: nothing
    /// of the lookups before it (their questions, diagnoses, late answers, sender) shows; and
    /// what is kept for reuse stays bounded, long query lists left out.
    #[test]
    fn reused_lookups_carry_nothing_of_the_ones_before() {
        const FAILING: &str = "a.example.";
        const HEALTHY: &str = "b.example.";
        // The healthy lookup alone, in a tracker that reused nothing.
        let healthy = |t: &mut LookupTracker, at: u64, out: &mut Vec<LookupRecord>| {
            let id = t.query_started(at, &HEALTHY.into(), 1, &sender(), out);
            t.query_finished(
                &with_lookup(query(HEALTHY, 1, 9, &[at], Some(at + MS), Some(0)), id),
                at + MS,
            );
            t.close_idle(at + 600 * MS, out);
        };
        for deferred in [false, true] {
            let fresh = |t: LookupTracker| if deferred { t.deferring_records() } else { t };
            let mut alone = fresh(tracker(1024));
            let mut want = Vec::new();
            healthy(&mut alone, 20_000 * MS, &mut want);
            alone.each_closed(|r| want.push(r));
            assert_eq!(want.len(), 1);
            // The second time in the first one's box and query list.
            healthy(&mut alone, 25_000 * MS, &mut want);
            alone.each_closed(|r| want.push(r));
            assert_eq!(want.len(), 2);

            let mut t = fresh(tracker(1024));
            let mut out = Vec::new();
            // A failing lookup first: SERVFAIL asked again five times, a late answer.
            let failing: QName = FAILING.into();
            let id = t.query_started(0, &failing, 28, &sender(), &mut out);
            for i in 0..6u16 {
                let at = u64::from(i) * 10 * MS;
                if i > 0 {
                    assert_eq!(t.query_started(at, &failing, 28, &sender(), &mut out), id);
                }
                t.query_finished(
                    &with_lookup(query(FAILING, 28, i, &[at], Some(at + MS), Some(2)), id),
                    at + MS,
                );
            }
            let late = LateArrival {
                ts_ns: 70 * MS,
                id: 0,
                qname: failing.clone(),
                qtype: 28,
                after_first_send_ns: 70 * MS,
                why: "duplicate".into(),
                pid: Some(7),
                cgroup_id: 99,
            };
            assert!(t.late_arrival(late, &mut out).is_none());
            t.close_idle(15_000 * MS, &mut out);
            t.each_closed(|r| out.push(r));
            assert_eq!(out.len(), 1);
            assert!(!out[0].diagnosis.is_empty(), "{:?}", out[0]);
            assert_eq!(t.spare_lookups.len(), 1);
            assert!(
                t.spare_query_lists.is_empty(),
                "a list of six queries is not kept"
            );
            // Then the healthy one, in the failing one's box, and again in its own box and list.
            let mut got = Vec::new();
            healthy(&mut t, 20_000 * MS, &mut got);
            t.each_closed(|r| got.push(r));
            assert_eq!(t.spare_query_lists.len(), 1);
            assert!(t.spare_query_lists[0].is_empty());
            let list = t.spare_query_lists[0].as_ptr();
            healthy(&mut t, 25_000 * MS, &mut got);
            t.each_closed(|r| got.push(r));
            assert_eq!(got, want, "deferred: {deferred}");
            assert_eq!(t.spare_query_lists.len(), 1);
            // Had the lookup got a new list, the kept one would have held on to its address.
            assert_eq!(t.spare_query_lists[0].as_ptr(), list, "the list was reused");

            // Many lookups closing at once: the spares kept stay bounded.
            for i in 0..(3 * SPARES_KEPT as u64) {
                let name: QName = format!("n{i}.example.").as_str().into();
                let at = 30_000 * MS + i;
                let id = t.query_started(at, &name, 1, &sender(), &mut out);
                t.query_finished(
                    &with_lookup(query(&name, 1, 1, &[at], Some(at + MS), Some(0)), id),
                    at + MS,
                );
            }
            t.close_idle(40_000 * MS, &mut out);
            t.each_closed(|r| out.push(r));
            assert_eq!(out.len(), 1 + 3 * SPARES_KEPT);
            assert_eq!(t.spare_lookups.len(), SPARES_KEPT);
            assert_eq!(t.spare_query_lists.len(), SPARES_KEPT);
        }
    }

    /// Whether a lookup is over follows kernel time, not when the daemon looked: a query or a
    /// late answer that comes after the lookup went idle finds it closed, though no tick
    /// closed it in between.
    #[test]
    fn a_lookup_over_by_the_time_of_a_packet_is_closed_then() {
        const NAME: &str = "www.example.com.";
        let mut t = tracker(16);
        let mut out = Vec::new();
        let name: QName = NAME.into();
        let first = t.query_started(0, &name, 28, &sender(), &mut out);
        t.query_finished(
            &with_lookup(query(NAME, 28, 1, &[0], Some(MS), Some(0)), first),
            MS,
        );
        // Another question of the name 600 ms later (idle ends lookups after 500 ms).
        let second = t.query_started(601 * MS, &name, 1, &sender(), &mut out);
        assert_ne!(first, second, "joined a lookup idle for 600 ms");
        assert_eq!(
            out.len(),
            1,
            "the idle lookup was not written when the next began"
        );
        assert_eq!(out[0].queries, 1);
        // Within the idle time: the same lookup.
        let third = t.query_started(602 * MS, &name, 28, &sender(), &mut out);
        assert_eq!(third, second);
        for (qtype, id, sent) in [(1, 2, 601 * MS), (28, 3, 602 * MS)] {
            t.query_finished(
                &with_lookup(
                    query(NAME, qtype, id, &[sent], Some(sent + MS), Some(0)),
                    second,
                ),
                sent + MS,
            );
        }
        let late = |ts_ns: u64| LateArrival {
            ts_ns,
            id: 3,
            qname: name.clone(),
            qtype: 28,
            after_first_send_ns: ts_ns - 602 * MS,
            why: "duplicate".into(),
            pid: sender().pid,
            cgroup_id: sender().cgroup_id,
        };
        // 400 ms after the last answer: still open, the duplicate joins it.
        assert!(t.late_arrival(late(1003 * MS), &mut out).is_none());
        assert_eq!(out.len(), 1);
        // 501 ms after it: over by then, so closed first; the duplicate is an event.
        assert!(t.late_arrival(late(1104 * MS), &mut out).is_some());
        assert_eq!(
            out.len(),
            2,
            "the lookup was not closed by the late arrival's time"
        );
        assert_eq!(out[1].queries, 2);
        assert_eq!(codes(&out[1]), ["late_response"]);
        assert_eq!(t.open_lookups(), 0);
    }

    #[test]
    fn asking_an_answered_question_again_is_a_new_lookup() {
        let mut t = tracker(16);
        let mut out = Vec::new();
        let a = t.query_started(0, &"db.example.".into(), 1, &sender(), &mut out);
        t.query_finished(
            &with_lookup(query("db.example.", 1, 1, &[0], Some(MS), Some(0)), a),
            MS,
        );
        // Asked again right after the answer (glibc after a TCP fallback): the same call.
        let again = t.query_started(2 * MS, &"db.example.".into(), 1, &sender(), &mut out);
        assert_eq!(again, a, "split within the reaction time");
        t.query_finished(
            &with_lookup(
                query("db.example.", 1, 2, &[2 * MS], Some(3 * MS), Some(0)),
                a,
            ),
            3 * MS,
        );
        // Asked again 100 ms later, with nothing in flight: a new resolver call.
        let b = t.query_started(103 * MS, &"db.example.".into(), 1, &sender(), &mut out);
        assert_ne!(a, b, "a settled lookup took a new resolver call");
        t.query_finished(
            &with_lookup(
                query("db.example.", 1, 3, &[103 * MS], Some(104 * MS), Some(0)),
                b,
            ),
            104 * MS,
        );
        t.close_idle(1_000 * MS, &mut out);
        let mut sizes: Vec<usize> = out.iter().map(|r| r.queries).collect();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![1, 2]);
    }

    #[test]
    fn a_resend_while_another_question_is_pending_stays_in_the_lookup() {
        // glibc sends A and AAAA together; the AAAA is lost, and after its timeout glibc
        // sends both again: one lookup of four queries, not two.
        let mut t = tracker(16);
        let mut out = Vec::new();
        let a = t.query_started(0, &"db.example.".into(), 1, &sender(), &mut out);
        let aaaa = t.query_started(0, &"db.example.".into(), 28, &sender(), &mut out);
        assert_eq!(a, aaaa);
        t.query_finished(
            &with_lookup(query("db.example.", 1, 1, &[0], Some(MS), Some(0)), a),
            MS,
        );
        let again = t.query_started(5_000 * MS, &"db.example.".into(), 1, &sender(), &mut out);
        assert_eq!(again, a, "split while a question was still pending");
    }

    #[test]
    fn a_client_asking_without_pause_makes_bounded_lookups() {
        let mut t = tracker(16);
        let mut out = Vec::new();
        let mut ids = std::collections::BTreeSet::new();
        // A load generator: always some query of the name in flight.
        let mut pending = Vec::new();
        for i in 0..(3 * MAX_QUERIES_PER_LOOKUP as u64) {
            let id = t.query_started(i * MS, &"load.example.".into(), 1, &sender(), &mut out);
            ids.insert(id);
            pending.push((i, id));
            if pending.len() > 8 {
                let (j, id) = pending.remove(0);
                t.query_finished(
                    &with_lookup(
                        query(
                            "load.example.",
                            1,
                            j as u16,
                            &[j * MS],
                            Some(j * MS + 1),
                            Some(0),
                        ),
                        id,
                    ),
                    j * MS + 1,
                );
            }
        }
        assert!(ids.len() >= 3, "one endless lookup: {ids:?}");
        assert!(t.stats().capped >= 2);
        // The capped ones closed as their last query finished, without waiting to be idle.
        t.each_closed(|r| out.push(r));
        assert_eq!(
            out.len() as u64,
            t.stats().capped,
            "capped lookups still open"
        );
        assert!(out.iter().all(|r| r.queries == MAX_QUERIES_PER_LOOKUP));
        t.close_all(&mut out);
        assert!(out.iter().all(|r| r.queries <= MAX_QUERIES_PER_LOOKUP));
        assert_eq!(t.open_lookups(), 0);
    }

    #[test]
    fn the_oldest_lookup_is_evicted_at_the_cap() {
        let mut t = tracker(4);
        let mut out = Vec::new();
        let mut ids = Vec::new();
        for i in 0..4u64 {
            let name = format!("n{i}.example.");
            let id = t.query_started(i * MS, &name.as_str().into(), 1, &sender(), &mut out);
            t.query_finished(
                &with_lookup(query(&name, 1, i as u16, &[i * MS], None, None), id),
                i * MS,
            );
            ids.push(id);
        }
        // Closed lookups leave stale ids in the order; eviction skips them.
        t.close(ids[0], &mut out);
        out.clear();
        t.query_started(10 * MS, &"n4.example.".into(), 1, &sender(), &mut out);
        t.query_started(11 * MS, &"n5.example.".into(), 1, &sender(), &mut out);
        assert_eq!(t.stats().evicted, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].name, "n1.example.");
        assert_eq!(t.open_lookups(), 4);
    }

    #[test]
    fn an_id_of_a_closed_lookup_never_names_the_next_in_its_slot() {
        let mut t = tracker(1);
        let mut out = Vec::new();
        let old = t.query_started(0, &"old.example.".into(), 1, &sender(), &mut out);
        // The cap of one evicts `old`; the new lookup takes its slot.
        let new = t.query_started(MS, &"new.example.".into(), 1, &sender(), &mut out);
        assert_ne!(old, new);
        assert_ne!(old, 0);
        assert_eq!(t.stats().evicted, 1);
        t.query_finished(
            &with_lookup(
                query("old.example.", 1, 1, &[0], Some(2 * MS), Some(0)),
                old,
            ),
            2 * MS,
        );
        t.query_finished(
            &with_lookup(
                query("new.example.", 1, 2, &[MS], Some(2 * MS), Some(0)),
                new,
            ),
            2 * MS,
        );
        out.clear();
        t.close_all(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(&*out[0].name, "new.example.");
        assert_eq!(out[0].queries, 1, "the old lookup's query went elsewhere");
    }
}
