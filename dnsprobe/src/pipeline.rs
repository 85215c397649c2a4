//! The userspace path from raw ring-buffer records to finished queries, drops and lookups,
//! handed to every sink (record writer, metrics, live view).

use std::sync::Arc;

use crate::{
    attribute::{Attributor, CgroupPaths, ProcessNames},
    capture::KernelStats,
    conntrack::{ConntrackWatch, NetfilterVerdict},
    correlate::{
        DropRecord, DroppedPacket, FinishedQuery, Observation, QueryTracker, RecentQueries, Sender,
        SenderNames,
    },
    decode::{decode_event, read_event, Comm},
    drops::{decode_drop, read_drop_event, DropReasons, KernelSymbols},
    export::{clock_ns, RecordFormat, RecordWriter, WallClock},
    lookup::{DiagnosisConfig, LateArrival, LookupRecord, LookupTracker, ResolverConfigs},
};

/// A consumer of what the pipeline concludes.
pub trait Sink {
    fn query(&mut self, query: &FinishedQuery);
    fn lookup(&mut self, lookup: &LookupRecord);
    fn packet_drop(&mut self, drop: &DropRecord);
    fn late(&mut self, late: &LateArrival);
    fn flush(&mut self) {}
    /// Records written, for the summary (0 for sinks that write none).
    fn records(&self) -> u64 {
        0
    }
    /// Records that could not be written.
    fn write_errors(&self) -> u64 {
        0
    }
}

impl<W: std::io::Write> Sink for RecordWriter<W> {
    fn query(&mut self, query: &FinishedQuery) {
        let result = self.write_query(query);
        self.note(result);
    }
    fn lookup(&mut self, lookup: &LookupRecord) {
        let result = self.write_lookup(lookup);
        self.note(result);
    }
    fn packet_drop(&mut self, drop: &DropRecord) {
        let result = self.write_drop(drop);
        self.note(result);
    }
    fn late(&mut self, late: &LateArrival) {
        let result = self.write_late(late);
        self.note(result);
    }
    fn flush(&mut self) {
        let result = RecordWriter::flush(self);
        self.note(result);
    }
    fn records(&self) -> u64 {
        self.written()
    }
    fn write_errors(&self) -> u64 {
        self.errors()
    }
}

/// Closed lookups whose records are built and written together (see
/// `LookupTracker::deferring_records`). Few: glibc's per-thread cache keeps 7 freed blocks of a
/// size, and larger batches, freed together, spilled into its slower bins (the pipeline bench
/// measured 8 about 4% cheaper per query than one at a time, 32 no better than one).
const LOOKUP_WRITE_BATCH: usize = 8;

/// Finished queries whose records are written together. Writing a query record runs through
/// as much code as the rest of its path; one at a time, the two pushed each other out of the
/// instruction cache (the pipeline bench under callgrind: about 45 misses per query in the
/// query record's code alone).
const QUERY_WRITE_BATCH: usize = 16;

/// Counters of the userspace pipeline, for the periodic and final summaries.
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub ring_records: u64,
    pub malformed: u64,
    pub partial_messages: u64,
    pub drop_records: u64,
    pub malformed_drops: u64,
    pub unlinked_drops: u64,
    pub late_arrivals: u64,
}

/// Explains kernel drops: reason names, code locations, conntrack verdicts.
pub struct DropExplainer {
    pub reasons: DropReasons,
    pub symbols: KernelSymbols,
    pub netfilter_drop: Option<u32>,
    pub conntrack: ConntrackWatch,
}

pub struct Pipeline {
    pub tracker: QueryTracker,
    pub paths: CgroupPaths,
    pub names: ProcessNames,
    pub attributor: Attributor,
    /// Every finished query, lookup, drop and late response goes to each of these.
    pub sinks: Vec<Box<dyn Sink>>,
    pub stats: PipelineStats,
    pub drops: DropExplainer,
    pub ports: Vec<u16>,
    pub lookups: LookupTracker,
    pub lookup_out: Vec<LookupRecord>,
    pub recent: RecentQueries,
    pub finished: Vec<Box<FinishedQuery>>,
    /// Finished queries whose records wait to be written (see `QUERY_WRITE_BATCH`): always
    /// before any other record, so records come out in the order they were made.
    pub unwritten: Vec<Box<FinishedQuery>>,
    /// Drops that matched no pending query yet, oldest first.
    pub waiting_drops: std::collections::VecDeque<DropRecord>,
    /// The attribution of the last new query and the batch clock it was made at: a thread
    /// sends its queries in bursts (A and AAAA, the search list), and the next query from the
    /// same thread and cgroup in the same batch (`coarse::freeze`) takes it as it is instead of
    /// asking every cache again. Outside a batch the clock moves, and this practically never
    /// matches (a match would still be right: the same thread and cgroup in the same instant).
    /// The sending thread's name is kept as the kernel gave it, so that a match compares
    /// sixteen bytes rather than making text of them.
    pub last_sender: Option<(std::time::Instant, Option<Comm>, Sender)>,
}

/// Moves the drops in `waiting` that belong to `query` (its client and DNS id, between its
/// first send and its answer) into it, in time order, and says how many. The drop ring wakes
/// the daemon at once while the packet ring is read at the tick: a drop of a resend can be
/// read before its query was seen at all, and the answer to an earlier send, read in the same
/// batch as the query, would end the query before the waiting drop was tried again.
fn claim_waiting_drops(
    waiting: &mut std::collections::VecDeque<DropRecord>,
    query: &mut FinishedQuery,
) -> u64 {
    let before = query.drops.len();
    let (from, to) = (
        query.first_send_ns(),
        query.response_ts_ns.unwrap_or(u64::MAX),
    );
    waiting.retain(|d| {
        // A drop after the answer (a duplicate answer the client never read) is not part of
        // the query's wait.
        let mine = d.dns_id == Some(query.id)
            && d.client() == query.client
            && (from..=to).contains(&d.ts_ns);
        if mine {
            query.drops.push(d.clone());
        }
        !mine
    });
    let claimed = query.drops.len() - before;
    if claimed > 0 {
        query.drops.sort_by_key(|d| d.ts_ns);
    }
    claimed as u64
}

/// How long a drop waits for its query to show up before it is reported on its own.
const DROP_LINK_GRACE_NS: u64 = 200_000_000;
const MAX_WAITING_DROPS: usize = 4096;

impl Pipeline {
    /// A pipeline that reads nothing of the machine it runs on: JSON records to
    /// `std::io::sink()`, default limits, and every path it would look things up under
    /// (cgroups, /proc, kubelet log directories) pointed at `missing`, a directory that
    /// should not exist. No netfilter reason is known, so conntrack is never read. For the
    /// fuzz target and offline tests.
    pub fn offline(missing: &std::path::Path) -> Self {
        Self::offline_capped(missing, 4096)
    }

    /// [`Self::offline`] with room for `max_inflight` pending queries and open lookups.
    pub fn offline_capped(missing: &std::path::Path, max_inflight: usize) -> Self {
        use std::time::Duration;
        let timeout = Duration::from_secs(10);
        let timeout_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
        let missing = missing.to_path_buf();
        Self {
            tracker: QueryTracker::new(timeout_ns, max_inflight),
            paths: CgroupPaths::new(missing.join("cgroup")),
            names: ProcessNames::new(missing.join("proc")),
            attributor: Attributor::new(crate::pods::PodDirectory::new(
                missing.join("pods"),
                missing.join("containers"),
            )),
            sinks: vec![Box::new(RecordWriter::new(
                std::io::sink(),
                RecordFormat::Json,
                WallClock::now(),
            ))],
            stats: PipelineStats::default(),
            drops: DropExplainer {
                reasons: DropReasons::new([
                    ("SKB_DROP_REASON_NOT_SPECIFIED".to_owned(), 2),
                    ("SKB_DROP_REASON_NO_SOCKET".to_owned(), 3),
                    ("SKB_DROP_REASON_NETFILTER_DROP".to_owned(), 7),
                ]),
                symbols: KernelSymbols::parse(
                    "ffffffff81000000 T nf_hook_slow\nffffffff81002000 t udp_queue_rcv_one_skb\n",
                ),
                netfilter_drop: None,
                conntrack: ConntrackWatch::new(Duration::from_secs(3600)),
            },
            ports: vec![53],
            lookups: LookupTracker::new(
                ResolverConfigs::new(missing.join("proc"), missing.join("cgroup")),
                Duration::from_millis(500),
                timeout,
                max_inflight,
                DiagnosisConfig {
                    slow_ns: 500_000_000,
                    query_timeout_ns: timeout_ns,
                },
            )
            .deferring_records(),
            lookup_out: Vec::new(),
            recent: RecentQueries::new(timeout_ns.saturating_mul(2), max_inflight),
            finished: Vec::new(),
            unwritten: Vec::new(),
            waiting_drops: Default::default(),
            last_sender: None,
        }
    }

    pub fn handle_record(&mut self, bytes: &[u8]) {
        self.stats.ring_records += 1;
        let packet = match read_event(bytes).and_then(|event| decode_event(&event)) {
            Ok(packet) => packet,
            Err(err) => {
                self.stats.malformed += 1;
                tracing::debug!("skipping packet: {err}; {}", hex_prefix(bytes));
                return;
            }
        };
        if packet.message.partial {
            self.stats.partial_messages += 1;
        }
        let paths = &mut self.paths;
        let names = &mut self.names;
        let attributor = &mut self.attributor;
        let lookups = &mut self.lookups;
        let lookup_out = &mut self.lookup_out;
        let last_sender = &mut self.last_sender;
        let observed = self.tracker.observe(packet, |p| {
            let now = crate::coarse::now();
            let mut sender = match last_sender {
                Some((at, comm, last))
                    if *at == now
                        && last.pid == p.pid
                        && last.tid == p.tid
                        && last.cgroup_id == p.cgroup_id
                        && *comm == p.comm =>
                {
                    last.clone()
                }
                _ => {
                    let thread = p.comm.as_ref().map(|c| c.text());
                    let cgroup_path = paths.resolve(p.cgroup_id);
                    // The process may be gone already; its sending thread's name is the next
                    // best.
                    let comm = p
                        .pid
                        .and_then(|pid| names.resolve(pid, thread.as_deref()))
                        .or_else(|| thread.as_deref().map(Arc::from));
                    let workload = attributor.workload(p.cgroup_id, cgroup_path.as_deref());
                    let sender = Sender {
                        pid: p.pid,
                        tid: p.tid,
                        cgroup_id: p.cgroup_id,
                        names: Arc::new(SenderNames {
                            comm: comm.clone(),
                            thread_comm: match (&comm, &thread) {
                                // Most programs send from their main thread: share the one
                                // string.
                                (Some(name), Some(thread)) if **name == **thread => {
                                    Some(name.clone())
                                }
                                (_, thread) => thread.as_deref().map(Arc::from),
                            },
                            cgroup_path,
                            workload,
                        }),
                        lookup: 0,
                    };
                    *last_sender = Some((now, p.comm, sender.clone()));
                    sender
                }
            };
            sender.lookup = lookups.query_started(
                p.ts_ns,
                &p.message.question.name,
                p.message.question.qtype,
                &sender,
                lookup_out,
            );
            sender
        });
        // Before the observation: a late answer is told apart by the query it was late for.
        self.finish_timed_out();
        match observed {
            Observation::Finished(mut query) => {
                let claimed = claim_waiting_drops(&mut self.waiting_drops, &mut query);
                self.tracker.count_linked_drops(claimed);
                let now = query.response_ts_ns.unwrap_or_default();
                self.finish_query(query, now);
            }
            Observation::Unmatched(packet) => {
                if let Some(late) = self.recent.late_response(&packet) {
                    self.late(late);
                }
            }
            Observation::Nothing | Observation::Started | Observation::Resent => {}
        }
        // Lookups closed by this packet wait for a few more (see `LOOKUP_WRITE_BATCH`); the
        // flush writes what is left.
        if self.lookups.closed_waiting() >= LOOKUP_WRITE_BATCH {
            self.write_lookups();
        }
    }

    /// Links a drop to its pending query; returns it when none took it. A query found timed
    /// out by the drop's time ends first, so that the drop can be told late for it.
    fn link_drop(&mut self, drop: DropRecord) -> Option<DropRecord> {
        let unlinked = self.tracker.on_drop(drop);
        self.finish_timed_out();
        unlinked
    }

    /// Ends the queries the tracker found timed out by a later packet of theirs.
    fn finish_timed_out(&mut self) {
        if !self.tracker.has_timed_out() {
            return;
        }
        let mut finished = std::mem::take(&mut self.finished);
        self.tracker.take_timed_out(&mut finished);
        self.finish_unanswered(&mut finished);
        self.finished = finished;
    }

    /// Ends unanswered queries at their deadline, whenever the daemon noticed it: what follows
    /// from their end (their lookup's idle time, how long a late answer is recognised) then
    /// depends on kernel time only.
    #[expect(
        clippy::vec_box,
        reason = "queries stay boxed from their first packet to their record, moved as boxes"
    )]
    fn finish_unanswered(&mut self, finished: &mut Vec<Box<FinishedQuery>>) {
        for query in finished.drain(..) {
            let at = self.tracker.deadline_ns(query.first_send_ns());
            self.finish_query(query, at);
        }
    }

    fn finish_query(&mut self, query: Box<FinishedQuery>, now_ns: u64) {
        self.recent.remember(&query, now_ns);
        self.lookups.query_finished(&query, now_ns);
        self.unwritten.push(query);
        if self.unwritten.len() >= QUERY_WRITE_BATCH {
            self.write_queries();
        }
    }

    /// Writes the records of the finished queries waiting, and gives their boxes back.
    fn write_queries(&mut self) {
        for query in self.unwritten.drain(..) {
            for sink in &mut self.sinks {
                sink.query(&query);
            }
            self.tracker.reuse(query);
        }
    }

    /// A response too late for its query: part of its lookup, or an event of its own.
    fn late(&mut self, late: LateArrival) {
        self.stats.late_arrivals += 1;
        let orphan = self.lookups.late_arrival(late, &mut self.lookup_out);
        // A lookup it closed comes first: the late arrival was after its end.
        self.write_lookups();
        if let Some(orphan) = orphan {
            for sink in &mut self.sinks {
                sink.late(&orphan);
            }
        }
    }

    fn write_lookups(&mut self) {
        // Every other record is written after this: queries first, as they finished first.
        self.write_queries();
        let sinks = &mut self.sinks;
        let mut write = |record: LookupRecord| {
            for sink in sinks.iter_mut() {
                sink.lookup(&record);
            }
        };
        self.lookup_out.drain(..).for_each(&mut write);
        self.lookups.each_closed(write);
    }

    pub fn handle_drop_record(&mut self, bytes: &[u8]) {
        self.stats.drop_records += 1;
        let drop = match read_drop_event(bytes).and_then(|event| decode_drop(&event)) {
            Ok(drop) => drop,
            Err(err) => {
                self.stats.malformed_drops += 1;
                tracing::debug!("skipping drop event: {err}");
                return;
            }
        };
        let reason = self.drops.reasons.name(drop.reason);
        let (kind, detail) = if Some(drop.reason) == self.drops.netfilter_drop {
            match self.drops.conntrack.classify(drop.netns_inum) {
                NetfilterVerdict::InsertFailed {
                    insert_failed_delta,
                    detail,
                } => (
                    "conntrack_insert_failed".to_owned(),
                    Some(format!("{detail}; insert_failed +{insert_failed_delta}")),
                ),
                NetfilterVerdict::OtherNetfilter => ("netfilter_drop".to_owned(), None),
                NetfilterVerdict::Unknown(why) => ("netfilter_drop".to_owned(), Some(why)),
            }
        } else {
            (reason.to_ascii_lowercase(), None)
        };
        // Which side of the exchange: a packet towards a DNS port is a query.
        let packet = if self.ports.contains(&drop.dst.port()) {
            DroppedPacket::Query
        } else {
            DroppedPacket::Response
        };
        let record = DropRecord {
            ts_ns: drop.ts_ns,
            packet,
            reason,
            kind,
            detail,
            location: self.drops.symbols.symbolize(drop.location),
            netns_inum: drop.netns_inum,
            src: drop.src,
            dst: drop.dst,
            dns_id: drop.dns_id(),
        };
        let unlinked = self.link_drop(record);
        if let Some(unlinked) = unlinked {
            let late = self.recent.late_drop(&unlinked);
            if late.is_some() || self.waiting_drops.len() >= MAX_WAITING_DROPS {
                self.emit_unlinked(unlinked, late);
            } else {
                // The drop ring and the packet ring are read separately: the query this drop
                // belongs to may still be on its way. Try again for a moment.
                self.waiting_drops.push_back(unlinked);
            }
        }
    }

    /// Reports a drop no pending query took; `late` is what `RecentQueries::late_drop` made
    /// of it, when the caller already asked.
    fn emit_unlinked(&mut self, unlinked: DropRecord, late: Option<LateArrival>) {
        self.stats.unlinked_drops += 1;
        self.write_lookups();
        for sink in &mut self.sinks {
            sink.packet_drop(&unlinked);
        }
        if let Some(late) = late {
            self.late(late);
        }
    }

    /// Links waiting drops whose query has arrived since; gives up on those older than the
    /// grace period.
    fn retry_waiting_drops(&mut self, now_ns: u64) {
        for _ in 0..self.waiting_drops.len() {
            let Some(drop) = self.waiting_drops.pop_front() else {
                break;
            };
            let ts = drop.ts_ns;
            let unlinked = self.link_drop(drop);
            if let Some(unlinked) = unlinked {
                if now_ns.saturating_sub(ts) >= DROP_LINK_GRACE_NS {
                    {
                        let late = self.recent.late_drop(&unlinked);
                        self.emit_unlinked(unlinked, late);
                    }
                } else {
                    self.waiting_drops.push_back(unlinked);
                }
            }
        }
    }

    /// Drops per-cgroup and per-process state of what is gone, so caches follow pods coming
    /// and going instead of growing with every pod the node ever ran.
    pub fn prune(&mut self, grace: std::time::Duration) {
        self.paths.prune();
        self.names.prune(grace);
        self.attributor.prune(grace);
        self.lookups.prune(grace);
    }

    pub fn expire(&mut self) {
        self.expire_at(clock_ns(libc::CLOCK_MONOTONIC));
    }

    /// `expire` with the monotonic clock reading given (the fuzz target drives time itself).
    pub fn expire_at(&mut self, now: u64) {
        self.attributor.refresh_if_due();
        self.retry_waiting_drops(now);
        let mut finished = std::mem::take(&mut self.finished);
        self.tracker.expire(now, &mut finished);
        self.finish_unanswered(&mut finished);
        self.finished = finished;
        self.recent.expire(now);
        self.lookups.close_idle(now, &mut self.lookup_out);
        self.write_lookups();
    }

    pub fn close_all_lookups(&mut self) {
        while let Some(drop) = self.waiting_drops.pop_front() {
            let unlinked = self.link_drop(drop);
            if let Some(unlinked) = unlinked {
                {
                    let late = self.recent.late_drop(&unlinked);
                    self.emit_unlinked(unlinked, late);
                }
            }
        }
        self.lookups.close_all(&mut self.lookup_out);
        self.write_lookups();
    }

    pub fn flush(&mut self) {
        self.write_lookups();
        for sink in &mut self.sinks {
            sink.flush();
        }
    }

    pub fn summary(&self, kernel: KernelStats) -> String {
        let t = self.tracker.stats();
        format!(
            "queries={} answered={} unanswered={} resends={} records={} write_errors={} in_flight={} \
             unmatched_responses={} evicted={} malformed={} partial={} kernel_events={} \
             lost_events={} lost_query_events={} lost_response_events={} unparseable_packets={} kernel_drops={} lost_drop_events={} \
             drops_linked={} drops_unlinked={} malformed_drops={} netns_known={} \
             late_arrivals={} recent_queries={} lookups={} lookups_open={} lookups_evicted={} lookups_capped={} \
             cgroups_known={} cgroup_walks={} processes_known={} resolver_configs={} \
             workloads_known={} pod_dir_entries={} pod_dir_scans={} pod_dir_evictions={}",
            t.queries,
            t.answered,
            t.unanswered,
            t.resends,
            self.sinks.iter().map(|s| s.records()).sum::<u64>(),
            self.sinks.iter().map(|s| s.write_errors()).sum::<u64>(),
            self.tracker.in_flight(),
            t.unmatched_responses,
            t.evicted,
            self.stats.malformed,
            self.stats.partial_messages,
            kernel.events,
            kernel.ringbuf_full,
            kernel.lost_egress,
            kernel.lost_ingress,
            kernel.unparseable,
            kernel.drops,
            kernel.drop_ringbuf_full,
            t.drops_linked,
            self.stats.unlinked_drops,
            self.stats.malformed_drops,
            self.drops.conntrack.namespaces(),
            self.stats.late_arrivals,
            self.recent.len(),
            self.lookups.stats().lookups,
            self.lookups.open_lookups(),
            self.lookups.stats().evicted,
            self.lookups.stats().capped,
            self.paths.len(),
            self.paths.walks(),
            self.names.len(),
            self.lookups.resolver_configs(),
            self.attributor.len(),
            self.attributor.pod_directory_entries(),
            self.attributor.pod_directory_scans(),
            self.attributor.pod_directory_evictions(),
        )
    }
}

/// Fuzz input framing: a sequence of `[kind][len: u16 LE][len bytes]`; a short tail is
/// used as it is.
pub mod fuzz_input {
    /// A ring-buffer record of the packet ring (`DnsEvent`).
    pub const PACKET: u8 = 0;
    /// A ring-buffer record of the drop ring (`DropEvent`).
    pub const DROP: u8 = 1;
    /// A timer tick; the bytes are the monotonic clock reading (u64 LE, zero-padded).
    pub const TICK: u8 = 2;
    /// Pruning of state about gone cgroups and processes.
    pub const PRUNE: u8 = 3;
}

/// Drives `pipeline` from fuzz input (see [`fuzz_input`]): packet records, drop records and
/// timer ticks in any order, then the shutdown path. Kinds are taken modulo 4.
pub fn fuzz_records(pipeline: &mut Pipeline, mut data: &[u8]) {
    while let Some((&kind, rest)) = data.split_first() {
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
            _ => (rest.len(), &[][..]),
        };
        let (bytes, rest) = rest.split_at(len.min(rest.len()));
        data = rest;
        match kind % 4 {
            fuzz_input::PACKET => pipeline.handle_record(bytes),
            fuzz_input::DROP => pipeline.handle_drop_record(bytes),
            fuzz_input::TICK => {
                let mut now = [0u8; 8];
                let n = bytes.len().min(8);
                now[..n].copy_from_slice(&bytes[..n]);
                pipeline.expire_at(u64::from_le_bytes(now));
            }
            _ => pipeline.prune(std::time::Duration::ZERO),
        }
        pipeline.flush();
    }
    pipeline.close_all_lookups();
    pipeline.flush();
    let _ = pipeline.summary(KernelStats::default());
}

/// The first bytes of a malformed record's DNS message, for debug logs.
fn hex_prefix(record: &[u8]) -> String {
    let start = dnsprobe_common::DNS_EVENT_HEADER_LEN;
    record
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take(48)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A query record of `pid` (thread `tid`, named `comm`) asking `name`, sent at `ts_ns`.
    fn query_record(ts_ns: u64, pid: u32, tid: u32, comm: &[u8], name: &str) -> Vec<u8> {
        use dnsprobe_common::{DnsEvent, DIR_EGRESS, FAMILY_IPV4, PROTO_UDP};
        // SAFETY: DnsEvent is plain old data; all zeroes is a valid value.
        let mut e: DnsEvent = unsafe { std::mem::zeroed() };
        e.header.ts_ns = ts_ns;
        e.header.socket_cookie = u64::from(tid);
        e.header.cgroup_id = 7;
        e.header.pid_tgid = (u64::from(pid) << 32) | u64::from(tid);
        e.header.family = FAMILY_IPV4;
        e.header.l4_proto = PROTO_UDP;
        e.header.direction = DIR_EGRESS;
        e.header.comm[..comm.len()].copy_from_slice(comm);
        e.header.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        e.header.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        e.header.sport = 40_000 + tid as u16;
        e.header.dport = 53;
        let mut msg = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.trim_end_matches('.').split('.') {
            msg.push(label.len() as u8);
            msg.extend_from_slice(label.as_bytes());
        }
        msg.extend_from_slice(&[0, 0, 1, 0, 1]);
        e.msg[..msg.len()].copy_from_slice(&msg);
        e.header.msg_len = msg.len() as u32;
        e.header.cap_len = msg.len() as u32;
        // SAFETY: reading the bytes of a plain-old-data value.
        unsafe {
            std::slice::from_raw_parts((&e as *const DnsEvent).cast::<u8>(), size_of::<DnsEvent>())
        }
        .to_vec()
    }

    /// A drop read before its query, and that query answered (ended) in the next batch: the
    /// drop goes with the query, in time order, and only drops of its client and id from its
    /// wait do.
    #[test]
    fn waiting_drops_of_an_ending_query_go_with_it() {
        let mut q = crate::correlate::fixtures::query(None, "www.example.", Some(300), Some(0));
        let drop = |ts_ns: u64, packet: DroppedPacket, client: &str, id: u16| {
            let (client, server) = (client.parse().unwrap(), q.server);
            let (src, dst) = match packet {
                DroppedPacket::Query => (client, server),
                DroppedPacket::Response => (server, client),
            };
            DropRecord {
                ts_ns,
                packet,
                reason: "NETFILTER_DROP".into(),
                kind: "conntrack_insert_failed".into(),
                detail: None,
                location: "nf_hook_slow+0x7d".into(),
                netns_inum: 1,
                src,
                dst,
                dns_id: Some(id),
            }
        };
        // Sent at 1 ms, answered at 301 ms.
        const MS: u64 = 1_000_000;
        let answered = q.response_ts_ns.unwrap();
        let mut waiting: std::collections::VecDeque<DropRecord> = [
            drop(3 * MS, DroppedPacket::Query, "10.0.0.1:4000", q.id),
            drop(2 * MS, DroppedPacket::Query, "10.0.0.1:4000", q.id + 1),
            drop(answered, DroppedPacket::Response, "10.0.0.1:4000", q.id),
            drop(MS / 2, DroppedPacket::Query, "10.0.0.1:4001", q.id),
            drop(answered + 1, DroppedPacket::Response, "10.0.0.1:4000", q.id),
        ]
        .into();
        q.drops
            .push(drop(2 * MS, DroppedPacket::Query, "10.0.0.1:4000", q.id));
        assert_eq!(claim_waiting_drops(&mut waiting, &mut q), 2);
        let times: Vec<u64> = q.drops.iter().map(|d| d.ts_ns).collect();
        assert_eq!(times, [2 * MS, 3 * MS, answered]);
        let left: Vec<u64> = waiting.iter().map(|d| d.ts_ns).collect();
        assert_eq!(
            left,
            [2 * MS, MS / 2, answered + 1],
            "another id's, another client's and a later drop stay"
        );
    }

    /// Name, pid, tid and thread name of a finished query.
    type SentBy = (String, Option<u32>, Option<u32>, String);

    /// Collects who sent each finished query.
    struct Senders(std::rc::Rc<std::cell::RefCell<Vec<SentBy>>>);

    impl Sink for Senders {
        fn query(&mut self, q: &FinishedQuery) {
            self.0.borrow_mut().push((
                q.qname.to_string(),
                q.sender.pid,
                q.sender.tid,
                q.sender
                    .names
                    .thread_comm
                    .as_deref()
                    .unwrap_or_default()
                    .to_owned(),
            ));
        }
        fn lookup(&mut self, _: &LookupRecord) {}
        fn packet_drop(&mut self, _: &DropRecord) {}
        fn late(&mut self, _: &LateArrival) {}
    }

    /// Queries of several threads, interleaved within one batch and in the next: each keeps
    /// its own sender, whatever the attribution of the query before it.
    #[test]
    fn each_query_keeps_its_own_sender_within_a_batch() {
        let missing = std::env::temp_dir().join("dnsprobe-test-missing-dir");
        let mut pipeline = Pipeline::offline(&missing);
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        pipeline.sinks = vec![Box::new(Senders(seen.clone()))];
        let senders = [
            (100, 100, &b"app"[..]),
            (100, 100, b"app"),
            (100, 102, b"app"),
            (100, 101, b"app-worker"),
            (200, 200, b"app"),
            (100, 100, b"app"),
        ];
        for batch in 0..2u64 {
            let _clock = crate::coarse::freeze();
            for (i, &(pid, tid, comm)) in senders.iter().enumerate() {
                let name = format!("q{batch}-{i}.test.");
                pipeline.handle_record(&query_record(
                    batch * 100 + i as u64,
                    pid,
                    tid,
                    comm,
                    &name,
                ));
            }
        }
        pipeline.expire_at(u64::MAX / 2);
        let mut seen = seen.borrow().clone();
        seen.sort();
        let mut expected = Vec::new();
        for batch in 0..2 {
            for (i, &(pid, tid, comm)) in senders.iter().enumerate() {
                expected.push((
                    format!("q{batch}-{i}.test."),
                    Some(pid),
                    Some(tid),
                    String::from_utf8(comm.to_vec()).unwrap(),
                ));
            }
        }
        expected.sort();
        assert_eq!(seen, expected);
    }

    /// Every record, in the order the sink got it: `query <name>` or `lookup <name>`.
    struct Order(std::rc::Rc<std::cell::RefCell<Vec<String>>>);

    impl Sink for Order {
        fn query(&mut self, q: &FinishedQuery) {
            self.0.borrow_mut().push(format!("query {}", q.qname));
        }
        fn lookup(&mut self, l: &LookupRecord) {
            self.0.borrow_mut().push(format!("lookup {}", l.name));
        }
        fn packet_drop(&mut self, _: &DropRecord) {}
        fn late(&mut self, _: &LateArrival) {}
    }

    /// Query records wait to be written a batch at a time (`QUERY_WRITE_BATCH`), yet every
    /// one is written, and before the record of its lookup: records come out in the order
    /// they were made, whatever batch boundary falls between them.
    #[test]
    fn query_records_written_in_batches_keep_their_order() {
        let missing = std::env::temp_dir().join("dnsprobe-test-missing-dir");
        let mut pipeline = Pipeline::offline(&missing);
        let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        pipeline.sinks = vec![Box::new(Order(seen.clone()))];
        const QUERIES: usize = 2 * QUERY_WRITE_BATCH + 5;
        for i in 0..QUERIES {
            pipeline.handle_record(&query_record(
                i as u64,
                1000 + i as u32,
                1000 + i as u32,
                b"app",
                &format!("q{i}.test."),
            ));
        }
        // Timed out, each query ends its lookup.
        pipeline.expire_at(u64::MAX / 2);
        assert!(pipeline.unwritten.is_empty());
        let seen = seen.borrow();
        assert_eq!(seen.len(), 2 * QUERIES, "{seen:?}");
        // Query records in the order the queries ended (sent 1 ns apart, timed out so).
        let queries: Vec<&String> = seen.iter().filter(|r| r.starts_with("query ")).collect();
        let ended: Vec<String> = (0..QUERIES).map(|i| format!("query q{i}.test.")).collect();
        assert_eq!(queries, ended.iter().collect::<Vec<_>>());
        for i in 0..QUERIES {
            let at = |record: String| seen.iter().position(|r| *r == record);
            let query = at(format!("query q{i}.test."));
            let lookup = at(format!("lookup q{i}.test."));
            assert!(
                query.is_some() && lookup.is_some() && query < lookup,
                "{i}: {seen:?}"
            );
        }
    }

    /// The fuzz target's seeds (fuzz/make_seeds.py) through the offline pipeline: real
    /// exchanges are answered, hostile messages are counted as malformed, nothing panics.
    #[test]
    fn fuzz_seeds_run_offline() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/pipeline");
        let missing = std::env::temp_dir().join("dnsprobe-test-missing-dir");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let mut pipeline = Pipeline::offline(&missing);
            fuzz_records(&mut pipeline, &data);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let t = pipeline.tracker.stats();
            match name.as_str() {
                "udp_exchange" | "tcp_exchange" | "udp6_aaaa" => {
                    assert_eq!((t.queries, t.answered), (1, 1), "{name}");
                    assert_eq!(pipeline.stats.malformed, 0, "{name}");
                }
                "ptr_loop_question"
                | "label_64"
                | "header_truncated"
                | "cap_len_over_buffer"
                | "tcp_zero_length"
                | "bad_direction_family_proto" => {
                    assert!(
                        pipeline.stats.malformed > 0,
                        "{name}: not counted malformed"
                    );
                }
                "short_records" => {
                    // Shorter than a header, a message area shorter than its cap_len (twice),
                    // and empty.
                    assert_eq!(pipeline.stats.malformed, 4, "{name}");
                    assert_eq!(pipeline.stats.malformed_drops, 2, "{name}");
                }
                _ => {}
            }
            seen += 1;
        }
        assert!(seen >= 20, "only {seen} seeds in {}", dir.display());
    }
}
