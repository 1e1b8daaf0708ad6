//! dot, cosine and hamming on pairs of streams, against the dense ternary vectors.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::popcount(data));
