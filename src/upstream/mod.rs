//! Upstreams: a route's endpoints (server side: service instances; client side: server
//! ambassadors), which one takes a new connection, and what each one's connects say about it.
//!
//! In: an [`Upstream`] from the config and the balance policy. Out: [`Set::pick`], an endpoint
//! for the next attempt (never one already tried for this connection), and per endpoint its
//! passive health and open connections. When every endpoint is ejected, they are all tried
//! anyway (panic mode): a route with no healthy endpoint would refuse everyone, while one that
//! is merely believed down may have come back.

pub mod active;
pub mod discovery;
pub mod passive;
pub mod role;

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::{Balance, EndpointSpec, HealthCheck, TunnelConfig, Upstream};

pub use discovery::{Refresh, SourceState};
pub use passive::State;

/// One endpoint and what is known of it.
#[derive(Debug)]
pub struct Endpoint {
    pub spec: EndpointSpec,
    /// Unique in the process: what a connection's attempts remember it by, while the set
    /// it belongs to may change.
    pub id: u64,
    health: Mutex<passive::Passive>,
    /// What the active checks say (always up when there are none).
    checked: Mutex<active::Active>,
    open: AtomicUsize,
    /// Smooth weighted round robin's current weight (changed under the set's lock).
    current: AtomicI64,
    /// A Redis route's role gate: whether it may take connections, and what closes the
    /// sessions open on it when it may no longer.
    gate: Mutex<Gate>,
}

/// What role checks say of an endpoint.
#[derive(Debug, Default)]
struct Gate {
    /// The last check's result; `None`: failed, or not run yet.
    probe: Option<crate::redis::Probe>,
    eligible: bool,
    /// Cancelled (and replaced) when it stops being eligible or leaves its set.
    sessions: CancellationToken,
}

impl Endpoint {
    fn new(spec: EndpointSpec) -> Arc<Endpoint> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Arc::new(Endpoint {
            spec,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            health: Mutex::default(),
            checked: Mutex::default(),
            open: AtomicUsize::new(0),
            current: AtomicI64::new(0),
            gate: Mutex::default(),
        })
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether role checks found it may take connections (a gated set's only).
    pub fn eligible(&self) -> bool {
        self.gate().eligible
    }

    /// What the last role check found: its role, or why it failed.
    pub fn role(&self) -> Option<String> {
        self.gate()
            .probe
            .as_ref()
            .map(|p| p.role.as_str().to_string())
    }

    /// Cancelled when the sessions open on it now must end (it stopped being master).
    pub fn sessions(&self) -> CancellationToken {
        self.gate().sessions.clone()
    }

    /// Ends the sessions open on it.
    pub fn close_sessions(&self, why: &str) {
        let mut gate = self.gate();
        if gate.sessions.is_cancelled() {
            return;
        }
        let open = self.open();
        gate.sessions.cancel();
        gate.sessions = CancellationToken::new();
        drop(gate);
        if open > 0 {
            tracing::warn!(endpoint = %self.spec.addr, sessions = open, reason = why, "closing the sessions open on this endpoint");
        }
    }

    /// Takes a role check's result and whether that makes it eligible; closes its sessions
    /// when it stops being so.
    fn gated(&self, probe: Option<crate::redis::Probe>, eligible: bool, why: &str) {
        let mut gate = self.gate();
        let was = gate.eligible;
        gate.probe = probe;
        gate.eligible = eligible;
        drop(gate);
        match (was, eligible) {
            (false, true) => {
                tracing::info!(endpoint = %self.spec.addr, "endpoint is master: it takes connections")
            }
            (true, false) => {
                tracing::warn!(endpoint = %self.spec.addr, reason = why, "endpoint is no longer master: it takes no connections");
                self.close_sessions(why);
            }
            _ => {}
        }
    }

    /// A connection found it is not master (before the next check did).
    pub fn not_master(&self, why: &str) {
        self.gated(None, false, why);
    }

    fn checked(&self) -> std::sync::MutexGuard<'_, active::Active> {
        self.checked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether it should be given new connections now: not ejected, and not down by checks.
    pub fn available(&self, now: Instant) -> bool {
        self.checked().up() && self.health().available(now)
    }

    /// Its state in a word, for `/_status`: `down` (by active checks), or the passive
    /// health's `healthy`, `ejected`, `probation`.
    pub fn state_name(&self) -> &'static str {
        if self.checked().up() {
            self.state().as_str()
        } else {
            "down"
        }
    }

    /// Takes an active check's result.
    pub fn checked_result(&self, passed: bool, t: active::Thresholds, why: &str) {
        match self.checked().check(passed, t) {
            Some(true) => {
                tracing::info!(endpoint = %self.spec.addr, "endpoint up: health checks pass again")
            }
            Some(false) => {
                tracing::warn!(endpoint = %self.spec.addr, error = %why, "endpoint down: health checks fail")
            }
            None => {}
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, passive::Passive> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> State {
        self.health().state(Instant::now())
    }

    /// Connections open to it now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// A connect to it worked.
    pub fn succeeded(&self) {
        if self.health().succeeded(Instant::now()) {
            tracing::info!(endpoint = %self.spec.addr, "endpoint readmitted");
        }
    }

    /// A connect to it failed.
    pub fn failed(&self, why: &str) {
        if self.health().failed(Instant::now()) {
            tracing::warn!(endpoint = %self.spec.addr, error = %why, "endpoint ejected after failed connects; retried after a back-off");
        }
    }

    /// Counts a connection to it as open until the guard drops (what the balancer weighs).
    pub fn begin(self: &Arc<Self>) -> InUse {
        self.open.fetch_add(1, Ordering::Relaxed);
        InUse {
            endpoint: self.clone(),
            sessions: None,
        }
    }

    /// [`Endpoint::begin`] for a Redis route's session, which ends when the endpoint stops
    /// being master or leaves its set: the token is taken now, before the connection is
    /// checked, so a demotion during the check still ends it.
    pub fn begin_session(self: &Arc<Self>) -> InUse {
        let mut in_use = self.begin();
        in_use.sessions = Some(self.sessions());
        in_use
    }
}

/// An open connection to an endpoint; the count falls when it drops.
#[derive(Debug)]
pub struct InUse {
    pub endpoint: Arc<Endpoint>,
    /// A Redis route's session: cancelled when it must end.
    pub sessions: Option<CancellationToken>,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.endpoint.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A route's endpoints. The list can be replaced ([`Set::update`]) while connections run:
/// new connections see the new list at once; open ones keep the endpoint they have.
///
/// Its list is the endpoints given (`statics`) followed by what each discovery source has
/// found; a server side's set keeps only loopback endpoints unless `--unsafe-target`.
#[derive(Debug)]
pub struct Set {
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    balance: Balance,
    /// Held while round robin reads and writes the current weights.
    round: Mutex<()>,
    /// The endpoints given; held while the list is rebuilt, so a reload and a discovery
    /// answer cannot store their lists in the wrong order.
    statics: Mutex<Vec<EndpointSpec>>,
    sources: Vec<Arc<SourceState>>,
    /// Ends this set's discovery and health-check tasks (the set left its table, or its
    /// tunnel stopped), even while old connections still hold it.
    closed: CancellationToken,
    /// Server side without `--unsafe-target`: discovered endpoints must be on loopback.
    local_only: bool,
    /// A Redis route's settings.
    pub redis: Option<Arc<crate::redis::Settings>>,
    /// Only endpoints proven master take connections (`require_role = "master"`).
    gated: bool,
    /// Wakes the role checker: the list changed, or a connection found a role changed.
    recheck: Arc<tokio::sync::Notify>,
    /// Fires when the first role check has finished.
    first_check: tokio::sync::watch::Sender<bool>,
}

impl Set {
    /// A set of `upstream`'s endpoints; its sources start looking with [`Set::discover`] (or
    /// the owner's own [`discovery::Refresh`]).
    pub fn new(upstream: &Upstream, balance: Balance, local_only: bool) -> Set {
        let endpoints = upstream.endpoints.iter().cloned().map(Endpoint::new);
        Set {
            endpoints: ArcSwap::from_pointee(endpoints.collect()),
            balance,
            round: Mutex::new(()),
            statics: Mutex::new(upstream.endpoints.clone()),
            sources: upstream
                .sources
                .iter()
                .cloned()
                .map(SourceState::new)
                .collect(),
            local_only,
            closed: CancellationToken::new(),
            gated: upstream.redis.as_ref().is_some_and(|r| r.require_master),
            redis: upstream.redis.clone().map(Arc::new),
            recheck: Arc::default(),
            first_check: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Whether only endpoints proven master take connections.
    pub fn gated(&self) -> bool {
        self.gated
    }

    /// Each endpoint, and whether it may take new connections now: available (not ejected,
    /// not down by checks) and, in a gated set, proven master (or any, while none is proven),
    /// as [`Set::pick`] filters them. Priority tiers are not applied: a healthy backup says
    /// yes, as HAProxy shows a backup server UP.
    pub fn taking(&self, now: Instant) -> Vec<(Arc<Endpoint>, bool)> {
        let all = self.endpoints();
        let masters_only = self.gated && all.iter().any(|e| e.eligible());
        all.iter()
            .map(|e| {
                let takes = e.available(now) && (!masters_only || e.eligible());
                (e.clone(), takes)
            })
            .collect()
    }

    /// Asks the role checker to look again now.
    pub fn recheck(&self) {
        self.recheck.notify_one();
    }

    /// Checks every endpoint's Redis role until the set is gone: at once, then every
    /// `interval` or when the list changes or a connection finds a role changed.
    pub fn check_roles(
        self: &Arc<Self>,
        interval: std::time::Duration,
        timeout: std::time::Duration,
    ) {
        let weak = Arc::downgrade(self);
        let (closed, recheck) = (self.closed.clone(), self.recheck.clone());
        tokio::spawn(async move {
            loop {
                let Some(set) = weak.upgrade() else { return };
                let Some(settings) = set.redis.clone() else {
                    return;
                };
                let endpoints = set.endpoints();
                let checks = endpoints.iter().map(|e| {
                    let settings = settings.clone();
                    async move {
                        let mut s = crate::dial::dial(&e.spec.addr, timeout)
                            .await
                            .map_err(|e| e.to_string())?;
                        crate::redis::probe(&mut s, &settings, timeout).await
                    }
                });
                let results = join_all(checks).await;
                let probes: Vec<Option<&crate::redis::Probe>> =
                    results.iter().map(|r| r.as_ref().ok()).collect();
                let eligible = role::eligible(&probes);
                for ((e, result), ok) in endpoints.iter().zip(&results).zip(eligible) {
                    let why = match result {
                        Err(e) => format!("role check failed: {e}"),
                        Ok(p) if p.role != crate::redis::Role::Master => {
                            format!("Redis is {}", p.role.as_str())
                        }
                        Ok(_) => "a master with no replicas while another has some".into(),
                    };
                    e.gated(result.as_ref().ok().cloned(), ok, &why);
                }
                set.first_check.send_replace(true);
                drop(set);
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                    _ = recheck.notified() => {}
                }
            }
        });
    }

    /// Ends the set's discovery and health checks; connections using it carry on.
    pub fn close(&self) {
        self.closed.cancel();
    }

    /// Starts this set's sources, reporting to the set itself (server side).
    pub fn discover(self: &Arc<Self>) {
        let weak: Weak<dyn Refresh> = Arc::downgrade(self) as Weak<dyn Refresh>;
        self.discover_for(&weak);
    }

    /// Starts this set's sources, reporting to `target`.
    pub fn discover_for(&self, target: &Weak<dyn Refresh>) {
        for source in &self.sources {
            discovery::spawn(source.clone(), target.clone(), self.closed.clone());
        }
    }

    pub fn sources(&self) -> &[Arc<SourceState>] {
        &self.sources
    }

    /// Checks every endpoint on a timer (a TCP connect within the check's timeout) until the
    /// set is gone.
    pub fn check_health(self: &Arc<Self>, check: HealthCheck) {
        let weak = Arc::downgrade(self);
        let closed = self.closed.clone();
        tokio::spawn(async move {
            let thresholds = active::Thresholds {
                rise: check.rise,
                fall: check.fall,
            };
            loop {
                tokio::select! {
                    _ = closed.cancelled() => return,
                    _ = tokio::time::sleep(check.interval) => {}
                }
                let Some(set) = weak.upgrade() else { return };
                let endpoints = set.endpoints();
                drop(set);
                let checks = endpoints.iter().map(|e| async move {
                    let result = crate::dial::dial(&e.spec.addr, check.timeout).await;
                    let why = result.as_ref().err().map(ToString::to_string);
                    e.checked_result(result.is_ok(), thresholds, why.as_deref().unwrap_or(""));
                });
                join_all(checks).await;
            }
        });
    }

    /// Waits, while the set is empty, for each source's first lookup (or `deadline`): the
    /// first consumers after startup find the endpoints discovered by then.
    pub async fn ready(&self, deadline: tokio::time::Instant) {
        if self.is_empty() {
            for source in &self.sources {
                source.first_lookup(deadline).await;
            }
        }
        if self.gated {
            // Every endpoint is down until a check proves its role.
            let mut first = self.first_check.subscribe();
            let _ = tokio::time::timeout_at(deadline, first.wait_for(|done| *done)).await;
        }
    }

    /// The endpoints given and those discovered, the first of each address kept.
    fn merged(&self, statics: &[EndpointSpec]) -> Vec<EndpointSpec> {
        let mut all = statics.to_vec();
        for source in &self.sources {
            for e in source.endpoints() {
                if all.iter().any(|o| o.addr == e.addr) {
                    continue;
                }
                if self.local_only && !e.addr.is_local() {
                    tracing::warn!(source = %source.source, endpoint = %e.addr, "discovered endpoint is not on loopback and is not used: the plaintext would cross the network; pass --unsafe-target if that is intended");
                    continue;
                }
                all.push(e);
            }
        }
        all
    }

    /// Rebuilds the list from the endpoints given and the sources' latest.
    pub fn refresh_endpoints(&self) -> bool {
        let statics = self.statics.lock().unwrap_or_else(|e| e.into_inner());
        self.replace(&self.merged(&statics))
    }

    /// The endpoints now.
    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// How many endpoints there are now (without taking a reference to the list).
    pub fn len(&self) -> usize {
        self.endpoints.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `upstream`'s endpoints (its sources are the set's own: a change of sources makes
    /// a new set). Returns whether the list changed.
    pub fn update(&self, upstream: &Upstream) -> bool {
        let mut statics = self.statics.lock().unwrap_or_else(|e| e.into_inner());
        statics.clone_from(&upstream.endpoints);
        self.replace(&self.merged(&statics))
    }

    /// Replaces the list: an endpoint still listed (the same address, weight and name) keeps
    /// its health and open count; the others start afresh. Returns whether anything changed.
    fn replace(&self, specs: &[EndpointSpec]) -> bool {
        let old = self.endpoints();
        let new: Vec<Arc<Endpoint>> = specs
            .iter()
            .map(|spec| match old.iter().find(|e| e.spec == *spec) {
                Some(kept) => kept.clone(),
                None => Endpoint::new(spec.clone()),
            })
            .collect();
        let changed =
            new.len() != old.len() || new.iter().zip(old.iter()).any(|(a, b)| a.id != b.id);
        if changed {
            self.endpoints.store(Arc::new(new.clone()));
            if self.redis.is_some() {
                // A Redis that left the set (a failover, a Sentinel's word) keeps no sessions:
                // their writes would go to a Redis no longer chosen.
                for gone in old.iter().filter(|o| !new.iter().any(|n| n.id == o.id)) {
                    gone.close_sessions("endpoint removed from its route");
                }
                self.recheck();
            }
        }
        changed
    }

    /// Whether `u` has the same discovery sources as this set.
    pub fn same_sources(&self, u: &Upstream) -> bool {
        self.sources.len() == u.sources.len()
            && self
                .sources
                .iter()
                .zip(&u.sources)
                .all(|(a, b)| a.source == *b)
    }

    /// The endpoint for the next attempt, not one in `tried` (by id); `None` when all were
    /// tried.
    pub fn pick(&self, tried: &[u64]) -> Option<Arc<Endpoint>> {
        let now = Instant::now();
        let all = self.endpoints.load();
        // The common case, one endpoint: no choice to make, nothing to allocate (the
        // new-connection rate is measured with it, docs/performance.md).
        // A gated set's connections prove the role themselves (HELLO), so an endpoint the
        // checks have not found master is still tried when none has been: one promoted since
        // the last check takes connections at once, and a replica refuses them.
        if let [only] = all.as_slice() {
            return (!tried.contains(&only.id)).then(|| only.clone());
        }
        let all = self.endpoints();
        let mut untried: Vec<(usize, &Arc<Endpoint>)> = all
            .iter()
            .enumerate()
            .filter(|(_, e)| !tried.contains(&e.id))
            .collect();
        if self.gated && untried.iter().any(|(_, e)| e.eligible()) {
            untried.retain(|(_, e)| e.eligible());
        }
        let healthy: Vec<Candidate> = untried
            .iter()
            .filter(|(_, e)| e.available(now))
            .map(|(i, e)| candidate(*i, e))
            .collect();
        // Panic mode: every untried endpoint is ejected, so try them anyway.
        let mut candidates: Vec<Candidate> = if healthy.is_empty() {
            untried.iter().map(|(i, e)| candidate(*i, e)).collect()
        } else {
            healthy
        };
        // The lowest priority that has a candidate; higher ones wait until it has none.
        let first = candidates.iter().map(|c| all[c.index].spec.priority).min();
        candidates.retain(|c| Some(all[c.index].spec.priority) == first);
        let chosen = match self.balance {
            Balance::P2c => p2c(&candidates, |n| fastrand::usize(..n)),
            Balance::RoundRobin => {
                let _round = self.round.lock().unwrap_or_else(|e| e.into_inner());
                let mut current: Vec<i64> = all
                    .iter()
                    .map(|e| e.current.load(Ordering::Relaxed))
                    .collect();
                let chosen = round_robin(&candidates, &mut current);
                for c in &candidates {
                    all[c.index]
                        .current
                        .store(current[c.index], Ordering::Relaxed);
                }
                chosen
            }
        }?;
        Some(all[chosen].clone())
    }
}

/// Server side: the default target's set and each route's. Replaceable as a whole by a reload
/// that changes only targets ([`Routes::update`]).
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<Table>,
}

/// The sets behind a server's routes.
#[derive(Debug, Default)]
pub struct Table {
    pub default: Option<Arc<Set>>,
    pub named: BTreeMap<String, Arc<Set>>,
}

impl discovery::Refresh for Set {
    fn refresh(&self) {
        self.refresh_endpoints();
    }
}

/// A server side's set for `u`, its discovery and health checks started.
fn server_set(cfg: &TunnelConfig, u: &Upstream) -> Arc<Set> {
    let balance = u.balance.unwrap_or(cfg.balance);
    let set = Arc::new(Set::new(u, balance, !cfg.unsafe_target));
    set.discover();
    if let Some(check) = cfg.health_check {
        set.check_health(check);
    }
    if set.gated {
        // Role checks every second unless --health-interval says otherwise.
        let (interval, timeout) = cfg.health_check.map_or(
            (
                Duration::from_secs(1),
                cfg.connect_timeout.min(Duration::from_secs(2)),
            ),
            |c| (c.interval, c.timeout),
        );
        set.check_roles(interval, timeout);
    }
    set
}

/// Runs the futures at once, in this task, until all have finished; their results in order.
pub async fn join_all<T>(futures: impl Iterator<Item = impl Future<Output = T>>) -> Vec<T> {
    let mut pending: Vec<_> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (slot, f) in results.iter_mut().zip(pending.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

impl Routes {
    pub fn new(cfg: &TunnelConfig) -> Routes {
        let set = |u: &Upstream| server_set(cfg, u);
        let table = Table {
            default: cfg.target.as_ref().map(set),
            named: cfg
                .routes
                .iter()
                .map(|(name, u)| (name.clone(), set(u)))
                .collect(),
        };
        Routes {
            table: ArcSwap::from_pointee(table),
        }
    }

    /// The routes now.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// The set for a route name ("" is the default target).
    pub fn get(&self, route: &str) -> Option<Arc<Set>> {
        let table = self.table.load();
        if route.is_empty() {
            table.default.clone()
        } else {
            table.named.get(route).cloned()
        }
    }

    /// Takes `cfg`'s targets and routes: a route still there keeps its set (and so its
    /// endpoints' health), updated; new routes get new sets; removed ones go. Connections open
    /// on any endpoint carry on.
    pub fn update(&self, cfg: &TunnelConfig) {
        let old = self.table();
        let keep = |old: Option<&Arc<Set>>, u: &Upstream| match old {
            Some(set)
                if set.balance == u.balance.unwrap_or(cfg.balance)
                    && set.same_sources(u)
                    && set.redis.as_deref() == u.redis.as_ref() =>
            {
                set.update(u);
                set.clone()
            }
            _ => server_set(cfg, u),
        };
        let table = Table {
            default: cfg.target.as_ref().map(|u| keep(old.default.as_ref(), u)),
            named: cfg
                .routes
                .iter()
                .map(|(name, u)| (name.clone(), keep(old.named.get(name), u)))
                .collect(),
        };
        let kept = |s: &Arc<Set>| {
            table
                .default
                .iter()
                .chain(table.named.values())
                .any(|k| Arc::ptr_eq(k, s))
        };
        for gone in old
            .default
            .iter()
            .chain(old.named.values())
            .filter(|s| !kept(s))
        {
            gone.close();
        }
        self.table.store(Arc::new(table));
    }

    /// Ends every set's discovery and health checks (the tunnel stopped).
    pub fn close(&self) {
        let table = self.table();
        for set in table.default.iter().chain(table.named.values()) {
            set.close();
        }
    }
}

fn candidate(index: usize, e: &Endpoint) -> Candidate {
    Candidate {
        index,
        weight: e.spec.weight,
        open: e.open(),
    }
}

/// What the pickers see of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its place in the set's list.
    pub index: usize,
    pub weight: u32,
    pub open: usize,
}

/// Power of two random choices: two distinct candidates drawn with `random(n)` (uniform in
/// `0..n`), and of those the one with fewer open connections per unit of weight.
pub fn p2c(candidates: &[Candidate], mut random: impl FnMut(usize) -> usize) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0].index),
        n => {
            let a = random(n);
            let b = (a + 1 + random(n - 1)) % n;
            let (x, y) = (candidates[a], candidates[b]);
            // open / weight compared without division.
            let load = |c: Candidate, other: Candidate| c.open as u64 * u64::from(other.weight);
            Some(if load(y, x) < load(x, y) {
                y.index
            } else {
                x.index
            })
        }
    }
}

/// Smooth weighted round robin (nginx's): each candidate's current weight grows by its weight;
/// the largest is chosen and pays back the total. `current` is by endpoint index.
pub fn round_robin(candidates: &[Candidate], current: &mut [i64]) -> Option<usize> {
    let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
    let mut best: Option<usize> = None;
    for c in candidates {
        current[c.index] += i64::from(c.weight);
        if best.is_none_or(|b| current[c.index] > current[b]) {
            best = Some(c.index);
        }
    }
    let b = best?;
    current[b] -= total;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cands(spec: &[(u32, usize)]) -> Vec<Candidate> {
        spec.iter()
            .enumerate()
            .map(|(index, &(weight, open))| Candidate {
                index,
                weight,
                open,
            })
            .collect()
    }

    #[test]
    fn round_robin_follows_the_weights_smoothly() {
        let c = cands(&[(1, 0), (3, 0)]);
        let mut current = vec![0; 2];
        let picks: Vec<_> = (0..8)
            .map(|_| round_robin(&c, &mut current).unwrap())
            .collect();
        // 1:3, interleaved rather than in runs.
        assert_eq!(picks, [1, 0, 1, 1, 1, 0, 1, 1]);
        assert_eq!(round_robin(&[], &mut current), None);
    }

    #[test]
    fn round_robin_over_a_subset_skips_the_others() {
        let all = cands(&[(1, 0), (1, 0), (1, 0)]);
        let without_middle = [all[0], all[2]];
        let mut current = vec![0; 3];
        let picks: Vec<_> = (0..4)
            .map(|_| round_robin(&without_middle, &mut current).unwrap())
            .collect();
        assert_eq!(picks, [0, 2, 0, 2]);
    }

    #[test]
    fn p2c_takes_the_less_loaded_of_two_per_weight() {
        // Draws 0 then 0 (which becomes the next one along): candidates 0 and 1.
        let zero = |_| 0;
        assert_eq!(p2c(&cands(&[(1, 5), (1, 2)]), zero), Some(1));
        assert_eq!(p2c(&cands(&[(1, 2), (1, 5)]), zero), Some(0));
        // Weight 4 with 6 open is less loaded (1.5) than weight 1 with 2 open.
        assert_eq!(p2c(&cands(&[(1, 2), (4, 6)]), zero), Some(1));
        assert_eq!(p2c(&cands(&[(1, 9)]), zero), Some(0));
        assert_eq!(p2c(&[], zero), None);
    }

    #[test]
    fn p2c_never_draws_the_same_candidate_twice() {
        // With every load equal the first drawn wins, so the second draw shows in what is
        // compared: a candidate is compared with another, never with itself.
        for n in 2..5 {
            let c = cands(&vec![(1, 0); n]);
            for a in 0..n {
                for b in 0..n - 1 {
                    let mut draws = [a, b].into_iter();
                    let mut seen = Vec::new();
                    let chosen = p2c(&c, |m| {
                        let d = draws.next().unwrap();
                        seen.push((d, m));
                        d
                    })
                    .unwrap();
                    assert_eq!(seen, [(a, n), (b, n - 1)]);
                    let second = (a + 1 + b) % n;
                    assert_ne!(second, a, "n={n} a={a} b={b}");
                    assert_eq!(chosen, a);
                }
            }
        }
        // Loads differ: the less loaded of the two distinct draws wins.
        let c = cands(&[(1, 3), (1, 1), (1, 2)]);
        let mut draws = [2, 0].into_iter();
        // Draws 2 then 0 (the second skips the first): candidates 2 (open 2) and 0 (open 3).
        assert_eq!(p2c(&c, |_| draws.next().unwrap()), Some(2));
    }

    #[test]
    fn discovered_endpoints_join_the_given_ones_and_off_loopback_need_unsafe_target() {
        let written = crate::config::Targets::Many(vec![
            "127.0.0.1:1".into(),
            "file:/nonexistent/eps.toml".into(),
        ]);
        let upstream = Upstream::parse("t", &written, None).unwrap();
        let found = |s: &str| EndpointSpec::parse(s, None).unwrap();
        for (local_only, want) in [
            (true, vec!["127.0.0.1:1", "127.0.0.2:3"]),
            (false, vec!["127.0.0.1:1", "10.0.0.1:2", "127.0.0.2:3"]),
        ] {
            let set = Set::new(&upstream, Balance::P2c, local_only);
            assert_eq!(set.endpoints().len(), 1);
            // The second copy of 127.0.0.1:1 is the written one's: kept once.
            let discovered = vec![
                found("10.0.0.1:2"),
                found("127.0.0.2:3"),
                found("127.0.0.1:1"),
            ];
            set.sources()[0].take(Ok(discovered), std::time::Duration::from_secs(60));
            assert!(set.refresh_endpoints());
            let now: Vec<String> = set
                .endpoints()
                .iter()
                .map(|e| e.spec.addr.to_string())
                .collect();
            assert_eq!(now, want, "local_only {local_only}");
        }
    }

    #[test]
    fn a_set_skips_tried_and_ejected_endpoints_and_panics_when_all_are_out() {
        let upstream = Upstream::parse(
            "t",
            &crate::config::Targets::Many(vec!["a:1".into(), "b:2".into(), "c:3".into()]),
            None,
        )
        .unwrap();
        let set = Set::new(&upstream, Balance::RoundRobin, false);
        for _ in 0..passive::FALL {
            set.endpoints()[0].failed("refused");
        }
        let ids: Vec<u64> = set.endpoints().iter().map(|e| e.id).collect();
        assert_eq!(set.endpoints()[0].state(), State::Ejected);
        for _ in 0..10 {
            let e = set.pick(&[]).unwrap();
            assert_ne!(e.id, ids[0], "an ejected endpoint is skipped");
        }
        assert_eq!(set.pick(&[ids[1]]).unwrap().id, ids[2]);
        // Only the ejected one left untried: panic mode tries it.
        assert_eq!(set.pick(&[ids[1], ids[2]]).unwrap().id, ids[0]);
        assert!(set.pick(&ids).is_none());
        let taking: Vec<bool> = set.taking(Instant::now()).iter().map(|t| t.1).collect();
        assert_eq!(taking, [false, true, true]);
        // Open connections are counted while in use.
        let e = set.pick(&[]).unwrap();
        let guard = e.begin();
        assert_eq!(e.open(), 1);
        drop(guard);
        assert_eq!(e.open(), 0);
    }

    #[test]
    fn a_gated_set_takes_only_proven_masters_and_any_while_none_is() {
        let mut upstream = Upstream::parse(
            "t",
            &crate::config::Targets::Many(vec!["a:1".into(), "b:2".into()]),
            None,
        )
        .unwrap();
        upstream.redis = Some(crate::redis::Settings {
            require_master: true,
            ..Default::default()
        });
        let set = Set::new(&upstream, Balance::RoundRobin, false);
        let taking =
            |set: &Set| -> Vec<bool> { set.taking(Instant::now()).iter().map(|t| t.1).collect() };
        // None proven: every endpoint is tried (a connection proves the role itself).
        assert_eq!(taking(&set), [true, true]);
        let b = set.endpoints()[1].clone();
        b.gated(None, true, "master");
        // b proven master: only b takes connections, as pick chooses.
        assert_eq!(taking(&set), [false, true]);
        for _ in 0..4 {
            assert_eq!(set.pick(&[]).unwrap().id, b.id);
        }
        b.not_master("demoted");
        assert_eq!(taking(&set), [true, true]);
    }
}
