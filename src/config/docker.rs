//! Docker-link variables, the classic ambassador's discovery: `--from-docker-env=ALIAS` turns
//! `ALIAS_PORT_<port>_TCP=tcp://host:port` (and its `_ADDR`, `_PORT`, `_PROTO` companions) into
//! one tunnel per port, listening on that port and forwarding to that address.
//!
//! In: the environment and the aliases allowed (a list is required: Kubernetes injects such
//! variables for every Service in a namespace, and a tunnel for each would be a surprise).
//! Out: a tunnel per linked port, or what is wrong with which variable. `_UDP` links are
//! skipped with a warning: legate carries TCP.

use std::collections::BTreeMap;

/// One linked TCP port of an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub alias: String,
    /// The port the linked container exposes, which the tunnel listens on.
    pub port: u16,
    /// Where the linked container is: `host:port`.
    pub target: String,
}

/// The links of `aliases` in `env`, in alias then port order; UDP links are returned apart
/// (as `ALIAS_PORT_<port>_UDP` names) to be warned about.
pub fn links(
    aliases: &[String],
    env: &[(String, String)],
) -> Result<(Vec<Link>, Vec<String>), Vec<String>> {
    let vars: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (mut found, mut udp, mut problems) = (Vec::new(), Vec::new(), Vec::new());
    for alias in aliases {
        let prefix = format!("{}_PORT_", alias.to_ascii_uppercase().replace('-', "_"));
        let mut any = false;
        for (name, value) in vars.range(prefix.as_str()..) {
            let Some(rest) = name.strip_prefix(&prefix) else {
                break;
            };
            // ALIAS_PORT_6379_TCP: the link itself; its _ADDR/_PORT/_PROTO companions say the
            // same in pieces and are checked against it.
            let Some((port, proto)) = rest.split_once('_') else {
                continue;
            };
            let Ok(port) = port.parse::<u16>() else {
                continue;
            };
            match proto {
                "UDP" => {
                    any = true;
                    udp.push((*name).to_string());
                }
                "TCP" => {
                    any = true;
                    match parse_link(value) {
                        Ok(target) => {
                            let addr = vars.get(format!("{name}_ADDR").as_str());
                            let lport = vars.get(format!("{name}_PORT").as_str());
                            let consistent = addr
                                .is_none_or(|a| target.starts_with(&format!("{a}:")))
                                && lport.is_none_or(|p| target.ends_with(&format!(":{p}")));
                            if consistent {
                                found.push(Link {
                                    alias: alias.clone(),
                                    port,
                                    target,
                                });
                            } else {
                                problems.push(format!(
                                    "{name}={value} disagrees with {name}_ADDR / {name}_PORT"
                                ));
                            }
                        }
                        Err(e) => problems.push(format!("{name}={value}: {e}")),
                    }
                }
                _ => {}
            }
        }
        if !any {
            problems.push(format!(
                "--from-docker-env {alias}: no {prefix}<port>_TCP variable is set (is the container linked as {alias:?}?)"
            ));
        }
    }
    if problems.is_empty() {
        Ok((found, udp))
    } else {
        Err(problems)
    }
}

/// `tcp://host:port` as `host:port`.
fn parse_link(value: &str) -> Result<String, String> {
    let rest = value
        .strip_prefix("tcp://")
        .ok_or("a link is tcp://HOST:PORT")?;
    let hp = crate::net::HostPort::parse(rest)?;
    Ok(hp.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The variables Docker's link documentation shows for a linked Redis (alias `redis`),
    /// with a UDP port added.
    fn docker_docs() -> Vec<(String, String)> {
        env(&[
            ("REDIS_NAME", "/web/redis"),
            ("REDIS_PORT", "tcp://172.17.0.2:6379"),
            ("REDIS_PORT_6379_TCP", "tcp://172.17.0.2:6379"),
            ("REDIS_PORT_6379_TCP_PROTO", "tcp"),
            ("REDIS_PORT_6379_TCP_PORT", "6379"),
            ("REDIS_PORT_6379_TCP_ADDR", "172.17.0.2"),
            ("REDIS_PORT_5353_UDP", "udp://172.17.0.2:5353"),
            ("OTHER_PORT_80_TCP", "tcp://172.17.0.3:80"),
            ("PATH", "/usr/bin"),
        ])
    }

    #[test]
    fn a_linked_redis_becomes_one_tcp_link_and_udp_is_set_aside() {
        let (links, udp) = links(&["redis".into()], &docker_docs()).unwrap();
        assert_eq!(
            links,
            [Link {
                alias: "redis".into(),
                port: 6379,
                target: "172.17.0.2:6379".into()
            }]
        );
        assert_eq!(udp, ["REDIS_PORT_5353_UDP"]);
    }

    #[test]
    fn only_allowed_aliases_and_what_is_wrong_is_named() {
        let e = links(&["cache".into()], &docker_docs()).unwrap_err();
        assert!(e[0].contains("no CACHE_PORT_<port>_TCP"), "{e:?}");
        let bad = env(&[("REDIS_PORT_6379_TCP", "http://x:1")]);
        let e = links(&["redis".into()], &bad).unwrap_err();
        assert!(e[0].contains("tcp://HOST:PORT"), "{e:?}");
        let split = env(&[
            ("REDIS_PORT_6379_TCP", "tcp://10.0.0.1:6379"),
            ("REDIS_PORT_6379_TCP_ADDR", "10.0.0.2"),
        ]);
        let e = links(&["redis".into()], &split).unwrap_err();
        assert!(e[0].contains("disagrees"), "{e:?}");
    }
}
