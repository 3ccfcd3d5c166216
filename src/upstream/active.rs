//! Active health: an endpoint checked on a timer (a TCP connect, on the server side), up after
//! `rise` checks in a row pass and down after `fall` in a row fail. A pure state machine: the
//! checker task feeds it results.

/// The thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub rise: u32,
    pub fall: u32,
}

/// What the checks say of an endpoint. It starts up: a check that has not run yet is no
/// reason to refuse an endpoint (passive health covers the first connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Active {
    up: bool,
    /// Checks in a row that disagree with `up`.
    streak: u32,
}

impl Default for Active {
    fn default() -> Active {
        Active {
            up: true,
            streak: 0,
        }
    }
}

impl Active {
    pub fn up(&self) -> bool {
        self.up
    }

    /// Takes one check's result; returns `Some(up)` when the state flipped.
    pub fn check(&mut self, passed: bool, t: Thresholds) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { t.fall } else { t.rise };
        if self.streak >= needed.max(1) {
            self.up = passed;
            self.streak = 0;
            return Some(passed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds { rise: 2, fall: 3 };

    #[test]
    fn fall_failures_in_a_row_take_it_down_and_rise_passes_bring_it_up() {
        let mut a = Active::default();
        assert!(a.up());
        assert_eq!(a.check(false, T), None);
        assert_eq!(a.check(false, T), None);
        // A pass in between starts the count again.
        assert_eq!(a.check(true, T), None);
        assert_eq!(a.check(false, T), None);
        assert_eq!(a.check(false, T), None);
        assert_eq!(a.check(false, T), Some(false));
        assert!(!a.up());
        assert_eq!(a.check(true, T), None);
        assert_eq!(a.check(false, T), None, "a failure resets the rise count");
        assert_eq!(a.check(true, T), None);
        assert_eq!(a.check(true, T), Some(true));
        assert!(a.up());
    }

    #[test]
    fn thresholds_of_zero_act_as_one() {
        let mut a = Active::default();
        let t = Thresholds { rise: 0, fall: 0 };
        assert_eq!(a.check(false, t), Some(false));
        assert_eq!(a.check(true, t), Some(true));
    }
}
