//! TLS records from a peer after the handshake: whatever it seals (any content type, any
//! payload: alerts, handshake messages split or joined, key updates) or writes raw, the
//! receiving side reads plaintext, EOF or an error, and never panics or hangs. Each input runs
//! over a fresh handshaken pair on a UNIX socket pair.
//!
//! Input: a sequence of ops. `0 T L payload[L]`: a record of content type T sealed under the
//! connection's keys; `1 L bytes[L]`: bytes written raw; any other first byte ends the ops,
//! and the rest is written raw.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use legate::tls::record::testing;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // A write to a closed socket must be an error here, as in legate's own binary (Rust's
        // runtime ignores SIGPIPE there; libFuzzer's main does not).
        // SAFETY: setting a signal's disposition to ignore, once, before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

async fn feed(mut data: &[u8]) {
    let (client, server) = testing::tls13_configs();
    let (mut ours, mut peer) = testing::pair(client, server).await.unwrap();
    let writer = async move {
        loop {
            match data {
                [0, typ, len, rest @ ..] => {
                    let (payload, rest) = rest.split_at((*len as usize).min(rest.len()));
                    if testing::send_record(&mut peer, *typ, payload).await.is_err() {
                        return;
                    }
                    data = rest;
                }
                [1, len, rest @ ..] => {
                    let (bytes, rest) = rest.split_at((*len as usize).min(rest.len()));
                    if testing::send_raw(&mut peer, bytes).await.is_err() {
                        return;
                    }
                    data = rest;
                }
                rest => {
                    let _ = testing::send_raw(&mut peer, rest).await;
                    let _ = peer.shutdown().await;
                    return;
                }
            }
        }
    };
    let reader = async move {
        let mut sink = Vec::new();
        let _ = ours.read_to_end(&mut sink).await;
        // A key update the peer asked for is answered before this.
        let _ = ours.write_all(b"after").await;
        let _ = ours.shutdown().await;
        // Closed here: a peer still writing after an error gets EPIPE rather than a full
        // socket nobody reads.
        drop(ours);
    };
    let both = async { tokio::join!(writer, reader) };
    let ended = tokio::time::timeout(Duration::from_secs(5), both).await;
    assert!(ended.is_ok(), "the reading side did not end after the peer closed");
}

fuzz_target!(|data: &[u8]| {
    let _ = legate::tls::record::record_header(data);
    let _ = legate::tls::record::handshake_message(data);
    runtime().block_on(feed(data));
});
