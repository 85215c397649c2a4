//! Matches responses to queries and decides when a query is finished.
//!
//! A query is identified by the socket that sent it (its cookie), its DNS id and its question.
//! The first send starts the clock; later sends of the same query while it is pending are
//! resends. The first response that matches ends it. Pending state is bounded: beyond
//! `max_inflight` the oldest query is evicted and counted.

use std::{hash::BuildHasher as _, net::SocketAddr, sync::Arc};

use foldhash::{HashMap, HashMapExt as _};
use hashbrown::HashTable;

use crate::{
    decode::{Direction, Packet, Transport},
    qname::QName,
};

/// Where a query came from, as far as the kernel could tell at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    pub cgroup_id: u64,
    /// Shared by the queries of a thread: one reference to take per query rather than four,
    /// on counters that a busy node's queries otherwise find out of the cache.
    pub names: Arc<SenderNames>,
    /// The lookup the query belongs to (`LookupTracker::query_started`), 0 for none.
    pub lookup: crate::lookup::LookupId,
}

impl Sender {
    /// The names to change, copied first when shared.
    pub fn names_mut(&mut self) -> &mut SenderNames {
        Arc::make_mut(&mut self.names)
    }
}

/// What a sender's ids were resolved to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderNames {
    /// Name of the sending process (its thread group leader's comm). Shared with the cache it
    /// came from, like the other strings here: every query of a process carries the same.
    pub comm: Option<Arc<str>>,
    /// Comm of the sending thread, as the kernel saw it.
    pub thread_comm: Option<Arc<str>>,
    /// Resolved while the cgroup still existed; `None` if it could not be.
    pub cgroup_path: Option<Arc<str>>,
    /// Pod and container (or host unit) the cgroup belongs to.
    pub workload: Option<Arc<crate::attribute::Workload>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Unanswered,
    /// Never answered, and the kernel dropped one of its packets.
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Unanswered => "unanswered",
            Outcome::Dropped => "dropped",
        }
    }
}

/// Which packet of a query exchange the kernel dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DroppedPacket {
    Query,
    Response,
}

impl DroppedPacket {
    pub fn as_str(self) -> &'static str {
        match self {
            DroppedPacket::Query => "query",
            DroppedPacket::Response => "response",
        }
    }
}

/// A kernel drop, explained, as attached to a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropRecord {
    pub ts_ns: u64,
    pub packet: DroppedPacket,
    /// Kernel drop reason name (`NETFILTER_DROP`, `NO_SOCKET`, ...).
    pub reason: String,
    /// What dnsprobe concluded: `conntrack_insert_failed`, `netfilter_drop`, or the reason
    /// in lower case.
    pub kind: String,
    /// Extra detail (`chaintoolong`, `clash`, why the kind is uncertain).
    pub detail: Option<String>,
    pub location: String,
    pub netns_inum: u32,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub dns_id: Option<u16>,
}

impl DropRecord {
    /// The client side of the dropped packet: the source of a query, the destination of a
    /// response. With the DNS id it names the query the drop belongs to.
    pub fn client(&self) -> SocketAddr {
        match self.packet {
            DroppedPacket::Query => self.src,
            DroppedPacket::Response => self.dst,
        }
    }
}

/// Send times of a query: nearly always one or two, kept inline then.
pub type SendTimes = smallvec::SmallVec<[u64; 2]>;

/// A query that is over: answered, or timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedQuery {
    /// As sent; shared with every index of the query (see `qname`).
    pub qname: QName,
    pub qtype: u16,
    pub id: u16,
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub socket_cookie: u64,
    /// Kernel (CLOCK_MONOTONIC) time of every send, first one first.
    pub send_ts_ns: SendTimes,
    pub response_ts_ns: Option<u64>,
    pub outcome: Outcome,
    pub rcode: Option<u16>,
    pub truncated: bool,
    pub answers: crate::decode::Answers,
    pub sender: Sender,
    pub drops: Vec<DropRecord>,
}

impl FinishedQuery {
    pub fn first_send_ns(&self) -> u64 {
        self.send_ts_ns.first().copied().unwrap_or_default()
    }

    pub fn latency_ns(&self) -> Option<u64> {
        self.response_ts_ns
            .map(|r| r.saturating_sub(self.first_send_ns()))
    }
}

/// What one packet did to the tracker.
#[derive(Debug)]
pub enum Observation {
    /// Not a client packet (a server's socket), or nothing to report.
    Nothing,
    /// A new query began.
    Started,
    /// A pending query was sent again.
    Resent,
    /// A response ended a query. Boxed from its first packet to its record, then reused (see
    /// [`QueryTracker::reuse`]): a query is a few hundred bytes, and it is handed on several
    /// times.
    Finished(Box<FinishedQuery>),
    /// A response matched no pending query: late, duplicate, or its query was not seen.
    Unmatched(Packet),
}

impl Observation {
    #[cfg(test)]
    fn finished(self) -> Option<Box<FinishedQuery>> {
        match self {
            Observation::Finished(q) => Some(q),
            _ => None,
        }
    }
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackerStats {
    pub queries: u64,
    /// Drops linked to a pending query.
    pub drops_linked: u64,
    pub resends: u64,
    pub answered: u64,
    pub unanswered: u64,
    /// Responses that matched no pending query (late, duplicate, or query not seen).
    pub unmatched_responses: u64,
    /// Pending queries dropped to stay under `max_inflight`.
    pub evicted: u64,
}

/// Where a pending query sits in `QueryTracker::slots`.
type Slot = u32;
/// No slot: either end of the first-seen list.
const NO_SLOT: Slot = Slot::MAX;

/// A place for a pending query, reused once the query is over. Slots are linked in the order
/// their queries were first seen, so the oldest is found (to expire or evict) without an
/// ordered map, and taking a query out of the middle costs nothing.
struct PendingSlot {
    /// `None` while the slot is free. Boxed: it is handed on as it is when the query ends.
    query: Option<Box<FinishedQuery>>,
    /// The query's hashes in `by_key` and `by_client`, kept so that the tables can grow and
    /// entries be removed without reading the query itself.
    key_hash: u64,
    client_hash: u64,
    older: Slot,
    newer: Slot,
}

pub struct QueryTracker {
    /// Pending queries, linked from `oldest` to `newest` in the order they were first seen
    /// (first-send order up to the small reordering between CPUs).
    slots: Vec<PendingSlot>,
    /// Slots whose query is over, for the next query.
    free: Vec<Slot>,
    oldest: Slot,
    newest: Slot,
    in_flight: usize,
    /// Pending queries by socket cookie, DNS id and question. The tables hold slot numbers
    /// only and compare with the query in the slot: with tens of thousands of queries in
    /// flight, a copy of every key in the tables would cost more than the queries themselves.
    by_key: HashTable<Slot>,
    /// Client address and DNS id of each pending query: what a dropped packet can be matched
    /// by, since a forwarded packet has no socket and may already be NATed towards a backend.
    /// When two pending queries share them, the newer one is here.
    by_client: HashTable<Slot>,
    /// Seeded per tracker, so that query senders cannot choose keys that collide.
    hasher: foldhash::fast::RandomState,
    timeout_ns: u64,
    max_inflight: usize,
    stats: TrackerStats,
    /// Queries found to have timed out by the kernel time of a later packet of theirs (a
    /// response, a resend, a drop) before the tick that would have expired them: whether a
    /// query was answered depends on timestamps, not on when the daemon read them. Taken with
    /// [`Self::take_timed_out`].
    #[expect(
        clippy::vec_box,
        reason = "queries stay boxed from their first packet to their record, moved as boxes"
    )]
    timed_out: Vec<Box<FinishedQuery>>,
    /// Boxes of queries whose records are written, for the next queries (see
    /// [`Self::reuse`]): the pipeline writes records a batch at a time, and a batch of boxes
    /// freed together overflowed glibc's per-thread cache into its slower bins.
    #[expect(
        clippy::vec_box,
        reason = "the boxes themselves are what is kept for reuse"
    )]
    spare: Vec<Box<FinishedQuery>>,
}

/// How many boxes of written queries [`QueryTracker`] keeps for the next queries.
const SPARE_QUERIES_KEPT: usize = 64;

impl QueryTracker {
    pub fn new(timeout_ns: u64, max_inflight: usize) -> Self {
        Self {
            slots: Vec::new(),
            free: Vec::new(),
            oldest: NO_SLOT,
            newest: NO_SLOT,
            in_flight: 0,
            by_key: HashTable::new(),
            by_client: HashTable::new(),
            hasher: Default::default(),
            timeout_ns,
            // Slot numbers are u32, with one value kept for `NO_SLOT`.
            max_inflight: max_inflight.clamp(1, (NO_SLOT - 1) as usize),
            stats: TrackerStats::default(),
            timed_out: Vec::new(),
            spare: Vec::new(),
        }
    }

    /// Takes back the box of a query whose record is written, for a query to come. Its
    /// contents stay until then, so that a box kept costs nothing more now.
    pub fn reuse(&mut self, query: Box<FinishedQuery>) {
        if self.spare.len() < SPARE_QUERIES_KEPT {
            self.spare.push(query);
        }
    }

    /// When a query first sent at `first_send_ns` times out (kernel time).
    pub fn deadline_ns(&self, first_send_ns: u64) -> u64 {
        first_send_ns.saturating_add(self.timeout_ns)
    }

    /// Whether the pending query in `slot` had timed out by kernel time `ts_ns`.
    fn timed_out_by(&self, slot: Slot, ts_ns: u64) -> bool {
        self.slots[slot as usize]
            .query
            .as_ref()
            .is_some_and(|q| ts_ns >= self.deadline_ns(q.first_send_ns()))
    }

    /// Ends the pending query in `slot` as unanswered (or dropped), into `timed_out`.
    fn time_out(&mut self, slot: Slot) {
        if let Some(query) = self.remove(slot) {
            let query = self.unanswered(query);
            self.timed_out.push(query);
        }
    }

    fn unanswered(&mut self, mut query: Box<FinishedQuery>) -> Box<FinishedQuery> {
        self.stats.unanswered += 1;
        if query.drops.iter().any(|d| d.packet == DroppedPacket::Query) {
            query.outcome = Outcome::Dropped;
        }
        query
    }

    /// Counts drops linked to a query outside [`Self::on_drop`] (drops that waited for it).
    pub fn count_linked_drops(&mut self, n: u64) {
        self.stats.drops_linked += n;
    }

    /// Whether [`Self::take_timed_out`] has queries to give.
    pub fn has_timed_out(&self) -> bool {
        !self.timed_out.is_empty()
    }

    /// Moves the queries that timed out by the time of a later packet of theirs into `out`;
    /// their time is [`Self::deadline_ns`] of their first send.
    pub fn take_timed_out(&mut self, out: &mut Vec<Box<FinishedQuery>>) {
        out.append(&mut self.timed_out);
    }

    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Feeds one packet. `sender` is called only for a new query, to attribute it.
    pub fn observe(
        &mut self,
        packet: Packet,
        sender: impl FnOnce(&Packet) -> Sender,
    ) -> Observation {
        match (packet.direction, packet.message.is_response) {
            (Direction::Egress, false) => self.on_query(packet, sender),
            (Direction::Ingress, true) => self.on_response(packet),
            // A query arriving or a response leaving: this socket is a server's, not a client's.
            _ => Observation::Nothing,
        }
    }

    fn key_hash(&self, packet: &Packet) -> u64 {
        let m = &packet.message;
        self.hasher.hash_one((
            packet.socket_cookie,
            m.id,
            &m.question.name,
            m.question.qtype,
        ))
    }

    /// The pending query `packet` (a query or its response) belongs to.
    fn find_by_key(&self, hash: u64, packet: &Packet) -> Option<Slot> {
        let m = &packet.message;
        self.by_key
            .find(hash, |&slot| {
                self.slots[slot as usize].query.as_ref().is_some_and(|q| {
                    q.socket_cookie == packet.socket_cookie
                        && q.id == m.id
                        && q.qtype == m.question.qtype
                        && q.qname == m.question.name
                })
            })
            .copied()
    }

    fn on_query(&mut self, packet: Packet, sender: impl FnOnce(&Packet) -> Sender) -> Observation {
        let key_hash = self.key_hash(&packet);
        if let Some(slot) = self.find_by_key(key_hash, &packet) {
            // Sent again after the query had timed out: a query of its own.
            if self.timed_out_by(slot, packet.ts_ns) {
                self.time_out(slot);
            } else if let Some(pending) = self.slots[slot as usize].query.as_mut() {
                pending.send_ts_ns.push(packet.ts_ns);
                self.stats.resends += 1;
                return Observation::Resent;
            }
        }
        if self.in_flight >= self.max_inflight {
            self.evict_oldest();
        }
        self.stats.queries += 1;
        let client_hash = self.hasher.hash_one((packet.src, packet.message.id));
        let sender = sender(&packet);
        let message = packet.message;
        let query = FinishedQuery {
            qname: message.question.name,
            qtype: message.question.qtype,
            id: message.id,
            transport: packet.transport,
            client: packet.src,
            server: packet.dst,
            socket_cookie: packet.socket_cookie,
            send_ts_ns: smallvec::smallvec![packet.ts_ns],
            response_ts_ns: None,
            outcome: Outcome::Unanswered,
            rcode: None,
            truncated: false,
            answers: Default::default(),
            sender,
            drops: Vec::new(),
        };
        let query = match self.spare.pop() {
            Some(mut spare) => {
                *spare = query;
                spare
            }
            None => Box::new(query),
        };
        let slot = self.link_newest(query, key_hash, client_hash);
        let slots = &self.slots;
        self.by_key
            .insert_unique(key_hash, slot, |&s| slots[s as usize].key_hash);
        let same_client = |&s: &Slot| {
            slots[s as usize]
                .query
                .as_ref()
                .is_some_and(|q| q.client == packet.src && q.id == message.id)
        };
        match self.by_client.find_mut(client_hash, same_client) {
            Some(older) => *older = slot,
            None => {
                self.by_client
                    .insert_unique(client_hash, slot, |&s| slots[s as usize].client_hash);
            }
        }
        Observation::Started
    }

    fn on_response(&mut self, packet: Packet) -> Observation {
        let key_hash = self.key_hash(&packet);
        let found = self.find_by_key(key_hash, &packet);
        // An answer after the timeout is a late one, however soon the daemon read it.
        if let Some(slot) = found.filter(|&slot| self.timed_out_by(slot, packet.ts_ns)) {
            self.time_out(slot);
            self.stats.unmatched_responses += 1;
            return Observation::Unmatched(packet);
        }
        let Some(mut query) = found.and_then(|slot| self.remove(slot)) else {
            self.stats.unmatched_responses += 1;
            return Observation::Unmatched(packet);
        };
        self.stats.answered += 1;
        query.response_ts_ns = Some(packet.ts_ns);
        query.outcome = Outcome::Answered;
        query.rcode = Some(packet.message.rcode);
        query.truncated = packet.message.truncated;
        query.answers = packet.message.answers;
        Observation::Finished(query)
    }

    /// Puts a new query in a free slot at the newest end of the list.
    fn link_newest(&mut self, query: Box<FinishedQuery>, key_hash: u64, client_hash: u64) -> Slot {
        let entry = PendingSlot {
            query: Some(query),
            key_hash,
            client_hash,
            older: self.newest,
            newer: NO_SLOT,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = entry;
                slot
            }
            None => {
                self.slots.push(entry);
                (self.slots.len() - 1) as Slot
            }
        };
        match self.newest {
            NO_SLOT => self.oldest = slot,
            newest => self.slots[newest as usize].newer = slot,
        }
        self.newest = slot;
        self.in_flight += 1;
        slot
    }

    /// Takes a pending query out of its slot, the list and every index.
    fn remove(&mut self, slot: Slot) -> Option<Box<FinishedQuery>> {
        let entry = &mut self.slots[slot as usize];
        let query = entry.query.take()?;
        let (older, newer) = (entry.older, entry.newer);
        let (key_hash, client_hash) = (entry.key_hash, entry.client_hash);
        match older {
            NO_SLOT => self.oldest = newer,
            older => self.slots[older as usize].newer = newer,
        }
        match newer {
            NO_SLOT => self.newest = older,
            newer => self.slots[newer as usize].older = older,
        }
        if let Ok(e) = self.by_key.find_entry(key_hash, |&s| s == slot) {
            e.remove();
        }
        // Absent when a newer query of the same client and id took its place.
        if let Ok(e) = self.by_client.find_entry(client_hash, |&s| s == slot) {
            e.remove();
        }
        self.free.push(slot);
        self.in_flight -= 1;
        Some(query)
    }

    /// Ends every query whose first send is older than the timeout at kernel time `now_ns`.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Box<FinishedQuery>>) {
        while let Some(oldest) = self.slots.get(self.oldest as usize) {
            let first_send = oldest.query.as_ref().map(|q| q.first_send_ns());
            if first_send.is_some_and(|t| now_ns.saturating_sub(t) < self.timeout_ns) {
                break;
            }
            let Some(query) = self.remove(self.oldest) else {
                break;
            };
            let query = self.unanswered(query);
            out.push(query);
        }
    }

    fn evict_oldest(&mut self) {
        if self.oldest != NO_SLOT && self.remove(self.oldest).is_some() {
            self.stats.evicted += 1;
        }
    }

    /// Attaches a drop to the pending query it belongs to: a dropped query is matched by its
    /// source (the client), a dropped response by its destination. Returns the drop back when
    /// no pending query matches.
    pub fn on_drop(&mut self, drop: DropRecord) -> Option<DropRecord> {
        let Some(id) = drop.dns_id else {
            return Some(drop);
        };
        let client = drop.client();
        let slots = &self.slots;
        let Some(&slot) = self
            .by_client
            .find(self.hasher.hash_one((client, id)), |&s| {
                slots[s as usize]
                    .query
                    .as_ref()
                    .is_some_and(|q| q.client == client && q.id == id)
            })
        else {
            return Some(drop);
        };
        // Dropped after the query had timed out: it belongs to the query's past.
        if self.timed_out_by(slot, drop.ts_ns) {
            self.time_out(slot);
            return Some(drop);
        }
        let Some(pending) = self.slots[slot as usize].query.as_mut() else {
            return Some(drop);
        };
        self.stats.drops_linked += 1;
        pending.drops.push(drop);
        None
    }
}

/// Finished queries for the tests of the modules that consume them (metrics, live view).
#[cfg(test)]
pub mod fixtures {
    use std::sync::Arc;

    use super::{FinishedQuery, Outcome, Sender, SenderNames};
    use crate::{
        attribute::{PodIdentity, Workload},
        decode::Transport,
    };

    pub fn pod(ns: &str, name: &str) -> Option<Arc<Workload>> {
        Some(Arc::new(Workload {
            pod: Some(PodIdentity {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                uid: format!("uid-{ns}-{name}"),
                qos: None,
            }),
            ..Default::default()
        }))
    }

    /// A query from `workload` to 10.96.0.10:53, answered after `latency_ms` or never.
    pub fn query(
        workload: Option<Arc<Workload>>,
        qname: &str,
        latency_ms: Option<u64>,
        rcode: Option<u16>,
    ) -> FinishedQuery {
        FinishedQuery {
            qname: qname.into(),
            qtype: 1,
            id: 1,
            transport: Transport::Udp,
            client: "10.0.0.1:4000".parse().unwrap(),
            server: "10.96.0.10:53".parse().unwrap(),
            socket_cookie: 1,
            send_ts_ns: smallvec::smallvec![1_000_000],
            response_ts_ns: latency_ms.map(|l| 1_000_000 + l * 1_000_000),
            outcome: if latency_ms.is_some() {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            },
            rcode,
            truncated: false,
            answers: Default::default(),
            sender: Sender {
                pid: Some(1),
                tid: Some(1),
                cgroup_id: 1,
                names: Arc::new(SenderNames {
                    comm: Some("app".into()),
                    thread_comm: Some("app".into()),
                    cgroup_path: Some("/kubepods/x".into()),
                    workload,
                }),
                lookup: 0,
            },
            drops: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{DnsMessage, Question};

    fn packet(dir: Direction, ts: u64, cookie: u64, id: u16, name: &str, response: bool) -> Packet {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "10.0.0.2:53".parse().unwrap();
        let (src, dst) = if dir == Direction::Egress {
            (client, server)
        } else {
            (server, client)
        };
        Packet {
            ts_ns: ts,
            socket_cookie: cookie,
            cgroup_id: 7,
            pid: Some(100),
            tid: Some(101),
            comm: Some("dig".into()),
            direction: dir,
            transport: Transport::Udp,
            src,
            dst,
            message: DnsMessage {
                id,
                is_response: response,
                rcode: if response { 3 } else { 0 },
                truncated: false,
                question: Question {
                    name: name.into(),
                    qtype: 1,
                },
                answers: if response {
                    smallvec::smallvec!["1.2.3.4".into()]
                } else {
                    Default::default()
                },
                partial: false,
            },
        }
    }

    fn sender(p: &Packet) -> Sender {
        Sender {
            pid: p.pid,
            tid: p.tid,
            cgroup_id: p.cgroup_id,
            names: Arc::new(SenderNames {
                comm: p.comm.map(|c| Arc::from(c.text())),
                thread_comm: p.comm.map(|c| Arc::from(c.text())),
                cgroup_path: Some("/test".into()),
                workload: None,
            }),
            lookup: 0,
        }
    }

    #[test]
    fn response_ends_query_with_latency_from_first_send() {
        let mut t = QueryTracker::new(10_000, 16);
        assert!(t
            .observe(
                packet(Direction::Egress, 1_000, 1, 42, "a.test.", false),
                sender
            )
            .finished()
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Egress, 1_500, 1, 42, "a.test.", false),
                sender
            )
            .finished()
            .is_none());
        let done = t
            .observe(
                packet(Direction::Ingress, 2_000, 1, 42, "A.TEST.", true),
                sender,
            )
            .finished()
            .expect("matched");
        assert_eq!(done.latency_ns(), Some(1_000));
        assert_eq!(done.send_ts_ns[..], [1_000, 1_500]);
        assert_eq!(done.outcome, Outcome::Answered);
        assert_eq!(done.rcode, Some(3));
        assert_eq!(done.client.to_string(), "10.0.0.1:40000");
        assert_eq!(done.server.to_string(), "10.0.0.2:53");
        assert_eq!(t.stats().resends, 1);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn other_socket_or_id_or_question_does_not_match() {
        let mut t = QueryTracker::new(10_000, 16);
        t.observe(
            packet(Direction::Egress, 1, 1, 42, "a.test.", false),
            sender,
        );
        assert!(t
            .observe(
                packet(Direction::Ingress, 2, 2, 42, "a.test.", true),
                sender
            )
            .finished()
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Ingress, 2, 1, 43, "a.test.", true),
                sender
            )
            .finished()
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Ingress, 2, 1, 42, "b.test.", true),
                sender
            )
            .finished()
            .is_none());
        assert_eq!(t.stats().unmatched_responses, 3);
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn server_side_packets_are_ignored() {
        let mut t = QueryTracker::new(10_000, 16);
        t.observe(
            packet(Direction::Ingress, 1, 1, 42, "a.test.", false),
            sender,
        );
        t.observe(packet(Direction::Egress, 2, 1, 42, "a.test.", true), sender);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.stats().queries, 0);
    }

    #[test]
    fn timeout_reports_unanswered_once() {
        let mut t = QueryTracker::new(1_000, 16);
        t.observe(
            packet(Direction::Egress, 100, 1, 42, "a.test.", false),
            sender,
        );
        t.observe(
            packet(Direction::Egress, 600, 1, 43, "a.test.", false),
            sender,
        );
        let mut out = Vec::new();
        t.expire(1_099, &mut out);
        assert!(out.is_empty());
        t.expire(1_100, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].id, 42);
        assert_eq!(out[0].outcome, Outcome::Unanswered);
        assert_eq!(out[0].latency_ns(), None);
        // A response after the timeout matches nothing.
        assert!(t
            .observe(
                packet(Direction::Ingress, 1_200, 1, 42, "a.test.", true),
                sender
            )
            .finished()
            .is_none());
        t.expire(10_000, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(t.stats().unanswered, 2);
    }

    #[test]
    fn answered_query_is_not_expired_later() {
        let mut t = QueryTracker::new(1_000, 16);
        t.observe(
            packet(Direction::Egress, 100, 1, 42, "a.test.", false),
            sender,
        );
        t.observe(
            packet(Direction::Ingress, 200, 1, 42, "a.test.", true),
            sender,
        );
        // Same id reused on the same socket after the first finished: a new query.
        t.observe(
            packet(Direction::Egress, 300, 1, 42, "a.test.", false),
            sender,
        );
        let mut out = Vec::new();
        t.expire(1_200, &mut out);
        assert!(out.is_empty(), "the finished query must not expire");
        t.expire(1_300, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].send_ts_ns[..], [300]);
    }

    fn drop_of(packet: DroppedPacket, id: u16) -> DropRecord {
        let client: SocketAddr = "10.0.0.1:40000".parse().unwrap();
        // A forwarded query already DNATed to a backend: only the client side still matches.
        let backend: SocketAddr = "10.9.9.9:53".parse().unwrap();
        let (src, dst) = match packet {
            DroppedPacket::Query => (client, backend),
            DroppedPacket::Response => (backend, client),
        };
        DropRecord {
            ts_ns: 150,
            packet,
            reason: "NETFILTER_DROP".into(),
            kind: "conntrack_insert_failed".into(),
            detail: Some("chaintoolong".into()),
            location: "nf_hook_slow+0x4c".into(),
            netns_inum: 1,
            src,
            dst,
            dns_id: Some(id),
        }
    }

    #[test]
    fn dropped_query_is_linked_and_outcome_says_dropped() {
        let mut t = QueryTracker::new(1_000, 16);
        t.observe(
            packet(Direction::Egress, 100, 1, 42, "a.test.", false),
            sender,
        );
        assert!(t.on_drop(drop_of(DroppedPacket::Query, 42)).is_none());
        // Another id does not link.
        assert!(t.on_drop(drop_of(DroppedPacket::Query, 43)).is_some());
        let mut out = Vec::new();
        t.expire(1_100, &mut out);
        assert_eq!(out[0].outcome, Outcome::Dropped);
        assert_eq!(out[0].drops.len(), 1);
        assert_eq!(out[0].drops[0].kind, "conntrack_insert_failed");
        // Once finished, nothing links any more.
        assert!(t.on_drop(drop_of(DroppedPacket::Query, 42)).is_some());
    }

    #[test]
    fn dropped_query_then_answered_resend_stays_answered() {
        let mut t = QueryTracker::new(10_000, 16);
        t.observe(
            packet(Direction::Egress, 100, 1, 42, "a.test.", false),
            sender,
        );
        assert!(t.on_drop(drop_of(DroppedPacket::Query, 42)).is_none());
        t.observe(
            packet(Direction::Egress, 5_100, 1, 42, "a.test.", false),
            sender,
        );
        let done = t
            .observe(
                packet(Direction::Ingress, 5_200, 1, 42, "a.test.", true),
                sender,
            )
            .finished()
            .unwrap();
        assert_eq!(done.outcome, Outcome::Answered);
        assert_eq!(done.send_ts_ns[..], [100, 5_100]);
        assert_eq!(done.drops.len(), 1);
    }

    /// Finished queries from the tracker: `sends` sends of id 42 on one socket, then a response
    /// at 1_000 or none (expired at 10_000).
    fn finished_query(sends: u64, answered: bool) -> Box<FinishedQuery> {
        let mut t = QueryTracker::new(5_000, 16);
        for i in 0..sends {
            t.observe(
                packet(Direction::Egress, 100 + i, 1, 42, "a.test.", false),
                sender,
            );
        }
        if answered {
            return t
                .observe(
                    packet(Direction::Ingress, 1_000, 1, 42, "a.test.", true),
                    sender,
                )
                .finished()
                .unwrap();
        }
        let mut out = Vec::new();
        t.expire(10_000, &mut out);
        out.pop().unwrap()
    }

    #[test]
    fn recent_queries_explain_late_responses_of_unanswered_and_resent_queries() {
        let late = packet(Direction::Ingress, 20_000, 1, 42, "A.test.", true);
        let why = |sends, answered| {
            let mut recent = RecentQueries::new(100_000, 16);
            recent.remember(&finished_query(sends, answered), 10_000);
            recent
                .late_response(&late)
                .map(|l| (l.why, l.after_first_send_ns))
        };
        assert_eq!(why(1, false), Some(("after_timeout".into(), 19_900)));
        assert_eq!(why(2, true), Some(("duplicate".into(), 19_900)));
        // Sent once and answered: no other response is expected, none is kept for it.
        assert_eq!(why(1, true), None);

        // A response dropped after the client took it off the network (its receive buffer was
        // full, its socket closed unread) is explained for any query, the latest of its key.
        let dropped = |queries: &[Box<FinishedQuery>]| {
            let mut recent = RecentQueries::new(100_000, 16);
            for q in queries {
                recent.remember(q, 10_000);
            }
            let mut d = drop_of(DroppedPacket::Response, 42);
            d.reason = "SOCKET_RCVBUFF".into();
            recent.late_drop(&d).map(|l| (l.qname.to_string(), l.why))
        };
        let rcvbuf = Some(("a.test.".to_owned(), "SOCKET_RCVBUFF".to_owned()));
        assert_eq!(dropped(&[finished_query(1, true)]), rcvbuf);
        assert_eq!(dropped(&[finished_query(1, false)]), rcvbuf);
        let mut newer = finished_query(1, true);
        newer.qname = "b.test.".into();
        let newer_name = Some(("b.test.".to_owned(), "SOCKET_RCVBUFF".to_owned()));
        assert_eq!(
            dropped(&[finished_query(1, false), newer.clone()]),
            newer_name
        );
        newer.outcome = Outcome::Unanswered;
        assert_eq!(dropped(&[finished_query(1, true), newer]), newer_name);

        let mut recent = RecentQueries::new(100_000, 2);
        for _ in 0..3 {
            recent.remember(&finished_query(1, false), 10_000);
        }
        assert_eq!(recent.len(), 1, "one entry per client and id");
        recent.expire(109_999);
        assert_eq!(recent.len(), 1);
        recent.remember(&finished_query(1, true), 20_000);
        assert_eq!(
            recent.len(),
            1,
            "the answered query replaces the older one of its key"
        );
        recent.expire(110_000);
        assert_eq!(recent.len(), 1, "the answered query is younger");
        recent.expire(120_000);
        assert_eq!(recent.len(), 0);
    }

    #[test]
    fn inflight_is_bounded_with_eviction_counted() {
        let mut t = QueryTracker::new(u64::MAX, 3);
        for id in 0..10u16 {
            t.observe(
                packet(Direction::Egress, u64::from(id), 1, id, "a.test.", false),
                sender,
            );
        }
        assert_eq!(t.in_flight(), 3);
        assert_eq!(t.stats().evicted, 7);
        // The newest survive.
        assert!(t
            .observe(
                packet(Direction::Ingress, 20, 1, 9, "a.test.", true),
                sender
            )
            .finished()
            .is_some());
        assert!(t
            .observe(
                packet(Direction::Ingress, 20, 1, 0, "a.test.", true),
                sender
            )
            .finished()
            .is_none());
    }

    /// The tracker against a plain model of its rules (a list searched linearly), over a long
    /// pseudo-random mix of queries, resends, responses, drops, expiry and eviction: slots are
    /// reused and the tables grow and shrink many times on the way.
    #[test]
    fn tracker_agrees_with_a_linear_model() {
        #[derive(Debug)]
        struct Model {
            seq: u64,
            cookie: u64,
            id: u16,
            name: &'static str,
            sends: Vec<u64>,
            drops: usize,
        }
        const TIMEOUT: u64 = 400;
        const CAP: usize = 12;
        let names = ["a.test.", "b.test.", "c.test."];
        let mut t = QueryTracker::new(TIMEOUT, CAP);
        let mut model: Vec<Model> = Vec::new();
        // The pending query a drop of each id links to: the newest started with it, while it
        // is pending.
        let mut by_id: HashMap<u16, u64> = HashMap::new();
        let (mut evicted, mut expired, mut linked) = (0u64, 0u64, 0u64);
        let mut timed_out_early = 0u64;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut seq = 0u64;
        // A packet of a query past its deadline ends it (as `expire` would have) before
        // anything else: the tracker hands it over in `take_timed_out`.
        // A query that ended without an answer, as the model says it should read.
        let check_ended = |q: &FinishedQuery, m: &Model, step: u64| {
            assert_eq!(q.send_ts_ns[..], m.sends[..], "step {step}");
            let outcome = if m.drops > 0 {
                Outcome::Dropped
            } else {
                Outcome::Unanswered
            };
            assert_eq!(q.outcome, outcome, "step {step}");
        };
        let timed_out = |t: &mut QueryTracker, m: Option<Model>, step: u64| {
            let mut out = Vec::new();
            t.take_timed_out(&mut out);
            assert_eq!(out.len(), usize::from(m.is_some()), "step {step}");
            if let (Some(q), Some(m)) = (out.first(), m) {
                check_ended(q, &m, step);
            }
        };
        for step in 0..20_000u64 {
            let ts = step * 10;
            let (cookie, id) = (1 + next(3), next(6) as u16);
            let name = names[next(3) as usize];
            let same = |m: &Model| m.cookie == cookie && m.id == id && m.name == name;
            let past = |m: &Model| ts - m.sends[0] >= TIMEOUT;
            // The pending query this packet belongs to, taken out when it timed out by now.
            let late_for = |model: &mut Vec<Model>, by_id: &mut HashMap<u16, u64>| {
                let at = model.iter().position(|m| same(m) && past(m))?;
                let m = model.remove(at);
                by_id.retain(|_, s| *s != m.seq);
                Some(m)
            };
            match next(10) {
                0..=4 => {
                    let gone = late_for(&mut model, &mut by_id);
                    if gone.is_some() {
                        expired += 1;
                        timed_out_early += 1;
                    }
                    let obs = t.observe(
                        packet(Direction::Egress, ts, cookie, id, name, false),
                        sender,
                    );
                    timed_out(&mut t, gone, step);
                    if let Some(m) = model.iter_mut().find(|m| same(m)) {
                        m.sends.push(ts);
                        assert!(matches!(obs, Observation::Resent), "step {step}: {obs:?}");
                        continue;
                    }
                    assert!(matches!(obs, Observation::Started), "step {step}: {obs:?}");
                    if model.len() >= CAP {
                        let gone = model.remove(0);
                        by_id.retain(|_, s| *s != gone.seq);
                        evicted += 1;
                    }
                    seq += 1;
                    by_id.insert(id, seq);
                    model.push(Model {
                        seq,
                        cookie,
                        id,
                        name,
                        sends: vec![ts],
                        drops: 0,
                    });
                }
                5..=7 => {
                    let gone = late_for(&mut model, &mut by_id);
                    if gone.is_some() {
                        expired += 1;
                        timed_out_early += 1;
                    }
                    let upper = name.to_ascii_uppercase();
                    let obs = t.observe(
                        packet(Direction::Ingress, ts, cookie, id, &upper, true),
                        sender,
                    );
                    timed_out(&mut t, gone, step);
                    match model.iter().position(same) {
                        Some(at) => {
                            let m = model.remove(at);
                            by_id.retain(|_, s| *s != m.seq);
                            let q = obs
                                .finished()
                                .unwrap_or_else(|| panic!("step {step}: unmatched"));
                            assert_eq!(q.send_ts_ns[..], m.sends[..], "step {step}");
                            assert_eq!(
                                (q.id, &*q.qname, q.drops.len()),
                                (m.id, m.name, m.drops),
                                "step {step}"
                            );
                        }
                        None => assert!(
                            matches!(obs, Observation::Unmatched(_)),
                            "step {step}: {obs:?}"
                        ),
                    }
                }
                8 => {
                    let target = by_id
                        .get(&id)
                        .and_then(|s| model.iter().position(|m| m.seq == *s));
                    let gone = target.filter(|&at| past(&model[at])).map(|at| {
                        let m = model.remove(at);
                        by_id.retain(|_, s| *s != m.seq);
                        expired += 1;
                        timed_out_early += 1;
                        m
                    });
                    let timed = gone.is_some();
                    let back = t.on_drop(DropRecord {
                        ts_ns: ts,
                        ..drop_of(DroppedPacket::Query, id)
                    });
                    timed_out(&mut t, gone, step);
                    if timed {
                        assert!(
                            back.is_some(),
                            "step {step}: drop linked to a timed-out query"
                        );
                        continue;
                    }
                    match by_id
                        .get(&id)
                        .and_then(|s| model.iter_mut().find(|m| m.seq == *s))
                    {
                        Some(m) => {
                            m.drops += 1;
                            linked += 1;
                            assert!(back.is_none(), "step {step}: drop not linked");
                        }
                        None => assert!(back.is_some(), "step {step}: drop linked to nothing"),
                    }
                }
                _ => {
                    let mut out = Vec::new();
                    t.expire(ts, &mut out);
                    let due = model
                        .iter()
                        .take_while(|m| ts - m.sends[0] >= TIMEOUT)
                        .count();
                    let gone: Vec<Model> = model.drain(..due).collect();
                    assert_eq!(out.len(), gone.len(), "step {step}");
                    for (q, m) in out.iter().zip(&gone) {
                        by_id.retain(|_, s| *s != m.seq);
                        check_ended(q, m, step);
                    }
                    expired += gone.len() as u64;
                }
            }
            assert_eq!(t.in_flight(), model.len(), "step {step}");
        }
        let stats = t.stats();
        assert_eq!(
            (stats.evicted, stats.unanswered, stats.drops_linked),
            (evicted, expired, linked)
        );
        assert!(evicted > 100 && expired > 100 && linked > 100, "{stats:?}");
        assert!(
            timed_out_early > 50,
            "{timed_out_early} queries timed out by a later packet"
        );
    }
}

/// Queries that ended recently, by client address and DNS id, so that a response arriving after
/// its query ended (or dropped on the way to a socket that is gone) can still be tied to it.
///
/// Unanswered and resent queries, which late and duplicate answers belong to, are kept by key
/// for `keep_ns`. Queries sent once and answered once, nearly all of them, are kept only in a
/// short ring searched when a response is dropped after the client took it from the network
/// (a full receive buffer, a socket closed with it unread): indexing every query made each one
/// cost an insert and an eviction in a table as large as `--max-inflight`, an eighth of the
/// daemon's time under load.
pub struct RecentQueries {
    /// With the sequence number of the entry: expiry checks it for every entry it pops, and
    /// it is cheaper next to the key than behind the box. Boxed: as many as `--max-inflight`
    /// are kept, and the table holds twice its entries in slots at worst.
    by_client: HashMap<(SocketAddr, u16), (u64, Box<RecentQuery>)>,
    /// (when remembered, key, seq): seq tells a stale entry from the current one of its key.
    order: std::collections::VecDeque<(u64, (SocketAddr, u16), u64)>,
    /// The latest queries sent once and answered once, oldest first, at most
    /// `ANSWERED_KEPT`: (when remembered, client, id, query).
    answered: std::collections::VecDeque<(u64, SocketAddr, u16, RecentQuery)>,
    keep_ns: u64,
    cap: usize,
    next_seq: u64,
}

/// How many answered queries `RecentQueries` keeps for dropped responses. Such a drop follows
/// its response within moments (the socket's buffer was full, or it closed unread); this covers
/// tens of milliseconds at 100,000 queries/s, and a linear search of it costs a few
/// microseconds per unexplained drop.
const ANSWERED_KEPT: usize = 4096;

#[derive(Debug, Clone)]
struct RecentQuery {
    qname: QName,
    qtype: u16,
    first_send_ns: u64,
    answered: bool,
    pid: Option<u32>,
    cgroup_id: u64,
}

impl RecentQueries {
    pub fn new(keep_ns: u64, cap: usize) -> Self {
        Self {
            by_client: HashMap::new(),
            order: std::collections::VecDeque::new(),
            answered: std::collections::VecDeque::new(),
            keep_ns,
            cap: cap.max(1),
            next_seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.by_client.len() + self.answered.len()
    }

    /// Keeps what a late response or drop needs to be explained. A query sent once and
    /// answered once gets another response only if the server or the network duplicates it
    /// (that one is counted in `unmatched_responses`); only a drop of its one response is
    /// explained, from the short ring.
    pub fn remember(&mut self, q: &FinishedQuery, now_ns: u64) {
        let key = (q.client, q.id);
        let recent = RecentQuery {
            qname: q.qname.clone(),
            qtype: q.qtype,
            first_send_ns: q.first_send_ns(),
            answered: q.outcome == Outcome::Answered,
            pid: q.sender.pid,
            cgroup_id: q.sender.cgroup_id,
        };
        if q.outcome == Outcome::Answered && q.send_ts_ns.len() < 2 {
            // This query is now the latest of its key: an older one kept by key must not
            // take its drops.
            if !self.by_client.is_empty() {
                self.by_client.remove(&key);
            }
            if self.answered.len() >= ANSWERED_KEPT {
                self.answered.pop_front();
            }
            self.answered.push_back((now_ns, key.0, key.1, recent));
            return;
        }
        while self.order.len() >= self.cap {
            self.pop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_client.insert(key, (seq, Box::new(recent)));
        self.order.push_back((now_ns, key, seq));
    }

    pub fn expire(&mut self, now_ns: u64) {
        while let Some((at, _, _)) = self.order.front() {
            if now_ns.saturating_sub(*at) < self.keep_ns {
                break;
            }
            self.pop_oldest();
        }
        while self
            .answered
            .front()
            .is_some_and(|(at, ..)| now_ns.saturating_sub(*at) >= self.keep_ns)
        {
            self.answered.pop_front();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, key, seq)) = self.order.pop_front() {
            // A later remember() of the same key replaced this entry: keep that one.
            if self.by_client.get(&key).is_some_and(|(s, _)| *s == seq) {
                self.by_client.remove(&key);
            }
        }
    }

    /// A response that matched no pending query.
    pub fn late_response(&self, packet: &Packet) -> Option<crate::lookup::LateArrival> {
        let (_, recent) = self.by_client.get(&(packet.dst, packet.message.id))?;
        if !recent
            .qname
            .eq_ignore_ascii_case(&packet.message.question.name)
            || recent.qtype != packet.message.question.qtype
        {
            return None;
        }
        Some(crate::lookup::LateArrival {
            ts_ns: packet.ts_ns,
            id: packet.message.id,
            qname: recent.qname.clone(),
            qtype: recent.qtype,
            after_first_send_ns: packet.ts_ns.saturating_sub(recent.first_send_ns),
            why: if recent.answered {
                "duplicate".into()
            } else {
                "after_timeout".into()
            },
            pid: recent.pid,
            cgroup_id: recent.cgroup_id,
        })
    }

    /// A dropped response whose query already ended (the client closed its socket, say).
    pub fn late_drop(&self, drop: &DropRecord) -> Option<crate::lookup::LateArrival> {
        if drop.packet != DroppedPacket::Response {
            return None;
        }
        let id = drop.dns_id?;
        let recent = match self.by_client.get(&(drop.dst, id)) {
            Some((_, recent)) => &**recent,
            // A key's entry in `by_client` is newer than its queries in the ring (remembering
            // an answered query removes it), so only without one is the ring's newest match
            // the query the dropped response was for.
            None => self
                .answered
                .iter()
                .rev()
                .find(|(_, client, query_id, _)| *client == drop.dst && *query_id == id)
                .map(|(.., recent)| recent)?,
        };
        Some(crate::lookup::LateArrival {
            ts_ns: drop.ts_ns,
            id,
            qname: recent.qname.clone(),
            qtype: recent.qtype,
            after_first_send_ns: drop.ts_ns.saturating_sub(recent.first_send_ns),
            why: drop.reason.clone(),
            pid: recent.pid,
            cgroup_id: recent.cgroup_id,
        })
    }
}
