//! The loop: events in batches, one durable commit per batch (group
//! commit), then what the commit held is published.

use std::collections::HashSet;

use super::operator::{handle_operator, OperatorSide};
use super::*;

/// What waits for a commit before it may be published.
#[derive(Default)]
struct Held {
    /// Answers to operators (queries are answered from memory, so only
    /// once the state they describe is durable).
    responses: Vec<Outgoing>,
    /// Commands: only after the record of the command (the outbox) is durable.
    commands: Vec<Outgoing>,
    /// An external broker's deliveries: acknowledged only once what they
    /// changed is durable, so a crash before makes the broker deliver them
    /// again instead of losing them.
    acks: Vec<super::external::Ack>,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.responses.is_empty() && self.commands.is_empty() && self.acks.is_empty()
    }

    /// The commands to `devices` may go: their records are durable.
    async fn release_commands_to(&mut self, devices: &[String], out: &mpsc::Sender<Outgoing>) {
        let devices: HashSet<&str> = devices.iter().map(String::as_str).collect();
        let (now, later): (Vec<Outgoing>, Vec<Outgoing>) = std::mem::take(&mut self.commands)
            .into_iter()
            .partition(|c| {
                topics::split_device_topic(&c.topic).is_some_and(|(id, _)| devices.contains(id))
            });
        self.commands = later;
        send_all(out, now).await;
    }

    /// Everything held may go: its state is durable.
    async fn release(self, out: &mpsc::Sender<Outgoing>) {
        for ack in self.acks {
            ack.release();
        }
        send_all(out, self.responses.into_iter().chain(self.commands)).await;
    }
}

struct CommitInFlight {
    /// The ids of the device records not known durable (all of them, or
    /// those of the chunk that failed and after), and the outcome.
    task: JoinHandle<(Vec<String>, Result<(), StoreError>)>,
    /// The rollout records written (written again if the commit fails).
    rollouts: Vec<String>,
    held: Held,
}

/// Writes `changes` in transactions of at most `chunk` device records
/// (`ControllerConfig::commit_chunk`), and sends the ids of each chunk on
/// `durable` as it becomes durable, so its commands may leave while the next
/// is written: a document that changed 10,000 devices made one transaction
/// of 10,000 records (275 ms here) before the first command could leave.
/// The other changes (rollouts, governance, the sequence) go with the first
/// chunk: a restart between chunks then finds a rollout's wave with some of
/// its devices not yet admitted, and admits them (never twice; admission is
/// in each device's record). A chunk that fails does not stop the ones
/// after it: one bad record holds back only its chunk. On failure, returns
/// the ids of the devices not known durable.
fn commit_in_chunks(
    store: &Store,
    mut changes: Changes,
    chunk: usize,
    durable: &mpsc::UnboundedSender<Vec<String>>,
) -> (Vec<String>, Result<(), StoreError>) {
    let chunk = chunk.max(1);
    if changes.devices.len() <= chunk {
        return store.commit_owned(changes);
    }
    let mut rest = changes.devices.split_off(chunk);
    let mut failed: Option<(Vec<String>, StoreError)> = None;
    let mut batch = changes;
    loop {
        let last = rest.is_empty();
        match store.commit_owned(batch) {
            (ids, Ok(())) if last && failed.is_none() => return (ids, Ok(())),
            (ids, Ok(())) => {
                // The loop may have stopped listening (shutdown).
                let _ = durable.send(ids);
            }
            (ids, Err(e)) => match &mut failed {
                Some((all, _)) => all.extend(ids),
                None => failed = Some((ids, e)),
            },
        }
        if last {
            break;
        }
        let tail = rest.split_off(chunk.min(rest.len()));
        batch = Changes {
            devices: std::mem::replace(&mut rest, tail),
            ..Default::default()
        };
    }
    match failed {
        Some((ids, e)) => (ids, Err(e)),
        None => (Vec::new(), Ok(())),
    }
}

/// Pause before writing again after a failed commit (e.g. a full disk or
/// the database down).
const COMMIT_RETRY: Duration = Duration::from_millis(200);

async fn send_all(out: &mpsc::Sender<Outgoing>, messages: impl IntoIterator<Item = Outgoing>) {
    tokio::task::unconstrained(async {
        for message in messages {
            if out.send(message).await.is_err() {
                return;
            }
        }
    })
    .await
}

/// The loop. Commits are pipelined: while one batch's commit is being
/// fsynced, the next events are applied in memory and their records wait
/// for the following commit, so the commit grows with the load (group
/// commit) instead of the loop idling on the disk.
// The loop's inputs and outputs, each a different channel or handle.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    mut fleet: Fleet,
    store: Arc<Store>,
    mut events: mpsc::Receiver<Event>,
    out: mpsc::Sender<Outgoing>,
    config: ControllerConfig,
    mut shutdown: watch::Receiver<bool>,
    clock: Clock,
    tables: BrokerTables,
) -> Result<(), ControllerError> {
    let mut known_device = known_devices(config.pki.clone());
    // Rotations need the CA: only a server run from the CA's directory signs.
    let (signed_tx, mut signed_rx) = mpsc::channel::<Vec<fleet::Signed>>(64);
    let pki_jobs = config.pki.clone().map(|dir| {
        let (tx, rx) = mpsc::channel::<PkiJob>(1024);
        tokio::spawn(pki_worker(dir, rx, signed_tx.clone()));
        tx
    });
    fleet.can_sign = pki_jobs.is_some();
    let mut status_tick = tokio::time::interval(config.status_every);
    status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rollout_tick = tokio::time::interval(config.rollout_every);
    rollout_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut compliance_tick = tokio::time::interval(config.compliance_every);
    compliance_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut side = OperatorSide {
        uploads: super::firmware::Uploads::new(config.firmware_dir(), config.max_firmware_bytes),
        sign_ins: config.sign_ins.clone(),
        acting: config
            .lease_holder
            .clone()
            .zip(config.fence)
            .map(|(holder, generation)| json!({"holder": holder, "lease_generation": generation})),
        shards: None,
        fleet_counters: None,
    };
    let mut last_summary = None;
    let mut last_audit_head = None;
    let mut in_flight: Option<CommitInFlight> = None;
    // The chunks of `in_flight` made durable so far (`commit_in_chunks`).
    let mut durable_rx: Option<mpsc::UnboundedReceiver<Vec<String>>> = None;
    let mut held = Held::default();
    let mut retry_commit_at: Option<tokio::time::Instant> = None;
    // Sharded, a controller writes the global records (documents, the
    // audit log, rollouts, governance) only once it holds the leader's
    // lease (`Event::Lead`); its own shards' devices it writes at once.
    let mut leader = fleet.owner.is_none();
    // The PKI's last word, for devices of shards gained later.
    let mut last_issued: Option<Vec<IssuedDevice>> = None;
    // Everything already in the store may have work to do.
    let ids: Vec<String> = fleet.devices.keys().cloned().collect();
    fleet.reconcile_later(ids);
    loop {
        let far = tokio::time::Instant::now() + Duration::from_secs(3600);
        let wake = fleet
            .next_timer()
            .map(|at| clock.instant_at(at))
            .into_iter()
            .chain(retry_commit_at)
            .min()
            .unwrap_or(far);
        let mut batch = Vec::new();
        let mut stop = false;
        tokio::select! {
            done = async {
                match in_flight.as_mut() {
                    Some(c) => (&mut c.task).await,
                    None => std::future::pending().await,
                }
            } => {
                let (flight, rollouts) = match in_flight.take() {
                    Some(mut c) => {
                        // Chunks made durable before the last one's outcome.
                        if let Some(durable) = durable_rx.as_mut() {
                            while let Ok(ids) = durable.try_recv() {
                                c.held.release_commands_to(&ids, &out).await;
                            }
                        }
                        durable_rx = None;
                        (c.held, c.rollouts)
                    }
                    None => Default::default(),
                };
                let (written, result) = match done {
                    Ok(pair) => pair,
                    Err(e) => (
                        Vec::new(),
                        Err(StoreError::Transaction(format!("commit task failed: {e}"))),
                    ),
                };
                match result {
                    Ok(()) => flight.release(&out).await,
                    Err(e) => {
                        tracing::error!(error = %e, disk_full = e.is_disk_full(), unavailable = e.is_unavailable(), "commit failed; holding changes and commands until storage works again");
                        fleet.mark_dirty(written);
                        fleet.mark_rollouts_dirty(rollouts);
                        // Commands are not sent before their record is durable;
                        // the timers re-send them once a commit succeeds.
                        fleet.commands_not_sent(
                            flight.commands
                                .iter()
                                .filter_map(|c| topics::split_device_topic(&c.topic).map(|(id, _)| id)),
                        );
                        send_all(&out, flight.responses).await;
                        // Their changes are dirty again: acknowledged with
                        // the commit that writes them.
                        held.acks.extend(flight.acks);
                        retry_commit_at = Some(tokio::time::Instant::now() + COMMIT_RETRY);
                    }
                }
            }
            Some(ids) = async {
                match durable_rx.as_mut() {
                    Some(durable) => durable.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(c) = in_flight.as_mut() {
                    c.held.release_commands_to(&ids, &out).await;
                }
            }
            Some(signed) = signed_rx.recv() => fleet.on_signed(signed, clock.now()),
            got = events.recv() => match got {
                Some(ev) => batch.push(ev),
                None => stop = true,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = status_tick.tick(), if leader => {
                let summary = fleet.summary();
                if last_summary.as_ref() != Some(&summary) {
                    let body = json!({
                        "total": summary.total, "online": summary.online, "converged": summary.converged,
                        "pending": summary.pending, "failed": summary.failed, "drifted": summary.drifted,
                        "at": crate::model::rfc3339(clock.now()),
                    });
                    send_all(&out, [Outgoing {
                        topic: topics::FLEET_STATUS.to_owned(),
                        payload: serde_json::to_vec(&body).unwrap_or_default(),
                        retain: true,
                        unanswered: false,
                    }]).await;
                    last_summary = Some(summary);
                }
            }
            _ = rollout_tick.tick() => {
                if !fleet.rollouts.is_empty() {
                    fleet.step_rollouts(clock.now());
                }
            }
            _ = compliance_tick.tick() => {
                let now = clock.now();
                if leader {
                    let summaries = fleet.compliance_tick(now);
                    send_all(&out, summaries).await;
                    super::enforce(&mut fleet, &store, now).await;
                    prune_intents(&mut fleet, &store, now, config.intent_keep).await;
                } else {
                    // Each owner judges its own devices; the samples are
                    // the leader's.
                    fleet.evaluate_timed(now);
                }
            }
            _ = shutdown.changed() => stop = true,
        }
        if stop {
            return finish(fleet, &store, &out, in_flight, held).await;
        }
        while batch.len() < config.max_batch {
            match events.try_recv() {
                Ok(ev) => batch.push(ev),
                Err(_) => break,
            }
        }

        let now = clock.now();
        for event in batch {
            match event {
                Event::Device {
                    id,
                    leaf,
                    payload,
                    ack,
                } => {
                    if !fleet.owns(&id) {
                        // From the session of a shard this controller just
                        // gave up or lost, which ends soon after (`steer`).
                        // Not acknowledged: the broker then gives it to the
                        // shard's new holder. Acknowledged, it would be lost.
                        drop(ack);
                        continue;
                    }
                    if known_device(&id) {
                        fleet.on_device_message(&id, &leaf, &payload, now)
                    } else {
                        fleet.refuse_unknown_device(&id, &leaf)
                    }
                    held.acks.extend(ack);
                }
                Event::Operator(msg, ack) => {
                    // A write commits itself before it is answered: its answer
                    // need not wait for the batch's commit (which, after a
                    // document that changes 50,000 devices, writes them all).
                    let write = super::operator::is_write(&msg.topic);
                    let stale = write
                        .then(|| super::operator::expired(&msg.payload, now))
                        .flatten();
                    if let Some(refusal) = stale {
                        if let Some(ack) = ack {
                            ack.release();
                        }
                        let answer =
                            super::operator::refuse_unread(&mut fleet, &store, &msg, refusal, now)
                                .await;
                        send_all(&out, answer).await;
                        continue;
                    }
                    let (answers, deferred) =
                        handle_operator(&mut fleet, &store, &mut side, msg, now).await;
                    // A quarantine is in force before its answer leaves:
                    // when the operator reads "quarantined", it is.
                    tables.push_pins(&mut fleet);
                    if write {
                        // Committed by handle_operator (or refused).
                        if let Some(ack) = ack {
                            ack.release();
                        }
                        send_all(&out, answers).await;
                        // The publisher, woken by that send, waits in this
                        // worker's LIFO slot (which no other worker steals)
                        // until this task yields: without the yield the
                        // answer left only after the document's effect on
                        // 10,000 devices and their commands, 90 ms later.
                        tokio::task::yield_now().await;
                    } else {
                        held.acks.extend(ack);
                        held.responses.extend(answers);
                    }
                    // Before the next event: nothing reads the fleet without it.
                    deferred.apply(&mut fleet);
                }
                Event::Redelivered(msg, ack) => {
                    if let Some(ack) = ack {
                        ack.release();
                    }
                    let answer = super::operator::refuse_unread(
                        &mut fleet,
                        &store,
                        &msg,
                        super::operator::redelivered(),
                        now,
                    )
                    .await;
                    send_all(&out, answer).await;
                }
                Event::Local { msg, reply } => {
                    let (answers, deferred) =
                        handle_operator(&mut fleet, &store, &mut side, msg, now).await;
                    tables.push_pins(&mut fleet);
                    if let Some(answer) = answers.into_iter().next() {
                        // The asker may have gone (a closed browser tab).
                        let _ = reply.send(answer.payload.into());
                        tokio::task::yield_now().await;
                    }
                    // Before the next event: nothing reads the fleet without it.
                    deferred.apply(&mut fleet);
                }
                Event::Shards {
                    acting,
                    copies,
                    holders,
                    others,
                    counters,
                } => {
                    let _ =
                        counters.send(serde_json::to_string(&fleet.counters).unwrap_or_default());
                    // `status` counts what every controller received.
                    let mut all = fleet.counters.clone();
                    for other in &others {
                        if let Ok(c) = serde_json::from_str::<fleet::Counters>(other) {
                            all.add(&c);
                        }
                    }
                    side.fleet_counters = Some(all);
                    // `status` names who holds which shards: by holder.
                    let mut by_holder: std::collections::BTreeMap<String, Vec<u32>> =
                        Default::default();
                    for (shard, holder) in holders {
                        by_holder.entry(holder).or_default().push(shard);
                    }
                    side.shards = Some(json!({
                        "count": fleet.owner.as_ref().map(|o| o.shards()),
                        "held": by_holder,
                    }));
                    fleet.follow_devices(copies);
                    let held = acting.keys().copied().collect();
                    if let Some(owner) = &fleet.owner {
                        store.fence_shards(owner.shards(), acting);
                    }
                    let gained = fleet.hold_shards(held);
                    if !gained.is_empty() {
                        // Devices issued while their shard had no owner
                        // here (at start, none had).
                        if let Some(devices) = last_issued.clone() {
                            register_issued(&mut fleet, devices, now);
                        }
                    }
                }
                Event::Docs(docs) => {
                    let changed = fleet.follow_docs(docs);
                    if changed > 0 {
                        tracing::info!(
                            devices = changed,
                            "documents followed: desired state changed"
                        );
                    }
                }
                Event::Intents(intents, last) => {
                    fleet.take_intents(intents, last);
                }
                Event::Governance(records) => {
                    // The leader writes it: its own is the newest.
                    if !leader {
                        if let Err(e) = fleet.follow_governance(records, now) {
                            tracing::error!(error = %e, "could not follow the leader's organisations and policy");
                        }
                    }
                }
                Event::Rollouts(rollouts, releases) => {
                    // The leader writes them: its own are the newest.
                    if !leader {
                        fleet.follow_rollouts(rollouts, releases);
                    }
                }
                Event::Lead { generation, holder } => {
                    store.fence_with(generation);
                    // The log and the documents as the last leader left
                    // them: entries chain on from the stored head.
                    loop {
                        let store = store.clone();
                        let read = tokio::task::spawn_blocking(move || {
                            let last = store.refresh_audit()?;
                            Ok::<_, StoreError>((
                                last,
                                store.docs()?,
                                store.intents()?,
                                store.rollouts()?,
                            ))
                        })
                        .await
                        .map_err(|e| StoreError::Transaction(e.to_string()))
                        .and_then(|r| r);
                        match read {
                            Ok((last, docs, (intents, last_intent), (rollouts, releases))) => {
                                fleet.audit_after(last);
                                fleet.follow_docs(docs);
                                fleet.follow_rollouts(rollouts, releases);
                                // Numbered on from the last leader's.
                                fleet.take_intents(intents, last_intent);
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the audit log and documents to lead; retrying")
                            }
                        }
                        tokio::time::sleep(COMMIT_RETRY).await;
                    }
                    side.acting = Some(json!({"holder": holder, "lease_generation": generation}));
                    leader = true;
                    fleet.leading = true;
                    tracing::info!(%holder, generation, "leading: this controller answers operators and writes the global records");
                }
                Event::Issued(devices) => {
                    if fleet.owner.is_some() {
                        last_issued = Some(devices.clone());
                    }
                    register_issued(&mut fleet, devices, now);
                }
            }
        }
        held.commands.extend(fleet.reconcile_due(now));
        // Certificates go out once the records saying so are durable.
        held.commands.extend(fleet.take_deliveries());
        if let Some(jobs) = &pki_jobs {
            let csrs = fleet.take_sign_requests();
            if !csrs.is_empty() && jobs.try_send(PkiJob::Sign(csrs)).is_err() {
                tracing::warn!("the CA is busy: CSRs dropped; the devices ask again");
            }
            let serials = fleet.take_revocations();
            if !serials.is_empty() {
                if let Err(e) = jobs.send(PkiJob::Revoke(serials)).await {
                    tracing::error!(error = %e, "the CA's worker is gone: serials not revoked in its list (the broker's pins still refuse them)");
                }
            }
        }
        // The audit chain's head, retained, for auditors to hold the log to
        // (`cityplane audit verify`): published once the entries are stored.
        let head = store.audit_head();
        if leader && last_audit_head.as_ref() != Some(&head) {
            let body = json!({"seq": head.0, "hash": head.1, "at": crate::model::rfc3339(now)});
            send_all(
                &out,
                [Outgoing {
                    topic: topics::FLEET_AUDIT_HEAD.to_owned(),
                    payload: serde_json::to_vec(&body).unwrap_or_default(),
                    retain: true,
                    unanswered: false,
                }],
            )
            .await;
            last_audit_head = Some(head);
        }
        if fleet.gov.scopes_dirty {
            fleet.gov.scopes_dirty = false;
            tables.scopes.replace(fleet.scope_table());
        }
        tables.push_pins(&mut fleet);
        // The commands of every chunk made durable meanwhile leave now: the
        // `durable` branch above is one of several ready ones, taken once
        // per turn, and a turn with a batch of events takes tens of ms, so
        // waiting for it held commands back long after their chunk was
        // durable (a 10,000-device change: the last chunk durable at
        // 0.63 s, its commands sent after 0.8 s).
        if let (Some(c), Some(durable)) = (in_flight.as_mut(), durable_rx.as_mut()) {
            while let Ok(ids) = durable.try_recv() {
                c.held.release_commands_to(&ids, &out).await;
            }
        }

        let may_commit = in_flight.is_none()
            && retry_commit_at.is_none_or(|at| at <= tokio::time::Instant::now());
        if !may_commit {
            continue;
        }
        retry_commit_at = None;
        if fleet.has_dirty() || fleet.has_dirty_rollouts() || fleet.gov.has_pending() {
            let changes = Changes {
                devices: fleet.take_dirty(),
                rollouts: fleet.take_dirty_rollouts(),
                governance: fleet.gov.take_pending(),
                // The leader's record, like the documents it numbers.
                seq: leader.then_some(fleet.seq),
                ..Default::default()
            };
            let store = store.clone();
            let rollouts = changes
                .rollouts
                .iter()
                .map(|r| r.spec.name.clone())
                .collect();
            let (durable_tx, durable) = mpsc::unbounded_channel();
            let chunk = config.commit_chunk;
            durable_rx = Some(durable);
            in_flight = Some(CommitInFlight {
                rollouts,
                task: tokio::task::spawn_blocking(move || {
                    commit_in_chunks(&store, changes, chunk, &durable_tx)
                }),
                held: std::mem::take(&mut held),
            });
        } else if !held.is_empty() {
            // Nothing new to make durable: what is held may go now.
            std::mem::take(&mut held).release(&out).await;
        }
    }
}

/// On shutdown: the commit in flight and one last commit of what changed
/// since, then what they held is published.
async fn finish(
    mut fleet: Fleet,
    store: &Arc<Store>,
    out: &mpsc::Sender<Outgoing>,
    in_flight: Option<CommitInFlight>,
    held: Held,
) -> Result<(), ControllerError> {
    if let Some(c) = in_flight {
        match c.task.await {
            Ok((_, Ok(()))) => c.held.release(out).await,
            Ok((written, Err(e))) => {
                tracing::error!(error = %e, "commit failed at shutdown");
                fleet.mark_dirty(written);
            }
            Err(e) => tracing::error!(error = %e, "commit task failed at shutdown"),
        }
    }
    let changes = Changes {
        devices: fleet.take_dirty(),
        rollouts: fleet.take_dirty_rollouts(),
        governance: fleet.gov.take_pending(),
        seq: fleet.owner.is_none().then_some(fleet.seq),
        ..Default::default()
    };
    let (_, result) = commit(store, changes).await;
    match result {
        Ok(()) => held.release(out).await,
        Err(e) => {
            tracing::error!(error = %e, "last commit failed at shutdown; the changes since the last commit are re-derived at the next start");
            send_all(out, held.responses).await;
        }
    }
    Ok(())
}

/// Sharded, the leader deletes the operator intents every device has
/// passed (`Fleet::passed_intents`).
async fn prune_intents(fleet: &mut Fleet, store: &Arc<Store>, now: Millis, keep: Duration) {
    let passed = fleet.passed_intents(now, keep.as_millis() as Millis);
    if passed.is_empty() {
        return;
    }
    let changes = Changes {
        pruned_intents: passed.clone(),
        ..Default::default()
    };
    match commit(store, changes).await.1 {
        Ok(()) => fleet.pruned_intents(&passed),
        Err(e) => tracing::warn!(error = %e, "could not prune passed intents; retrying later"),
    }
}

pub(super) async fn commit(
    store: &Arc<Store>,
    changes: Changes,
) -> (Changes, Result<(), StoreError>) {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || {
        let result = store.commit(&changes);
        (changes, result)
    })
    .await
    {
        Ok(pair) => pair,
        Err(e) => (
            Changes::default(),
            Err(StoreError::Transaction(format!("commit task failed: {e}"))),
        ),
    }
}

/// The retry schedule as the running loop produces it, on tokio's paused
/// clock: virtual time only moves when every task waits, so each command is
/// observed at exactly the instant the loop sent it.
/// Work for the CA, done one job at a time (the PKI's files are not
/// written by two threads at once).
pub(super) enum PkiJob {
    Sign(Vec<fleet::SignRequest>),
    Revoke(Vec<String>),
}

/// Signs CSRs and revokes serials with the CA in `dir`, off the loop.
async fn pki_worker(
    dir: std::path::PathBuf,
    mut jobs: mpsc::Receiver<PkiJob>,
    signed: mpsc::Sender<Vec<fleet::Signed>>,
) {
    while let Some(job) = jobs.recv().await {
        let dir = dir.clone();
        let done = tokio::task::spawn_blocking(move || {
            let pki = cityplane_certs::Pki::open(&dir);
            match job {
                PkiJob::Sign(csrs) => {
                    let pairs: Vec<(String, String)> =
                        csrs.iter().map(|r| (r.id.clone(), r.csr.clone())).collect();
                    // One read of the CA and its record, one append, per batch.
                    let results = pki
                        .and_then(|pki| pki.sign_device_csrs(&pairs))
                        .map_err(|e| format!("the CA could not sign: {e}"));
                    Some(
                        csrs.into_iter()
                            .enumerate()
                            .map(|(i, r)| {
                                let result = match &results {
                                    Ok(all) => match all.get(i) {
                                        Some(Ok(s)) => {
                                            let not_after = s
                                                .cert
                                                .not_after
                                                .parse::<jiff::Timestamp>()
                                                .ok()
                                                .and_then(|t| u64::try_from(t.as_millisecond()).ok());
                                            Ok((s.cert.serial.clone(), s.pem.clone(), not_after))
                                        }
                                        Some(Err(e)) => Err(e.to_string()),
                                        None => Err("the CA gave no answer".to_owned()),
                                    },
                                    Err(e) => Err(e.clone()),
                                };
                                if let Err(why) = &result {
                                    tracing::warn!(device = %r.id, reason = %why, "CSR refused");
                                }
                                fleet::Signed {
                                    id: r.id,
                                    rotation: r.rotation,
                                    result,
                                }
                            })
                            .collect::<Vec<_>>(),
                    )
                }
                PkiJob::Revoke(serials) => {
                    match pki.and_then(|p| p.revoke_serials(&serials)) {
                        Ok(done) => {
                            tracing::info!(revoked = done.len(), "replaced certificates revoked in the CA's list")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, serials = serials.len(), "could not revoke in the CA's list (the broker's pins still refuse them)")
                        }
                    }
                    None
                }
            }
        })
        .await;
        if let Ok(Some(results)) = done {
            if signed.send(results).await.is_err() {
                return;
            }
        }
    }
}

/// The broker's tables the controller fills: who sees which devices, and
/// which certificates devices may use.
pub(super) struct BrokerTables {
    pub(super) scopes: cityplane_broker::Scopes,
    pub(super) pins: cityplane_broker::Pins,
}

impl BrokerTables {
    /// Hands the broker the pin table when a quarantine or release changed it.
    pub(super) fn push_pins(&self, fleet: &mut Fleet) {
        if fleet.pins_dirty {
            fleet.pins_dirty = false;
            let cut = self.pins.replace(fleet.pin_table());
            if cut > 0 {
                tracing::warn!(
                    sessions = cut,
                    "sessions cut: quarantined or pinned to another certificate"
                );
            }
        }
    }
}

/// Registers the devices the PKI's issuance record holds (those this
/// controller writes: sharded, its own shards'), their revocations and
/// certificate expiries.
fn register_issued(fleet: &mut Fleet, devices: Vec<IssuedDevice>, now: Millis) {
    let revoked: std::collections::HashSet<String> = devices
        .iter()
        .filter(|d| d.revoked)
        .map(|d| d.id.clone())
        .collect();
    let expiry: Vec<(String, u64)> = devices
        .iter()
        .filter_map(|d| Some((d.id.clone(), d.not_after_ms?)))
        .collect();
    let entries: Vec<Registration> = devices
        .into_iter()
        .filter(|d| fleet.owns(&d.id))
        .map(|d| Registration {
            id: d.id,
            class: d.attributes.class,
            labels: d.attributes.labels,
            owner: d.attributes.owner,
        })
        .collect();
    let (new, updated) = fleet.register(&entries, fleet::FROM_PKI, Overwrite::Never, now);
    fleet.set_revoked(&revoked);
    fleet.set_cert_expiry(&expiry);
    if new + updated > 0 {
        tracing::info!(
            new,
            updated,
            "registry: devices from the PKI's issuance record"
        );
    }
}

#[cfg(test)]
mod paused_clock_tests {
    use super::*;
    use crate::model::{DeviceRecord, DocRecord};
    use crate::reconcile::jitter;
    use cityplane_proto::messages::{self, IdList, State, Target};
    use tokio::time::Instant;

    const DEVICE: &str = "lamp";

    fn state(v: Value) -> State {
        v.as_object().cloned().expect("object")
    }

    struct Harness {
        events: mpsc::Sender<Event>,
        out: mpsc::Receiver<Outgoing>,
        shutdown: watch::Sender<bool>,
        task: JoinHandle<Result<(), ControllerError>>,
        _dir: tempfile::TempDir,
    }

    /// One device that reported `dimming: 10`, one document that wants 50.
    fn start(policy: RetryPolicy) -> Harness {
        start_with(policy, None)
    }

    /// As [`start`]; with `shards`, one of several sharded controllers
    /// that holds no shard (yet).
    fn start_with(policy: RetryPolicy, shards: Option<u32>) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), 8 << 20).expect("store"));
        let doc = DocRecord {
            name: "dim".into(),
            target: Target::Ids(IdList {
                ids: vec![DEVICE.into()],
            }),
            priority: 0,
            state: state(json!({"dimming": 50})),
            generation: 1,
            seq: 1,
            author: "op".into(),
            org: None,
            written_at: 0,
            history: Vec::new(),
        };
        let mut lamp = DeviceRecord::new(DEVICE);
        lamp.reported = state(json!({"dimming": 10})).into();
        lamp.reported_version = 1;
        let mut fleet = Fleet::new(
            vec![doc],
            vec![lamp],
            1,
            0,
            policy,
            InputLimits::default(),
            "test".into(),
        );
        if let Some(shards) = shards {
            fleet.shard(shards);
        }
        let config = ControllerConfig::new(dir.path().to_path_buf());
        let (events, events_rx) = mpsc::channel(64);
        let (out_tx, out) = mpsc::channel(64);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            fleet,
            store,
            events_rx,
            out_tx,
            config,
            shutdown_rx,
            Clock::new(),
            BrokerTables {
                scopes: cityplane_broker::Scopes::default(),
                pins: cityplane_broker::Pins::default(),
            },
        ));
        Harness {
            events,
            out,
            shutdown,
            task,
            _dir: dir,
        }
    }

    impl Harness {
        async fn device_says(&self, leaf: &str, body: Value) {
            self.events
                .send(Event::Device {
                    id: DEVICE.into(),
                    leaf: leaf.into(),
                    payload: body.to_string().into(),
                    ack: None,
                })
                .await
                .expect("controller running");
        }

        /// The next command, with the (virtual) instant it was sent and its
        /// `Outgoing::unanswered`.
        async fn next_command(&mut self) -> (Instant, messages::Command, bool) {
            loop {
                let out = self.out.recv().await.expect("controller running");
                if out.topic == topics::commands(DEVICE) {
                    let cmd = serde_json::from_slice(&out.payload).expect("command JSON");
                    return (Instant::now(), cmd, out.unanswered);
                }
            }
        }

        /// Everything published during `span` of virtual time: commands and
        /// the last fleet summary.
        async fn quiet_for(&mut self, span: Duration) -> (usize, Value) {
            let until = Instant::now() + span;
            let (mut commands, mut summary) = (0, Value::Null);
            while let Ok(Some(out)) = tokio::time::timeout_at(until, self.out.recv()).await {
                if out.topic == topics::commands(DEVICE) {
                    commands += 1;
                } else if out.topic == topics::FLEET_STATUS {
                    summary = serde_json::from_slice(&out.payload).expect("status JSON");
                }
            }
            (commands, summary)
        }

        async fn stop(self) {
            let _ = self.shutdown.send(true);
            self.task.await.expect("join").expect("clean stop");
        }
    }

    /// A shard session may deliver a device's message after its shard
    /// moved to another controller: acknowledged, the broker would drop
    /// it, and no controller would ever read it.
    #[tokio::test(start_paused = true)]
    async fn a_device_message_is_acknowledged_only_by_the_controller_that_owns_the_device() {
        for (shards, owned) in [(None, true), (Some(16), false)] {
            let h = start_with(RetryPolicy::default(), shards);
            let (acks, mut acked) = mpsc::unbounded_channel();
            h.events
                .send(Event::Device {
                    id: DEVICE.into(),
                    leaf: "reported".into(),
                    payload: json!({"version": 2, "state": {"dimming": 50}})
                        .to_string()
                        .into(),
                    ack: Some(super::super::external::Ack::for_tests(acks, 7)),
                })
                .await
                .expect("controller running");
            // `None`: the acknowledgement was dropped unsent.
            let got = acked.recv().await;
            assert_eq!(got, owned.then_some((0, 7)), "shards {shards:?}");
            h.stop().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_back_off_exponentially_up_to_the_cap_then_fail() {
        let policy = RetryPolicy {
            command_timeout: Duration::from_secs(10),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
            max_attempts: 5,
        };
        let mut h = start(policy.clone());
        // Nothing is sent to a device that is not online.
        let (sent, _) = h.quiet_for(Duration::from_secs(60)).await;
        assert_eq!(sent, 0, "a command went to an offline device");

        let online_at = Instant::now();
        h.device_says("presence", json!({"online": true})).await;
        let (first_at, first, unanswered) = h.next_command().await;
        assert_eq!(first_at, online_at, "the first command goes out at once");
        assert!(
            !unanswered,
            "a first send is not a sign of a lost subscription"
        );
        assert_eq!(first.state, state(json!({"dimming": 50})));

        let mut previous = first_at;
        for attempt in 1..policy.max_attempts {
            let (at, cmd, unanswered) = h.next_command().await;
            assert_eq!(cmd.id, first.id, "a re-send keeps the command id");
            // The first re-send may only replace a copy lost on the way;
            // from the second the device's subscription is suspect.
            assert_eq!(
                unanswered,
                attempt >= 2,
                "attempt {}: flagged unanswered only after a re-send timed out too",
                attempt + 1
            );
            assert_eq!(cmd.generation, first.generation);
            let gap = at - previous;
            // timeout, then base × 2^(attempt-1) capped at the maximum, with
            // "equal jitter": between half and all of it.
            let nominal = (policy.backoff_base * 2u32.pow(attempt - 1)).min(policy.backoff_max);
            let wait = gap
                .checked_sub(policy.command_timeout)
                .expect("re-sent before the command timed out");
            assert!(
                wait >= nominal / 2 && wait <= nominal,
                "attempt {}: waited {wait:?} after the timeout, nominal backoff {nominal:?}",
                attempt + 1
            );
            let expected =
                policy.command_timeout + policy.backoff(attempt, jitter(DEVICE, attempt));
            assert_eq!(
                gap.as_millis(),
                expected.as_millis(),
                "attempt {}",
                attempt + 1
            );
            previous = at;
        }

        // The last attempt times out: Failed, and nothing more is sent.
        let (sent, summary) = h.quiet_for(Duration::from_secs(24 * 3600)).await;
        assert_eq!(sent, 0, "commands after the last attempt");
        assert_eq!(summary["failed"], 1, "{summary}");

        // Back online (a reboot): re-driven at once, same command id.
        h.device_says("presence", json!({"online": false})).await;
        let back_at = Instant::now();
        h.device_says("presence", json!({"online": true})).await;
        let (at, cmd, unanswered) = h.next_command().await;
        assert_eq!(at, back_at);
        assert_eq!(cmd.id, first.id);
        // Not after a re-drive: cutting a device that just came back would
        // bring it back again, and so on.
        assert!(!unanswered, "a re-drive counted as unanswered");

        // Applied and reported: converged, and the timers stay quiet.
        h.device_says("acks", json!({"id": cmd.id, "status": "applied"}))
            .await;
        h.device_says("reported", json!({"version": 2, "state": {"dimming": 50}}))
            .await;
        let (sent, summary) = h.quiet_for(Duration::from_secs(24 * 3600)).await;
        assert_eq!(sent, 0, "commands after convergence");
        assert_eq!(summary["converged"], 1, "{summary}");
        assert_eq!(summary["failed"], 0, "{summary}");
        h.stop().await;
    }
}
