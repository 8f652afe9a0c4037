//! The store's semantics, the same on both engines: each check is a
//! function of a [`StoreLocation`], run once on sled in a temporary
//! directory and once on a throwaway PostgreSQL (`cityplane_testkit::
//! postgres`, skipped without its binaries unless
//! `CITYPLANE_REQUIRE_POSTGRES=1`). Then what only PostgreSQL has: its
//! durability settings checked at connect, one transaction per commit, an
//! outage as a clear error the same handle recovers from, and a client
//! that never runs its runtime on a tokio worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cityplane_controller::model::{AuditEntry, DeviceRecord, DocRecord, Intent, IntentRecord};
use cityplane_controller::secrets::{Rotation, Vault};
use cityplane_controller::store::{
    Changes, CommitGate, Store, StoreError, StoreLocation, AUDIT_KEPT, MAX_RECORD,
};
use cityplane_testkit::postgres::Postgres;

use crate::common::doc;

const CACHE: u64 = 4 << 20;

/// Runs `check` on sled, then on PostgreSQL when it can run here.
/// `reopen` gives the check a store on the same data again.
fn on_both_engines(test: &str, check: impl Fn(&dyn Fn() -> Store)) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = StoreLocation::Sled(dir.path().join("db"));
    check(&|| open(&sled));
    if !cityplane_testkit::postgres::available(test) {
        return;
    }
    let pg = Postgres::start().expect("PostgreSQL starts");
    let location = StoreLocation::Postgres(pg.url());
    check(&|| open(&location));
}

/// Opens `location`, waiting out the file lock a just-dropped sled handle
/// may hold for some milliseconds.
fn open(location: &StoreLocation) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open_at(location, CACHE) {
            Ok(store) => return store,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("open {location}: {e}"),
        }
    }
}

fn entry(seq: u64, name: &str) -> AuditEntry {
    AuditEntry {
        seq,
        at: String::new(),
        who: "op".to_owned(),
        action: "test".to_owned(),
        name: name.to_owned(),
        result: "ok".to_owned(),
        org: None,
        devices: Vec::new(),
        prev: String::new(),
        hash: String::new(),
    }
}

fn device(id: &str, version: u64) -> Arc<DeviceRecord> {
    let mut d = DeviceRecord::new(id);
    d.reported_version = version;
    Arc::new(d)
}

fn docs(store: &Store) -> Vec<(String, u64)> {
    let mut docs: Vec<_> = store
        .load()
        .expect("load")
        .docs
        .into_iter()
        .map(|d| (d.name, d.generation))
        .collect();
    docs.sort();
    docs
}

fn commit_docs(store: &Store, docs: Vec<DocRecord>) {
    store
        .commit(&Changes {
            docs,
            ..Default::default()
        })
        .expect("commit");
}

// ---------------------------------------------------------------------------
// Both engines.

#[test]
fn a_refused_document_write_is_undone_by_the_next_commit() {
    on_both_engines(
        "a_refused_document_write_is_undone_by_the_next_commit",
        |reopen| {
            let store = reopen();
            commit_docs(&store, vec![doc("kept", 1)]);
            // As if these two had reached the disk although their commits failed.
            commit_docs(&store, vec![doc("kept", 2)]);
            commit_docs(&store, vec![doc("new", 1)]);
            store.defer_restore_doc("kept", Some(doc("kept", 1)));
            store.defer_restore_doc("new", None);
            assert_eq!(docs(&store), [("kept".into(), 2), ("new".into(), 1)]);
            commit_docs(&store, vec![doc("other", 1)]);
            assert_eq!(docs(&store), [("kept".into(), 1), ("other".into(), 1)]);
            // Done once: later commits leave documents alone.
            commit_docs(&store, vec![doc("new", 1)]);
            assert_eq!(
                docs(&store),
                [("kept".into(), 1), ("new".into(), 1), ("other".into(), 1)]
            );
            // A document put back and written again in one commit ends as
            // that commit says.
            store.defer_restore_doc("kept", None);
            commit_docs(&store, vec![doc("kept", 3)]);
            drop(store);
            assert_eq!(
                docs(&reopen()),
                [("kept".into(), 3), ("new".into(), 1), ("other".into(), 1)]
            );
        },
    );
}

/// Every tree, written, deleted where it can be, and read back after a
/// reopen; `meta`'s seq also covers generations already handed out.
#[test]
fn every_tree_round_trips_through_a_reopen() {
    on_both_engines("every_tree_round_trips_through_a_reopen", |reopen| {
        let store = reopen();
        store
            .commit(&Changes {
                docs: vec![doc("a", 1), doc("b", 2)],
                devices: vec![device("d1", 7), device("d2", 8)],
                audit: vec![entry(1, "first")],
                seq: Some(5),
                governance: vec![
                    ("org/x".into(), Some(br#"{"name":"x"}"#.to_vec())),
                    ("org/y".into(), Some(br#"{"name":"y"}"#.to_vec())),
                ],
                intents: vec![intent(10), intent(2), intent(300)],
                ..Default::default()
            })
            .expect("first commit");
        store
            .commit(&Changes {
                deleted_docs: vec!["a".into()],
                devices: vec![device("d1", 9)],
                governance: vec![("org/x".into(), None)],
                pruned_intents: vec![300, 2],
                ..Default::default()
            })
            .expect("second commit");
        drop(store);
        let loaded = reopen().load().expect("load");
        let names: Vec<&str> = loaded.docs.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["b"]);
        let devices: BTreeMap<&str, u64> = loaded
            .devices
            .iter()
            .map(|d| (d.id.as_str(), d.reported_version))
            .collect();
        assert_eq!(devices, BTreeMap::from([("d1", 9), ("d2", 8)]));
        assert_eq!(
            loaded.governance,
            [("org/y".to_owned(), br#"{"name":"y"}"#.to_vec())]
        );
        assert_eq!((loaded.seq, loaded.audit_len, loaded.audit_last), (5, 1, 1));
        // Kept in order; the highest number stays after it was pruned.
        let (intents, last) = reopen().intents().expect("intents");
        assert_eq!(intents, [intent(10)]);
        assert_eq!(last, 300);
    });
}

fn intent(seq: u64) -> IntentRecord {
    IntentRecord {
        seq,
        at: 1_000,
        devices: [(
            format!("d{seq}"),
            Intent::Registry {
                attrs: Default::default(),
                registered_by: "op".into(),
                registered_at: 1_000,
            },
        )]
        .into(),
    }
}

/// The audit log: chained across commits and reopens, paged, searched and
/// verified over more entries than a page of either engine, the newest
/// [`AUDIT_KEPT`] in memory after a reopen.
#[test]
fn the_audit_log_chains_pages_and_verifies_across_reopens() {
    on_both_engines(
        "the_audit_log_chains_pages_and_verifies_across_reopens",
        |reopen| {
            const N: u64 = 2_500;
            let store = reopen();
            for chunk in (1..=N).collect::<Vec<_>>().chunks(500) {
                let audit = chunk.iter().map(|&s| entry(s, &format!("e{s}"))).collect();
                store
                    .commit(&Changes {
                        audit,
                        ..Default::default()
                    })
                    .expect("commit");
            }
            let head = store.audit_head();
            drop(store);
            let store = reopen();
            assert_eq!(store.audit_head(), head, "the chain goes on after a reopen");
            store
                .commit(&Changes {
                    audit: vec![entry(N + 1, "after-reopen")],
                    ..Default::default()
                })
                .expect("commit after reopen");
            let verified = store
                .audit_verify()
                .expect("read")
                .expect("an unbroken chain");
            assert_eq!(verified.seq, N + 1);
            let recent = store.recent_audit(usize::MAX);
            assert_eq!(recent.len(), AUDIT_KEPT);
            assert_eq!(recent.last().map(|e| e.seq), Some(N + 1));
            let seqs = |v: Vec<AuditEntry>| v.into_iter().map(|e| e.seq).collect::<Vec<_>>();
            assert_eq!(
                seqs(store.audit_page(998, 4).expect("page")),
                [999, 1000, 1001, 1002]
            );
            assert_eq!(seqs(store.audit_page(N - 1, 10).expect("page")), [N, N + 1]);
            assert!(store.audit_page(u64::MAX, 10).expect("page").is_empty());
            assert_eq!(seqs(store.audit_tail(3).expect("tail")), [N - 1, N, N + 1]);
            // A search reaches past what memory holds and past a page.
            let found = store
                .audit_find(|e| e.seq % 1000 == 1 || e.name == "after-reopen", 3)
                .expect("find");
            assert_eq!(seqs(found), [1001, 2001, N + 1]);
            let all = store.audit_find(|e| e.seq <= 3, 10).expect("find");
            assert_eq!(seqs(all), [1, 2, 3]);
            let loaded = store.load().expect("load");
            assert_eq!((loaded.audit_len as u64, loaded.audit_last), (N + 1, N + 1));
        },
    );
}

/// Two rotations of one secret in one commit chain (the second keeps the
/// first as previous); a look-up sees rotations still waiting for a commit.
#[test]
fn secret_slots_chain_rotations_in_and_across_commits() {
    on_both_engines(
        "secret_slots_chain_rotations_in_and_across_commits",
        |reopen| {
            let keys = tempfile::tempdir().expect("tempdir");
            let vault = Vault::open_or_create(&keys.path().join("secrets.key")).expect("vault");
            let mint = |n: u64| vault.mint("d1", "admin_password", n).expect("mint");
            let rotate = |store: &Store, n: u64| {
                store.queue_secret(Rotation {
                    device: "d1".into(),
                    name: "admin_password".into(),
                    sealed: mint(n),
                    keep: None,
                })
            };
            let fingerprints = |store: &Store| {
                let slot = store
                    .secret_slot("d1", "admin_password")
                    .expect("read")
                    .expect("a slot");
                (slot.current.rotated_at, slot.previous.map(|p| p.rotated_at))
            };
            let store = reopen();
            rotate(&store, 1);
            assert_eq!(fingerprints(&store), (1, None), "pending, not yet stored");
            rotate(&store, 2);
            store.commit(&Changes::default()).expect("commit");
            assert_eq!(fingerprints(&store), (2, Some(1)));
            rotate(&store, 3);
            store.commit(&Changes::default()).expect("commit");
            drop(store);
            let store = reopen();
            assert_eq!(fingerprints(&store), (3, Some(2)));
            assert!(store
                .secret_slot("d2", "admin_password")
                .expect("read")
                .is_none());
        },
    );
}

/// A record above [`MAX_RECORD`] is refused before anything is written.
#[test]
fn a_record_above_the_limit_is_refused_whole() {
    on_both_engines("a_record_above_the_limit_is_refused_whole", |reopen| {
        let store = reopen();
        let mut big = doc("big", 1);
        big.state
            .insert("pad".into(), serde_json::json!("x".repeat(MAX_RECORD)));
        let err = store
            .commit(&Changes {
                docs: vec![doc("small", 1), big],
                ..Default::default()
            })
            .expect_err("a record above the limit");
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(docs(&store).is_empty());
    });
}

/// A commit the gate fails (after the write, as a failed fsync) hands its
/// deferred audit entries and documents to the next commit that succeeds.
#[test]
fn a_failed_commit_defers_its_audit_to_the_next_one() {
    on_both_engines(
        "a_failed_commit_defers_its_audit_to_the_next_one",
        |reopen| {
            let fail = Arc::new(AtomicBool::new(false));
            let gate = {
                let fail = fail.clone();
                CommitGate::new(move |_| {
                    if fail.load(Ordering::SeqCst) {
                        Err(StoreError::Transaction("the gate fails it".into()))
                    } else {
                        Ok(())
                    }
                })
            };
            let store = reopen().with_gate(Some(gate));
            store
                .commit(&Changes {
                    audit: vec![entry(1, "one")],
                    ..Default::default()
                })
                .expect("commit");
            fail.store(true, Ordering::SeqCst);
            store.defer_audit([entry(2, "refused")]);
            store
                .commit(&Changes {
                    audit: vec![entry(3, "three")],
                    ..Default::default()
                })
                .expect_err("the gate fails it");
            assert_eq!(
                store.audit_head().0,
                1,
                "a failed commit does not move the head"
            );
            // As the runtime does with a refused write's audit line.
            store.defer_audit([entry(3, "three refused")]);
            fail.store(false, Ordering::SeqCst);
            store
                .commit(&Changes {
                    audit: vec![entry(4, "four")],
                    ..Default::default()
                })
                .expect("commit");
            let names: Vec<String> = store
                .audit_tail(10)
                .expect("tail")
                .into_iter()
                .map(|e| e.name)
                .collect();
            // Entry 3 reached the database before the gate failed its
            // commit; its refusal took its place, chained from the head.
            assert_eq!(names, ["one", "refused", "three refused", "four"]);
            store
                .audit_verify()
                .expect("read")
                .expect("an unbroken chain");
        },
    );
}

// ---------------------------------------------------------------------------
// PostgreSQL only.

fn postgres_or_skip(test: &str) -> Option<Postgres> {
    cityplane_testkit::postgres::available(test)
        .then(|| Postgres::start().expect("PostgreSQL starts"))
}

/// Settings in the URL's own `options=` reach every session beside ours:
/// with a `search_path`, two fleets share a database, a schema each.
#[test]
fn the_urls_own_session_options_are_kept() {
    let Some(pg) = postgres_or_skip("the_urls_own_session_options_are_kept") else {
        return;
    };
    pg.psql("CREATE SCHEMA city2").expect("schema");
    let url = format!("{}?options=-c%20search_path%3Dcity2", pg.url());
    let store = open(&StoreLocation::Postgres(url));
    store
        .commit(&Changes {
            devices: vec![device("d1", 1)],
            seq: Some(1),
            ..Default::default()
        })
        .expect("commit");
    assert_eq!(
        pg.psql("SELECT count(*) FROM city2.cityplane_kv WHERE tree = 'devices'")
            .expect("psql"),
        "1",
        "the records are in the URL's schema"
    );
    assert_eq!(
        pg.psql("SELECT to_regclass('public.cityplane_kv') IS NULL")
            .expect("psql"),
        "t",
        "nothing was created in the default schema"
    );
}

/// A server that could lose an acknowledged commit is refused at connect,
/// with the setting named: in the server's settings or only for the role
/// we connect as (a session's setting is what counts).
#[test]
fn postgres_without_synchronous_commit_or_fsync_is_refused() {
    let Some(pg) = postgres_or_skip("postgres_without_synchronous_commit_or_fsync_is_refused")
    else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let sql = |sql: &str| {
        pg.psql(sql).expect("psql");
        pg.psql("SELECT pg_reload_conf()").expect("reload");
    };
    let refused = |setting: &str| {
        let err = Store::open_at(&location, CACHE).err().expect("refused");
        assert!(
            matches!(err, StoreError::Refused { .. })
                && err.to_string().contains(&format!("{setting}=off")),
            "{err}"
        );
    };
    sql("ALTER SYSTEM SET synchronous_commit = off");
    refused("synchronous_commit");
    sql("ALTER SYSTEM RESET synchronous_commit");
    sql("ALTER ROLE postgres SET synchronous_commit = off");
    refused("synchronous_commit");
    sql("ALTER ROLE postgres RESET synchronous_commit");
    sql("ALTER SYSTEM SET fsync = off");
    refused("fsync");
    sql("ALTER SYSTEM RESET fsync");
    Store::open_at(&location, CACHE).expect("a durable server is accepted");
}

/// Two controllers on one database: only the holder of the current lease
/// generation writes. One whose lease expired and was taken over writes
/// nothing, even though its connection and handle are fine; its successor
/// sees everything it committed before, and a standby cannot take a lease
/// that is still renewed.
#[test]
fn only_the_current_lease_generation_commits() {
    use cityplane_controller::store::{Attempt, Lease};
    let Some(pg) = postgres_or_skip("only_the_current_lease_generation_commits") else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let mut first = Lease::connect(&pg.url(), "first").expect("lease");
    let mut second = Lease::connect(&pg.url(), "second").expect("lease");
    let Attempt::Held { generation: g1 } = first.try_acquire().expect("acquire") else {
        panic!("a free lease is taken");
    };
    match second.try_acquire().expect("acquire") {
        Attempt::Busy {
            holder, generation, ..
        } => assert_eq!((holder.as_str(), generation), ("first", g1)),
        held => panic!("a held lease is not taken again: {held:?}"),
    }
    let old = open(&location);
    old.fence_with(g1);
    commit_docs(&old, vec![doc("before", 1)]);
    assert!(first.renew(g1).expect("renew"), "the holder renews");

    // It stops renewing (paused, cut off): the lease runs out.
    pg.psql("UPDATE cityplane_lease SET expires_at = now()")
        .expect("expire");
    let Attempt::Held { generation: g2 } = second.try_acquire().expect("acquire") else {
        panic!("an expired lease is taken");
    };
    assert_eq!(g2, g1 + 1);
    let new = open(&location);
    new.fence_with(g2);
    let err = old
        .commit(&Changes {
            docs: vec![doc("stale", 2)],
            ..Default::default()
        })
        .expect_err("the old generation is fenced");
    assert!(
        matches!(err, StoreError::Fenced { generation, .. } if generation == g1),
        "{err}"
    );
    assert!(
        !first.renew(g1).expect("renew"),
        "a lost lease is not renewed"
    );
    commit_docs(&new, vec![doc("after", 3)]);
    assert_eq!(
        docs(&open(&location)),
        [("after".to_owned(), 3), ("before".to_owned(), 1)],
        "the successor's writes and its predecessor's from before, nothing later"
    );
    // Released at a clean stop: a standby takes it at once.
    second.release(g2).expect("release");
    assert!(matches!(
        first.try_acquire().expect("acquire"),
        Attempt::Held { generation } if generation == g2 + 1
    ));
}

/// A commit is one transaction: when its last statement fails (here a
/// trigger refuses a delete), nothing of it is stored.
#[test]
fn a_postgres_commit_is_one_transaction() {
    let Some(pg) = postgres_or_skip("a_postgres_commit_is_one_transaction") else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let store = open(&location);
    commit_docs(&store, vec![doc("poison", 1)]);
    pg.psql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse BEFORE DELETE ON cityplane_kv FOR EACH ROW \
         WHEN (OLD.key = 'poison'::bytea) EXECUTE FUNCTION refuse()",
    )
    .expect("trigger");
    let err = store
        .commit(&Changes {
            docs: vec![doc("a", 1)],
            devices: vec![device("d1", 1)],
            audit: vec![entry(1, "one")],
            seq: Some(1),
            deleted_docs: vec!["poison".into()],
            ..Default::default()
        })
        .expect_err("the trigger refuses the delete");
    assert!(err.to_string().contains("refused by the test"), "{err}");
    let loaded = open(&location).load().expect("load");
    let names: Vec<&str> = loaded.docs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["poison"], "nothing of the failed commit is stored");
    assert!(loaded.devices.is_empty());
    assert_eq!((loaded.seq, loaded.audit_len), (1, 0));
}

/// While PostgreSQL is down a commit is a clear `Unavailable` error and
/// what memory holds is still answered; once it is back, the same handle
/// connects again by itself and nothing acknowledged is lost.
#[test]
fn a_postgres_outage_is_a_clear_error_and_the_same_handle_recovers() {
    let Some(mut pg) =
        postgres_or_skip("a_postgres_outage_is_a_clear_error_and_the_same_handle_recovers")
    else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let store = open(&location);
    let commit = |seq: u64| {
        store.commit(&Changes {
            devices: vec![device(&format!("d{seq}"), seq)],
            audit: vec![entry(seq, "write")],
            seq: Some(seq),
            ..Default::default()
        })
    };
    for seq in 1..=3 {
        commit(seq).expect("commit");
    }
    pg.stop().expect("stop");
    for _ in 0..2 {
        let err = commit(4).expect_err("no database");
        assert!(err.is_unavailable(), "{err:?}");
        assert!(!err.is_disk_full(), "{err:?}");
        assert!(err.to_string().contains("unavailable"), "{err}");
        assert_eq!(store.recent_audit(10).len(), 3, "memory still answers");
        assert_eq!(store.audit_head().0, 3);
    }
    assert!(store.load().err().is_some_and(|e| e.is_unavailable()));
    pg.start_again().expect("start again");
    commit(4).expect("the same handle commits once the database is back");
    let loaded = store.load().expect("load");
    assert_eq!(
        (loaded.seq, loaded.devices.len(), loaded.audit_len),
        (4, 4, 4)
    );
    store
        .audit_verify()
        .expect("read")
        .expect("an unbroken chain");
}

/// The store is called from tokio workers too (audit queries, secret
/// look-ups): the client's own runtime must never start there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_engine_can_be_called_on_a_tokio_worker() {
    let Some(pg) = postgres_or_skip("the_postgres_engine_can_be_called_on_a_tokio_worker") else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let store = open(&location);
    store
        .commit(&Changes {
            audit: vec![entry(1, "one")],
            ..Default::default()
        })
        .expect("commit on a worker");
    assert_eq!(store.audit_find(|_| true, 5).expect("find").len(), 1);
    assert!(store.secret_slot("d1", "k").expect("read").is_none());
    // Dropped here, on the worker, with its connection.
    drop(store);
}
