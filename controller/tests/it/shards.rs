//! Shard leases and membership on PostgreSQL (`store/shards.rs`, the
//! first step of docs/DESIGN-SHARDING.md): several members split the
//! shards exactly once, a killed member's shards are held again once its
//! leases run out, a joining member takes its share and nothing else
//! moves, and an owner that lost a shard writes none of its devices.
//!
//! Expiry is by the database's clock; instead of waiting the lease's 6 s,
//! the tests expire a member's rows with SQL, which is what the passing of
//! time does to a member that stopped (killed, or paused).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use cityplane_controller::model::DeviceRecord;
use cityplane_controller::shard::{shard_of, DEFAULT_SHARDS};
use cityplane_controller::store::{Changes, ShardKeeper, Store, StoreError, StoreLocation};
use cityplane_testkit::postgres::Postgres;

use crate::common::doc;

fn postgres_or_skip(test: &str) -> Option<Postgres> {
    cityplane_testkit::postgres::available(test)
        .then(|| Postgres::start().expect("PostgreSQL starts"))
}

fn keeper(pg: &Postgres, member: &str) -> ShardKeeper {
    ShardKeeper::connect(&pg.url(), member).expect("keeper connects")
}

/// Rounds of every keeper, each releasing at once what it should give
/// up, until a whole round changes nothing (at most 6).
fn settle(keepers: &mut [&mut ShardKeeper]) {
    for _ in 0..6 {
        let mut changed = false;
        for k in keepers.iter_mut() {
            let round = k.tick().expect("round");
            if !round.give_up.is_empty() {
                k.release(&round.give_up).expect("release");
            }
            changed |=
                !(round.gained.is_empty() && round.give_up.is_empty() && round.lost.is_empty());
        }
        if !changed {
            return;
        }
    }
    panic!("the members did not settle in 6 rounds");
}

/// Shard → holder, from the keepers' own view; panics when two hold one.
fn owners(keepers: &[&ShardKeeper]) -> BTreeMap<u32, String> {
    let mut owners = BTreeMap::new();
    for k in keepers {
        for shard in k.held().keys() {
            if let Some(other) = owners.insert(*shard, k.member().to_owned()) {
                panic!("shard {shard} held by {other} and {}", k.member());
            }
        }
    }
    owners
}

/// Shard → holder of the unexpired lease rows, from the database.
fn stored_owners(pg: &Postgres) -> BTreeMap<u32, String> {
    pg.psql(
        "SELECT substr(name, 7), holder FROM cityplane_lease \
         WHERE name LIKE 'shard-%' AND expires_at > now()",
    )
    .expect("psql")
    .lines()
    .map(|l| {
        let (shard, holder) = l.split_once('|').expect("two columns");
        (shard.parse().expect("shard number"), holder.to_owned())
    })
    .collect()
}

/// What time does to a member that stopped: its heartbeat and its
/// leases run out.
fn expire(pg: &Postgres, member: &str) {
    pg.psql(&format!(
        "UPDATE cityplane_members SET expires_at = now() WHERE member = '{member}'; \
         UPDATE cityplane_lease SET expires_at = now() WHERE holder = '{member}'"
    ))
    .expect("expire");
}

fn all_shards() -> BTreeSet<u32> {
    (0..DEFAULT_SHARDS).collect()
}

#[test]
fn three_members_hold_every_shard_once_and_a_killed_ones_are_held_again_once_they_expire() {
    let Some(pg) = postgres_or_skip(
        "three_members_hold_every_shard_once_and_a_killed_ones_are_held_again_once_they_expire",
    ) else {
        return;
    };
    let (mut a, mut b, mut c) = (keeper(&pg, "a"), keeper(&pg, "b"), keeper(&pg, "c"));
    assert_eq!(a.shards(), DEFAULT_SHARDS, "a new store has the default");
    settle(&mut [&mut a, &mut b, &mut c]);
    let before = owners(&[&a, &b, &c]);
    assert_eq!(
        before.keys().copied().collect::<BTreeSet<_>>(),
        all_shards()
    );
    assert_eq!(stored_owners(&pg), before, "the database agrees");
    for k in [&a, &b, &c] {
        assert!(
            (3..=8).contains(&k.held().len()),
            "{} holds {:?}",
            k.member(),
            k.held()
        );
    }
    let of_c: BTreeSet<u32> = c.held().keys().copied().collect();
    let generations = c.held().clone();

    // Killed: no release, no goodbye. While its heartbeat and leases are
    // current nobody takes its shards.
    drop(c);
    for k in [&mut a, &mut b] {
        let round = k.tick().expect("round");
        assert!(round.gained.is_empty(), "{round:?}");
        assert_eq!(round.members, ["a", "b", "c"]);
    }
    expire(&pg, "c");
    let (ra, rb) = (a.tick().expect("round"), b.tick().expect("round"));
    assert_eq!(ra.members, ["a", "b"]);
    let taken: BTreeSet<u32> = ra.gained.keys().chain(rb.gained.keys()).copied().collect();
    assert_eq!(
        taken, of_c,
        "one round after they expire, c's shards are held again"
    );
    for (shard, g) in ra.gained.iter().chain(&rb.gained) {
        assert_eq!(
            *g,
            generations[shard] + 1,
            "shard {shard}: a new generation"
        );
    }
    let after = owners(&[&a, &b]);
    assert_eq!(after.keys().copied().collect::<BTreeSet<_>>(), all_shards());
    assert_eq!(stored_owners(&pg), after);
    for (shard, owner) in &before {
        if owner != "c" {
            assert_eq!(&after[shard], owner, "shard {shard} stayed where it was");
        }
    }
}

#[test]
fn a_joining_member_takes_its_share_and_nothing_else_moves_and_a_leaving_one_gives_it_back() {
    let Some(pg) = postgres_or_skip(
        "a_joining_member_takes_its_share_and_nothing_else_moves_and_a_leaving_one_gives_it_back",
    ) else {
        return;
    };
    let (mut a, mut b, mut c) = (keeper(&pg, "a"), keeper(&pg, "b"), keeper(&pg, "c"));
    settle(&mut [&mut a, &mut b, &mut c]);
    let three = owners(&[&a, &b, &c]);

    let mut d = keeper(&pg, "d");
    // Its first round: a heartbeat, and nothing free to take yet.
    let first = d.tick().expect("round");
    assert!(first.gained.is_empty(), "{first:?}");
    settle(&mut [&mut a, &mut b, &mut c, &mut d]);
    let four = owners(&[&a, &b, &c, &d]);
    assert_eq!(four.keys().copied().collect::<BTreeSet<_>>(), all_shards());
    assert_eq!(stored_owners(&pg), four);
    let moved: BTreeSet<u32> = (0..DEFAULT_SHARDS)
        .filter(|s| three[s] != four[s])
        .collect();
    let of_d: BTreeSet<u32> = d.held().keys().copied().collect();
    assert_eq!(moved, of_d, "only the shards d took changed owner");
    assert!((2..=7).contains(&of_d.len()), "d took {of_d:?}");

    // A clean stop: released at once, no expiry to wait for.
    d.leave().expect("leave");
    settle(&mut [&mut a, &mut b, &mut c]);
    assert_eq!(owners(&[&a, &b, &c]), three, "back to where they were");
    assert_eq!(stored_owners(&pg), three);
}

/// A member whose rounds wait on something slow (its loop, behind
/// thousands of device messages) renews in between: it keeps its shards
/// and its place, where one that only did rounds would lose both once a
/// lease's time passed. What it loses anyway, its next round reports.
#[test]
fn a_member_that_renews_between_rounds_keeps_its_shards_and_its_next_round_reports_what_it_lost() {
    let Some(pg) = postgres_or_skip(
        "a_member_that_renews_between_rounds_keeps_its_shards_and_its_next_round_reports_what_it_lost",
    ) else {
        return;
    };
    let (mut a, mut b) = (keeper(&pg, "a"), keeper(&pg, "b"));
    settle(&mut [&mut a, &mut b]);
    let two = owners(&[&a, &b]);
    let of_a: BTreeSet<u32> = a.held().keys().copied().collect();
    assert!(!of_a.is_empty());

    // A lease's time passes for a, which only renews meanwhile.
    expire(&pg, "a");
    a.renew().expect("renew");
    let round = b.tick().expect("round");
    assert_eq!(round.members, ["a", "b"], "a is still a member");
    assert!(round.gained.is_empty(), "b took {:?}", round.gained);
    let round = a.tick().expect("round");
    assert!(
        round.lost.is_empty() && round.gained.is_empty(),
        "{round:?}"
    );
    assert_eq!(owners(&[&a, &b]), two);
    assert_eq!(stored_owners(&pg), two);

    // Renewed too late: b took a's shards first. a's renewal finds them
    // gone, and its next round says so.
    expire(&pg, "a");
    let round = b.tick().expect("round");
    assert_eq!(
        round.gained.keys().copied().collect::<BTreeSet<_>>(),
        of_a,
        "b takes a's expired shards"
    );
    a.renew().expect("renew");
    assert!(a.held().is_empty(), "{:?}", a.held());
    let round = a.tick().expect("round");
    assert_eq!(round.lost, of_a, "reported by the round after the renewal");
}

fn device(id: &str, version: u64) -> Arc<DeviceRecord> {
    let mut d = DeviceRecord::new(id);
    d.reported_version = version;
    Arc::new(d)
}

fn commit_device(store: &Store, id: &str, version: u64) -> Result<(), StoreError> {
    store.commit(&Changes {
        devices: vec![device(id, version)],
        ..Default::default()
    })
}

fn stored_version(location: &StoreLocation, id: &str) -> Option<u64> {
    Store::open_at(location, 4 << 20)
        .expect("open")
        .load()
        .expect("load")
        .devices
        .into_iter()
        .find(|d| d.id == id)
        .map(|d| d.reported_version)
}

/// A device id in `shard`.
fn device_in(shard: u32) -> String {
    (0..)
        .map(|i| format!("lamp{i:04}"))
        .find(|id| shard_of(id, DEFAULT_SHARDS) == shard)
        .expect("some id")
}

#[test]
fn an_owner_writes_only_its_shards_devices_and_nothing_once_a_paused_shard_is_taken() {
    let Some(pg) = postgres_or_skip(
        "an_owner_writes_only_its_shards_devices_and_nothing_once_a_paused_shard_is_taken",
    ) else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let (mut a, mut b) = (keeper(&pg, "a"), keeper(&pg, "b"));
    settle(&mut [&mut a, &mut b]);
    let store_a = Store::open_at(&location, 4 << 20).expect("open");
    store_a.fence_shards(a.shards(), a.held().clone());
    let (&mine, &generation) = a.held().iter().next().expect("a holds a shard");
    let theirs = *b.held().keys().next().expect("b holds a shard");
    let (lamp, other) = (device_in(mine), device_in(theirs));

    commit_device(&store_a, &lamp, 1).expect("a writes a device of its shard");
    let err = commit_device(&store_a, &other, 1).expect_err("not a's shard");
    assert!(
        matches!(&err, StoreError::NotHeld { lease, .. } if *lease == format!("shard-{theirs}")),
        "{err}"
    );
    let err = store_a
        .commit(&Changes {
            seq: Some(7),
            ..Default::default()
        })
        .expect_err("a global record needs the leader's lease");
    assert!(
        matches!(&err, StoreError::NotHeld { lease, .. } if lease == "controller"),
        "{err}"
    );
    assert_eq!(stored_version(&location, &other), None, "nothing written");

    // a is paused (SIGSTOP, a frozen VM): its heartbeat and leases run out
    // and b takes its shards. When a wakes up, its commit is fenced.
    expire(&pg, "a");
    let err = commit_device(&store_a, &lamp, 2).expect_err("expired, even before a takeover");
    assert!(matches!(&err, StoreError::Fenced { .. }), "{err}");
    let round = b.tick().expect("round");
    assert_eq!(round.gained.get(&mine), Some(&(generation + 1)));
    let err = commit_device(&store_a, &lamp, 2).expect_err("fenced");
    assert!(
        matches!(&err, StoreError::Fenced { lease, generation: g, .. }
            if *lease == format!("shard-{mine}") && *g == generation),
        "{err}"
    );
    assert_eq!(stored_version(&location, &lamp), Some(1), "a wrote nothing");

    let store_b = Store::open_at(&location, 4 << 20).expect("open");
    store_b.fence_shards(b.shards(), b.held().clone());
    commit_device(&store_b, &lamp, 3).expect("the new owner writes");
    assert_eq!(stored_version(&location, &lamp), Some(3));

    // Awake, a learns it lost them, and (b being live) takes nothing back.
    let round = a.tick().expect("round");
    assert!(round.lost.contains(&mine), "{round:?}");
    assert!(round.gained.is_empty() && a.held().is_empty(), "{round:?}");
}

/// The owners of shards follow what the leader writes: a commit of
/// documents (or organisations, the policy, ...) is heard once it is
/// durable, a commit of device records or compliance samples is not, a
/// refused commit is not, and a listener that lost its connection hears
/// "everything" (what was sent meanwhile is gone).
#[test]
fn a_listener_hears_each_durable_commit_of_global_records_and_everything_after_an_outage() {
    use cityplane_controller::store::{GlobalListener, Heard};
    use std::time::Duration;
    let Some(mut pg) = postgres_or_skip(
        "a_listener_hears_each_durable_commit_of_global_records_and_everything_after_an_outage",
    ) else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let mut listener = GlobalListener::connect(&pg.url()).expect("listener");
    let heard = |l: &mut GlobalListener| l.wait(Duration::from_secs(10)).expect("wait");
    let quiet = |l: &mut GlobalListener| l.wait(Duration::from_millis(200)).expect("wait");
    assert_eq!(heard(&mut listener), Some(Heard::Everything), "at first");
    assert_eq!(quiet(&mut listener), None);

    let store = Store::open_at(&location, 4 << 20).expect("open");
    let trees = |t: &[&str]| Some(Heard::Trees(t.iter().map(|s| (*s).to_owned()).collect()));
    // Not followed: device records, compliance samples, the sequence.
    commit_device(&store, "lamp0001", 1).expect("commit");
    store
        .commit(&Changes {
            governance: vec![("history/city/0000000000000001".into(), Some(b"{}".to_vec()))],
            seq: Some(3),
            ..Default::default()
        })
        .expect("commit");
    // Refused: fenced by a lease nobody holds.
    let fenced = Store::open_at(&location, 4 << 20).expect("open");
    fenced.fence_with(41);
    fenced
        .commit(&Changes {
            docs: vec![doc("refused", 1)],
            ..Default::default()
        })
        .expect_err("fenced");
    store
        .commit(&Changes {
            docs: vec![doc("night", 1)],
            governance: vec![("org/city".into(), Some(b"{}".to_vec()))],
            ..Default::default()
        })
        .expect("commit");
    assert_eq!(
        heard(&mut listener),
        trees(&["docs", "governance"]),
        "only the last commit"
    );
    assert_eq!(quiet(&mut listener), None);

    pg.restart().expect("restart");
    let outage = (0..50).find_map(|_| match listener.wait(Duration::from_millis(200)) {
        Ok(Some(Heard::Everything)) => Some(()),
        Ok(_) | Err(_) => None,
    });
    assert_eq!(
        outage,
        Some(()),
        "a listener that lost its connection rereads everything"
    );
    let store = Store::open_at(&location, 4 << 20).expect("open");
    store
        .commit(&Changes {
            deleted_docs: vec!["night".into()],
            ..Default::default()
        })
        .expect("commit");
    assert_eq!(heard(&mut listener), trees(&["docs"]), "listening again");
}

/// The leader keeps a copy of every device record by reading what
/// changed since its last read. A transaction that started writing before
/// another but commits after it (ids are handed out in one order, commits
/// land in another) is read all the same, and nothing uncommitted is.
#[test]
fn a_follower_reads_every_committed_device_change_whatever_the_commit_order() {
    let Some(pg) = postgres_or_skip(
        "a_follower_reads_every_committed_device_change_whatever_the_commit_order",
    ) else {
        return;
    };
    let location = StoreLocation::Postgres(pg.url());
    let writer = Store::open_at(&location, 4 << 20).expect("open");
    let follower = Store::open_at(&location, 4 << 20).expect("open");
    let versions = |devices: Vec<DeviceRecord>| -> BTreeMap<String, u64> {
        devices
            .into_iter()
            .map(|d| (d.id, d.reported_version))
            .collect()
    };
    let (first, cursor) = follower.device_changes(None).expect("read");
    assert!(first.is_empty());
    commit_device(&writer, "lamp0001", 1).expect("commit");
    commit_device(&writer, "lamp0002", 1).expect("commit");
    let (read, cursor) = follower.device_changes(Some(&cursor)).expect("read");
    assert_eq!(
        versions(read),
        BTreeMap::from([("lamp0001".into(), 1), ("lamp0002".into(), 1)])
    );

    // A slow transaction takes its id now and commits later.
    let late = serde_json::to_string(&*device("lamp-late", 5)).expect("json");
    let slow = {
        let sql = format!(
            "BEGIN; SELECT pg_current_xact_id(); \
             SELECT pg_sleep(3); \
             INSERT INTO cityplane_kv (tree, key, value) \
               VALUES ('devices', 'lamp-late', convert_to('{late}', 'UTF8')); COMMIT;"
        );
        let port = pg.port();
        std::thread::spawn(move || {
            let out = std::process::Command::new(
                std::path::Path::new(cityplane_testkit::postgres::BIN_DIR).join("psql"),
            )
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
            .args([
                "-d",
                "postgres",
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &sql,
            ])
            .output()
            .expect("psql");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        })
    };
    // Wait until it holds its id, then commit after it started.
    for _ in 0..100 {
        let busy = pg
            .psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE backend_xid IS NOT NULL AND query LIKE '%pg_sleep%'",
            )
            .expect("psql");
        if busy == "1" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    commit_device(&writer, "lamp0003", 1).expect("commit");
    let (read, cursor) = follower.device_changes(Some(&cursor)).expect("read");
    assert_eq!(
        versions(read),
        BTreeMap::from([("lamp0003".into(), 1)]),
        "the slow transaction's rows are not committed yet"
    );
    slow.join().expect("the slow transaction");
    commit_device(&writer, "lamp0001", 2).expect("an update");
    let (read, _) = follower.device_changes(Some(&cursor)).expect("read");
    let read = versions(read);
    assert_eq!(
        read.get("lamp-late"),
        Some(&5),
        "committed after a later transaction was read, and read all the same: {read:?}"
    );
    assert_eq!(
        read.get("lamp0001"),
        Some(&2),
        "an updated record: {read:?}"
    );
}

/// Controllers started together on a new database (a deployment's first
/// start) all get in: the schema is made once, not raced. Without the
/// schema's lock, two of three controllers started at once by the
/// cluster bench failed with `duplicate key value violates unique
/// constraint "pg_type_typname_nsp_index"`.
#[test]
fn members_started_together_on_a_new_database_all_get_in() {
    let Some(pg) = postgres_or_skip("members_started_together_on_a_new_database_all_get_in") else {
        return;
    };
    for round in 0..3 {
        // A new database each round (the schema is made at most once per
        // database).
        let db = format!("fresh{round}");
        pg.psql(&format!("CREATE DATABASE {db}"))
            .expect("create database");
        let url = format!("{}/{db}", pg.url().rsplit_once('/').expect("a path").0);
        let start = Arc::new(std::sync::Barrier::new(6));
        let members: Vec<_> = (0..6)
            .map(|i| {
                let (url, start) = (url.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    ShardKeeper::connect(&url, &format!("m{i}")).map(|_| ())
                })
            })
            .collect();
        for (i, m) in members.into_iter().enumerate() {
            let joined = m.join().expect("thread");
            assert!(joined.is_ok(), "round {round}, member {i}: {joined:?}");
        }
    }
}
