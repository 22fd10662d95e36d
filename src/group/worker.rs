//! The group's loop, one per run: it lists the lease table, renews what it holds, claims what
//! the planner says, answers handoff requests, and turns all that into assignment events for
//! the consumer (a shard starts once its lease is held; it is revoked when the lease goes).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use kinesis_tower_layers::metric_names::{
    LEASES_ACQUIRED_TOTAL, LEASES_HELD, LEASES_LOST_TOTAL, LEASE_HANDOFFS_TOTAL, STREAM, WORKER,
};
use kinesis_tower_layers::Checkpoint;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};

use super::held::{Leases, Written};
use super::lease::Lease;
use super::planner::{plan, Liveness, PlanInput};
use super::GroupSettings;
use crate::assignment::{Assignment, Assignments, Revocation, ShardStart};

/// How long a requester waits between listings while its handoff requests are pending.
const PENDING_POLL: Duration = Duration::from_millis(100);

/// How long after a start (of a shard not held here) the worker plans, so that a burst of
/// starts (the first listing) is planned at once.
const START_DEBOUNCE: Duration = Duration::from_millis(10);

/// Why a held lease is being let go.
enum Letting {
    /// Another worker asked for it: hand it over once the shard is finished here.
    HandOff(String),
    /// It is gone: stop the shard, write nothing.
    Lost,
}

pub(crate) struct Worker {
    pub(crate) leases: Arc<Leases>,
    pub(crate) settings: GroupSettings,
    pub(crate) stream: String,
    pub(crate) out: mpsc::UnboundedSender<Assignment>,
    /// Starts from this worker's discovery: what it may read.
    ready: HashMap<String, ShardStart>,
    /// Held leases whose start was passed to the consumer.
    started: HashSet<String>,
    /// Held leases being let go, and why.
    letting: HashMap<String, Letting>,
    liveness: Liveness,
    rng: fastrand::Rng,
    /// Handoffs this worker asked for and has not seen through.
    asked: HashSet<String>,
    /// The run is stopping and this worker's handoff requests were withdrawn.
    withdrawn: bool,
    labels: Vec<metrics::Label>,
}

type LetGo = BoxFuture<'static, String>;

impl Worker {
    pub(crate) fn new(
        leases: Arc<Leases>,
        settings: GroupSettings,
        stream: String,
        out: mpsc::UnboundedSender<Assignment>,
    ) -> Self {
        let labels = vec![
            metrics::Label::new(STREAM, stream.clone()),
            metrics::Label::new(WORKER, leases.worker.clone()),
        ];
        Self {
            leases,
            settings,
            stream,
            out,
            ready: HashMap::new(),
            started: HashSet::new(),
            letting: HashMap::new(),
            liveness: Liveness::default(),
            rng: fastrand::Rng::new(),
            asked: HashSet::new(),
            withdrawn: false,
            labels,
        }
    }

    /// Runs until `stop` says the consumer has stopped (then every lease is released) or the
    /// consumer is gone.
    pub(crate) async fn run(
        mut self,
        mut input: Assignments,
        mut lost: mpsc::UnboundedReceiver<String>,
        mut stop: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut tick = tokio::time::interval(self.settings.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut letting_go: FuturesUnordered<LetGo> = FuturesUnordered::new();
        let mut input_open = true;
        // A start for a shard not held here: plan soon (once a burst of starts is in).
        let mut plan_soon = false;
        loop {
            let fast = !self.asked.is_empty();
            tokio::select! {
                biased;
                done = &mut stop => {
                    self.release_all().await;
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
                Some(key) = lost.recv() => self.lose(&key, &mut letting_go),
                Some(key) = letting_go.next(), if !letting_go.is_empty() => self.let_go(key).await,
                event = input.next(), if input_open => match event {
                    Some(event) => {
                        if let Assignment::Start(start) = &event {
                            plan_soon |= self.leases.get(start.shard_id()).is_none();
                        }
                        self.assignment(event).await;
                    }
                    None => input_open = false,
                },
                () = tokio::time::sleep(START_DEBOUNCE), if plan_soon => {
                    plan_soon = false;
                    self.round(&mut letting_go).await;
                }
                _ = tick.tick() => self.round(&mut letting_go).await,
                () = tokio::time::sleep(PENDING_POLL), if fast => self.round(&mut letting_go).await,
            }
            if self.out.is_closed() {
                // The consumer is gone without saying it stopped.
                self.release_all().await;
                return;
            }
        }
    }

    async fn assignment(&mut self, event: Assignment) {
        match event {
            Assignment::Start(start) => {
                let key = start.shard_id().to_string();
                if self.leases.listed(&key).is_none() {
                    create_row(&self.leases, &start).await;
                }
                self.ready.insert(key.clone(), start);
                if self.leases.get(&key).is_some() && !self.letting.contains_key(&key) {
                    self.start(&key);
                }
            }
            Assignment::Ended(shard) => {
                let key = shard.to_string();
                self.ready.remove(&key);
                self.started.remove(&key);
                if let Some(held) = self.leases.get(&key) {
                    if !self.letting.contains_key(&key) {
                        // Finished here, read to its end or needing no reading (skipped,
                        // expired): its lease says so, or its children would wait forever.
                        let mut state = held.state.lock().await;
                        if state.lost.is_none() && state.current() != Some(Checkpoint::ShardEnd) {
                            state.pending = Some(Checkpoint::ShardEnd);
                            state.pending_since.get_or_insert_with(Instant::now);
                        }
                        drop(state);
                        self.release(&key, None).await;
                    }
                }
                let _ = self.out.send(Assignment::Ended(shard));
            }
            other => {
                let _ = self.out.send(other);
            }
        }
    }

    /// Passes the shard's start to the consumer, once per holding.
    fn start(&mut self, key: &str) {
        if self.started.contains(key) {
            return;
        }
        if let Some(start) = self.ready.get(key) {
            self.started.insert(key.to_owned());
            let _ = self.out.send(Assignment::Start(start.clone()));
        }
    }

    /// One listing and what follows from it.
    async fn round(&mut self, letting_go: &mut FuturesUnordered<LetGo>) {
        if self
            .leases
            .stopping
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            // The consumer takes no new shard: keep what is held alive until it is released
            // (renewals first), and at once stop being handed leases (the drain may outlast a
            // lease).
            self.renew_due(Instant::now()).await;
            if !self.withdrawn {
                self.withdrawn = true;
                self.refuse_handoffs().await;
            }
            return;
        }
        let listing = self.leases.backend.list().await;
        let now = Instant::now();
        let table = match listing {
            Ok(table) => table,
            Err(error) => {
                tracing::warn!(worker = %self.leases.worker, %error, "listing the lease table failed; held leases are renewed, nothing new is taken");
                self.renew_due(now).await;
                return;
            }
        };
        self.liveness.update(&table, now);
        self.leases.set_listed(
            table
                .iter()
                .map(|lease| (lease.key.clone(), lease.checkpoint))
                .collect(),
        );
        let by_key: HashMap<&str, &Lease> = table.iter().map(|l| (l.key.as_str(), l)).collect();
        // A start whose row could not be created then (or whose row was deleted since).
        for (key, start) in &self.ready {
            if !by_key.contains_key(key.as_str()) {
                create_row(&self.leases, start).await;
            }
        }

        // What happened to the leases held here.
        for (key, _) in self.leases.all() {
            if self.letting.contains_key(&key) {
                continue;
            }
            match by_key.get(key.as_str()) {
                Some(lease) if lease.is_owned_by(&self.leases.worker) => {
                    if let Some(to) = lease.handoff_to.clone() {
                        self.hand_off(&key, to, letting_go);
                    }
                }
                // Another worker took it (or the row is gone): stop at once.
                _ => {
                    if let Some(held) = self.leases.get(&key) {
                        let mut state = held.state.lock().await;
                        self.leases.mark_lost(
                            &key,
                            &mut state,
                            "another worker took it".to_owned(),
                        );
                    }
                }
            }
        }
        self.renew_due(now).await;

        // Leases handed to this worker, or held here before a restart.
        for lease in &table {
            if lease.is_owned_by(&self.leases.worker)
                && self.leases.get(&lease.key).is_none()
                && !lease.is_finished()
                && self.ready.contains_key(&lease.key)
            {
                self.asked.remove(&lease.key);
                self.leases
                    .insert(&lease.key, lease.counter, lease.checkpoint);
                if self.renew_now(&lease.key).await {
                    self.acquired(&lease.key, "handed over");
                }
            }
        }
        self.asked.retain(|key| {
            by_key
                .get(key.as_str())
                .is_some_and(|l| l.handoff_to.as_deref() == Some(&*self.leases.worker))
        });

        let ready: HashSet<String> = self
            .ready
            .keys()
            .filter(|key| self.leases.get(key).is_none())
            .cloned()
            .collect();
        let plan = plan(
            &PlanInput {
                me: &self.leases.worker,
                leases: &table,
                liveness: &self.liveness,
                now,
                lease_duration: self.settings.lease_duration,
                max_leases: self.settings.max_leases,
                ready: &ready,
            },
            &mut self.rng,
        );
        // All claims at once: a takeover after a crash is as fast as one write.
        let claims = futures::future::join_all(
            plan.claim
                .iter()
                .map(|seen| self.leases.backend.claim(seen, &self.leases.worker)),
        )
        .await;
        for (seen, claimed) in plan.claim.into_iter().zip(claims) {
            match claimed {
                Ok(Some(lease)) => {
                    self.leases
                        .insert(&lease.key, lease.counter, lease.checkpoint);
                    let from = seen.owner.as_deref().unwrap_or("nobody");
                    self.acquired(&lease.key, from);
                }
                Ok(None) => {
                    tracing::debug!(worker = %self.leases.worker, shard = %seen.key, "another worker claimed the lease first");
                }
                Err(error) => {
                    tracing::warn!(worker = %self.leases.worker, shard = %seen.key, %error, "claiming the lease failed");
                }
            }
        }
        for (key, owner) in plan.handoff {
            match self
                .leases
                .backend
                .request_handoff(&key, &owner, &self.leases.worker)
                .await
            {
                Ok(true) => {
                    tracing::info!(worker = %self.leases.worker, shard = %key, %owner, "asked for a handoff");
                    self.asked.insert(key);
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(worker = %self.leases.worker, shard = %key, %error, "asking for a handoff failed");
                }
            }
        }
        metrics::gauge!(LEASES_HELD, self.labels.clone()).set(self.leases.count() as f64);
    }

    fn acquired(&mut self, key: &str, from: &str) {
        tracing::info!(worker = %self.leases.worker, shard = %key, %from, "lease acquired");
        metrics::counter!(LEASES_ACQUIRED_TOTAL, self.labels.clone()).increment(1);
        self.start(key);
    }

    /// Renews every held lease whose renewal (or pending checkpoint) is due, at once.
    async fn renew_due(&mut self, now: Instant) {
        let renew_interval = self.settings.renew_interval();
        let checkpoint_interval = self.settings.checkpoint_interval;
        let leases = self.leases.clone();
        let writes = leases.all().into_iter().map(|(key, held)| {
            let leases = leases.clone();
            async move {
                let mut state = held.state.lock().await;
                let due = now.saturating_duration_since(state.renewed_at) >= renew_interval
                    || state
                        .pending_since
                        .is_some_and(|at| now.saturating_duration_since(at) >= checkpoint_interval)
                    || leases.self_expired(&state, now);
                if !due || state.lost.is_some() {
                    return;
                }
                if let Err(error) = leases.write(&key, &mut state).await {
                    tracing::warn!(worker = %leases.worker, shard = %key, %error, "renewing the lease failed; trying again");
                }
            }
        });
        futures::future::join_all(writes).await;
    }

    /// Renews one lease now; false if it turned out lost.
    async fn renew_now(&mut self, key: &str) -> bool {
        let Some(held) = self.leases.get(key) else {
            return false;
        };
        let mut state = held.state.lock().await;
        match self.leases.write(key, &mut state).await {
            Ok(Written::Done) => true,
            Ok(Written::Lost) => false,
            Err(error) => {
                tracing::warn!(worker = %self.leases.worker, shard = %key, %error, "renewing the lease failed; trying again");
                true
            }
        }
    }

    /// Another worker asked for the lease: stop the shard here, then hand it over.
    fn hand_off(&mut self, key: &str, to: String, letting_go: &mut FuturesUnordered<LetGo>) {
        tracing::info!(worker = %self.leases.worker, shard = %key, %to, "handoff requested; finishing the shard");
        self.letting.insert(key.to_owned(), Letting::HandOff(to));
        self.revoke(key, letting_go, self.settings.handoff_timeout);
    }

    /// The lease is gone: stop the shard at once; nothing more is written under it.
    fn lose(&mut self, key: &str, letting_go: &mut FuturesUnordered<LetGo>) {
        if matches!(self.letting.get(key), Some(Letting::Lost)) || self.leases.get(key).is_none() {
            return;
        }
        metrics::counter!(LEASES_LOST_TOTAL, self.labels.clone()).increment(1);
        if let Some(letting) = self.letting.get_mut(key) {
            // Being handed over: the revocation under way serves; nothing is written after it.
            *letting = Letting::Lost;
            return;
        }
        self.letting.insert(key.to_owned(), Letting::Lost);
        self.revoke(key, letting_go, Duration::MAX);
    }

    fn revoke(&mut self, key: &str, letting_go: &mut FuturesUnordered<LetGo>, timeout: Duration) {
        let was_started = self.started.remove(key);
        let key = key.to_owned();
        if !was_started {
            letting_go.push(Box::pin(async move { key }));
            return;
        }
        let (revocation, done) = Revocation::new(key.as_str());
        let _ = self.out.send(Assignment::Revoke(revocation));
        letting_go.push(Box::pin(async move {
            // Past the timeout the lease goes anyway: what the shard still writes is refused.
            let _ = tokio::time::timeout(timeout, done).await;
            key
        }));
    }

    /// The shard is stopped here: hand the lease over (with the shard's last checkpoint), or
    /// forget a lost one.
    async fn let_go(&mut self, key: String) {
        self.started.remove(&key);
        match self.letting.remove(&key) {
            Some(Letting::HandOff(to)) => {
                if self.release(&key, Some(&to)).await == Released::HandedOver {
                    metrics::counter!(LEASE_HANDOFFS_TOTAL, self.labels.clone()).increment(1);
                }
            }
            Some(Letting::Lost) | None => self.leases.remove(&key),
        }
        metrics::gauge!(LEASES_HELD, self.labels.clone()).set(self.leases.count() as f64);
    }

    /// Writes the lease's pending checkpoint, then lets it go (to `to`, or to nobody).
    async fn release(&mut self, key: &str, to: Option<&str>) -> Released {
        self.started.remove(key);
        release(&self.leases, &self.stream, key, to).await
    }

    /// The consumer stopped and flushed: let every lease go so others take over at once.
    /// Handoffs are refused first (again: the first round while stopping may have failed to).
    async fn release_all(&mut self) {
        self.refuse_handoffs().await;
        let keys: Vec<String> = self.leases.all().into_iter().map(|(k, _)| k).collect();
        let mut releases = Vec::new();
        for key in keys {
            self.started.remove(&key);
            let to = match self.letting.remove(&key) {
                Some(Letting::HandOff(to)) => Some(to),
                Some(Letting::Lost) => {
                    self.leases.remove(&key);
                    continue;
                }
                None => None,
            };
            releases.push((key, to));
        }
        // All at once: shutdown waits for them.
        let (leases, stream) = (&self.leases, &self.stream);
        futures::future::join_all(
            releases
                .iter()
                .map(|(key, to)| release(leases, stream, key, to.as_deref())),
        )
        .await;
        metrics::gauge!(LEASES_HELD, self.labels.clone()).set(0.0);
    }

    /// Stops this worker being handed leases: it withdraws its handoff requests (after that no
    /// owner can hand it one), then releases what the table shows in its name but not held
    /// here, handed over before the withdrawal; otherwise such a lease would stay with a
    /// worker that is gone until it expired.
    async fn refuse_handoffs(&mut self) {
        self.withdraw_requests().await;
        let held: Vec<String> = self.leases.all().into_iter().map(|(k, _)| k).collect();
        self.release_handed_over(&held).await;
    }

    /// Withdraws every handoff request of this worker that the table shows (or, if it cannot
    /// be listed, those this worker knows it made).
    async fn withdraw_requests(&mut self) {
        let me = &*self.leases.worker;
        let keys: Vec<String> = match self.leases.backend.list().await {
            Ok(table) => table
                .into_iter()
                .filter(|lease| lease.handoff_to.as_deref() == Some(me))
                .map(|lease| lease.key)
                .collect(),
            Err(error) => {
                tracing::warn!(worker = %me, %error, "listing the lease table before release failed; withdrawing the handoff requests this worker knows of");
                self.asked.iter().cloned().collect()
            }
        };
        let backend = &self.leases.backend;
        let withdrawn =
            futures::future::join_all(keys.iter().map(|key| backend.withdraw_handoff(key, me)))
                .await;
        for (key, withdrawn) in keys.iter().zip(withdrawn) {
            if let Err(error) = withdrawn {
                tracing::warn!(worker = %me, shard = %key, %error, "withdrawing a handoff request failed; if the owner hands the lease over now, it expires after the lease duration");
            }
        }
        self.asked.clear();
    }

    /// Releases the leases the table shows owned by this worker but not among `held` (handed
    /// over while it was stopping, or lost here and still in its name).
    async fn release_handed_over(&self, held: &[String]) {
        let me = &*self.leases.worker;
        let table = match self.leases.backend.list().await {
            Ok(table) => table,
            Err(error) => {
                tracing::warn!(worker = %me, %error, "listing the lease table while stopping failed; a lease handed over to this worker meanwhile expires after the lease duration");
                return;
            }
        };
        let handed: Vec<Lease> = table
            .into_iter()
            .filter(|lease| lease.is_owned_by(me) && !held.contains(&lease.key))
            .collect();
        let leases = &self.leases;
        let results = futures::future::join_all(
            handed
                .iter()
                .map(|lease| release_at(leases, &lease.key, lease.counter, None)),
        )
        .await;
        for (lease, released) in handed.iter().zip(results) {
            if released == Released::ToNobody {
                tracing::info!(worker = %me, shard = %lease.key, to = "nobody", stream = %self.stream, "a lease in this worker's name but not held here (handed over while stopping) released");
            }
        }
    }
}

/// What a release did.
#[derive(Debug, PartialEq, Eq)]
enum Released {
    /// Handed straight to the worker that asked for it.
    HandedOver,
    /// Let go to nobody: anyone may claim it.
    ToNobody,
    /// Not written (the lease is lost, or the write failed): it expires after the lease
    /// duration unless it is another worker's already.
    No,
}

/// Writes the lease's pending checkpoint, then lets it go (to `to`, or to nobody), and stops
/// holding it. A handoff whose request was withdrawn (the requester is stopping) lets the
/// lease go to nobody instead.
async fn release(leases: &Leases, stream: &str, key: &str, to: Option<&str>) -> Released {
    let Some(held) = leases.get(key) else {
        return Released::No;
    };
    let released = {
        let mut state = held.state.lock().await;
        let flushed = if state.pending.is_some() {
            leases.write(key, &mut state).await
        } else {
            Ok(Written::Done)
        };
        match flushed {
            Ok(Written::Done) if state.lost.is_none() => {
                let released = release_at(leases, key, state.counter, to).await;
                if released != Released::No {
                    state.lost = Some("released".to_owned());
                }
                released
            }
            Ok(_) => Released::No,
            Err(error) => {
                tracing::warn!(worker = %leases.worker, shard = %key, %error, "writing the last checkpoint before release failed; the lease expires after the lease duration");
                Released::No
            }
        }
    };
    leases.remove(key);
    match (&released, to) {
        (Released::HandedOver, Some(to)) => {
            tracing::info!(worker = %leases.worker, shard = %key, %to, %stream, "lease handed over");
        }
        (Released::ToNobody, _) => {
            tracing::info!(worker = %leases.worker, shard = %key, to = "nobody", %stream, "lease released");
        }
        _ => {}
    }
    released
}

/// The release write of a lease held at `counter`: to `to` if its request still stands,
/// otherwise to nobody.
async fn release_at(leases: &Leases, key: &str, counter: u64, to: Option<&str>) -> Released {
    let me = &*leases.worker;
    let mut to_nobody = to.is_none();
    let mut written = leases.backend.release(key, me, counter, to).await;
    if let (Some(to), Ok(false)) = (to, &written) {
        tracing::info!(worker = %me, shard = %key, %to, "handoff refused (the request was withdrawn, or the lease is no longer held at this counter); releasing to nobody");
        to_nobody = true;
        written = leases.backend.release(key, me, counter, None).await;
    }
    match written {
        Ok(true) if to_nobody => Released::ToNobody,
        Ok(true) => Released::HandedOver,
        Ok(false) => Released::No,
        Err(error) => {
            tracing::warn!(worker = %me, shard = %key, %error, "releasing the lease failed; it expires after the lease duration");
            Released::No
        }
    }
}

/// Creates the lease row of a shard that may start, unless it exists; a failure is tried
/// again at the next listing.
async fn create_row(leases: &Leases, start: &ShardStart) {
    let key = start.shard_id().as_str();
    let parents = start.parents().iter().map(ToString::to_string).collect();
    if let Err(error) = leases.backend.create(&Lease::new(key, parents)).await {
        tracing::warn!(worker = %leases.worker, shard = %key, %error, "creating the lease failed; trying again at the next listing");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::group::{LeaseBackend, MemoryLeases};

    const LEASE: Duration = Duration::from_secs(10);

    /// A table in memory with `keys` unowned, and worker `me` over it (not running).
    async fn setup(me: &str, keys: &[&str]) -> (MemoryLeases, Worker) {
        let table = MemoryLeases::new();
        for key in keys {
            table.create(&Lease::new(*key, Vec::new())).await.unwrap();
        }
        let settings = GroupSettings::default();
        let leases = Arc::new(Leases::new(me.to_owned(), Arc::new(table.clone()), LEASE));
        let (out, _) = mpsc::unbounded_channel();
        let worker = Worker::new(leases, settings, "stream".to_owned(), out);
        (table, worker)
    }

    async fn row(table: &MemoryLeases, key: &str) -> Lease {
        let rows = table.list().await.unwrap();
        rows.into_iter().find(|l| l.key == key).unwrap()
    }

    /// `owner` claims `key` in the table.
    async fn claim(table: &MemoryLeases, key: &str, owner: &str) -> Lease {
        let seen = row(table, key).await;
        table.claim(&seen, owner).await.unwrap().unwrap()
    }

    /// `from` hands `key` to `to`, as a finished handoff leaves it.
    async fn hand_over(table: &MemoryLeases, key: &str, from: &str, to: &str) {
        let held = claim(table, key, from).await;
        assert!(table.request_handoff(key, from, to).await.unwrap());
        assert!(table
            .release(key, from, held.counter, Some(to))
            .await
            .unwrap());
    }

    #[tokio::test]
    async fn the_first_round_while_stopping_withdraws_requests_and_releases_what_was_handed_over() {
        let (table, mut c) = setup("c", &["asked", "handed", "held"]).await;
        claim(&table, "asked", "a").await;
        assert!(table.request_handoff("asked", "a", "c").await.unwrap());
        hand_over(&table, "handed", "a", "c").await;
        let held = claim(&table, "held", "c").await;
        c.leases.insert("held", held.counter, None);
        c.leases
            .stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);

        c.round(&mut FuturesUnordered::new()).await;
        let asked = row(&table, "asked").await;
        assert_eq!(
            (asked.owner.as_deref(), asked.handoff_to),
            (Some("a"), None),
            "the request is withdrawn; the owner keeps the lease"
        );
        assert_eq!(
            row(&table, "handed").await.owner,
            None,
            "handed over: released"
        );
        assert_eq!(
            row(&table, "held").await.owner.as_deref(),
            Some("c"),
            "held here: kept until the run ends"
        );
        // The owner's handoff, still under way, now lets the lease go to nobody.
        let asked = row(&table, "asked").await;
        let leases = Leases::new("a".to_owned(), Arc::new(table.clone()), LEASE);
        leases.insert("asked", asked.counter, None);
        assert_eq!(
            release(&leases, "stream", "asked", Some("c")).await,
            Released::ToNobody
        );
        assert_eq!(row(&table, "asked").await.owner, None);
    }

    #[tokio::test]
    async fn release_all_releases_what_it_holds_and_what_was_handed_over_meanwhile() {
        let (table, mut c) = setup("c", &["handed", "held"]).await;
        let held = claim(&table, "held", "c").await;
        c.leases.insert("held", held.counter, None);
        // Handed over after the stopping round's listing: only the last listing finds it.
        hand_over(&table, "handed", "a", "c").await;
        c.release_all().await;
        for key in ["handed", "held"] {
            assert_eq!(row(&table, key).await.owner, None, "{key}");
        }
        assert_eq!(c.leases.count(), 0);
    }

    #[tokio::test]
    async fn a_handoff_still_requested_goes_to_the_requester() {
        let (table, a) = setup("a", &["k"]).await;
        let held = claim(&table, "k", "a").await;
        assert!(table.request_handoff("k", "a", "b").await.unwrap());
        a.leases.insert("k", held.counter, None);
        assert_eq!(
            release(&a.leases, "stream", "k", Some("b")).await,
            Released::HandedOver
        );
        assert_eq!(row(&table, "k").await.owner.as_deref(), Some("b"));
    }
}
