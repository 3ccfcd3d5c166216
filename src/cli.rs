//! The command line: subcommands and flags, turned into the same [`TunnelFile`] a config file
//! holds, so flags and files share one validation path.
//!
//! Flag names and `--flag=value` syntax are ghostunnel's wherever the two overlap.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::certs::KeyType;
use crate::config::{ProcessFile, Side, Targets, TunnelFile};

#[derive(Debug, Parser)]
#[command(
    name = "legate",
    version,
    about = "Mutual-TLS ambassadors: carry plain TCP between hosts over authenticated TLS",
    long_about = None,
    propagate_version = true
)]
pub struct Cli {
    /// Log line format. The level filter comes from RUST_LOG (default: info).
    #[arg(help_heading = "Logging", long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Silence classes of log lines: conns (connections that end well), conn-errs (connections
    /// that fail after the handshake), handshake-errs (failed handshakes), all (those three and
    /// every other line below warnings). Repeatable or comma-separated.
    #[arg(
        help_heading = "Logging",
        long,
        value_enum,
        value_delimiter = ',',
        global = true
    )]
    pub quiet: Vec<crate::log::QuietClass>,

    /// Runtime worker threads (one runs a single-threaded runtime). [default: half the CPUs,
    /// at least one]
    #[arg(
        help_heading = "Process (every tunnel)",
        long,
        value_name = "N",
        global = true
    )]
    pub threads: Option<usize>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Accept mutual TLS on --listen and forward the plaintext to --target (next to the service).
    Server(ServerArgs),
    /// Accept plaintext on --listen and carry it over mutual TLS to a legate server at --target
    /// (next to the application).
    Client(ClientArgs),
    /// Run every tunnel of a TOML config file in one process.
    Run(RunArgs),
    /// Diagnose a client tunnel step by step: certificates, each server's name, TCP, TLS and
    /// identity, the legate/1 greeting and route, and (--redis) a PING through it. Give a
    /// config file, or the flags `legate client` takes. Exit 0 when all pass, 1 on a warning,
    /// 2 on a failure.
    Check(CheckArgs),
    /// Write a CA plus server and client certificates, ready for the two sides.
    GenCerts(GenCertsArgs),
    /// Print a shell completion script (e.g. `legate completions bash > /etc/bash_completion.d/legate`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to standard output (e.g. `legate man | man -l -`).
    Man,
}

/// Flags both sides take.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Address to accept connections on: HOST:PORT, unix:PATH, or systemd:NAME (a socket
    /// systemd passes in). With --from-docker-env: the host only (127.0.0.1 unless given);
    /// each tunnel listens on its link's port.
    #[arg(
        help_heading = "Addresses",
        long,
        value_name = "ADDR",
        required_unless_present = "from_docker_env"
    )]
    pub listen: Option<String>,
    /// Docker-link variables: one tunnel per ALIAS_PORT_<port>_TCP=tcp://host:port of these
    /// aliases (comma-separated; only those listed), listening on that port, forwarding to
    /// that address. UDP links are skipped with a warning. Instead of --target.
    #[arg(
        help_heading = "Addresses",
        long,
        value_name = "ALIAS",
        value_delimiter = ','
    )]
    pub from_docker_env: Vec<String>,
    /// Where to forward: the service (server side) or the legate server (client side).
    /// Repeatable: several endpoints share the connections (see --balance), a failed connect
    /// tries the next. Each is ADDR[,weight=N][,priority=N][,name=TLS-NAME], ADDR being
    /// HOST:PORT or unix:PATH; or a source: srv:NAME, dns:HOST:PORT, file:PATH,
    /// sentinel:MASTER@HOST:PORT,...
    #[arg(help_heading = "Addresses", long, value_name = "ADDR")]
    pub target: Vec<String>,
    /// How new connections are spread over several endpoints: p2c (fewest open connections of
    /// two drawn at random, per unit of weight) or round-robin (by weight). [default: p2c]
    #[arg(help_heading = "Addresses", long, value_name = "POLICY")]
    pub balance: Option<crate::config::Balance>,
    /// Do not resolve --target (or a route) at startup: it may not exist yet.
    #[arg(help_heading = "Addresses", long)]
    pub skip_resolve: bool,
    /// This side's certificate chain (PEM).
    #[arg(
        help_heading = "Identity",
        long,
        value_name = "PATH",
        requires = "key",
        conflicts_with = "keystore"
    )]
    pub cert: Option<PathBuf>,
    /// This side's private key (PEM: PKCS#8, SEC1 or RSA).
    #[arg(
        help_heading = "Identity",
        long,
        value_name = "PATH",
        requires = "cert"
    )]
    pub key: Option<PathBuf>,
    /// This side's identity in one file: PKCS#12, or PEM with the chain and the key.
    #[arg(help_heading = "Identity", long, value_name = "PATH")]
    pub keystore: Option<PathBuf>,
    /// Password of a PKCS#12 keystore. [default: empty]
    #[arg(
        help_heading = "Identity",
        long,
        value_name = "PASS",
        env = "KEYSTORE_PASS",
        hide_env_values = true
    )]
    pub storepass: Option<String>,
    /// CA bundle (PEM) that peers' certificates must chain to.
    #[arg(help_heading = "Identity", long, value_name = "PATH")]
    pub cacert: Option<PathBuf>,
    /// Certificate revocation list (PEM or DER): peers whose certificate it lists are refused.
    #[arg(help_heading = "Identity", long, value_name = "PATH")]
    pub crl: Option<PathBuf>,
    /// Lowest TLS version to accept: TLS1.3 or TLS1.2. [default: TLS1.3]
    #[arg(help_heading = "Identity", long, value_name = "VERSION")]
    pub min_tls_version: Option<String>,
    /// Highest TLS version to speak, on the tunnel and the HTTPS status port: TLS1.3 or TLS1.2
    /// (which alone also lowers the minimum to TLS1.2). [default: TLS1.3]
    #[arg(help_heading = "Identity", long, value_name = "VERSION")]
    pub max_tls_version: Option<String>,
    /// Time allowed to connect onward (client side: TCP plus TLS handshake). [default: 10s]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Once one direction of a connection ends, time allowed for the other. [default: 10s]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub close_timeout: Option<String>,
    /// Time allowed for an incoming TLS handshake (server side). [default: --connect-timeout]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub handshake_timeout: Option<String>,
    /// TCP keepalive idle time on the TLS side, then 10 probes at a tenth of it (a dead link is
    /// noticed after about twice this); 0 turns it off. [default: 30s]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub keepalive: Option<String>,
    /// Close a connection this long after it was established, whatever it is doing (counted
    /// as a timeout); 0 is no limit. [default: 0]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub max_conn_lifetime: Option<String>,
    /// Most connections open at once; further ones wait; 0 is unlimited. [default: 0]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "N")]
    pub max_concurrent_conns: Option<usize>,
    /// On SIGTERM/SIGINT, time open connections get to finish. [default: 5m]
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Serve /_status and /_metrics on [http(s)://]HOST:PORT or unix:PATH: HTTPS with this
    /// side's live certificate when it has one, plain HTTP when it has none, on a unix: socket,
    /// or when written http://HOST:PORT.
    #[arg(help_heading = "Status and metrics", long, value_name = "ADDR")]
    pub status: Option<String>,
    /// What the ghostunnel-shaped metric names in /_metrics start with, so dashboards built on
    /// ghostunnel keep working. [default: ghostunnel]
    #[arg(help_heading = "Status and metrics", long, value_name = "PREFIX")]
    pub metrics_prefix: Option<String>,
    /// Serve /debug/pprof/goroutine on the status listener: the live task count, in the shape
    /// of ghostunnel's goroutine count (leak checks written against it keep working).
    #[arg(help_heading = "Status and metrics", long)]
    pub enable_pprof: bool,
    /// The DNS server srv: and dns: targets ask (IP[:PORT]). [default: the system's]
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "IP:PORT")]
    pub nameserver: Option<String>,
    /// srv: and dns: targets are looked up again on their answer's TTL, but not sooner than
    /// this. [default: 1s]
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "DURATION")]
    pub dns_min_interval: Option<String>,
    /// ... and not later than this. [default: 60s]
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "DURATION")]
    pub dns_max_interval: Option<String>,
    /// How long a discovery source that fails keeps its last endpoints. [default: 5m]
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "DURATION")]
    pub discovery_hold: Option<String>,
    /// Reload certificate, key, CA bundle and CRL this often (as SIGHUP does).
    #[arg(help_heading = "Process (every tunnel)", long, value_name = "DURATION")]
    pub timed_reload: Option<String>,
    /// Server side: accept clients without certificates. Client side: present no certificate.
    /// Logged loudly: anyone who reaches the port gets through.
    #[arg(help_heading = "Identity", long)]
    pub disable_authentication: bool,
    /// Start even when the private key (or keystore) is readable by group or others, as on a
    /// volume that cannot be made private. Without it such a key is refused, like ssh does.
    #[arg(help_heading = "Identity", long)]
    pub allow_readable_key: bool,
}

#[derive(Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Admit any client whose certificate chains to --cacert.
    #[arg(help_heading = "Access", long)]
    pub allow_all: bool,
    /// Admit clients with this subject common name (repeatable).
    #[arg(help_heading = "Access", long, value_name = "CN")]
    pub allow_cn: Vec<String>,
    /// Admit clients with this subject organizational unit (repeatable).
    #[arg(help_heading = "Access", long, value_name = "OU")]
    pub allow_ou: Vec<String>,
    /// Admit clients with this DNS SAN (repeatable).
    #[arg(help_heading = "Access", long, value_name = "DNS")]
    pub allow_dns: Vec<String>,
    /// Admit clients with this URI SAN; a trailing /* matches one path segment, /** any
    /// (repeatable).
    #[arg(help_heading = "Access", long, value_name = "URI")]
    pub allow_uri: Vec<String>,
    /// Admit clients with this IP address SAN (repeatable).
    #[arg(
        help_heading = "Access",
        long,
        value_name = "IP",
        alias = "allow-ip-san"
    )]
    pub allow_ip: Vec<String>,
    /// A named route for legate/1 clients: NAME=ADDR (repeatable; the same NAME again adds an
    /// endpoint to that route).
    #[arg(help_heading = "Addresses", long = "route", value_name = "NAME=ADDR", value_parser = parse_route)]
    pub routes: Vec<(String, String)>,
    /// Allow a --target (or route) that is not on loopback.
    #[arg(help_heading = "Addresses", long)]
    pub unsafe_target: bool,
    /// How long a legate/1 connection may wait for its next stream (clients keep connections
    /// ready and reuse them). [default: 60s]
    #[arg(help_heading = "Timeouts and limits", long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Check each service endpoint with a TCP connect this often; one that fails
    /// --health-fall checks in a row gets no new connections until it passes --health-rise.
    /// Off by default.
    #[arg(help_heading = "Service and health", long, value_name = "DURATION")]
    pub health_interval: Option<String>,
    /// Time a health check's connect may take (at most the interval). [default: 2s]
    #[arg(help_heading = "Service and health", long, value_name = "DURATION")]
    pub health_timeout: Option<String>,
    /// Passing checks in a row that bring an endpoint back. [default: 2]
    #[arg(help_heading = "Service and health", long, value_name = "N")]
    pub health_rise: Option<u32>,
    /// Failing checks in a row that take an endpoint out. [default: 3]
    #[arg(help_heading = "Service and health", long, value_name = "N")]
    pub health_fall: Option<u32>,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// "master": a stream reaches the target only while it is a Redis master (HELLO's role,
    /// checked on each connection; refused with not_master otherwise, so a client ambassador
    /// tries its next server). Streams open on a Redis that stops being master are closed.
    #[arg(help_heading = "Redis", long, value_name = "ROLE")]
    pub require_role: Option<String>,
    /// /_status checks the service with an HTTP GET of this http:// or https:// URL, sent over
    /// a connection to --target; only a 200 is healthy. Without it, a TCP connect is the check.
    #[arg(help_heading = "Service and health", long, value_name = "URL")]
    pub target_status: Option<String>,
    /// Send a PROXY protocol v2 header to the target: the consumer's address (over legate/1)
    /// or the client side's, and the client's identity as TLVs.
    #[arg(help_heading = "Service and health", long)]
    pub proxy_protocol: bool,
    /// Announce this server over mDNS / DNS-SD as _legate._tcp.local. (routes in TXT), until
    /// it stops; clients find it with --target=mdns: (no DNS server or registry needed).
    #[arg(help_heading = "Addresses", long)]
    pub announce: bool,
}

/// A Redis route's credentials, on either side: a server ambassador authenticates to the Redis
/// next to it; a client ambassador with --raw to a Redis that speaks TLS itself.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Authenticate to Redis before relaying, with the password in this file (mode 0600; read
    /// for every connection, so a new one is used at once). Consumers then need no AUTH.
    #[arg(
        help_heading = "Redis",
        long = "redis-password-file",
        value_name = "PATH"
    )]
    pub password_file: Option<std::path::PathBuf>,
    /// ... or with the password in this environment variable.
    #[arg(
        help_heading = "Redis",
        long = "redis-password-env",
        value_name = "VAR"
    )]
    pub password_env: Option<String>,
    /// The ACL user to authenticate as (AUTH user password). [default: default]
    #[arg(help_heading = "Redis", long = "redis-user", value_name = "USER")]
    pub user: Option<String>,
    /// Authenticate with HELLO N AUTH user password (N = 2 or 3: the RESP version the
    /// connection then speaks) instead of AUTH.
    #[arg(help_heading = "Redis", long = "redis-hello", value_name = "N")]
    pub hello: Option<u8>,
    /// The consumer's own leading AUTH (and HELLO's AUTH): pass (relay it) or local (answer
    /// AUTH with +OK here, strip AUTH from HELLO): the ambassador's credentials are then the
    /// only ones Redis sees. [default: pass]
    #[arg(
        help_heading = "Redis",
        long = "redis-consumer-auth",
        value_name = "POLICY"
    )]
    pub consumer_auth: Option<crate::redis::ConsumerAuth>,
    /// The target speaks Redis (implied by --redis-* and --require-role): "redis" or "tcp".
    #[arg(help_heading = "Redis", long, value_name = "PROTOCOL")]
    pub protocol: Option<crate::config::Protocol>,
}

impl RedisArgs {
    fn apply(self, f: &mut TunnelFile) {
        f.redis_password_file = self.password_file;
        f.redis_password_env = self.password_env;
        f.redis_user = self.user;
        f.redis_hello = self.hello;
        f.redis_consumer_auth = self.consumer_auth;
        f.protocol = self.protocol;
    }
}

#[derive(Debug, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    /// Require this common name on the server's certificate (repeatable, any matches).
    #[arg(help_heading = "Access", long, value_name = "CN")]
    pub verify_cn: Vec<String>,
    /// Require this organizational unit on the server's certificate.
    #[arg(help_heading = "Access", long, value_name = "OU")]
    pub verify_ou: Vec<String>,
    /// Require this DNS SAN on the server's certificate.
    #[arg(help_heading = "Access", long, value_name = "DNS")]
    pub verify_dns: Vec<String>,
    /// Require this URI SAN on the server's certificate (trailing /* or /** allowed).
    #[arg(help_heading = "Access", long, value_name = "URI")]
    pub verify_uri: Vec<String>,
    /// Require this IP address SAN on the server's certificate (repeatable, any matches).
    #[arg(
        help_heading = "Access",
        long,
        value_name = "IP",
        alias = "verify-ip-san"
    )]
    pub verify_ip: Vec<String>,
    /// Verify the server's certificate for this name instead of --target's host.
    #[arg(help_heading = "Access", long, value_name = "NAME")]
    pub override_server_name: Option<String>,
    /// Ask a legate server for this named route (legate/1).
    #[arg(help_heading = "Addresses", long, value_name = "NAME")]
    pub route: Option<String>,
    /// Do not offer legate/1: the TLS stream is the byte stream (for non-legate servers;
    /// legate falls back to this by itself when the server does not pick legate/1).
    #[arg(help_heading = "Addresses", long)]
    pub raw: bool,
    /// Allow a --listen address that is not on loopback.
    #[arg(help_heading = "Addresses", long)]
    pub unsafe_listen: bool,
    /// Multiplexed legate/1 connections to keep open to a legate server, each carrying any
    /// number of consumer connections as streams; 0 gives every consumer connection a TLS
    /// connection of its own. [default: one per worker thread (--threads), at most 4]
    #[arg(help_heading = "Addresses", long, value_name = "N")]
    pub pool_size: Option<usize>,
    /// The server is a legate: keep connections open from startup, so even the first consumer
    /// pays no handshake. Without it (or --route), nothing is opened before a consumer
    /// connects, and the first one finds out what the server speaks.
    #[arg(help_heading = "Addresses", long)]
    pub peer_is_legate: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML file with [tunnels.NAME] tables.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Validate the file (and load every certificate and key) and exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A TOML config file: its client tunnels are checked (or only --tunnel NAME).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The tunnel of --config to check.
    #[arg(long, value_name = "NAME", requires = "config")]
    pub tunnel: Option<String>,
    /// One JSON array of steps instead of text.
    #[arg(long)]
    pub json: bool,
    /// The service is Redis: PING it through the tunnel.
    #[arg(long)]
    pub redis: bool,
    /// Without --config: the flags `legate client` takes (--listen may be left out).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CLIENT FLAGS"
    )]
    pub client: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GenCertsArgs {
    /// Directory to write into; a CA already there is reused.
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub out: PathBuf,
    /// A name the server certificate is valid for: DNS name or IP address (repeatable).
    /// Default when neither this nor --client is given: localhost and 127.0.0.1.
    #[arg(long, value_name = "NAME")]
    pub server_name: Vec<String>,
    /// Issue a client certificate with this common name (repeatable). Default when neither
    /// this nor --server-name is given: "client".
    #[arg(long, value_name = "NAME")]
    pub client: Vec<String>,
    /// Add spiffe://DOMAIN/NAME URI SANs to the leaves.
    #[arg(long, value_name = "DOMAIN")]
    pub trust_domain: Option<String>,
    /// Leaf validity in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Key algorithm.
    #[arg(long, value_enum, default_value_t = KeyType::EcdsaP256)]
    pub key_type: KeyType,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

fn parse_route(s: &str) -> Result<(String, String), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("route {s:?} must be NAME=HOST:PORT"))?;
    Ok((name.to_string(), addr.to_string()))
}

impl CommonArgs {
    fn process(&self) -> ProcessFile {
        ProcessFile {
            shutdown_timeout: self.shutdown_timeout.clone(),
            status: self.status.clone(),
            timed_reload: self.timed_reload.clone(),
            threads: None,
            metrics_prefix: self.metrics_prefix.clone(),
            enable_pprof: self.enable_pprof,
            nameserver: self.nameserver.clone(),
            dns_min_interval: self.dns_min_interval.clone(),
            dns_max_interval: self.dns_max_interval.clone(),
            discovery_hold: self.discovery_hold.clone(),
        }
    }

    fn into_file(self, side: Side) -> TunnelFile {
        TunnelFile {
            side: Some(side),
            listen: self.listen,
            from_docker_env: self.from_docker_env,
            target: self.target.into_iter().fold(None, |mut t, entry| {
                Targets::push(&mut t, entry);
                t
            }),
            balance: self.balance,
            cert: self.cert,
            key: self.key,
            keystore: self.keystore,
            storepass: self.storepass,
            cacert: self.cacert,
            crl: self.crl,
            disable_authentication: self.disable_authentication,
            allow_readable_key: self.allow_readable_key,
            skip_resolve: self.skip_resolve,
            min_tls_version: self.min_tls_version,
            max_tls_version: self.max_tls_version,
            connect_timeout: self.connect_timeout,
            close_timeout: self.close_timeout,
            handshake_timeout: self.handshake_timeout,
            keepalive: self.keepalive,
            max_conn_lifetime: self.max_conn_lifetime,
            max_concurrent_conns: self.max_concurrent_conns,
            ..TunnelFile::default()
        }
    }
}

impl ServerArgs {
    /// The tunnel these flags describe, and the process settings.
    pub fn into_file(self) -> (TunnelFile, ProcessFile) {
        let process = self.common.process();
        let mut f = self.common.into_file(Side::Server);
        f.allow_all = self.allow_all;
        f.allow_cn = self.allow_cn;
        f.allow_ou = self.allow_ou;
        f.allow_dns = self.allow_dns;
        f.allow_uri = self.allow_uri;
        f.allow_ip = self.allow_ip;
        let mut routes: BTreeMap<String, Option<Targets>> = BTreeMap::new();
        for (name, entry) in self.routes {
            Targets::push(routes.entry(name).or_default(), entry);
        }
        f.routes = routes
            .into_iter()
            .filter_map(|(name, t)| Some((name, t?)))
            .collect();
        f.unsafe_target = self.unsafe_target;
        f.proxy_protocol = self.proxy_protocol;
        f.announce = self.announce;
        f.idle_timeout = self.idle_timeout;
        f.target_status = self.target_status;
        f.health_interval = self.health_interval;
        f.health_timeout = self.health_timeout;
        f.health_rise = self.health_rise;
        f.health_fall = self.health_fall;
        self.redis.apply(&mut f);
        f.require_role = self.require_role;
        (f, process)
    }
}

impl ClientArgs {
    /// The tunnel these flags describe, and the process settings.
    pub fn into_file(self) -> (TunnelFile, ProcessFile) {
        let process = self.common.process();
        let mut f = self.common.into_file(Side::Client);
        f.verify_cn = self.verify_cn;
        f.verify_ou = self.verify_ou;
        f.verify_dns = self.verify_dns;
        f.verify_uri = self.verify_uri;
        f.verify_ip = self.verify_ip;
        f.override_server_name = self.override_server_name;
        f.route = self.route;
        f.raw = self.raw;
        f.unsafe_listen = self.unsafe_listen;
        f.pool_size = self.pool_size;
        f.peer_is_legate = self.peer_is_legate;
        self.redis.apply(&mut f);
        (f, process)
    }
}
