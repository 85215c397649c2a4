//! dnsprobe: an eBPF DNS latency observer.

mod attribute;
mod btf;
mod capture;
mod check;
mod cli;
mod conntrack;
mod correlate;
mod decode;
mod drops;
mod export;
mod lookup;

use std::{
    fs::File,
    io::{self, BufWriter, IsTerminal as _, Write},
    path::PathBuf,
    time::Duration,
};

use anyhow::{bail, Context as _};
use clap::Parser as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{signal, SignalKind},
};
use tracing::{info, warn};

use crate::{
    attribute::{CgroupPaths, ProcessNames},
    capture::{Capture, CaptureConfig, KernelStats},
    cli::{Cli, Command, Format, RunArgs},
    conntrack::{ConntrackWatch, NetfilterVerdict},
    correlate::{
        DropRecord, DroppedPacket, FinishedQuery, Observation, QueryTracker, RecentQueries, Sender,
    },
    decode::{decode_event, read_event},
    drops::{decode_drop, read_drop_event, DropReasons, KernelSymbols},
    export::{clock_ns, RecordFormat, RecordWriter, WallClock},
    lookup::{DiagnosisConfig, LateArrival, LookupRecord, LookupTracker, ResolverConfigs},
};

/// Events handled per wake-up before timers get a turn.
const DRAIN_BATCH: usize = 4096;
/// How often pending queries are checked for timeouts and output is flushed.
const TICK: Duration = Duration::from_millis(100);
/// How often the conntrack counters of every namespace are re-read as a baseline.
const CONNTRACK_BASELINE_EVERY: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DNSPROBE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let result = match cli.command {
        Command::Check(args) => {
            if let Err(msg) = args.common.validate() {
                eprintln!("error: {msg}");
                return std::process::ExitCode::from(2);
            }
            if check::run(&args) {
                return std::process::ExitCode::SUCCESS;
            }
            return std::process::ExitCode::FAILURE;
        }
        Command::Run(args) => run_blocking(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_blocking(args: RunArgs) -> anyhow::Result<()> {
    if let Err(msg) = args.common.validate() {
        bail!("{msg}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args))
}

/// Counters of the userspace pipeline, for the periodic and final summaries.
#[derive(Debug, Default)]
struct PipelineStats {
    ring_records: u64,
    malformed: u64,
    partial_messages: u64,
    drop_records: u64,
    malformed_drops: u64,
    unlinked_drops: u64,
    late_arrivals: u64,
}

/// Explains kernel drops: reason names, code locations, conntrack verdicts.
struct DropExplainer {
    reasons: DropReasons,
    symbols: KernelSymbols,
    netfilter_drop: Option<u32>,
    conntrack: ConntrackWatch,
}

struct Pipeline {
    tracker: QueryTracker,
    paths: CgroupPaths,
    names: ProcessNames,
    writer: RecordWriter<Box<dyn Write>>,
    stats: PipelineStats,
    drops: DropExplainer,
    ports: Vec<u16>,
    lookups: LookupTracker,
    lookup_out: Vec<LookupRecord>,
    recent: RecentQueries,
    finished: Vec<FinishedQuery>,
}

impl Pipeline {
    fn handle_record(&mut self, bytes: &[u8]) {
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
        let lookups = &mut self.lookups;
        let lookup_out = &mut self.lookup_out;
        let observed = self.tracker.observe(packet, |p| {
            let sender = Sender {
                pid: p.pid,
                tid: p.tid,
                // The process may be gone already; its sending thread's name is the next best.
                comm: p
                    .pid
                    .and_then(|pid| names.resolve(pid, p.comm.as_deref()))
                    .or_else(|| p.comm.clone()),
                thread_comm: p.comm.clone(),
                cgroup_id: p.cgroup_id,
                cgroup_path: paths.resolve(p.cgroup_id),
            };
            lookups.query_started(p.ts_ns, &p.message.question.name, &sender, lookup_out);
            sender
        });
        match observed {
            Observation::Finished(query) => {
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
        self.write_lookups();
    }

    fn finish_query(&mut self, query: FinishedQuery, now_ns: u64) {
        self.write(&query);
        self.recent.remember(&query, now_ns);
        self.lookups.query_finished(query, now_ns);
    }

    /// A response too late for its query: part of its lookup, or an event of its own.
    fn late(&mut self, late: LateArrival) {
        self.stats.late_arrivals += 1;
        if let Some(orphan) = self.lookups.late_arrival(late) {
            if let Err(err) = self.writer.write_late(&orphan) {
                warn!("{err}");
            }
        }
    }

    fn write_lookups(&mut self) {
        for record in self.lookup_out.drain(..) {
            if let Err(err) = self.writer.write_lookup(&record) {
                warn!("{err}");
            }
        }
    }

    fn handle_drop_record(&mut self, bytes: &[u8]) {
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
        if let Some(unlinked) = self.tracker.on_drop(record) {
            self.stats.unlinked_drops += 1;
            if let Err(err) = self.writer.write_drop(&unlinked) {
                warn!("{err}");
            }
            if let Some(late) = self.recent.late_drop(&unlinked) {
                self.late(late);
            }
        }
    }

    fn expire(&mut self) {
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let mut finished = std::mem::take(&mut self.finished);
        self.tracker.expire(now, &mut finished);
        for query in finished.drain(..) {
            self.finish_query(query, now);
        }
        self.finished = finished;
        self.recent.expire(now);
        self.lookups.close_idle(now, &mut self.lookup_out);
        self.write_lookups();
    }

    fn close_all_lookups(&mut self) {
        self.lookups.close_all(&mut self.lookup_out);
        self.write_lookups();
    }

    fn write(&mut self, query: &FinishedQuery) {
        if let Err(err) = self.writer.write_query(query) {
            warn!("{err}");
        }
    }

    fn flush(&mut self) {
        if let Err(err) = self.writer.flush() {
            warn!("flushing records: {err}");
        }
    }

    fn summary(&self, kernel: KernelStats) -> String {
        let t = self.tracker.stats();
        format!(
            "queries={} answered={} unanswered={} resends={} records={} in_flight={} \
             unmatched_responses={} evicted={} malformed={} partial={} kernel_events={} \
             lost_events={} unparseable_packets={} kernel_drops={} lost_drop_events={} \
             drops_linked={} drops_unlinked={} malformed_drops={} netns_known={} \
             late_arrivals={} recent_queries={} lookups={} lookups_open={} lookups_evicted={} \
             cgroups_known={} cgroup_walks={} processes_known={} resolver_configs={}",
            t.queries,
            t.answered,
            t.unanswered,
            t.resends,
            self.writer.written(),
            self.tracker.in_flight(),
            t.unmatched_responses,
            t.evicted,
            self.stats.malformed,
            self.stats.partial_messages,
            kernel.events,
            kernel.ringbuf_full,
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
            self.paths.len(),
            self.paths.walks(),
            self.names.len(),
            self.lookups.resolver_configs(),
        )
    }
}

fn open_output(path: Option<&PathBuf>) -> anyhow::Result<(Box<dyn Write>, bool)> {
    Ok(match path {
        Some(path) => {
            let file = File::create(path)
                .with_context(|| format!("--output: cannot create {}", path.display()))?;
            (Box::new(BufWriter::new(file)), false)
        }
        None => {
            let terminal = io::stdout().is_terminal();
            (Box::new(BufWriter::new(io::stdout())), terminal)
        }
    })
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let missing = capture::missing_capabilities();
    if !missing.is_empty() {
        bail!(
            "missing privileges: {} (run as root, or grant these capabilities)",
            missing.join(", ")
        );
    }
    let cgroup_root = match &args.common.cgroup_root {
        Some(path) => path.clone(),
        None => attribute::find_cgroup2_root().context("finding the cgroup v2 root")?,
    };
    attribute::check_cgroup2_dir(&cgroup_root).context("--cgroup-root")?;
    let (out, terminal) = open_output(args.output.as_ref())?;
    let format = match args.format {
        Some(Format::Json) => RecordFormat::Json,
        Some(Format::Text) => RecordFormat::Text,
        None if terminal => RecordFormat::Text,
        None => RecordFormat::Json,
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    capture::raise_memlock_limit();
    let capture = Capture::start(&CaptureConfig {
        cgroup_root: &cgroup_root,
        ports: &args.common.ports,
        ring_buffer_size: args.ring_buffer_size,
    })
    .context("starting kernel capture")?;
    for hook in &capture.hooks {
        info!("{hook}");
    }
    let Capture {
        ring,
        ebpf,
        counters,
        drops: drop_ring,
        reasons,
        hooks: _,
    } = capture;
    // SAFETY: as for the event ring below.
    let mut drop_ring = match drop_ring {
        Some(ring) => Some(
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
                .map_err(|e| e.into_parts().1)
                .context("registering the drop ring buffer with the runtime")?,
        ),
        None => None,
    };
    // SAFETY: the ring buffer owns its map fd; it stays open and unchanged for as long as the
    // AsyncFd owns the RingBuf.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("registering the ring buffer with the runtime")?;
    let kernel_stats = || -> KernelStats {
        counters.read().unwrap_or_else(|err| {
            warn!("reading kernel counters: {err}");
            KernelStats::default()
        })
    };

    let mut pipeline = Pipeline {
        tracker: QueryTracker::new(
            u64::try_from(args.query_timeout.as_nanos()).unwrap_or(u64::MAX),
            args.max_inflight as usize,
        ),
        paths: CgroupPaths::new(cgroup_root.clone()),
        names: ProcessNames::new(PathBuf::from("/proc")),
        writer: RecordWriter::new(out, format, WallClock::now()),
        stats: PipelineStats::default(),
        finished: Vec::new(),
        drops: DropExplainer {
            netfilter_drop: reasons.value("NETFILTER_DROP"),
            reasons,
            symbols: KernelSymbols::load(),
            conntrack: ConntrackWatch::new(CONNTRACK_BASELINE_EVERY),
        },
        ports: args.common.ports.clone(),
        lookups: LookupTracker::new(
            ResolverConfigs::new(PathBuf::from("/proc"), cgroup_root.clone()),
            args.lookup_idle,
            args.query_timeout,
            args.max_inflight as usize,
            DiagnosisConfig {
                slow_ns: u64::try_from(args.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
            },
        ),
        lookup_out: Vec::new(),
        recent: RecentQueries::new(
            u64::try_from(args.query_timeout.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(2),
            args.max_inflight as usize,
        ),
    };
    pipeline.drops.conntrack.refresh_if_due();

    info!(
        "capture started: ports {:?}, query timeout {:?}, cgroup root {}",
        args.common.ports,
        args.query_timeout,
        cgroup_root.display()
    );

    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stats_every = args.stats_interval;
    let mut last_stats = tokio::time::Instant::now();
    let mut last_lost = 0u64;

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting on the ring buffer")?;
                let rb = guard.get_inner_mut();
                let mut handled = 0;
                while handled < DRAIN_BATCH {
                    let Some(item) = rb.next() else { break };
                    pipeline.handle_record(&item);
                    handled += 1;
                }
                if handled < DRAIN_BATCH {
                    guard.clear_ready();
                }
                pipeline.flush();
            }
            guard = readable(&mut drop_ring) => {
                let mut guard = guard.context("waiting on the drop ring buffer")?;
                let rb = guard.get_inner_mut();
                let mut handled = 0;
                while handled < DRAIN_BATCH {
                    let Some(item) = rb.next() else { break };
                    pipeline.handle_drop_record(&item);
                    handled += 1;
                }
                if handled < DRAIN_BATCH {
                    guard.clear_ready();
                }
                pipeline.flush();
            }
            _ = tick.tick() => {
                // Take what already arrived first, so a response waiting in the ring is not
                // mistaken for a timeout.
                if let Some(drop_ring) = drop_ring.as_mut() {
                    let rb = drop_ring.get_mut();
                    while let Some(item) = rb.next() {
                        pipeline.handle_drop_record(&item);
                    }
                }
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    pipeline.handle_record(&item);
                }
                pipeline.expire();
                pipeline.drops.conntrack.refresh_if_due();
                pipeline.flush();
                if !stats_every.is_zero() && last_stats.elapsed() >= stats_every {
                    last_stats = tokio::time::Instant::now();
                    let kernel = kernel_stats();
                    if kernel.ringbuf_full > last_lost {
                        warn!(
                            "lost {} events: ring buffer full (raise --ring-buffer-size)",
                            kernel.ringbuf_full - last_lost
                        );
                        last_lost = kernel.ringbuf_full;
                    }
                    info!("stats: {}", pipeline.summary(kernel));
                }
            }
        }
    }

    // Detach first, then account for what was still in flight.
    let kernel = kernel_stats();
    drop(ebpf);
    info!("detached programs");
    if let Some(drop_ring) = drop_ring.as_mut() {
        let rb = drop_ring.get_mut();
        while let Some(item) = rb.next() {
            pipeline.handle_drop_record(&item);
        }
    }
    let rb = ring.get_mut();
    while let Some(item) = rb.next() {
        pipeline.handle_record(&item);
    }
    pipeline.close_all_lookups();
    pipeline.flush();
    info!("summary: {}", pipeline.summary(kernel));
    Ok(())
}

/// Waits until the drop ring has data; never, when drops are not captured.
async fn readable<T: std::os::fd::AsRawFd>(
    ring: &mut Option<AsyncFd<T>>,
) -> io::Result<tokio::io::unix::AsyncFdReadyMutGuard<'_, T>> {
    match ring {
        Some(ring) => ring.readable_mut().await,
        None => std::future::pending().await,
    }
}

/// The first bytes of a malformed record's DNS message, for debug logs.
fn hex_prefix(record: &[u8]) -> String {
    let start = std::mem::offset_of!(dnsprobe_common::DnsEvent, msg);
    record
        .get(start..)
        .unwrap_or_default()
        .iter()
        .take(48)
        .map(|b| format!("{b:02x}"))
        .collect()
}
