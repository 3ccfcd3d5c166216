//! Outcome: how a connection (or stream) ended, which is both its log field and its metric
//! label, and the [`Failure`] a stage returns to say so.

use std::fmt;

/// How a connection ended: the log field and the metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The client closed after the handshake without asking for anything (a status probe).
    Idle,
    HandshakeFailed,
    Unauthorized,
    ProtocolError,
    UnknownRoute,
    DialFailed,
    Refused,
    /// The relay ended on an I/O error that is not how peers close: a keepalive or
    /// retransmission timeout (the link died), or TLS records that do not decrypt.
    Aborted,
    /// Closed at `--max-conn-lifetime` (ghostunnel's `conn.timeout`).
    Expired,
    /// The route had no endpoint to connect to (discovery found none).
    NoEndpoint,
    /// Redis refused the ambassador's credentials (the consumer got a RESP error).
    AuthFailed,
    /// A Redis route that requires a master had none, or its Redis stopped being master
    /// while the stream was open.
    NotMaster,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Outcome; 13] = [
        Outcome::Ok,
        Outcome::Idle,
        Outcome::HandshakeFailed,
        Outcome::Unauthorized,
        Outcome::ProtocolError,
        Outcome::UnknownRoute,
        Outcome::DialFailed,
        Outcome::Refused,
        Outcome::Aborted,
        Outcome::Expired,
        Outcome::NoEndpoint,
        Outcome::AuthFailed,
        Outcome::NotMaster,
    ];

    pub fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|o| *o == self)
            .expect("ALL lists every outcome")
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Idle => "idle",
            Outcome::HandshakeFailed => "handshake_failed",
            Outcome::Unauthorized => "unauthorized",
            Outcome::ProtocolError => "protocol_error",
            Outcome::UnknownRoute => "unknown_route",
            Outcome::DialFailed => "dial_failed",
            Outcome::Refused => "refused",
            Outcome::Aborted => "aborted",
            Outcome::Expired => "expired",
            Outcome::NoEndpoint => "no_endpoint",
            Outcome::AuthFailed => "auth_failed",
            Outcome::NotMaster => "not_master",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stage that failed: the outcome and what to say about it.
pub struct Failure {
    pub outcome: Outcome,
    pub detail: String,
}

pub fn fail(outcome: Outcome, detail: impl fmt::Display) -> Failure {
    Failure {
        outcome,
        detail: detail.to_string(),
    }
}
