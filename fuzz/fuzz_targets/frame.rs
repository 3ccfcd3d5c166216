//! `legate/1` from a peer: any bytes give frames or an error, never a panic or a hang. The
//! input runs through the codec alone, and then through a whole multiplexed connection (its
//! reader, dispatch, window accounting and writer), once as a server whose client sent the
//! bytes and once as a client whose server did.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use bytes::BytesMut;
use legate::mux::{Conn, RefuseCode, Role, frame};
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Feeds `data` to a connection of role `role` as what its peer sent, then closes, and waits
/// for the connection to end.
async fn feed(role: Role, data: &[u8]) {
    let (ours, mut peer) = tokio::io::duplex(1 << 20);
    let mut held = Vec::new();
    let conn = Conn::start(role, ours, &[], move |incoming, open| match open {
        Ok(_) => held.push(incoming.accept()),
        Err(e) => incoming.refuse(RefuseCode::BadRequest, &e.to_string()),
    });
    // Streams the client had opened, for the peer's frames to land on.
    let mut opened = Vec::new();
    if role == Role::Client {
        let open = frame::Open {
            route: String::new(),
            consumer: None,
        };
        for _ in 0..3 {
            opened.push(conn.open(&open, b"early", false));
        }
    }
    let _ = peer.write_all(data).await;
    let _ = peer.shutdown().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), conn.ended()).await;
    assert!(ended.is_ok(), "the connection did not end after the peer closed");
    drop(opened);
    // Let the connection's reader and writer tasks finish before the next input.
    for _ in 0..4 {
        tokio::task::yield_now().await;
    }
}

fuzz_target!(|data: &[u8]| {
    // The codec alone: each frame it returns takes bytes off the front, and it stops at the
    // first partial or bad one.
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match frame::decode(&mut buf) {
            Ok(Some(_)) => assert!(buf.len() < before),
            Ok(None) | Err(_) => break,
        }
    }
    runtime().block_on(async {
        feed(Role::Server, data).await;
        feed(Role::Client, data).await;
    });
});
