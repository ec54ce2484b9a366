//! HTTP request paths through the boot-script, file and node look-ups. The body and its property: `homelab_fuzz::http_path`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::http_path(data));
