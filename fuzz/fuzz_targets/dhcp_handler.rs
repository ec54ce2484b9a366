//! DHCP packets through the decoder and the pure handler. The body and its property: `homelab_fuzz::dhcp_handler`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::dhcp_handler(data));
