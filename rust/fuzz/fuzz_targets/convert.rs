//! Golomb <-> bitmask conversions and decoding on streams made from arbitrary tensors, against
//! a plain dense reference.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "checks.rs"]
mod checks;

fuzz_target!(|data: &[u8]| checks::convert(data));
