//! Command-line interface. Every flag value is checked here, before anything touches the
//! kernel, so a bad value fails at start-up with a message that names the flag.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "dnsprobe",
    version,
    about = "eBPF DNS latency observer: times every DNS query of every container from the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Capture DNS traffic and print one record per finished query.
    Run(Box<RunArgs>),
    /// Live view of the slowest and most failing pods and names (q, Esc or Ctrl-C quits);
    /// records go to --output only when it is given.
    Top(Box<RunArgs>),
    /// Report which kernel hooks load and attach here; exits non-zero if capture cannot work.
    Check(CheckArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Json,
    Text,
}

#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Cgroup v2 directory to attach to; default: the cgroup2 mount found in /proc/self/mountinfo.
    #[arg(long, value_name = "PATH")]
    pub cgroup_root: Option<PathBuf>,

    /// Destination (client side) ports treated as DNS, comma separated, at most 8.
    #[arg(long, value_name = "PORTS", default_value = "53", value_parser = parse_port, value_delimiter = ',')]
    pub ports: Vec<u16>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Record format; default: text on a terminal, json otherwise.
    #[arg(long, value_enum)]
    pub format: Option<Format>,

    /// Write records to this file instead of stdout.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// A query with no response after this long is reported unanswered (e.g. 10s, 500ms).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub query_timeout: Duration,

    /// Queries tracked at once; beyond this the oldest is evicted and counted.
    #[arg(long, value_name = "N", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..=16_777_216))]
    pub max_inflight: u32,

    /// Size of the kernel ring buffer in bytes (a power of two, multiple of the page size).
    #[arg(long, value_name = "BYTES", default_value_t = 4 * 1024 * 1024, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,

    /// The kubelet's pod log directory (`<namespace>_<pod>_<uid>/<container>/`): names pods.
    #[arg(long, value_name = "PATH", default_value = crate::pods::DEFAULT_PODS_DIR)]
    pub pod_log_dir: PathBuf,

    /// The kubelet's container log links (`<pod>_<namespace>_<container>-<id>.log`): names
    /// containers.
    #[arg(long, value_name = "PATH", default_value = crate::pods::DEFAULT_CONTAINERS_DIR)]
    pub container_log_dir: PathBuf,

    /// Name pods and containers from the Kubernetes API as well (first; the log directories
    /// remain the fallback): list and watch the pods of --node-name. In a pod it uses the
    /// service account (token, CA, KUBERNETES_SERVICE_HOST/PORT); KUBECONFIG or --kubeconfig
    /// override that.
    #[arg(long)]
    pub kube_api: bool,

    /// A kubeconfig file for --kube-api (instead of KUBECONFIG or the in-cluster configuration).
    #[arg(long, value_name = "PATH", requires = "kube_api")]
    pub kubeconfig: Option<PathBuf>,

    /// This node's name, for --kube-api (only its pods are watched); default: $NODE_NAME.
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// A lookup (one name asked by one process) ends after this long without new queries.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub lookup_idle: Duration,

    /// Answers slower than this are diagnosed as `slow_upstream`.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub slow_threshold: Duration,

    /// Only records of pods in these namespaces (comma separated, repeatable).
    #[arg(long = "namespace", value_name = "NS", value_delimiter = ',')]
    pub namespaces: Vec<String>,

    /// Only records of these pods (by name; comma separated, repeatable).
    #[arg(long = "pod", value_name = "NAME", value_delimiter = ',')]
    pub pods: Vec<String>,

    /// Only queries and lookups of names matching this glob (`*.example.com`; repeatable).
    #[arg(long = "qname", value_name = "PATTERN", value_parser = parse_name_pattern)]
    pub qnames: Vec<crate::filter::NamePattern>,

    /// Only queries slower than this (unanswered ones always pass) and lookups longer than it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub min_latency: Option<Duration>,

    /// Only these response codes (NOERROR, NXDOMAIN, SERVFAIL, ...; comma separated).
    #[arg(long = "rcode", value_name = "RCODE", value_delimiter = ',', value_parser = parse_rcode)]
    pub rcodes: Vec<String>,

    /// Only these outcomes (comma separated).
    #[arg(
        long = "outcome",
        value_name = "OUTCOME",
        value_delimiter = ',',
        value_enum
    )]
    pub outcomes: Vec<OutcomeArg>,

    /// Serve Prometheus metrics at http://ADDR/metrics; a port alone (9153) listens on
    /// loopback only.
    #[arg(long, value_name = "ADDR", value_parser = crate::metrics::parse_metrics_addr)]
    pub metrics_addr: Option<std::net::SocketAddr>,

    /// Pods with metric series of their own; later ones share pod="_other".
    #[arg(long, value_name = "N", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub metrics_max_pods: u32,

    /// Give the N busiest query names of each minute a qname label (0: no qname label).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub metrics_top_names: u32,

    /// How long state about a cgroup or process that is gone is kept (for late records)
    /// before caches forget it.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub state_grace: Duration,

    /// The longest a record waits in the daemon: at least this often the ring buffers are read,
    /// timed-out queries and idle lookups are closed, and the output is flushed (1ms to 10s).
    /// Measured latencies do not depend on it (they come from kernel timestamps); each tick
    /// costs the daemon a wake-up even when the node is quiet.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_flush_interval)]
    pub flush_interval: Duration,

    /// Interval between periodic statistics lines on stderr (0 disables them).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration_or_zero)]
    pub stats_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutcomeArg {
    Answered,
    Unanswered,
    Dropped,
}

impl OutcomeArg {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeArg::Answered => "answered",
            OutcomeArg::Unanswered => "unanswered",
            OutcomeArg::Dropped => "dropped",
        }
    }
}

impl RunArgs {
    /// What `--kube-api` needs, or None without it; the node name comes from `--node-name`,
    /// else from the NODE_NAME environment variable (the manifest sets it from the downward API).
    pub fn kube_api_config(&self) -> Result<Option<crate::kubeapi::KubeApiConfig>, String> {
        self.kube_api_config_with(std::env::var("NODE_NAME").ok())
    }

    fn kube_api_config_with(
        &self,
        env_node_name: Option<String>,
    ) -> Result<Option<crate::kubeapi::KubeApiConfig>, String> {
        if !self.kube_api {
            return Ok(None);
        }
        let node_name = self
            .node_name
            .clone()
            .or(env_node_name)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .ok_or("--kube-api needs --node-name NAME (or the NODE_NAME environment variable): only this node's pods are watched")?;
        Ok(Some(crate::kubeapi::KubeApiConfig {
            kubeconfig: self.kubeconfig.clone(),
            node_name,
        }))
    }

    pub fn record_filter(&self) -> crate::filter::RecordFilter {
        crate::filter::RecordFilter {
            namespaces: self.namespaces.clone(),
            pods: self.pods.clone(),
            names: self.qnames.clone(),
            min_latency: self.min_latency,
            rcodes: self.rcodes.clone(),
            outcomes: self
                .outcomes
                .iter()
                .map(|o| o.as_str().to_owned())
                .collect(),
        }
    }
}

fn parse_name_pattern(s: &str) -> Result<crate::filter::NamePattern, String> {
    crate::filter::NamePattern::new(s)
}

/// Accepts the mnemonics dnsprobe prints (case-insensitive) and `RCODE<n>`.
fn parse_rcode(s: &str) -> Result<String, String> {
    let upper = s.trim().to_ascii_uppercase();
    let known = (0..=23u16)
        .map(crate::decode::rcode_name)
        .any(|n| n == upper);
    if known {
        return Ok(upper);
    }
    match upper.strip_prefix("RCODE").map(str::parse::<u16>) {
        Some(Ok(n)) if n < 4096 => Ok(crate::decode::rcode_name(n)),
        _ => Err(format!(
            "`{s}` is not a response code (NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, ... or RCODE<n>)"
        )),
    }
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid DNS port".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

/// Parses `10s`, `500ms`, `2m`, `1.5s`, `250us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_flush_interval(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(10) {
        return Err(format!("`{s}` is not between 1ms and 10s"));
    }
    Ok(d)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("`{s}` has no unit; use e.g. 10s, 500ms, 2m"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration; use e.g. 10s, 500ms, 2m"))?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{s}`; use ns, us, ms, s, m or h"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || secs > 86_400.0 * 365.0 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of bytes"))?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let page = u32::try_from(page).unwrap_or(4096);
    if !n.is_power_of_two() || n < page {
        return Err(format!(
            "{n} must be a power of two and at least the page size ({page})"
        ));
    }
    Ok(n)
}

impl CommonArgs {
    /// Checks what clap cannot express per value.
    pub fn validate(&self) -> Result<(), String> {
        if self.ports.len() > dnsprobe_common::MAX_PORTS {
            return Err(format!(
                "--ports: at most {} ports, got {}",
                dnsprobe_common::MAX_PORTS,
                self.ports.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10").unwrap_err().contains("no unit"));
        assert!(parse_duration("10parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
    }

    #[test]
    fn bad_flag_values_name_the_flag() {
        let err = Cli::try_parse_from(["dnsprobe", "run", "--query-timeout", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--query-timeout"), "{err}");
        let err = Cli::try_parse_from(["dnsprobe", "run", "--ports", "53,0"]).unwrap_err();
        assert!(err.to_string().contains("--ports"), "{err}");
        let err =
            Cli::try_parse_from(["dnsprobe", "run", "--ring-buffer-size", "1000"]).unwrap_err();
        assert!(err.to_string().contains("--ring-buffer-size"), "{err}");
        let err = Cli::try_parse_from(["dnsprobe", "run", "--format", "xml"]).unwrap_err();
        assert!(err.to_string().contains("--format"), "{err}");
        let err = Cli::try_parse_from(["dnsprobe", "run", "--rcode", "NOPE"]).unwrap_err();
        assert!(err.to_string().contains("--rcode"), "{err}");
        let err = Cli::try_parse_from(["dnsprobe", "run", "--outcome", "maybe"]).unwrap_err();
        assert!(err.to_string().contains("--outcome"), "{err}");
        let err = Cli::try_parse_from(["dnsprobe", "run", "--min-latency", "fast"]).unwrap_err();
        assert!(err.to_string().contains("--min-latency"), "{err}");
        for interval in ["0s", "500us", "11s"] {
            let err =
                Cli::try_parse_from(["dnsprobe", "run", "--flush-interval", interval]).unwrap_err();
            assert!(err.to_string().contains("--flush-interval"), "{err}");
        }
        for (interval, ms) in [("1ms", 1), ("250ms", 250), ("10s", 10_000)] {
            let cli =
                Cli::try_parse_from(["dnsprobe", "run", "--flush-interval", interval]).unwrap();
            let Command::Run(args) = cli.command else {
                panic!("parsed as another command")
            };
            assert_eq!(args.flush_interval, Duration::from_millis(ms));
        }
    }

    #[test]
    fn filters_parse() {
        let cli = Cli::try_parse_from([
            "dnsprobe",
            "run",
            "--namespace",
            "a,b",
            "--rcode",
            "nxdomain,servfail",
            "--outcome",
            "unanswered",
            "--qname",
            "*.example.com",
            "--min-latency",
            "100ms",
        ])
        .unwrap();
        let Command::Run(args) = cli.command else {
            panic!("parsed as another command")
        };
        let f = args.record_filter();
        assert_eq!(f.namespaces, vec!["a", "b"]);
        assert_eq!(f.rcodes, vec!["NXDOMAIN", "SERVFAIL"]);
        assert_eq!(f.outcomes, vec!["unanswered"]);
        assert_eq!(f.min_latency, Some(Duration::from_millis(100)));
        assert!(f.names[0].matches("www.example.com."));
    }

    #[test]
    fn kube_api_flags() {
        let parse = |argv: &[&str]| {
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Run(args) = cli.command else {
                panic!("parsed as another command")
            };
            args
        };
        let args = parse(&["dnsprobe", "run"]);
        assert_eq!(args.kube_api_config_with(Some("n1".into())), Ok(None));

        let args = parse(&["dnsprobe", "run", "--kube-api"]);
        let err = args.kube_api_config_with(None).unwrap_err();
        assert!(err.contains("--node-name"), "{err}");
        assert!(args.kube_api_config_with(Some(" ".into())).is_err());
        let config = args
            .kube_api_config_with(Some("n1".into()))
            .unwrap()
            .unwrap();
        assert_eq!(config.node_name, "n1");
        assert_eq!(config.kubeconfig, None);

        // The flag wins over the environment.
        let args = parse(&[
            "dnsprobe",
            "run",
            "--kube-api",
            "--node-name",
            "n2",
            "--kubeconfig",
            "/k",
        ]);
        let config = args
            .kube_api_config_with(Some("n1".into()))
            .unwrap()
            .unwrap();
        assert_eq!(config.node_name, "n2");
        assert_eq!(config.kubeconfig, Some(PathBuf::from("/k")));

        // --kubeconfig means nothing without --kube-api.
        let err = Cli::try_parse_from(["dnsprobe", "run", "--kubeconfig", "/k"]).unwrap_err();
        assert!(err.to_string().contains("--kube-api"), "{err}");
        // `top` shares the flags.
        let cli = Cli::try_parse_from(["dnsprobe", "top", "--kube-api", "--node-name", "n"]);
        assert!(cli.is_ok());
    }

    #[test]
    fn too_many_ports() {
        let cli =
            Cli::try_parse_from(["dnsprobe", "check", "--ports", "1,2,3,4,5,6,7,8,9"]).unwrap();
        let Command::Check(args) = cli.command else {
            panic!("parsed as another command")
        };
        assert!(args.common.validate().unwrap_err().contains("--ports"));
    }
}
