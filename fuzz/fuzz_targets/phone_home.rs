//! Phone-home bodies (cloud-init's form, or anything small). The body and its property: `homelab_fuzz::phone_home`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| homelab_fuzz::phone_home(data));
