//! mDNS / DNS-SD (RFC 6762, 6763), master-less as avahi does it: a server ambassador announces
//! itself as `_legate._tcp.local.` with its routes in TXT, and withdraws (goodbye packets) when
//! its tunnel stops; a client's `mdns:` source browses for such announcements.
//!
//! The `.local` name is never trusted: a client checks each announced server's certificate
//! against its own configured name (`--override-server-name`). An announcement only says
//! where to try.
//!
//! In: announcements to make, service types to browse. Out: [`Announcement`] handles that
//! withdraw when dropped, and [`Found`] endpoints as they come and go. One `mdns-sd` daemon
//! (its own thread, UDP 5353 on every interface) serves the process.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};

/// The service type legate announces and browses by default.
pub const SERVICE: &str = "_legate._tcp.local.";

fn daemon() -> Result<&'static ServiceDaemon, String> {
    static DAEMON: OnceLock<Result<ServiceDaemon, String>> = OnceLock::new();
    DAEMON
        .get_or_init(|| ServiceDaemon::new().map_err(|e| format!("cannot start mDNS: {e}")))
        .as_ref()
        .map_err(Clone::clone)
}

/// A live announcement; withdrawn (goodbye, TTL 0) when dropped.
pub struct Announcement {
    fullname: String,
}

/// Announces tunnel `tunnel` at `addr` (an unspecified address: every interface's), with
/// `routes` in TXT, as instance "HOST TUNNEL PORT".
pub fn announce(tunnel: &str, addr: SocketAddr, routes: &[String]) -> Result<Announcement, String> {
    let host = format!("{}.local.", hostname());
    let instance = format!("{} {tunnel} {}", hostname(), addr.port());
    let instance = instance.as_str();
    let props = [("routes", routes.join(",")), ("v", "1".to_string())];
    let ips: Vec<IpAddr> = if addr.ip().is_unspecified() {
        Vec::new()
    } else {
        vec![addr.ip()]
    };
    let mut info = ServiceInfo::new(SERVICE, instance, &host, &ips[..], addr.port(), &props[..])
        .map_err(|e| format!("mDNS announcement {instance:?}: {e}"))?;
    if ips.is_empty() {
        info = info.enable_addr_auto();
    }
    let fullname = info.get_fullname().to_string();
    daemon()?
        .register(info)
        .map_err(|e| format!("mDNS announcement {instance:?}: {e}"))?;
    tracing::info!(service = %fullname, address = %addr, "announced over mDNS");
    Ok(Announcement { fullname })
}

impl Drop for Announcement {
    fn drop(&mut self) {
        if let Ok(d) = daemon()
            && let Ok(done) = d.unregister(&self.fullname)
        {
            // The goodbye is sent by the daemon's thread; wait for it briefly, so a process
            // that exits next does not take it along unsent.
            let _ = done.recv_timeout(std::time::Duration::from_secs(1));
            tracing::info!(service = %self.fullname, "mDNS announcement withdrawn");
        }
    }
}

/// An announced server ambassador.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub addrs: Vec<SocketAddr>,
    /// The routes its TXT record lists.
    pub routes: Vec<String>,
}

/// What one browse of a service type has found, by instance: shared by every source that
/// follows that type (`mdns-sd` keeps one browse per type; a second would replace the first).
type Seen = tokio::sync::watch::Receiver<BTreeMap<String, Found>>;

/// The announcements of `service` as they change. The first call for a type starts its browse,
/// which then runs for the life of the process.
pub fn browse(service: &str) -> Result<Seen, String> {
    static BROWSES: std::sync::Mutex<BTreeMap<String, Seen>> =
        std::sync::Mutex::new(BTreeMap::new());
    let mut browses = BROWSES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(seen) = browses.get(service) {
        return Ok(seen.clone());
    }
    let events = daemon()?
        .browse(service)
        .map_err(|e| format!("mDNS browse {service}: {e}"))?;
    let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
    browses.insert(service.to_string(), rx.clone());
    let service = service.to_string();
    tokio::spawn(async move {
        loop {
            let event = match events.recv_async().await {
                Ok(event) => event,
                Err(e) => {
                    tracing::warn!(service, error = %e, "mDNS browse ended");
                    return;
                }
            };
            match event {
                ServiceEvent::ServiceResolved(s) => {
                    let mut addrs: Vec<SocketAddr> = s
                        .addresses
                        .iter()
                        .map(|ip| SocketAddr::new(ip.to_ip_addr(), s.port))
                        .collect();
                    addrs.sort();
                    let routes = s
                        .txt_properties
                        .get_property_val_str("routes")
                        .unwrap_or("")
                        .split(',')
                        .filter(|r| !r.is_empty())
                        .map(str::to_string)
                        .collect();
                    let entry = Found { addrs, routes };
                    tx.send_if_modified(|found| {
                        found.insert(s.fullname.clone(), entry.clone()) != Some(entry)
                    });
                }
                ServiceEvent::ServiceRemoved(_, fullname) => {
                    tx.send_if_modified(|found| found.remove(&fullname).is_some());
                }
                _ => {}
            }
        }
    });
    Ok(rx)
}

/// This host's name, for the announcement's host record.
fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if ok && !name.is_empty() {
        name.split('.').next().unwrap_or("legate").to_string()
    } else {
        "legate".to_string()
    }
}
