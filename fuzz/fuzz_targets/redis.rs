//! Bytes from Redis, a Sentinel or a consumer: RESP values parse, wait for more, or give a
//! one-line error, never a panic or more than the bound; what legate reads out of them (a role,
//! INFO's fields, a Sentinel's master and +switch-master) never panics; the consumer's leading commands
//! (`consumer_auth = "local"`) are rewritten without losing a byte that is not theirs.
#![no_main]

use legate::redis::{self as redis, leading::Leading, resp};
use legate::upstream::discovery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match resp::parse(data, 4096) {
        Ok(Some((v, used))) => {
            assert!(used >= 3 && used <= data.len().min(4096));
            // What is read out of replies from Redis and Sentinels: never a panic.
            let _ = redis::parse_role(&v);
            let _ = v.field("role");
            let _ = discovery::master_addr(&v);
            let _ = discovery::switch_master(&v, "cache");
            if let resp::Value::Bulk(text) = &v {
                let _ = redis::parse_info(text);
            }
        }
        Ok(None) => assert!(data.len() <= 4096),
        Err(e) => assert!(!e.0.is_empty() && !e.0.contains('\n')),
    }
    // Fed in two pieces split at the first byte's value: the same output as whole.
    let cut = data.first().map_or(0, |b| *b as usize).min(data.len());
    let (mut whole, mut split) = (Leading::default(), Leading::default());
    let (mut a, mut b) = (Vec::new(), Vec::new());
    whole.consumer(data, &mut a);
    whole.end(&mut a);
    split.consumer(&data[..cut], &mut b);
    split.consumer(&data[cut..], &mut b);
    split.end(&mut b);
    assert_eq!(a, b);
    assert_eq!(whole.slots, split.slots);
    // What goes on to Redis is the input, less what was answered or stripped here (HELLO's
    // AUTH part; a command is re-encoded in its shortest form): never more.
    assert!(a.len() <= data.len());
    if data.first() != Some(&b'*') {
        // Not a command array: nothing looked into, every byte went on, in order.
        assert_eq!(a, data);
    }
});
