//! Project tasks, run as `cargo xtask <task>` (alias in .cargo/config.toml).
//!
//! - `setup`: installs what a fresh Debian 12 machine lacks to build and test dnsprobe
//!   (Debian packages, nightly rust-src, bpf-linker, the manifest validator from PyPI).
//! - `build`: the release daemon, with profile-guided optimisation (pgo.rs) unless `--no-pgo`;
//!   prints the binary's path.
//! - `run`: setup, release build (as `build`), then replaces itself with `dnsprobe run ...`.
//! - `test`: setup, fmt check, clippy, every test of the workspace, the PGO build and its
//!   `dnsprobe check`, then a minute of fuzzing (fuzz/, cargo-fuzz on nightly).
//! - `bench`: setup, release build (as `build`), the benchmark suite (bench.rs,
//!   docs/benchmarks.md), then longer fuzzing (`--fuzz SECS`).
//!
//! Every step is idempotent and says what it does or skips, so a CI log shows what a fresh
//! machine needed. Errors name the step that failed.

use std::{
    env,
    ffi::OsString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

mod bench;
mod pgo;

/// Debian packages the build, the daemon and the integration tests need.
const DEBIAN_PACKAGES: &[&str] = &[
    // bpf-linker links against Debian's LLVM 22.
    "llvm-22-dev",
    // llvm-profdata of rustc's LLVM, for the PGO build (pgo.rs); llvm-22-dev pulls it in
    // too, but the PGO build is what needs it.
    "llvm-22",
    "libpolly-22-dev",
    // Peers of the integration tests: a real resolver, real clients, a musl toolchain.
    "unbound",
    "bind9-dnsutils",
    "musl-tools",
    // Inspection and load tools used while developing and by the tests' worlds.
    "bpftool",
    "conntrack",
    "iptables",
    "iproute2",
    "tcpdump",
    "dnsperf",
    "iperf3",
    "tmux",
    "python3",
    "python3-pip",
    // cargo-fuzz (libFuzzer) and build scripts compile C and C++.
    "g++",
];

/// The offline Kubernetes schema validator the deploy manifest tests run (a PyPI package).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate";
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// The LLVM major of `LLVM_BIN` and of bpf-linker's `llvm-22` feature: the nightly's rustc must
/// emit bitcode of this LLVM for bpf-linker to read it.
const LLVM_MAJOR: &str = "22";

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "dnsprobe project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks (Debian packages, nightly rust-src,
    /// bpf-linker, kubernetes-validate for the manifest tests). Needs root.
    Setup,
    /// Build the release daemon (with profile-guided optimisation unless --no-pgo; no setup)
    /// and print the path of the binary.
    Build {
        /// A plain release build, without profile-guided optimisation.
        #[arg(long)]
        no_pgo: bool,
        /// Pass `--locked` to every cargo build (Cargo.lock must not need an update).
        #[arg(long)]
        locked: bool,
    },
    /// Set up, build the release daemon (as `build`), and run `dnsprobe run ARGS...` in its
    /// place.
    Run {
        /// A plain release build, without profile-guided optimisation (builds in half the time).
        #[arg(long)]
        no_pgo: bool,
        /// Arguments for `dnsprobe run`, after `--` (e.g. `cargo xtask run -- --format json`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, then `cargo fmt --check`, clippy with warnings denied, all tests (as root: the
    /// integration tests load eBPF programs), then a minute of fuzzing (fuzz/, cargo-fuzz).
    Test {
        /// Extra arguments for `cargo test`, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Set up, build the release daemon, and run the benchmark suite (needs root; not a test:
    /// prints a table and writes it to target/bench/, see docs/benchmarks.md).
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup(),
        Task::Build { no_pgo, locked } => build(pgo::BuildOptions {
            pgo: !no_pgo,
            locked,
        }),
        Task::Run { no_pgo, args } => run(!no_pgo, args),
        Task::Test { args } => test(args),
        Task::Bench(args) => run_bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .context("xtask's manifest directory has no parent")
}

/// `cargo` from PATH, i.e. the rustup proxy, so nested invocations pick the same toolchain
/// rules as the user's shell.
fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root);
    strip_package_env(&mut cmd);
    cmd
}

/// `cargo xtask` (cargo run) gave this process xtask's own package variables. Some build
/// scripts (ring's) track CARGO_MANIFEST_DIR, so passing them on to a nested cargo made every
/// build from here rebuild what a build from the shell had built, and the other way round.
fn strip_package_env(cmd: &mut Command) {
    for (key, _) in env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("CARGO_PKG_")
            || matches!(
                &*key_text,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
}

/// Runs `cmd` with inherited stdio; a failure to start or a non-zero exit names `step`.
fn run_step(step: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {step}: {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("{step}: cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("{step} failed: `{}` exited with {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` for its stdout (its stderr goes to ours), failing as `run_step` does.
fn stdout_of(step: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("{step}: cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{step} failed: `{}` exited with {}",
            describe(cmd),
            out.status
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` quietly for its stdout; `None` if it could not start or failed, for probes
/// whose failure just means "not there yet".
fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The command as a shell would take it, with the variables set on it (not those removed), so
/// a logged step can be run again by hand.
fn describe(cmd: &Command) -> String {
    let mut s = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            s.push_str(&key.to_string_lossy());
            s.push('=');
            s.push_str(&shell_quote(&value.to_string_lossy()));
            s.push(' ');
        }
    }
    s.push_str(&shell_quote(&cmd.get_program().to_string_lossy()));
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(&arg.to_string_lossy()));
    }
    s
}

/// `word` as a POSIX shell reads it back: as it is when nothing in it is special, in single
/// quotes otherwise, and as bash's `$'...'` when it holds control characters (the 0x1f that
/// separates CARGO_ENCODED_RUSTFLAGS' flags), which single quotes would keep but a terminal
/// would not show.
fn shell_quote(word: &str) -> std::borrow::Cow<'_, str> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        return word.into();
    }
    if word.chars().any(char::is_control) {
        let mut s = String::from("$'");
        for c in word.chars() {
            match c {
                '\\' | '\'' => {
                    s.push('\\');
                    s.push(c);
                }
                c if c.is_control() => s.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => s.push(c),
            }
        }
        s.push('\'');
        return s.into();
    }
    format!("'{}'", word.replace('\'', "'\\''")).into()
}

fn setup() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "setup needs root (effective uid is {euid}): it installs Debian packages, and the \
             daemon and its tests load eBPF programs; run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    debian_packages()?;
    rust_components()?;
    nightly_toolchain()?;
    nightly_llvm()?;
    bpf_linker()?;
    python_packages()?;
    cargo_fuzz()?;
    eprintln!("xtask: setup: done");
    Ok(())
}

fn debian_packages() -> Result<()> {
    let step = "setup: Debian packages";
    let mut missing = Vec::new();
    for &pkg in DEBIAN_PACKAGES {
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", pkg])
            .output()
            .with_context(|| format!("{step}: cannot run dpkg-query (is this Debian?)"))?;
        // dpkg-query fails for a package it has never heard of; that is "missing" too.
        let status = String::from_utf8_lossy(&out.stdout);
        if out.status.success() && status.trim_end().ends_with("install ok installed") {
            continue;
        }
        missing.push(pkg);
    }
    if missing.is_empty() {
        eprintln!(
            "xtask: {step}: all {} present, skipping apt-get",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    eprintln!("xtask: {step}: missing {}", missing.join(" "));
    run_step(
        &format!("{step}: apt-get update"),
        Command::new("apt-get").arg("update"),
    )?;
    run_step(
        &format!("{step}: apt-get install"),
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )
}

fn nightly_toolchain() -> Result<()> {
    let step = "setup: nightly toolchain";
    let toolchains =
        probe(Command::new("rustup").args(["toolchain", "list"])).with_context(|| {
            format!("{step}: `rustup toolchain list` failed (is rustup installed?)")
        })?;
    // Lines look like `nightly-x86_64-unknown-linux-gnu (default)`.
    if toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: {step}: present, skipping");
    } else {
        run_step(
            &format!("{step}: install"),
            Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]),
        )
        .with_context(|| {
            format!(
                "{step}: no `nightly` toolchain and it could not be installed; the eBPF programs \
                 are built with nightly (-Z build-std)"
            )
        })?;
    }

    let step = "setup: rust-src for nightly";
    let components = probe(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .with_context(|| format!("{step}: `rustup component list --toolchain nightly` failed"))?;
    // Installed components are listed as `rust-src` (no target suffix for this one).
    if components.lines().any(|l| l.trim() == "rust-src") {
        eprintln!("xtask: {step}: present, skipping");
        return Ok(());
    }
    run_step(
        step,
        Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
    )
}

fn bpf_linker_version() -> Option<String> {
    probe(Command::new("bpf-linker").arg("--version"))
}

fn bpf_linker() -> Result<()> {
    let step = "setup: bpf-linker";
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION}");
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => {
            eprintln!("xtask: {step}: {} present, skipping", v.trim());
            return Ok(());
        }
        Some(v) => eprintln!("xtask: {step}: found {}, want {wanted}", v.trim()),
        None => eprintln!("xtask: {step}: not found, want {wanted}"),
    }
    // bpf-linker's build finds llvm-config on PATH; Debian keeps LLVM 22's out of the default PATH.
    let path = match env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![PathBuf::from(LLVM_BIN)];
            dirs.extend(env::split_paths(&p));
            env::join_paths(dirs).context("building PATH for the bpf-linker build")?
        }
        None => OsString::from(LLVM_BIN),
    };
    let install = |locked: bool| {
        let mut cmd = Command::new("cargo");
        cmd.env("PATH", &path)
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION]);
        if locked {
            cmd.arg("--locked");
        }
        cmd.args(["--no-default-features", "--features", "llvm-22"]);
        run_step(&format!("{step}: cargo install"), &mut cmd)
    };
    if let Err(err) = install(true) {
        // The published lock file can pin crates that no longer build; an unlocked resolve is
        // the documented fallback.
        eprintln!("xtask: {step}: {err:#}; retrying without --locked");
        install(false)?;
    }
    match bpf_linker_version() {
        Some(v) if v.contains(BPF_LINKER_VERSION) => Ok(()),
        Some(v) => bail!(
            "{step}: installed, but `bpf-linker --version` says `{}`, want {wanted} (another \
             bpf-linker earlier on PATH?)",
            v.trim()
        ),
        None => bail!(
            "{step}: installed, but `bpf-linker --version` does not run (is ~/.cargo/bin on PATH?)"
        ),
    }
}

/// cargo-fuzz, for the fuzz target in fuzz/ (built with the nightly toolchain).
fn cargo_fuzz() -> Result<()> {
    let step = "setup: cargo-fuzz";
    if let Some(v) = probe(Command::new("cargo").args(["fuzz", "--version"])) {
        eprintln!("xtask: {step}: {} present, skipping", v.trim());
        return Ok(());
    }
    run_step(
        &format!("{step}: cargo install"),
        Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]),
    )
}

/// Runs the `pipeline` fuzz target for `seconds` from the committed seeds
/// (fuzz/corpus/pipeline, see fuzz/make_seeds.py); new inputs go to fuzz/target/corpus, a
/// crash or hang fails the step and leaves its input in fuzz/artifacts/pipeline/.
fn fuzz_pipeline(step: &str, root: &Path, seconds: u32) -> Result<()> {
    let fuzz_dir = root.join("fuzz");
    let work_corpus = fuzz_dir.join("target").join("corpus").join("pipeline");
    std::fs::create_dir_all(&work_corpus)
        .with_context(|| format!("{step}: creating {}", work_corpus.display()))?;
    let mut cmd = Command::new("cargo");
    strip_package_env(&mut cmd);
    cmd.current_dir(&fuzz_dir)
        .args(["+nightly", "fuzz", "run", "pipeline"])
        .arg(&work_corpus)
        .arg(fuzz_dir.join("corpus").join("pipeline"))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-timeout=10", "-rss_limit_mb=2048"]);
    run_step(step, &mut cmd)
}

/// `cargo fmt` and `cargo clippy` of the test step: absent from a rustup `minimal` profile.
fn rust_components() -> Result<()> {
    // Idempotent: rustup only reports the components as up to date when they are.
    run_step(
        "setup: rustfmt and clippy",
        Command::new("rustup").args(["component", "add", "rustfmt", "clippy"]),
    )
}

/// Fails early, and says why, when the nightly's LLVM is not the one bpf-linker is built
/// against: the eBPF build would otherwise fail deep inside bpf-linker.
fn nightly_llvm() -> Result<()> {
    let step = "setup: nightly LLVM";
    let version = probe(Command::new("rustc").args(["+nightly", "-vV"]))
        .with_context(|| format!("{step}: `rustc +nightly -vV` failed"))?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .with_context(|| format!("{step}: no `LLVM version` in `rustc +nightly -vV`"))?;
    if major != LLVM_MAJOR {
        bail!(
            "{step}: the nightly toolchain uses LLVM {major}, bpf-linker is built against LLVM              {LLVM_MAJOR}: install a nightly with LLVM {LLVM_MAJOR} (nightly-2026-05-19, see              the Containerfile) as `nightly`"
        );
    }
    eprintln!("xtask: {step}: {major}, as bpf-linker's");
    Ok(())
}

fn python_packages() -> Result<()> {
    let step = "setup: python package kubernetes-validate";
    let wanted = KUBERNETES_VALIDATE_VERSION;
    // Asks the interpreter the tests will run, not pip's idea of it.
    let installed = probe(Command::new("python3").args([
        "-c",
        "import importlib.metadata as m; print(m.version('kubernetes-validate'))",
    ]));
    match installed.as_deref().map(str::trim) {
        Some(v) if v == wanted => {
            eprintln!("xtask: {step}: {v} present, skipping");
            return Ok(());
        }
        Some(v) => eprintln!("xtask: {step}: found {v}, want {wanted}"),
        None => eprintln!("xtask: {step}: not found, want {wanted}"),
    }
    run_step(
        step,
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                &format!("{KUBERNETES_VALIDATE}=={wanted}"),
            ])
            // Debian marks its Python externally managed (PEP 668): pip refuses to install
            // into it unless told that this machine is ours to change.
            .env("PIP_BREAK_SYSTEM_PACKAGES", "1"),
    )
}

/// Where cargo puts this workspace's artifacts.
fn target_dir(root: &Path) -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn build(options: pgo::BuildOptions) -> Result<()> {
    let root = workspace_root()?;
    let daemon = pgo::build_daemon(&root, &target_dir(&root), options, "build")?;
    eprintln!("xtask: build: {}", daemon.description);
    println!("{}", daemon.binary.display());
    Ok(())
}

fn run(pgo: bool, args: Vec<OsString>) -> Result<()> {
    setup()?;
    let root = workspace_root()?;
    let daemon = pgo::build_daemon(
        &root,
        &target_dir(&root),
        pgo::BuildOptions { pgo, locked: false },
        "run",
    )?;
    let mut cmd = Command::new(&daemon.binary);
    cmd.arg("run").args(&args);
    eprintln!("xtask: run: exec {}", describe(&cmd));
    // exec, not spawn: the daemon gets Ctrl-C and SIGTERM directly and its exit code is ours.
    let err = cmd.exec();
    Err(err).with_context(|| format!("run: cannot exec {}", daemon.binary.display()))
}

fn run_bench(args: &bench::BenchArgs) -> Result<()> {
    setup()?;
    let root = workspace_root()?;
    let daemon = pgo::build_daemon(
        &root,
        &target_dir(&root),
        pgo::BuildOptions {
            pgo: !args.no_pgo,
            locked: false,
        },
        "bench",
    )?;
    bench::bench(args, &root, &daemon)?;
    if args.fuzz > 0 {
        fuzz_pipeline(&format!("bench: fuzz ({} s)", args.fuzz), &root, args.fuzz)?;
    }
    Ok(())
}

fn test(args: Vec<OsString>) -> Result<()> {
    setup()?;
    let root = workspace_root()?;
    run_step(
        "test: format check",
        cargo(&root).args(["fmt", "--all", "--check"]),
    )
    .context("code is not formatted; run `cargo fmt --all`")?;
    run_step(
        "test: clippy",
        cargo(&root).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run_step(
        "test: cargo test",
        cargo(&root).args(["test", "--workspace"]).args(&args),
    )?;
    // The README's run command builds the daemon with PGO: build it that way here too and
    // have it load its programs, so that a machine that passes the tests can also run it.
    // A run narrowed by `cargo test` arguments is after one test, not the release build.
    if args.is_empty() {
        let daemon = pgo::build_daemon(
            &root,
            &target_dir(&root),
            pgo::BuildOptions {
                pgo: true,
                locked: false,
            },
            "test",
        )?;
        run_step(
            "test: the PGO build loads and attaches",
            Command::new(&daemon.binary).arg("check"),
        )?;
    } else {
        eprintln!("xtask: test: PGO build skipped: cargo test arguments narrow this run");
    }
    fuzz_pipeline("test: fuzz (60 s)", &root, 60)?;
    eprintln!("xtask: test: all steps passed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_words_read_back_the_same_in_a_shell() {
        let words = [
            "plain/path-1.0",
            "",
            "two words",
            "it's",
            "$HOME",
            "back\\slash",
            "-Cprofile-use=/a b/p\x1f-Cfoo",
            "tab\tand\u{85}next",
        ];
        for word in words {
            let quoted = shell_quote(word);
            let out = Command::new("bash")
                .args(["-c", &format!("printf %s {quoted}")])
                .output()
                .expect("bash runs");
            assert!(out.status.success(), "{quoted}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), word, "{quoted}");
        }
        assert_eq!(shell_quote("plain/path-1.0"), "plain/path-1.0");
    }
}
