//! The release daemon, built with profile-guided optimisation (PGO).
//!
//! At low query rates the daemon wakes once a second to a few milliseconds of work, and that
//! work runs on caches and predictors something else has used meanwhile: how its hot path is
//! laid out counts for more than the instructions it executes. PGO lays it out from measured
//! use. The profile comes from the pipeline benchmark (`dnsprobe/benches/pipeline.rs`): its
//! synthetic ring-buffer records of dnsperf-like and resolver-like traffic, and 100,000
//! queries never answered, go through the same decoding, correlation, lookups and JSON output
//! as the daemon's, in an instrumented build of it. The daemon is then built with that
//! profile. Traffic unlike the benchmark's gets less of the gain; correctness does not depend
//! on the profile.
//!
//! Everything lives under `<target>/pgo/`, apart from the plain build's artifacts: a
//! `cargo build --release` by hand neither uses nor disturbs it.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, describe, run_step};

/// A built release daemon and how it was built, for the reports that measure it.
pub struct DaemonBuild {
    pub binary: PathBuf,
    pub description: String,
}

/// Builds the release daemon, with PGO unless `pgo` is false, and returns where it is.
/// `step` names the calling task in what is printed.
pub fn build_daemon(root: &Path, target_dir: &Path, pgo: bool, step: &str) -> Result<DaemonBuild> {
    if !pgo {
        run_step(
            &format!("{step}: build"),
            cargo(root).args(["build", "--release", "-p", "dnsprobe"]),
        )?;
        return Ok(DaemonBuild {
            binary: target_dir.join("release").join("dnsprobe"),
            description: "plain release build (`--no-pgo`)".to_owned(),
        });
    }
    let base_flags = base_rustflags()?;
    let pgo_dir = target_dir.join("pgo");
    let raw_dir = pgo_dir.join("raw");
    let profile = pgo_dir.join("dnsprobe.profdata");

    let instrumented = build_instrumented_bench(root, &pgo_dir, &raw_dir, &base_flags, step)?;
    if is_newer(&profile, &instrumented)? {
        // Training again would write a profile that differs only in noise (hash seeds vary)
        // and make cargo rebuild every crate of the optimised build for nothing.
        eprintln!(
            "xtask: {step}: pgo: {} is newer than the instrumented benchmark; kept",
            profile.display()
        );
    } else {
        train(&instrumented, &raw_dir, step)?;
        merge_profile(root, &raw_dir, &profile, step)?;
    }

    let optimised_dir = pgo_dir.join("optimised");
    let flags = join_flags(
        &base_flags,
        &format!("-Cprofile-use={}", utf8(&profile, "the profile path")?),
    );
    run_step(
        &format!(
            "{step}: pgo: optimised build (RUSTFLAGS='{flags}' CARGO_TARGET_DIR={})",
            optimised_dir.display()
        ),
        cargo(root)
            .args(["build", "--release", "-p", "dnsprobe"])
            .env("CARGO_TARGET_DIR", &optimised_dir)
            .env("RUSTFLAGS", &flags),
    )?;
    Ok(DaemonBuild {
        binary: optimised_dir.join("release").join("dnsprobe"),
        description: format!(
            "release build with PGO (profile from the pipeline benchmark's synthetic traffic: {})",
            profile.display()
        ),
    })
}

/// The user's RUSTFLAGS, to which the PGO flags are added. `CARGO_ENCODED_RUSTFLAGS` would
/// override RUSTFLAGS, and with it the PGO flags, so it is refused rather than ignored.
fn base_rustflags() -> Result<String> {
    if env::var_os("CARGO_ENCODED_RUSTFLAGS").is_some_and(|v| !v.is_empty()) {
        bail!(
            "pgo: CARGO_ENCODED_RUSTFLAGS is set and would override the PGO flags; unset it, \
             or build without PGO (--no-pgo)"
        );
    }
    Ok(env::var("RUSTFLAGS").unwrap_or_default())
}

fn join_flags(base: &str, flag: &str) -> String {
    if base.trim().is_empty() {
        flag.to_owned()
    } else {
        format!("{base} {flag}")
    }
}

fn utf8<'a>(path: &'a Path, what: &str) -> Result<&'a str> {
    path.to_str()
        .with_context(|| format!("pgo: {what} {} is not UTF-8", path.display()))
}

/// Builds the pipeline benchmark instrumented to count what runs, and returns its executable.
fn build_instrumented_bench(
    root: &Path,
    pgo_dir: &Path,
    raw_dir: &Path,
    base_flags: &str,
    step: &str,
) -> Result<PathBuf> {
    let flags = join_flags(
        base_flags,
        &format!(
            "-Cprofile-generate={}",
            utf8(raw_dir, "the profile directory")?
        ),
    );
    let instrumented_dir = pgo_dir.join("instrumented");
    let mut cmd = cargo(root);
    cmd.args([
        "bench",
        "-p",
        "dnsprobe",
        "--bench",
        "pipeline",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ])
    .env("CARGO_TARGET_DIR", &instrumented_dir)
    .env("RUSTFLAGS", &flags)
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    eprintln!(
        "xtask: {step}: pgo: instrumented build (RUSTFLAGS='{flags}' CARGO_TARGET_DIR={}): {}",
        instrumented_dir.display(),
        describe(&cmd)
    );
    let out = cmd
        .output()
        .with_context(|| format!("pgo: cannot start `{}`", describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "pgo: instrumented build failed: `{}` exited with {}",
            describe(&cmd),
            out.status
        );
    }
    bench_executable(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "pgo: `{}` named no executable for the `pipeline` benchmark",
            describe(&cmd)
        )
    })
}

/// The executable of the `pipeline` bench target in cargo's JSON messages.
fn bench_executable(messages: &str) -> Option<PathBuf> {
    messages.lines().find_map(|line| {
        if !line.contains(r#""reason":"compiler-artifact""#)
            || !line.contains(r#""kind":["bench"]"#)
            || !line.contains(r#""name":"pipeline""#)
        {
            return None;
        }
        let (_, rest) = line.split_once(r#""executable":""#)?;
        let (path, _) = rest.split_once('"')?;
        Some(PathBuf::from(path))
    })
}

/// Whether `a` exists and was modified after `b`.
fn is_newer(a: &Path, b: &Path) -> Result<bool> {
    let modified = |p: &Path| -> Result<Option<SystemTime>> {
        match fs::metadata(p) {
            Ok(m) => Ok(Some(m.modified().with_context(|| {
                format!("pgo: no modification time for {}", p.display())
            })?)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("pgo: reading {}", p.display())),
        }
    };
    Ok(match (modified(a)?, modified(b)?) {
        (Some(a), Some(b)) => a > b,
        _ => false,
    })
}

/// Runs the instrumented benchmark with its default traffic; it writes the counts on exit.
fn train(instrumented: &Path, raw_dir: &Path, step: &str) -> Result<()> {
    // The build's own instrumented build scripts wrote profiles here too: only the
    // benchmark's may go into the merge.
    match fs::remove_dir_all(raw_dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("pgo: removing {}", raw_dir.display()))
        }
    }
    fs::create_dir_all(raw_dir).with_context(|| format!("pgo: creating {}", raw_dir.display()))?;
    let mut cmd = Command::new(instrumented);
    cmd.arg("--bench")
        .env(
            "LLVM_PROFILE_FILE",
            raw_dir.join("pipeline-%p.profraw").as_os_str(),
        )
        // The benchmark's figures, instrumented, mean nothing; its own errors still show.
        .stdout(Stdio::null());
    // The profile is of the default traffic, whatever the caller's shell asks of the
    // benchmark otherwise.
    for (key, _) in env::vars_os() {
        if key.to_string_lossy().starts_with("DNSPROBE_BENCH_") {
            cmd.env_remove(key);
        }
    }
    run_step(&format!("{step}: pgo: training"), &mut cmd)
}

/// Merges the training run's raw counts into the profile the optimised build reads, with the
/// llvm-profdata of rustc's own LLVM (the raw format is tied to it).
fn merge_profile(root: &Path, raw_dir: &Path, profile: &Path, step: &str) -> Result<()> {
    let tool = llvm_profdata(root)?;
    let mut raws: Vec<PathBuf> = fs::read_dir(raw_dir)
        .with_context(|| format!("pgo: reading {}", raw_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
        .collect();
    if raws.is_empty() {
        bail!(
            "pgo: the training run wrote no profile into {}",
            raw_dir.display()
        );
    }
    raws.sort();
    run_step(
        &format!("{step}: pgo: merge"),
        Command::new(&tool)
            .arg("merge")
            .arg("-o")
            .arg(profile)
            .args(&raws),
    )
}

/// `llvm-profdata` of the LLVM major that `rustc` (the toolchain cargo builds the daemon
/// with) reports.
fn llvm_profdata(root: &Path) -> Result<PathBuf> {
    let out = Command::new("rustc")
        .arg("-vV")
        .current_dir(root)
        .output()
        .context("pgo: cannot run `rustc -vV`")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let major = llvm_major(&text)
        .with_context(|| format!("pgo: `rustc -vV` reports no LLVM version:\n{text}"))?;
    let candidates = [
        PathBuf::from(format!("/usr/lib/llvm-{major}/bin/llvm-profdata")),
        PathBuf::from(format!("/usr/bin/llvm-profdata-{major}")),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "pgo: rustc uses LLVM {major}, and no llvm-profdata of that LLVM is installed \
                 (looked for {}); install Debian's llvm-{major}, or build without PGO (--no-pgo)",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn llvm_major(rustc_version: &str) -> Option<&str> {
    let version = rustc_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))?;
    let major = version.split('.').next()?.trim();
    (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit())).then_some(major)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_bench_executable_among_cargo_messages() {
        let messages = concat!(
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"dnsprobe"},"executable":null}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"dnsprobe"},"executable":"/t/release/dnsprobe"}"#,
            "\n",
            r#"{"reason":"compiler-artifact","target":{"kind":["bench"],"name":"pipeline"},"executable":"/t/release/deps/pipeline-0123"}"#,
            "\n",
            r#"{"reason":"build-finished","success":true}"#,
        );
        assert_eq!(
            bench_executable(messages),
            Some(PathBuf::from("/t/release/deps/pipeline-0123"))
        );
        assert_eq!(bench_executable(r#"{"reason":"build-finished"}"#), None);
    }

    #[test]
    fn reads_the_llvm_major_of_rustc() {
        let text = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\n\
                    host: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";
        assert_eq!(llvm_major(text), Some("22"));
        assert_eq!(llvm_major("rustc 1.95.0\n"), None);
        assert_eq!(llvm_major("LLVM version: x.1\n"), None);
    }

    #[test]
    fn joins_flags_without_a_stray_space() {
        assert_eq!(join_flags("", "-Cb"), "-Cb");
        assert_eq!(join_flags("  ", "-Cb"), "-Cb");
        assert_eq!(join_flags("-Ca", "-Cb"), "-Ca -Cb");
    }
}
