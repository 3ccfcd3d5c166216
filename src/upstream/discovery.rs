//! Discovery: the sources that find a route's endpoints while it runs.
//!
//! In: a [`Source`] (`srv:`, `dns:`, `file:`). Out: its endpoints, looked up again on the
//! answer's TTL (clamped between the process's minimum and maximum interval; Consul answers
//! TTL 0) or, for a file, whenever its contents change (polled each second, which sees an
//! atomic rename and a Kubernetes `..data` symlink swap alike). A failed lookup, an empty
//! answer or NXDOMAIN keeps the last good endpoints for the hold time and says so; after that
//! the source contributes none. Nothing here blocks startup: a name that does not resolve yet
//! is a source with no endpoints yet.

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, Record};

use crate::config::{DiscoverySettings as Settings, EndpointSpec, MAX_WEIGHT, Source};
use crate::net::{Address, HostPort};
use tokio_util::sync::CancellationToken;

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static RESOLVER: OnceLock<Result<TokioResolver, String>> = OnceLock::new();

/// Sets the process's discovery settings, once, before any tunnel starts.
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

fn settings() -> &'static Settings {
    SETTINGS.get_or_init(Settings::default)
}

fn resolver() -> Result<&'static TokioResolver, String> {
    RESOLVER
        .get_or_init(|| {
            let builder = match settings().nameserver {
                Some(ns) => {
                    let mut server = NameServerConfig::udp_and_tcp(ns.ip());
                    for c in &mut server.connections {
                        c.port = ns.port();
                    }
                    let config = ResolverConfig::from_name_servers(vec![server]);
                    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
                }
                None => TokioResolver::builder_tokio().map_err(|e| {
                    format!("cannot read the system's DNS settings ({e}); set --nameserver")
                })?,
            };
            let mut builder = builder;
            // Every lookup asks the server: the TTL is ours to honour, and a cached answer
            // would hide a change until the cache's own clock ran out.
            builder.options_mut().cache_size = 0;
            builder.options_mut().timeout = Duration::from_secs(2);
            builder.options_mut().attempts = 2;
            builder
                .build()
                .map_err(|e| format!("cannot start the DNS resolver: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// What a source has found, for the set and for `/_status`.
#[derive(Debug)]
pub struct SourceState {
    pub source: Source,
    found: Mutex<Found>,
    /// Fires once the first lookup has finished, good or bad.
    first: tokio::sync::Notify,
}

#[derive(Debug, Default, Clone)]
struct Found {
    endpoints: Vec<EndpointSpec>,
    /// When the last good answer came.
    last_good: Option<Instant>,
    error: Option<String>,
    looked: bool,
}

/// A source's state as `/_status` shows it.
#[derive(Debug, Clone)]
pub struct SourceView {
    pub source: String,
    pub endpoints: usize,
    pub error: Option<String>,
    pub last_good_secs: Option<u64>,
}

impl SourceState {
    pub fn new(source: Source) -> Arc<SourceState> {
        Arc::new(SourceState {
            source,
            found: Mutex::default(),
            first: tokio::sync::Notify::new(),
        })
    }

    fn found(&self) -> std::sync::MutexGuard<'_, Found> {
        self.found.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        self.found().endpoints.clone()
    }

    pub fn view(&self) -> SourceView {
        let f = self.found();
        SourceView {
            source: self.source.to_string(),
            endpoints: f.endpoints.len(),
            error: f.error.clone(),
            last_good_secs: f.last_good.map(|t| t.elapsed().as_secs()),
        }
    }

    /// Waits until the first lookup has finished, or `deadline`.
    pub async fn first_lookup(&self, deadline: tokio::time::Instant) {
        let notified = self.first.notified();
        if self.found().looked {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }

    /// Marks the first lookup done, once its result is in the set, and wakes those waiting.
    fn looked(&self) {
        let mut f = self.found();
        if !f.looked {
            f.looked = true;
            drop(f);
            self.first.notify_waiters();
        }
    }

    /// The source still says what it said (an unchanged file): the hold time starts from now.
    fn confirm(&self) {
        let mut f = self.found();
        if f.error.is_none() {
            f.last_good = Some(Instant::now());
        }
    }

    /// Takes a lookup's result. Returns whether the endpoints changed.
    pub(crate) fn take(&self, result: Result<Vec<EndpointSpec>, String>, hold: Duration) -> bool {
        let mut f = self.found();
        let changed = match result {
            Ok(mut endpoints) => {
                endpoints.sort_by_key(|e| e.addr.to_string());
                if f.error.is_some() {
                    tracing::info!(source = %self.source, endpoints = endpoints.len(), "discovery answers again");
                }
                f.error = None;
                f.last_good = Some(Instant::now());
                let changed = f.endpoints != endpoints;
                f.endpoints = endpoints;
                changed
            }
            Err(why) => {
                let held = f.last_good.is_some_and(|t| t.elapsed() < hold);
                if f.error.as_deref() != Some(why.as_str()) {
                    if held {
                        tracing::warn!(source = %self.source, error = %why, hold = ?hold, "discovery failed; keeping the last endpoints for the hold time");
                    } else {
                        tracing::warn!(source = %self.source, error = %why, "discovery failed; no endpoints from this source");
                    }
                }
                f.error = Some(why);
                let changed = !held && !f.endpoints.is_empty();
                if !held {
                    f.endpoints.clear();
                }
                changed
            }
        };
        drop(f);
        changed
    }
}

/// What a source's changes are reported to: the set (server side) or the client's server
/// ambassadors, which rebuild their endpoint list.
pub trait Refresh: Send + Sync {
    fn refresh(&self);
}

/// Looks `state`'s source up until `target` is gone or `closed` is cancelled, telling it
/// whenever the endpoints change.
pub fn spawn(state: Arc<SourceState>, target: Weak<dyn Refresh>, closed: CancellationToken) {
    tokio::spawn(async move {
        tokio::select! {
            _ = closed.cancelled() => {}
            _ = watch(state, target) => {}
        }
    });
}

async fn watch(state: Arc<SourceState>, target: Weak<dyn Refresh>) {
    let s = settings().clone();
    let mut failures = 0u32;
    let mut file_seen = None;
    if let Source::Sentinel { master, sentinels } = &state.source {
        return follow_sentinels(&state, &target, master, sentinels).await;
    }
    if let Source::Mdns { service, route } = &state.source {
        return follow_mdns(&state, &target, service, route).await;
    }
    loop {
        if target.strong_count() == 0 {
            return;
        }
        let (result, next) = match &state.source {
            Source::File(path) => {
                let read = read_file(path, &mut file_seen);
                match read {
                    Ok(None) => {
                        // Unchanged and still valid: as good as a fresh answer.
                        state.confirm();
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    Ok(Some(endpoints)) => (Ok(endpoints), Duration::from_secs(1)),
                    Err(e) => (Err(e), Duration::from_secs(1)),
                }
            }
            source => match lookup(source).await {
                Ok((endpoints, ttl)) => {
                    failures = 0;
                    (Ok(endpoints), ttl.clamp(s.min_interval, s.max_interval))
                }
                Err(e) => {
                    failures += 1;
                    let back_off = s.min_interval.saturating_mul(1 << failures.min(6));
                    (Err(e), back_off.min(s.max_interval))
                }
            },
        };
        if state.take(result, s.hold) {
            match target.upgrade() {
                Some(t) => t.refresh(),
                None => return,
            }
        }
        // Only now: a consumer woken by the first answer finds its endpoints in the set.
        state.looked();
        tokio::time::sleep(next).await;
    }
}

/// Reads a file source when its contents changed since `seen`: `Ok(None)` when unchanged.
/// An unreadable or invalid file is an error (the last good endpoints are held).
fn read_file(path: &Path, seen: &mut Option<Vec<u8>>) -> Result<Option<Vec<EndpointSpec>>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if seen.as_ref() == Some(&bytes) {
        return Ok(None);
    }
    // Remembered only when valid: an invalid file is read again each second, so its error
    // stands (reported once; `SourceState::take` logs a changed error only) and the hold time
    // runs out.
    let parsed =
        parse_file(&bytes, path.parent()).map_err(|e| format!("{}: {e}", path.display()))?;
    *seen = Some(bytes);
    Ok(Some(parsed))
}

/// A file source's contents: `endpoints = ["ADDR[,weight=N][,priority=N][,name=NAME]", ...]`.
pub fn parse_file(bytes: &[u8], base: Option<&Path>) -> Result<Vec<EndpointSpec>, String> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        endpoints: Vec<String>,
    }
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let file: File = toml::from_str(text).map_err(|e| {
        e.to_string()
            .lines()
            .next()
            .unwrap_or("invalid TOML")
            .to_string()
    })?;
    let endpoints = file
        .endpoints
        .iter()
        .map(|s| EndpointSpec::parse(s, base))
        .collect::<Result<Vec<_>, _>>()?;
    if endpoints.is_empty() {
        return Err("no endpoints listed".into());
    }
    Ok(endpoints)
}

/// What `source` gives now, looked up once (for `legate check`): a DNS answer or a file's
/// endpoints; `None` for sources that are followed rather than looked up (Sentinel, mDNS).
pub async fn look_once(source: &Source) -> Option<Result<Vec<EndpointSpec>, String>> {
    match source {
        Source::Srv(_) | Source::Dns { .. } => Some(lookup(source).await.map(|(e, _)| e)),
        Source::File(path) => Some(read_file(path, &mut None).map(Option::unwrap_or_default)),
        Source::Sentinel { .. } | Source::Mdns { .. } => None,
    }
}

/// One DNS lookup: the endpoints and how long the answer may be kept.
async fn lookup(source: &Source) -> Result<(Vec<EndpointSpec>, Duration), String> {
    let resolver = resolver()?;
    match source {
        Source::Srv(name) => {
            let answer = resolver
                .srv_lookup(name.as_str())
                .await
                .map_err(|e| format!("SRV {name}: {e}"))?;
            let mut ttl = min_ttl(answer.answers());
            let mut endpoints = Vec::new();
            for record in answer.answers() {
                let RData::SRV(srv) = &record.data else {
                    continue;
                };
                let target = srv.target.clone();
                // The target's addresses from the additional section, or asked for.
                let mut ips: Vec<IpAddr> = answer
                    .additionals()
                    .iter()
                    .filter(|r| r.name == target)
                    .filter_map(|r| r.data.ip_addr())
                    .collect();
                if ips.is_empty()
                    && let Ok(found) = resolver.lookup_ip(target.clone()).await
                {
                    ttl = ttl.min(min_ttl(found.as_lookup().answers()));
                    ips = found.iter().collect();
                }
                let name = target.to_utf8().trim_end_matches('.').to_string();
                endpoints.extend(ips.into_iter().map(|ip| EndpointSpec {
                    addr: Address::Tcp(HostPort {
                        host: ip.to_string(),
                        port: srv.port,
                    }),
                    // RFC 2782: weight 0 is a server to use rarely, not never.
                    weight: u32::from(srv.weight).clamp(1, MAX_WEIGHT),
                    priority: srv.priority,
                    name: None,
                    dns_name: Some(name.clone()),
                }));
            }
            dedupe_nonempty(endpoints, name).map(|e| (e, ttl))
        }
        Source::Dns { host, port } => {
            let answer = resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| format!("{host}: {e}"))?;
            let ttl = min_ttl(answer.as_lookup().answers());
            let endpoints = answer
                .iter()
                .map(|ip| EndpointSpec {
                    addr: Address::Tcp(HostPort {
                        host: ip.to_string(),
                        port: *port,
                    }),
                    weight: 1,
                    priority: 0,
                    name: None,
                    dns_name: Some(host.clone()),
                })
                .collect();
            dedupe_nonempty(endpoints, host).map(|e| (e, ttl))
        }
        Source::File(_) | Source::Sentinel { .. } | Source::Mdns { .. } => {
            unreachable!("files are read, Sentinels and mDNS followed, not looked up")
        }
    }
}

/// Follows the master Sentinels name for `master`: asks each in turn (the last that answered
/// first), confirms the answer with `ROLE`, then subscribes to `+switch-master` on that
/// Sentinel, so a failover is taken the moment it is announced. A Sentinel that goes away (or
/// says nothing for the longest re-resolution interval) is left for the next; when none
/// answers, the last master is held for the hold time, as any source's.
async fn follow_sentinels(
    state: &SourceState,
    target: &Weak<dyn Refresh>,
    master: &str,
    sentinels: &[HostPort],
) {
    let s = settings().clone();
    let timeout = Duration::from_secs(2);
    let mut first = 0;
    let mut failures = 0u32;
    loop {
        let mut errors = Vec::new();
        for i in 0..sentinels.len() {
            let at = (first + i) % sentinels.len();
            let sentinel = &sentinels[at];
            let asked = ask_sentinel(sentinel, master, timeout).await;
            let addr = match asked {
                Ok(addr) => addr,
                Err(e) => {
                    errors.push(format!("sentinel {sentinel}: {e}"));
                    continue;
                }
            };
            first = at;
            failures = 0;
            if !report(state, target, Ok(vec![bare(addr)]), s.hold) {
                return;
            }
            // Until the subscription breaks or goes quiet for the longest interval; then ask
            // again (a missed announcement is caught by asking).
            let ended = subscribe(state, target, sentinel, master, s.max_interval).await;
            if let Err(e) = ended {
                tracing::debug!(source = %state.source, sentinel = %sentinel, error = %e, "sentinel subscription ended; asking again");
                // Not a loop of connects against a Sentinel that answers but will not keep one.
                tokio::time::sleep(s.min_interval).await;
            }
            break;
        }
        if errors.len() == sentinels.len() {
            failures += 1;
            if !report(state, target, Err(errors.join("; ")), s.hold) {
                return;
            }
            let back_off = s.min_interval.saturating_mul(1 << failures.min(6));
            tokio::time::sleep(back_off.min(s.max_interval)).await;
        }
    }
}

/// Follows mDNS announcements of `service`: every announced server listing `route` (any, when
/// empty), at each address it announces that can be dialled (not IPv6 link-local). A server
/// that withdraws (or whose records expire) leaves at once; one that dies without a goodbye
/// is ejected by passive health until its records expire.
async fn follow_mdns(state: &SourceState, target: &Weak<dyn Refresh>, service: &str, route: &str) {
    let hold = settings().hold;
    let mut seen = match crate::mdns::browse(service) {
        Ok(seen) => seen,
        Err(e) => {
            report(state, target, Err(e), hold);
            return;
        }
    };
    loop {
        let endpoints = {
            let found = seen.borrow_and_update();
            let mut endpoints: Vec<EndpointSpec> = found
                .values()
                .filter(|f| route.is_empty() || f.routes.iter().any(|r| r == route))
                .flat_map(|f| f.addrs.iter())
                .filter(|a| match a.ip() {
                    IpAddr::V6(v6) => !v6.is_unicast_link_local(),
                    IpAddr::V4(v4) => !v4.is_link_local(),
                })
                .map(|a| bare(HostPort::from(*a)))
                .collect();
            endpoints.sort_by_key(|e| e.addr.to_string());
            endpoints.dedup_by(|a, b| a.addr == b.addr);
            endpoints
        };
        if !report(state, target, Ok(endpoints), hold) || seen.changed().await.is_err() {
            return;
        }
    }
}

/// Takes a result into the source and tells the target when it changed; false once the
/// target is gone.
fn report(
    state: &SourceState,
    target: &Weak<dyn Refresh>,
    result: Result<Vec<EndpointSpec>, String>,
    hold: Duration,
) -> bool {
    if state.take(result, hold) {
        match target.upgrade() {
            Some(t) => t.refresh(),
            None => return false,
        }
    }
    state.looked();
    target.strong_count() > 0
}

/// An endpoint found with nothing but its address (a Sentinel's master, an mDNS server).
fn bare(addr: HostPort) -> EndpointSpec {
    EndpointSpec {
        addr: Address::Tcp(addr),
        weight: 1,
        priority: 0,
        name: None,
        dns_name: None,
    }
}

/// `SENTINEL get-master-addr-by-name`, confirmed by the master's own `ROLE`.
async fn ask_sentinel(
    sentinel: &HostPort,
    master: &str,
    timeout: Duration,
) -> Result<HostPort, String> {
    let work = async {
        let addr = Address::Tcp(sentinel.clone());
        let mut s = crate::dial::dial(&addr, timeout)
            .await
            .map_err(|e| e.to_string())?;
        let mut conn = crate::redis::Conn::new(&mut s);
        let reply = conn
            .request(&[b"SENTINEL", b"get-master-addr-by-name", master.as_bytes()])
            .await?;
        let found =
            master_addr(&reply).ok_or_else(|| format!("it knows no master named {master:?}"))?;
        confirm_master(&found, timeout).await?;
        Ok(found)
    };
    tokio::time::timeout(timeout * 2, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", timeout * 2)))
}

/// `[ip, port]` from `get-master-addr-by-name`.
pub fn master_addr(v: &crate::redis::resp::Value) -> Option<HostPort> {
    let crate::redis::resp::Value::Array(items) = v else {
        return None;
    };
    let [ip, port] = items.as_slice() else {
        return None;
    };
    Some(HostPort {
        host: ip.text()?,
        port: port.text()?.parse().ok()?,
    })
}

/// The Redis a Sentinel names says it is master. One that wants credentials the source does
/// not hold (NOAUTH) cannot say: the Sentinels' word stands, and the route's own role checks,
/// if any, decide.
async fn confirm_master(addr: &HostPort, timeout: Duration) -> Result<(), String> {
    let mut s = crate::dial::dial(&Address::Tcp(addr.clone()), timeout)
        .await
        .map_err(|e| format!("the master it names, {addr}: {e}"))?;
    let reply = crate::redis::Conn::new(&mut s).request(&[b"ROLE"]).await?;
    match crate::redis::parse_role(&reply) {
        Some(p) if p.role == crate::redis::Role::Master => Ok(()),
        Some(p) => Err(format!(
            "the master it names, {addr}, says it is {}",
            p.role.as_str()
        )),
        None if matches!(&reply, crate::redis::resp::Value::Error(e) if e.starts_with(b"NOAUTH") || e.starts_with(b"NOPERM")) => {
            Ok(())
        }
        None => Err(format!("the master it names, {addr}, did not answer ROLE")),
    }
}

/// Subscribes to `+switch-master` on `sentinel` and takes each announcement for `master` at
/// once; returns when the connection ends or nothing came for `quiet`.
async fn subscribe(
    state: &SourceState,
    target: &Weak<dyn Refresh>,
    sentinel: &HostPort,
    master: &str,
    quiet: Duration,
) -> Result<(), String> {
    let hold = settings().hold;
    let mut s = crate::dial::dial(&Address::Tcp(sentinel.clone()), Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())?;
    let mut conn = crate::redis::Conn::new(&mut s);
    conn.send(&[b"SUBSCRIBE", b"+switch-master"]).await?;
    let confirmed = tokio::time::timeout(Duration::from_secs(2), conn.next()).await;
    confirmed.map_err(|_| "no answer to SUBSCRIBE".to_string())??;
    // A failover between the question and the subscription is caught by asking once more.
    let again = ask_sentinel(sentinel, master, Duration::from_secs(2)).await?;
    if !report(state, target, Ok(vec![bare(again)]), hold) {
        return Ok(());
    }
    loop {
        let Ok(next) = tokio::time::timeout(quiet, conn.next()).await else {
            return Ok(());
        };
        let Some(addr) = switch_master(&next?, master) else {
            continue;
        };
        tracing::info!(source = %state.source, master = %addr, "sentinel announced a new master");
        if !report(state, target, Ok(vec![bare(addr)]), hold) {
            return Ok(());
        }
    }
}

/// The new master's address in a `+switch-master` message for `master`:
/// `["message", "+switch-master", "NAME OLD-IP OLD-PORT NEW-IP NEW-PORT"]`.
pub fn switch_master(v: &crate::redis::resp::Value, master: &str) -> Option<HostPort> {
    let crate::redis::resp::Value::Array(items) = v else {
        return None;
    };
    let [kind, channel, text] = items.as_slice() else {
        return None;
    };
    if kind.bytes()? != b"message" || channel.bytes()? != b"+switch-master" {
        return None;
    }
    let text = text.text()?;
    let words: Vec<&str> = text.split(' ').collect();
    match words.as_slice() {
        [name, _, _, ip, port] if *name == master => Some(HostPort {
            host: ip.to_string(),
            port: port.parse().ok()?,
        }),
        _ => None,
    }
}

fn min_ttl(records: &[Record]) -> Duration {
    let secs = records.iter().map(|r| r.ttl).min().unwrap_or(0);
    Duration::from_secs(u64::from(secs))
}

fn dedupe_nonempty(
    mut endpoints: Vec<EndpointSpec>,
    name: &str,
) -> Result<Vec<EndpointSpec>, String> {
    let mut seen = std::collections::HashSet::new();
    endpoints.retain(|e| seen.insert(e.addr.to_string()));
    if endpoints.is_empty() {
        return Err(format!("{name}: the answer has no addresses"));
    }
    Ok(endpoints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_sources_parse_and_reject_what_is_wrong() {
        let eps = parse_file(
            b"endpoints = [\"10.0.0.1:6379,weight=3\", \"unix:r.sock\"]\n",
            Some(Path::new("/run")),
        )
        .unwrap();
        assert_eq!(eps[0].weight, 3);
        assert_eq!(eps[1].addr.to_string(), "unix:/run/r.sock");
        for bad in [
            &b"endpoints = []"[..],
            b"endpoints = [\"nope\"]",
            b"endpoint = [\"10.0.0.1:1\"]",
            b"\xff",
            b"endpoints = [",
        ] {
            assert!(parse_file(bad, None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sentinel_answers_and_announcements() {
        use crate::redis::resp::parse;
        let v = parse(b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n", 4096)
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(master_addr(&v).unwrap().to_string(), "127.0.0.1:6380");
        assert_eq!(
            master_addr(&parse(b"*-1\r\n", 64).unwrap().unwrap().0),
            None
        );
        let message = |text: &str| {
            let bytes =
                crate::redis::resp::command(&[b"message", b"+switch-master", text.as_bytes()]);
            parse(&bytes, 4096).unwrap().unwrap().0
        };
        let v = message("cache 127.0.0.1 6379 127.0.0.1 6380 extra");
        assert_eq!(
            switch_master(&v, "cache"),
            None,
            "six words is not the format"
        );
        let v = message("cache 127.0.0.1 6379 127.0.0.1 6380");
        assert_eq!(
            switch_master(&v, "cache").unwrap().to_string(),
            "127.0.0.1:6380"
        );
        assert_eq!(switch_master(&v, "other"), None);
    }

    #[test]
    fn a_failing_source_holds_its_last_endpoints_then_drops_them() {
        let state = SourceState::new(Source::File("x".into()));
        let eps = parse_file(b"endpoints = [\"127.0.0.1:1\"]", None).unwrap();
        assert!(state.take(Ok(eps.clone()), Duration::from_secs(60)));
        assert!(
            !state.take(Ok(eps), Duration::from_secs(60)),
            "the same again"
        );
        // Within the hold: kept, and nothing to tell.
        assert!(!state.take(Err("timed out".into()), Duration::from_secs(60)));
        assert_eq!(state.endpoints().len(), 1);
        assert_eq!(state.view().error.as_deref(), Some("timed out"));
        // Past the hold (zero here): dropped.
        assert!(state.take(Err("timed out".into()), Duration::ZERO));
        assert!(state.endpoints().is_empty());
    }
}
