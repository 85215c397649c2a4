//! dnsprobe: an eBPF DNS latency observer.

mod attribute;
mod capture;
mod check;
mod cli;
mod correlate;
mod decode;
mod export;

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
    correlate::{FinishedQuery, QueryTracker, Sender},
    decode::{decode_event, read_event},
    export::{clock_ns, RecordFormat, RecordWriter, WallClock},
};

/// Events handled per wake-up before timers get a turn.
const DRAIN_BATCH: usize = 4096;
/// How often pending queries are checked for timeouts and output is flushed.
const TICK: Duration = Duration::from_millis(100);

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
}

struct Pipeline {
    tracker: QueryTracker,
    paths: CgroupPaths,
    names: ProcessNames,
    writer: RecordWriter<Box<dyn Write>>,
    stats: PipelineStats,
    finished: Vec<FinishedQuery>,
}

impl Pipeline {
    fn handle_record(&mut self, bytes: &[u8]) {
        self.stats.ring_records += 1;
        let packet = match read_event(bytes).and_then(|event| decode_event(&event)) {
            Ok(packet) => packet,
            Err(err) => {
                self.stats.malformed += 1;
                tracing::debug!("skipping packet: {err}");
                return;
            }
        };
        if packet.message.partial {
            self.stats.partial_messages += 1;
        }
        let paths = &mut self.paths;
        let names = &mut self.names;
        let done = self.tracker.observe(packet, |p| Sender {
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
        });
        if let Some(query) = done {
            self.write(&query);
        }
    }

    fn expire(&mut self) {
        let mut finished = std::mem::take(&mut self.finished);
        self.tracker
            .expire(clock_ns(libc::CLOCK_MONOTONIC), &mut finished);
        for query in finished.drain(..) {
            self.write(&query);
        }
        self.finished = finished;
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
             lost_events={} unparseable_packets={} cgroups_known={} cgroup_walks={} processes_known={}",
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
            self.paths.len(),
            self.paths.walks(),
            self.names.len(),
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
    info!(
        "attached cgroup_skb/egress and cgroup_skb/ingress to {} (multi-attach)",
        cgroup_root.display()
    );
    let Capture {
        ring,
        ebpf,
        counters,
    } = capture;
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
    };

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
            _ = tick.tick() => {
                // Take what already arrived first, so a response waiting in the ring is not
                // mistaken for a timeout.
                let rb = ring.get_mut();
                while let Some(item) = rb.next() {
                    pipeline.handle_record(&item);
                }
                pipeline.expire();
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
    let rb = ring.get_mut();
    while let Some(item) = rb.next() {
        pipeline.handle_record(&item);
    }
    pipeline.flush();
    info!("summary: {}", pipeline.summary(kernel));
    Ok(())
}
