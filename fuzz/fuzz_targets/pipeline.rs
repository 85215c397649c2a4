//! The whole userspace path, from raw ring-buffer records to exported records: decode,
//! correlate, lookups, drops, JSON export. Input framing: `dnsprobe::pipeline::fuzz_input`.
//! Seeds: `fuzz/corpus/pipeline/`, written by `fuzz/make_seeds.py`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Nothing under this path exists: the pipeline reads nothing of this machine.
    static MISSING: OnceLock<std::path::PathBuf> = OnceLock::new();
    let missing = MISSING.get_or_init(|| {
        std::env::temp_dir().join(format!("dnsprobe-fuzz-missing-{}", std::process::id()))
    });
    let mut pipeline = dnsprobe::pipeline::Pipeline::offline(missing);
    dnsprobe::pipeline::fuzz_records(&mut pipeline, data);
});
