//! Inventory text through the parser and its diagnostics. The body and its property: `homelab_fuzz::inventory`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::inventory(data));
