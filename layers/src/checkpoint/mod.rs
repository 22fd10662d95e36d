//! Checkpoints: how far a shard has been processed, where it is stored, and the layer that
//! records it after the handler succeeds.

mod layer;
mod memory;
mod metrics;
mod store;

pub use layer::{
    CheckpointFuture, CheckpointLayer, CheckpointPastBatch, CheckpointService,
    CheckpointWriteError, PartialFailure, Processed,
};
pub use memory::MemoryStore;
pub use store::{CheckpointStore, Checkpointer, SetOutcome, StoreError};

use std::cmp::Ordering;
use std::fmt;

use crate::sequence::{InvalidSequenceNumber, SequenceNumber, MAX_DIGITS};

/// How far a shard has been processed.
///
/// Checkpoints are totally ordered: [`Checkpoint::StartedAtTime`] first (by time), then by
/// sequence number, with [`Checkpoint::StartedAt`] before any part of the same record, then by
/// sub-sequence number, where a checkpoint without a sub-sequence number (the whole record) is
/// after every sub-sequence of the same record, and [`Checkpoint::ShardEnd`] is after
/// everything. Stores only ever move a shard's checkpoint forward in this order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Checkpoint {
    /// Nothing of the shard has been processed yet, and reading it started at this time
    /// (milliseconds since the Unix epoch): a restart reads from the first record at or after
    /// it (`AT_TIMESTAMP`).
    ///
    /// The consumer writes it (durably) when it opens a shard without a checkpoint at `LATEST`
    /// (a margin before the moment it opened it) or at a timestamp, before it reads anything,
    /// so a run that stops before its first record still leaves where it started: a restart
    /// misses nothing put since, and the children of a shard split meanwhile start at
    /// `TRIM_HORIZON` after it.
    StartedAtTime {
        /// Milliseconds since the Unix epoch.
        timestamp_millis: u64,
    },
    /// Nothing of the shard has been processed yet, and reading it started at this record: a
    /// restart reads from this record (inclusive).
    ///
    /// The consumer writes it (durably) before it hands over the first record of a shard that
    /// had no checkpoint and started from a position that moves with time (`LATEST`,
    /// `AT_TIMESTAMP`, after [`Checkpoint::StartedAtTime`]) or was named (a sequence number),
    /// so a restart resumes where the first run started instead of starting at `LATEST` again
    /// and skipping what came in meanwhile.
    StartedAt {
        /// The first record read.
        sequence_number: SequenceNumber,
    },
    /// Every record up to and including this one has been processed.
    Sequence {
        /// The last processed record's sequence number.
        sequence_number: SequenceNumber,
        /// For a KPL aggregate partly processed: the last processed user record's index.
        /// `None` means the whole record.
        sub_sequence_number: Option<u64>,
    },
    /// The shard is closed and every record of it has been processed.
    ShardEnd,
}

impl Checkpoint {
    /// A checkpoint at a whole record.
    pub fn at(sequence_number: SequenceNumber) -> Self {
        Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number: None,
        }
    }

    /// The last processed record's sequence number: `None` for [`Checkpoint::ShardEnd`] and
    /// for the checkpoints that say where reading started (nothing was processed).
    pub fn sequence_number(&self) -> Option<SequenceNumber> {
        match self {
            Checkpoint::Sequence {
                sequence_number, ..
            } => Some(*sequence_number),
            _ => None,
        }
    }

    /// Whether this checkpoint says some record was processed (not only where reading started).
    pub fn is_progress(&self) -> bool {
        !matches!(
            self,
            Checkpoint::StartedAt { .. } | Checkpoint::StartedAtTime { .. }
        )
    }

    /// A string whose byte order is the checkpoint order, for stores that compare on the
    /// server (SQL `>`, a Lua script, a DynamoDB condition):
    /// `r<20-digit milliseconds>` for [`Checkpoint::StartedAtTime`];
    /// `s<128-digit zero-padded sequence>` followed by `_` for [`Checkpoint::StartedAt`],
    /// `a<20-digit sub-sequence>`, or `b` for a whole record; `z` for shard end.
    pub fn sort_key(&self) -> String {
        match self {
            Checkpoint::StartedAtTime { timestamp_millis } => format!("r{timestamp_millis:020}"),
            Checkpoint::StartedAt { sequence_number } => {
                let mut key = String::with_capacity(2 + MAX_DIGITS);
                key.push('s');
                key.push_str(&sequence_number.to_padded_string(MAX_DIGITS));
                key.push('_');
                key
            }
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number,
            } => {
                let mut key = String::with_capacity(1 + MAX_DIGITS + 21);
                key.push('s');
                key.push_str(&sequence_number.to_padded_string(MAX_DIGITS));
                match sub_sequence_number {
                    Some(sub) => {
                        key.push('a');
                        key.push_str(&format!("{sub:020}"));
                    }
                    None => key.push('b'),
                }
                key
            }
            Checkpoint::ShardEnd => "z".to_owned(),
        }
    }

    /// Parses a [`Checkpoint::sort_key`] back.
    pub fn from_sort_key(key: &str) -> Result<Self, InvalidSequenceNumber> {
        let bad = |reason| InvalidSequenceNumber {
            input: key.chars().take(160).collect(),
            reason,
        };
        if key == "z" {
            return Ok(Checkpoint::ShardEnd);
        }
        if let Some(millis) = key.strip_prefix('r') {
            if millis.len() != 20 || !millis.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad("a start-time key has 20 digits after 'r'"));
            }
            let timestamp_millis = millis
                .parse()
                .map_err(|_| bad("the start time is not a 64-bit integer"))?;
            return Ok(Checkpoint::StartedAtTime { timestamp_millis });
        }
        let rest = key
            .strip_prefix('s')
            .ok_or_else(|| bad("a checkpoint key starts with 'r' or 's', or is 'z'"))?;
        if rest.len() < MAX_DIGITS + 1 || !rest.is_char_boundary(MAX_DIGITS) {
            return Err(bad("a checkpoint key has 128 digits after 's'"));
        }
        let (digits, tail) = rest.split_at(MAX_DIGITS);
        let sequence_number = SequenceNumber::parse(digits)?;
        let sub_sequence_number = match tail {
            "_" => return Ok(Checkpoint::StartedAt { sequence_number }),
            "b" => None,
            t if t.len() == 21 && t.starts_with('a') => Some(
                t[1..]
                    .parse::<u64>()
                    .map_err(|_| bad("the sub-sequence number is not a 64-bit integer"))?,
            ),
            _ => {
                return Err(bad(
                    "a checkpoint key ends with '_', 'b', or 'a' and 20 digits",
                ))
            }
        };
        Ok(Checkpoint::Sequence {
            sequence_number,
            sub_sequence_number,
        })
    }
}

impl Ord for Checkpoint {
    fn cmp(&self, other: &Self) -> Ordering {
        use Checkpoint::*;
        match (self, other) {
            (ShardEnd, ShardEnd) => Ordering::Equal,
            (ShardEnd, _) => Ordering::Greater,
            (_, ShardEnd) => Ordering::Less,
            (
                StartedAtTime {
                    timestamp_millis: a,
                },
                StartedAtTime {
                    timestamp_millis: b,
                },
            ) => a.cmp(b),
            (StartedAtTime { .. }, _) => Ordering::Less,
            (_, StartedAtTime { .. }) => Ordering::Greater,
            (StartedAt { sequence_number: a }, StartedAt { sequence_number: b }) => a.cmp(b),
            (
                StartedAt { sequence_number: a },
                Sequence {
                    sequence_number: b, ..
                },
            ) => a.cmp(b).then(Ordering::Less),
            (
                Sequence {
                    sequence_number: a, ..
                },
                StartedAt { sequence_number: b },
            ) => a.cmp(b).then(Ordering::Greater),
            (
                Sequence {
                    sequence_number: a,
                    sub_sequence_number: sa,
                },
                Sequence {
                    sequence_number: b,
                    sub_sequence_number: sb,
                },
            ) => a.cmp(b).then_with(|| match (sa, sb) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => x.cmp(y),
            }),
        }
    }
}

impl PartialOrd for Checkpoint {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number: Some(sub),
            } => write!(f, "{sequence_number}/{sub}"),
            Checkpoint::Sequence {
                sequence_number,
                sub_sequence_number: None,
            } => write!(f, "{sequence_number}"),
            Checkpoint::StartedAt { sequence_number } => {
                write!(f, "started at {sequence_number}")
            }
            Checkpoint::StartedAtTime { timestamp_millis } => {
                write!(f, "started at {timestamp_millis} ms")
            }
            Checkpoint::ShardEnd => f.write_str("SHARD_END"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cp(seq: &str, sub: Option<u64>) -> Checkpoint {
        Checkpoint::Sequence {
            sequence_number: seq.parse().unwrap(),
            sub_sequence_number: sub,
        }
    }

    #[test]
    fn order_is_sequence_then_sub_sequence_then_shard_end() {
        assert!(cp("9", None) < cp("10", Some(0)));
        assert!(cp("10", Some(0)) < cp("10", Some(1)));
        assert!(cp("10", Some(u64::MAX)) < cp("10", None));
        assert!(cp(&"9".repeat(128), None) < Checkpoint::ShardEnd);
        let started = |s: &str| Checkpoint::StartedAt {
            sequence_number: s.parse().unwrap(),
        };
        assert!(cp("9", None) < started("10"));
        assert!(started("10") < cp("10", Some(0)));
        assert!(started("10") < started("11"));
        assert!(!started("10").is_progress() && cp("10", None).is_progress());
        let time = |ms| Checkpoint::StartedAtTime {
            timestamp_millis: ms,
        };
        assert!(time(5) < time(6) && time(u64::MAX) < started("0"));
        assert!(!time(5).is_progress());
        assert_eq!(started("10").sequence_number(), None);
    }

    #[test]
    fn sort_key_round_trips_and_rejects_garbage() {
        let started = Checkpoint::StartedAt {
            sequence_number: "42".parse().unwrap(),
        };
        let time = Checkpoint::StartedAtTime {
            timestamp_millis: 1_700_000_000_000,
        };
        for c in [
            cp("0", None),
            cp("42", Some(7)),
            started,
            time,
            Checkpoint::ShardEnd,
        ] {
            assert_eq!(Checkpoint::from_sort_key(&c.sort_key()).unwrap(), c);
        }
        for bad in [
            "",
            "s1b",
            "x",
            "r12",
            "r-0000000000000000001",
            &format!("s{}c", "0".repeat(128)),
        ] {
            assert!(Checkpoint::from_sort_key(bad).is_err(), "{bad}");
        }
    }

    fn arb_checkpoint() -> impl Strategy<Value = Checkpoint> {
        prop_oneof![
            Just(Checkpoint::ShardEnd),
            "[0-9]{1,128}".prop_map(|s| Checkpoint::StartedAt {
                sequence_number: s.parse().unwrap()
            }),
            any::<u64>().prop_map(|ms| Checkpoint::StartedAtTime {
                timestamp_millis: ms
            }),
            ("[0-9]{1,128}", proptest::option::of(any::<u64>())).prop_map(|(s, sub)| cp(&s, sub)),
        ]
    }

    proptest! {
        #[test]
        fn sort_key_order_equals_checkpoint_order(a in arb_checkpoint(), b in arb_checkpoint()) {
            prop_assert_eq!(a.sort_key().cmp(&b.sort_key()), a.cmp(&b));
        }
    }
}
