//! Upstreams as written: a target (or route) is one endpoint or several, each
//! `ADDRESS[,weight=N][,priority=N][,name=TLS-NAME]`, or a discovery source (`srv:NAME`,
//! `dns:HOST:PORT`, `file:PATH`), in a flag (repeatable) or a TOML string or list.
//!
//! In: the strings. Out: an [`Upstream`], its endpoints validated, or one line saying what is
//! wrong with which entry.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::net::Address;

/// The heaviest weight an endpoint may have: weights are relative, and a range this wide is
/// enough for any real split while keeping round-robin sums small.
pub const MAX_WEIGHT: u32 = 1000;

/// A target or route as written: one string, or a list; a route may also be a table with its
/// own balance policy, `{ target = [...], balance = "round-robin" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
    Table(RouteTable),
}

/// A route written as a table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteTable {
    pub target: Box<Targets>,
    pub balance: Option<Balance>,
    /// `"redis"` (implied by any `redis_*` key or `require_role`) or `"tcp"`.
    pub protocol: Option<Protocol>,
    pub redis_password_file: Option<std::path::PathBuf>,
    pub redis_password_env: Option<String>,
    pub redis_user: Option<String>,
    pub redis_hello: Option<u8>,
    pub redis_consumer_auth: Option<crate::redis::ConsumerAuth>,
    pub require_role: Option<String>,
}

/// What a route speaks: bytes, or Redis (credentials, roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Redis,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Protocol, String> {
        match s {
            "redis" => Ok(Protocol::Redis),
            "tcp" => Ok(Protocol::Tcp),
            _ => Err(format!("--protocol {s:?}: write redis or tcp")),
        }
    }
}

/// The Redis keys of a tunnel or of a route table, as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisKeys {
    pub protocol: Option<Protocol>,
    pub password_file: Option<std::path::PathBuf>,
    pub password_env: Option<String>,
    pub user: Option<String>,
    pub hello: Option<u8>,
    pub consumer_auth: Option<crate::redis::ConsumerAuth>,
    pub require_role: Option<String>,
}

impl RedisKeys {
    /// These keys, each one not given taken from `base` (a route's over its tunnel's). The
    /// password's source goes as a pair: a route naming a file does not also get the tunnel's
    /// variable.
    pub fn over(&self, base: &RedisKeys) -> RedisKeys {
        let own_secret = self.password_file.is_some() || self.password_env.is_some();
        let (password_file, password_env) = if own_secret {
            (self.password_file.clone(), self.password_env.clone())
        } else {
            (base.password_file.clone(), base.password_env.clone())
        };
        // A route's own Redis keys make it a Redis route whatever its tunnel says.
        let own = self.any_redis_key().then_some(Protocol::Redis);
        RedisKeys {
            protocol: self.protocol.or(own).or(base.protocol),
            password_file,
            password_env,
            user: self.user.clone().or_else(|| base.user.clone()),
            hello: self.hello.or(base.hello),
            consumer_auth: self.consumer_auth.or(base.consumer_auth),
            require_role: self
                .require_role
                .clone()
                .or_else(|| base.require_role.clone()),
        }
    }

    fn any_redis_key(&self) -> bool {
        self.password_file.is_some()
            || self.password_env.is_some()
            || self.user.is_some()
            || self.hello.is_some()
            || self.consumer_auth.is_some()
            || self.require_role.is_some()
    }

    /// The route's Redis settings: `None` for a plain TCP route. Every problem goes to `p`,
    /// prefixed with `what`; the password must be readable now.
    pub fn settings(
        &self,
        what: &str,
        p: &mut Vec<String>,
        base: Option<&Path>,
    ) -> Option<crate::redis::Settings> {
        use crate::redis::{Credentials, PasswordSource, Settings};
        match self.protocol {
            Some(Protocol::Tcp) if self.any_redis_key() => {
                p.push(format!(
                    "{what}: redis_* keys and require_role need protocol = \"redis\", not \"tcp\""
                ));
                return None;
            }
            Some(Protocol::Tcp) => return None,
            None if !self.any_redis_key() => return None,
            _ => {}
        }
        let password = match (&self.password_file, &self.password_env) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                p.push(format!(
                    "{what}: give --redis-password-file or --redis-password-env, not both"
                ));
                None
            }
            (Some(file), None) => Some(PasswordSource::File(match base {
                Some(b) if file.is_relative() => b.join(file),
                _ => file.clone(),
            })),
            (None, Some(var)) => Some(PasswordSource::Env(var.clone())),
        };
        if self.user.is_some() && password.is_none() {
            p.push(format!(
                "{what}: --redis-user needs --redis-password-file or --redis-password-env"
            ));
        }
        let credentials = password.map(|password| Credentials {
            user: self.user.clone(),
            password,
        });
        if let Some(Err(e)) = credentials.as_ref().map(Credentials::password) {
            p.push(format!("{what}: {e}"));
        }
        if let Some(n) = self.hello
            && !(2..=3).contains(&n)
        {
            p.push(format!(
                "{what}: --redis-hello {n}: write 2 or 3 (the RESP version HELLO asks for)"
            ));
        }
        if self.hello.is_some() && credentials.is_none() {
            p.push(format!(
                "{what}: --redis-hello authenticates: it needs --redis-password-file or --redis-password-env"
            ));
        }
        let require_master = match self.require_role.as_deref() {
            None => false,
            Some("master") => true,
            Some(other) => {
                p.push(format!(
                    "{what}: require_role {other:?}: the one role that can be required is \"master\""
                ));
                false
            }
        };
        Some(Settings {
            credentials,
            hello: self.hello,
            consumer_auth: self.consumer_auth.unwrap_or_default(),
            require_master,
        })
    }
}

impl Targets {
    pub fn items(&self) -> &[String] {
        match self {
            Targets::One(s) => std::slice::from_ref(s),
            Targets::Many(v) => v,
            Targets::Table(t) => t.target.items(),
        }
    }

    /// The Redis keys a route table gives itself.
    pub fn redis_keys(&self) -> RedisKeys {
        match self {
            Targets::Table(t) => RedisKeys {
                protocol: t.protocol,
                password_file: t.redis_password_file.clone(),
                password_env: t.redis_password_env.clone(),
                user: t.redis_user.clone(),
                hello: t.redis_hello,
                consumer_auth: t.redis_consumer_auth,
                require_role: t.require_role.clone(),
            },
            _ => RedisKeys::default(),
        }
    }

    /// The balance policy a route table gives itself.
    fn balance(&self) -> Option<Balance> {
        match self {
            Targets::Table(t) => t.balance.or_else(|| t.target.balance()),
            _ => None,
        }
    }

    /// Adds an entry (a repeated flag).
    pub fn push(this: &mut Option<Targets>, entry: String) {
        *this = Some(match this.take() {
            None => Targets::One(entry),
            Some(Targets::One(first)) => Targets::Many(vec![first, entry]),
            Some(Targets::Many(mut v)) => {
                v.push(entry);
                Targets::Many(v)
            }
            Some(Targets::Table(mut t)) => {
                let mut inner = Some(*t.target);
                Targets::push(&mut inner, entry);
                t.target = Box::new(inner.expect("pushed"));
                Targets::Table(t)
            }
        });
    }
}

/// How new connections are spread over a route's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Power of two random choices: of two endpoints drawn at random, the one with fewer open
    /// connections per unit of weight.
    #[default]
    P2c,
    /// Smooth weighted round robin, as nginx does it.
    RoundRobin,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Balance, String> {
        match s {
            "p2c" => Ok(Balance::P2c),
            "round-robin" => Ok(Balance::RoundRobin),
            _ => Err(format!(
                "--balance {s:?}: write p2c (the default) or round-robin"
            )),
        }
    }
}

/// One endpoint of an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub addr: Address,
    /// Relative share of new connections, 1 to [`MAX_WEIGHT`].
    pub weight: u32,
    /// Lower first: endpoints of a higher number take connections only while none of a lower
    /// one can (DNS SRV's meaning). 0 unless given.
    pub priority: u16,
    /// Client side: the name its certificate must be valid for, when not the address's host.
    pub name: Option<String>,
    /// The name discovery found it under (an SRV target, a `dns:` host), which its
    /// certificate must carry unless `name` or `--override-server-name` says otherwise.
    pub dns_name: Option<String>,
}

impl EndpointSpec {
    /// `ADDRESS[,weight=N][,name=NAME]`; relative `unix:` paths resolve against `base`.
    pub fn parse(s: &str, base: Option<&Path>) -> Result<EndpointSpec, String> {
        let mut parts = s.split(',');
        let addr = Address::parse(parts.next().unwrap_or_default().trim())?.resolve(base);
        if matches!(addr, Address::Systemd(_)) {
            return Err(format!(
                "{s:?}: systemd: is a socket systemd passes in, for --listen only"
            ));
        }
        let mut spec = EndpointSpec {
            addr,
            weight: 1,
            priority: 0,
            name: None,
            dns_name: None,
        };
        for option in parts {
            match option.trim().split_once('=') {
                Some(("weight", w)) => {
                    spec.weight = w
                        .parse()
                        .ok()
                        .filter(|w| (1..=MAX_WEIGHT).contains(w))
                        .ok_or_else(|| {
                            format!(
                                "{s:?}: weight {w:?} must be a whole number from 1 to {MAX_WEIGHT}"
                            )
                        })?;
                }
                Some(("priority", n)) => {
                    spec.priority = n.parse().map_err(|_| {
                        format!("{s:?}: priority {n:?} must be a whole number from 0 to 65535")
                    })?;
                }
                Some(("name", n)) if !n.is_empty() => spec.name = Some(n.to_string()),
                _ => {
                    return Err(format!(
                        "{s:?}: after the address come only ,weight=N, ,priority=N and ,name=TLS-NAME"
                    ));
                }
            }
        }
        Ok(spec)
    }
}

impl fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)?;
        if self.weight != 1 {
            write!(f, ",weight={}", self.weight)?;
        }
        if self.priority != 0 {
            write!(f, ",priority={}", self.priority)?;
        }
        if let Some(name) = &self.name {
            write!(f, ",name={name}")?;
        }
        Ok(())
    }
}

/// Where endpoints are discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `srv:_service._tcp.name.`: DNS SRV records, by priority and weight (RFC 2782); each
    /// target's certificate is checked against the target's name.
    Srv(String),
    /// `dns:HOST:PORT`: every A/AAAA address of HOST, re-resolved on the answer's TTL.
    Dns { host: String, port: u16 },
    /// `file:PATH`: a TOML file `endpoints = ["ADDR,weight=N", ...]`, reread when it changes
    /// (an atomic rename, a Kubernetes ConfigMap's `..data` swap).
    File(std::path::PathBuf),
    /// `mdns:` or `mdns:SERVICE-TYPE`: server ambassadors announced over mDNS / DNS-SD
    /// (`_legate._tcp.local.` by default), those listing `route` in their TXT record (any,
    /// when empty). Client side.
    Mdns { service: String, route: String },
    /// `sentinel:MASTER@HOST:PORT[,HOST:PORT...]`: the master Redis Sentinels name, asked in
    /// turn, followed by their `+switch-master` announcements.
    Sentinel {
        master: String,
        sentinels: Vec<crate::net::HostPort>,
    },
}

impl Source {
    fn parse(s: &str, base: Option<&Path>) -> Option<Result<Source, String>> {
        if let Some(name) = s.strip_prefix("srv:") {
            return Some(if name.starts_with('_') && name.contains("._") {
                Ok(Source::Srv(name.to_string()))
            } else {
                Err(format!(
                    "{s:?}: an SRV name looks like srv:_service._tcp.example.org."
                ))
            });
        }
        if let Some(service) = s.strip_prefix("mdns:") {
            let service = if service.is_empty() {
                crate::mdns::SERVICE
            } else {
                service
            };
            return Some(
                if service.starts_with('_') && service.ends_with("._tcp.local.") {
                    Ok(Source::Mdns {
                        service: service.to_string(),
                        route: String::new(),
                    })
                } else {
                    Err(format!(
                        "{s:?}: write mdns: (for _legate._tcp.local.) or mdns:_service._tcp.local."
                    ))
                },
            );
        }
        if let Some(rest) = s.strip_prefix("sentinel:") {
            let parsed = rest.split_once('@').and_then(|(master, list)| {
                let sentinels: Option<Vec<_>> = list
                    .split(',')
                    .map(|hp| crate::net::HostPort::parse(hp.trim()).ok())
                    .collect();
                Some((master, sentinels?))
            });
            return Some(match parsed {
                Some((master, sentinels)) if !master.is_empty() && !sentinels.is_empty() => {
                    Ok(Source::Sentinel {
                        master: master.to_string(),
                        sentinels,
                    })
                }
                _ => Err(format!(
                    "{s:?}: write sentinel:MASTER-NAME@HOST:PORT[,HOST:PORT...]"
                )),
            });
        }
        if let Some(hp) = s.strip_prefix("dns:") {
            return Some(match crate::net::HostPort::parse(hp) {
                Ok(hp) if hp.host.parse::<std::net::IpAddr>().is_err() => Ok(Source::Dns {
                    host: hp.host,
                    port: hp.port,
                }),
                Ok(_) => Err(format!("{s:?}: dns: takes a name, not an address")),
                Err(e) => Err(format!("{s:?}: {e}")),
            });
        }
        let path = s.strip_prefix("file:")?;
        Some(if path.is_empty() {
            Err(format!("{s:?}: file: needs a path"))
        } else {
            let path = std::path::PathBuf::from(path);
            Ok(Source::File(match base {
                Some(base) if path.is_relative() => base.join(path),
                _ => path,
            }))
        })
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Srv(name) => write!(f, "srv:{name}"),
            Source::Dns { host, port } => write!(f, "dns:{host}:{port}"),
            Source::File(path) => write!(f, "file:{}", path.display()),
            Source::Mdns { service, .. } => write!(f, "mdns:{service}"),
            Source::Sentinel { master, sentinels } => {
                let list: Vec<String> = sentinels.iter().map(ToString::to_string).collect();
                write!(f, "sentinel:{master}@{}", list.join(","))
            }
        }
    }
}

/// Process-wide discovery settings (`--nameserver`, the re-resolution bounds, the hold time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoverySettings {
    /// The DNS server to ask; `None`: the system's (`/etc/resolv.conf`).
    pub nameserver: Option<SocketAddr>,
    pub min_interval: Duration,
    pub max_interval: Duration,
    /// How long the last good endpoints of a failing source are kept.
    pub hold: Duration,
}

impl Default for DiscoverySettings {
    fn default() -> DiscoverySettings {
        DiscoverySettings {
            nameserver: None,
            min_interval: Duration::from_secs(1),
            max_interval: Duration::from_secs(60),
            hold: Duration::from_secs(300),
        }
    }
}

/// Active health checks of a server side's service endpoints: a TCP connect every `interval`
/// within `timeout`; down after `fall` failures in a row, up after `rise` passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthCheck {
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// A validated target or route: endpoints given, and sources that discover more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub endpoints: Vec<EndpointSpec>,
    pub sources: Vec<Source>,
    /// Its own balance policy (a route table's), else the tunnel's.
    pub balance: Option<Balance>,
    /// A Redis route: credentials, the consumer's AUTH, the role required.
    pub redis: Option<crate::redis::Settings>,
}

impl Upstream {
    /// Parses every entry, reporting each bad one.
    pub fn parse(what: &str, targets: &Targets, base: Option<&Path>) -> Result<Upstream, String> {
        let (mut endpoints, mut sources) = (Vec::new(), Vec::new());
        for item in targets.items() {
            let item = item.trim();
            match Source::parse(item, base) {
                Some(source) => sources.push(source.map_err(|e| format!("{what}: {e}"))?),
                None => endpoints
                    .push(EndpointSpec::parse(item, base).map_err(|e| format!("{what}: {e}"))?),
            }
        }
        if endpoints.is_empty() && sources.is_empty() {
            return Err(format!("{what}: an empty list; give at least one address"));
        }
        for (i, e) in endpoints.iter().enumerate() {
            if endpoints[..i].iter().any(|o| o.addr == e.addr) {
                return Err(format!("{what}: {} is listed twice", e.addr));
            }
        }
        Ok(Upstream {
            endpoints,
            sources,
            balance: targets.balance(),
            redis: None,
        })
    }

    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        self.endpoints.iter().map(|e| &e.addr)
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let endpoints = self.endpoints.iter().map(ToString::to_string);
        let sources = self.sources.iter().map(ToString::to_string);
        let all: Vec<String> = endpoints.chain(sources).collect();
        f.write_str(&all.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_with_options() {
        let e = EndpointSpec::parse("10.0.0.1:6379,weight=3,name=cache-1.internal", None).unwrap();
        assert_eq!(e.addr.to_string(), "10.0.0.1:6379");
        assert_eq!(e.weight, 3);
        assert_eq!(e.name.as_deref(), Some("cache-1.internal"));
        assert_eq!(
            e.to_string(),
            "10.0.0.1:6379,weight=3,name=cache-1.internal"
        );
        let e = EndpointSpec::parse("unix:run/r.sock", Some(Path::new("/etc/legate"))).unwrap();
        assert_eq!(e.addr.to_string(), "unix:/etc/legate/run/r.sock");
        for bad in [
            "h:1,weight=0",
            "h:1,weight=1001",
            "h:1,weight=x",
            "h:1,colour=red",
            "h:1,name=",
            "h:1,",
            "nope",
        ] {
            assert!(EndpointSpec::parse(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn upstreams_from_one_or_many() {
        let one = Upstream::parse("--target", &Targets::One("a:1".into()), None).unwrap();
        assert_eq!(one.to_string(), "a:1");
        let mut t = None;
        Targets::push(&mut t, "a:1".into());
        Targets::push(&mut t, "b:2,weight=2".into());
        Targets::push(&mut t, "c:3".into());
        let many = Upstream::parse("--target", t.as_ref().unwrap(), None).unwrap();
        assert_eq!(many.to_string(), "a:1 b:2,weight=2 c:3");
        let mixed = Targets::Many(vec![
            "a:1,priority=10".into(),
            "srv:_redis._tcp.cache.example.".into(),
            "dns:cache.example:6379".into(),
            "file:eps.toml".into(),
        ]);
        let mixed = Upstream::parse("--target", &mixed, Some(Path::new("/etc/legate"))).unwrap();
        assert_eq!(mixed.endpoints[0].priority, 10);
        assert_eq!(
            mixed.to_string(),
            "a:1,priority=10 srv:_redis._tcp.cache.example. dns:cache.example:6379 file:/etc/legate/eps.toml"
        );
        let table: Targets = toml::from_str::<std::collections::BTreeMap<String, Targets>>(
            "r = { target = [\"a:1\", \"b:2\"], balance = \"round-robin\" }",
        )
        .unwrap()
        .remove("r")
        .unwrap();
        let routed = Upstream::parse("route", &table, None).unwrap();
        assert_eq!(routed.balance, Some(Balance::RoundRobin));
        assert_eq!(routed.endpoints.len(), 2);
        let sentinel = Targets::One("sentinel:cache@127.0.0.1:26379, 127.0.0.1:26380".into());
        let sentinel = Upstream::parse("--target", &sentinel, None).unwrap();
        assert_eq!(
            sentinel.to_string(),
            "sentinel:cache@127.0.0.1:26379,127.0.0.1:26380"
        );
        for bad in [
            "sentinel:cache",
            "sentinel:@127.0.0.1:26379",
            "sentinel:cache@nope",
            "srv:cache.example",
            "dns:10.0.0.1:6379",
            "dns:cache",
            "file:",
        ] {
            let t = Targets::One(bad.into());
            assert!(Upstream::parse("--target", &t, None).is_err(), "{bad}");
        }
        let twice = Targets::Many(vec!["a:1".into(), "a:1,weight=2".into()]);
        let e = Upstream::parse("route \"x\"", &twice, None).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        assert!(Upstream::parse("--target", &Targets::Many(vec![]), None).is_err());
    }
}
