//! Configuration: the typed [`Config`] that flags and TOML files both become.
//!
//! In: a [`TunnelFile`] per tunnel (from `legate server|client` flags, or a `[tunnels.NAME]`
//! table of a TOML file). Out: a validated [`Config`] with resolved defaults, typed addresses
//! and durations, or every problem found, each prefixed with its tunnel's name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::mux::frame as protocol;
pub use crate::net::{Address, HostPort};
use crate::tls::{self, Rules, TlsVersions};

pub mod docker;
mod upstream;
pub use upstream::{
    Balance, DiscoverySettings, EndpointSpec, HealthCheck, MAX_WEIGHT, Protocol, RedisKeys, Source,
    Targets, Upstream,
};

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// ghostunnel's default, so dashboards built on its metric names keep working.
pub const DEFAULT_METRICS_PREFIX: &str = "ghostunnel";

/// Which end of the tunnel a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    /// Plain in from the consumer, mutual TLS out to the server side.
    Client,
    /// Mutual TLS in from the client side, plain out to the service.
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One tunnel as written: in a TOML table, or gathered from flags. Keys are the flag names with
/// `_` for `-`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelFile {
    pub side: Option<Side>,
    pub listen: Option<String>,
    /// One endpoint, or a list: `ADDRESS[,weight=N][,name=TLS-NAME]` each.
    pub target: Option<Targets>,
    /// Docker-link aliases: one tunnel per `ALIAS_PORT_<port>_TCP` variable, instead of
    /// `target` (`listen` then gives the host only).
    #[serde(default)]
    pub from_docker_env: Vec<String>,
    /// Server side: route name → target(s), for `legate/1` clients that name a route.
    #[serde(default)]
    pub routes: BTreeMap<String, Targets>,
    /// How new connections are spread over several endpoints (`p2c` or `round-robin`).
    pub balance: Option<Balance>,
    /// Server side: check service endpoints with a TCP connect this often (off by default).
    pub health_interval: Option<String>,
    pub health_timeout: Option<String>,
    pub health_rise: Option<u32>,
    pub health_fall: Option<u32>,
    /// `"redis"` (implied by any `redis_*` key or `require_role`) or `"tcp"`: for the default
    /// target, and every route table that does not say otherwise.
    pub protocol: Option<Protocol>,
    /// Server side: authenticate to Redis before relaying, with the password in this file
    /// (mode 0600) or this environment variable, as `redis_user` (an ACL user) if given.
    pub redis_password_file: Option<PathBuf>,
    pub redis_password_env: Option<String>,
    pub redis_user: Option<String>,
    /// Authenticate with `HELLO n AUTH` (n = 2 or 3) instead of `AUTH`.
    pub redis_hello: Option<u8>,
    /// The consumer's own leading AUTH: `pass` (relayed) or `local` (answered here).
    pub redis_consumer_auth: Option<crate::redis::ConsumerAuth>,
    /// Server side: `"master"`: streams reach Redis only while it is master (`not_master`).
    pub require_role: Option<String>,
    /// Client side: the route to ask the server for.
    pub route: Option<String>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// PKCS#12, or one PEM file with chain and key; instead of `cert` and `key`.
    pub keystore: Option<PathBuf>,
    /// The PKCS#12 password; `KEYSTORE_PASS` from the environment when unset.
    pub storepass: Option<String>,
    pub cacert: Option<PathBuf>,
    /// Certificate revocation list(s), PEM or DER; reloaded with the certificates.
    pub crl: Option<PathBuf>,
    #[serde(default)]
    pub allow_all: bool,
    #[serde(default)]
    pub allow_cn: Vec<String>,
    #[serde(default)]
    pub allow_ou: Vec<String>,
    #[serde(default)]
    pub allow_dns: Vec<String>,
    #[serde(default)]
    pub allow_uri: Vec<String>,
    #[serde(default)]
    pub allow_ip: Vec<String>,
    #[serde(default)]
    pub verify_cn: Vec<String>,
    #[serde(default)]
    pub verify_ou: Vec<String>,
    #[serde(default)]
    pub verify_dns: Vec<String>,
    #[serde(default)]
    pub verify_uri: Vec<String>,
    #[serde(default)]
    pub verify_ip: Vec<String>,
    pub override_server_name: Option<String>,
    pub min_tls_version: Option<String>,
    pub max_tls_version: Option<String>,
    pub connect_timeout: Option<String>,
    pub close_timeout: Option<String>,
    pub handshake_timeout: Option<String>,
    pub keepalive: Option<String>,
    /// A hard deadline on every connection once established (ghostunnel's); 0: none.
    pub max_conn_lifetime: Option<String>,
    /// Server side: `/_status` checks the service with an HTTP GET of this URL, sent over a
    /// connection to the target (ghostunnel's `--target-status`).
    pub target_status: Option<String>,
    pub max_concurrent_conns: Option<usize>,
    /// Client side: multiplexed `legate/1` connections kept per server ambassador (default 1;
    /// 0: none, each consumer connection gets a TLS connection of its own).
    pub pool_size: Option<usize>,
    /// Client side: the server is a legate, so connections are kept open from startup and
    /// even the first consumer pays no handshake. Off by default: a client whose server might
    /// be stunnel or ghostunnel opens no connection that no consumer asked for.
    #[serde(default)]
    pub peer_is_legate: bool,
    /// Server side: how long a `legate/1` connection may wait for its next stream.
    pub idle_timeout: Option<String>,
    /// Server side: send a PROXY protocol v2 header to the target.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// Server side: announce this tunnel over mDNS / DNS-SD as `_legate._tcp.local.`, with
    /// its routes, until it stops.
    #[serde(default)]
    pub announce: bool,
    /// Server side: ask clients for no certificate. Client side: present none.
    #[serde(default)]
    pub disable_authentication: bool,
    /// Accept a private key or keystore readable by group or others.
    #[serde(default)]
    pub allow_readable_key: bool,
    /// Do not resolve the target (or routes) at startup.
    #[serde(default)]
    pub skip_resolve: bool,
    #[serde(default)]
    pub unsafe_listen: bool,
    #[serde(default)]
    pub unsafe_target: bool,
    /// Client side: do not offer `legate/1`; the TLS stream is the byte stream.
    #[serde(default)]
    pub raw: bool,
}

/// A validated tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct TunnelConfig {
    pub name: String,
    pub side: Side,
    pub listen: Address,
    /// Client side: the server ambassador(s). Server side: the default target, if any.
    pub target: Option<Upstream>,
    /// Server side: named routes.
    pub routes: BTreeMap<String, Upstream>,
    /// How new connections are spread over an upstream's endpoints.
    pub balance: Balance,
    /// Server side: active checks of the service endpoints, if asked for.
    pub health_check: Option<HealthCheck>,
    /// Client side: the route it asks for ("" for the server's default target).
    pub route: String,
    pub tls: tls::Files,
    pub tls_versions: TlsVersions,
    /// Server side: who may connect.
    pub allow: Rules,
    /// Client side: what the server's certificate must also carry.
    pub verify: Rules,
    /// Client side: the name the first server's certificate must be valid for.
    pub server_name: String,
    /// Client side: `--override-server-name`, for endpoints without a `name=` of their own.
    pub override_server_name: Option<String>,
    pub connect_timeout: Duration,
    pub close_timeout: Duration,
    pub handshake_timeout: Duration,
    pub keepalive: Duration,
    /// `--max-conn-lifetime`: the longest a connection (or stream) may relay.
    pub max_conn_lifetime: Option<Duration>,
    /// Server side: `--target-status`, the URL `/_status` fetches through the target.
    pub target_status: Option<TargetStatus>,
    /// 0 means unlimited.
    pub max_concurrent_conns: usize,
    /// Client side: offer `legate/1`.
    pub legate_protocol: bool,
    /// Server side: announced over mDNS.
    pub announce: bool,
    /// `--disable-authentication`: no client certificates on this tunnel.
    pub disable_authentication: bool,
    /// Server side: a PROXY v2 header goes to the target first.
    pub proxy_protocol: bool,
    /// `--skip-resolve`: the target may not resolve at startup.
    pub skip_resolve: bool,
    /// Server side: `--unsafe-target`, targets (and discovered endpoints) off loopback.
    pub unsafe_target: bool,
    /// Client side: multiplexed `legate/1` connections kept per server ambassador (0: none);
    /// `None`, the default: one per runtime worker thread (at most 4), so the threads share the
    /// TLS work of many streams (docs/performance.md, "Eight streams over several connections").
    pub pool_size: Option<usize>,
    /// Client side: the server is known to speak `legate/1` (`--peer-is-legate`, or a
    /// route): connections are kept from startup, not from the first consumer on.
    pub peer_is_legate: bool,
    /// Server side: how long a `legate/1` connection may idle between streams.
    pub idle_timeout: Duration,
}

/// Everything one process runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub tunnels: Vec<TunnelConfig>,
    pub shutdown_timeout: Duration,
    /// Where `/_status` and `/_metrics` are served, if anywhere.
    pub status: Option<StatusAddr>,
    /// Reload certificates (and a config file) this often, besides on SIGHUP/SIGUSR1.
    pub timed_reload: Option<Duration>,
    /// Runtime worker threads; `None` chooses (half the CPUs, at least one).
    pub threads: Option<usize>,
    /// What the ghostunnel-shaped metric names start with (`PREFIX.accept.total`).
    pub metrics_prefix: String,
    /// Serve `/debug/pprof/goroutine` (the live task count) on the status listener.
    pub enable_pprof: bool,
    /// The nameserver and intervals of `srv:` and `dns:` sources, the hold time of all.
    pub discovery: DiscoverySettings,
}

/// The status listener's address and whether it speaks HTTPS or plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusAddr {
    pub addr: Address,
    /// `Some` when a scheme was written; `None`: HTTPS on a TCP address when a tunnel has a
    /// certificate to serve it with, plain HTTP otherwise (a UNIX socket, or a client with
    /// `--disable-authentication`), as in ghostunnel.
    pub https: Option<bool>,
}

impl StatusAddr {
    /// `HOST:PORT` or `unix:PATH`, or `http://HOST:PORT`, `https://HOST:PORT`.
    pub fn parse(s: &str) -> Result<StatusAddr, String> {
        let (https, rest) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
            (Some(rest), _) => (Some(false), rest),
            (_, Some(rest)) => (Some(true), rest),
            _ => (None, s),
        };
        let addr =
            Address::parse(rest.trim_end_matches('/')).map_err(|e| format!("--status: {e}"))?;
        if https.is_some() && matches!(addr, Address::Unix(_)) {
            return Err(format!(
                "--status {s:?}: an http:// or https:// scheme needs HOST:PORT; a unix: socket is always plain HTTP, write unix:PATH"
            ));
        }
        Ok(StatusAddr { addr, https })
    }
}

/// Settings of the whole process, from flags or the top of a config file.
#[derive(Debug, Clone, Default)]
pub struct ProcessFile {
    pub shutdown_timeout: Option<String>,
    pub status: Option<String>,
    pub timed_reload: Option<String>,
    pub threads: Option<usize>,
    pub metrics_prefix: Option<String>,
    pub enable_pprof: bool,
    pub nameserver: Option<String>,
    pub dns_min_interval: Option<String>,
    pub dns_max_interval: Option<String>,
    pub discovery_hold: Option<String>,
}

impl ProcessFile {
    /// Builds the config from validated tunnels, checking the process settings.
    pub fn into_config(self, tunnels: Vec<TunnelConfig>) -> Result<Config, Vec<String>> {
        let mut p = Vec::new();
        let shutdown_timeout = duration(
            &mut p,
            "--shutdown-timeout",
            &self.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        );
        let status = self
            .status
            .as_deref()
            .and_then(|s| match StatusAddr::parse(s) {
                Ok(a) => Some(a),
                Err(e) => {
                    p.push(e);
                    None
                }
            });
        let timed_reload =
            self.timed_reload
                .as_deref()
                .and_then(|s| match parse_duration("--timed-reload", s) {
                    Ok(d) if d.is_zero() => {
                        p.push("--timed-reload must be more than 0".into());
                        None
                    }
                    Ok(d) => Some(d),
                    Err(e) => {
                        p.push(e);
                        None
                    }
                });
        let metrics_prefix = self
            .metrics_prefix
            .unwrap_or_else(|| DEFAULT_METRICS_PREFIX.to_string());
        if metrics_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
        {
            p.push(format!(
                "--metrics-prefix {metrics_prefix:?} has spaces, quotes or control characters; write e.g. \"ghostunnel\" or \"cache.client\""
            ));
        }
        let defaults = DiscoverySettings::default();
        let nameserver = self.nameserver.as_deref().and_then(|ns| {
            ns.parse::<std::net::SocketAddr>()
                .or_else(|_| ns.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                .map_err(|_| {
                    p.push(format!(
                        "--nameserver {ns:?} is not an IP address (with an optional :port)"
                    ))
                })
                .ok()
        });
        let discovery = DiscoverySettings {
            nameserver,
            min_interval: duration(
                &mut p,
                "--dns-min-interval",
                &self.dns_min_interval,
                defaults.min_interval,
            ),
            max_interval: duration(
                &mut p,
                "--dns-max-interval",
                &self.dns_max_interval,
                defaults.max_interval,
            ),
            hold: duration(
                &mut p,
                "--discovery-hold",
                &self.discovery_hold,
                defaults.hold,
            ),
        };
        if discovery.min_interval.is_zero() || discovery.min_interval > discovery.max_interval {
            p.push("--dns-min-interval must be more than 0 and at most --dns-max-interval".into());
        }
        if self.enable_pprof && self.status.is_none() {
            p.push("--enable-pprof needs --status (the profile is served there)".into());
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(Config {
            tunnels,
            shutdown_timeout,
            status,
            timed_reload,
            threads: self.threads,
            metrics_prefix,
            enable_pprof: self.enable_pprof,
            discovery,
        })
    }
}

/// What a reload changes: tunnel names by fate.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
    /// Changed only in their targets or routes: updated in place, without rebinding.
    pub retargeted: Vec<String>,
    pub unchanged: Vec<String>,
}

/// Whether `new` differs from `old` only in where it forwards (targets, routes, and the
/// server name that follows from them): what a running tunnel can take without rebinding.
pub fn retargeted_only(old: &TunnelConfig, new: &TunnelConfig) -> bool {
    let mut same = new.clone();
    same.target.clone_from(&old.target);
    same.routes.clone_from(&old.routes);
    same.server_name.clone_from(&old.server_name);
    // A route whose discovery sources, balance policy or Redis settings changed needs a new
    // set: the tunnel is replaced.
    type Kept = (
        String,
        Vec<Source>,
        Option<Balance>,
        Option<crate::redis::Settings>,
    );
    let sources = |t: &TunnelConfig| {
        let kept =
            |n: &str, u: &Upstream| (n.to_string(), u.sources.clone(), u.balance, u.redis.clone());
        let mut all: Vec<Kept> = t.routes.iter().map(|(n, u)| kept(n, u)).collect();
        all.extend(t.target.iter().map(|u| kept("", u)));
        all
    };
    same == *old && new != old && sources(old) == sources(new)
}

/// Compares two sets of tunnels by name: a pure function, so reload is easy to test.
pub fn diff(old: &[TunnelConfig], new: &[TunnelConfig]) -> Diff {
    let mut d = Diff::default();
    for t in old {
        match new.iter().find(|n| n.name == t.name) {
            None => d.removed.push(t.name.clone()),
            Some(n) if n == t => d.unchanged.push(t.name.clone()),
            Some(n) if retargeted_only(t, n) => d.retargeted.push(t.name.clone()),
            Some(_) => d.changed.push(t.name.clone()),
        }
    }
    for n in new {
        if !old.iter().any(|t| t.name == n.name) {
            d.added.push(n.name.clone());
        }
    }
    d
}

/// Every problem found, one per line, each naming its tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for Problems {}

pub fn parse_duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{what} {s:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"5m\"")
    })
}

fn duration(
    problems: &mut Vec<String>,
    what: &str,
    value: &Option<String>,
    default: Duration,
) -> Duration {
    match value {
        None => default,
        Some(s) => parse_duration(what, s).unwrap_or_else(|e| {
            problems.push(e);
            default
        }),
    }
}

fn address(
    problems: &mut Vec<String>,
    what: &str,
    value: &str,
    base: Option<&Path>,
) -> Option<Address> {
    match Address::parse(value) {
        Ok(a) => Some(a.resolve(base)),
        Err(e) => {
            problems.push(format!("{what}: {e}"));
            None
        }
    }
}

/// IP addresses for an IP SAN rule; each one that does not parse is a problem.
fn ips(problems: &mut Vec<String>, what: &str, values: &[String]) -> Vec<std::net::IpAddr> {
    values
        .iter()
        .filter_map(|v| match v.trim().parse() {
            Ok(ip) => Some(ip),
            Err(_) => {
                problems.push(format!(
                    "{what} {v:?} is not an IP address; write e.g. 10.0.0.5 or fd00::5"
                ));
                None
            }
        })
        .collect()
}

/// Resolves `path` against `base` (the config file's directory) when it is relative.
fn resolve(base: Option<&Path>, path: &Path) -> PathBuf {
    match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// The timeouts of one tunnel, resolved.
struct Timeouts {
    connect: Duration,
    close: Duration,
    handshake: Duration,
    keepalive: Duration,
    idle: Duration,
    lifetime: Option<Duration>,
}

impl TunnelFile {
    /// This tunnel, or with `from_docker_env` one per linked TCP port found in `env`, named
    /// `NAME-ALIAS-PORT`, listening on the link's port (on `listen`'s host, loopback unless
    /// given) and forwarding to the linked address.
    pub fn expand(
        self,
        name: &str,
        env: &[(String, String)],
    ) -> Result<Vec<(String, TunnelFile)>, Vec<String>> {
        if self.from_docker_env.is_empty() {
            return Ok(vec![(name.to_string(), self)]);
        }
        if self.target.is_some() {
            return Err(vec![
                "--from-docker-env gives the targets: drop --target".into(),
            ]);
        }
        let host = match self.listen.as_deref() {
            None => "127.0.0.1".to_string(),
            Some(l) => match HostPort::parse(l) {
                Ok(hp) if hp.port == 0 => hp.host,
                Ok(_) => {
                    return Err(vec![format!(
                        "--listen {l:?} with --from-docker-env: give the host only (e.g. 0.0.0.0); each tunnel listens on its link's port"
                    )]);
                }
                Err(_) => HostPort::parse(&format!("{l}:0"))
                    .map(|hp| hp.host)
                    .map_err(|e| vec![format!("--listen {l:?}: {e}")])?,
            },
        };
        let (links, udp) = docker::links(&self.from_docker_env, env)?;
        for variable in udp {
            tracing::warn!(
                tunnel = name,
                variable,
                "UDP link skipped: legate carries TCP"
            );
        }
        Ok(links
            .into_iter()
            .map(|link| {
                let mut file = self.clone();
                file.from_docker_env.clear();
                file.listen = Some(
                    HostPort {
                        host: host.clone(),
                        port: link.port,
                    }
                    .to_string(),
                );
                file.target = Some(Targets::One(link.target));
                let name = format!("{name}-{}-{}", link.alias.to_ascii_lowercase(), link.port);
                (name, file)
            })
            .collect())
    }

    /// Checks one tunnel: every concern below reports its problems into one list, so a run
    /// reports them all. `base` resolves relative paths (the config file's directory).
    pub fn validate(&self, name: &str, base: Option<&Path>) -> Result<TunnelConfig, Vec<String>> {
        let mut p = Vec::new();
        let side = self.side.unwrap_or_else(|| {
            p.push("side is missing: set side = \"client\" or side = \"server\"".to_string());
            Side::Server
        });
        let (listen, target, routes) = self.addresses(&mut p, base);
        let tls_files = self.tls_files(&mut p, base);
        let tls_versions = self.tls_versions(&mut p);
        let (allow, verify) = self.rules(&mut p);
        let t = self.timeouts(&mut p);
        let route = match side {
            Side::Server => {
                self.server_side(&mut p, &allow, &verify, target.as_ref(), &routes);
                String::new()
            }
            Side::Client => self.client_side(&mut p, &allow, &routes, listen.as_ref()),
        };
        let server_name = self.server_name(&mut p, side, target.as_ref());
        let target_status = self.target_status(&mut p, side);
        // Before the problems are counted: each of these reports its own.
        let health_check = self.health_check(&mut p, side);
        let (mut target, routes) = self.redis_routes(&mut p, side, base, target, routes);
        self.mdns(
            &mut p,
            side,
            listen.as_ref(),
            target.as_mut(),
            &routes,
            &route,
        );
        if target_status.is_some() && target.is_none() {
            p.push(
                "--target-status needs --target: the check is sent over a connection to it".into(),
            );
        }
        if !p.is_empty() {
            return Err(p);
        }
        Ok(TunnelConfig {
            name: name.to_string(),
            side,
            listen: listen.expect("checked above"),
            target,
            routes,
            balance: self.balance.unwrap_or_default(),
            health_check,
            route,
            tls: tls_files,
            tls_versions,
            allow,
            verify,
            server_name,
            override_server_name: self.override_server_name.clone(),
            connect_timeout: t.connect,
            close_timeout: t.close,
            handshake_timeout: t.handshake,
            keepalive: t.keepalive,
            max_conn_lifetime: t.lifetime,
            target_status,
            max_concurrent_conns: self.max_concurrent_conns.unwrap_or(0),
            legate_protocol: !self.raw,
            announce: self.announce,
            disable_authentication: self.disable_authentication,
            proxy_protocol: self.proxy_protocol,
            skip_resolve: self.skip_resolve,
            unsafe_target: self.unsafe_target,
            pool_size: self.pool_size,
            peer_is_legate: !self.raw && (self.peer_is_legate || self.route.is_some()),
            idle_timeout: t.idle,
        })
    }

    /// `listen`, `target` and the routes, parsed.
    fn addresses(
        &self,
        p: &mut Vec<String>,
        base: Option<&Path>,
    ) -> (
        Option<Address>,
        Option<Upstream>,
        BTreeMap<String, Upstream>,
    ) {
        let listen = match &self.listen {
            Some(l) => address(p, "--listen", l, base),
            None => {
                p.push("--listen is required (host:port to accept connections on)".into());
                None
            }
        };
        let target = self.target.as_ref().and_then(|t| {
            Upstream::parse("--target", t, base)
                .map_err(|e| p.push(e))
                .ok()
        });
        let mut routes = BTreeMap::new();
        for (route, t) in &self.routes {
            if route.is_empty() || !protocol::valid_route(route) {
                p.push(format!(
                    "route {route:?}: names are 1 to {} letters, digits, '.', '_' or '-'",
                    protocol::MAX_ROUTE
                ));
            }
            match Upstream::parse(&format!("route {route:?}"), t, base) {
                Ok(u) => {
                    routes.insert(route.clone(), u);
                }
                Err(e) => p.push(e),
            }
        }
        (listen, target, routes)
    }

    /// The identity (PEM pair, keystore, or none), the CA bundle and the CRL.
    fn tls_files(&self, p: &mut Vec<String>, base: Option<&Path>) -> tls::Files {
        let no_client_cert = self.disable_authentication && self.side == Some(Side::Client);
        let none = || tls::IdentitySource::Pem {
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        let identity = match (&self.cert, &self.key, &self.keystore) {
            (None, None, None) if no_client_cert => tls::IdentitySource::None,
            _ if no_client_cert => {
                p.push("--disable-authentication on a client side presents no certificate; drop --cert, --key and --keystore".into());
                tls::IdentitySource::None
            }
            (Some(cert), Some(key), None) => tls::IdentitySource::Pem {
                cert: resolve(base, cert),
                key: resolve(base, key),
            },
            (None, None, Some(path)) => tls::IdentitySource::Keystore {
                path: resolve(base, path),
                password: tls::Secret(
                    self.storepass
                        .clone()
                        .or_else(|| std::env::var("KEYSTORE_PASS").ok())
                        .unwrap_or_default(),
                ),
            },
            (_, _, Some(_)) => {
                p.push("give either --keystore or --cert with --key, not both".into());
                none()
            }
            (cert, key, None) => {
                if cert.is_none() && key.is_none() {
                    p.push("an identity is required: --cert and --key (PEM), or --keystore".into());
                } else if cert.is_none() {
                    p.push("--key needs --cert (the certificate chain, PEM)".into());
                } else {
                    p.push("--cert needs --key (the private key, PEM)".into());
                }
                none()
            }
        };
        if self.storepass.is_some() && self.keystore.is_none() {
            p.push("--storepass is only for --keystore".into());
        }
        let no_client_auth = self.disable_authentication && self.side == Some(Side::Server);
        let cacert = match &self.cacert {
            // As ghostunnel: a server with --disable-authentication asks for no client
            // certificate, even when given a CA bundle.
            _ if no_client_auth => None,
            Some(path) => Some(resolve(base, path)),
            None => {
                p.push("--cacert is required (PEM bundle of the CA certificates to trust)".into());
                None
            }
        };
        let crl = self
            .crl
            .as_ref()
            .filter(|_| !no_client_auth)
            .map(|c| resolve(base, c));
        if crl.is_some() && cacert.is_none() {
            p.push(
                "--crl needs --cacert: revocation is checked on verified peer certificates".into(),
            );
        }
        tls::Files {
            identity,
            cacert,
            crl,
            allow_readable_key: self.allow_readable_key,
        }
    }

    /// `--min-tls-version` and `--max-tls-version`, as one range.
    fn tls_versions(&self, p: &mut Vec<String>) -> TlsVersions {
        let mut version = |what: &str, v: &Option<String>| {
            v.as_deref().and_then(|v| match v.parse::<tls::Version>() {
                Ok(v) => Some(v),
                Err(e) => {
                    p.push(format!("{what}: {e}"));
                    None
                }
            })
        };
        let min = version("--min-tls-version", &self.min_tls_version);
        let max = version("--max-tls-version", &self.max_tls_version);
        TlsVersions::new(min, max).unwrap_or_else(|e| {
            p.push(e);
            TlsVersions::default()
        })
    }

    /// The `--allow-*` and `--verify-*` rules.
    fn rules(&self, p: &mut Vec<String>) -> (Rules, Rules) {
        let allow = Rules {
            all: self.allow_all,
            cn: self.allow_cn.clone(),
            ou: self.allow_ou.clone(),
            dns: self.allow_dns.clone(),
            uri: self.allow_uri.clone(),
            ip: ips(p, "--allow-ip", &self.allow_ip),
        };
        let verify = Rules {
            all: false,
            cn: self.verify_cn.clone(),
            ou: self.verify_ou.clone(),
            dns: self.verify_dns.clone(),
            uri: self.verify_uri.clone(),
            ip: ips(p, "--verify-ip", &self.verify_ip),
        };
        for pattern in allow.uri.iter().chain(&verify.uri) {
            if let Err(e) = tls::identity::validate_uri_pattern(pattern) {
                p.push(e);
            }
        }
        (allow, verify)
    }

    fn timeouts(&self, p: &mut Vec<String>) -> Timeouts {
        let connect = duration(
            p,
            "--connect-timeout",
            &self.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        );
        let t = Timeouts {
            connect,
            close: duration(
                p,
                "--close-timeout",
                &self.close_timeout,
                DEFAULT_CLOSE_TIMEOUT,
            ),
            // As in ghostunnel, --connect-timeout bounds the incoming handshake too, unless
            // --handshake-timeout says otherwise.
            handshake: match &self.handshake_timeout {
                Some(_) => duration(
                    p,
                    "--handshake-timeout",
                    &self.handshake_timeout,
                    DEFAULT_HANDSHAKE_TIMEOUT,
                ),
                None => connect,
            },
            keepalive: duration(p, "--keepalive", &self.keepalive, DEFAULT_KEEPALIVE),
            idle: duration(
                p,
                "--idle-timeout",
                &self.idle_timeout,
                DEFAULT_IDLE_TIMEOUT,
            ),
            lifetime: Some(duration(
                p,
                "--max-conn-lifetime",
                &self.max_conn_lifetime,
                Duration::ZERO,
            ))
            .filter(|d| !d.is_zero()),
        };
        for (what, d) in [
            ("--connect-timeout", t.connect),
            ("--handshake-timeout", t.handshake),
            ("--idle-timeout", t.idle),
        ] {
            if d.is_zero() {
                p.push(format!("{what} must be more than 0"));
            }
        }
        t
    }

    /// What a server side needs, and what it must not have.
    fn server_side(
        &self,
        p: &mut Vec<String>,
        allow: &Rules,
        verify: &Rules,
        target: Option<&Upstream>,
        routes: &BTreeMap<String, Upstream>,
    ) {
        if self.disable_authentication {
            if !allow.is_empty() {
                p.push("--allow-* rules need client certificates; they cannot be combined with --disable-authentication".into());
            }
        } else if allow.is_empty() {
            p.push(
                "no access rule: give --allow-all, --allow-cn, --allow-ou, --allow-dns, --allow-uri or --allow-ip"
                    .into(),
            );
        }
        if !verify.is_empty() || self.override_server_name.is_some() {
            p.push("--verify-* and --override-server-name are client-side flags".into());
        }
        if self.pool_size.is_some() || self.peer_is_legate {
            p.push("--pool-size and --peer-is-legate are client-side".into());
        }
        if self.route.is_some() || self.raw {
            p.push(
                "--route NAME and --raw are client-side; a server lists routes as NAME=ADDRESS"
                    .into(),
            );
        }
        if target.is_none() && routes.is_empty() && self.target.is_none() {
            p.push("--target is required (host:port of the service), or at least one route".into());
        }
        if !self.unsafe_target {
            let all = target.into_iter().chain(routes.values());
            for t in all.flat_map(Upstream::addresses) {
                if !t.is_local() {
                    p.push(format!(
                        "target {t} is not a loopback address: the plaintext would cross the network; pass --unsafe-target if that is intended"
                    ));
                }
            }
        }
    }

    /// What a client side needs, and what it must not have. Returns the route it asks for.
    fn client_side(
        &self,
        p: &mut Vec<String>,
        allow: &Rules,
        routes: &BTreeMap<String, Upstream>,
        listen: Option<&Address>,
    ) -> String {
        if !allow.is_empty() {
            p.push(
                "--allow-* flags are server-side; a client pins its server with --verify-*".into(),
            );
        }
        if !routes.is_empty() {
            p.push("routes are server-side; a client names one with --route NAME".into());
        }
        if self.idle_timeout.is_some() {
            p.push("--idle-timeout is server-side (it tells clients how long kept connections may idle)".into());
        }
        if self.proxy_protocol {
            p.push("--proxy-protocol is server-side: the server sends the header to the target; a legate client passes the consumer's address to it by itself".into());
        }
        if self.target.is_none() {
            p.push("--target is required (host:port of the legate server)".into());
        }
        let mut route = String::new();
        if let Some(r) = &self.route {
            if !protocol::valid_route(r) {
                p.push(format!(
                    "--route {r:?}: names are up to {} letters, digits, '.', '_' or '-'",
                    protocol::MAX_ROUTE
                ));
            }
            if self.raw {
                p.push("--route needs the legate/1 protocol; drop --raw".into());
            }
            route = r.clone();
        }
        if self.peer_is_legate && self.raw {
            p.push(
                "--peer-is-legate and --raw contradict each other: --raw never offers legate/1"
                    .into(),
            );
        }
        if let Some(l) = listen
            && !l.is_local()
            && !self.unsafe_listen
        {
            p.push(format!(
                "--listen {l} is not a loopback address: anyone who can reach it gets through the tunnel; pass --unsafe-listen if that is intended"
            ));
        }
        route
    }

    /// The name the server's certificate is checked against (client side), for the first
    /// endpoint; each endpoint has its own ([`TunnelConfig::server_name_of`]).
    fn server_name(&self, p: &mut Vec<String>, side: Side, target: Option<&Upstream>) -> String {
        let Some(target) = target else {
            return self.override_server_name.clone().unwrap_or_default();
        };
        if side == Side::Client && self.override_server_name.is_none() {
            for e in &target.endpoints {
                if e.name.is_none() && matches!(e.addr, Address::Unix(_)) {
                    p.push(format!("a unix: target ({}) has no host name to check the server's certificate against; set --override-server-name or ,name=NAME", e.addr));
                }
            }
        }
        match target.endpoints.first() {
            Some(first) => server_name_of(self.override_server_name.as_deref(), first),
            // Only discovered endpoints: each is checked against its own name.
            None => self.override_server_name.clone().unwrap_or_default(),
        }
    }

    /// `--health-interval` and its companions: server side only (a client checks its server
    /// ambassadors by the liveness of its kept connections, which costs no handshakes).
    fn health_check(&self, p: &mut Vec<String>, side: Side) -> Option<HealthCheck> {
        let given = self.health_interval.is_some()
            || self.health_timeout.is_some()
            || self.health_rise.is_some()
            || self.health_fall.is_some();
        if !given {
            return None;
        }
        if side == Side::Client {
            p.push("--health-* flags are server-side: a client checks its server ambassadors by the liveness of its kept connections".into());
            return None;
        }
        let interval = duration(
            p,
            "--health-interval",
            &self.health_interval,
            Duration::ZERO,
        );
        if interval.is_zero() {
            p.push("--health-timeout, --health-rise and --health-fall need --health-interval (more than 0)".into());
            return None;
        }
        let timeout = duration(
            p,
            "--health-timeout",
            &self.health_timeout,
            Duration::from_secs(2).min(interval),
        );
        Some(HealthCheck {
            interval,
            timeout,
            rise: self.health_rise.unwrap_or(2).max(1),
            fall: self.health_fall.unwrap_or(3).max(1),
        })
    }

    /// mDNS: `announce` is a server side's, on a TCP listener; an `mdns:` source is a client
    /// side's, filtered to its route, and needs `--override-server-name`: the `.local` name an
    /// announcement carries is never what a certificate is checked against.
    fn mdns(
        &self,
        p: &mut Vec<String>,
        side: Side,
        listen: Option<&Address>,
        target: Option<&mut Upstream>,
        routes: &BTreeMap<String, Upstream>,
        route: &str,
    ) {
        if self.announce {
            if side == Side::Client {
                p.push(
                    "--announce is server-side: a server ambassador announces itself over mDNS"
                        .into(),
                );
            } else if listen.is_some_and(|l| !matches!(l, Address::Tcp(_))) {
                p.push(
                    "--announce needs a TCP --listen address: mDNS announces a host and port"
                        .into(),
                );
            } else if listen.is_some_and(Address::is_local) {
                p.push("--announce with a loopback --listen: no other host could reach what is announced; listen on an address they can reach".into());
            }
        }
        let is_mdns = |s: &Source| matches!(s, Source::Mdns { .. });
        if routes.values().any(|u| u.sources.iter().any(is_mdns)) {
            p.push(
                "mdns: finds server ambassadors: it is a client side's target, not a route's"
                    .into(),
            );
        }
        let Some(target) = target else { return };
        if !target.sources.iter().any(is_mdns) {
            return;
        }
        if side == Side::Server {
            p.push("mdns: finds server ambassadors: it is a client side's target".into());
        } else if self.override_server_name.is_none() {
            p.push("mdns: needs --override-server-name: each announced server's certificate is checked against it, never against the .local name it announces".into());
        }
        for s in &mut target.sources {
            if let Source::Mdns { route: r, .. } = s {
                *r = route.to_string();
            }
        }
    }

    /// The tunnel's Redis keys, as written.
    fn redis_keys(&self) -> RedisKeys {
        RedisKeys {
            protocol: self.protocol,
            password_file: self.redis_password_file.clone(),
            password_env: self.redis_password_env.clone(),
            user: self.redis_user.clone(),
            hello: self.redis_hello,
            consumer_auth: self.redis_consumer_auth,
            require_role: self.require_role.clone(),
        }
    }

    /// Each upstream's Redis settings: the default target's from the tunnel's keys, a route's
    /// from its table's keys over the tunnel's. Server side only: the ambassador next to Redis
    /// speaks to it.
    fn redis_routes(
        &self,
        p: &mut Vec<String>,
        side: Side,
        base: Option<&Path>,
        mut target: Option<Upstream>,
        mut routes: BTreeMap<String, Upstream>,
    ) -> (Option<Upstream>, BTreeMap<String, Upstream>) {
        let keys = self.redis_keys();
        let sentinel = |u: &Upstream| {
            u.sources
                .iter()
                .any(|s| matches!(s, Source::Sentinel { .. }))
        };
        if side == Side::Client {
            // A client speaks to Redis itself only when its target is a Redis that speaks TLS:
            // a raw connection, no legate server in between.
            if keys.require_role.is_some() {
                p.push(
                    "--require-role is server-side: the ambassador next to Redis checks its role"
                        .into(),
                );
            } else if keys != RedisKeys::default() && !self.raw {
                p.push("--redis-* on a client side authenticates to a Redis that speaks TLS itself: add --raw (a legate server ambassador does this with the same flags)".into());
            } else if let Some(t) = &mut target {
                t.redis = keys.settings("--target", p, base);
            }
            if target.iter().any(sentinel) {
                p.push("sentinel: sources are server-side: the ambassador next to Redis follows its Sentinels".into());
            }
            return (target, routes);
        }
        if let Some(t) = &mut target {
            t.redis = keys.settings("--target", p, base);
        }
        for (name, u) in &mut routes {
            let own = self
                .routes
                .get(name)
                .map(Targets::redis_keys)
                .unwrap_or_default();
            // `protocol = "tcp"` on a route opts it out of the tunnel's Redis keys.
            let merged = if own.protocol == Some(Protocol::Tcp) {
                own
            } else {
                own.over(&keys)
            };
            u.redis = merged.settings(&format!("route {name:?}"), p, base);
        }
        // What Sentinels name is Redis: a route following them is a Redis route.
        for u in target.iter_mut().chain(routes.values_mut()) {
            if u.redis.is_none() && sentinel(u) {
                u.redis = Some(crate::redis::Settings::default());
            }
        }
        (target, routes)
    }

    /// `--target-status`: an `http://` or `https://` URL, server side only.
    fn target_status(&self, p: &mut Vec<String>, side: Side) -> Option<TargetStatus> {
        let url = self.target_status.as_deref()?;
        if side == Side::Client {
            p.push("--target-status is for the server side (it checks the service)".into());
            return None;
        }
        TargetStatus::parse(url)
            .map_err(|e| p.push(format!("--target-status {url:?}: {e}")))
            .ok()
    }
}

/// The name endpoint `e`'s certificate must be valid for: its own `name=`, else
/// `--override-server-name`, else the name discovery found it under (an SRV target, a `dns:`
/// host: so DNS decides it only where nothing written does), else its host.
fn server_name_of(override_name: Option<&str>, e: &EndpointSpec) -> String {
    e.name
        .as_deref()
        .or(override_name)
        .or(e.dns_name.as_deref())
        .or(e.addr.host())
        .unwrap_or_default()
        .to_string()
}

impl TunnelConfig {
    /// Client side: the name endpoint `e`'s certificate must be valid for.
    pub fn server_name_of(&self, e: &EndpointSpec) -> String {
        server_name_of(self.override_server_name.as_deref(), e)
    }
}

/// `--target-status`: what `/_status` fetches, over a connection to the tunnel's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    pub url: String,
    pub https: bool,
    /// The URL's host and port as written: the request's `Host` header.
    pub authority: String,
    /// The URL's host alone: the TLS server name for `https://`.
    pub host: String,
    /// Path and query, at least `/`.
    pub path: String,
}

impl TargetStatus {
    pub fn parse(url: &str) -> Result<TargetStatus, String> {
        let (https, rest) = if let Some(rest) = url.strip_prefix("http://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("https://") {
            (true, rest)
        } else {
            return Err("only http:// and https:// URLs can be checked".into());
        };
        // A fragment is not sent.
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let host = match authority.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
        };
        if host.is_empty() || authority.contains('@') {
            return Err("the URL needs a host (and no user:password@)".into());
        }
        if authority
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\\'))
        {
            return Err("the URL's host has spaces, quotes or control characters".into());
        }
        let port = match authority.strip_prefix('[') {
            Some(v6) => v6.split_once("]:").map(|(_, p)| p),
            None => authority.rsplit_once(':').map(|(_, p)| p),
        };
        if port.is_some_and(|p| p.parse::<u16>().is_err()) {
            return Err("the URL's port is not a number from 0 to 65535".into());
        }
        if path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err("the URL's path has spaces or control characters".into());
        }
        Ok(TargetStatus {
            url: url.to_string(),
            https,
            authority: authority.to_string(),
            host: host.to_string(),
            path,
        })
    }
}

/// The top level of a config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTop {
    shutdown_timeout: Option<String>,
    status: Option<String>,
    timed_reload: Option<String>,
    threads: Option<usize>,
    metrics_prefix: Option<String>,
    #[serde(default)]
    enable_pprof: bool,
    nameserver: Option<String>,
    dns_min_interval: Option<String>,
    dns_max_interval: Option<String>,
    discovery_hold: Option<String>,
    #[serde(default)]
    tunnels: BTreeMap<String, toml::Value>,
}

/// Parses and validates a config file's text. Every tunnel is checked, so one run reports
/// every problem. `base` is the directory relative paths are resolved against.
pub fn from_toml(text: &str, base: Option<&Path>) -> Result<Config, Problems> {
    let top: FileTop = toml::from_str(text).map_err(|e| Problems(vec![one_line(&e)]))?;
    let mut problems = Vec::new();
    let process = ProcessFile {
        shutdown_timeout: top.shutdown_timeout,
        status: top.status,
        timed_reload: top.timed_reload,
        threads: top.threads,
        metrics_prefix: top.metrics_prefix,
        enable_pprof: top.enable_pprof,
        nameserver: top.nameserver,
        dns_min_interval: top.dns_min_interval,
        dns_max_interval: top.dns_max_interval,
        discovery_hold: top.discovery_hold,
    };
    if top.tunnels.is_empty() {
        problems.push("no tunnels: add at least one [tunnels.NAME] table".into());
    }
    let mut tunnels = Vec::new();
    let env: Vec<(String, String)> = std::env::vars().collect();
    for (name, value) in top.tunnels {
        let parsed = TunnelFile::deserialize(value).map_err(|e| vec![one_line(&e)]);
        let expanded = parsed.and_then(|file| file.expand(&name, &env));
        let report = |problems: &mut Vec<String>, name: &str, errs: Vec<String>| {
            problems.extend(errs.into_iter().map(|e| format!("tunnel {name:?}: {e}")));
        };
        match expanded {
            Ok(files) => {
                for (name, file) in files {
                    match file.validate(&name, base) {
                        Ok(t) => tunnels.push(t),
                        Err(errs) => report(&mut problems, &name, errs),
                    }
                }
            }
            Err(errs) => {
                // A tunnel's table that does not deserialize: read it again from the text,
                // where the error knows its line and column.
                let errs = match locate(text, &name) {
                    Some(located) => vec![located],
                    None => errs,
                };
                report(&mut problems, &name, errs)
            }
        }
    }
    match process.into_config(tunnels) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(Problems(problems)),
        Err(errs) => {
            problems.extend(errs);
            Err(Problems(problems))
        }
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, Problems> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Problems(vec![format!("cannot read config {}: {e}", path.display())]))?;
    from_toml(&text, path.parent()).map_err(|Problems(p)| {
        Problems(
            p.into_iter()
                .map(|e| format!("{}: {e}", path.display()))
                .collect(),
        )
    })
}

/// TOML errors span several lines (a source excerpt); keep the message and its position.
/// Deserializes only tunnel `name`'s table from the document, for the error with its place
/// ("line 12, column 1"): a table taken out of the document has lost its position.
fn locate(text: &str, name: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};

    /// A map of which only the entry `key` is deserialized, with `seed`.
    struct Only<'a, S> {
        key: &'a str,
        seed: S,
    }
    impl<'de, S: DeserializeSeed<'de, Value = ()> + Copy> DeserializeSeed<'de> for Only<'_, S> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_map(self)
        }
    }
    impl<'de, S: DeserializeSeed<'de, Value = ()> + Copy> Visitor<'de> for Only<'_, S> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a table")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            while let Some(k) = m.next_key::<String>()? {
                if k == self.key {
                    m.next_value_seed(self.seed)?;
                } else {
                    m.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }
    #[derive(Clone, Copy)]
    struct Tunnel;
    impl<'de> DeserializeSeed<'de> for Tunnel {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            TunnelFile::deserialize(d).map(drop)
        }
    }
    #[derive(Clone, Copy)]
    struct Tunnels<'a>(&'a str);
    impl<'de> DeserializeSeed<'de> for Tunnels<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            Only {
                key: self.0,
                seed: Tunnel,
            }
            .deserialize(d)
        }
    }
    let de = toml::Deserializer::parse(text).ok()?;
    let top = Only {
        key: "tunnels",
        seed: Tunnels(name),
    };
    top.deserialize(de).err().map(|e| one_line(&e))
}

fn one_line(e: &impl fmt::Display) -> String {
    e.to_string()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^'))
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mdns_sources_and_announcements_belong_to_their_sides() {
        let client = |extra: &str| {
            GOOD.replace("target = \"cache.internal:8443\"", "target = \"mdns:\"")
                .replace("pool_size = 2", &format!("pool_size = 2\n{extra}"))
        };
        let e = from_toml(&client(""), None).unwrap_err().to_string();
        assert!(e.contains("mdns: needs --override-server-name"), "{e}");
        let c = from_toml(&client("override_server_name = \"cache.internal\""), None).unwrap();
        let app = c.tunnels.iter().find(|t| t.name == "app").unwrap();
        assert_eq!(
            app.target.as_ref().unwrap().sources,
            [Source::Mdns {
                service: crate::mdns::SERVICE.into(),
                route: "queue".into()
            }],
            "filtered to the client's route"
        );
        let e = from_toml(
            &client("override_server_name = \"x\"\nannounce = true"),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--announce is server-side"), "{e}");
        let announced = GOOD.replace(
            "allow_cn = [\"app\"]",
            "allow_cn = [\"app\"]\nannounce = true",
        );
        from_toml(&announced, None).expect("a server on 0.0.0.0 announces");
        let looped = announced.replace("0.0.0.0:8443", "127.0.0.1:8443");
        let e = from_toml(&looped, None).unwrap_err().to_string();
        assert!(e.contains("--announce with a loopback --listen"), "{e}");
        let server = GOOD.replace("target = \"127.0.0.1:6379\"", "target = \"mdns:\"");
        let e = from_toml(&server, None).unwrap_err().to_string();
        assert!(e.contains("it is a client side's target"), "{e}");
        let bad = client("override_server_name = \"x\"").replace("\"mdns:\"", "\"mdns:printer\"");
        let e = from_toml(&bad, None).unwrap_err().to_string();
        assert!(e.contains("mdns:_service._tcp.local."), "{e}");
    }

    #[test]
    fn an_error_inside_a_tunnel_names_its_line_and_column() {
        let text = GOOD.replace("pool_size = 2", "pool_size = 2\ncolour = \"red\"");
        let e = from_toml(&text, None).unwrap_err().to_string();
        let line = text.lines().position(|l| l.starts_with("colour")).unwrap() + 1;
        assert!(
            e.contains(&format!("line {line}, column 1")) && e.contains("unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn redis_keys_per_route_over_the_tunnels() {
        // SAFETY: a variable of this test's own.
        unsafe { std::env::set_var("LEGATE_CONFIG_TEST_PW", "pw") };
        let server = GOOD
            .replace(
                "routes = { queue = \"127.0.0.1:5672\" }",
                "redis_password_env = \"LEGATE_CONFIG_TEST_PW\"\nroutes = { queue = \"127.0.0.1:5672\", \
                 sessions = { target = [\"127.0.0.1:1\", \"127.0.0.1:2\"], require_role = \"master\", redis_consumer_auth = \"local\" }, \
                 plain = { target = \"127.0.0.1:3\", protocol = \"tcp\" } }",
            );
        let c = from_toml(&server, None).unwrap();
        let cache = c.tunnels.iter().find(|t| t.name == "cache").unwrap();
        let creds = |u: &Upstream| u.redis.as_ref().and_then(|r| r.credentials.clone());
        assert!(
            creds(cache.target.as_ref().unwrap()).is_some(),
            "the tunnel's keys"
        );
        let sessions = cache.routes["sessions"].redis.as_ref().unwrap();
        assert!(sessions.require_master && sessions.credentials.is_some());
        assert_eq!(sessions.consumer_auth, crate::redis::ConsumerAuth::Local);
        assert!(cache.routes["plain"].redis.is_none(), "protocol = tcp");
        for (bad, says) in [
            (
                "require_role = \"replica\"",
                "the one role that can be required",
            ),
            ("redis_hello = 4", "write 2 or 3"),
            (
                "protocol = \"tcp\"\nrequire_role = \"master\"",
                "need protocol = \"redis\"",
            ),
            ("redis_user = \"u\"", "--redis-user needs"),
        ] {
            let text = GOOD.replace(
                "allow_cn = [\"app\"]",
                &format!("allow_cn = [\"app\"]\n{bad}"),
            );
            let e = from_toml(&text, None).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        // A client side speaks to Redis itself only with --raw.
        let with = |extra: &str| GOOD.replace("pool_size = 2", &format!("pool_size = 2\n{extra}"));
        let e = from_toml(
            &with("redis_password_env = \"LEGATE_CONFIG_TEST_PW\""),
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("add --raw"), "{e}");
        // Changed Redis settings replace the tunnel; they are not a retarget.
        let changed = server.replace("require_role = \"master\", ", "");
        let changed = from_toml(&changed, None).unwrap();
        let changed = changed.tunnels.iter().find(|t| t.name == "cache").unwrap();
        assert!(!retargeted_only(cache, changed));
    }

    #[test]
    fn health_and_redis_keys_are_checked_before_the_config_is_built() {
        let with = |extra: &str| GOOD.replace("pool_size = 2", &format!("pool_size = 2\n{extra}"));
        let e = from_toml(&with("health_interval = \"1s\""), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--health-* flags are server-side"), "{e}");
        let e = from_toml(&with("require_role = \"master\""), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--require-role is server-side"), "{e}");
    }

    #[test]
    fn target_status_urls() {
        let t = TargetStatus::parse("https://svc.internal:8443/health?x=1").unwrap();
        assert!(t.https);
        assert_eq!(
            (t.authority.as_str(), t.host.as_str(), t.path.as_str()),
            ("svc.internal:8443", "svc.internal", "/health?x=1")
        );
        let t = TargetStatus::parse("http://[::1]:80").unwrap();
        assert_eq!((t.host.as_str(), t.path.as_str()), ("::1", "/"));
        assert_eq!(
            TargetStatus::parse("http://h?ready").unwrap().path,
            "/?ready"
        );
        assert_eq!(TargetStatus::parse("http://h/x#frag").unwrap().path, "/x");
        for bad in [
            "ftp://h/",
            "h:80/x",
            "http:///x",
            "http://u:p@h/",
            "http://h/a b",
            "http://h\r\nX-Evil: 1:80/x",
            "http://h:abc/",
            "http://[::1]:99999/",
        ] {
            assert!(TargetStatus::parse(bad).is_err(), "{bad}");
        }
    }

    const GOOD: &str = r#"
shutdown_timeout = "30s"

[tunnels.cache]
side = "server"
listen = "0.0.0.0:8443"
target = "127.0.0.1:6379"
routes = { queue = "127.0.0.1:5672" }
cert = "server.crt"
key = "server.key"
cacert = "ca.crt"
allow_cn = ["app"]

[tunnels.app]
side = "client"
listen = "127.0.0.1:6380"
target = "cache.internal:8443"
route = "queue"
cert = "/etc/legate/app.crt"
key = "app.key"
cacert = "ca.crt"
verify_cn = ["cache.internal"]
close_timeout = "2s"
pool_size = 2
"#;

    #[test]
    fn a_good_file_builds_the_config() {
        let c = from_toml(GOOD, Some(Path::new("/conf"))).unwrap();
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        let app = &c.tunnels[0];
        assert_eq!(app.name, "app");
        assert_eq!(app.side, Side::Client);
        assert_eq!(app.route, "queue");
        assert_eq!(app.server_name, "cache.internal");
        assert_eq!(
            app.tls.identity,
            tls::IdentitySource::Pem {
                cert: PathBuf::from("/etc/legate/app.crt"),
                key: PathBuf::from("/conf/app.key")
            }
        );
        assert_eq!(app.close_timeout, Duration::from_secs(2));
        assert_eq!(app.pool_size, Some(2));
        // A route means the server is a legate.
        assert!(app.peer_is_legate);
        let cache = &c.tunnels[1];
        assert_eq!(cache.routes["queue"].to_string(), "127.0.0.1:5672");
        assert_eq!(cache.allow.cn, vec!["app".to_string()]);
    }

    #[test]
    fn every_problem_is_reported_by_tunnel() {
        let bad = r#"
[tunnels.one]
side = "server"
listen = "nope"
cert = "a"
key = "b"
cacert = "c"

[tunnels.two]
side = "client"
listen = "0.0.0.0:1"
target = "x:1"
cert = "a"
key = "b"
cacert = "c"
connect_timeout = "soon"

[tunnels.three]
side = "client"
colour = "blue"
"#;
        let Problems(p) = from_toml(bad, None).unwrap_err();
        let text = p.join("\n");
        assert!(text.contains("tunnel \"one\": --listen"), "{text}");
        assert!(text.contains("tunnel \"one\": no access rule"), "{text}");
        assert!(
            text.contains("tunnel \"one\": --target is required"),
            "{text}"
        );
        assert!(text.contains("tunnel \"two\": --connect-timeout"), "{text}");
        assert!(
            text.contains("tunnel \"two\": --listen 0.0.0.0:1 is not a loopback"),
            "{text}"
        );
        assert!(
            text.contains("tunnel \"three\": TOML parse error at line 20, column 1")
                && text.contains("unknown field `colour`"),
            "{text}"
        );
        assert!(p.iter().all(|l| !l.contains('\n')));
    }

    #[test]
    fn diff_sorts_tunnels_by_fate() {
        let c = from_toml(GOOD, None).unwrap();
        let mut new = c.tunnels.clone();
        new[0].close_timeout = Duration::from_secs(3); // "app" changed
        new.remove(1); // "cache" removed
        let mut extra = c.tunnels[0].clone();
        extra.name = "extra".into();
        new.push(extra);
        let d = diff(&c.tunnels, &new);
        assert_eq!(d.changed, vec!["app".to_string()]);
        assert_eq!(d.removed, vec!["cache".to_string()]);
        assert_eq!(d.added, vec!["extra".to_string()]);
        assert!(d.unchanged.is_empty() && d.retargeted.is_empty());
        assert_eq!(diff(&c.tunnels, &c.tunnels).unchanged.len(), 2);
        // A new target alone is taken in place.
        let mut moved = c.tunnels.clone();
        let other = Targets::Many(vec!["127.0.0.1:7000".into(), "127.0.0.1:7001".into()]);
        let target = Upstream::parse("--target", &other, None).unwrap();
        moved[1].routes.insert("queue".into(), target);
        let d = diff(&c.tunnels, &moved);
        assert_eq!(d.retargeted, vec!["cache".to_string()]);
        assert!(d.changed.is_empty());
        moved[1].close_timeout = Duration::from_secs(1);
        assert_eq!(diff(&c.tunnels, &moved).changed, vec!["cache".to_string()]);
    }

    #[test]
    fn pool_size_and_peer_is_legate_are_client_side_keys() {
        let default = from_toml(&GOOD.replace("pool_size = 2\n", ""), None).unwrap();
        assert_eq!(default.tunnels[0].pool_size, None);
        let no_route = GOOD.replace("route = \"queue\"\n", "");
        assert!(!from_toml(&no_route, None).unwrap().tunnels[0].peer_is_legate);
        let told = no_route.replace("pool_size = 2", "peer_is_legate = true");
        assert!(from_toml(&told, None).unwrap().tunnels[0].peer_is_legate);
        let both = told.replace("peer_is_legate = true", "peer_is_legate = true\nraw = true");
        let e = from_toml(&both, None).unwrap_err().to_string();
        assert!(e.contains("contradict"), "{e}");
        let server_side = GOOD.replace(
            "allow_cn = [\"app\"]",
            "allow_cn = [\"app\"]\npeer_is_legate = true",
        );
        let e = from_toml(&server_side, None).unwrap_err().to_string();
        assert!(e.contains("--peer-is-legate are client-side"), "{e}");
    }

    #[test]
    fn status_addresses_parse() {
        let s = StatusAddr::parse("127.0.0.1:9000").unwrap();
        assert_eq!(s.https, None);
        assert_eq!(
            StatusAddr::parse("http://127.0.0.1:9000/").unwrap().https,
            Some(false)
        );
        assert_eq!(
            StatusAddr::parse("https://localhost:1").unwrap().https,
            Some(true)
        );
        assert_eq!(StatusAddr::parse("unix:/run/l.sock").unwrap().https, None);
        assert!(StatusAddr::parse("http://nope").is_err());
        assert!(StatusAddr::parse("http://unix:/run/l.sock").is_err());
    }

    #[test]
    fn non_loopback_targets_need_unsafe_target() {
        let f = TunnelFile {
            side: Some(Side::Server),
            listen: Some("0.0.0.0:8443".into()),
            target: Some(Targets::One("10.0.0.5:6379".into())),
            cert: Some("c".into()),
            key: Some("k".into()),
            cacert: Some("ca".into()),
            allow_all: true,
            ..TunnelFile::default()
        };
        let errs = f.validate("t", None).unwrap_err();
        assert!(errs[0].contains("--unsafe-target"), "{errs:?}");
        let ok = TunnelFile {
            unsafe_target: true,
            ..f
        };
        assert!(ok.validate("t", None).is_ok());
    }
}
