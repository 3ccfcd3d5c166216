//! The reply to AUTH from Redis: any bytes give a status, "incomplete", or a one-line
//! error, never a panic.
#![no_main]

use legate::redis;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match redis::parse_status(data) {
        Ok(Some((_, used))) => assert!(used >= 3 && used <= data.len()),
        Ok(None) => assert!(data.len() <= redis::MAX_REPLY),
        Err(e) => assert!(!e.is_empty() && !e.contains('\n')),
    }
});
