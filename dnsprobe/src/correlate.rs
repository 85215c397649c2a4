//! Matches responses to queries and decides when a query is finished.
//!
//! A query is identified by the socket that sent it (its cookie), its DNS id and its question.
//! The first send starts the clock; later sends of the same query while it is pending are
//! resends. The first response that matches ends it. Pending state is bounded: beyond
//! `max_inflight` the oldest query is evicted and counted.

use std::{collections::BTreeMap, net::SocketAddr};

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt as _};

use crate::{
    decode::{Direction, Packet, Transport},
    qname::QName,
};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueryKey {
    socket_cookie: u64,
    id: u16,
    qname: QName,
    qtype: u16,
}

impl QueryKey {
    fn of(query: &FinishedQuery) -> Self {
        Self {
            socket_cookie: query.socket_cookie,
            id: query.id,
            qname: query.qname.clone(),
            qtype: query.qtype,
        }
    }
}

/// Where a query came from, as far as the kernel could tell at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    /// Name of the sending process (its thread group leader's comm). Shared with the cache it
    /// came from, like the other strings here: every query of a process carries the same.
    pub comm: Option<Arc<str>>,
    /// Comm of the sending thread, as the kernel saw it.
    pub thread_comm: Option<Arc<str>>,
    pub cgroup_id: u64,
    /// Resolved while the cgroup still existed; `None` if it could not be.
    pub cgroup_path: Option<Arc<str>>,
    /// Pod and container (or host unit) the cgroup belongs to.
    pub workload: Option<std::sync::Arc<crate::attribute::Workload>>,
    /// The lookup the query belongs to (`LookupTracker::query_started`), 0 for none.
    pub lookup: crate::lookup::LookupId,
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
    /// A response ended a query. Boxed from its first packet to its lookup: a query is a few
    /// hundred bytes, and it is handed on several times.
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

pub struct QueryTracker {
    /// Pending queries by sequence number, that is in the order they were first seen (which is
    /// first-send order up to the small reordering between CPUs). Boxed: a pending query is a
    /// few hundred bytes, and tens of thousands can be in flight.
    pending: BTreeMap<u64, Box<FinishedQuery>>,
    by_key: HashMap<QueryKey, u64>,
    /// Client address and DNS id of each pending query: what a dropped packet can be matched
    /// by, since a forwarded packet has no socket and may already be NATed towards a backend.
    by_client: HashMap<(SocketAddr, u16), u64>,
    timeout_ns: u64,
    max_inflight: usize,
    next_seq: u64,
    stats: TrackerStats,
}

impl QueryTracker {
    pub fn new(timeout_ns: u64, max_inflight: usize) -> Self {
        Self {
            pending: BTreeMap::new(),
            by_key: HashMap::new(),
            by_client: HashMap::new(),
            timeout_ns,
            max_inflight: max_inflight.max(1),
            next_seq: 0,
            stats: TrackerStats::default(),
        }
    }

    pub fn stats(&self) -> TrackerStats {
        self.stats
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
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

    fn on_query(&mut self, packet: Packet, sender: impl FnOnce(&Packet) -> Sender) -> Observation {
        let key = QueryKey {
            socket_cookie: packet.socket_cookie,
            id: packet.message.id,
            qname: packet.message.question.name.clone(),
            qtype: packet.message.question.qtype,
        };
        if let Some(pending) = self
            .by_key
            .get(&key)
            .and_then(|seq| self.pending.get_mut(seq))
        {
            pending.send_ts_ns.push(packet.ts_ns);
            self.stats.resends += 1;
            return Observation::Resent;
        }
        if self.pending.len() >= self.max_inflight {
            self.evict_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.queries += 1;
        self.by_key.insert(key, seq);
        self.by_client.insert((packet.src, packet.message.id), seq);
        let sender = sender(&packet);
        let message = packet.message;
        self.pending.insert(
            seq,
            Box::new(FinishedQuery {
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
            }),
        );
        Observation::Started
    }

    fn on_response(&mut self, packet: Packet) -> Observation {
        let key = QueryKey {
            socket_cookie: packet.socket_cookie,
            id: packet.message.id,
            qname: packet.message.question.name.clone(),
            qtype: packet.message.question.qtype,
        };
        let Some(seq) = self.by_key.get(&key).copied() else {
            self.stats.unmatched_responses += 1;
            return Observation::Unmatched(packet);
        };
        let Some(pending) = self.remove(seq) else {
            self.stats.unmatched_responses += 1;
            return Observation::Unmatched(packet);
        };
        let mut query = pending;
        self.stats.answered += 1;
        query.response_ts_ns = Some(packet.ts_ns);
        query.outcome = Outcome::Answered;
        query.rcode = Some(packet.message.rcode);
        query.truncated = packet.message.truncated;
        query.answers = packet.message.answers;
        Observation::Finished(query)
    }

    /// Takes a pending query out of every index.
    fn remove(&mut self, seq: u64) -> Option<Box<FinishedQuery>> {
        let pending = self.pending.remove(&seq)?;
        let key = QueryKey::of(&pending);
        if self.by_key.get(&key) == Some(&seq) {
            self.by_key.remove(&key);
        }
        let client_key = (pending.client, pending.id);
        if self.by_client.get(&client_key) == Some(&seq) {
            self.by_client.remove(&client_key);
        }
        Some(pending)
    }

    /// Ends every query whose first send is older than the timeout at kernel time `now_ns`.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<Box<FinishedQuery>>) {
        while let Some((&seq, pending)) = self.pending.first_key_value() {
            if now_ns.saturating_sub(pending.first_send_ns()) < self.timeout_ns {
                break;
            }
            let Some(mut query) = self.remove(seq) else {
                break;
            };
            self.stats.unanswered += 1;
            if query.drops.iter().any(|d| d.packet == DroppedPacket::Query) {
                query.outcome = Outcome::Dropped;
            }
            out.push(query);
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((&seq, _)) = self.pending.first_key_value() {
            if self.remove(seq).is_some() {
                self.stats.evicted += 1;
            }
        }
    }

    /// Attaches a drop to the pending query it belongs to: a dropped query is matched by its
    /// source (the client), a dropped response by its destination. Returns the drop back when
    /// no pending query matches.
    pub fn on_drop(&mut self, drop: DropRecord) -> Option<DropRecord> {
        let Some(id) = drop.dns_id else {
            return Some(drop);
        };
        let client = match drop.packet {
            DroppedPacket::Query => drop.src,
            DroppedPacket::Response => drop.dst,
        };
        let Some(seq) = self.by_client.get(&(client, id)) else {
            return Some(drop);
        };
        let Some(pending) = self.pending.get_mut(seq) else {
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

    use super::{FinishedQuery, Outcome, Sender};
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
                comm: Some("app".into()),
                thread_comm: Some("app".into()),
                cgroup_id: 1,
                cgroup_path: Some("/kubepods/x".into()),
                workload,
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
            comm: p.comm.as_deref().map(Arc::from),
            thread_comm: p.comm.as_deref().map(Arc::from),
            cgroup_id: p.cgroup_id,
            cgroup_path: Some("/test".into()),
            workload: None,
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
