//! The live terminal view (`dnsprobe top`): the slowest and most failing pods and names of the
//! last minute, redrawn every second, for use during an incident.
//!
//! `TopState` is a sink: the capture loop feeds it, and the view draws it. It keeps one bucket
//! per second of the window, each holding counts and a small latency histogram per pod and per
//! name active in that second, so the window slides exactly and memory follows what is active.
//! Pods and names are capped; beyond the cap they count as "(others)".
//!
//! A query counts as a failure when it got no answer (timed out, or dropped by the kernel) or an
//! error code other than NXDOMAIN (SERVFAIL, REFUSED, FORMERR, ...). NXDOMAIN is counted apart:
//! search-list expansion makes it routine in a cluster, so it would drown real failures.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    future::Future,
    io::{self, IsTerminal as _},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use crossterm::event::{Event, EventStream, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use futures_core::Stream;
use ratatui::{
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Paragraph, Row, Table},
    DefaultTerminal, Frame,
};
use tokio::sync::{oneshot, Notify};

use crate::{
    attribute::Workload,
    correlate::{DropRecord, FinishedQuery, Outcome},
    decode::{RCODE_NOERROR, RCODE_NXDOMAIN},
    lookup::{LateArrival, LookupRecord},
    metrics::InternalStats,
    pipeline::Sink,
};

const REFRESH: Duration = Duration::from_secs(1);
/// Label of the row that collects pods or names over the cap.
const OTHERS: &str = "(others)";
/// A lookup whose only diagnosis is this is routine in a cluster (ndots:5): it shows in the
/// pod's row but does not push real problems out of the recent diagnoses.
const ROUTINE_DIAGNOSIS: &str = "search_list_expansion";

/// Latency histogram: bucket 0 holds everything under 2^5 µs; each octave above it has two
/// buckets, split at 1.5 × its start, so a quantile is off by at most a factor 1.5 (and never
/// above the exact maximum). The last bucket holds everything from about 25 s.
const HIST_BUCKETS: usize = 40;
const HIST_MIN_OCTAVE: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("the live view needs a terminal on standard output")]
    NotATerminal,
    #[error("setting up the terminal")]
    Terminal(#[source] io::Error),
    #[error("drawing the live view")]
    Draw(#[source] io::Error),
    #[error("reading keyboard events")]
    Events(#[source] io::Error),
    #[error("the live view stopped unexpectedly: {0}")]
    Task(String),
}

#[derive(Debug, Clone)]
pub struct TopConfig {
    /// How far back the view looks.
    pub window: Duration,
    /// Pods (and host processes) with rows of their own.
    pub max_sources: usize,
    /// Names with rows of their own.
    pub max_names: usize,
    /// Recent diagnoses kept for the bottom panel.
    pub recent_diagnoses: usize,
}

impl Default for TopConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(60),
            max_sources: 1000,
            max_names: 1000,
            recent_diagnoses: 32,
        }
    }
}

fn hist_bucket(latency_ns: u64) -> usize {
    let us = latency_ns / 1000;
    if us < 1 << HIST_MIN_OCTAVE {
        return 0;
    }
    let octave = 63 - us.leading_zeros();
    // The bit below the leading one: set from 1.5 × 2^octave on.
    let upper_half = (us >> (octave - 1)) & 1;
    ((octave - HIST_MIN_OCTAVE) as usize * 2 + upper_half as usize).min(HIST_BUCKETS - 1)
}

fn hist_upper_ns(bucket: usize) -> u64 {
    let start_us = 1u64 << (HIST_MIN_OCTAVE + (bucket / 2) as u32);
    let end_us = if bucket.is_multiple_of(2) {
        start_us + start_us / 2
    } else {
        start_us * 2
    };
    end_us * 1000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    NxDomain,
    Failure,
}

fn verdict(q: &FinishedQuery) -> Verdict {
    match (q.outcome, q.rcode) {
        (Outcome::Answered, Some(RCODE_NOERROR)) => Verdict::Ok,
        (Outcome::Answered, Some(RCODE_NXDOMAIN)) => Verdict::NxDomain,
        _ => Verdict::Failure,
    }
}

/// What one pod or name did in one second (or, merged, in the window).
#[derive(Debug, Clone)]
struct Stats {
    queries: u64,
    failures: u64,
    nxdomain: u64,
    answered: u64,
    max_ns: u64,
    hist: [u32; HIST_BUCKETS],
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            queries: 0,
            failures: 0,
            nxdomain: 0,
            answered: 0,
            max_ns: 0,
            hist: [0; HIST_BUCKETS],
        }
    }
}

impl Stats {
    fn add(&mut self, verdict: Verdict, latency_ns: Option<u64>) {
        self.queries += 1;
        match verdict {
            Verdict::Ok => {}
            Verdict::NxDomain => self.nxdomain += 1,
            Verdict::Failure => self.failures += 1,
        }
        if let Some(ns) = latency_ns {
            self.answered += 1;
            self.max_ns = self.max_ns.max(ns);
            let bucket = &mut self.hist[hist_bucket(ns)];
            *bucket = bucket.saturating_add(1);
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.queries += other.queries;
        self.failures += other.failures;
        self.nxdomain += other.nxdomain;
        self.answered += other.answered;
        self.max_ns = self.max_ns.max(other.max_ns);
        for (a, b) in self.hist.iter_mut().zip(other.hist.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// The q-quantile of answered latencies, as its bucket's upper bound (capped at the max).
    fn quantile(&self, q: f64) -> Option<u64> {
        if self.answered == 0 {
            return None;
        }
        let total: u64 = self.hist.iter().map(|&c| u64::from(c)).sum();
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total.max(1));
        let mut seen = 0u64;
        for (bucket, &count) in self.hist.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                return Some(hist_upper_ns(bucket).min(self.max_ns));
            }
        }
        Some(self.max_ns)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Totals {
    queries: u64,
    failures: u64,
    nxdomain: u64,
    drops: u64,
}

#[derive(Debug, Default)]
struct Bucket {
    sec: u64,
    totals: Totals,
    sources: HashMap<u64, Stats>,
    names: HashMap<u64, Stats>,
}

struct Meta {
    kind: usize,
    key: String,
    display: String,
    /// Whether `display` is final (a pod is shown by UID until its name is known).
    named: bool,
    last_sec: u64,
    /// Codes of the latest diagnosed lookup, joined.
    diagnosis: Option<String>,
}

/// Pods or names by key, capped. Ids are never reused, so a bucket never counts for the wrong
/// row; an entry is forgotten only once no bucket of the window can hold it.
struct Directory {
    /// One key space per kind (pod UIDs and host keys must not collide).
    by_key: [HashMap<String, u64>; 2],
    entries: HashMap<u64, Meta>,
    next_id: u64,
    cap: usize,
    overflow: Option<u64>,
    last_prune: Option<u64>,
}

impl Directory {
    fn new(cap: usize) -> Self {
        Self {
            by_key: [HashMap::new(), HashMap::new()],
            entries: HashMap::new(),
            next_id: 0,
            cap: cap.max(1),
            overflow: None,
            last_prune: None,
        }
    }

    fn id(
        &mut self,
        kind: usize,
        key: &str,
        named: bool,
        display: impl FnOnce() -> String,
        now_sec: u64,
        window_secs: u64,
    ) -> u64 {
        if let Some(&id) = self.by_key[kind].get(key) {
            if let Some(meta) = self.entries.get_mut(&id) {
                meta.last_sec = now_sec;
                if named && !meta.named {
                    meta.display = display();
                    meta.named = true;
                }
            }
            return id;
        }
        if self.entries.len() >= self.cap {
            self.prune(now_sec, window_secs);
        }
        let (key, display, overflow) = if self.entries.len() >= self.cap {
            if let Some(id) = self.overflow {
                if let Some(meta) = self.entries.get_mut(&id) {
                    meta.last_sec = now_sec;
                }
                return id;
            }
            (String::new(), OTHERS.to_owned(), true)
        } else {
            (key.to_owned(), display(), false)
        };
        let id = self.next_id;
        self.next_id += 1;
        if overflow {
            self.overflow = Some(id);
        } else {
            self.by_key[kind].insert(key.clone(), id);
        }
        self.entries.insert(
            id,
            Meta {
                kind,
                key,
                display,
                named: named || overflow,
                last_sec: now_sec,
                diagnosis: None,
            },
        );
        id
    }

    /// Forgets entries no bucket of the window can hold; at most once a second, since a full
    /// directory of live entries would otherwise be scanned for every new key.
    fn prune(&mut self, now_sec: u64, window_secs: u64) {
        if self.last_prune == Some(now_sec) {
            return;
        }
        self.last_prune = Some(now_sec);
        let by_key = &mut self.by_key;
        let overflow = &mut self.overflow;
        self.entries.retain(|id, meta| {
            let live = now_sec.saturating_sub(meta.last_sec) < window_secs;
            if !live {
                if *overflow == Some(*id) {
                    *overflow = None;
                } else {
                    by_key[meta.kind].remove(&meta.key);
                }
            }
            live
        });
    }

    fn display(&self, id: u64) -> &str {
        self.entries
            .get(&id)
            .map(|m| m.display.as_str())
            .unwrap_or(OTHERS)
    }
}

const POD: usize = 0;
const HOST: usize = 1;

/// One line of the recent diagnoses panel.
#[derive(Debug, Clone)]
struct DiagnosisLine {
    sec: u64,
    source: String,
    name: std::sync::Arc<str>,
    code: &'static str,
    message: String,
}

/// What the view shows: totals and per-pod and per-name rows over a sliding window.
pub struct TopState {
    window_secs: u64,
    start: Instant,
    now_sec: u64,
    /// Seconds with activity, oldest first, all within the window.
    buckets: VecDeque<Bucket>,
    /// A bucket that left the window, kept for its maps' capacity.
    spare: Option<Bucket>,
    sources: Directory,
    names: Directory,
    recent: VecDeque<DiagnosisLine>,
    max_recent: usize,
    internal: InternalStats,
}

impl TopState {
    pub fn new(cfg: &TopConfig) -> Self {
        Self {
            window_secs: cfg.window.as_secs().max(1),
            start: Instant::now(),
            now_sec: 0,
            buckets: VecDeque::new(),
            spare: None,
            sources: Directory::new(cfg.max_sources),
            names: Directory::new(cfg.max_names),
            recent: VecDeque::new(),
            max_recent: cfg.recent_diagnoses,
            internal: InternalStats::default(),
        }
    }

    /// Kernel and pipeline totals, for the header's lost-event count.
    pub fn set_internal(&mut self, stats: InternalStats) {
        self.internal = stats;
    }

    /// Moves the window to `now`; what leaves it is dropped.
    pub fn advance(&mut self, now: Instant) {
        self.advance_to(now.saturating_duration_since(self.start).as_secs());
    }

    fn advance_to(&mut self, sec: u64) {
        if sec <= self.now_sec {
            return;
        }
        self.now_sec = sec;
        while self
            .buckets
            .front()
            .is_some_and(|b| b.sec + self.window_secs <= sec)
        {
            if let Some(mut old) = self.buckets.pop_front() {
                old.sources.clear();
                old.names.clear();
                self.spare = Some(old);
            }
        }
    }

    fn current_bucket(&mut self) -> &mut Bucket {
        if self.buckets.back().is_none_or(|b| b.sec != self.now_sec) {
            let mut bucket = self.spare.take().unwrap_or_default();
            bucket.sec = self.now_sec;
            bucket.totals = Totals::default();
            self.buckets.push_back(bucket);
        }
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    fn source_id(
        &mut self,
        workload: Option<&Workload>,
        cgroup_path: Option<&str>,
        comm: Option<&str>,
    ) -> u64 {
        let (now, window) = (self.now_sec, self.window_secs);
        match workload.and_then(|w| w.pod.as_ref()) {
            Some(pod) => self.sources.id(
                POD,
                &pod.uid,
                pod.name.is_some(),
                || match (&pod.namespace, &pod.name) {
                    (Some(ns), Some(name)) => format!("{ns}/{name}"),
                    (None, Some(name)) => name.clone(),
                    _ => format!("pod {}", pod.uid),
                },
                now,
                window,
            ),
            None => {
                // A host process: by systemd unit when it has one (attribution says "host"
                // when not), else by process name, else by cgroup.
                let unit = workload
                    .and_then(|w| w.host_unit.as_deref())
                    .filter(|u| *u != "host");
                let key = unit.or(comm).or(cgroup_path).unwrap_or("?");
                self.sources.id(
                    HOST,
                    key,
                    true,
                    || match (unit, comm) {
                        (Some(unit), Some(comm)) => format!("host {unit} ({comm})"),
                        _ => format!("host {key}"),
                    },
                    now,
                    window,
                )
            }
        }
    }

    fn name_id(&mut self, qname: &str) -> u64 {
        let name: Cow<'_, str> = if qname.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(qname.to_ascii_lowercase())
        } else {
            Cow::Borrowed(qname)
        };
        let (now, window) = (self.now_sec, self.window_secs);
        self.names
            .id(POD, &name, true, || name.to_string(), now, window)
    }

    fn record_query(&mut self, q: &FinishedQuery) {
        let verdict = verdict(q);
        let latency = match q.outcome {
            Outcome::Answered => q.latency_ns(),
            Outcome::Unanswered | Outcome::Dropped => None,
        };
        let source = self.source_id(
            q.sender.names.workload.as_deref(),
            q.sender.names.cgroup_path.as_deref(),
            q.sender.names.comm.as_deref(),
        );
        let name = self.name_id(&q.qname);
        let bucket = self.current_bucket();
        bucket.totals.queries += 1;
        match verdict {
            Verdict::Ok => {}
            Verdict::NxDomain => bucket.totals.nxdomain += 1,
            Verdict::Failure => bucket.totals.failures += 1,
        }
        bucket.totals.drops += q.drops.len() as u64;
        bucket
            .sources
            .entry(source)
            .or_default()
            .add(verdict, latency);
        bucket.names.entry(name).or_default().add(verdict, latency);
    }

    fn record_lookup(&mut self, l: &LookupRecord) {
        if l.diagnosis.is_empty() {
            return;
        }
        let source = self.source_id(
            l.workload.as_deref(),
            l.cgroup_path.as_deref(),
            l.comm.as_deref(),
        );
        // Routine codes last, so that a narrow column still shows what matters.
        let mut codes: Vec<&str> = l.diagnosis.iter().map(|d| d.code).collect();
        codes.sort_by_key(|c| *c == ROUTINE_DIAGNOSIS);
        if let Some(meta) = self.sources.entries.get_mut(&source) {
            // The column is narrow on 80 columns: the most telling code, and how many more.
            meta.diagnosis = Some(match codes.len() {
                0 | 1 => codes.join(""),
                n => format!("{}+{}", codes[0], n - 1),
            });
        }
        let Some(notable) = l.diagnosis.iter().find(|d| d.code != ROUTINE_DIAGNOSIS) else {
            return;
        };
        if self.max_recent == 0 {
            return;
        }
        while self.recent.len() >= self.max_recent {
            self.recent.pop_front();
        }
        self.recent.push_back(DiagnosisLine {
            sec: self.now_sec,
            source: self.sources.display(source).to_owned(),
            name: l.name.clone(),
            code: notable.code,
            message: notable.message.clone(),
        });
    }

    /// The window merged into rows, for drawing.
    fn view(&self) -> View {
        let mut totals = Totals::default();
        let mut sources: HashMap<u64, Stats> = HashMap::new();
        let mut names: HashMap<u64, Stats> = HashMap::new();
        for bucket in &self.buckets {
            totals.queries += bucket.totals.queries;
            totals.failures += bucket.totals.failures;
            totals.nxdomain += bucket.totals.nxdomain;
            totals.drops += bucket.totals.drops;
            for (id, stats) in &bucket.sources {
                sources.entry(*id).or_default().merge(stats);
            }
            for (id, stats) in &bucket.names {
                names.entry(*id).or_default().merge(stats);
            }
        }
        let rows = |stats: HashMap<u64, Stats>, dir: &Directory| -> Vec<ViewRow> {
            stats
                .into_iter()
                .map(|(id, s)| ViewRow {
                    label: dir.display(id).to_owned(),
                    queries: s.queries,
                    failures: s.failures,
                    nxdomain: s.nxdomain,
                    answered: s.answered,
                    p50: s.quantile(0.5),
                    p99: s.quantile(0.99),
                    max: (s.answered > 0).then_some(s.max_ns),
                    diagnosis: dir
                        .entries
                        .get(&id)
                        .and_then(|m| m.diagnosis.clone())
                        .unwrap_or_default(),
                })
                .collect()
        };
        View {
            // Until a whole window has passed, rates are over the time since the start.
            covered_secs: (self.now_sec + 1).min(self.window_secs),
            window_secs: self.window_secs,
            totals,
            sources: rows(sources, &self.sources),
            names: rows(names, &self.names),
            lost_events: self
                .internal
                .lost_events
                .saturating_add(self.internal.lost_drop_events),
            recent: self
                .recent
                .iter()
                .rev()
                .map(|d| {
                    format!(
                        "{:>3}s ago  {}  {}  {}: {}",
                        self.now_sec.saturating_sub(d.sec),
                        d.source,
                        d.name,
                        d.code,
                        d.message
                    )
                })
                .collect(),
        }
    }
}

impl Sink for TopState {
    fn query(&mut self, query: &FinishedQuery) {
        self.record_query(query);
    }
    fn lookup(&mut self, lookup: &LookupRecord) {
        self.record_lookup(lookup);
    }
    fn packet_drop(&mut self, _drop: &DropRecord) {
        self.current_bucket().totals.drops += 1;
    }
    /// Not shown: a late response is already in its lookup's diagnosis, or belongs to no pod.
    fn late(&mut self, _late: &LateArrival) {}
    fn flush(&mut self) {
        self.advance(Instant::now());
    }
}

/// The sink to hand the pipeline, sharing its state with the view.
pub struct TopSink(pub Arc<Mutex<TopState>>);

impl TopSink {
    fn state(&self) -> MutexGuard<'_, TopState> {
        // A panic while drawing leaves counts that are still sound: keep going.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Sink for TopSink {
    fn query(&mut self, query: &FinishedQuery) {
        self.state().query(query);
    }
    fn lookup(&mut self, lookup: &LookupRecord) {
        self.state().lookup(lookup);
    }
    fn packet_drop(&mut self, drop: &DropRecord) {
        self.state().packet_drop(drop);
    }
    fn late(&mut self, late: &LateArrival) {
        self.state().late(late);
    }
    fn flush(&mut self) {
        self.state().flush();
    }
}

struct ViewRow {
    label: String,
    queries: u64,
    failures: u64,
    nxdomain: u64,
    answered: u64,
    p50: Option<u64>,
    p99: Option<u64>,
    max: Option<u64>,
    diagnosis: String,
}

struct View {
    covered_secs: u64,
    window_secs: u64,
    totals: Totals,
    sources: Vec<ViewRow>,
    names: Vec<ViewRow>,
    lost_events: u64,
    recent: Vec<String>,
}

fn fmt_latency(ns: Option<u64>) -> String {
    let Some(ns) = ns else {
        return "-".to_owned();
    };
    let ms = ns as f64 / 1e6;
    if ms < 1.0 {
        format!("{ms:.2}ms")
    } else if ms < 10.0 {
        format!("{ms:.1}ms")
    } else if ms < 1000.0 {
        format!("{ms:.0}ms")
    } else {
        format!("{:.2}s", ms / 1000.0)
    }
}

fn rate(count: u64, secs: u64) -> String {
    format!("{:.1}", count as f64 / secs.max(1) as f64)
}

fn title(text: &str) -> Block<'_> {
    Block::new().borders(Borders::TOP).title(Span::styled(
        format!(" {text} "),
        Style::new().add_modifier(Modifier::BOLD),
    ))
}

fn header_row(cells: &[&'static str]) -> Row<'static> {
    Row::new(cells.to_vec()).style(Style::new().add_modifier(Modifier::UNDERLINED))
}

fn source_table<'a>(name: &'a str, rows: &[&ViewRow], empty: &'a str) -> Table<'a> {
    let widths = [
        Constraint::Fill(3),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Fill(2),
    ];
    let body: Vec<Row<'a>> = if rows.is_empty() {
        vec![Row::new(vec![empty.to_owned()])]
    } else {
        rows.iter()
            .map(|r| {
                Row::new(vec![
                    r.label.clone(),
                    r.queries.to_string(),
                    r.failures.to_string(),
                    r.nxdomain.to_string(),
                    fmt_latency(r.p50),
                    fmt_latency(r.p99),
                    fmt_latency(r.max),
                    r.diagnosis.clone(),
                ])
            })
            .collect()
    };
    Table::new(body, widths)
        .header(header_row(&[
            "POD",
            "Q",
            "FAIL",
            "NX",
            "P50",
            "P99",
            "MAX",
            "DIAGNOSIS",
        ]))
        .block(title(name))
}

fn name_table<'a>(rows: &[&ViewRow]) -> Table<'a> {
    let widths = [
        Constraint::Fill(1),
        Constraint::Length(6),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(6),
        Constraint::Length(6),
        Constraint::Length(6),
    ];
    let body: Vec<Row<'a>> = rows
        .iter()
        .map(|r| {
            Row::new(vec![
                r.label.clone(),
                r.queries.to_string(),
                r.failures.to_string(),
                r.nxdomain.to_string(),
                fmt_latency(r.p50),
                fmt_latency(r.p99),
                fmt_latency(r.max),
            ])
        })
        .collect();
    Table::new(body, widths)
        .header(header_row(&[
            "NAME", "Q", "FAIL", "NX", "P50", "P99", "MAX",
        ]))
        .block(title("Names (failing first, then slowest)"))
}

/// Draws the whole view into `frame`; fits 80x24 and uses whatever more there is.
pub fn render(state: &TopState, frame: &mut Frame) {
    let view = state.view();
    let recent_lines = view.recent.len().clamp(1, 8) as u16;
    let [header, slow, failing, names, recent] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Fill(1),
        Constraint::Max(recent_lines + 1),
    ])
    .areas(frame.area());

    let secs = view.covered_secs;
    let t = view.totals;
    let lost_style = if view.lost_events > 0 {
        Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)
    } else {
        Style::new()
    };
    let failures_style = if t.failures > 0 {
        Style::new().fg(Color::Red)
    } else {
        Style::new()
    };
    let header_text = vec![
        Line::from(vec![
            Span::styled("dnsprobe top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!(
                "  last {secs}s of {}s, every 1s  (q to quit)",
                view.window_secs
            )),
        ]),
        Line::from(vec![
            Span::raw(format!("{} q/s  ", rate(t.queries, secs))),
            Span::styled(format!("{} fail/s", rate(t.failures, secs)), failures_style),
            Span::raw(format!(
                "  {} nxdomain/s  {} drops/s  ",
                rate(t.nxdomain, secs),
                rate(t.drops, secs)
            )),
            Span::styled(format!("lost events {}", view.lost_events), lost_style),
        ]),
    ];
    frame.render_widget(Paragraph::new(header_text), header);

    let mut slowest: Vec<&ViewRow> = view.sources.iter().filter(|r| r.answered > 0).collect();
    slowest.sort_by(|a, b| {
        b.p99
            .cmp(&a.p99)
            .then(b.max.cmp(&a.max))
            .then_with(|| a.label.cmp(&b.label))
    });
    frame.render_widget(
        source_table("Slowest pods (by p99)", &slowest, "no answers yet"),
        slow,
    );

    let mut failing_rows: Vec<&ViewRow> = view.sources.iter().filter(|r| r.failures > 0).collect();
    failing_rows.sort_by(|a, b| {
        b.failures
            .cmp(&a.failures)
            .then(b.queries.cmp(&a.queries))
            .then_with(|| a.label.cmp(&b.label))
    });
    frame.render_widget(
        source_table(
            "Most failing pods (SERVFAIL, REFUSED, unanswered, ...)",
            &failing_rows,
            "no failures",
        ),
        failing,
    );

    let mut name_rows: Vec<&ViewRow> = view.names.iter().collect();
    name_rows.sort_by(|a, b| {
        b.failures
            .cmp(&a.failures)
            .then(b.p99.cmp(&a.p99))
            .then_with(|| a.label.cmp(&b.label))
    });
    frame.render_widget(name_table(&name_rows), names);

    let lines: Vec<Line> = if view.recent.is_empty() {
        vec![Line::raw("none yet")]
    } else {
        view.recent.into_iter().map(Line::raw).collect()
    };
    frame.render_widget(
        Paragraph::new(lines).block(title("Recent diagnoses")),
        recent,
    );
}

fn is_quit(key: &KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q') | KeyCode::Esc => true,
            // Raw mode turns Ctrl-C into a key instead of SIGINT.
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

/// Restores the terminal however the view ends, including by unwinding.
struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

fn draw(terminal: &mut DefaultTerminal, state: &Mutex<TopState>) -> Result<(), TopError> {
    let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
    state.advance(Instant::now());
    terminal
        .draw(|frame| render(&state, frame))
        .map_err(TopError::Draw)?;
    Ok(())
}

async fn next_event(events: &mut EventStream) -> Option<io::Result<Event>> {
    std::future::poll_fn(|cx| Pin::new(&mut *events).poll_next(cx)).await
}

/// The view draws on standard output: check before anything else is set up.
pub fn require_terminal() -> Result<(), TopError> {
    if io::stdout().is_terminal() {
        Ok(())
    } else {
        Err(TopError::NotATerminal)
    }
}

/// Runs the view until the user quits (q, Esc, Ctrl-C) or `shutdown` completes. The terminal
/// is restored on return, on error and on panic (ratatui's panic hook).
pub async fn run_tui(
    state: Arc<Mutex<TopState>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TopError> {
    require_terminal()?;
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init().map_err(TopError::Terminal)?;
    let mut events = EventStream::new();
    let mut redraw = tokio::time::interval(REFRESH);
    redraw.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = redraw.tick() => draw(&mut terminal, &state)?,
            event = next_event(&mut events) => match event {
                // Standard input closed: nobody can quit by key any more.
                None => return Ok(()),
                Some(Err(err)) => return Err(TopError::Events(err)),
                Some(Ok(Event::Key(key))) if is_quit(&key) => return Ok(()),
                Some(Ok(Event::Resize(..))) => draw(&mut terminal, &state)?,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// Wakes whoever waits on the view's end, however the task ends (panics included).
struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

/// The view, running as a task beside the capture loop.
pub struct TopUi {
    task: tokio::task::JoinHandle<Result<(), TopError>>,
    ended: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
}

impl TopUi {
    /// Starts the view; fails at once when standard output is not a terminal.
    pub fn start(state: Arc<Mutex<TopState>>) -> Result<Self, TopError> {
        require_terminal()?;
        let ended = Arc::new(Notify::new());
        let (stop, stopped) = oneshot::channel::<()>();
        let notify = NotifyOnDrop(ended.clone());
        let task = tokio::spawn(async move {
            let _notify = notify;
            run_tui(state, async {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Self {
            task,
            ended,
            stop: Some(stop),
        })
    }

    /// Completes once the view has ended (the user quit, or it failed): time to stop capturing.
    pub async fn ended(&self) {
        self.ended.notified().await;
    }

    /// Ends the view if it still runs, waits until the terminal is restored, and returns how
    /// the view ended.
    pub async fn stop(mut self) -> Result<(), TopError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(err) => Err(TopError::Task(err.to_string())),
        }
    }
}

/// For a `select!` branch that exists in every mode: never completes without a view.
pub async fn ended(ui: Option<&TopUi>) {
    match ui {
        Some(ui) => ui.ended().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::correlate::fixtures::{pod, query};

    use ratatui::{backend::TestBackend, Terminal};

    use crate::{attribute::PodIdentity, lookup::Diagnosis};

    fn lookup(workload: Option<Arc<Workload>>, name: &str, codes: &[&'static str]) -> LookupRecord {
        LookupRecord {
            event: "lookup",
            time_ns: 0,
            name: name.into(),
            duration_ns: 1,
            queries: 1,
            search_expansions: 0,
            final_rcode: None,
            answers: Default::default(),
            pid: Some(1),
            comm: Some("app".into()),
            cgroup_id: 1,
            cgroup_path: None,
            workload,
            resolver: None,
            diagnosis: codes
                .iter()
                .map(|code| Diagnosis {
                    code,
                    message: format!("{code} happened"),
                    evidence: serde_json::Value::Null,
                })
                .collect(),
        }
    }

    fn incident() -> TopState {
        let mut state = TopState::new(&TopConfig::default());
        for _ in 0..10 {
            state.query(&query(
                pod("prod", "web"),
                "web.prod.svc.",
                Some(1),
                Some(0),
            ));
            state.query(&query(
                pod("prod", "api"),
                "slow.example.com.",
                Some(800),
                Some(0),
            ));
        }
        for _ in 0..5 {
            state.query(&query(
                pod("dev", "broken"),
                "db.dev.svc.",
                Some(2),
                Some(2),
            ));
        }
        state.query(&query(pod("dev", "broken"), "db.dev.svc.", None, None));
        state.query(&query(pod("dev", "broken"), "db.dev.svc.", None, None));
        state.query(&query(
            pod("prod", "web"),
            "gone.example.com.",
            Some(1),
            Some(3),
        ));
        state.lookup(&lookup(
            pod("prod", "api"),
            "slow.example.com.",
            &["search_list_expansion", "slow_upstream"],
        ));
        state.lookup(&lookup(
            pod("prod", "web"),
            "web.prod.svc.",
            &["search_list_expansion"],
        ));
        state.set_internal(InternalStats {
            lost_events: 3,
            ..Default::default()
        });
        state.advance_to(9);
        state
    }

    fn screen(state: &TopState, width: u16, height: u16) -> Vec<String> {
        let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
        terminal.draw(|frame| render(state, frame)).unwrap();
        let buffer = terminal.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buffer[(x, y)].symbol().to_owned())
                    .collect::<String>()
            })
            .collect()
    }

    /// The lines of the section titled `title`, after its title and `skip` more.
    fn section<'a>(lines: &'a [String], title: &str, skip: usize) -> Vec<&'a str> {
        let start = lines
            .iter()
            .position(|l| l.contains(title))
            .unwrap_or_else(|| panic!("no section {title}:\n{}", lines.join("\n")));
        lines[start + 1 + skip..]
            .iter()
            .take_while(|l| !l.contains("───"))
            .map(|l| l.as_str())
            .collect()
    }

    #[test]
    fn view_shows_slow_and_failing_pods_in_order_on_80x24() {
        let state = incident();
        let lines = screen(&state, 80, 24);
        let all = lines.join("\n");
        assert!(lines[0].contains("last 10s of 60s"), "{all}");
        // 28 queries in 10 s; 7 failures; 1 NXDOMAIN; lost events shown.
        assert!(lines[1].contains("2.8 q/s"), "{all}");
        assert!(lines[1].contains("0.7 fail/s"), "{all}");
        assert!(lines[1].contains("0.1 nxdomain/s"), "{all}");
        assert!(lines[1].contains("lost events 3"), "{all}");

        let slow = section(&lines, "Slowest pods", 1);
        assert!(slow[0].starts_with("prod/api "), "{all}");
        assert!(slow[0].contains("800ms"), "{all}");
        assert!(
            slow[0].ends_with("slow_upstream+1 "),
            "the pod's latest diagnosis:\n{all}"
        );
        assert!(slow[1].starts_with("dev/broken "), "{all}");
        assert!(slow[2].starts_with("prod/web "), "{all}");

        let failing = section(&lines, "Most failing pods", 1);
        assert!(failing[0].starts_with("dev/broken "), "{all}");
        let cells: Vec<&str> = failing[0].split_whitespace().collect();
        assert_eq!(&cells[1..4], ["7", "7", "0"], "Q, FAIL, NX:\n{all}");
        assert!(!failing.iter().any(|l| l.contains("prod/")), "{all}");

        let names = section(&lines, "Names", 1);
        assert!(
            names[0].starts_with("db.dev.svc. "),
            "failing first:\n{all}"
        );
        assert!(
            names[1].starts_with("slow.example.com. "),
            "then slowest:\n{all}"
        );

        let recent = section(&lines, "Recent diagnoses", 0);
        assert!(recent[0].contains("prod/api  slow.example.com."), "{all}");
        assert!(recent[0].contains("slow_upstream happened"), "{all}");
        assert!(
            !all.contains("web.prod.svc.  search_list_expansion"),
            "routine expansion alone stays out of the recent lines:\n{all}"
        );
    }

    #[test]
    fn view_degrades_on_small_terminals_without_panicking() {
        let state = incident();
        for (w, h) in [(80, 24), (40, 10), (20, 5), (1, 1), (200, 60)] {
            let lines = screen(&state, w, h);
            assert_eq!(lines.len(), usize::from(h));
        }
        let empty = TopState::new(&TopConfig::default());
        let lines = screen(&empty, 80, 24).join("\n");
        assert!(lines.contains("no answers yet"), "{lines}");
        assert!(lines.contains("no failures "), "{lines}");
    }

    #[test]
    fn window_slides() {
        let mut state = TopState::new(&TopConfig {
            window: Duration::from_secs(10),
            ..Default::default()
        });
        state.query(&query(pod("prod", "web"), "a.test.", Some(1), Some(0)));
        state.advance_to(5);
        state.query(&query(pod("prod", "web"), "a.test.", Some(1), Some(0)));
        assert_eq!(state.view().totals.queries, 2);
        state.advance_to(10);
        assert_eq!(state.view().totals.queries, 1, "second 0 left the window");
        state.advance_to(15);
        assert_eq!(state.view().totals.queries, 0);
        assert!(state.buckets.is_empty());
    }

    #[test]
    fn rows_are_capped_and_forgotten_after_the_window() {
        let mut state = TopState::new(&TopConfig {
            window: Duration::from_secs(10),
            max_sources: 3,
            max_names: 3,
            ..Default::default()
        });
        for i in 0..20 {
            let q = query(
                pod("prod", &format!("p{i}")),
                &format!("n{i}.test."),
                Some(1),
                Some(0),
            );
            state.query(&q);
        }
        let view = state.view();
        assert_eq!(view.sources.len(), 4, "three pods and the others");
        assert_eq!(view.totals.queries, 20);
        let others = view.sources.iter().find(|r| r.label == OTHERS).unwrap();
        assert_eq!(others.queries, 17);
        assert!(state.sources.entries.len() <= 4);
        assert!(state.names.entries.len() <= 4);
        // Once the window has moved past them, new pods get rows of their own again.
        state.advance_to(20);
        state.query(&query(pod("prod", "new"), "new.test.", Some(1), Some(0)));
        let view = state.view();
        assert_eq!(view.sources.len(), 1);
        assert_eq!(view.sources[0].label, "prod/new");
    }

    #[test]
    fn host_processes_and_unnamed_pods_have_readable_rows() {
        let mut state = TopState::new(&TopConfig::default());
        let mut host = query(
            Some(Arc::new(Workload {
                host_unit: Some("kubelet.service".into()),
                ..Default::default()
            })),
            "a.test.",
            Some(1),
            Some(0),
        );
        host.sender.names_mut().comm = Some("kubelet".into());
        state.query(&host);
        let unnamed = Some(Arc::new(Workload {
            pod: Some(PodIdentity {
                namespace: None,
                name: None,
                uid: "1234".into(),
                qos: None,
            }),
            ..Default::default()
        }));
        state.query(&query(unnamed, "a.test.", Some(1), Some(0)));
        // No unit (attribution says "host"): by process name.
        let mut shell = query(
            Some(Arc::new(Workload {
                host_unit: Some("host".into()),
                ..Default::default()
            })),
            "a.test.",
            Some(1),
            Some(0),
        );
        shell.sender.names_mut().comm = Some("dig".into());
        state.query(&shell);
        let mut labels: Vec<String> = state.view().sources.into_iter().map(|r| r.label).collect();
        labels.sort();
        assert_eq!(
            labels,
            ["host dig", "host kubelet.service (kubelet)", "pod 1234"]
        );
        // The same UID, now named.
        let named = Some(Arc::new(Workload {
            pod: Some(PodIdentity {
                namespace: Some("prod".into()),
                name: Some("web".into()),
                uid: "1234".into(),
                qos: None,
            }),
            ..Default::default()
        }));
        state.query(&query(named, "a.test.", Some(1), Some(0)));
        let view = state.view();
        let row = view.sources.iter().find(|r| r.label == "prod/web").unwrap();
        assert_eq!(row.queries, 2);
    }

    #[test]
    fn quantiles_stay_within_a_bucket() {
        let mut stats = Stats::default();
        for ms in 1..=100u64 {
            stats.add(Verdict::Ok, Some(ms * 1_000_000));
        }
        let p50 = stats.quantile(0.5).unwrap();
        let p99 = stats.quantile(0.99).unwrap();
        assert!((50_000_000..=75_000_000).contains(&p50), "{p50}");
        assert!((99_000_000..=100_000_000).contains(&p99), "{p99}");
        assert_eq!(stats.quantile(1.0), Some(100_000_000));
        let mut last = 0;
        for bucket in 0..HIST_BUCKETS {
            let upper = hist_upper_ns(bucket);
            assert!(upper > last);
            last = upper;
            if bucket + 1 < HIST_BUCKETS {
                assert_eq!(hist_bucket(upper - 1_000), bucket, "bucket {bucket}");
                assert_eq!(hist_bucket(upper), bucket + 1, "bucket {bucket}");
            }
        }
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(Stats::default().quantile(0.5), None);
    }

    #[test]
    fn quit_keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(&key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(&key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit(&key(KeyCode::Char('x'), KeyModifiers::NONE)));
    }

    #[test]
    fn shared_sink_feeds_the_state() {
        let state = Arc::new(Mutex::new(TopState::new(&TopConfig::default())));
        let mut sink = TopSink(state.clone());
        sink.query(&query(pod("prod", "web"), "a.test.", None, None));
        sink.packet_drop(&DropRecord {
            ts_ns: 1,
            packet: crate::correlate::DroppedPacket::Response,
            reason: "NO_SOCKET".into(),
            kind: "no_socket".into(),
            detail: None,
            location: String::new(),
            netns_inum: 1,
            src: "10.96.0.10:53".parse().unwrap(),
            dst: "10.0.0.1:4000".parse().unwrap(),
            dns_id: Some(1),
        });
        sink.flush();
        let totals = state.lock().unwrap().view().totals;
        assert_eq!((totals.queries, totals.failures, totals.drops), (1, 1, 1));
    }
}
