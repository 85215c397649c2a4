//! Matches responses to queries and decides when a query is finished.
//!
//! A query is identified by the socket that sent it (its cookie), its DNS id and its question.
//! The first send starts the clock; later sends of the same query while it is pending are
//! resends. The first response that matches ends it. Pending state is bounded: beyond
//! `max_inflight` the oldest query is evicted and counted.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use crate::decode::{Direction, Packet, Transport};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct QueryKey {
    socket_cookie: u64,
    id: u16,
    qname_lower: String,
    qtype: u16,
}

/// Where a query came from, as far as the kernel could tell at send time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub pid: Option<u32>,
    pub tid: Option<u32>,
    /// Name of the sending process (its thread group leader's comm).
    pub comm: Option<String>,
    /// Comm of the sending thread, as the kernel saw it.
    pub thread_comm: Option<String>,
    pub cgroup_id: u64,
    /// Resolved while the cgroup still existed; `None` if it could not be.
    pub cgroup_path: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Answered,
    Unanswered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Unanswered => "unanswered",
        }
    }
}

/// A query that is over: answered, or timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedQuery {
    pub qname: String,
    pub qtype: u16,
    pub id: u16,
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub socket_cookie: u64,
    /// Kernel (CLOCK_MONOTONIC) time of every send, first one first.
    pub send_ts_ns: Vec<u64>,
    pub response_ts_ns: Option<u64>,
    pub outcome: Outcome,
    pub rcode: Option<u16>,
    pub truncated: bool,
    pub answers: Vec<String>,
    pub sender: Sender,
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

struct Pending {
    query: FinishedQuery,
    /// Position in `order`.
    seq: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TrackerStats {
    pub queries: u64,
    pub resends: u64,
    pub answered: u64,
    pub unanswered: u64,
    /// Responses that matched no pending query (late, duplicate, or query not seen).
    pub unmatched_responses: u64,
    /// Pending queries dropped to stay under `max_inflight`.
    pub evicted: u64,
}

pub struct QueryTracker {
    pending: HashMap<QueryKey, Pending>,
    /// Pending queries in first-send order (by `seq`), with their first-send time: holds only
    /// live entries, so its size is bounded like `pending`.
    order: BTreeMap<u64, (u64, QueryKey)>,
    timeout_ns: u64,
    max_inflight: usize,
    next_seq: u64,
    stats: TrackerStats,
}

impl QueryTracker {
    pub fn new(timeout_ns: u64, max_inflight: usize) -> Self {
        Self {
            pending: HashMap::new(),
            order: BTreeMap::new(),
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
    ) -> Option<FinishedQuery> {
        match (packet.direction, packet.message.is_response) {
            (Direction::Egress, false) => {
                self.on_query(packet, sender);
                None
            }
            (Direction::Ingress, true) => self.on_response(packet),
            // A query arriving or a response leaving: this socket is a server's, not a client's.
            _ => None,
        }
    }

    fn on_query(&mut self, packet: Packet, sender: impl FnOnce(&Packet) -> Sender) {
        let (qname_lower, qtype) = packet.message.question.key();
        let key = QueryKey {
            socket_cookie: packet.socket_cookie,
            id: packet.message.id,
            qname_lower,
            qtype,
        };
        if let Some(pending) = self.pending.get_mut(&key) {
            pending.query.send_ts_ns.push(packet.ts_ns);
            self.stats.resends += 1;
            return;
        }
        if self.pending.len() >= self.max_inflight {
            self.evict_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.queries += 1;
        self.order.insert(seq, (packet.ts_ns, key.clone()));
        let sender = sender(&packet);
        let message = packet.message;
        self.pending.insert(
            key,
            Pending {
                seq,
                query: FinishedQuery {
                    qname: message.question.name,
                    qtype: message.question.qtype,
                    id: message.id,
                    transport: packet.transport,
                    client: packet.src,
                    server: packet.dst,
                    socket_cookie: packet.socket_cookie,
                    send_ts_ns: vec![packet.ts_ns],
                    response_ts_ns: None,
                    outcome: Outcome::Unanswered,
                    rcode: None,
                    truncated: false,
                    answers: Vec::new(),
                    sender,
                },
            },
        );
    }

    fn on_response(&mut self, packet: Packet) -> Option<FinishedQuery> {
        let (qname_lower, qtype) = packet.message.question.key();
        let key = QueryKey {
            socket_cookie: packet.socket_cookie,
            id: packet.message.id,
            qname_lower,
            qtype,
        };
        let Some(Pending { mut query, seq }) = self.pending.remove(&key) else {
            self.stats.unmatched_responses += 1;
            return None;
        };
        self.order.remove(&seq);
        self.stats.answered += 1;
        query.response_ts_ns = Some(packet.ts_ns);
        query.outcome = Outcome::Answered;
        query.rcode = Some(packet.message.rcode);
        query.truncated = packet.message.truncated;
        query.answers = packet.message.answers;
        Some(query)
    }

    /// Ends every query whose first send is older than the timeout at kernel time `now_ns`.
    pub fn expire(&mut self, now_ns: u64, out: &mut Vec<FinishedQuery>) {
        while let Some(entry) = self.order.first_entry() {
            if now_ns.saturating_sub(entry.get().0) < self.timeout_ns {
                break;
            }
            let (_, key) = entry.remove();
            if let Some(pending) = self.pending.remove(&key) {
                self.stats.unanswered += 1;
                out.push(pending.query);
            }
        }
    }

    fn evict_oldest(&mut self) {
        if let Some((_, (_, key))) = self.order.pop_first() {
            if self.pending.remove(&key).is_some() {
                self.stats.evicted += 1;
            }
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
                    vec!["1.2.3.4".into()]
                } else {
                    vec![]
                },
                partial: false,
            },
        }
    }

    fn sender(p: &Packet) -> Sender {
        Sender {
            pid: p.pid,
            tid: p.tid,
            comm: p.comm.clone(),
            thread_comm: p.comm.clone(),
            cgroup_id: p.cgroup_id,
            cgroup_path: Some("/test".into()),
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
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Egress, 1_500, 1, 42, "a.test.", false),
                sender
            )
            .is_none());
        let done = t
            .observe(
                packet(Direction::Ingress, 2_000, 1, 42, "A.TEST.", true),
                sender,
            )
            .expect("matched");
        assert_eq!(done.latency_ns(), Some(1_000));
        assert_eq!(done.send_ts_ns, vec![1_000, 1_500]);
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
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Ingress, 2, 1, 43, "a.test.", true),
                sender
            )
            .is_none());
        assert!(t
            .observe(
                packet(Direction::Ingress, 2, 1, 42, "b.test.", true),
                sender
            )
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
        assert_eq!(out[0].send_ts_ns, vec![300]);
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
            .is_some());
        assert!(t
            .observe(
                packet(Direction::Ingress, 20, 1, 0, "a.test.", true),
                sender
            )
            .is_none());
    }
}
