//! The TFTP request parser must never panic; whatever it accepts must encode
//! back to bytes that parse to the same request; and no accepted file name
//! other than the exact names of the iPXE binaries may be served.
#![no_main]

use std::path::Path;

use homelab::netboot::tftp::{allowed_name, parse_request, SERVED};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        assert_eq!(parse_request(&req.encode()), Ok(req.clone()));
        let _ = (req.blksize(), req.tsize(), req.to_string());
        match allowed_name(Path::new(&req.filename)) {
            Some(name) => assert!(SERVED.contains(&name) && name == req.filename),
            None => assert!(!SERVED.contains(&req.filename.as_str())),
        }
    }
});
