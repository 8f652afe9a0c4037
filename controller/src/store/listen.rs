//! Following the global records another controller writes (sharded: the
//! leader writes documents, rollouts, releases and governance; every
//! shard's owner follows them for its devices, docs/DESIGN-SHARDING.md).
//! A commit that writes one of those trees notifies `cityplane_global`
//! in its own transaction (`pg_engine::global_change`), so a listener
//! hears of it only once it is durable. A listener that was not listening
//! (at first, and after its connection was lost) hears
//! [`Heard::Everything`]: notifications sent meanwhile are gone, so it
//! reads everything again.

use std::collections::BTreeSet;
use std::time::Duration;

use super::lease::Conn;
use super::pg_engine::GLOBAL_CHANNEL;
use super::StoreError;

/// What changed since the last [`GlobalListener::wait`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// These trees (`docs`, `rollouts`, `releases`, `governance`,
    /// `intents`).
    Trees(BTreeSet<String>),
    /// Anything may have: read every global record again.
    Everything,
}

/// A connection of its own that `LISTEN`s on `cityplane_global`.
pub struct GlobalListener {
    conn: Conn,
    listening: bool,
}

impl GlobalListener {
    pub fn connect(url: &str) -> Result<GlobalListener, StoreError> {
        Ok(GlobalListener {
            conn: Conn::open(url)?,
            listening: false,
        })
    }

    /// Waits up to `timeout` for commits of global records; `Ok(None)`:
    /// none. Blocking (run it off the event loop). After an error (the
    /// database out of reach) the next call connects again and answers
    /// [`Heard::Everything`].
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<Heard>, StoreError> {
        if !(self.listening && self.conn.is_connected()) {
            self.conn.call("listen", |c| {
                c.batch_execute(&format!("LISTEN {GLOBAL_CHANNEL}"))
            })?;
            self.listening = true;
            return Ok(Some(Heard::Everything));
        }
        let payloads: Vec<String> = self
            .conn
            .call("notifications", move |c| c.notifications(timeout))?;
        let trees: BTreeSet<String> = payloads
            .iter()
            .flat_map(|p| p.split(','))
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
        Ok((!trees.is_empty()).then_some(Heard::Trees(trees)))
    }
}
