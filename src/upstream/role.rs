//! Master-only routing: which of a Redis route's endpoints may take connections, from what the
//! role checks last found. Pure, so the rules are tested here; the checker in `mod.rs` feeds it.
//!
//! An endpoint takes connections only while its last check proved it master: one never
//! checked, unreachable, or a replica takes none. A master that has no replicas while another
//! master has some was left behind by a failover (split brain) and takes none either.

use crate::redis::{Probe, Role};

/// Which endpoints may take connections, in the order of `checks` (one per endpoint: its
/// check's result, `None` when it failed or has not run).
pub fn eligible(checks: &[Option<&Probe>]) -> Vec<bool> {
    let leader_exists = checks
        .iter()
        .flatten()
        .any(|p| p.role == Role::Master && p.replicas.is_some_and(|n| n > 0));
    checks
        .iter()
        .map(|c| match c {
            Some(p) if p.role == Role::Master => !(leader_exists && p.replicas == Some(0)),
            _ => false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(replicas: Option<usize>) -> Probe {
        Probe {
            role: Role::Master,
            replicas,
        }
    }

    #[test]
    fn only_proven_masters_take_connections() {
        let replica = Probe {
            role: Role::Replica,
            replicas: None,
        };
        let m = master(Some(1));
        assert_eq!(
            eligible(&[Some(&m), Some(&replica), None]),
            [true, false, false]
        );
        assert_eq!(eligible(&[None, None]), [false, false], "unknown is down");
    }

    #[test]
    fn a_master_left_behind_gets_nothing_while_one_with_replicas_exists() {
        let (leader, alone, unknown) = (master(Some(2)), master(Some(0)), master(None));
        assert_eq!(
            eligible(&[Some(&alone), Some(&leader), Some(&unknown)]),
            [false, true, true],
            "a master that would not say how many replicas it has is not judged"
        );
        // Two masters alone (a promotion half done): both are masters, neither is preferred.
        assert_eq!(eligible(&[Some(&alone), Some(&alone)]), [true, true]);
    }
}
