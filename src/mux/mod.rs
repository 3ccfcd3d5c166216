//! Mux: `legate/1`, the protocol between two legate ambassadors (docs/protocol.md).
//!
//! [`frame`] is the codec, [`conn`] one multiplexed connection (its reader, dispatch and
//! batching writer), [`stream`] one stream on it. A connection starts with the server's HELLO
//! and then carries any number of streams, each opened by the client with OPEN.

pub mod conn;
pub mod frame;
pub mod stream;

pub use conn::{Conn, DRAINING, Incoming, Role, WINDOW};
pub use frame::{Hello, Open, RefuseCode};
pub use stream::{Answer, Stream};

#[cfg(test)]
mod tests;
