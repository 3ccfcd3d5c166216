//! Passive health: what the connections an endpoint was given say about it.
//!
//! `FALL` consecutive failed connects eject an endpoint for a back-off that doubles with each
//! ejection in a row (up to a cap); once it has passed, the endpoint is tried again on
//! probation, where one failure ejects it again and `RISE` successes readmit it fully (and reset
//! the back-off). A pure state machine over a clock passed in, so it is tested without waiting.

use std::time::{Duration, Instant};

/// Consecutive failures that eject a healthy endpoint.
pub const FALL: u32 = 3;
/// Successes on probation that readmit an endpoint.
pub const RISE: u32 = 2;
/// The first ejection's length; each one in a row doubles it.
pub const BASE_EJECTION: Duration = Duration::from_secs(1);
/// The longest ejection.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// Where an endpoint stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Healthy,
    /// Not given new connections until the back-off passes.
    Ejected,
    /// Given connections again after an ejection; not yet trusted.
    Probation,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Ejected => "ejected",
            State::Probation => "probation",
        }
    }
}

#[derive(Debug, Default)]
pub struct Passive {
    /// Consecutive failures while healthy.
    failures: u32,
    /// Ejections in a row (since the last full readmission).
    ejections: u32,
    /// Set while ejected or on probation: the end of the last ejection.
    ejected_until: Option<Instant>,
    /// Successes since probation began.
    successes: u32,
}

impl Passive {
    pub fn state(&self, now: Instant) -> State {
        match self.ejected_until {
            None => State::Healthy,
            Some(t) if now < t => State::Ejected,
            Some(_) => State::Probation,
        }
    }

    /// Whether it should be given new connections now.
    pub fn available(&self, now: Instant) -> bool {
        self.state(now) != State::Ejected
    }

    /// A connect failed. Returns true if this ejected the endpoint.
    pub fn failed(&mut self, now: Instant) -> bool {
        match self.state(now) {
            // A connection begun before the ejection that fails now changes nothing.
            State::Ejected => false,
            State::Probation => {
                self.eject(now);
                true
            }
            State::Healthy => {
                self.failures += 1;
                if self.failures >= FALL {
                    self.eject(now);
                    return true;
                }
                false
            }
        }
    }

    /// A connect worked. Returns true if this readmitted the endpoint fully.
    pub fn succeeded(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Healthy => {
                self.failures = 0;
                false
            }
            // A connection begun before the ejection: too old to vouch for it.
            State::Ejected => false,
            State::Probation => {
                self.successes += 1;
                if self.successes >= RISE {
                    *self = Passive::default();
                    return true;
                }
                false
            }
        }
    }

    fn eject(&mut self, now: Instant) {
        let factor = 1u32 << self.ejections.min(16);
        let length = BASE_EJECTION.saturating_mul(factor).min(MAX_EJECTION);
        self.ejections += 1;
        self.failures = 0;
        self.successes = 0;
        self.ejected_until = Some(now + length);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_eject_and_back_off_grows_until_rise_successes() {
        let t0 = Instant::now();
        let mut h = Passive::default();
        assert!(!h.failed(t0));
        assert!(!h.succeeded(t0) && h.state(t0) == State::Healthy);
        // A success in between resets the count: FALL must be consecutive.
        for _ in 0..FALL - 1 {
            assert!(!h.failed(t0));
        }
        assert!(h.failed(t0), "the FALLth failure in a row ejects");
        assert_eq!(h.state(t0), State::Ejected);
        assert!(!h.available(t0 + BASE_EJECTION / 2));
        // Probation after the back-off: one failure ejects again, for twice as long.
        let t1 = t0 + BASE_EJECTION;
        assert_eq!(h.state(t1), State::Probation);
        assert!(h.available(t1));
        assert!(h.failed(t1));
        assert_eq!(h.state(t1 + BASE_EJECTION), State::Ejected);
        let t2 = t1 + BASE_EJECTION * 2;
        assert_eq!(h.state(t2), State::Probation);
        // RISE successes readmit it and reset the back-off.
        for i in 1..RISE {
            assert!(!h.succeeded(t2), "success {i} of {RISE}");
        }
        assert!(h.succeeded(t2));
        assert_eq!(h.state(t2), State::Healthy);
        for _ in 0..FALL {
            h.failed(t2);
        }
        assert_eq!(h.state(t2 + BASE_EJECTION), State::Probation);
    }

    #[test]
    fn results_that_arrive_while_ejected_change_nothing() {
        let t0 = Instant::now();
        let mut h = Passive::default();
        for _ in 0..FALL {
            h.failed(t0);
        }
        assert!(!h.succeeded(t0) && !h.failed(t0));
        assert_eq!(h.state(t0 + BASE_EJECTION), State::Probation);
    }

    #[test]
    fn the_back_off_is_capped() {
        let mut now = Instant::now();
        let mut h = Passive::default();
        for _ in 0..FALL {
            h.failed(now);
        }
        for _ in 0..40 {
            now += MAX_EJECTION;
            assert_eq!(h.state(now), State::Probation);
            h.failed(now);
        }
        assert_eq!(h.state(now + MAX_EJECTION), State::Probation);
    }
}
