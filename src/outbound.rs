//! Outbound: the end a stream leaves on.
//!
//! Server side: the **service**, for the stream's route: dialled within the connect timeout,
//! with a PROXY v2 header first when asked. Client side: the **peer**, a [`Carrier`] from the
//! [`PeerPool`]: a stream on a multiplexed `legate/1` connection (OPEN and the consumer's first
//! bytes sent at once, then READY or REFUSED awaited), or a TLS connection of its own.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::carrier::Carrier;
use crate::config::TunnelConfig;
use crate::dial;
use crate::inbound::ConnInfo;
use crate::log::Record;
use crate::mux::{self, Answer, Open, RefuseCode};
use crate::net::Stream;
use crate::outcome::{Failure, Outcome, fail};
use crate::peer_pool::{Dialed, PeerPool, Peers};
use crate::proxy_protocol;
use crate::redis::{self, Refusal};
use crate::relay;
use crate::tls::ClientStream;
use crate::upstream::{InUse, Set};

/// Server side: connects to the service behind `set` (the route's endpoints), and sends it the
/// PROXY header when configured. A failed connect tries the next endpoint; each attempt has its
/// own deadline inside `--connect-timeout` (half of what is left while others remain, so one
/// that never answers cannot spend it all). `rec.target` names the endpoint used (or last
/// tried). A failure carries the code to refuse the stream with.
pub async fn service(
    cfg: &TunnelConfig,
    set: Option<&Set>,
    rec: &mut Record,
    info: &ConnInfo,
) -> Result<(Stream, InUse), (RefuseCode, Failure)> {
    let Some(set) = set else {
        let detail = match rec.route.as_deref() {
            None | Some("") => {
                "no default target: this server only serves named routes".to_string()
            }
            Some(route) => format!("unknown route {route:?}"),
        };
        return Err((
            RefuseCode::UnknownRoute,
            fail(Outcome::UnknownRoute, detail),
        ));
    };
    let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
    set.ready(deadline).await;
    let mut tried = Vec::new();
    let mut errors = Vec::new();
    let mut not_master = false;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let next = set.pick(&tried).filter(|_| !left.is_zero());
        if next.is_none() && tried.is_empty() && set.is_empty() {
            let detail = no_endpoint(set);
            return Err((RefuseCode::NoEndpoint, fail(Outcome::NoEndpoint, detail)));
        }
        let Some(endpoint) = next else {
            if not_master && set.gated() {
                // A refusal the client ambassador takes to its next server.
                errors.push("no endpoint is a Redis master now".into());
                let detail = errors.join("; ");
                return Err((RefuseCode::NotMaster, fail(Outcome::NotMaster, detail)));
            }
            if errors.is_empty() {
                errors.push(format!("no time left within {:?}", cfg.connect_timeout));
            }
            let detail = errors.join("; ");
            return Err((RefuseCode::DialFailed, fail(Outcome::DialFailed, detail)));
        };
        tried.push(endpoint.id);
        let others = tried.len() < set.len();
        let budget = if others { left / 2 } else { left };
        rec.target = Some(endpoint.spec.addr.to_string());
        let mut plain = match dial::dial(&endpoint.spec.addr, budget).await {
            Ok(plain) => {
                endpoint.succeeded();
                plain
            }
            Err(e) => {
                endpoint.failed(&e.to_string());
                errors.push(e.to_string());
                continue;
            }
        };
        plain.tune(None);
        if cfg.proxy_protocol {
            let header = proxy_protocol::Header {
                source: rec.consumer.or(rec.peer.socket_addr()),
                destination: info.destination,
                tls_version: info.tls_version.clone(),
                common_name: rec
                    .identity
                    .as_ref()
                    .and_then(|id| id.common_names.first().cloned()),
                identity: rec.identity.as_ref().map(ToString::to_string),
            };
            if let Err(e) = plain.write_all(&header.encode()).await {
                let detail = format!("sending the PROXY header to the target failed: {e}");
                return Err((RefuseCode::DialFailed, fail(Outcome::DialFailed, detail)));
            }
        }
        let Some(settings) = set.redis.as_deref() else {
            return Ok((plain, endpoint.begin()));
        };
        // Taken before the check: a demotion after it still closes this session.
        let in_use = endpoint.begin_session();
        if !settings.prepares() {
            return Ok((plain, in_use));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match redis::prepare(&mut plain, settings, left).await {
            Ok(()) => {
                if set.gated() && !endpoint.eligible() {
                    // Master before the checks knew: let them catch up now.
                    set.recheck();
                }
                return Ok((plain, in_use));
            }
            Err(Refusal::Auth(why)) => {
                // The consumer reads this as a RESP error (tunnel::serve_stream).
                return Err((RefuseCode::DialFailed, fail(Outcome::AuthFailed, why)));
            }
            Err(Refusal::NotMaster(why)) => {
                endpoint.not_master(&why);
                set.recheck();
                not_master = true;
                errors.push(format!("{}: {why}", endpoint.spec.addr));
            }
            Err(Refusal::Failed(why)) => {
                endpoint.failed(&why);
                errors.push(format!("{}: {why}", endpoint.spec.addr));
            }
        }
    }
}

/// Why a set has no endpoint: its sources' errors, if any.
fn no_endpoint(set: &Set) -> String {
    let errors: Vec<String> = set
        .sources()
        .iter()
        .filter_map(|s| {
            let v = s.view();
            v.error.map(|e| format!("{}: {e}", v.source))
        })
        .collect();
    if errors.is_empty() {
        "no endpoint: discovery has found none yet".into()
    } else {
        format!("no endpoint: {}", errors.join("; "))
    }
}

/// The most consumer bytes sent ahead of READY, kept to send again if the stream must be
/// opened elsewhere. Below the stream window, so early bytes never wait for credit.
const MAX_EARLY: usize = 64 * 1024;

/// Client side: the consumer's bytes already sent toward the peer before the carrier was
/// settled.
#[derive(Default)]
pub struct Early {
    bytes: Vec<u8>,
    /// The consumer ended its side before then (its END went too).
    pub done: bool,
}

impl Early {
    pub fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// Client side: a carrier for one consumer connection, ready to relay, and the server
/// ambassador it goes to (counted open while the guard lives). The balancer picks the
/// ambassador; one that cannot be reached, or refuses the stream without having done anything
/// with it (`dial_failed`, `unavailable`, `draining`, `no_endpoint`, `not_master`), is passed
/// over for the next with the same early bytes, so the consumer notices nothing.
pub async fn peer(
    peers: &Peers,
    cfg: &TunnelConfig,
    consumer: &mut Stream,
    rec: &mut Record,
    early: &mut Early,
) -> Result<(Carrier<ClientStream>, InUse), Failure> {
    peers
        .set
        .ready(tokio::time::Instant::now() + cfg.connect_timeout)
        .await;
    let mut tried = Vec::new();
    let mut last = None;
    if peers.set.is_empty() {
        return Err(fail(Outcome::NoEndpoint, no_endpoint(&peers.set)));
    }
    while let Some(endpoint) = peers.set.pick(&tried) {
        tried.push(endpoint.id);
        rec.target = Some(endpoint.spec.addr.to_string());
        // Removed by a reload since it was picked: pick again.
        let Some(pool) = peers.pool_for(&endpoint) else {
            continue;
        };
        match on_pool(&pool, cfg, consumer, rec, early).await {
            Ok(carrier) => return Ok((carrier, endpoint.begin())),
            Err(Settled::Elsewhere(f)) => {
                if tried.len() < peers.set.len() {
                    tracing::debug!(tunnel = %cfg.name, endpoint = %endpoint.spec.addr, error = %f.detail, "trying the next server");
                }
                last = Some(f);
            }
            Err(Settled::Final(f)) => return Err(f),
            Err(Settled::Retry(why)) => return Err(fail(Outcome::ProtocolError, why)),
        }
    }
    Err(last.unwrap_or_else(|| fail(Outcome::DialFailed, "no server to connect to")))
}

/// [`peer`] on one server ambassador's pool. A stream the server did nothing with (its
/// connection died before READY, or was draining) is opened again on another connection with
/// the same early bytes, so nothing is lost or repeated (docs/protocol.md has the one window
/// left).
async fn on_pool(
    pool: &Arc<PeerPool>,
    cfg: &TunnelConfig,
    consumer: &mut Stream,
    rec: &mut Record,
    early: &mut Early,
) -> Result<Carrier<ClientStream>, Settled> {
    let open = Open {
        route: cfg.route.clone(),
        consumer: rec.peer.socket_addr(),
    };
    let endpoint = pool.endpoint();
    let mut tries = 0;
    loop {
        let dialed = match pool.connection().await {
            Ok(d) => {
                endpoint.succeeded();
                d
            }
            Err(f) => {
                if matches!(f.outcome, Outcome::DialFailed | Outcome::HandshakeFailed) {
                    endpoint.failed(&f.detail);
                }
                return Err(Settled::Elsewhere(f));
            }
        };
        match dialed {
            Dialed::Raw {
                mut tls,
                session,
                identity,
            } => {
                rec.session = Some(session);
                rec.identity = Some(identity);
                if !cfg.route.is_empty() {
                    let _ = tls.shutdown().await;
                    return Err(Settled::Final(fail(
                        Outcome::ProtocolError,
                        format!(
                            "the server did not take legate/1, which --route {:?} needs",
                            cfg.route
                        ),
                    )));
                }
                if !early.is_empty() {
                    // Bytes a failed stream had taken from the consumer.
                    let sent = async {
                        tls.write_all(&early.bytes).await?;
                        tls.flush().await
                    };
                    sent.await.map_err(|e| {
                        Settled::Final(fail(
                            Outcome::DialFailed,
                            format!("server connection failed: {e}"),
                        ))
                    })?;
                }
                return Ok(Carrier::Raw(tls));
            }
            Dialed::Mux(c) => {
                rec.session = Some(c.session.clone());
                rec.identity = c.identity.clone();
                rec.route = Some(cfg.route.clone());
                let mut stream = c.conn.open(&open, &early.bytes, early.done);
                if !c.kept {
                    // --pool-size=0: this connection carries this stream only.
                    c.conn.drain();
                }
                match Box::pin(answer(cfg, &mut stream, consumer, early)).await {
                    Ok(()) => return Ok(Carrier::Stream(stream)),
                    Err(Settled::Retry(why)) if tries < 3 => {
                        tries += 1;
                        tracing::debug!(tunnel = %cfg.name, error = %why, "stream was not taken; opening it on a fresh connection");
                    }
                    Err(other) => return Err(other),
                }
            }
        }
    }
}

/// How a stream that did not get READY ended.
enum Settled {
    /// Refused, or failed in a way another connection would not mend.
    Final(Failure),
    /// Nothing was done with it: open it again on another connection to the same server.
    Retry(String),
    /// This server cannot take it (unreachable, or refused it with nothing done): try another
    /// server ambassador, if there is one.
    Elsewhere(Failure),
}

/// Waits for the answer to OPEN, meanwhile sending the consumer's bytes behind it (kept to send
/// again if the stream must be opened elsewhere).
async fn answer(
    cfg: &TunnelConfig,
    stream: &mut mux::Stream,
    consumer: &mut Stream,
    early: &mut Early,
) -> Result<(), Settled> {
    // The server spends up to its own connect timeout dialling the service before it answers
    // (dial_failed); wait longer than that, so a slow dial is reported as what it is.
    let wait = cfg.connect_timeout * 2;
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = relay::SpareBuf::take();
    let refused = |detail: String| Settled::Final(fail(Outcome::Refused, detail));
    loop {
        let room = !early.done && early.bytes.len() < MAX_EARLY;
        let left = MAX_EARLY - early.bytes.len();
        tokio::select! {
            answer = tokio::time::timeout_at(deadline, stream.answer()) => {
                return match answer {
                    Ok(Answer::Ready) => Ok(()),
                    Ok(Answer::Refused(code, message)) => {
                        let why = format!("server refused route {:?}: {code}: {message}", cfg.route);
                        match code {
                            // Nothing reached the service: another server may do better.
                            RefuseCode::DialFailed
                            | RefuseCode::Unavailable
                            | RefuseCode::Draining
                            | RefuseCode::NoEndpoint
                            | RefuseCode::NotMaster => {
                                Err(Settled::Elsewhere(fail(Outcome::Refused, why)))
                            }
                            _ => Err(refused(why)),
                        }
                    }
                    Ok(Answer::Gone { why, retry: true }) => Err(Settled::Retry(why)),
                    Ok(Answer::Gone { why, retry: false }) => {
                        Err(Settled::Final(fail(Outcome::ProtocolError, why)))
                    }
                    Err(_) => Err(Settled::Final(fail(
                        Outcome::ProtocolError,
                        format!("no answer to OPEN within {wait:?}"),
                    ))),
                };
            }
            n = consumer.read(&mut buf[..left.min(relay::BUF_SIZE)]), if room => {
                let n = n.unwrap_or(0);
                if n == 0 {
                    early.done = true;
                } else {
                    early.bytes.extend_from_slice(&buf[..n]);
                }
                stream.send_early(&buf[..n]);
            }
        }
    }
}
