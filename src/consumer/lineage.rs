//! Shard lineage: which shards may start, in which order, and where a shard without a
//! checkpoint starts.

use std::collections::{HashMap, HashSet};

use kinesis_tower_layers::ShardId;

use super::settings::StartPosition;
use crate::kinesis::{ChildShard, IteratorPosition, ShardDescription};

/// Where a shard starts when the store has no checkpoint for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// Read from this position.
    Read(IteratorPosition),
    /// Do not read it (a closed shard before the start position): it counts as finished.
    Skip,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Waiting,
    Started,
    Finished { read: bool },
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
        for description in listing {
            match self.shards.get_mut(&description.shard_id) {
                Some(entry) => {
                    entry.listed = true;
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
            },
        );
    }

    /// Shards that may start now (every known parent finished), marked started, each with where
    /// it starts if it has no checkpoint.
    pub(crate) fn take_ready(&mut self) -> Vec<(ShardId, Fallback)> {
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
                    Some(parent) => matches!(parent.state, State::Finished { .. }),
                    None => entry.listed,
                });
            if parents_done {
                ready.push((id.clone(), self.fallback(entry)));
            }
        }
        for (id, _) in &ready {
            if let Some(entry) = self.shards.get_mut(id) {
                entry.state = State::Started;
            }
        }
        ready
    }

    fn fallback(&self, entry: &Entry) -> Fallback {
        let parent_was_read = entry.description.parents().any(|p| {
            self.shards
                .get(p)
                .is_some_and(|parent| parent.state == State::Finished { read: true })
        });
        if entry.late || parent_was_read {
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

    /// Marks a shard finished; `read` says whether this consumer read it (or had a checkpoint
    /// in it), which makes its children start at TRIM_HORIZON.
    pub(crate) fn finish(&mut self, shard: &ShardId, read: bool) {
        if let Some(entry) = self.shards.get_mut(shard) {
            entry.state = State::Finished { read };
        }
    }

    /// Whether the shard is finished.
    #[cfg(test)]
    pub(crate) fn is_finished(&self, shard: &str) -> bool {
        self.shards
            .get(shard)
            .is_some_and(|e| matches!(e.state, State::Finished { .. }))
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

    fn ids(ready: &[(ShardId, Fallback)]) -> Vec<&str> {
        ready.iter().map(|(id, _)| id.as_str()).collect()
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
        l.finish(&"a".into(), true);
        assert!(l.take_ready().is_empty(), "c must wait for b too");
        l.finish(&"b".into(), true);
        let ready = l.take_ready();
        assert_eq!(
            ready,
            vec![("c".into(), Fallback::Read(IteratorPosition::TrimHorizon))]
        );
        assert!(l.is_finished("a"));
    }

    #[test]
    fn latest_skips_closed_shards_and_starts_open_ones_at_latest() {
        let mut l = Lineage::new(StartPosition::Latest);
        l.merge_listing(vec![shard("p", &[], true), shard("c", &["p"], false)]);
        assert_eq!(l.take_ready(), vec![("p".into(), Fallback::Skip)]);
        l.finish(&"p".into(), false);
        assert_eq!(
            l.take_ready(),
            vec![("c".into(), Fallback::Read(IteratorPosition::Latest))]
        );
    }

    #[test]
    fn shards_found_later_and_children_of_read_shards_never_start_at_latest() {
        let mut l = Lineage::new(StartPosition::Latest);
        l.merge_listing(vec![shard("p", &[], false)]);
        assert_eq!(
            l.take_ready(),
            vec![("p".into(), Fallback::Read(IteratorPosition::Latest))]
        );
        // p is split; the children appear in the next listing.
        l.merge_listing(vec![
            shard("p", &[], true),
            shard("c1", &["p"], false),
            shard("c2", &["p"], false),
        ]);
        assert!(l.take_ready().is_empty(), "children wait for p");
        l.finish(&"p".into(), true);
        let ready = l.take_ready();
        assert_eq!(ids(&ready), vec!["c1", "c2"]);
        assert!(ready
            .iter()
            .all(|(_, f)| *f == Fallback::Read(IteratorPosition::TrimHorizon)));
        // An unrelated new shard found later also starts at TRIM_HORIZON.
        l.merge_listing(vec![shard("n", &[], false)]);
        assert_eq!(
            l.take_ready(),
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
        l.finish(&"a".into(), true);
        assert!(l.take_ready().is_empty());
        l.finish(&"b".into(), true);
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
            ready,
            vec![
                ("p".into(), Fallback::Skip),
                ("o".into(), Fallback::Read(IteratorPosition::TrimHorizon))
            ]
        );
        l.finish(&"p".into(), false);
        assert_eq!(
            l.take_ready(),
            vec![(
                "c".into(),
                Fallback::Read(IteratorPosition::AfterSequenceNumber(seq))
            )]
        );
    }
}
