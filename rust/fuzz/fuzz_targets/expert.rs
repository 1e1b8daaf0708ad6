//! The expert file reader on arbitrary bytes: open, list, fetch every stream and raw tensor.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::expert(data));
