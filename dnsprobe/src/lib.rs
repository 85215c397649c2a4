//! dnsprobe: an eBPF DNS latency observer (the library behind the `dnsprobe` binary; also
//! driven offline by the fuzz target, see `pipeline::fuzz_records`).

// The modules were private to the binary before the fuzz target needed them; their `len()`
// accessors feed the summary and were never meant as a collection API.
#![expect(
    clippy::len_without_is_empty,
    reason = "len() accessors feed the summary; they are not a collection API"
)]

pub mod attribute;
pub mod btf;
pub mod capture;
pub mod check;
pub mod cli;
pub mod coarse;
pub mod conntrack;
pub mod correlate;
pub mod decode;
pub mod drops;
pub mod export;
pub mod filter;
pub mod kubeapi;
pub mod lookup;
pub mod metrics;
pub mod pipeline;
pub mod pods;
pub mod qname;
pub mod ticker;
pub mod top;
