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
//!
//! The PGO flags go to cargo in CARGO_ENCODED_RUSTFLAGS, after the caller's own RUSTFLAGS or
//! CARGO_ENCODED_RUSTFLAGS (so paths with spaces stay whole). Like any flags from the
//! environment they take the place of `rustflags` from a cargo configuration file, which the
//! PGO build therefore does not see (the project sets none).

use std::{
    env,
    ffi::{OsStr, OsString},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::SystemTime,
};

use anyhow::{bail, Context as _, Result};

use crate::{cargo, describe, run_step, stdout_of};

/// A built release daemon and how it was built, for the reports that measure it.
pub struct DaemonBuild {
    pub binary: PathBuf,
    pub description: String,
}

/// How to build the release daemon.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions {
    /// With profile-guided optimisation; a plain `cargo build --release` otherwise.
    pub pgo: bool,
    /// `--locked` on every cargo build.
    pub locked: bool,
}

/// Builds the release daemon as `options` say and returns where it is. `step` names the
/// calling task in what is printed.
pub fn build_daemon(
    root: &Path,
    target_dir: &Path,
    options: BuildOptions,
    step: &str,
) -> Result<DaemonBuild> {
    let locked: &[&str] = if options.locked { &["--locked"] } else { &[] };
    if !options.pgo {
        run_step(
            &format!("{step}: build"),
            cargo(root)
                .args(["build", "--release", "-p", "dnsprobe"])
                .args(locked),
        )?;
        return Ok(DaemonBuild {
            binary: target_dir.join("release").join("dnsprobe"),
            description: "plain release build (`--no-pgo`)".to_owned(),
        });
    }
    let base_flags = base_rustflags(step)?;
    let pgo_dir = target_dir.join("pgo");
    let raw_dir = pgo_dir.join("raw");
    let profile = pgo_dir.join("dnsprobe.profdata");

    let instrumented =
        build_instrumented_bench(root, &pgo_dir, &raw_dir, &base_flags, locked, step)?;
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
    let mut profile_use = OsString::from("-Cprofile-use=");
    profile_use.push(&profile);
    run_step(
        &format!("{step}: pgo: optimised build"),
        cargo(root)
            .args(["build", "--release", "-p", "dnsprobe"])
            .args(locked)
            .env("CARGO_TARGET_DIR", &optimised_dir)
            .env_remove("RUSTFLAGS")
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                encoded_rustflags(&base_flags, &profile_use, step)?,
            ),
    )?;
    Ok(DaemonBuild {
        binary: optimised_dir.join("release").join("dnsprobe"),
        description: format!(
            "release build with PGO (profile from the pipeline benchmark's synthetic traffic: \
             `{}`)",
            profile.display()
        ),
    })
}

/// The caller's own rustc flags, to which the PGO flag is added: CARGO_ENCODED_RUSTFLAGS when
/// set (even empty: cargo then ignores RUSTFLAGS), else RUSTFLAGS split at whitespace, as
/// cargo splits it.
fn base_rustflags(step: &str) -> Result<Vec<String>> {
    let text = |name: &str| -> Result<Option<String>> {
        match env::var(name) {
            Ok(v) => Ok(Some(v)),
            Err(env::VarError::NotPresent) => Ok(None),
            Err(env::VarError::NotUnicode(_)) => {
                bail!("{step}: pgo: {name} is not UTF-8")
            }
        }
    };
    if let Some(encoded) = text("CARGO_ENCODED_RUSTFLAGS")? {
        return Ok(encoded
            .split('\x1f')
            .filter(|f| !f.is_empty())
            .map(str::to_owned)
            .collect());
    }
    Ok(text("RUSTFLAGS")?
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// `base` and then `flag`, as CARGO_ENCODED_RUSTFLAGS carries them (0x1f between flags).
fn encoded_rustflags(base: &[String], flag: &OsStr, step: &str) -> Result<String> {
    let flag = flag
        .to_str()
        .with_context(|| format!("{step}: pgo: {} is not UTF-8", flag.to_string_lossy()))?;
    let mut flags: Vec<&str> = base.iter().map(String::as_str).collect();
    flags.push(flag);
    Ok(flags.join("\x1f"))
}

/// Builds the pipeline benchmark instrumented to count what runs, and returns its executable.
fn build_instrumented_bench(
    root: &Path,
    pgo_dir: &Path,
    raw_dir: &Path,
    base_flags: &[String],
    locked: &[&str],
    step: &str,
) -> Result<PathBuf> {
    let mut profile_generate = OsString::from("-Cprofile-generate=");
    profile_generate.push(raw_dir);
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
    .args(locked)
    .env("CARGO_TARGET_DIR", pgo_dir.join("instrumented"))
    .env_remove("RUSTFLAGS")
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        encoded_rustflags(base_flags, &profile_generate, step)?,
    );
    eprintln!("xtask: {step}: pgo: instrumented build: {}", describe(&cmd));
    let messages = stdout_of(&format!("{step}: pgo: instrumented build"), &mut cmd)?;
    bench_executable(&messages).with_context(|| {
        format!(
            "{step}: pgo: `{}` named no executable for the `pipeline` benchmark",
            describe(&cmd)
        )
    })
}

/// The executable of the `pipeline` bench target in cargo's JSON messages (one per line).
fn bench_executable(messages: &str) -> Option<PathBuf> {
    messages.lines().find_map(|line| {
        let message: serde_json::Value = serde_json::from_str(line).ok()?;
        let target = message.get("target")?;
        let is_pipeline_bench = message.get("reason")?.as_str()? == "compiler-artifact"
            && target.get("name")?.as_str()? == "pipeline"
            && target
                .get("kind")?
                .as_array()?
                .iter()
                .any(|k| k.as_str() == Some("bench"));
        if !is_pipeline_bench {
            return None;
        }
        message.get("executable")?.as_str().map(PathBuf::from)
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
            return Err(err).with_context(|| format!("{step}: pgo: removing {}", raw_dir.display()))
        }
    }
    fs::create_dir_all(raw_dir)
        .with_context(|| format!("{step}: pgo: creating {}", raw_dir.display()))?;
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
/// llvm-profdata of rustc's own LLVM (the raw format is tied to it). Written beside it and
/// renamed, so an interrupted merge never leaves a profile that looks newer than its bench.
fn merge_profile(root: &Path, raw_dir: &Path, profile: &Path, step: &str) -> Result<()> {
    let tool = llvm_profdata(root, step)?;
    let mut raws: Vec<PathBuf> = fs::read_dir(raw_dir)
        .with_context(|| format!("{step}: pgo: reading {}", raw_dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
        .collect();
    if raws.is_empty() {
        bail!(
            "{step}: pgo: the training run wrote no profile into {}",
            raw_dir.display()
        );
    }
    raws.sort();
    let partial = profile.with_extension("profdata.partial");
    run_step(
        &format!("{step}: pgo: merge"),
        Command::new(&tool)
            .arg("merge")
            .arg("-o")
            .arg(&partial)
            .args(&raws),
    )?;
    fs::rename(&partial, profile).with_context(|| {
        format!(
            "{step}: pgo: renaming {} to {}",
            partial.display(),
            profile.display()
        )
    })
}

/// `llvm-profdata` of the LLVM that rustc (`$RUSTC`, else the `rustc` cargo runs here)
/// reports: rustup's llvm-tools copy in its sysroot when installed, else Debian's.
fn llvm_profdata(root: &Path, step: &str) -> Result<PathBuf> {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let query = |args: &[&str]| -> Result<String> {
        stdout_of(
            &format!("{step}: pgo: rustc query"),
            Command::new(&rustc).args(args).current_dir(root),
        )
    };
    let version = query(&["-vV"])?;
    let major = llvm_major(&version)
        .with_context(|| format!("{step}: pgo: `rustc -vV` reports no LLVM version:\n{version}"))?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(str::trim);
    let sysroot = query(&["--print", "sysroot"])?;
    let mut candidates = Vec::new();
    if let Some(host) = host {
        candidates.push(
            Path::new(sysroot.trim())
                .join("lib/rustlib")
                .join(host)
                .join("bin/llvm-profdata"),
        );
    }
    candidates.push(PathBuf::from(format!(
        "/usr/lib/llvm-{major}/bin/llvm-profdata"
    )));
    candidates.push(PathBuf::from(format!("/usr/bin/llvm-profdata-{major}")));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "{step}: pgo: rustc uses LLVM {major}, and no llvm-profdata of that LLVM is \
                 installed (looked for {}); install Debian's llvm-{major}, or build without PGO \
                 (--no-pgo)",
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
    fn pgo_flags_follow_the_callers_own_and_keep_spaces_in_paths() {
        let base = vec!["-Ctarget-cpu=x86-64-v2".to_owned(), "-g".to_owned()];
        let flag = OsString::from("-Cprofile-use=/a dir/dnsprobe.profdata");
        assert_eq!(
            encoded_rustflags(&base, &flag, "t").expect("UTF-8"),
            "-Ctarget-cpu=x86-64-v2\x1f-g\x1f-Cprofile-use=/a dir/dnsprobe.profdata"
        );
        assert_eq!(
            encoded_rustflags(&[], &flag, "t").expect("UTF-8"),
            "-Cprofile-use=/a dir/dnsprobe.profdata"
        );
    }
}
