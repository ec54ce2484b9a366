//! The installer agent's report bodies and log lines. The body and its property: `homelab_fuzz::agent_report`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::agent_report(data));
