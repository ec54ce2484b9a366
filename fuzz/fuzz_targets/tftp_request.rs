//! The TFTP request parser must never panic, and whatever it accepts must be
//! a read or write request with a non-empty file name.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = homelab::netboot::tftp::parse_request(data) {
        assert!(!req.filename.is_empty());
        assert!(req.mode == "octet" || req.mode == "netascii");
        let _ = homelab::netboot::tftp::allowed_name(std::path::Path::new(&req.filename));
    }
});
