//! TFTP requests through the parser and the allow-list of served names. The body and its property: `homelab_fuzz::tftp_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::tftp_request(data));
