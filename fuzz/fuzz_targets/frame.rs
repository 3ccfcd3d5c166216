//! The `legate/1` frame parser: any bytes from a peer give a frame or an error, never a panic;
//! a frame that parses encodes back to the bytes it came from.
#![no_main]

use std::future::Future;
use std::task::{Context, Waker};

use legate::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As read off the wire: a 3-byte header, then the payload. A byte slice never makes a
    // read wait, so one poll finishes it.
    let mut wire = data;
    let read = std::pin::pin!(protocol::read_frame(&mut wire, "OPEN"));
    let mut cx = Context::from_waker(Waker::noop());
    assert!(read.poll(&mut cx).is_ready());
    // The decoder alone, for every frame type.
    if let Some((&kind, payload)) = data.split_first()
        && let Ok(frame) = protocol::decode(kind, payload)
    {
        let encoded = protocol::encode(&frame);
        let again = protocol::decode(encoded[0], &encoded[3..]).expect("re-decodes");
        assert_eq!(protocol::encode(&again), encoded);
    }
});
