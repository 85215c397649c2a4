//! `dnsprobe check`: what can load and attach on this kernel, one line per hook.

use std::path::{Path, PathBuf};

use aya::programs::CgroupSkbAttachType;

use crate::{attribute, capture, cli::CheckArgs};

struct Report {
    lines: Vec<String>,
    capture_possible: bool,
}

impl Report {
    fn ok(&mut self, what: &str, detail: impl AsRef<str>) {
        self.lines
            .push(format!("ok    {what}: {}", detail.as_ref()));
    }
    fn fail(&mut self, what: &str, detail: impl AsRef<str>, needed: bool) {
        let tag = if needed { "FAIL " } else { "skip " };
        if needed {
            self.capture_possible = false;
        }
        self.lines
            .push(format!("{tag} {what}: {}", detail.as_ref()));
    }
}

/// Runs every probe and prints the report; returns whether capture can work.
pub fn run(args: &CheckArgs) -> bool {
    let mut report = Report {
        lines: Vec::new(),
        capture_possible: true,
    };
    probe(args, &mut report);
    for line in &report.lines {
        println!("{line}");
    }
    if report.capture_possible {
        println!("capture: possible");
    } else {
        println!("capture: NOT possible on this machine (see FAIL lines)");
    }
    report.capture_possible
}

fn probe(args: &CheckArgs, report: &mut Report) {
    let missing = capture::missing_capabilities();
    if missing.is_empty() {
        report.ok(
            "privileges",
            "capabilities to load and attach eBPF programs present",
        );
    } else {
        report.fail(
            "privileges",
            format!("missing {} (run as root)", missing.join(", ")),
            true,
        );
    }

    if Path::new("/sys/kernel/btf/vmlinux").exists() {
        report.ok("kernel BTF", "/sys/kernel/btf/vmlinux");
    } else {
        report.fail(
            "kernel BTF",
            "/sys/kernel/btf/vmlinux absent: drop reasons (BTF-typed hooks) will be unavailable",
            false,
        );
    }

    let root: PathBuf = match &args.common.cgroup_root {
        Some(path) => path.clone(),
        None => match attribute::find_cgroup2_root() {
            Ok(path) => path,
            Err(e) => {
                report.fail("cgroup v2 root", e.to_string(), true);
                return;
            }
        },
    };
    if let Err(e) = attribute::check_cgroup2_dir(&root) {
        report.fail("cgroup v2 root", e.to_string(), true);
        return;
    }
    report.ok("cgroup v2 root", root.display().to_string());

    capture::raise_memlock_limit();
    let support = match crate::btf::KernelBtf::from_sys_fs()
        .map_err(capture::DropSupportError::from)
        .and_then(|btf| capture::drop_support(&btf))
    {
        Ok(support) => {
            report.ok(
                "kernel struct offsets",
                format!(
                    "sk_buff, net_device, net found; {} drop reason names",
                    support.reasons.len()
                ),
            );
            Some(support)
        }
        Err(e) => {
            report.fail("kernel struct offsets", e.to_string(), false);
            None
        }
    };
    let offsets = support
        .as_ref()
        .map(|s| s.offsets)
        .unwrap_or(dnsprobe_common::KernelOffsets::UNSET);
    let mut ebpf = match capture::load(&args.common.ports, 1 << 20, &offsets) {
        Ok(ebpf) => {
            report.ok(
                "load",
                format!(
                    "{} and {} accepted by the verifier; ring buffer created",
                    capture::EGRESS_PROGRAM,
                    capture::INGRESS_PROGRAM
                ),
            );
            ebpf
        }
        Err(e) => {
            report.fail("load", format!("{:#}", anyhow::Error::from(e)), true);
            return;
        }
    };
    let cgroup = match capture::open_cgroup(&root) {
        Ok(f) => f,
        Err(e) => {
            report.fail("cgroup v2 root", e.to_string(), true);
            return;
        }
    };
    for (name, hook, kind) in [
        (
            capture::EGRESS_PROGRAM,
            "cgroup_skb/egress",
            CgroupSkbAttachType::Egress,
        ),
        (
            capture::INGRESS_PROGRAM,
            "cgroup_skb/ingress",
            CgroupSkbAttachType::Ingress,
        ),
    ] {
        match capture::attach(&mut ebpf, name, &cgroup, kind) {
            Ok(()) => report.ok(
                hook,
                format!(
                    "attaches to {} (multi-attach); detached again",
                    root.display()
                ),
            ),
            Err(e) => report.fail(hook, format!("{:#}", anyhow::Error::from(e)), true),
        }
    }
    if support.is_some() {
        match capture::attach_drop_program(&mut ebpf) {
            Ok(()) => report.ok(
                "tp_btf/kfree_skb",
                "loads and attaches (DNS packet drops with kernel reasons)",
            ),
            Err(e) => report.fail(
                "tp_btf/kfree_skb",
                format!("{:#}; drops will not be reported", anyhow::Error::from(e)),
                false,
            ),
        }
    }
    report.fail(
        "fexit/__nf_conntrack_confirm",
        "not used: conntrack insert failures are told by the namespace's insert_failed counter",
        false,
    );
    // Dropping the object detaches the probes' links.
    drop(ebpf);
}
