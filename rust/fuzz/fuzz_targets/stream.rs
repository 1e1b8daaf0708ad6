//! Parse and decode arbitrary bytes as a stream. The first byte picks whether the checksum is
//! rewritten first, so that mutations reach the structural checks behind it.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::stream(data));
