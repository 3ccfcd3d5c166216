//! `legate check`: a tunnel diagnosed step by step, each step with a verdict and, when it
//! fails, what to do. The steps are the ones a connection takes. On a client side: the
//! certificates, each discovery source looked up once, then for each server ambassador its
//! name, the TCP connect, the TLS handshake (and the identity the `--verify-*` rules pin), the
//! `legate/1` greeting and the route, and with `--redis` the service behind it answering PING.
//! On a server side: the certificates, then each target and route's endpoints connected, with
//! the Redis exchange its route asks for (credentials, role), and with `--redis` a PING.
//!
//! In: a validated [`TunnelConfig`]. Out: the [`Step`]s, printed as text or JSON by the
//! binary, whose exit code is the worst verdict's.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Side, TunnelConfig};
use crate::mux::{self, Answer, Open, RefuseCode};
use crate::net::Address;
use crate::tls::{self, ClientTls};

/// How a step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Verdict {
    Ok,
    /// Not run: an earlier step failed, or it does not apply.
    Skipped,
    Warn,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Skipped => "skipped",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }

    /// The exit code for a run whose worst step is this.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Ok | Verdict::Skipped => 0,
            Verdict::Warn => 1,
            Verdict::Fail => 2,
        }
    }
}

/// One step's result.
#[derive(Debug, Clone)]
pub struct Step {
    pub step: String,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a failure or warning.
    pub hint: Option<String>,
}

fn step(name: impl Into<String>, verdict: Verdict, detail: impl Into<String>) -> Step {
    Step {
        step: name.into(),
        verdict,
        detail: detail.into(),
        hint: None,
    }
}

impl Step {
    fn hint(mut self, hint: impl Into<String>) -> Step {
        self.hint = Some(hint.into());
        self
    }
}

/// Checks `cfg`; `redis`: also PING the service (through the tunnel, on a client side).
pub async fn run(cfg: &TunnelConfig, redis: bool) -> Vec<Step> {
    let mut out = Vec::new();
    out.push(step("config", Verdict::Ok, "valid"));
    if cfg.side == Side::Server {
        server(cfg, redis, &mut out).await;
        return out;
    }
    let client = match ClientTls::new(&cfg.tls, cfg.tls_versions, &cfg.verify, cfg.legate_protocol)
    {
        Ok(c) => c,
        Err(e) => {
            out.push(
                step("certificates", Verdict::Fail, e.to_string())
                    .hint("fix the file named; `legate gen-certs` makes a matching set"),
            );
            return out;
        }
    };
    out.push(certificate_age(client.not_after()));
    out.extend(own_chain(cfg, true));
    let Some(target) = &cfg.target else {
        return out;
    };
    let mut endpoints = target.endpoints.clone();
    endpoints.extend(discovered(&target.sources, &mut out).await);
    for e in &endpoints {
        let name = cfg.server_name_of(e);
        endpoint(cfg, &client, &e.addr, &name, redis, &mut out).await;
    }
    out
}

/// Each discovery source looked up once: a step each, and the endpoints found.
async fn discovered(
    sources: &[crate::config::Source],
    out: &mut Vec<Step>,
) -> Vec<crate::config::EndpointSpec> {
    let mut found = Vec::new();
    for source in sources {
        let name = format!("discovery {source}");
        match crate::upstream::discovery::look_once(source).await {
            None => out.push(step(
                name,
                Verdict::Skipped,
                "followed while running; /_status lists what it finds",
            )),
            Some(Ok(e)) if e.is_empty() => out.push(
                step(name, Verdict::Warn, "no endpoints now")
                    .hint("nothing answers this name yet; the route has no endpoint from it"),
            ),
            Some(Ok(e)) => {
                let list: Vec<String> = e.iter().map(ToString::to_string).collect();
                out.push(step(name, Verdict::Ok, list.join(" ")));
                found.extend(e);
            }
            Some(Err(e)) => out.push(
                step(name, Verdict::Fail, e)
                    .hint("check the name (and --nameserver), or the file it names"),
            ),
        }
    }
    found
}

/// A server side: its certificate, and each target (and route) reached as a connection would
/// reach it, with the Redis exchange its route asks for and, with `redis`, a PING.
async fn server(cfg: &TunnelConfig, redis: bool, out: &mut Vec<Step>) {
    match tls::ServerTls::new(&cfg.tls, cfg.tls_versions) {
        Ok(s) => {
            out.push(certificate_age(s.not_after()));
            out.extend(own_chain(cfg, false));
        }
        Err(e) => {
            out.push(
                step("certificates", Verdict::Fail, e.to_string())
                    .hint("fix the file named; `legate gen-certs` makes a matching set"),
            );
            return;
        }
    }
    let timeout = cfg.connect_timeout.min(Duration::from_secs(10));
    let routes = cfg
        .target
        .iter()
        .map(|u| (String::new(), u))
        .chain(cfg.routes.iter().map(|(n, u)| (n.clone(), u)));
    for (route, u) in routes {
        let mut endpoints = u.endpoints.clone();
        endpoints.extend(discovered(&u.sources, out).await);
        for e in endpoints {
            let what = if route.is_empty() {
                format!("target {}", e.addr)
            } else {
                format!("route {route:?}: {}", e.addr)
            };
            out.push(service(&e.addr, u.redis.as_ref(), redis, timeout, what).await);
        }
    }
}

/// One service endpoint of a server side: connected, readied as its route asks, and with
/// `redis` PINGed.
async fn service(
    addr: &Address,
    settings: Option<&crate::redis::Settings>,
    redis: bool,
    timeout: Duration,
    what: String,
) -> Step {
    let mut s = match crate::dial::dial(addr, timeout).await {
        Ok(s) => s,
        Err(err) => {
            return step(what, Verdict::Fail, err.to_string()).hint(
                "is the service running there? a target off this host needs --unsafe-target",
            );
        }
    };
    if let Some(settings) = settings.filter(|s| s.prepares())
        && let Err(r) = crate::redis::prepare(&mut s, settings, timeout).await
    {
        use crate::redis::Refusal;
        let (detail, hint) = match r {
            Refusal::Auth(e) => (
                e,
                "Redis refused the credentials: check --redis-password-file / --redis-user",
            ),
            Refusal::NotMaster(e) => (e, "not master now: require_role sends it nothing"),
            Refusal::Failed(e) => (e, "is it Redis?"),
        };
        return step(what, Verdict::Fail, detail).hint(hint);
    }
    if !redis {
        return step(what, Verdict::Ok, "connected");
    }
    let reply = async {
        s.write_all(PING).await.ok()?;
        read_line(&mut s).await
    };
    let reply = tokio::time::timeout(timeout, reply).await.ok().flatten();
    let mut st = ping_verdict(addr, reply);
    st.step = what;
    st
}

/// The own certificate's names and whether the CA bundle this side trusts vouches for it: a
/// warning when not, since peers that trust another CA may still accept it.
fn own_chain(cfg: &TunnelConfig, as_client: bool) -> Option<Step> {
    Some(match tls::own_certificate(&cfg.tls, as_client)? {
        Ok(detail) => step("certificate chain", Verdict::Ok, detail),
        Err(detail) => step("certificate chain", Verdict::Warn, detail).hint(
            "peers trusting the same --cacert will refuse it; fine only if they trust the CA that issued it",
        ),
    })
}

/// The own certificate's expiry: failed when past, a warning within 14 days.
fn certificate_age(not_after: Option<i64>) -> Step {
    let Some(not_after) = not_after else {
        return step(
            "certificates",
            Verdict::Ok,
            "loaded (no client certificate)",
        );
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let days = (not_after - now) / 86_400;
    if not_after <= now {
        step(
            "certificates",
            Verdict::Fail,
            format!("this side's certificate expired {} day(s) ago", -days),
        )
        .hint("renew it (your CA, or `legate gen-certs`), then SIGHUP: legate reloads it")
    } else if days < 14 {
        step(
            "certificates",
            Verdict::Warn,
            format!("this side's certificate expires in {days} day(s)"),
        )
        .hint("renew it soon; a SIGHUP reloads it without dropping connections")
    } else {
        step(
            "certificates",
            Verdict::Ok,
            format!("loaded; this side's certificate is valid for {days} more day(s)"),
        )
    }
}

/// The steps for one server ambassador.
async fn endpoint(
    cfg: &TunnelConfig,
    client: &ClientTls,
    addr: &Address,
    name: &str,
    redis: bool,
    out: &mut Vec<Step>,
) {
    let timeout = cfg.connect_timeout.min(Duration::from_secs(10));
    if let Address::Tcp(hp) = addr {
        match tokio::net::lookup_host((hp.host.as_str(), hp.port)).await {
            Ok(found) => {
                let ips: Vec<String> = found.map(|a| a.ip().to_string()).collect();
                out.push(step(
                    format!("resolve {}", hp.host),
                    Verdict::Ok,
                    ips.join(" "),
                ));
            }
            Err(e) => {
                out.push(
                    step(format!("resolve {}", hp.host), Verdict::Fail, e.to_string())
                        .hint("check the name, or the DNS settings (/etc/resolv.conf)"),
                );
                return;
            }
        }
    }
    let tcp =
        match crate::dial::dial(addr, timeout).await {
            Ok(s) => {
                out.push(step(
                    format!("connect {addr}"),
                    Verdict::Ok,
                    "TCP connected",
                ));
                s
            }
            Err(e) => {
                out.push(step(format!("connect {addr}"), Verdict::Fail, e.to_string()).hint(
                "is the server ambassador running, listening there, and reachable (firewall)?",
            ));
                return;
            }
        };
    let server_name = match tls::server_name(name) {
        Ok(n) => n,
        Err(e) => {
            out.push(step(
                format!("TLS with {addr}"),
                Verdict::Fail,
                e.to_string(),
            ));
            return;
        }
    };
    let tls = match tokio::time::timeout(timeout, client.connect(tcp, server_name)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let why = tls::describe_handshake_error(&e);
            let hint = handshake_hint(&why, name);
            out.push(step(format!("TLS with {addr}"), Verdict::Fail, why).hint(hint));
            return;
        }
        Err(_) => {
            out.push(
                step(
                    format!("TLS with {addr}"),
                    Verdict::Fail,
                    format!("no handshake within {timeout:?}"),
                )
                .hint("is it a TLS server? a plaintext port or a middlebox answers nothing"),
            );
            return;
        }
    };
    let session = tls::describe_session(tls.get_ref().1);
    let peer = tls::peer_identity(tls.get_ref().1).map_or_else(|e| e, |id| id.to_string());
    out.push(step(
        format!("TLS with {addr}"),
        Verdict::Ok,
        format!("{session}; server {peer}, valid for {name:?}"),
    ));
    if tls::negotiated_legate(tls.get_ref().1) {
        route(cfg, tls, addr, redis, out).await;
    } else {
        out.push(step(
            format!("legate/1 with {addr}"),
            Verdict::Skipped,
            "the server does not speak legate/1: raw TLS, the default target",
        ));
        if !cfg.route.is_empty() {
            out.push(
                step(
                    format!("route {:?}", cfg.route),
                    Verdict::Fail,
                    "a route needs legate/1",
                )
                .hint("the server is not a legate, or an old one: drop --route"),
            );
            return;
        }
        // Straight to a Redis that speaks TLS: this side's credentials first, as a consumer's
        // connection would have them sent.
        let mut tls = tls;
        if let Some(settings) = cfg
            .target
            .as_ref()
            .and_then(|u| u.redis.as_ref())
            .filter(|s| s.prepares())
        {
            if let Err(r) = crate::redis::prepare(&mut tls, settings, timeout).await {
                let (crate::redis::Refusal::Auth(e)
                | crate::redis::Refusal::NotMaster(e)
                | crate::redis::Refusal::Failed(e)) = r;
                out.push(
                    step(format!("Redis credentials at {addr}"), Verdict::Fail, e)
                        .hint("Redis refused them: check --redis-password-file / --redis-user"),
                );
                return;
            }
            out.push(step(
                format!("Redis credentials at {addr}"),
                Verdict::Ok,
                "accepted",
            ));
        }
        if redis {
            out.push(ping(&mut tls, addr, timeout).await);
        }
    }
}

/// What to do about a failed handshake, from its description.
fn handshake_hint(why: &str, name: &str) -> String {
    let w = why.to_ascii_lowercase();
    if w.contains("unknownissuer") || w.contains("unknown issuer") || w.contains("unknown ca") {
        "the server's certificate is not from a CA in --cacert: give the CA that issued it".into()
    } else if w.contains("notvalidforname") || w.contains("not valid for name") {
        format!(
            "the server's certificate is not valid for {name:?}: use the name it carries (,name=NAME or --override-server-name)"
        )
    } else if w.contains("expired") {
        "a certificate has expired: renew it (the server's, or this side's)".into()
    } else if w.contains("certificate required") || w.contains("certificaterequired") {
        "the server wants a client certificate: give --cert and --key".into()
    } else if w.contains("pin") || w.contains("verify") {
        "the server's certificate does not pass the --verify-* rules".into()
    } else {
        "the server refused the handshake: its log says why (CA, allow rules, TLS versions)".into()
    }
}

/// The greeting, the route, and with `redis` a PING through the stream.
async fn route(
    cfg: &TunnelConfig,
    tls: tls::ClientStream,
    addr: &Address,
    redis: bool,
    out: &mut Vec<Step>,
) {
    let conn = mux::Conn::start(mux::Role::Client, tls, &[], |_, _| {});
    let open = Open {
        route: cfg.route.clone(),
        consumer: None,
    };
    let early: &[u8] = if redis { PING } else { b"" };
    let mut stream = conn.open(&open, early, false);
    let wait = cfg.connect_timeout * 2;
    let answer = tokio::time::timeout(wait, stream.answer()).await;
    let route_name = if cfg.route.is_empty() {
        "the default target".to_string()
    } else {
        format!("route {:?}", cfg.route)
    };
    out.push(step(
        format!("legate/1 with {addr}"),
        Verdict::Ok,
        "greeted",
    ));
    match answer {
        Ok(Answer::Ready) => {
            out.push(step(
                format!("{route_name} at {addr}"),
                Verdict::Ok,
                "the server connected it",
            ));
        }
        Ok(Answer::Refused(code, message)) => {
            out.push(
                step(
                    format!("{route_name} at {addr}"),
                    Verdict::Fail,
                    format!("refused: {code}: {message}"),
                )
                .hint(refusal_hint(code)),
            );
            conn.drain();
            return;
        }
        Ok(Answer::Gone { why, .. }) => {
            out.push(
                step(format!("{route_name} at {addr}"), Verdict::Fail, why).hint(
                    "the server closed the connection: is this client allowed (--allow-* on the server)?",
                ),
            );
            return;
        }
        Err(_) => {
            out.push(step(
                format!("{route_name} at {addr}"),
                Verdict::Fail,
                format!("no answer within {wait:?}"),
            ));
            return;
        }
    }
    if redis {
        // The PING went with the OPEN; its reply comes through the stream.
        let (mut near, far) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            stream
                .relay(
                    far,
                    Duration::from_secs(1),
                    false,
                    crate::relay::End::default(),
                )
                .await
        });
        let reply = tokio::time::timeout(Duration::from_secs(5), read_line(&mut near)).await;
        out.push(ping_verdict(addr, reply.ok().flatten()));
        drop(near);
        relay.abort();
    }
    conn.drain();
}

fn refusal_hint(code: RefuseCode) -> &'static str {
    match code {
        RefuseCode::UnknownRoute => {
            "the server has no such route: check --route against the server's routes"
        }
        RefuseCode::DialFailed => "the server cannot reach its target: check the service",
        RefuseCode::Forbidden => "this client is not allowed this route",
        RefuseCode::NoEndpoint => "the route's discovery has found no endpoint",
        RefuseCode::NotMaster => "no Redis behind that server is master now",
        RefuseCode::Unavailable => "the server is at --max-concurrent-conns",
        RefuseCode::Draining | RefuseCode::BadRequest => "try again; the server's log says more",
    }
}

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

async fn read_line<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Option<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n") && got.len() < 4096 {
        if r.read(&mut byte).await.ok()? == 0 {
            break;
        }
        got.push(byte[0]);
    }
    (!got.is_empty()).then(|| String::from_utf8_lossy(&got).trim_end().to_string())
}

/// PING straight over a raw TLS connection.
async fn ping(tls: &mut tls::ClientStream, addr: &Address, timeout: Duration) -> Step {
    if tls.write_all(PING).await.is_err() || tls.flush().await.is_err() {
        return ping_verdict(addr, None);
    }
    let reply = tokio::time::timeout(timeout, read_line(tls)).await;
    ping_verdict(addr, reply.ok().flatten())
}

fn ping_verdict(addr: &Address, reply: Option<String>) -> Step {
    let name = format!("Redis PING through {addr}");
    match reply.as_deref() {
        Some("+PONG") => step(name, Verdict::Ok, "PONG"),
        Some(r) if r.contains("upstream authentication failed") => {
            step(name, Verdict::Fail, r.trim_start_matches('-')).hint(
                "Redis refused the server ambassador's credentials: check its --redis-password-file / --redis-user",
            )
        }
        Some(r) if r.starts_with("-NOAUTH") => step(name, Verdict::Fail, r.trim_start_matches('-'))
            .hint("Redis wants a password: give the server ambassador --redis-password-file"),
        Some(r) => step(name, Verdict::Fail, format!("unexpected reply {r:?}"))
            .hint("is the service behind the tunnel Redis?"),
        None => step(name, Verdict::Fail, "no reply")
            .hint("the service closed the connection or did not answer: is it Redis?"),
    }
}
