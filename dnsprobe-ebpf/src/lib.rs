#![no_std]
// Empty: this crate exists for its `dnsprobe` binary (the kernel programs); the library target lets
// `dnsprobe/build.rs` declare a build-dependency so cargo rebuilds when it changes.
