//! Peer identities and the rules that match them.
//!
//! In: the peer's end-entity certificate (DER), already verified against the CA bundle by
//! rustls. Out: the names it carries, and whether a set of `--allow-*` (server side) or
//! `--verify-*` (client side) rules admits them.

use std::fmt;
use std::net::IpAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The names a verified peer certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub common_names: Vec<String>,
    pub organizational_units: Vec<String>,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub ips: Vec<IpAddr>,
}

impl PeerIdentity {
    /// Reads the names from a DER certificate. A certificate rustls accepted always parses; the
    /// error exists for the impossible case.
    pub fn from_der(der: &[u8]) -> Result<PeerIdentity, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("unparsable certificate: {e}"))?;
        let mut id = PeerIdentity::default();
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                id.common_names.push(s.to_string());
            }
        }
        for ou in cert.subject().iter_organizational_unit() {
            if let Ok(s) = ou.as_str() {
                id.organizational_units.push(s.to_string());
            }
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => id.dns_names.push(d.to_string()),
                    GeneralName::URI(u) => id.uris.push(u.to_string()),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                            _ => None,
                        };
                        id.ips.extend(ip);
                    }
                    _ => {}
                }
            }
        }
        Ok(id)
    }
}

impl fmt::Display for PeerIdentity {
    /// The most specific name: a URI (SPIFFE ID) if there is one, else the common name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(uri) = self.uris.first() {
            f.write_str(uri)
        } else if let Some(cn) = self.common_names.first() {
            write!(f, "CN={cn}")
        } else if let Some(dns) = self.dns_names.first() {
            write!(f, "DNS={dns}")
        } else if let Some(ip) = self.ips.first() {
            write!(f, "IP={ip}")
        } else {
            f.write_str("(no name)")
        }
    }
}

/// A set of identity rules, OR'd: a peer matching any one of them is admitted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Admit every peer the CA bundle vouches for.
    pub all: bool,
    pub cn: Vec<String>,
    pub ou: Vec<String>,
    pub dns: Vec<String>,
    /// Exact URIs, or patterns ending in `/*` (one more path segment) or `/**` (any depth).
    pub uri: Vec<String>,
    /// IP address SANs (`--allow-ip`, `--verify-ip`, as ghostunnel's).
    pub ip: Vec<IpAddr>,
}

impl Rules {
    /// True when no rule is set at all.
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.cn.is_empty()
            && self.ou.is_empty()
            && self.dns.is_empty()
            && self.uri.is_empty()
            && self.ip.is_empty()
    }

    /// Whether `id` matches at least one rule.
    pub fn admits(&self, id: &PeerIdentity) -> bool {
        self.all
            || self.cn.iter().any(|r| id.common_names.contains(r))
            || self.ou.iter().any(|r| id.organizational_units.contains(r))
            || self.dns.iter().any(|r| id.dns_names.contains(r))
            || self.ip.iter().any(|r| id.ips.contains(r))
            || self
                .uri
                .iter()
                .any(|r| id.uris.iter().any(|u| uri_matches(r, u)))
    }
}

/// Checks an `--allow-uri` / `--verify-uri` pattern. A trailing `*` stands for exactly one
/// non-empty path segment and a trailing `**` for one or more, as in ghostunnel, so
/// `spiffe://td/ns/*` admits `spiffe://td/ns/app` but not `spiffe://td/ns/app/admin`.
pub fn uri_matches(pattern: &str, uri: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix("**") {
        uri.len() > prefix.len() && uri.starts_with(prefix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        uri.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
    } else {
        pattern == uri
    }
}

/// Checks a URI pattern when it is configured: `*` may only end it, after a `/`.
pub fn validate_uri_pattern(pattern: &str) -> Result<(), String> {
    let body = pattern
        .strip_suffix("**")
        .or_else(|| pattern.strip_suffix('*'))
        .unwrap_or(pattern);
    if body.contains('*') {
        return Err(format!(
            "URI pattern {pattern:?}: '*' may only appear at the end, as '/*' or '/**'"
        ));
    }
    if body.len() != pattern.len() && !body.ends_with('/') {
        return Err(format!(
            "URI pattern {pattern:?}: a wildcard must follow a '/', as in spiffe://domain/ns/*"
        ));
    }
    if !pattern.contains("://") {
        return Err(format!(
            "URI pattern {pattern:?} is not a URI (expected e.g. spiffe://domain/workload)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_star_matches_one_segment() {
        assert!(uri_matches("spiffe://td/ns/*", "spiffe://td/ns/app"));
        assert!(!uri_matches("spiffe://td/ns/*", "spiffe://td/ns/app/admin"));
        assert!(!uri_matches("spiffe://td/ns/*", "spiffe://td/ns/"));
        assert!(!uri_matches("spiffe://td/ns/*", "spiffe://td/other/app"));
    }

    #[test]
    fn double_star_matches_any_depth() {
        assert!(uri_matches("spiffe://td/**", "spiffe://td/ns/app/admin"));
        assert!(!uri_matches("spiffe://td/**", "spiffe://td/"));
        assert!(!uri_matches("spiffe://td/**", "spiffe://tdx/a"));
    }

    #[test]
    fn exact_uris_match_exactly() {
        assert!(uri_matches("spiffe://td/a", "spiffe://td/a"));
        assert!(!uri_matches("spiffe://td/a", "spiffe://td/ab"));
    }

    #[test]
    fn patterns_are_checked() {
        assert!(validate_uri_pattern("spiffe://td/ns/*").is_ok());
        assert!(validate_uri_pattern("spiffe://td/**").is_ok());
        assert!(validate_uri_pattern("spiffe://td/a*").is_err());
        assert!(validate_uri_pattern("spiffe://*/a").is_err());
        assert!(validate_uri_pattern("app").is_err());
    }

    #[test]
    fn rules_are_ored() {
        let id = PeerIdentity {
            common_names: vec!["app".into()],
            organizational_units: vec!["ops".into()],
            dns_names: vec!["app.internal".into()],
            uris: vec!["spiffe://td/app".into()],
            ips: vec!["10.0.0.9".parse().unwrap()],
        };
        let mut rules = Rules::default();
        assert!(!rules.admits(&id));
        rules.cn.push("other".into());
        assert!(!rules.admits(&id));
        rules.ou.push("ops".into());
        assert!(rules.admits(&id));
        let dns_only = Rules {
            dns: vec!["app.internal".into()],
            ..Rules::default()
        };
        assert!(dns_only.admits(&id));
        let ip_only = Rules {
            ip: vec!["10.0.0.5".parse().unwrap(), "::1".parse().unwrap()],
            ..Rules::default()
        };
        assert!(!ip_only.admits(&id));
        let with_ip = PeerIdentity {
            ips: vec!["::1".parse().unwrap()],
            ..PeerIdentity::default()
        };
        assert!(ip_only.admits(&with_ip));
        let all = Rules {
            all: true,
            ..Rules::default()
        };
        assert!(all.admits(&PeerIdentity::default()));
    }
}
