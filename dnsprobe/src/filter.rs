//! Filters of `dnsprobe run`: which records reach the output.

use std::time::Duration;

use crate::{
    correlate::{DropRecord, FinishedQuery, Outcome},
    decode::rcode_name,
    lookup::{LateArrival, LookupRecord},
    pipeline::Sink,
};

/// A glob over names: `*` matches any run of characters, `?` one; case-insensitive, and a
/// trailing dot is optional on both sides (`*.example.com` matches `www.example.com.`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    pattern: Vec<u8>,
}

impl NamePattern {
    pub fn new(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() {
            return Err("empty pattern".into());
        }
        Ok(Self {
            pattern: pattern
                .trim_end_matches('.')
                .to_ascii_lowercase()
                .into_bytes(),
        })
    }

    pub fn matches(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        glob(&self.pattern, name.as_bytes())
    }
}

/// Iterative glob match with single-star backtracking: linear in practice, no recursion.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    pub namespaces: Vec<String>,
    pub pods: Vec<String>,
    pub names: Vec<NamePattern>,
    pub min_latency: Option<Duration>,
    /// Upper-case mnemonics (`NXDOMAIN`).
    pub rcodes: Vec<String>,
    pub outcomes: Vec<String>,
}

impl RecordFilter {
    fn pod_matches(&self, workload: Option<&crate::attribute::Workload>) -> bool {
        let pod = workload.and_then(|w| w.pod.as_ref());
        let ns_ok = self.namespaces.is_empty()
            || pod
                .and_then(|p| p.namespace.as_deref())
                .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns));
        let pod_ok = self.pods.is_empty()
            || pod
                .and_then(|p| p.name.as_deref())
                .is_some_and(|name| self.pods.iter().any(|n| n == name));
        ns_ok && pod_ok
    }

    fn name_matches(&self, name: &str) -> bool {
        self.names.is_empty() || self.names.iter().any(|p| p.matches(name))
    }

    pub fn query(&self, q: &FinishedQuery) -> bool {
        let min_ok = match self.min_latency {
            None => true,
            // An unanswered query waited at least as long as anything answered.
            Some(min) => q
                .latency_ns()
                .is_none_or(|l| u128::from(l) >= min.as_nanos()),
        };
        let rcode_ok = self.rcodes.is_empty()
            || q.rcode
                .is_some_and(|r| self.rcodes.contains(&rcode_name(r)));
        let outcome_ok =
            self.outcomes.is_empty() || self.outcomes.iter().any(|o| o == q.outcome.as_str());
        min_ok
            && rcode_ok
            && outcome_ok
            && self.name_matches(&q.qname)
            && self.pod_matches(q.sender.names.workload.as_deref())
    }

    pub fn lookup(&self, l: &LookupRecord) -> bool {
        let min_ok = self
            .min_latency
            .is_none_or(|min| u128::from(l.duration_ns) >= min.as_nanos());
        let rcode_ok = self.rcodes.is_empty()
            || l.final_rcode
                .as_deref()
                .is_some_and(|r| self.rcodes.iter().any(|want| want == r));
        // A lookup has no outcome of its own: it is "answered" when it got a final answer.
        let outcome = if l.final_rcode.is_some() {
            Outcome::Answered
        } else {
            Outcome::Unanswered
        };
        let outcome_ok = self.outcomes.is_empty()
            || self.outcomes.iter().any(|o| {
                o == outcome.as_str()
                    || (o == "dropped"
                        && l.diagnosis.iter().any(|d| {
                            d.code.contains("drop") || d.code == "conntrack_insert_failed"
                        }))
            });
        min_ok
            && rcode_ok
            && outcome_ok
            && self.name_matches(&l.name)
            && self.pod_matches(l.workload.as_deref())
    }

    /// Drops and late responses carry no pod or latency of their own: shown only when no
    /// filter asks for something they cannot answer.
    fn unattributed(&self) -> bool {
        self.namespaces.is_empty()
            && self.pods.is_empty()
            && self.names.is_empty()
            && self.min_latency.is_none()
            && self.rcodes.is_empty()
    }
}

/// Passes to the inner sink only what the filter lets through.
pub struct FilteredSink<S> {
    pub filter: RecordFilter,
    pub inner: S,
}

impl<S: Sink> Sink for FilteredSink<S> {
    fn query(&mut self, query: &FinishedQuery) {
        if self.filter.query(query) {
            self.inner.query(query);
        }
    }
    fn lookup(&mut self, lookup: &LookupRecord) {
        if self.filter.lookup(lookup) {
            self.inner.lookup(lookup);
        }
    }
    fn packet_drop(&mut self, drop: &DropRecord) {
        if self.filter.unattributed()
            && (self.filter.outcomes.is_empty()
                || self.filter.outcomes.iter().any(|o| o == "dropped"))
        {
            self.inner.packet_drop(drop);
        }
    }
    fn late(&mut self, late: &LateArrival) {
        if self.filter.unattributed() && self.filter.name_matches(&late.qname) {
            self.inner.late(late);
        }
    }
    fn flush(&mut self) {
        self.inner.flush();
    }
    fn records(&self) -> u64 {
        self.inner.records()
    }
    fn write_errors(&self) -> u64 {
        self.inner.write_errors()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        attribute::{PodIdentity, Workload},
        correlate::Sender,
        decode::Transport,
    };
    use std::sync::Arc;

    fn query(latency_ms: Option<u64>, rcode: Option<u16>, ns: &str) -> FinishedQuery {
        FinishedQuery {
            qname: "www.example.com.".into(),
            qtype: 1,
            id: 1,
            transport: Transport::Udp,
            client: "10.0.0.1:4000".parse().unwrap(),
            server: "10.0.0.2:53".parse().unwrap(),
            socket_cookie: 1,
            send_ts_ns: smallvec::smallvec![0],
            response_ts_ns: latency_ms.map(|l| l * 1_000_000),
            outcome: if latency_ms.is_some() {
                Outcome::Answered
            } else {
                Outcome::Unanswered
            },
            rcode,
            truncated: false,
            answers: Default::default(),
            sender: Sender {
                pid: None,
                tid: None,
                cgroup_id: 1,
                names: Arc::new(crate::correlate::SenderNames {
                    workload: Some(Arc::new(Workload {
                        pod: Some(PodIdentity {
                            namespace: Some(ns.into()),
                            name: Some("web-1".into()),
                            uid: "u".into(),
                            qos: None,
                        }),
                        ..Default::default()
                    })),
                    ..Default::default()
                }),
                lookup: 0,
            },
            drops: vec![],
        }
    }

    #[test]
    fn query_filters() {
        let f = RecordFilter {
            namespaces: vec!["prod".into()],
            min_latency: Some(Duration::from_millis(100)),
            ..Default::default()
        };
        assert!(f.query(&query(Some(150), Some(0), "prod")));
        assert!(!f.query(&query(Some(50), Some(0), "prod")));
        assert!(!f.query(&query(Some(150), Some(0), "dev")));
        assert!(
            f.query(&query(None, None, "prod")),
            "unanswered passes min-latency"
        );
        let f = RecordFilter {
            rcodes: vec!["SERVFAIL".into()],
            pods: vec!["web-1".into()],
            ..Default::default()
        };
        assert!(f.query(&query(Some(1), Some(2), "x")));
        assert!(!f.query(&query(Some(1), Some(0), "x")));
        let f = RecordFilter {
            outcomes: vec!["unanswered".into()],
            names: vec![NamePattern::new("*.example.org").unwrap()],
            ..Default::default()
        };
        assert!(!f.query(&query(None, None, "x")), "name does not match");
    }

    #[test]
    fn glob_patterns() {
        let p = NamePattern::new("*.example.com").unwrap();
        assert!(p.matches("www.example.com."));
        assert!(p.matches("a.b.EXAMPLE.com"));
        assert!(!p.matches("example.com."));
        assert!(!p.matches("www.example.org."));
        let q = NamePattern::new("api-?.svc.*").unwrap();
        assert!(q.matches("api-1.svc.cluster.local."));
        assert!(!q.matches("api-12.svc.cluster.local."));
        assert!(NamePattern::new("*").unwrap().matches("anything."));
        assert!(NamePattern::new("").is_err());
        // Pathological pattern stays fast.
        let slow = NamePattern::new("*a*a*a*a*a*a*a*a*b").unwrap();
        assert!(!slow.matches(&"a".repeat(200)));
    }
}
