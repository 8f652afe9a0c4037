//! The lease that lets several controllers share one PostgreSQL store with
//! exactly one of them acting (active/standby): a row of
//! `cityplane_lease` names the holder, a generation and an expiry, all
//! judged by the database's clock (no two machines' clocks compared).
//!
//! - Taking it: only when it has expired (or was released); the generation
//!   goes up by one. A controller loads the store only after taking it, so
//!   it sees everything its predecessor committed.
//! - Keeping it: the holder renews it well before it expires, on a
//!   connection of its own (a long commit does not delay a renewal).
//! - Fencing: every commit of the holder's store checks, in its own
//!   transaction, that its generation is current and unexpired
//!   (`PgEngine::apply`, `Store::fence_with`). A controller that was
//!   paused, cut off or merely slow past the expiry writes nothing once a
//!   successor has taken over, and the successor's takeover waits for a
//!   commit already under way.
//!
//! Why a row and not `pg_try_advisory_lock`: a session lock stays held by
//! a process that is stopped (SIGSTOP, a frozen VM) but whose connection
//! lives, so nobody could take over; an expiry frees it, and the
//! generation keeps the stopped one from writing when it wakes up.

use std::time::Duration;

use super::pg_client::{PgClient, PgError};
use super::pg_engine::{connect, off_runtime, pg_error};
use super::StoreError;

/// The lease's row: one for the whole fleet; once sharded, the leader's
/// (each shard has a row of its own, see `store/shards.rs`).
pub(super) const LEASE: &str = "controller";

/// How long a lease lasts unless renewed.
pub const TTL: Duration = Duration::from_secs(6);
/// How often the holder renews it: three tries before it expires.
pub const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often a standby asks again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The outcome of [`Lease::try_acquire`].
#[derive(Debug, Clone, PartialEq)]
pub enum Attempt {
    /// Taken, with this generation: fence the store with it.
    Held { generation: i64 },
    /// Another holder's, valid for about this long still.
    Busy {
        holder: String,
        generation: i64,
        expires_in: Duration,
    },
}

/// A connection to the store's database of its own, kept apart from the
/// store's (a long commit does not delay a renewal), connected again at
/// the next call after an error.
pub(super) struct Conn {
    /// Redacted, for errors.
    store: String,
    url: String,
    /// `None` after an error.
    client: Option<PgClient>,
}

impl Conn {
    /// Connects; creates the tables if the store is new.
    pub(super) fn open(url: &str) -> Result<Conn, StoreError> {
        // Opening the engine creates (or checks) the schema; its
        // connection is then this one's.
        let client = super::pg_engine::PgEngine::open(url)?.into_client();
        let mut conn = Conn {
            store: super::redact_url(url),
            url: url.to_owned(),
            client,
        };
        conn.client()?;
        Ok(conn)
    }

    /// False after an error dropped the connection (until the next call).
    pub(super) fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    fn client(&mut self) -> Result<&mut PgClient, StoreError> {
        if self.client.is_none() {
            self.client = Some(connect(&self.url)?.1);
        }
        self.client.as_mut().ok_or_else(|| StoreError::Unavailable {
            store: self.store.clone(),
            reason: "no connection".into(),
        })
    }

    /// Runs `f` off the runtime; after an error the connection is dropped.
    pub(super) fn call<T: Send>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut PgClient) -> Result<T, PgError> + Send,
    ) -> Result<T, StoreError> {
        let store = self.store.clone();
        let client = self.client()?;
        let result = off_runtime(|| f(client)).map_err(|e| pg_error(&store, what, e));
        if result.is_err() {
            if let Some(client) = self.client.take() {
                off_runtime(move || drop(client));
            }
        }
        result
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            off_runtime(move || drop(client));
        }
    }
}

/// A connection to the store's database for the lease alone.
pub struct Lease {
    holder: String,
    conn: Conn,
}

impl Lease {
    /// Connects as `holder` (a name unique to this process: it is shown
    /// to the others while it holds the lease). Creates the tables if the
    /// store is new.
    pub fn connect(url: &str, holder: &str) -> Result<Lease, StoreError> {
        Ok(Lease {
            holder: holder.to_owned(),
            conn: Conn::open(url)?,
        })
    }

    fn call<T: Send>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut PgClient) -> Result<T, PgError> + Send,
    ) -> Result<T, StoreError> {
        self.conn.call(what, f)
    }

    /// Takes the lease if it is free or has expired.
    pub fn try_acquire(&mut self) -> Result<Attempt, StoreError> {
        let holder = self.holder.clone();
        let ttl = TTL.as_secs_f64();
        self.call("lease", move |c| {
            let taken = c.query_opt(
                "INSERT INTO cityplane_lease AS l (name, holder, generation, expires_at) \
                 VALUES ($1, $2, 1, now() + make_interval(secs => $3)) \
                 ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                   generation = l.generation + 1, expires_at = excluded.expires_at \
                 WHERE l.expires_at <= now() \
                 RETURNING generation",
                &[&LEASE, &holder, &ttl],
            )?;
            if let Some(row) = taken {
                return Ok(Attempt::Held {
                    generation: row.get(0),
                });
            }
            let row = c.query_one(
                "SELECT holder, generation, \
                   greatest(extract(epoch FROM expires_at - now()), 0)::float8 \
                 FROM cityplane_lease WHERE name = $1",
                &[&LEASE],
            )?;
            Ok(Attempt::Busy {
                holder: row.get(0),
                generation: row.get(1),
                expires_in: Duration::from_secs_f64(row.get(2)),
            })
        })
    }

    /// Extends `generation`'s lease. `Ok(false)`: it is no longer this
    /// one's (someone took over); stop acting. Renewing after an expiry
    /// that nobody used is allowed: the generation proves nobody wrote
    /// meanwhile.
    pub fn renew(&mut self, generation: i64) -> Result<bool, StoreError> {
        let ttl = TTL.as_secs_f64();
        self.call("lease renewal", move |c| {
            c.execute(
                "UPDATE cityplane_lease SET expires_at = now() + make_interval(secs => $3) \
                 WHERE name = $1 AND generation = $2",
                &[&LEASE, &generation, &ttl],
            )
            .map(|n| n == 1)
        })
    }

    /// Gives `generation`'s lease up at once, so a standby takes over
    /// without waiting for it to expire (a clean shutdown).
    pub fn release(&mut self, generation: i64) -> Result<(), StoreError> {
        self.call("lease release", move |c| {
            c.execute(
                "UPDATE cityplane_lease SET expires_at = now() \
                 WHERE name = $1 AND generation = $2",
                &[&LEASE, &generation],
            )
            .map(|_| ())
        })
    }
}
