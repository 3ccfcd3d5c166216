//! The multiplexer tested where it lives: two connections joined by an in-memory pipe, or one
//! connection against a mock peer that writes and reads frames by hand.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

use super::frame::{self, Frame, Hello};
use super::*;
use crate::relay::End;

const PIPE: usize = 64 * 1024;
const LONG: Duration = Duration::from_secs(10);

fn hello_bytes() -> Vec<u8> {
    frame::hello(&Hello {
        version: frame::VERSION,
        features: 0,
        idle_secs: 60,
    })
}

fn open(route: &str) -> Open {
    Open {
        route: route.into(),
        consumer: None,
    }
}

/// Reads everything until EOF, then answers `echo:` and what it read, and closes.
async fn echo_service(mut s: DuplexStream) {
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    s.write_all(b"echo:").await.unwrap();
    s.write_all(&got).await.unwrap();
    s.shutdown().await.unwrap();
}

/// A server connection whose streams each relay to a fresh echo service, and a client
/// connection on the other end of the pipe. The server greets first, as on the wire.
async fn echo_pair() -> (Arc<Conn>, Arc<Conn>) {
    let (client_io, mut server_io) = duplex(PIPE);
    server_io.write_all(&hello_bytes()).await.unwrap();
    let server = Conn::start(Role::Server, server_io, &[], |incoming, open| {
        if let Err(e) = open {
            return incoming.refuse(RefuseCode::BadRequest, &e.to_string());
        }
        let mut s = incoming.accept();
        tokio::spawn(async move {
            let (near, far) = duplex(PIPE);
            tokio::spawn(echo_service(far));
            s.ready();
            s.relay(near, LONG, false, End::default()).await
        });
    });
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    (client, server)
}

/// A client connection and a mock server on the raw other end, which has greeted it.
async fn client_and_mock() -> (Arc<Conn>, MockReader) {
    let (client_io, mut mock) = duplex(4 * 1024 * 1024);
    mock.write_all(&hello_bytes()).await.unwrap();
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    let reader = MockReader {
        io: mock,
        buf: BytesMut::new(),
    };
    (client, reader)
}

/// Opens a stream to `route` with nothing behind it, and reads its OPEN at the mock: the
/// stream and its id.
async fn open_at_mock(client: &Arc<Conn>, reader: &mut MockReader, route: &str) -> (Stream, u32) {
    let s = client.open(&open(route), b"", false);
    match reader.next().await {
        Frame::Open(id, Ok(o)) if o.route == route => (s, id),
        other => panic!("expected OPEN, got {other:?}"),
    }
}

/// Reads frames off a mock peer's end, one at a time.
struct MockReader {
    io: DuplexStream,
    buf: BytesMut,
}

impl MockReader {
    async fn next(&mut self) -> Frame {
        loop {
            if let Some(f) = frame::decode(&mut self.buf).unwrap() {
                return f;
            }
            let n = self.io.read_buf(&mut self.buf).await.unwrap();
            assert!(n > 0, "the connection closed");
        }
    }

    /// The next frame, or `None` if none comes within `wait`.
    async fn next_within(&mut self, wait: Duration) -> Option<Frame> {
        tokio::time::timeout(wait, self.next()).await.ok()
    }
}

/// Opens a stream carrying `msg` and its END, and reads the whole reply.
async fn exchange(client: &Arc<Conn>, msg: &[u8]) -> Vec<u8> {
    let mut s = client.open(&open(""), msg, true);
    assert_eq!(s.answer().await, Answer::Ready);
    let (near, mut far) = duplex(PIPE);
    let relay = tokio::spawn(async move { s.relay(near, LONG, true, End::default()).await });
    let mut reply = Vec::new();
    far.read_to_end(&mut reply).await.unwrap();
    let totals = relay.await.unwrap();
    assert_eq!(totals.down, reply.len() as u64);
    assert!(totals.failed.is_none(), "{:?}", totals.failed);
    reply
}

#[tokio::test]
async fn interleaved_streams_each_get_their_own_reply() {
    let (client, _server) = echo_pair().await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let msg = format!("stream {i} ").repeat(1000 * (i % 4) + 1);
                let reply = exchange(&client, msg.as_bytes()).await;
                assert!(reply == [b"echo:", msg.as_bytes()].concat(), "stream {i}");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    // All ended cleanly: nothing left open on either side.
    assert_eq!(client.active(), 0);
}

#[tokio::test]
async fn half_close_each_way_keeps_the_other_direction_open() {
    let (client, _server) = echo_pair().await;
    let mut s = client.open(&open(""), b"", false);
    assert_eq!(s.answer().await, Answer::Ready);
    let (near, mut far) = duplex(PIPE);
    let relay = tokio::spawn(async move { s.relay(near, LONG, false, End::default()).await });
    // The consumer writes, then ends its side; the service answers only after that END, and
    // the answer still arrives, followed by the service's own END.
    far.write_all(b"question").await.unwrap();
    far.shutdown().await.unwrap();
    let mut reply = Vec::new();
    far.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"echo:question");
    let totals = relay.await.unwrap();
    assert_eq!((totals.up, totals.down, totals.cut), (8, 13, false));
}

#[tokio::test]
async fn the_sender_stops_at_the_window_and_goes_on_when_granted() {
    let (client, mut reader) = client_and_mock().await;
    let (mut s, id) = open_at_mock(&client, &mut reader, "r").await;
    reader
        .io
        .write_all(&frame::encode(frame::READY, id, &[]))
        .await
        .unwrap();
    assert_eq!(s.answer().await, Answer::Ready);
    let (near, mut far) = duplex(PIPE);
    tokio::spawn(async move { s.relay(near, LONG, false, End::default()).await });
    // The consumer has twice the window to send.
    tokio::spawn(async move {
        let _ = far.write_all(&vec![7u8; 2 * WINDOW as usize]).await;
        far
    });
    let mut got = 0usize;
    while got < WINDOW as usize {
        match reader.next().await {
            Frame::Data(i, body) if i == id => got += body.len(),
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    assert_eq!(got, WINDOW as usize, "sent past the window");
    // Nothing more until the peer grants more.
    let more = reader.next_within(Duration::from_millis(300)).await;
    assert!(more.is_none(), "sent {more:?} with no window left");
    reader
        .io
        .write_all(&frame::encode(frame::WINDOW, id, &1000u32.to_be_bytes()))
        .await
        .unwrap();
    let mut granted = 0;
    while granted < 1000 {
        match reader.next().await {
            Frame::Data(i, body) if i == id => granted += body.len(),
            other => panic!("expected DATA, got {other:?}"),
        }
    }
    assert_eq!(granted, 1000);
}

#[tokio::test]
async fn a_peer_that_sends_past_the_window_loses_the_connection() {
    let (client, mut reader) = client_and_mock().await;
    let (mut s, id) = open_at_mock(&client, &mut reader, "").await;
    let mut burst = frame::encode(frame::READY, id, &[]);
    let chunk = frame::encode(frame::DATA, id, &[1u8; 16 * 1024]);
    for _ in 0..(WINDOW as usize / (16 * 1024) + 1) {
        burst.extend_from_slice(&chunk);
    }
    // Nobody reads the stream's plain side, so no window comes back.
    reader.io.write_all(&burst).await.unwrap();
    assert_eq!(s.answer().await, Answer::Ready);
    tokio::time::timeout(LONG, client.ended()).await.unwrap();
    let why = client.dead().unwrap();
    assert!(why.contains("past its flow-control window"), "{why}");
}

#[tokio::test]
async fn a_reset_ends_both_directions_at_once() {
    let (client_io, mut server_io) = duplex(PIPE);
    server_io.write_all(&hello_bytes()).await.unwrap();
    let _server = Conn::start(Role::Server, server_io, &[], |incoming, _| {
        let s = incoming.accept();
        s.ready();
        drop(s); // neither END: a reset
    });
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    let mut s = client.open(&open(""), b"", false);
    assert_eq!(s.answer().await, Answer::Ready);
    let (near, mut far) = duplex(PIPE);
    // The close timeout is long: a reset must not wait for it.
    let totals = tokio::time::timeout(
        Duration::from_secs(5),
        s.relay(near, Duration::from_secs(3600), false, End::default()),
    )
    .await
    .expect("a reset ends the relay");
    assert!(!totals.cut);
    let mut rest = Vec::new();
    far.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    // The connection itself carries on.
    assert!(client.usable());
}

#[tokio::test]
async fn goaway_lets_open_streams_finish_and_turns_new_ones_away() {
    let (client, server) = echo_pair().await;
    let mut first = client.open(&open(""), b"", false);
    assert_eq!(first.answer().await, Answer::Ready);
    let (near, mut far) = duplex(PIPE);
    let relay = tokio::spawn(async move { first.relay(near, LONG, false, End::default()).await });
    far.write_all(b"in flight").await.unwrap();
    server.drain();
    // The client learns of GOAWAY and takes no new streams there...
    tokio::time::timeout(LONG, async {
        while client.usable() {
            client.changed().await;
        }
    })
    .await
    .unwrap();
    // ... and one that crossed it is refused as draining: safe to open elsewhere.
    let mut late = client.open(&open(""), b"x", true);
    assert!(matches!(
        late.answer().await,
        Answer::Gone { retry: true, .. }
    ));
    // The stream in flight still completes both ways.
    far.shutdown().await.unwrap();
    let mut reply = Vec::new();
    far.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"echo:in flight");
    assert!(relay.await.unwrap().failed.is_none());
    // Then the connection closes.
    tokio::time::timeout(LONG, server.closed()).await.unwrap();
    tokio::time::timeout(LONG, client.ended()).await.unwrap();
}

#[tokio::test]
async fn a_consumer_that_stops_reading_stalls_only_its_own_stream() {
    let (client_io, mut server_io) = duplex(PIPE);
    server_io.write_all(&hello_bytes()).await.unwrap();
    let _server = Conn::start(Role::Server, server_io, &[], |incoming, open| {
        let mut s = incoming.accept();
        tokio::spawn(async move {
            let (near, mut far) = duplex(PIPE);
            if open.is_ok_and(|o| o.route == "flood") {
                // Far more than a window, to a consumer that never reads.
                tokio::spawn(async move {
                    let _ = far.write_all(&vec![0u8; 4 * WINDOW as usize]).await;
                });
            } else {
                tokio::spawn(echo_service(far));
            }
            s.ready();
            s.relay(near, LONG, false, End::default()).await
        });
    });
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    let mut flood = client.open(&open("flood"), b"", false);
    assert_eq!(flood.answer().await, Answer::Ready);
    let (near, _never_read) = duplex(1024);
    tokio::spawn(async move { flood.relay(near, LONG, false, End::default()).await });
    // The flooded stream holds at most its window; the others go on.
    for i in 0..5 {
        let msg = format!("still moving {i}");
        let reply = tokio::time::timeout(LONG, exchange(&client, msg.as_bytes()))
            .await
            .expect("another stream was held up by one that does not read");
        assert_eq!(reply, [b"echo:", msg.as_bytes()].concat());
    }
    assert!(client.dead().is_none());
}

#[tokio::test]
async fn a_client_reads_hello_first_and_a_server_that_closes_before_it_did_not_admit_us() {
    // A frame before HELLO breaks the protocol.
    let (client_io, mut mock) = duplex(PIPE);
    mock.write_all(&frame::encode(frame::READY, 1, &[]))
        .await
        .unwrap();
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    tokio::time::timeout(LONG, client.ended()).await.unwrap();
    assert!(client.dead().unwrap().contains("expected HELLO first"));

    // A server that closes without greeting: the stream is not to be tried elsewhere.
    let (client_io, mock) = duplex(PIPE);
    let client = Conn::start(Role::Client, client_io, &[], |_, _| {});
    let mut s = client.open(&open(""), b"early", true);
    drop(mock);
    match s.answer().await {
        Answer::Gone { why, retry } => {
            assert!(!retry);
            assert!(why.contains("did not admit this client"), "{why}");
        }
        other => panic!("expected Gone, got {other:?}"),
    }
    assert!(client.greeted().await.is_err());
}

#[tokio::test]
async fn ping_is_answered_and_a_bad_open_is_refused_alone() {
    let (client, _server) = echo_pair().await;
    client.greeted().await.unwrap();
    assert!(client.ping());
    // Until PONG comes, the PING is in flight; once answered, the next goes out anew.
    assert!(!client.ping());
    tokio::time::timeout(LONG, async {
        loop {
            if client.ping() {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("PING answered");

    // A malformed OPEN (an invalid route name) is refused; the connection carries on.
    let mut bad = client.open(&open("no/slashes"), b"", true);
    match bad.answer().await {
        Answer::Refused(RefuseCode::BadRequest, why) => {
            assert!(why.contains("invalid route name"), "{why}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(exchange(&client, b"after").await, b"echo:after");
}

#[tokio::test]
async fn a_stream_opened_on_a_dead_connection_learns_it_at_once() {
    let (client, reader) = client_and_mock().await;
    client.greeted().await.unwrap();
    drop(reader);
    tokio::time::timeout(LONG, client.ended()).await.unwrap();
    // Picked just before the connection died, opened just after: no waiting for an answer
    // that cannot come.
    let mut s = client.open(&open(""), b"late", true);
    let answer = tokio::time::timeout(Duration::from_secs(1), s.answer())
        .await
        .expect("an answer at once");
    assert!(
        matches!(answer, Answer::Gone { retry: true, .. }),
        "{answer:?}"
    );
}

#[tokio::test]
async fn data_after_end_breaks_the_protocol() {
    let (client, mut reader) = client_and_mock().await;
    let (mut s, id) = open_at_mock(&client, &mut reader, "").await;
    let mut frames = frame::encode(frame::READY, id, &[]);
    frames.extend_from_slice(&frame::encode(frame::END, id, &[]));
    frames.extend_from_slice(&frame::encode(frame::DATA, id, b"late"));
    reader.io.write_all(&frames).await.unwrap();
    assert_eq!(s.answer().await, Answer::Ready);
    tokio::time::timeout(LONG, client.ended()).await.unwrap();
    let why = client.dead().unwrap();
    assert!(why.contains("after its END"), "{why}");
}

#[tokio::test]
async fn anything_read_after_a_ping_proves_the_connection_live() {
    let (client, mut reader) = client_and_mock().await;
    client.greeted().await.unwrap();
    assert!(client.ping());
    assert!(matches!(reader.next().await, Frame::Ping(_)));
    // No PONG comes: the silence grows...
    let silent = Duration::from_millis(200);
    tokio::time::timeout(LONG, async {
        while client.silent_for().unwrap() < silent {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    // ... until other bytes arrive (a GOAWAY here): the silence restarts from them.
    reader
        .io
        .write_all(&frame::encode(frame::GOAWAY, 0, &[]))
        .await
        .unwrap();
    tokio::time::timeout(LONG, async {
        while client.usable() {
            client.changed().await;
        }
    })
    .await
    .unwrap();
    let after = client.silent_for().unwrap();
    assert!(
        after < silent,
        "still {after:?} of silence after the peer spoke"
    );
}
