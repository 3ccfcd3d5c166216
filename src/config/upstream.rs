//! Upstreams as written: a target (or route) is one endpoint or several, each
//! `ADDRESS[,weight=N][,name=TLS-NAME]`, in a flag (repeatable) or a TOML string or list.
//!
//! In: the strings. Out: an [`Upstream`], its endpoints validated, or one line saying what is
//! wrong with which entry.

use std::fmt;
use std::path::Path;

use serde::Deserialize;

use crate::net::Address;

/// The heaviest weight an endpoint may have: weights are relative, and a range this wide is
/// enough for any real split while keeping round-robin sums small.
pub const MAX_WEIGHT: u32 = 1000;

/// A target or route as written: one string, or a list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Targets {
    One(String),
    Many(Vec<String>),
}

impl Targets {
    pub fn items(&self) -> &[String] {
        match self {
            Targets::One(s) => std::slice::from_ref(s),
            Targets::Many(v) => v,
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
    /// Client side: the name its certificate must be valid for, when not the address's host.
    pub name: Option<String>,
}

impl EndpointSpec {
    /// `ADDRESS[,weight=N][,name=NAME]`; relative `unix:` paths resolve against `base`.
    pub fn parse(s: &str, base: Option<&Path>) -> Result<EndpointSpec, String> {
        let mut parts = s.split(',');
        let addr = Address::parse(parts.next().unwrap_or_default().trim())?.resolve(base);
        let mut spec = EndpointSpec {
            addr,
            weight: 1,
            name: None,
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
                Some(("name", n)) if !n.is_empty() => spec.name = Some(n.to_string()),
                _ => {
                    return Err(format!(
                        "{s:?}: after the address come only ,weight=N and ,name=TLS-NAME"
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
        if let Some(name) = &self.name {
            write!(f, ",name={name}")?;
        }
        Ok(())
    }
}

/// A validated target or route: one or more endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub endpoints: Vec<EndpointSpec>,
}

impl Upstream {
    /// Parses every entry, reporting each bad one.
    pub fn parse(what: &str, targets: &Targets, base: Option<&Path>) -> Result<Upstream, String> {
        let endpoints = targets
            .items()
            .iter()
            .map(|s| EndpointSpec::parse(s, base).map_err(|e| format!("{what}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(format!("{what}: an empty list; give at least one address"));
        }
        for (i, e) in endpoints.iter().enumerate() {
            if endpoints[..i].iter().any(|o| o.addr == e.addr) {
                return Err(format!("{what}: {} is listed twice", e.addr));
            }
        }
        Ok(Upstream { endpoints })
    }

    /// The first endpoint's address (the only one, usually).
    pub fn first(&self) -> &Address {
        &self.endpoints[0].addr
    }

    pub fn addresses(&self) -> impl Iterator<Item = &Address> {
        self.endpoints.iter().map(|e| &e.addr)
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.endpoints.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            e.fmt(f)?;
        }
        Ok(())
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
        assert_eq!(many.first().to_string(), "a:1");
        let twice = Targets::Many(vec!["a:1".into(), "a:1,weight=2".into()]);
        let e = Upstream::parse("route \"x\"", &twice, None).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        assert!(Upstream::parse("--target", &Targets::Many(vec![]), None).is_err());
    }
}
