//! Which leases a worker takes, judged from one listing of the lease table and this worker's
//! own clock. Pure: every worker runs the same planner on what it sees, with no leader.
//!
//! - A lease's owner is alive while its counter moves: a lease whose counter has not changed
//!   for the lease duration, as measured here, is expired. Clocks are never compared across
//!   hosts (a lease seen for the first time counts as renewed now).
//! - Live workers: the owners of leases that are not expired, and this worker.
//! - Target: `ceil(claimable leases / live workers)`, at most `max_leases`. Claimable: not
//!   finished, and every parent finished (or gone from the table).
//! - Below target, take unowned leases (shuffled, so workers do not race for the same one),
//!   then expired ones (oldest first); only when there are none, ask the most-loaded worker to
//!   hand some over.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;

use super::lease::Lease;

/// When each lease's counter was last seen to move, on this worker's clock.
#[derive(Debug, Default)]
pub(crate) struct Liveness {
    seen: HashMap<String, Observed>,
}

#[derive(Debug)]
struct Observed {
    counter: u64,
    owner: Option<String>,
    /// When the counter last changed; `None` for a lease first seen unowned.
    changed_at: Option<Instant>,
    /// Since when the lease has been seen without an owner.
    unowned_since: Option<Instant>,
}

impl Liveness {
    /// Takes in a listing made at `now`.
    pub(crate) fn update(&mut self, leases: &[Lease], now: Instant) {
        let mut seen = HashMap::with_capacity(leases.len());
        for lease in leases {
            let old = self.seen.remove(&lease.key);
            let unowned_since = match &old {
                _ if lease.owner.is_some() => None,
                Some(old) if old.owner.is_none() => old.unowned_since,
                _ => Some(now),
            };
            let changed_at = match old {
                Some(old) if old.counter == lease.counter && old.owner == lease.owner => {
                    old.changed_at
                }
                _ if lease.owner.is_none() => None,
                _ => Some(now),
            };
            seen.insert(
                lease.key.clone(),
                Observed {
                    counter: lease.counter,
                    owner: lease.owner.clone(),
                    changed_at,
                    unowned_since,
                },
            );
        }
        self.seen = seen;
    }

    /// How long the lease's counter has not moved; `None` for a lease never seen owned.
    pub(crate) fn idle(&self, key: &str, now: Instant) -> Option<Duration> {
        let observed = self.seen.get(key)?;
        observed
            .changed_at
            .map(|at| now.saturating_duration_since(at))
    }

    /// How long the lease has been seen without an owner.
    pub(crate) fn unowned_for(&self, key: &str, now: Instant) -> Option<Duration> {
        let since = self.seen.get(key)?.unowned_since?;
        Some(now.saturating_duration_since(since))
    }

    /// Whether the lease has an owner whose counter has not moved for `lease_duration`.
    pub(crate) fn is_expired(&self, lease: &Lease, now: Instant, lease_duration: Duration) -> bool {
        lease.owner.is_some()
            && self
                .idle(&lease.key, now)
                .is_none_or(|d| d > lease_duration)
    }
}

/// What the planner needs to know besides the listing.
#[derive(Debug)]
pub(crate) struct PlanInput<'a> {
    pub(crate) me: &'a str,
    pub(crate) leases: &'a [Lease],
    pub(crate) liveness: &'a Liveness,
    pub(crate) now: Instant,
    pub(crate) lease_duration: Duration,
    pub(crate) max_leases: Option<usize>,
    /// Shards this worker's own discovery says may start (it can read them).
    pub(crate) ready: &'a HashSet<String>,
}

/// What this worker should do now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Leases to claim (as seen: the claim is conditional on them).
    pub(crate) claim: Vec<Lease>,
    /// Leases to ask their owners for: (lease key, owner).
    pub(crate) handoff: Vec<(String, String)>,
    /// How many leases each worker should hold.
    pub(crate) target: usize,
    /// Live workers, this one included.
    pub(crate) workers: usize,
}

/// Plans one round. `rng` shuffles the candidates.
///
/// Besides the fair share: a lease left unowned for a third of the lease duration (every
/// worker had its listings to claim it; some are capped by `max_leases`) is claimed by a
/// worker below its own cap, one per round, rather than left unread.
pub(crate) fn plan(input: &PlanInput<'_>, rng: &mut fastrand::Rng) -> Plan {
    let mut plan = fair_share(input, rng);
    let mine = input
        .leases
        .iter()
        .filter(|lease| lease.is_owned_by(input.me) && !lease.is_finished())
        .count();
    let below_cap = input
        .max_leases
        .is_none_or(|max| mine + plan.claim.len() < max);
    if below_cap {
        let patience = input.lease_duration / 3;
        let leftover = input.leases.iter().find(|lease| {
            lease.owner.is_none()
                && !lease.is_finished()
                && input.ready.contains(&lease.key)
                && !plan.claim.iter().any(|c| c.key == lease.key)
                && input
                    .liveness
                    .unowned_for(&lease.key, input.now)
                    .is_some_and(|d| d >= patience)
        });
        if let Some(lease) = leftover {
            plan.claim.push(lease.clone());
        }
    }
    plan
}

/// The fair share: claims and handoff requests up to `ceil(claimable / live workers)`.
fn fair_share(input: &PlanInput<'_>, rng: &mut fastrand::Rng) -> Plan {
    let by_key: HashMap<&str, &Lease> = input
        .leases
        .iter()
        .map(|lease| (lease.key.as_str(), lease))
        .collect();
    let parents_finished = |lease: &Lease| {
        lease.parents.iter().all(|p| {
            by_key
                .get(p.as_str())
                .is_none_or(|parent| parent.is_finished())
        })
    };
    let expired = |lease: &Lease| {
        input
            .liveness
            .is_expired(lease, input.now, input.lease_duration)
    };
    // Leases somebody reads or this worker can read: a row no worker can read (a shard gone
    // from the stream) does not count.
    let claimable: Vec<&Lease> = input
        .leases
        .iter()
        .filter(|lease| !lease.is_finished() && parents_finished(lease))
        .filter(|lease| {
            input.ready.contains(&lease.key)
                || lease
                    .owner
                    .as_deref()
                    .is_some_and(|owner| owner == input.me || !expired(lease))
        })
        .collect();

    // Live owners and what each holds.
    let mut held: HashMap<&str, Vec<&Lease>> = HashMap::new();
    held.insert(input.me, Vec::new());
    for lease in &claimable {
        if let Some(owner) = lease.owner.as_deref() {
            if owner == input.me || !expired(lease) {
                held.entry(owner).or_default().push(lease);
            }
        }
    }
    let workers = held.len();
    let mut target = claimable.len().div_ceil(workers);
    if let Some(max) = input.max_leases {
        target = target.min(max);
    }
    let mine = held.get(input.me).map_or(0, Vec::len);
    let asked = claimable
        .iter()
        .filter(|lease| {
            lease.handoff_to.as_deref() == Some(input.me)
                && !lease.is_owned_by(input.me)
                && !expired(lease)
        })
        .count();
    let mut plan = Plan {
        target,
        workers,
        ..Plan::default()
    };
    let mut need = target.saturating_sub(mine + asked);
    if need == 0 {
        return plan;
    }
    let readable = |lease: &&Lease| input.ready.contains(&lease.key);

    let mut unowned: Vec<&Lease> = claimable
        .iter()
        .copied()
        .filter(|lease| lease.owner.is_none())
        .collect();
    let mut stale: Vec<&Lease> = claimable
        .iter()
        .copied()
        .filter(|lease| !lease.is_owned_by(input.me) && lease.owner.is_some() && expired(lease))
        .collect();
    // Free leases this worker cannot read yet are left to its discovery, not taken from others.
    let free_somewhere = unowned.iter().chain(&stale).any(&readable);
    rng.shuffle(&mut unowned);
    // Oldest first: the longest idle (never seen renewed counts as oldest).
    stale.sort_by_key(|lease| {
        std::cmp::Reverse(
            input
                .liveness
                .idle(&lease.key, input.now)
                .unwrap_or(Duration::MAX),
        )
    });
    for lease in unowned.into_iter().chain(stale).filter(readable) {
        if need == 0 {
            break;
        }
        plan.claim.push(lease.clone());
        need -= 1;
    }
    if need == 0 || free_somewhere {
        return plan;
    }

    // Nothing free: ask the most-loaded worker.
    let Some((owner, leases)) = held
        .iter()
        .filter(|(owner, _)| **owner != input.me)
        .max_by(|a, b| a.1.len().cmp(&b.1.len()).then_with(|| b.0.cmp(a.0)))
    else {
        return plan;
    };
    let count = leases.len();
    let give = if count > target {
        need.min(count - target)
    } else if count == target && need > 1 {
        1
    } else {
        0
    };
    let mut candidates: Vec<&Lease> = leases
        .iter()
        .copied()
        .filter(|lease| lease.handoff_to.is_none())
        .filter(readable)
        .collect();
    rng.shuffle(&mut candidates);
    plan.handoff = candidates
        .into_iter()
        .take(give)
        .map(|lease| (lease.key.clone(), (*owner).to_owned()))
        .collect();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use kinesis_tower_layers::Checkpoint;

    const LEASE: Duration = Duration::from_secs(10);

    fn shard(i: usize) -> String {
        format!("shardId-{i:012}")
    }

    fn leases(n: usize, owner: impl Fn(usize) -> Option<&'static str>) -> Vec<Lease> {
        (0..n)
            .map(|i| {
                let mut lease = Lease::new(shard(i), Vec::new());
                lease.owner = owner(i).map(str::to_owned);
                lease.counter = 1;
                lease
            })
            .collect()
    }

    fn all_ready(leases: &[Lease]) -> HashSet<String> {
        leases.iter().map(|l| l.key.clone()).collect()
    }

    /// Plans for `me` with the listing seen once at `seen_at` and planned at `now`.
    fn plan_at(
        me: &str,
        leases: &[Lease],
        liveness: &Liveness,
        now: Instant,
        max: Option<usize>,
    ) -> Plan {
        let ready = all_ready(leases);
        plan(
            &PlanInput {
                me,
                leases,
                liveness,
                now,
                lease_duration: LEASE,
                max_leases: max,
                ready: &ready,
            },
            &mut fastrand::Rng::with_seed(7),
        )
    }

    fn seen(leases: &[Lease], at: Instant) -> Liveness {
        let mut liveness = Liveness::default();
        liveness.update(leases, at);
        liveness
    }

    /// Runs workers in turn, each claiming what its plan says (claims and handoffs applied at
    /// once), until nothing changes; answers how many leases each holds.
    fn settle(workers: &[&'static str], mut table: Vec<Lease>) -> HashMap<String, usize> {
        let now = Instant::now();
        for _round in 0..20 {
            let mut changed = false;
            for me in workers {
                let liveness = seen(&table, now);
                let p = plan_at(me, &table, &liveness, now, None);
                for claimed in p.claim {
                    let lease = table.iter_mut().find(|l| l.key == claimed.key).unwrap();
                    lease.owner = Some((*me).to_owned());
                    lease.counter += 1;
                    changed = true;
                }
                for (key, _) in p.handoff {
                    // The owner hands over at once.
                    let lease = table.iter_mut().find(|l| l.key == key).unwrap();
                    lease.owner = Some((*me).to_owned());
                    lease.counter += 1;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        let mut counts = HashMap::new();
        for lease in &table {
            *counts.entry(lease.owner.clone().unwrap()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn ten_leases_spread_over_one_two_and_three_workers() {
        let fresh = leases(10, |_| None);
        assert_eq!(
            settle(&["a"], fresh.clone()),
            HashMap::from([("a".into(), 10)])
        );
        let two = settle(&["a", "b"], fresh.clone());
        assert_eq!(two, HashMap::from([("a".into(), 5), ("b".into(), 5)]));
        let mut three: Vec<usize> = settle(&["a", "b", "c"], fresh).into_values().collect();
        three.sort();
        assert_eq!(three, vec![3, 3, 4]);
    }

    #[test]
    fn a_worker_that_joins_asks_the_owner_for_half() {
        let table = leases(10, |_| Some("a"));
        let now = Instant::now();
        let p = plan_at("b", &table, &seen(&table, now), now, None);
        assert_eq!((p.workers, p.target), (2, 5));
        assert!(p.claim.is_empty(), "nothing is free: {p:?}");
        assert_eq!(p.handoff.len(), 5);
        assert!(p.handoff.iter().all(|(_, owner)| owner == "a"));
        // Once asked, it does not ask again while the requests are pending.
        let mut asked = table.clone();
        for (key, _) in &p.handoff {
            asked.iter_mut().find(|l| &l.key == key).unwrap().handoff_to = Some("b".into());
        }
        let again = plan_at("b", &asked, &seen(&asked, now), now, None);
        assert_eq!(
            again,
            Plan {
                target: 5,
                workers: 2,
                ..Plan::default()
            }
        );
        // The owner at target gives nothing to a worker that needs only one more.
        let table = leases(10, |i| Some(if i < 5 { "a" } else { "b" }));
        let p = plan_at("c", &table, &seen(&table, now), now, None);
        assert_eq!((p.target, p.handoff.len()), (4, 1));
    }

    #[test]
    fn expired_leases_are_taken_oldest_first_on_the_observers_clock() {
        let start = Instant::now();
        let mut table = leases(4, |i| Some(if i < 2 { "a" } else { "dead" }));
        let mut liveness = seen(&table, start);
        // "a" keeps renewing; "dead" stopped. Lease 3 was renewed once more than lease 2.
        table[0].counter += 5;
        table[1].counter += 5;
        table[3].counter += 1;
        liveness.update(&table, start + Duration::from_secs(4));
        table[0].counter += 5;
        table[1].counter += 5;
        liveness.update(&table, start + Duration::from_secs(12));
        let now = start + Duration::from_secs(12);
        assert!(liveness.is_expired(&table[2], now, LEASE));
        assert!(
            !liveness.is_expired(&table[3], now, LEASE),
            "idle for 8 s only"
        );
        assert!(!liveness.is_expired(&table[0], now, LEASE));
        let p = plan_at("b", &table, &liveness, now, None);
        // Live: a, b (dead holds only leases seen as stale by now? lease 3 is still fresh).
        let keys: Vec<_> = p.claim.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, vec![shard(2).as_str()]);
        // Later both are expired: the oldest (lease 2) first.
        let later = start + Duration::from_secs(15);
        let p = plan_at("b", &table, &liveness, later, None);
        let keys: Vec<_> = p.claim.iter().map(|l| l.key.clone()).collect();
        assert_eq!(keys, vec![shard(2), shard(3)]);
        assert!(p.handoff.is_empty(), "free leases first: {p:?}");
    }

    #[test]
    fn a_handoff_asked_of_a_worker_that_died_is_claimed_once_expired() {
        let start = Instant::now();
        let mut table = leases(4, |_| Some("dead"));
        table[0].handoff_to = Some("b".into());
        table[1].handoff_to = Some("b".into());
        let liveness = seen(&table, start);
        // Still live: the requests are pending, nothing more to ask for.
        let p = plan_at("b", &table, &liveness, start, None);
        assert_eq!((p.claim.len(), p.handoff.len()), (0, 0), "{p:?}");
        // Expired: every lease is claimed, the asked ones included.
        let later = start + LEASE + Duration::from_secs(1);
        let p = plan_at("b", &table, &liveness, later, None);
        assert_eq!(p.claim.len(), 4, "{p:?}");
    }

    #[test]
    fn a_lease_first_seen_owned_counts_as_renewed_now() {
        let now = Instant::now();
        let table = leases(2, |_| Some("a"));
        let liveness = seen(&table, now);
        assert!(!liveness.is_expired(&table[0], now + LEASE, LEASE));
        assert!(liveness.is_expired(&table[0], now + LEASE + Duration::from_millis(1), LEASE));
    }

    #[test]
    fn children_wait_for_every_parent_to_finish() {
        let now = Instant::now();
        let mut table = leases(2, |_| None);
        table[0].checkpoint = Some(Checkpoint::ShardEnd);
        let mut merged = Lease::new("child", vec![shard(0), shard(1)]);
        merged.counter = 0;
        table.push(merged);
        let p = plan_at("a", &table, &seen(&table, now), now, None);
        let keys: Vec<_> = p.claim.iter().map(|l| l.key.clone()).collect();
        assert_eq!(
            keys,
            vec![shard(1)],
            "the child waits for its second parent"
        );
        table[1].checkpoint = Some(Checkpoint::ShardEnd);
        let p = plan_at("a", &table, &seen(&table, now), now, None);
        let keys: Vec<_> = p.claim.iter().map(|l| l.key.clone()).collect();
        assert_eq!(keys, vec!["child".to_owned()]);
        // A parent gone from the table (expired, deleted) does not hold its child back.
        let orphan = vec![Lease::new("child", vec!["gone".into()])];
        let p = plan_at("a", &orphan, &seen(&orphan, now), now, None);
        assert_eq!(p.claim.len(), 1);
    }

    #[test]
    fn a_lease_left_by_a_capped_worker_is_claimed_after_a_while() {
        let start = Instant::now();
        // a is capped at 1 and holds 1; b holds 2 (its share of 4 over 2 workers); one left.
        let table = leases(4, |i| match i {
            0 => Some("a"),
            1 | 2 => Some("b"),
            _ => None,
        });
        let liveness = seen(&table, start);
        let p = plan_at("b", &table, &liveness, start, None);
        assert!(p.claim.is_empty(), "not at once: {p:?}");
        let later = start + LEASE / 3;
        let mut liveness = liveness;
        liveness.update(&table, later);
        let p = plan_at("b", &table, &liveness, later, None);
        assert_eq!(p.claim.len(), 1, "{p:?}");
        // A capped worker does not.
        let p = plan_at("a", &table, &liveness, later, Some(1));
        assert!(p.claim.is_empty(), "{p:?}");
    }

    #[test]
    fn rows_nobody_can_read_do_not_count_or_block_handoffs() {
        let now = Instant::now();
        let mut table = leases(4, |_| Some("a"));
        // A row for a shard gone from the stream: unowned, never readable.
        table.push(Lease::new("shardId-gone", Vec::new()));
        let liveness = seen(&table, now);
        let ready: HashSet<String> = table[..4].iter().map(|l| l.key.clone()).collect();
        let p = plan(
            &PlanInput {
                me: "b",
                leases: &table,
                liveness: &liveness,
                now,
                lease_duration: LEASE,
                max_leases: None,
                ready: &ready,
            },
            &mut fastrand::Rng::with_seed(3),
        );
        assert_eq!((p.target, p.handoff.len()), (2, 2), "{p:?}");
    }

    #[test]
    fn max_leases_caps_the_target() {
        let table = leases(10, |_| None);
        let now = Instant::now();
        let p = plan_at("a", &table, &seen(&table, now), now, Some(3));
        assert_eq!((p.target, p.claim.len()), (3, 3));
    }

    #[test]
    fn only_shards_this_worker_may_start_are_claimed() {
        let table = leases(3, |_| None);
        let now = Instant::now();
        let ready: HashSet<String> = [shard(1)].into();
        let liveness = seen(&table, now);
        let p = plan(
            &PlanInput {
                me: "a",
                leases: &table,
                liveness: &liveness,
                now,
                lease_duration: LEASE,
                max_leases: None,
                ready: &ready,
            },
            &mut fastrand::Rng::with_seed(1),
        );
        let keys: Vec<_> = p.claim.iter().map(|l| l.key.clone()).collect();
        assert_eq!(keys, vec![shard(1)]);
    }

    #[test]
    fn workers_shuffle_their_choice_of_unowned_leases() {
        let table = leases(10, |_| None);
        let now = Instant::now();
        let liveness = seen(&table, now);
        let ready = all_ready(&table);
        // Two workers that each think they are the second one (target 5).
        let mut other = table.clone();
        other[9].owner = Some("x".into());
        let firsts: HashSet<String> = (0..8)
            .map(|seed| {
                plan(
                    &PlanInput {
                        me: "a",
                        leases: &other,
                        liveness: &liveness,
                        now,
                        lease_duration: LEASE,
                        max_leases: None,
                        ready: &ready,
                    },
                    &mut fastrand::Rng::with_seed(seed),
                )
                .claim[0]
                    .key
                    .clone()
            })
            .collect();
        assert!(firsts.len() > 1, "always the same first lease: {firsts:?}");
    }
}
