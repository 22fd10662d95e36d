//! Shard lineage: which shards may start, in which order, and where a shard without a
//! checkpoint starts.

use std::collections::{HashMap, HashSet};

use kinesis_tower_layers::ShardId;

use super::ShardStart;
use crate::consumer::settings::StartPosition;
use crate::kinesis::{ChildShard, IteratorPosition, ShardDescription};

/// Where a shard starts when the store has no checkpoint for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Read from this position.
    Read(IteratorPosition),
    /// Do not read it (a closed shard before the start position): it counts as finished.
    Skip,
}

/// How a finished shard was read by this consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Read {
    /// Not read (skipped: closed before the start position).
    No,
    /// Read in this run from the start position (no checkpoint): its children start at the
    /// same position in time (TRIM_HORIZON, or the start timestamp).
    FromStart,
    /// Read from a checkpoint (an earlier run started it), or by someone else: its children
    /// start at TRIM_HORIZON, so nothing written after the earlier start is lost.
    Resumed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Started,
    Finished(Read),
}

#[derive(Debug)]
struct Entry {
    description: ShardDescription,
    state: State,
    /// Discovered after the first listing: always starts at TRIM_HORIZON without a checkpoint.
    late: bool,
    /// Seen in a ListShards answer (not only in a parent's ChildShards). Until then a parent
    /// missing from the lineage may simply not be listed yet, so the shard must wait.
    listed: bool,
    /// In the latest listing.
    in_latest_listing: bool,
    /// The consumer took its start (the assignment filter let it through).
    read_here: bool,
}

/// The shards of the stream and how far each is.
#[derive(Debug)]
pub(crate) struct Lineage {
    shards: HashMap<ShardId, Entry>,
    /// Discovery order, so shards start in a stable order.
    order: Vec<ShardId>,
    listed_once: bool,
    start: StartPosition,
}

impl Lineage {
    pub(crate) fn new(start: StartPosition) -> Self {
        Self {
            shards: HashMap::new(),
            order: Vec::new(),
            listed_once: false,
            start,
        }
    }

    /// Merges a full ListShards answer: new shards are added, known ones updated (a shard that
    /// closed gets its ending sequence number).
    pub(crate) fn merge_listing(&mut self, listing: Vec<ShardDescription>) {
        let late = self.listed_once;
        for entry in self.shards.values_mut() {
            entry.in_latest_listing = false;
        }
        for description in listing {
            match self.shards.get_mut(&description.shard_id) {
                Some(entry) => {
                    entry.listed = true;
                    entry.in_latest_listing = true;
                    if description.ending_sequence_number.is_some()
                        || description.starting_sequence_number.is_some()
                    {
                        entry.description = description;
                    }
                }
                None => self.insert(description, late, true),
            }
        }
        self.listed_once = true;
        // A shard this consumer does not read (the filter dropped or revoked it) that left the
        // listing has expired: nothing of it is left to read, so its children may start.
        for entry in self.shards.values_mut() {
            if entry.state == State::Started
                && !entry.read_here
                && entry.listed
                && !entry.in_latest_listing
            {
                entry.state = State::Finished(Read::Resumed);
            }
        }
        self.prune();
    }

    /// Forgets finished shards that the latest listing no longer shows (expired by retention)
    /// and that no shard still waiting names as a parent, so a consumer that runs through many
    /// generations of resharding keeps only what the stream still lists.
    fn prune(&mut self) {
        let needed: HashSet<ShardId> = self
            .shards
            .values()
            .filter(|e| e.state == State::Waiting)
            .flat_map(|e| e.description.parents().cloned())
            .collect();
        self.shards.retain(|id, entry| {
            let expired = matches!(entry.state, State::Finished(_))
                && entry.listed
                && !entry.in_latest_listing;
            !expired || needed.contains(id)
        });
        let shards = &self.shards;
        self.order.retain(|id| shards.contains_key(id));
    }

    /// How many shards the lineage keeps.
    pub(crate) fn len(&self) -> usize {
        self.shards.len()
    }

    /// The consumer is reading `shard` (its start passed the filter).
    pub(crate) fn read_here(&mut self, shard: &ShardId) {
        if let Some(entry) = self.shards.get_mut(shard) {
            entry.read_here = true;
        }
    }

    /// The consumer stopped reading `shard` before its end (revoked).
    pub(crate) fn released(&mut self, shard: &ShardId) {
        if let Some(entry) = self.shards.get_mut(shard) {
            entry.read_here = false;
        }
    }

    /// Started shards that this consumer is not reading (the filter dropped their start) and
    /// that a waiting shard names as a parent: finished once the store holds their end.
    pub(crate) fn parents_read_elsewhere(&self) -> Vec<ShardId> {
        let mut parents: Vec<ShardId> = self
            .shards
            .values()
            .filter(|e| e.state == State::Waiting)
            .flat_map(|e| e.description.parents())
            .filter(|p| {
                self.shards
                    .get(*p)
                    .is_some_and(|parent| parent.state == State::Started && !parent.read_here)
            })
            .cloned()
            .collect();
        parents.sort();
        parents.dedup();
        parents
    }

    /// Whether a listing was ever merged.
    pub(crate) fn has_listing(&self) -> bool {
        self.listed_once
    }

    /// Adds the children a closed shard reported (GetRecords `ChildShards`), so they can start
    /// as soon as their parents finish, without waiting for the next listing.
    pub(crate) fn merge_children(&mut self, children: &[ChildShard]) {
        for child in children {
            if self.shards.contains_key(&child.shard_id) {
                continue;
            }
            let mut description = ShardDescription::new(child.shard_id.clone());
            description.parent_shard_id = child.parent_shards.first().cloned();
            description.adjacent_parent_shard_id = child.parent_shards.get(1).cloned();
            self.insert(description, true, false);
        }
    }

    fn insert(&mut self, description: ShardDescription, late: bool, listed: bool) {
        self.order.push(description.shard_id.clone());
        self.shards.insert(
            description.shard_id.clone(),
            Entry {
                description,
                state: State::Waiting,
                late,
                listed,
                in_latest_listing: listed,
                read_here: false,
            },
        );
    }

    /// Shards that may start now (every known parent finished), marked started, each with where
    /// it starts if it has no checkpoint.
    pub(crate) fn take_ready(&mut self) -> Vec<ShardStart> {
        let mut ready = Vec::new();
        for id in &self.order {
            let entry = &self.shards[id];
            if entry.state != State::Waiting {
                continue;
            }
            // A parent the lineage does not know counts as finished (trimmed by retention) only
            // once a listing that shows this shard does not show it.
            let parents_done = entry
                .description
                .parents()
                .all(|p| match self.shards.get(p) {
                    Some(parent) => matches!(parent.state, State::Finished(_)),
                    None => entry.listed,
                });
            if parents_done {
                ready.push(ShardStart {
                    shard_id: id.clone(),
                    parents: entry.description.parents().cloned().collect(),
                    fallback: self.fallback(entry),
                    listed_open: entry.listed && !entry.description.is_closed(),
                });
            }
        }
        for start in &ready {
            if let Some(entry) = self.shards.get_mut(&start.shard_id) {
                entry.state = State::Started;
            }
        }
        ready
    }

    fn fallback(&self, entry: &Entry) -> Fallback {
        let parent_read = |how: Read| {
            entry.description.parents().any(|p| {
                self.shards
                    .get(p)
                    .is_some_and(|parent| parent.state == State::Finished(how))
            })
        };
        // A time is a position in every shard: children of a shard read from it, and shards
        // found later, start there too (as the KCL does), not at TRIM_HORIZON, which would
        // deliver records from before it. A parent resumed from a checkpoint was started by
        // an earlier run, maybe at an earlier time: its children start at TRIM_HORIZON.
        if let StartPosition::AtTimestamp(t) = &self.start {
            return if parent_read(Read::Resumed) {
                Fallback::Read(IteratorPosition::TrimHorizon)
            } else {
                Fallback::Read(IteratorPosition::AtTimestamp(*t))
            };
        }
        if entry.late || parent_read(Read::FromStart) || parent_read(Read::Resumed) {
            return Fallback::Read(IteratorPosition::TrimHorizon);
        }
        let id = &entry.description.shard_id;
        match &self.start {
            StartPosition::Latest if entry.description.is_closed() => Fallback::Skip,
            StartPosition::Latest => Fallback::Read(IteratorPosition::Latest),
            StartPosition::TrimHorizon => Fallback::Read(IteratorPosition::TrimHorizon),
            StartPosition::AtTimestamp(t) => Fallback::Read(IteratorPosition::AtTimestamp(*t)),
            StartPosition::AtSequenceNumber {
                shard_id,
                sequence_number,
            } => self.sequence_fallback(
                id,
                shard_id,
                IteratorPosition::AtSequenceNumber(*sequence_number),
            ),
            StartPosition::AfterSequenceNumber {
                shard_id,
                sequence_number,
            } => self.sequence_fallback(
                id,
                shard_id,
                IteratorPosition::AfterSequenceNumber(*sequence_number),
            ),
        }
    }

    fn sequence_fallback(
        &self,
        id: &ShardId,
        target: &ShardId,
        position: IteratorPosition,
    ) -> Fallback {
        if id == target {
            Fallback::Read(position)
        } else if self.ancestors(target).contains(id) {
            Fallback::Skip
        } else {
            Fallback::Read(IteratorPosition::TrimHorizon)
        }
    }

    fn ancestors(&self, shard: &ShardId) -> HashSet<ShardId> {
        let mut seen = HashSet::new();
        let mut stack = vec![shard.clone()];
        while let Some(id) = stack.pop() {
            if let Some(entry) = self.shards.get(&id) {
                for parent in entry.description.parents() {
                    if seen.insert(parent.clone()) {
                        stack.push(parent.clone());
                    }
                }
            }
        }
        seen
    }

    /// Marks a shard finished; `read` says how this consumer read it, which decides where its
    /// children start.
    ///
    /// True when it was not finished before (the first word on its end).
    pub(crate) fn finish(&mut self, shard: &ShardId, read: Read) -> bool {
        match self.shards.get_mut(shard) {
            Some(entry) if !matches!(entry.state, State::Finished(_)) => {
                entry.state = State::Finished(read);
                true
            }
            _ => false,
        }
    }

    /// Whether the consumer reads `shard` (its start passed the filter, and it was not
    /// released since).
    pub(crate) fn is_read_here(&self, shard: &ShardId) -> bool {
        self.shards.get(shard).is_some_and(|e| e.read_here)
    }

    /// Whether the shard is finished.
    #[cfg(test)]
    pub(crate) fn is_finished(&self, shard: &str) -> bool {
        self.shards
            .get(shard)
            .is_some_and(|e| matches!(e.state, State::Finished(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: &str, parents: &[&str], closed: bool) -> ShardDescription {
        let mut d = ShardDescription::new(id);
        d.parent_shard_id = parents.first().map(|p| ShardId::from(*p));
        d.adjacent_parent_shard_id = parents.get(1).map(|p| ShardId::from(*p));
        if closed {
            d.ending_sequence_number = Some("100".parse().unwrap());
        }
        d
    }

    fn ids(ready: &[ShardStart]) -> Vec<&str> {
        ready.iter().map(|s| s.shard_id.as_str()).collect()
    }

    fn pairs(ready: Vec<ShardStart>) -> Vec<(ShardId, Fallback)> {
        ready
            .into_iter()
            .map(|s| (s.shard_id, s.fallback))
            .collect()
    }

    #[test]
    fn children_wait_for_every_parent_and_start_at_trim_horizon() {
        let mut l = Lineage::new(StartPosition::TrimHorizon);
        l.merge_listing(vec![
            shard("a", &[], true),
            shard("b", &[], true),
            shard("c", &["a", "b"], false),
        ]);
        let ready = l.take_ready();
        assert_eq!(ids(&ready), vec!["a", "b"]);
        assert!(l.take_ready().is_empty());
        assert!(l.finish(&"a".into(), Read::FromStart));
        assert!(l.take_ready().is_empty(), "c must wait for b too");
        assert!(l.finish(&"b".into(), Read::FromStart));
        let ready = l.take_ready();
        assert_eq!(
            pairs(ready),
            vec![("c".into(), Fallback::Read(IteratorPosition::TrimHorizon))]
        );
        assert!(l.is_finished("a"));
    }

    #[test]
    fn latest_skips_closed_shards_and_starts_open_ones_at_latest() {
        let mut l = Lineage::new(StartPosition::Latest);
        l.merge_listing(vec![shard("p", &[], true), shard("c", &["p"], false)]);
        assert_eq!(pairs(l.take_ready()), vec![("p".into(), Fallback::Skip)]);
        assert!(l.finish(&"p".into(), Read::No));
        assert_eq!(
            pairs(l.take_ready()),
            vec![("c".into(), Fallback::Read(IteratorPosition::Latest))]
        );
    }

    #[test]
    fn shards_found_later_and_children_of_read_shards_never_start_at_latest() {
        let mut l = Lineage::new(StartPosition::Latest);
        l.merge_listing(vec![shard("p", &[], false)]);
        assert_eq!(
            pairs(l.take_ready()),
            vec![("p".into(), Fallback::Read(IteratorPosition::Latest))]
        );
        // p is split; the children appear in the next listing.
        l.merge_listing(vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
        ]);
        assert!(l.take_ready().is_empty(), "children wait for p");
        assert!(l.finish(&"p".into(), Read::FromStart));
        let ready = l.take_ready();
        assert_eq!(ids(&ready), vec!["c1", "c2"]);
        assert!(ready
            .iter()
            .all(|s| s.fallback == Fallback::Read(IteratorPosition::TrimHorizon)));
        // An unrelated new shard found later also starts at TRIM_HORIZON.
        l.merge_listing(vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
            shard("n", &[], false),
        ]);
        assert_eq!(
            pairs(l.take_ready()),
            vec![("n".into(), Fallback::Read(IteratorPosition::TrimHorizon))]
        );
    }

    #[test]
    fn child_shards_from_get_records_start_after_their_parents() {
        let mut l = Lineage::new(StartPosition::TrimHorizon);
        l.merge_listing(vec![shard("a", &[], false), shard("b", &[], false)]);
        assert_eq!(l.take_ready().len(), 2);
        l.merge_children(&[ChildShard {
            shard_id: "m".into(),
            parent_shards: vec!["a".into(), "b".into()],
        }]);
        assert!(l.finish(&"a".into(), Read::FromStart));
        assert!(l.take_ready().is_empty());
        assert!(l.finish(&"b".into(), Read::FromStart));
        assert_eq!(ids(&l.take_ready()), vec!["m"]);
    }

    #[test]
    fn sequence_start_applies_to_its_shard_and_skips_its_ancestors() {
        let seq: kinesis_tower_layers::SequenceNumber = "42".parse().unwrap();
        let mut l = Lineage::new(StartPosition::AfterSequenceNumber {
            shard_id: "c".into(),
            sequence_number: seq,
        });
        l.merge_listing(vec![
            shard("p", &[], true),
            shard("c", &["p"], false),
            shard("o", &[], false),
        ]);
        let ready = l.take_ready();
        assert_eq!(
            pairs(ready),
            vec![
                ("p".into(), Fallback::Skip),
                ("o".into(), Fallback::Read(IteratorPosition::TrimHorizon))
            ]
        );
        assert!(l.finish(&"p".into(), Read::No));
        assert_eq!(
            pairs(l.take_ready()),
            vec![(
                "c".into(),
                Fallback::Read(IteratorPosition::AfterSequenceNumber(seq))
            )]
        );
    }

    #[test]
    fn children_of_a_shard_read_from_a_timestamp_start_at_that_timestamp() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let mut l = Lineage::new(StartPosition::AtTimestamp(t));
        l.merge_listing(vec![shard("p", &[], true), shard("c", &["p"], false)]);
        assert_eq!(
            pairs(l.take_ready()),
            vec![("p".into(), Fallback::Read(IteratorPosition::AtTimestamp(t)))]
        );
        assert!(l.finish(&"p".into(), Read::FromStart));
        assert_eq!(
            pairs(l.take_ready()),
            vec![("c".into(), Fallback::Read(IteratorPosition::AtTimestamp(t)))],
            "a child read from TRIM_HORIZON would re-deliver records from before the timestamp"
        );
        // A shard found later starts at the timestamp too.
        l.merge_listing(vec![
            shard("p", &[], true),
            shard("c", &["p"], false),
            shard("n", &[], false),
        ]);
        assert_eq!(
            pairs(l.take_ready()),
            vec![("n".into(), Fallback::Read(IteratorPosition::AtTimestamp(t)))]
        );
    }

    #[test]
    fn children_of_a_shard_resumed_from_an_earlier_runs_start_begin_at_trim_horizon() {
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let mut l = Lineage::new(StartPosition::AtTimestamp(t));
        l.merge_listing(vec![shard("p", &[], true), shard("c", &["p"], false)]);
        l.take_ready();
        // p had a checkpoint: an earlier run, with an earlier timestamp maybe, started it.
        assert!(l.finish(&"p".into(), Read::Resumed));
        assert_eq!(
            pairs(l.take_ready()),
            vec![("c".into(), Fallback::Read(IteratorPosition::TrimHorizon))]
        );
    }

    #[test]
    fn finished_shards_that_expired_are_forgotten_over_many_generations() {
        let mut l = Lineage::new(StartPosition::TrimHorizon);
        l.merge_listing(vec![shard("g0", &[], false)]);
        assert_eq!(ids(&l.take_ready()), vec!["g0"]);
        for g in 1..10_000 {
            let (parent, child) = (format!("g{}", g - 1), format!("g{g}"));
            // Kinesis lists the closed parent and its child; the grandparent has expired.
            l.merge_listing(vec![
                shard(&parent, &[], true),
                shard(&child, &[parent.as_str()], false),
            ]);
            assert!(l.finish(&parent.as_str().into(), Read::FromStart));
            let ready = l.take_ready();
            assert_eq!(ids(&ready), vec![child.as_str()]);
            assert!(l.len() <= 3, "generation {g}: {} shards kept", l.len());
        }
    }

    #[test]
    fn a_parent_read_elsewhere_that_expired_lets_its_children_start() {
        let mut l = Lineage::new(StartPosition::TrimHorizon);
        l.merge_listing(vec![shard("p", &[], true), shard("c", &["p"], false)]);
        assert_eq!(ids(&l.take_ready()), vec!["p"]);
        // The filter dropped p's start; p expires before anyone's ShardEnd reached the store.
        l.merge_listing(vec![shard("c", &["p"], false)]);
        assert_eq!(
            pairs(l.take_ready()),
            vec![("c".into(), Fallback::Read(IteratorPosition::TrimHorizon))]
        );
    }

    #[test]
    fn parents_read_elsewhere_are_the_started_ones_this_consumer_does_not_read() {
        let mut l = Lineage::new(StartPosition::TrimHorizon);
        l.merge_listing(vec![
            shard("a", &[], true),
            shard("b", &[], true),
            shard("c", &["a", "b"], false),
        ]);
        assert_eq!(ids(&l.take_ready()), vec!["a", "b"]);
        l.read_here(&"a".into());
        assert_eq!(l.parents_read_elsewhere(), vec![ShardId::from("b")]);
    }
}
