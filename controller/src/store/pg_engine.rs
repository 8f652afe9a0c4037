//! The PostgreSQL engine: every tree in one table,
//! `cityplane_kv(tree, key, value)`, and a commit is one transaction that
//! returns once COMMIT has returned. With `synchronous_commit` on (checked
//! at every connection, as is `fsync`), that is after the commit's WAL is
//! flushed on the server.
//!
//! The client is [`PgClient`] (`store/pg_client.rs`), which runs a small
//! tokio runtime of its own inside each call and gives each statement a
//! deadline. Entering a runtime from a
//! tokio worker thread panics, and the store is called from those too
//! (queries of the audit, secret look-ups), so every call into the client,
//! and dropping it, happens on a short-lived thread of its own
//! ([`off_runtime`]); it borrows the caller's data and is joined before
//! the call returns, so for the caller the store stays an ordinary
//! blocking call, as on sled.
//!
//! No TLS: the database is meant to be reached over loopback or a unix
//! socket (`postgres://user@%2Frun%2Fpostgresql/db`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::pg_client::{take_timeout, IsolationLevel, PgClient, PgError};
use super::{redact_url, rotated_slots, Op, Record, StoreError, Tree, Visit, Walk};

/// Bumped by a change of the table layout; a database written by a newer
/// cityplane is refused rather than misread. Version 2 added the lease
/// (`cityplane_lease`, see `store/lease.rs`): a version-1 cityplane would
/// write unfenced beside a controller that holds it, so it is refused.
/// Version 3 added shards (`cityplane_schema.shards`, the members table,
/// see `store/shards.rs`): a version-2 cityplane would take the
/// `controller` lease and write every device beside the shards' owners.
const SCHEMA_VERSION: i32 = 3;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS cityplane_kv (
        tree  text  NOT NULL,
        key   bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (tree, key)
    );
    CREATE TABLE IF NOT EXISTS cityplane_schema (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        version  integer NOT NULL
    );
    -- The transaction that last wrote the row: what a follower reads
    -- changes by (`PgEngine::changes`).
    ALTER TABLE cityplane_kv ADD COLUMN IF NOT EXISTS
        xid xid8 NOT NULL DEFAULT pg_current_xact_id();
    CREATE INDEX IF NOT EXISTS cityplane_kv_changes ON cityplane_kv (tree, xid);
    ALTER TABLE cityplane_schema ADD COLUMN IF NOT EXISTS
        shards integer NOT NULL DEFAULT 16 CHECK (shards BETWEEN 1 AND 1024);
    CREATE TABLE IF NOT EXISTS cityplane_members (
        member     text        PRIMARY KEY,
        expires_at timestamptz NOT NULL
    );
    ALTER TABLE cityplane_members ADD COLUMN IF NOT EXISTS counters jsonb;
    CREATE TABLE IF NOT EXISTS cityplane_lease (
        name       text        PRIMARY KEY,
        holder     text        NOT NULL,
        generation bigint      NOT NULL,
        expires_at timestamptz NOT NULL
    );";

/// Records read per round trip when walking a tree: a walk that stops
/// early (the newest audit entries) reads little, a whole tree is not
/// held twice in memory.
const PAGE: i64 = 1000;

/// Bytes of values per upsert statement: one statement per commit for
/// small commits, bounded messages for 100,000 device records.
const CHUNK_BYTES: usize = 8 << 20;

pub(super) struct PgEngine {
    /// Redacted, for errors.
    store: String,
    /// `Some` until dropped (dropped on a thread of its own, see the module).
    client: Option<PgClient>,
}

/// Connects to `url`: its redacted form (for errors) and the client.
/// The advisory lock the schema check holds (a constant of ours:
/// "cityplan" in ASCII).
const SCHEMA_LOCK: i64 = 0x6369_7479_706c_616e;

pub(super) fn connect(url: &str) -> Result<(String, PgClient), StoreError> {
    let store = redact_url(url);
    let refused = |reason: String| StoreError::Refused {
        store: store.clone(),
        reason,
    };
    let (url, timeout) = take_timeout(url).map_err(refused)?;
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| refused(format!("not a PostgreSQL URL: {e}")))?;
    // A database that does not answer is unavailable, not a hang of
    // every commit (the deadline of each statement, and these);
    // keepalives notice a peer that vanished under a connection that only
    // waits (the listener's): 30 s idle, then 3 probes 10 s apart.
    // A controller paused (or stuck) inside a commit would hold the lease
    // row FOR SHARE for ever, and no standby could take over: the server
    // ends a session idle in a transaction before the lease expires, and
    // the paused one finds its connection gone (then fenced) when it wakes.
    let options = session_options(config.get_options());
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives_idle(Duration::from_secs(30))
        .keepalives_interval(Duration::from_secs(10))
        .keepalives_retries(3)
        .options(&options)
        .application_name("cityplane");
    let client = off_runtime(|| PgClient::connect(&config, timeout))
        .map_err(|e| pg_error(&store, "connect", e))?;
    Ok((store, client))
}

/// The server settings each session starts with: the URL's own
/// `options=` first (a `search_path`, say), then ours, so that where both
/// set one, ours holds (PostgreSQL takes the last): the idle-in-transaction
/// limit is what lets a standby take the lease from a paused controller.
/// Every connection makes sure of the schema (CREATE ... IF NOT EXISTS):
/// its NOTICEs, a dozen per connection, are not news.
fn session_options(theirs: Option<&str>) -> String {
    const OURS: &str = "-c idle_in_transaction_session_timeout=4000 -c client_min_messages=warning";
    match theirs.map(str::trim) {
        Some(theirs) if !theirs.is_empty() => format!("{theirs} {OURS}"),
        _ => OURS.to_owned(),
    }
}

/// Runs `f` on a thread of its own and waits for it (see the module's
/// doc): the client's runtime never starts on a tokio worker.
pub(super) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

impl PgEngine {
    pub(super) fn open(url: &str) -> Result<PgEngine, StoreError> {
        let (store, client) = connect(url)?;
        let mut engine = PgEngine {
            store,
            client: Some(client),
        };
        engine.check_durable()?;
        engine.create_schema()?;
        Ok(engine)
    }

    /// The connection, schema checked, for a caller that keeps its own
    /// (the lease's, `store/lease.rs`): one connection, not a second.
    pub(super) fn into_client(mut self) -> Option<PgClient> {
        self.client.take()
    }

    /// Refuses a server that acknowledges commits it could lose in a
    /// crash: `fsync=off` loses them outright, `synchronous_commit=off`
    /// answers COMMIT before the WAL is flushed.
    fn check_durable(&mut self) -> Result<(), StoreError> {
        for setting in ["fsync", "synchronous_commit"] {
            let value: String = self.call("settings", |c| {
                c.query_one(&format!("SHOW {setting}"), &[])
                    .map(|row| row.get(0))
            })?;
            if value == "off" {
                return Err(StoreError::Refused {
                    store: self.store.clone(),
                    reason: format!(
                        "the server runs with {setting}=off, so an acknowledged write could \
                         be lost in a crash; set {setting}=on (postgresql.conf, or ALTER \
                         ROLE/DATABASE … SET {setting} = on) and start again"
                    ),
                });
            }
        }
        Ok(())
    }

    fn create_schema(&mut self) -> Result<(), StoreError> {
        let version: i32 = self.call("schema", |c| {
            let mut tx = c.transaction()?;
            // Controllers started together on a new database would race
            // their CREATE ... IF NOT EXISTS, and all but one fail on the
            // catalog's unique index: one at a time, until commit.
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])?;
            tx.batch_execute(SCHEMA)?;
            tx.execute(
                "INSERT INTO cityplane_schema (version) VALUES ($1) ON CONFLICT DO NOTHING",
                &[&SCHEMA_VERSION],
            )?;
            // Version 1's tables are a subset of this one's.
            tx.execute(
                "UPDATE cityplane_schema SET version = $1 WHERE version < $1",
                &[&SCHEMA_VERSION],
            )?;
            let version = tx
                .query_one("SELECT version FROM cityplane_schema", &[])?
                .get(0);
            tx.commit()?;
            Ok(version)
        })?;
        if version > SCHEMA_VERSION {
            return Err(StoreError::Refused {
                store: self.store.clone(),
                reason: format!(
                    "the database holds schema version {version}, written by a newer \
                     cityplane (this one knows {SCHEMA_VERSION})"
                ),
            });
        }
        Ok(())
    }

    /// Runs `f` on the client off the runtime; its error says what failed.
    fn call<T: Send>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut PgClient) -> Result<T, PgError> + Send,
    ) -> Result<T, StoreError> {
        let Some(client) = self.client.as_mut() else {
            return Err(StoreError::Unavailable {
                store: self.store.clone(),
                reason: "no connection".into(),
            });
        };
        off_runtime(|| f(client)).map_err(|e| pg_error(&self.store, what, e))
    }

    pub(super) fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.call("read", |c| {
            c.query_opt(
                "SELECT value FROM cityplane_kv WHERE tree = $1 AND key = $2",
                &[&tree.name(), &key],
            )
            .map(|row| row.map(|r| r.get(0)))
        })
    }

    pub(super) fn len(&mut self, tree: Tree) -> Result<usize, StoreError> {
        let n: i64 = self.call("count", |c| {
            c.query_one(
                "SELECT count(*) FROM cityplane_kv WHERE tree = $1",
                &[&tree.name()],
            )
            .map(|r| r.get(0))
        })?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// A page at a time, each after the last key seen (keyset
    /// pagination): `visit` runs on the caller's thread, between pages.
    pub(super) fn walk(
        &mut self,
        tree: Tree,
        walk: Walk<'_>,
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page: Vec<(Vec<u8>, Vec<u8>)> = self.call("read", |c| {
                let rows = match (walk, &after) {
                    (Walk::From(from), None) => c.query(
                        "SELECT key, value FROM cityplane_kv WHERE tree = $1 AND key >= $2 \
                         ORDER BY key LIMIT $3",
                        &[&tree.name(), &from, &PAGE],
                    ),
                    (Walk::From(_), Some(last)) => c.query(
                        "SELECT key, value FROM cityplane_kv WHERE tree = $1 AND key > $2 \
                         ORDER BY key LIMIT $3",
                        &[&tree.name(), last, &PAGE],
                    ),
                    (Walk::Back, None) => c.query(
                        "SELECT key, value FROM cityplane_kv WHERE tree = $1 \
                         ORDER BY key DESC LIMIT $2",
                        &[&tree.name(), &PAGE],
                    ),
                    (Walk::Back, Some(last)) => c.query(
                        "SELECT key, value FROM cityplane_kv WHERE tree = $1 AND key < $2 \
                         ORDER BY key DESC LIMIT $3",
                        &[&tree.name(), last, &PAGE],
                    ),
                }?;
                Ok(rows.into_iter().map(|r| (r.get(0), r.get(1))).collect())
            })?;
            let full = page.len() as i64 == PAGE;
            for (k, v) in &page {
                if !visit(k, v)? {
                    return Ok(());
                }
            }
            match page.into_iter().last() {
                Some((k, _)) if full => after = Some(k),
                _ => return Ok(()),
            }
        }
    }

    /// The records of `tree` written since `since` (`None`: all of them),
    /// and the cursor to ask with next time.
    ///
    /// Why not "the largest transaction id seen": ids are handed out when
    /// a transaction starts writing and commits come in any order, so a
    /// transaction with a smaller id may commit after one already read.
    /// The cursor is the xmin of the snapshot read with: every transaction
    /// below it had ended when the snapshot was taken, so its rows were
    /// read then; those at or above it are read (again) next time. A row
    /// may come twice, never not at all.
    pub(super) fn changes(
        &mut self,
        tree: Tree,
        since: Option<&str>,
    ) -> Result<(Vec<Record>, String), StoreError> {
        let since = since.unwrap_or("0").to_owned();
        self.call("changes", move |c| {
            let mut tx = c.read_only_transaction(IsolationLevel::RepeatableRead)?;
            let cursor: String = tx
                .query_one("SELECT pg_snapshot_xmin(pg_current_snapshot())::text", &[])?
                .get(0);
            let mut out: Vec<Record> = Vec::new();
            loop {
                let after = out.last().map(|(k, _)| k.clone()).unwrap_or_default();
                let page = tx.query(
                    "SELECT key, value FROM cityplane_kv \
                     WHERE tree = $1 AND xid >= $2::text::xid8 AND key > $3 \
                     ORDER BY key LIMIT $4",
                    &[&tree.name(), &since, &after, &PAGE],
                )?;
                let full = page.len() as i64 == PAGE;
                out.extend(page.into_iter().map(|r| (r.get(0), r.get(1))));
                if !full {
                    break;
                }
            }
            tx.commit()?;
            Ok((out, cursor))
        })
    }

    /// With `fence`, the commit happens only while each of those leases
    /// is held at that generation and unexpired (the database's clock):
    /// the rows are read FOR SHARE, so a takeover waits for this commit and
    /// a controller that lost a lease writes nothing.
    pub(super) fn apply(
        &mut self,
        fence: &[(String, i64)],
        rotations: &[crate::secrets::Rotation],
        ops: &[Op<'_>],
    ) -> Result<(), StoreError> {
        let lost = self.call("commit", |c| {
            let mut tx = c.transaction()?;
            if !fence.is_empty() {
                let (names, generations): (Vec<&str>, Vec<i64>) =
                    fence.iter().map(|(n, g)| (n.as_str(), *g)).unzip();
                let held: Vec<String> = tx
                    .query(
                        "SELECT l.name FROM cityplane_lease l \
                         JOIN unnest($1::text[], $2::int8[]) AS f(name, generation) \
                           ON l.name = f.name AND l.generation = f.generation \
                         WHERE l.expires_at > now() FOR SHARE OF l",
                        &[&names, &generations],
                    )?
                    .into_iter()
                    .map(|r| r.get(0))
                    .collect();
                if let Some(lost) = fence.iter().find(|(n, _)| !held.contains(n)) {
                    return Ok(Some(lost.clone()));
                }
            }
            let slots = if rotations.is_empty() {
                Vec::new()
            } else {
                let keys: Vec<Vec<u8>> = rotations
                    .iter()
                    .map(|r| crate::secrets::slot_key(&r.device, &r.name))
                    .collect();
                // FOR UPDATE: a rotation builds on the slot as stored.
                let stored: BTreeMap<Vec<u8>, Vec<u8>> = tx
                    .query(
                        "SELECT key, value FROM cityplane_kv WHERE tree = $1 AND key = ANY($2) \
                         FOR UPDATE",
                        &[&Tree::Secrets.name(), &keys],
                    )?
                    .into_iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                rotated_slots(rotations, |k| {
                    Ok::<_, PgError>(stored.get(k).cloned())
                })?
            };
            // A key may be written twice in one commit (a document put
            // back, then written again): the last write wins, as on sled.
            // One statement cannot touch a row twice, so writes are merged
            // first.
            let mut last: BTreeMap<(Tree, &[u8]), Option<&[u8]>> = BTreeMap::new();
            for (k, v) in &slots {
                last.insert((Tree::Secrets, k.as_slice()), Some(v.as_slice()));
            }
            for (tree, k, v) in ops {
                last.insert((*tree, *k), *v);
            }
            let (puts, deletes): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, v)| v.is_some());
            let mut puts = puts.into_iter().peekable();
            while puts.peek().is_some() {
                let (mut trees, mut keys, mut values) = (Vec::new(), Vec::new(), Vec::new());
                let mut bytes = 0;
                while let Some(((tree, k), v)) = puts.next_if(|_| bytes < CHUNK_BYTES) {
                    let v = v.unwrap_or_default();
                    bytes += k.len() + v.len();
                    trees.push(tree.name());
                    keys.push(k);
                    values.push(v);
                }
                tx.execute(
                    "INSERT INTO cityplane_kv (tree, key, value) \
                     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
                     ON CONFLICT (tree, key) DO UPDATE SET value = excluded.value, \
                       xid = pg_current_xact_id()",
                    &[&trees, &keys, &values],
                )?;
            }
            if !deletes.is_empty() {
                let trees: Vec<&str> = deletes.iter().map(|((t, _), _)| t.name()).collect();
                let keys: Vec<&[u8]> = deletes.iter().map(|((_, k), _)| *k).collect();
                tx.execute(
                    "DELETE FROM cityplane_kv USING unnest($1::text[], $2::bytea[]) AS d(tree, key) \
                     WHERE cityplane_kv.tree = d.tree AND cityplane_kv.key = d.key",
                    &[&trees, &keys],
                )?;
            }
            // Delivered at COMMIT, to listeners only if it commits.
            if let Some(payload) = global_change(ops) {
                tx.execute("SELECT pg_notify($1, $2)", &[&GLOBAL_CHANNEL, &payload])?;
            }
            // Returns once the server says COMMIT, i.e. (synchronous_commit
            // on) once the WAL holding it is flushed.
            tx.commit().map(|()| None)
        })?;
        match lost {
            None => Ok(()),
            Some((lease, generation)) => Err(StoreError::Fenced {
                store: self.store.clone(),
                lease,
                generation,
            }),
        }
    }
}

/// The channel a commit of global records notifies (`store/listen.rs`).
pub(super) const GLOBAL_CHANNEL: &str = "cityplane_global";

/// The notification for a commit of `ops`: the global trees it writes
/// (those every shard's owner follows), comma-separated; `None` when it
/// writes none. Device records, secrets, the audit log, the sequence and
/// compliance samples are not followed.
fn global_change(ops: &[Op<'_>]) -> Option<String> {
    let trees: std::collections::BTreeSet<&str> = ops
        .iter()
        .filter(|(tree, key, _)| match tree {
            Tree::Docs | Tree::Rollouts | Tree::Releases | Tree::Intents => true,
            Tree::Governance => !key.starts_with(b"history/"),
            Tree::Devices | Tree::Secrets | Tree::Audit | Tree::Meta => false,
        })
        .map(|(tree, _, _)| tree.name())
        .collect();
    (!trees.is_empty()).then(|| trees.into_iter().collect::<Vec<_>>().join(","))
}

impl Drop for PgEngine {
    fn drop(&mut self) {
        // The client owns a runtime, which must not be dropped on a tokio
        // worker either.
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// Connection trouble is [`StoreError::Unavailable`] (retried, like a full
/// disk); what the server refused is [`StoreError::Database`] with its
/// SQLSTATE. Messages go through [`redact_url`]: a connection error may
/// quote what it was given.
pub(super) fn pg_error(store: &str, what: &str, e: PgError) -> StoreError {
    let unavailable = |reason: String| StoreError::Unavailable {
        store: store.to_owned(),
        reason: redact_url(&format!("{what}: {reason}")),
    };
    let PgError::Pg(e) = e else {
        return unavailable(e.to_string());
    };
    let Some(db) = e.as_db_error() else {
        return unavailable(e.to_string());
    };
    let code = db.code().code();
    // 08: connection exception; 57P01-03: the server is shutting down,
    // crashed or starting; 53300: too many connections.
    if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300") {
        return unavailable(db.message().to_owned());
    }
    StoreError::Database {
        store: store.to_owned(),
        code: code.to_owned(),
        message: redact_url(&format!("{what}: {}", db.message())),
    }
}
