//! Loads the kernel programs, attaches them to the cgroup v2 root and hands out their ring
//! buffer and counters. Dropping `Capture` detaches everything.

use std::{fs::File, path::Path};

use aya::{
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType},
    Btf, Ebpf, EbpfLoader,
};
use dnsprobe_common::{
    KernelOffsets, PortConfig, MAX_PORTS, STAT_DROPS, STAT_DROP_RINGBUF_FULL, STAT_EVENTS,
    STAT_LOST_EGRESS, STAT_LOST_INGRESS, STAT_RINGBUF_FULL, STAT_UNPARSEABLE,
};

use crate::{btf::KernelBtf, drops::DropReasons};

/// The kernel object built by `build.rs` from the dnsprobe-ebpf crate.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dnsprobe"));

pub const EGRESS_PROGRAM: &str = "dns_egress";
pub const INGRESS_PROGRAM: &str = "dns_ingress";
pub const DROP_PROGRAM: &str = "dns_drop";
/// The kernel's packet-drop tracepoint, in its BTF-typed form (needs no tracefs).
pub const DROP_TRACEPOINT: &str = "kfree_skb";

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("reading kernel BTF: {0}")]
    Btf(String),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("opening cgroup {path}")]
    Cgroup {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct CaptureConfig<'a> {
    pub cgroup_root: &'a Path,
    pub ports: &'a [u16],
    pub ring_buffer_size: u32,
}

/// Counters kept by the kernel programs, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KernelStats {
    /// Events handed to the ring buffer.
    pub events: u64,
    /// Events lost because the ring buffer was full.
    pub ringbuf_full: u64,
    /// Of those, query (egress) and response (ingress) events.
    pub lost_egress: u64,
    pub lost_ingress: u64,
    /// DNS-port packets whose headers could not be read.
    pub unparseable: u64,
    /// DNS packets seen dropped by the kernel.
    pub drops: u64,
    /// Drop events lost because the drop ring buffer was full.
    pub drop_ringbuf_full: u64,
}

/// One line of the start-up report: a hook, and whether it is in use.
#[derive(Debug, Clone)]
pub struct HookStatus {
    pub hook: &'static str,
    pub attached: bool,
    pub detail: String,
}

impl std::fmt::Display for HookStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tag = if self.attached { "attached" } else { "skipped" };
        write!(f, "{tag} {}: {}", self.hook, self.detail)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DropSupportError {
    #[error(transparent)]
    Btf(#[from] crate::btf::BtfError),
    #[error("{path} is {actual} bytes on this kernel, the drop program reads {expected}")]
    UnexpectedSize {
        path: String,
        expected: u32,
        actual: u32,
    },
}

/// What the drop program needs from the running kernel's BTF.
pub struct DropSupport {
    pub offsets: KernelOffsets,
    pub reasons: DropReasons,
}

/// Reads struct offsets and drop-reason names from the kernel's BTF.
pub fn drop_support(btf: &KernelBtf) -> Result<DropSupport, DropSupportError> {
    // The program reads these as u16 and pointers; another layout must not be misread.
    for (path, size) in [
        ("sk_buff.network_header", 2),
        ("sk_buff.head", 8),
        ("net.ns.inum", 4),
    ] {
        let actual = btf.member_size(path)?;
        if actual != size {
            return Err(DropSupportError::UnexpectedSize {
                path: path.to_owned(),
                expected: size,
                actual,
            });
        }
    }
    let offsets = KernelOffsets {
        skb_head: btf.member_offset("sk_buff.head")?,
        skb_network_header: btf.member_offset("sk_buff.network_header")?,
        skb_dev: btf.member_offset("sk_buff.dev")?,
        skb_sk: btf.member_offset("sk_buff.sk")?,
        dev_net: btf.member_offset("net_device.nd_net.net")?,
        sk_net: btf.member_offset("sock_common.skc_net.net")?,
        net_inum: btf.member_offset("net.ns.inum")?,
        valid: 1,
    };
    let reasons = DropReasons::new(btf.enum_values("skb_drop_reason")?);
    Ok(DropSupport { offsets, reasons })
}

pub struct Capture {
    /// Owns the programs and their links: dropping it detaches them.
    pub ebpf: Ebpf,
    pub ring: RingBuf<MapData>,
    /// Present when the drop tracepoint attached.
    pub drops: Option<RingBuf<MapData>>,
    pub counters: KernelCounters,
    pub hooks: Vec<HookStatus>,
    /// Drop-reason names of this kernel (empty when drops are not captured).
    pub reasons: DropReasons,
}

/// The kernel programs' per-CPU `STATS` array.
pub struct KernelCounters(PerCpuArray<MapData, u64>);

/// The ports from the first slot on, the rest 0: the programs stop at the first empty slot.
pub fn port_config(ports: &[u16]) -> PortConfig {
    let mut cfg = PortConfig {
        ports: [0; MAX_PORTS],
    };
    for (slot, port) in cfg.ports.iter_mut().zip(ports) {
        *slot = *port;
    }
    cfg
}

/// Loads the object with the given settings; the verifier runs here for the cgroup programs.
pub fn load(
    ports: &[u16],
    ring_buffer_size: u32,
    offsets: &KernelOffsets,
) -> Result<Ebpf, CaptureError> {
    let cfg = port_config(ports);
    let mut ebpf = EbpfLoader::new()
        .override_global("PORT_CONFIG", &cfg, true)
        .override_global("KERNEL_OFFSETS", offsets, true)
        .map_max_entries("EVENTS", ring_buffer_size)
        .load(EBPF_OBJECT)
        .map_err(CaptureError::Load)?;
    for name in [EGRESS_PROGRAM, INGRESS_PROGRAM] {
        cgroup_skb(&mut ebpf, name)?
            .load()
            .map_err(|source| CaptureError::Program { name, source })?;
    }
    Ok(ebpf)
}

pub fn cgroup_skb<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSkb, CaptureError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| CaptureError::Program { name, source })
}

pub fn open_cgroup(path: &Path) -> Result<File, CaptureError> {
    File::open(path).map_err(|source| CaptureError::Cgroup {
        path: path.display().to_string(),
        source,
    })
}

/// Attaches one program through a BPF link. Cgroup links always run alongside the other
/// programs on the cgroup (the kernel attaches them with BPF_F_ALLOW_MULTI), so other tools and
/// other dnsprobe instances keep running. Passing the multi flag explicitly makes kernels with
/// multi-prog cgroup support reject the link with EINVAL, hence `Single` here: aya turns it
/// into flags 0 for `bpf_link_create` (kernel 5.7 and later).
pub fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    attach_type: CgroupSkbAttachType,
) -> Result<(), CaptureError> {
    cgroup_skb(ebpf, name)?
        .attach(cgroup, attach_type, CgroupAttachMode::Single)
        .map(|_link| ())
        .map_err(|source| CaptureError::Program { name, source })
}

/// Loads and attaches the drop tracepoint program.
pub fn attach_drop_program(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let btf = Btf::from_sys_fs().map_err(|e| CaptureError::Btf(e.to_string()))?;
    let program: &mut BtfTracePoint = ebpf
        .program_mut(DROP_PROGRAM)
        .ok_or(CaptureError::MissingProgram(DROP_PROGRAM))?
        .try_into()
        .map_err(|source| CaptureError::Program {
            name: DROP_PROGRAM,
            source,
        })?;
    program
        .load(DROP_TRACEPOINT, &btf)
        .map_err(|source| CaptureError::Program {
            name: DROP_PROGRAM,
            source,
        })?;
    program
        .attach()
        .map(|_| ())
        .map_err(|source| CaptureError::Program {
            name: DROP_PROGRAM,
            source,
        })
}

impl Capture {
    pub fn start(cfg: &CaptureConfig<'_>) -> Result<Self, CaptureError> {
        let mut hooks = Vec::new();
        let support = match KernelBtf::from_sys_fs()
            .map_err(DropSupportError::from)
            .and_then(|btf| drop_support(&btf))
        {
            Ok(support) => Some(support),
            Err(e) => {
                hooks.push(HookStatus {
                    hook: "tp_btf/kfree_skb",
                    attached: false,
                    detail: format!("kernel BTF lacks what drop capture needs: {e}"),
                });
                None
            }
        };
        let offsets = support
            .as_ref()
            .map(|s| s.offsets)
            .unwrap_or(KernelOffsets::UNSET);
        let mut ebpf = load(cfg.ports, cfg.ring_buffer_size, &offsets)?;
        let cgroup = open_cgroup(cfg.cgroup_root)?;
        for (name, hook, kind) in [
            (
                EGRESS_PROGRAM,
                "cgroup_skb/egress",
                CgroupSkbAttachType::Egress,
            ),
            (
                INGRESS_PROGRAM,
                "cgroup_skb/ingress",
                CgroupSkbAttachType::Ingress,
            ),
        ] {
            attach(&mut ebpf, name, &cgroup, kind)?;
            hooks.push(HookStatus {
                hook,
                attached: true,
                detail: format!("on {} (multi-attach)", cfg.cgroup_root.display()),
            });
        }
        let mut drops = None;
        let mut reasons = DropReasons::default();
        if let Some(support) = support {
            match attach_drop_program(&mut ebpf) {
                Ok(()) => {
                    let ring = ebpf
                        .take_map("DROPS")
                        .ok_or(CaptureError::MissingMap("DROPS"))?;
                    drops = Some(RingBuf::try_from(ring).map_err(|source| CaptureError::Map {
                        name: "DROPS",
                        source,
                    })?);
                    hooks.push(HookStatus {
                        hook: "tp_btf/kfree_skb",
                        attached: true,
                        detail: format!(
                            "DNS packet drops with reasons ({} reason names from kernel BTF)",
                            support.reasons.len()
                        ),
                    });
                    reasons = support.reasons;
                }
                Err(e) => hooks.push(HookStatus {
                    hook: "tp_btf/kfree_skb",
                    attached: false,
                    detail: format!("{:#}", anyhow::Error::from(e)),
                }),
            }
        }
        hooks.push(HookStatus {
            hook: "fexit/__nf_conntrack_confirm",
            attached: false,
            detail: "not used: conntrack insert failures are told by the namespace's \
                     insert_failed counter"
                .into(),
        });
        let ring = ebpf
            .take_map("EVENTS")
            .ok_or(CaptureError::MissingMap("EVENTS"))?;
        let ring = RingBuf::try_from(ring).map_err(|source| CaptureError::Map {
            name: "EVENTS",
            source,
        })?;
        let stats = ebpf
            .take_map("STATS")
            .ok_or(CaptureError::MissingMap("STATS"))?;
        let stats = PerCpuArray::try_from(stats).map_err(|source| CaptureError::Map {
            name: "STATS",
            source,
        })?;
        Ok(Self {
            ebpf,
            ring,
            drops,
            counters: KernelCounters(stats),
            hooks,
            reasons,
        })
    }
}

impl KernelCounters {
    pub fn read(&self) -> Result<KernelStats, CaptureError> {
        let sum = |index: u32| -> Result<u64, CaptureError> {
            let values = self.0.get(&index, 0).map_err(|source| CaptureError::Map {
                name: "STATS",
                source,
            })?;
            Ok(values.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(KernelStats {
            events: sum(STAT_EVENTS)?,
            ringbuf_full: sum(STAT_RINGBUF_FULL)?,
            lost_egress: sum(STAT_LOST_EGRESS)?,
            lost_ingress: sum(STAT_LOST_INGRESS)?,
            unparseable: sum(STAT_UNPARSEABLE)?,
            drops: sum(STAT_DROPS)?,
            drop_ringbuf_full: sum(STAT_DROP_RINGBUF_FULL)?,
        })
    }
}

/// Lets BPF maps exceed a small memlock limit on kernels that still charge it (before 5.11).
/// Newer kernels account BPF memory to the memory cgroup, so a refusal here is harmless.
pub fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: valid pointer to an initialised rlimit.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels that charge BPF memory to memcg",
            std::io::Error::last_os_error()
        );
    }
}

/// Linux capability numbers that loading and attaching need.
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

/// Names the capabilities the daemon lacks, from the effective set in /proc/self/status.
pub fn missing_capabilities() -> Vec<&'static str> {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return Vec::new();
    };
    let Some(eff) = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
    else {
        return Vec::new();
    };
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) {
        if !has(CAP_BPF) {
            missing.push("CAP_BPF");
        }
        if !has(CAP_PERFMON) {
            missing.push("CAP_PERFMON");
        }
    }
    if !has(CAP_NET_ADMIN) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    missing
}
