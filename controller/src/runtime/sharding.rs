//! Sharded controllers' I/O around the loop (docs/DESIGN-SHARDING.md):
//! holding shards, keeping copies of the other controllers' devices, and
//! following the leader's documents. The loop decides nothing here; it is
//! told which shards it acts on ([`Event::Shards`]) and what the store
//! holds ([`Event::Docs`]).
//!
//! Every round (once a second, `lease::RETRY_EVERY`):
//!
//! 1. shards the last round said to give up are released: the loop was
//!    told to stop acting on them then, and a commit of theirs still in
//!    flight is refused by the fence once their new owner holds them;
//! 2. the keeper heartbeats, renews, and takes what the assignment gives
//!    this controller ([`ShardKeeper::tick`]);
//! 3. the device records written since the last round are read
//!    (`Store::device_changes`): *after* the take, so a shard gained this
//!    round comes with its last owner's final word (any later commit of
//!    that owner is fenced);
//! 4. the loop gets the shards to act on and the records; the broker
//!    sessions follow the same set.
//!
//! The next round starts once the loop has taken this one up; until then
//! the keeper only renews, once a second (`ShardKeeper::renew`), so a loop
//! busy with a backlog does not cost the controller its shards; for at
//! most [`RENEW_FOR`], after which the loop counts as stuck.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::Event;
use crate::model::DeviceRecord;
use crate::store::lease::RETRY_EVERY;
use crate::store::{ChangeCursor, GlobalListener, Heard, ShardKeeper, Store, StoreError};

/// What a controller needs to share a fleet with others.
pub struct Sharding {
    /// The shared store (PostgreSQL).
    pub url: String,
    /// This controller's hold on its shards, connected, with the store's
    /// shard count fixed ([`ShardKeeper::fix_shards`]).
    pub keeper: ShardKeeper,
}

/// The keeper's side of a round, run off the loop (blocking).
struct Rounds {
    keeper: ShardKeeper,
    /// The loop's counters as it last said them (JSON).
    counters: String,
    /// A store handle of the keeper's own, so reading copies never waits
    /// behind the loop's commits.
    copies: Store,
    cursor: Option<ChangeCursor>,
    releasing: BTreeSet<u32>,
}

/// One round's outcome for the loop.
struct Turn {
    acting: BTreeMap<u32, i64>,
    holders: BTreeMap<u32, String>,
    others: Vec<String>,
    copies: Vec<DeviceRecord>,
    gained: Vec<u32>,
    lost: Vec<u32>,
    given_up: Vec<u32>,
}

impl Rounds {
    fn round(&mut self) -> Result<Turn, StoreError> {
        let given_up: Vec<u32> = self.releasing.iter().copied().collect();
        if !self.releasing.is_empty() {
            self.keeper.release(&self.releasing)?;
            self.releasing.clear();
        }
        let round = self.keeper.tick()?;
        let acting: BTreeMap<u32, i64> = self
            .keeper
            .held()
            .iter()
            .filter(|(s, _)| !round.give_up.contains(s))
            .map(|(s, g)| (*s, *g))
            .collect();
        self.releasing = round.give_up;
        let (copies, cursor) = self.copies.device_changes(self.cursor.as_ref())?;
        self.cursor = Some(cursor);
        let holders = self.keeper.holders()?;
        let others = self.keeper.exchange_counters(&self.counters)?;
        Ok(Turn {
            acting,
            holders,
            others,
            copies,
            gained: round.gained.keys().copied().collect(),
            lost: round.lost.into_iter().collect(),
            given_up,
        })
    }
}

/// The keeper task: rounds until told to stop, then leaves (its shards
/// released at once, so the others take them at their next round).
pub(super) fn spawn_keeper(
    sharding: Sharding,
    copies: Store,
    events: mpsc::Sender<Event>,
    sessions: watch::Sender<BTreeMap<u32, i64>>,
) -> (oneshot::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop_tx, mut stop) = oneshot::channel();
    let task = tokio::spawn(async move {
        let member = sharding.keeper.member().to_owned();
        let mut rounds = Some(Rounds {
            keeper: sharding.keeper,
            counters: "{}".into(),
            copies,
            cursor: None,
            releasing: BTreeSet::new(),
        });
        let mut warned = false;
        loop {
            let Some(mut r) = rounds.take() else { return };
            let (r, turn) = match tokio::task::spawn_blocking(move || {
                let turn = r.round();
                (r, turn)
            })
            .await
            {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::error!(error = %e, "shard keeper failed");
                    return;
                }
            };
            rounds = Some(r);
            match turn {
                Ok(turn) => {
                    warned = false;
                    if !(turn.gained.is_empty() && turn.lost.is_empty() && turn.given_up.is_empty())
                    {
                        tracing::info!(
                            %member,
                            gained = ?turn.gained,
                            lost = ?turn.lost,
                            given_up = ?turn.given_up,
                            holding = ?turn.acting.keys().collect::<Vec<_>>(),
                            "shards moved"
                        );
                    }
                    // With their lease generations: a shard lost and taken
                    // again between two looks of `steer` gets a new session.
                    let held = turn.acting.clone();
                    let (counters_tx, counters) = oneshot::channel();
                    let event = Event::Shards {
                        acting: turn.acting,
                        copies: turn.copies,
                        holders: turn.holders,
                        others: turn.others,
                        counters: counters_tx,
                    };
                    let delivered = async {
                        events.send(event).await.ok()?;
                        Some(counters.await.ok())
                    };
                    let Some(mine) = renewing(&mut rounds, delivered).await else {
                        return;
                    };
                    if let (Some(mine), Some(r)) = (mine, rounds.as_mut()) {
                        r.counters = mine;
                    }
                    sessions.send_replace(held);
                }
                Err(e) => {
                    if !warned {
                        warned = true;
                        // Commits of its shards are refused meanwhile by
                        // the database's clock; renewed in time, nothing
                        // changes.
                        tracing::warn!(error = %e, "could not hold the shards; retrying");
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY_EVERY) => {}
                _ = &mut stop => break,
            }
        }
        if let Some(r) = rounds {
            match tokio::task::spawn_blocking(move || r.keeper.leave()).await {
                Ok(Ok(())) => tracing::info!(%member, "shards released"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not release the shards; the others take them once they expire")
                }
                Err(e) => tracing::warn!(error = %e, "could not release the shards"),
            }
        }
    });
    (stop_tx, task)
}

/// Waits for `delivered` (the loop taking a turn up), renewing the
/// leases every `RETRY_EVERY` meanwhile, for at most [`RENEW_FOR`].
/// Behind thousands of queued device messages that can take longer than
/// a lease lasts (`lease::TTL`): a controller would lose its shards for
/// being busy with them, and the others would take them, with the
/// sessions and deliveries in flight. A loop that takes no turn up for
/// longer is stuck, not busy: its shards go to the others.
async fn renewing<T>(
    rounds: &mut Option<Rounds>,
    delivered: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(delivered);
    let give_up = tokio::time::Instant::now() + RENEW_FOR;
    loop {
        tokio::select! {
            out = &mut delivered => return out,
            _ = tokio::time::sleep_until(give_up) => {
                tracing::warn!(waited = ?RENEW_FOR, "the loop has not taken the shard round up; no longer renewing, so the other controllers take these shards");
                return delivered.await;
            }
            _ = tokio::time::sleep(RETRY_EVERY) => {
                let Some(mut r) = rounds.take() else { continue };
                let renewed = tokio::task::spawn_blocking(move || {
                    let renewed = r.keeper.renew();
                    (r, renewed)
                })
                .await;
                match renewed {
                    Ok((r, renewed)) => {
                        if let Err(e) = renewed {
                            // The next round retries and warns.
                            tracing::debug!(error = %e, "could not renew the shards between rounds");
                        }
                        *rounds = Some(r);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "shard keeper failed");
                        return delivered.await;
                    }
                }
            }
        }
    }
}

/// How long the keeper renews for a loop that has not taken its round up.
const RENEW_FOR: Duration = Duration::from_secs(60);

/// How long a wait for the leader's notifications lasts before the
/// follower checks whether the loop is still there.
const LISTEN_FOR: Duration = Duration::from_secs(1);

/// Follows the documents, governance, rollouts, releases and operator
/// intents the leader writes: read
/// again whenever a commit of theirs is heard, and in full after a lost
/// connection.
pub(super) async fn follow_documents(url: String, store: Store, events: mpsc::Sender<Event>) {
    let mut listener: Option<GlobalListener> = None;
    let store = std::sync::Arc::new(store);
    let mut warned = false;
    loop {
        let url = url.clone();
        let store = store.clone();
        let taken = listener.take();
        let result = tokio::task::spawn_blocking(move || {
            let mut l = match taken {
                Some(l) => l,
                None => match GlobalListener::connect(&url) {
                    Ok(l) => l,
                    Err(e) => return (None, Err(e)),
                },
            };
            // `None`: everything.
            let read = |trees: Option<&BTreeSet<String>>| -> Result<Vec<Event>, StoreError> {
                let heard = |tree: &str| trees.is_none_or(|t| t.contains(tree));
                let mut out = Vec::new();
                if heard("docs") {
                    out.push(Event::Docs(store.docs()?));
                }
                // Before rollouts and intents: scopes decide what reaches
                // a device.
                if heard("governance") {
                    out.push(Event::Governance(store.governance()?));
                }
                if heard("rollouts") || heard("releases") {
                    let (rollouts, releases) = store.rollouts()?;
                    out.push(Event::Rollouts(rollouts, releases));
                }
                if heard("intents") {
                    let (intents, last) = store.intents()?;
                    out.push(Event::Intents(intents, last));
                }
                Ok(out)
            };
            let heard = match l.wait(LISTEN_FOR) {
                Ok(Some(Heard::Everything)) => read(None),
                Ok(Some(Heard::Trees(trees))) => read(Some(&trees)),
                Ok(None) => Ok(Vec::new()),
                Err(e) => Err(e),
            };
            (Some(l), heard)
        })
        .await;
        let Ok((back, heard)) = result else { return };
        listener = back;
        match heard {
            Ok(read) => {
                warned = false;
                if events.is_closed() {
                    return;
                }
                for event in read {
                    if events.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                if !warned {
                    warned = true;
                    tracing::warn!(error = %e, "could not follow the leader's documents; retrying");
                }
                tokio::time::sleep(RETRY_EVERY).await;
            }
        }
    }
}
