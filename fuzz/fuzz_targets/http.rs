//! The two HTTP readers of bytes from the network: the status listener's request line and
//! `--target-status`'s answer line. Any bytes give an answer or `None`, never a panic.
#![no_main]

use legate::{health, status};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(status::Request::Get(path, query)) = status::parse_request(data) {
        assert!(!path.contains(' ') && !query.contains(' '));
    }
    if let Some(code) = health::status_code(data) {
        assert!((100..1000).contains(&code));
    }
});
