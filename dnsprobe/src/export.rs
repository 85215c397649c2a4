//! Writes finished queries as JSON lines or readable text.

use std::{
    borrow::Cow,
    io::{self, Write},
    net::SocketAddr,
};

use serde::Serialize;

use crate::{
    attribute::{ContainerIdentity, PodIdentity},
    correlate::{DropRecord, FinishedQuery, Outcome},
    decode::{qtype_mnemonic, qtype_name, rcode_mnemonic, rcode_name},
    lookup::{Diagnosis, LateArrival, LookupRecord, ResolverConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("writing a record: {0}")]
    Write(#[from] io::Error),
    #[error("serialising a record: {0}")]
    Json(#[from] serde_json::Error),
}

/// Converts kernel CLOCK_MONOTONIC nanoseconds to wall-clock nanoseconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// realtime - monotonic, sampled once at start.
    offset_ns: i128,
}

impl WallClock {
    pub fn now() -> Self {
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        let real = clock_ns(libc::CLOCK_REALTIME);
        Self {
            offset_ns: i128::from(real) - i128::from(mono),
        }
    }

    pub fn wall_ns(&self, mono_ns: u64) -> i128 {
        i128::from(mono_ns) + self.offset_ns
    }
}

/// Current time of `clock` in nanoseconds; the kernel's `bpf_ktime_get_ns` is CLOCK_MONOTONIC.
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec; the clock ids used here always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// `2026-11-25T22:41:03.123456789Z`: RFC 3339, UTC, always nine fractional digits.
pub fn rfc3339_nanos(epoch_ns: i128) -> String {
    Timestamp(epoch_ns).to_string()
}

/// A wall-clock time written as [`rfc3339_nanos`] does, without allocating: every record
/// carries one or more, and formatting them was a tenth of the cost of a query.
#[derive(Debug, Clone, Copy)]
pub struct Timestamp(pub i128);

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.0.div_euclid(1_000_000_000) as i64;
        let nanos = self.0.rem_euclid(1_000_000_000) as u32;
        let days = secs.div_euclid(86_400);
        let sod = secs.rem_euclid(86_400) as u32;
        let (y, m, d) = civil_from_days(days);
        if !(0..=9999).contains(&y) {
            return write!(
                f,
                "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
                sod / 3600,
                (sod / 60) % 60,
                sod % 60
            );
        }
        let mut b = *b"0000-00-00T00:00:00.000000000Z";
        let mut put = |at: usize, width: usize, mut v: u32| {
            for i in (at..at + width).rev() {
                b[i] = b'0' + (v % 10) as u8;
                v /= 10;
            }
        };
        put(0, 4, y as u32);
        put(5, 2, m);
        put(8, 2, d);
        put(11, 2, sod / 3600);
        put(14, 2, (sod / 60) % 60);
        put(17, 2, sod % 60);
        put(20, 9, nanos);
        // Only ASCII digits and separators were written.
        f.write_str(std::str::from_utf8(&b).map_err(|_| std::fmt::Error)?)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Serialises a value through its `Display`, without an intermediate `String`.
pub struct Shown<T>(pub T);

impl<T: std::fmt::Display> Serialize for Shown<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// The send times of a query, as a JSON array of [`Timestamp`]s.
struct SendTimes<'a> {
    sends: &'a [u64],
    clock: WallClock,
}

impl Serialize for SendTimes<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.sends.iter().map(|&t| Timestamp(self.clock.wall_ns(t))))
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[derive(Serialize)]
struct QueryRecord<'a> {
    event: &'static str,
    time: Timestamp,
    qname: &'a str,
    qtype: Cow<'static, str>,
    id: u16,
    transport: &'static str,
    client: Shown<&'a SocketAddr>,
    server: Shown<&'a SocketAddr>,
    outcome: &'static str,
    rcode: Option<Cow<'static, str>>,
    latency_ns: Option<u64>,
    sends: usize,
    /// Every send, first one first (RFC 3339).
    send_times: SendTimes<'a>,
    answers: &'a [String],
    truncated: bool,
    pid: Option<u32>,
    tid: Option<u32>,
    comm: Option<&'a str>,
    thread_comm: Option<&'a str>,
    cgroup_id: u64,
    cgroup_path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a PodIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a ContainerIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    host_unit: Option<&'a str>,
    socket_cookie: u64,
    drops: Vec<DropJson<'a>>,
}

#[derive(Serialize)]
struct DropJson<'a> {
    time: Timestamp,
    packet: &'static str,
    reason: &'a str,
    kind: &'a str,
    detail: Option<&'a str>,
    location: &'a str,
    netns: u32,
    src: Shown<&'a SocketAddr>,
    dst: Shown<&'a SocketAddr>,
    dns_id: Option<u16>,
}

impl<'a> DropJson<'a> {
    fn new(d: &'a DropRecord, clock: &WallClock) -> Self {
        Self {
            time: Timestamp(clock.wall_ns(d.ts_ns)),
            packet: d.packet.as_str(),
            reason: &d.reason,
            kind: &d.kind,
            detail: d.detail.as_deref(),
            location: &d.location,
            netns: d.netns_inum,
            src: Shown(&d.src),
            dst: Shown(&d.dst),
            dns_id: d.dns_id,
        }
    }
}

/// A drop that matched no pending query (its query already ended, or was never seen).
#[derive(Serialize)]
struct DropEventRecord<'a> {
    event: &'static str,
    #[serde(flatten)]
    drop: DropJson<'a>,
}

#[derive(Serialize)]
struct LookupJson<'a> {
    event: &'static str,
    time: Timestamp,
    name: &'a str,
    duration_ns: u64,
    queries: usize,
    search_expansions: usize,
    final_rcode: Option<&'a str>,
    answers: &'a [String],
    pid: Option<u32>,
    comm: Option<&'a str>,
    cgroup_id: u64,
    cgroup_path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<&'a PodIdentity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    container: Option<&'a ContainerIdentity>,
    resolver: Option<&'a ResolverConfig>,
    diagnosis: &'a [Diagnosis],
}

#[derive(Serialize)]
struct LateJson<'a> {
    event: &'static str,
    time: Timestamp,
    qname: &'a str,
    qtype: String,
    id: u16,
    why: &'a str,
    after_first_send_ns: u64,
    pid: Option<u32>,
    cgroup_id: u64,
}

pub enum RecordFormat {
    Json,
    Text,
}

pub struct RecordWriter<W: Write> {
    out: W,
    /// One record is serialised here first and written with one call: serde_json writes a
    /// record in dozens of small pieces, each a call through `out`.
    line: Vec<u8>,
    format: RecordFormat,
    clock: WallClock,
    written: u64,
    errors: u64,
}

impl<W: Write> RecordWriter<W> {
    pub fn new(out: W, format: RecordFormat, clock: WallClock) -> Self {
        Self {
            out,
            line: Vec::with_capacity(1024),
            format,
            clock,
            written: 0,
            errors: 0,
        }
    }

    /// Counts a failed write and says so on stderr, without flooding it when the output is
    /// gone for good (a closed pipe fails every record).
    pub fn note(&mut self, result: Result<(), ExportError>) {
        if let Err(err) = result {
            self.errors += 1;
            if self.errors.is_power_of_two() {
                tracing::warn!("{err} ({} failed writes so far)", self.errors);
            }
        }
    }

    pub fn errors(&self) -> u64 {
        self.errors
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    pub fn write_query(&mut self, q: &FinishedQuery) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = QueryRecord {
                    event: "query",
                    time: Timestamp(self.clock.wall_ns(q.first_send_ns())),
                    qname: &q.qname,
                    qtype: qtype_mnemonic(q.qtype),
                    id: q.id,
                    transport: q.transport.as_str(),
                    client: Shown(&q.client),
                    server: Shown(&q.server),
                    outcome: q.outcome.as_str(),
                    rcode: q.rcode.map(rcode_mnemonic),
                    latency_ns: q.latency_ns(),
                    sends: q.send_ts_ns.len(),
                    send_times: SendTimes {
                        sends: &q.send_ts_ns,
                        clock: self.clock,
                    },
                    answers: &q.answers,
                    truncated: q.truncated,
                    pid: q.sender.pid,
                    tid: q.sender.tid,
                    comm: q.sender.comm.as_deref(),
                    thread_comm: q.sender.thread_comm.as_deref(),
                    cgroup_id: q.sender.cgroup_id,
                    cgroup_path: q.sender.cgroup_path.as_deref(),
                    pod: q.sender.workload.as_deref().and_then(|w| w.pod.as_ref()),
                    container: q
                        .sender
                        .workload
                        .as_deref()
                        .and_then(|w| w.container.as_ref()),
                    host_unit: q
                        .sender
                        .workload
                        .as_deref()
                        .and_then(|w| w.host_unit.as_deref()),
                    socket_cookie: q.socket_cookie,
                    drops: q
                        .drops
                        .iter()
                        .map(|d| DropJson::new(d, &self.clock))
                        .collect(),
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let line = text_line(q, &self.clock);
                self.out.write_all(line.as_bytes())?;
            }
        }
        self.written += 1;
        Ok(())
    }

    /// One JSON record and its newline.
    fn json_line(&mut self, record: &impl Serialize) -> Result<(), ExportError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, record)?;
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        Ok(())
    }

    pub fn write_drop(&mut self, d: &DropRecord) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = DropEventRecord {
                    event: "drop",
                    drop: DropJson::new(d, &self.clock),
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let line = format!(
                    "{} DROP     {:>10} {} {} -> {} {}{} at {} netns {}\n",
                    time_of_day(&self.clock, d.ts_ns),
                    d.packet.as_str(),
                    d.reason,
                    d.src,
                    d.dst,
                    d.kind,
                    d.detail
                        .as_deref()
                        .map(|x| format!(" ({x})"))
                        .unwrap_or_default(),
                    d.location,
                    d.netns_inum,
                );
                self.out.write_all(line.as_bytes())?;
            }
        }
        self.written += 1;
        Ok(())
    }

    pub fn write_lookup(&mut self, l: &LookupRecord) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = LookupJson {
                    event: l.event,
                    time: Timestamp(self.clock.wall_ns(l.time_ns)),
                    name: &l.name,
                    duration_ns: l.duration_ns,
                    queries: l.queries,
                    search_expansions: l.search_expansions,
                    final_rcode: l.final_rcode.as_deref(),
                    answers: &l.answers,
                    pid: l.pid,
                    comm: l.comm.as_deref(),
                    cgroup_id: l.cgroup_id,
                    cgroup_path: l.cgroup_path.as_deref(),
                    pod: l.workload.as_deref().and_then(|w| w.pod.as_ref()),
                    container: l.workload.as_deref().and_then(|w| w.container.as_ref()),
                    resolver: l.resolver.as_deref(),
                    diagnosis: &l.diagnosis,
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let who = who(l.comm.as_deref(), l.pid);
                let mut line = format!(
                    "{} LOOKUP {:<8} {:>10} {} queries={} expansions={} {who} {}\n",
                    time_of_day(&self.clock, l.time_ns),
                    l.final_rcode.as_deref().unwrap_or("NO-REPLY"),
                    format_latency(l.duration_ns),
                    l.name,
                    l.queries,
                    l.search_expansions,
                    l.cgroup_path.as_deref().unwrap_or("?"),
                );
                for d in &l.diagnosis {
                    line.push_str(&format!("    {}: {}\n", d.code, d.message));
                }
                self.out.write_all(line.as_bytes())?;
            }
        }
        self.written += 1;
        Ok(())
    }

    pub fn write_late(&mut self, l: &LateArrival) -> Result<(), ExportError> {
        match self.format {
            RecordFormat::Json => {
                let record = LateJson {
                    event: "late_response",
                    time: Timestamp(self.clock.wall_ns(l.ts_ns)),
                    qname: &l.qname,
                    qtype: qtype_name(l.qtype),
                    id: l.id,
                    why: &l.why,
                    after_first_send_ns: l.after_first_send_ns,
                    pid: l.pid,
                    cgroup_id: l.cgroup_id,
                };
                self.json_line(&record)?;
            }
            RecordFormat::Text => {
                let line = format!(
                    "{} LATE     {:>10} {:<5} {} id={} ({})\n",
                    time_of_day(&self.clock, l.ts_ns),
                    format_latency(l.after_first_send_ns),
                    qtype_name(l.qtype),
                    l.qname,
                    l.id,
                    l.why
                );
                self.out.write_all(line.as_bytes())?;
            }
        }
        self.written += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ExportError> {
        self.out.flush()?;
        Ok(())
    }
}

/// Time of day to the microsecond (UTC): what a reader scans for during an incident.
fn time_of_day(clock: &WallClock, mono_ns: u64) -> String {
    let time = rfc3339_nanos(clock.wall_ns(mono_ns));
    time.get(11..26).unwrap_or(&time).to_owned()
}

/// `comm[pid]`, as far as known.
fn who(comm: Option<&str>, pid: Option<u32>) -> String {
    match (comm, pid) {
        (Some(comm), Some(pid)) => format!("{comm}[{pid}]"),
        (None, Some(pid)) => format!("[{pid}]"),
        _ => "-".to_owned(),
    }
}

fn text_line(q: &FinishedQuery, clock: &WallClock) -> String {
    let time_of_day = time_of_day(clock, q.first_send_ns());
    let who = who(q.sender.comm.as_deref(), q.sender.pid);
    let cgroup = q.sender.cgroup_path.as_deref().unwrap_or("?");
    let result = match q.outcome {
        Outcome::Answered => format!(
            "{:<8} {:>10}",
            q.rcode.map(rcode_name).unwrap_or_default(),
            format_latency(q.latency_ns().unwrap_or_default())
        ),
        Outcome::Unanswered => format!("{:<8} {:>10}", "NO-REPLY", "-"),
        Outcome::Dropped => format!("{:<8} {:>10}", "DROPPED", "-"),
    };
    let tcp = if q.transport == crate::decode::Transport::Tcp {
        " tcp"
    } else {
        ""
    };
    let resent = if q.send_ts_ns.len() > 1 {
        format!(" sends={}", q.send_ts_ns.len())
    } else {
        String::new()
    };
    let drops: String = q
        .drops
        .iter()
        .map(|d| format!(" drop={}:{}", d.packet.as_str(), d.kind))
        .collect();
    let answers = if q.answers.is_empty() {
        String::new()
    } else {
        format!(" [{}]", q.answers.join(", "))
    };
    format!(
        "{time_of_day} {result} {:<5} {} {} -> {} {who} {cgroup}{tcp}{resent}{drops}{answers}\n",
        qtype_name(q.qtype),
        q.qname,
        q.client,
        q.server,
    )
}

fn format_latency(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{:.3}s", ns as f64 / 1e9)
    } else if ns >= 1_000_000 {
        format!("{:.3}ms", ns as f64 / 1e6)
    } else {
        format!("{:.1}µs", ns as f64 / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{correlate::Sender, decode::Transport};

    fn finished(outcome: Outcome) -> FinishedQuery {
        FinishedQuery {
            qname: "www.test.internal.".into(),
            qtype: 28,
            id: 4242,
            transport: Transport::Udp,
            client: "[fd00::1]:40000".parse().unwrap(),
            server: "[fd00::2]:53".parse().unwrap(),
            socket_cookie: 9,
            send_ts_ns: vec![1_000_000_000, 2_000_000_000],
            response_ts_ns: (outcome == Outcome::Answered).then_some(2_500_000_000),
            outcome,
            rcode: (outcome == Outcome::Answered).then_some(0),
            truncated: false,
            answers: vec!["fd00::3".into()],
            sender: Sender {
                pid: Some(10),
                tid: Some(11),
                comm: Some("dig".into()),
                thread_comm: Some("isc-net-0000".into()),
                cgroup_id: 77,
                cgroup_path: Some("/t".into()),
                workload: None,
                lookup: 0,
            },
            drops: Vec::new(),
        }
    }

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_nanos(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339_nanos(1_764_109_263_123_456_789),
            "2025-11-25T22:21:03.123456789Z"
        );
        assert_eq!(
            rfc3339_nanos(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn json_record_has_the_contract_fields() {
        let clock = WallClock { offset_ns: 0 };
        let mut w = RecordWriter::new(Vec::new(), RecordFormat::Json, clock);
        w.write_query(&finished(Outcome::Answered)).unwrap();
        w.write_query(&finished(Outcome::Unanswered)).unwrap();
        let text = String::from_utf8(w.out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let a = &lines[0];
        assert_eq!(a["event"], "query");
        assert_eq!(a["time"], "1970-01-01T00:00:01.000000000Z");
        assert_eq!(a["qname"], "www.test.internal.");
        assert_eq!(a["qtype"], "AAAA");
        assert_eq!(a["id"], 4242);
        assert_eq!(a["transport"], "udp");
        assert_eq!(a["client"], "[fd00::1]:40000");
        assert_eq!(a["server"], "[fd00::2]:53");
        assert_eq!(a["outcome"], "answered");
        assert_eq!(a["rcode"], "NOERROR");
        assert_eq!(a["latency_ns"], 1_500_000_000u64);
        assert_eq!(a["sends"], 2);
        assert_eq!(a["answers"], serde_json::json!(["fd00::3"]));
        assert_eq!(a["pid"], 10);
        assert_eq!(a["comm"], "dig");
        assert_eq!(a["cgroup_id"], 77);
        assert_eq!(a["cgroup_path"], "/t");
        let u = &lines[1];
        assert_eq!(u["outcome"], "unanswered");
        assert!(u["rcode"].is_null());
        assert!(u["latency_ns"].is_null());
    }

    #[test]
    fn text_line_is_readable() {
        let line = text_line(&finished(Outcome::Answered), &WallClock { offset_ns: 0 });
        assert!(line.contains("NOERROR"), "{line}");
        assert!(line.contains("1.500s"), "{line}");
        assert!(line.contains("AAAA"), "{line}");
        assert!(line.contains("dig[10]"), "{line}");
        assert!(line.contains("sends=2"), "{line}");
        let line = text_line(&finished(Outcome::Unanswered), &WallClock { offset_ns: 0 });
        assert!(line.contains("NO-REPLY"), "{line}");
    }
}
