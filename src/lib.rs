//! legate: mutual-TLS ambassadors for untrusted networks.
//!
//! An application connects to a legate **client** next to it as if the service were local;
//! the client carries the bytes over mutual TLS to a legate **server** next to the service,
//! which forwards them to the service:
//!
//! ```text
//! consumer ──plain──▶ legate client ══mTLS══▶ legate server ──plain──▶ service
//! ```
//!
//! Every connection goes through one pipeline ([`tunnel`]): accept, the inbound end (plain, or a
//! TLS handshake in the connection's own task, the `--allow-*` check and the `legate/1`
//! greeting), then for each stream: route, the outbound end (the service, dialled; or the peer
//! ambassador, as a stream on a kept multiplexed connection or a TLS connection of its own),
//! relay both ways with half-close, and one log line with the outcome.
//!
//! Glossary: *client side* and *server side* are the two ambassadors; the *peer* is the other
//! legate; the *consumer* is the application; the *service* or *target* is what the server side
//! forwards to; a *tunnel* is one listener with its settings; a *route* is a named target on a
//! server side, chosen by a `legate/1` client; a *carrier* is the TLS end of one stream (a raw
//! TLS connection, or a stream of a multiplexed one); a *kept* connection is a multiplexed
//! connection the client holds open for streams to come.

pub mod accept;
pub mod carrier;
pub mod certs;
pub mod check;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod dial;
pub mod health;
pub mod inbound;
pub mod log;
pub mod mdns;
pub mod metrics;
pub mod mux;
pub mod net;
pub mod notify;
pub mod outbound;
pub mod outcome;
pub mod peer_pool;
pub mod proxy_protocol;
pub mod redis;
pub mod relay;
pub mod spare;
pub mod status;
pub mod tls;
pub mod tunnel;
pub mod upstream;
