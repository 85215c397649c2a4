//! dnsprobe: an eBPF DNS latency observer.

use std::{
    fs::File,
    io::{self, IsTerminal as _, Write},
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

use dnsprobe::{attribute, capture, check, kubeapi, metrics, pods, top};
use dnsprobe::{
    attribute::{Attributor, CgroupPaths, ProcessNames},
    capture::{Capture, CaptureConfig, KernelStats},
    cli::{Cli, Command, Format, RunArgs},
    conntrack::ConntrackWatch,
    correlate::{QueryTracker, RecentQueries},
    drops::KernelSymbols,
    export::{RecordFormat, RecordWriter, WallClock},
    filter::FilteredSink,
    lookup::{DiagnosisConfig, LookupTracker, ResolverConfigs},
    pipeline::{DropExplainer, Pipeline, PipelineStats},
};

/// Events handled per wake-up before timers get a turn.
const DRAIN_BATCH: usize = 4096;
/// How often the conntrack counters of every namespace are re-read as a baseline.
const CONNTRACK_BASELINE_EVERY: Duration = Duration::from_secs(10);

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The live view owns the terminal: log lines would write over it.
    let log_to_terminal = !matches!(cli.command, Command::Top(_));
    tracing_subscriber::fmt()
        .with_writer(move || -> Box<dyn Write> {
            if log_to_terminal {
                Box::new(io::stderr())
            } else {
                Box::new(io::sink())
            }
        })
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
        Command::Run(args) => run_blocking(*args, false),
        Command::Top(args) => run_blocking(*args, true),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_blocking(args: RunArgs, top: bool) -> anyhow::Result<()> {
    if let Err(msg) = args.common.validate() {
        bail!("{msg}");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run(args, top))
}

fn open_output(path: Option<&PathBuf>) -> anyhow::Result<(Box<dyn Write>, bool)> {
    Ok(match path {
        Some(path) => {
            let file = File::create(path)
                .with_context(|| format!("--output: cannot create {}", path.display()))?;
            // Unbuffered: the record writer gathers whole records into large writes itself.
            (Box::new(file), false)
        }
        None => {
            let terminal = io::stdout().is_terminal();
            (Box::new(io::stdout()), terminal)
        }
    })
}

async fn run(args: RunArgs, top: bool) -> anyhow::Result<()> {
    if top {
        top::require_terminal().context("dnsprobe top")?;
    }
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
    // Where cgroup paths start: the programs may attach below it (`--cgroup-root`), the paths
    // stay those of the whole hierarchy.
    let paths_root = attribute::cgroup2_mount_of(&cgroup_root);
    let (out, terminal) = match (top, args.output.as_ref()) {
        // The live view owns standard output.
        (true, None) => (Box::new(io::sink()) as Box<dyn Write>, false),
        (_, path) => open_output(path)?,
    };
    // Bound before anything is attached, so that a taken port fails at start-up.
    let metrics_server = match args.metrics_addr {
        Some(addr) => Some(
            metrics::MetricsServer::bind(addr)
                .await
                .context("--metrics-addr")?,
        ),
        None => None,
    };
    let format = match args.format {
        Some(Format::Json) => RecordFormat::Json,
        Some(Format::Text) => RecordFormat::Text,
        None if terminal => RecordFormat::Text,
        None => RecordFormat::Json,
    };

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // Before anything is attached: a client that cannot be built is a start-up error.
    let kube_index = match args.kube_api_config().map_err(anyhow::Error::msg)? {
        Some(config) => Some(kubeapi::start(config).await?),
        None => None,
    };

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
        paths: CgroupPaths::new(paths_root.clone()),
        names: ProcessNames::new(PathBuf::from("/proc")),
        attributor: Attributor::new(pods::PodDirectory::new(
            args.pod_log_dir.clone(),
            args.container_log_dir.clone(),
        ))
        .with_kube_index(kube_index),
        sinks: vec![Box::new(FilteredSink {
            filter: args.record_filter(),
            inner: RecordWriter::new(out, format, WallClock::now()),
        })],
        stats: PipelineStats::default(),
        finished: Vec::new(),
        unwritten: Vec::new(),
        waiting_drops: Default::default(),
        last_sender: None,
        drops: DropExplainer {
            netfilter_drop: reasons.value("NETFILTER_DROP"),
            reasons,
            symbols: KernelSymbols::load(),
            conntrack: ConntrackWatch::new(CONNTRACK_BASELINE_EVERY),
        },
        ports: args.common.ports.clone(),
        lookups: LookupTracker::new(
            ResolverConfigs::new(PathBuf::from("/proc"), paths_root.clone()),
            args.lookup_idle,
            args.query_timeout,
            args.max_inflight as usize,
            DiagnosisConfig {
                slow_ns: u64::try_from(args.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
                query_timeout_ns: u64::try_from(args.query_timeout.as_nanos()).unwrap_or(u64::MAX),
            },
        )
        .deferring_records(),
        lookup_out: Vec::new(),
        recent: RecentQueries::new(
            u64::try_from(args.query_timeout.as_nanos())
                .unwrap_or(u64::MAX)
                .saturating_mul(2),
            args.max_inflight as usize,
        ),
    };
    pipeline.drops.conntrack.refresh_if_due();

    let mut metrics_handle = None;
    let mut metrics_stop = None;
    if let Some(server) = metrics_server {
        let sink = metrics::Metrics::new(&metrics::MetricsConfig {
            max_pods: args.metrics_max_pods as usize,
            top_names: args.metrics_top_names as usize,
            ..Default::default()
        });
        let handle = sink.handle();
        pipeline.sinks.push(Box::new(sink));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        info!("serving metrics on http://{}/metrics", server.local_addr()?);
        tokio::spawn(server.run(handle.clone(), async {
            let _ = stopped.await;
        }));
        metrics_handle = Some(handle);
        metrics_stop = Some(stop);
    }
    let top_state = top.then(|| {
        std::sync::Arc::new(std::sync::Mutex::new(top::TopState::new(
            &top::TopConfig::default(),
        )))
    });
    if let Some(state) = &top_state {
        pipeline.sinks.push(Box::new(top::TopSink(state.clone())));
    }

    // Loading the programs parsed the kernel's whole BTF (about 20 MB of short-lived
    // allocations); give that memory back instead of carrying it for the daemon's lifetime.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is affected.
    unsafe {
        libc::malloc_trim(0);
    }
    info!(
        "capture started: ports {:?}, query timeout {:?}, cgroup root {} (paths from {})",
        args.common.ports,
        args.query_timeout,
        cgroup_root.display(),
        paths_root.display()
    );

    // At every tick pending queries are checked for timeouts, idle lookups closed and the
    // output flushed, and the rings are read when nothing woke the daemon before. The kernel
    // wakes it only once an eighth of the event ring waits (`WAKEUP_FRACTION` in the
    // programs): each wake-up costs context switches, an epoll round and a flush, which at a
    // thousand queries a second cost the daemon more than the queries themselves. Timestamps
    // come from the kernel, so reading later changes no measurement, only when records are
    // written.
    let mut tick = dnsprobe::ticker::Ticker::new(args.flush_interval)
        .context("--flush-interval: the tick timer")?;
    let stats_every = args.stats_interval;
    let mut last_stats = tokio::time::Instant::now();
    let mut last_lost = 0u64;
    // Pruning stats every cached cgroup: often enough to follow churn, rarely enough to cost
    // nothing.
    let prune_every =
        (args.state_grace / 2).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut last_prune = tokio::time::Instant::now();
    let mut last_internal = tokio::time::Instant::now();
    // Whether a periodic chore last done at `last` is due at this tick. Half a tick of slack:
    // ticks come every `--flush-interval`, and a chore of the same period, checked a moment
    // early, would otherwise wait a whole tick more every other time.
    let half_tick = args.flush_interval / 2;
    let due = |last: tokio::time::Instant, every: Duration| last.elapsed() + half_tick >= every;
    let ui = match &top_state {
        Some(state) => Some(top::TopUi::start(state.clone()).context("dnsprobe top")?),
        None => None,
    };

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = top::ended(ui.as_ref()) => { info!("live view closed: stopping"); break; }
            guard = ring.readable_mut() => {
                let guard = guard.context("waiting on the ring buffer")?;
                drain_batch(guard, |item| pipeline.handle_record(item));
                pipeline.flush();
            }
            guard = readable(&mut drop_ring) => {
                let guard = guard.context("waiting on the drop ring buffer")?;
                drain_batch(guard, |item| pipeline.handle_drop_record(item));
                pipeline.flush();
            }
            ticked = tick.tick() => {
                ticked.context("waiting for the next tick")?;
                // Take what already arrived first, so a response waiting in the ring is not
                // mistaken for a timeout.
                drain_all(&mut pipeline, &mut ring, &mut drop_ring);
                pipeline.expire();
                pipeline.drops.conntrack.refresh_if_due();
                if due(last_prune, prune_every) {
                    last_prune = tokio::time::Instant::now();
                    pipeline.prune(args.state_grace);
                }
                pipeline.flush();
                if (metrics_handle.is_some() || top_state.is_some())
                    && due(last_internal, Duration::from_secs(1))
                {
                    last_internal = tokio::time::Instant::now();
                    let internal = metrics::InternalStats::collect(&pipeline, &kernel_stats());
                    if let Some(handle) = &metrics_handle {
                        handle.set_internal(internal);
                    }
                    if let Some(state) = &top_state {
                        state
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .set_internal(internal);
                    }
                }
                if !stats_every.is_zero() && due(last_stats, stats_every) {
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

    // Give the terminal back first, so that the summary is readable.
    if let Some(ui) = ui {
        if let Err(err) = ui.stop().await {
            warn!("live view: {err}");
        }
    }
    // Detach first, then account for what was still in flight.
    let kernel = kernel_stats();
    drop(ebpf);
    info!("detached programs");
    drain_all(&mut pipeline, &mut ring, &mut drop_ring);
    pipeline.close_all_lookups();
    pipeline.flush();
    if let Some(handle) = &metrics_handle {
        handle.set_internal(metrics::InternalStats::collect(&pipeline, &kernel));
    }
    if let Some(stop) = metrics_stop {
        let _ = stop.send(());
    }
    let summary = pipeline.summary(kernel);
    if top {
        // The live view silenced the log; the summary still belongs on stderr.
        eprintln!("summary: {summary}");
    } else {
        info!("summary: {summary}");
    }
    Ok(())
}

type Ring = AsyncFd<aya::maps::RingBuf<aya::maps::MapData>>;

/// Takes everything already in both rings, drops first: a drop waiting in its ring then meets
/// its query, and a response waiting in its ring is not mistaken for a timeout.
fn drain_all(pipeline: &mut Pipeline, ring: &mut Ring, drop_ring: &mut Option<Ring>) {
    let _clock = dnsprobe::coarse::freeze();
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
}

/// Hands at most `DRAIN_BATCH` ring-buffer records to `handle`; the ring stays marked ready
/// when more are left, so timers get a turn without anything being left behind.
fn drain_batch(
    mut guard: tokio::io::unix::AsyncFdReadyMutGuard<'_, aya::maps::RingBuf<aya::maps::MapData>>,
    mut handle: impl FnMut(&[u8]),
) {
    let _clock = dnsprobe::coarse::freeze();
    let rb = guard.get_inner_mut();
    let mut handled = 0;
    while handled < DRAIN_BATCH {
        let Some(item) = rb.next() else { break };
        handle(&item);
        handled += 1;
    }
    if handled < DRAIN_BATCH {
        guard.clear_ready();
    }
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
