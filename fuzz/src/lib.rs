//! The fuzz targets' bodies; `fuzz_targets/*.rs` are one-line libFuzzer entry points.
//! The same file is compiled into the main crate's `tests/fuzz_regressions.rs`, which
//! replays the corpus and regressions and runs a stable mutation fuzzer.

#[path = "targets.rs"]
mod targets;

pub use targets::*;
