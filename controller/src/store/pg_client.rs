//! A blocking PostgreSQL client whose every round trip has a deadline.
//!
//! The `postgres` crate (tokio-postgres behind a small runtime of its
//! own) waits for an answer for ever: a server that accepts connections
//! and then stops answering (stopped, its disk hung, a link that drops
//! packets without a reset) would hold a commit, and every controller
//! call queued behind the store's lock, until someone restarts it. This is
//! the same arrangement (one current-thread runtime per connection, driven
//! only while a call waits) with `tokio::time::timeout` around each
//! statement and around the connection's start-up: past the deadline the
//! call fails, the caller drops the connection (the store then answers
//! "unavailable", as when the server is down) and the next call connects
//! afresh. The deadline is the URL's `socket_timeout` (seconds, as JDBC's
//! socketTimeout), [`DEFAULT_TIMEOUT`] when not given.
//!
//! A COMMIT that passes its deadline may still have committed on the
//! server: the caller was not told it did, so nothing it acknowledged is
//! at stake; what it retries is idempotent (records are written whole).

use std::future::Future;
use std::time::Duration;

use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, NoTls};

pub(super) use tokio_postgres::{IsolationLevel, Row};

/// How long a statement may wait for the server's answer when the URL
/// says nothing: longer than any statement a controller sends takes on a
/// healthy server (an upsert of 8 MiB of records), short enough that a
/// hung database shows as unavailable within the minute.
pub(super) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The URL parameter that sets the deadline (ours: PostgreSQL's own
/// parsers do not know it, so it is taken out before they see the URL).
pub(super) const TIMEOUT_PARAM: &str = "socket_timeout";

#[derive(Debug, thiserror::Error)]
pub(super) enum PgError {
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    #[error(
        "the database did not answer within {} s ({TIMEOUT_PARAM} in the store URL)",
        .0.as_secs_f64()
    )]
    NoAnswer(Duration),
    #[error("the connection is closed")]
    Closed,
    #[error("cannot start the client's runtime: {0}")]
    Runtime(std::io::Error),
}

pub(super) struct PgClient {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
    /// Payloads of the notifications of the channels it listens to.
    notifications: tokio::sync::mpsc::UnboundedReceiver<String>,
    timeout: Option<Duration>,
}

/// `fut` driven to its end on `runtime`, or [`PgError::NoAnswer`] past
/// `timeout` (`None`: no limit).
fn within<F: Future>(
    runtime: &tokio::runtime::Runtime,
    timeout: Option<Duration>,
    fut: F,
) -> Result<F::Output, PgError> {
    match timeout {
        None => Ok(runtime.block_on(fut)),
        // Inside the async block: the timer is made in the runtime's context.
        Some(limit) => runtime
            .block_on(async move { tokio::time::timeout(limit, fut).await })
            .map_err(|_| PgError::NoAnswer(limit)),
    }
}

/// The statements a client and a transaction both run, each within the
/// deadline; `$handle` is the field holding tokio-postgres' own.
macro_rules! statements {
    ($handle:ident) => {
        pub(super) fn query(
            &mut self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Vec<Row>, PgError> {
            Ok(within(
                &self.runtime,
                self.timeout,
                self.$handle.query(sql, params),
            )??)
        }

        pub(super) fn query_one(
            &mut self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<Row, PgError> {
            Ok(within(
                &self.runtime,
                self.timeout,
                self.$handle.query_one(sql, params),
            )??)
        }

        pub(super) fn execute(
            &mut self,
            sql: &str,
            params: &[&(dyn ToSql + Sync)],
        ) -> Result<u64, PgError> {
            Ok(within(
                &self.runtime,
                self.timeout,
                self.$handle.execute(sql, params),
            )??)
        }

        pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), PgError> {
            Ok(within(
                &self.runtime,
                self.timeout,
                self.$handle.batch_execute(sql),
            )??)
        }
    };
}

impl PgClient {
    pub(super) fn connect(
        config: &tokio_postgres::Config,
        timeout: Option<Duration>,
    ) -> Result<PgClient, PgError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(PgError::Runtime)?;
        let (client, mut connection) = within(&runtime, timeout, config.connect(NoTls))??;
        let (tx, notifications) = tokio::sync::mpsc::unbounded_channel();
        // The connection's half: it runs while a call waits on the runtime.
        // Polled as a future it would drop notifications; they are kept.
        runtime.spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        let _ = tx.send(n.payload().to_owned());
                    }
                    Some(Ok(AsyncMessage::Notice(notice))) => {
                        tracing::info!(
                            severity = notice.severity(),
                            "PostgreSQL: {}",
                            notice.message()
                        );
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "PostgreSQL connection ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(PgClient {
            runtime,
            client,
            notifications,
            timeout,
        })
    }

    statements!(client);

    pub(super) fn query_opt(
        &mut self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, PgError> {
        Ok(within(
            &self.runtime,
            self.timeout,
            self.client.query_opt(sql, params),
        )??)
    }

    pub(super) fn transaction(&mut self) -> Result<PgTx<'_>, PgError> {
        let tx = within(&self.runtime, self.timeout, self.client.transaction())??;
        Ok(PgTx {
            runtime: &self.runtime,
            timeout: self.timeout,
            tx,
        })
    }

    /// A read-only transaction at `isolation`.
    pub(super) fn read_only_transaction(
        &mut self,
        isolation: IsolationLevel,
    ) -> Result<PgTx<'_>, PgError> {
        let start = self
            .client
            .build_transaction()
            .isolation_level(isolation)
            .read_only(true)
            .start();
        let tx = within(&self.runtime, self.timeout, start)??;
        Ok(PgTx {
            runtime: &self.runtime,
            timeout: self.timeout,
            tx,
        })
    }

    /// Waits up to `wait` for a notification (none if one is already
    /// queued), then takes every payload queued; empty if none came.
    pub(super) fn notifications(&mut self, wait: Duration) -> Result<Vec<String>, PgError> {
        let mut payloads = Vec::new();
        let received = &mut self.notifications;
        // A notification is read by the connection's task, which runs only
        // while this waits.
        let first = self
            .runtime
            .block_on(async move { tokio::time::timeout(wait, received.recv()).await });
        match first {
            Err(_) => return Ok(payloads),
            Ok(None) => return Err(PgError::Closed),
            Ok(Some(p)) => payloads.push(p),
        }
        while let Ok(p) = self.notifications.try_recv() {
            payloads.push(p);
        }
        Ok(payloads)
    }
}

/// A transaction of a [`PgClient`], with the same deadline per statement.
/// Dropped without [`PgTx::commit`], it is rolled back.
pub(super) struct PgTx<'a> {
    runtime: &'a tokio::runtime::Runtime,
    timeout: Option<Duration>,
    tx: tokio_postgres::Transaction<'a>,
}

impl PgTx<'_> {
    statements!(tx);

    pub(super) fn commit(self) -> Result<(), PgError> {
        Ok(within(self.runtime, self.timeout, self.tx.commit())??)
    }
}

/// `url` without our own [`TIMEOUT_PARAM`], and the deadline it sets:
/// `Ok(None)` for `0` (no deadline), [`DEFAULT_TIMEOUT`] when absent.
/// Both of PostgreSQL's forms: `postgres://…?socket_timeout=10&…` and
/// `host=… socket_timeout=10`.
pub(super) fn take_timeout(url: &str) -> Result<(String, Option<Duration>), String> {
    let mut value = None;
    // The `key=value` parts other than ours; ours goes to `value`.
    fn others<'a>(
        parts: impl Iterator<Item = &'a str>,
        value: &mut Option<String>,
    ) -> Vec<&'a str> {
        parts
            .filter(|kv| match kv.split_once('=') {
                Some((k, v)) if k.trim() == TIMEOUT_PARAM => {
                    *value = Some(v.to_owned());
                    false
                }
                _ => true,
            })
            .collect()
    }
    // The form first: a `?` may be part of a key=value form's password.
    let rest = if !url.contains("://") {
        others(url.split(' '), &mut value).join(" ")
    } else if let Some((base, query)) = url.split_once('?') {
        let kept = others(query.split('&'), &mut value);
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        url.to_owned()
    };
    let timeout = match value {
        None => Some(DEFAULT_TIMEOUT),
        Some(v) => {
            let secs: f64 = v
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
                .ok_or_else(|| {
                    format!(
                        "{TIMEOUT_PARAM}={v}: expected seconds from 0 (no limit) to 86400, \
                         such as {TIMEOUT_PARAM}=30"
                    )
                })?;
            (secs > 0.0).then(|| Duration::from_secs_f64(secs))
        }
    };
    Ok((rest, timeout))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_is_taken_out_of_either_form_of_url() {
        let t = |url| take_timeout(url).expect(url);
        assert_eq!(
            t("postgres://u@h/db?socket_timeout=2.5&sslmode=disable"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some(Duration::from_millis(2500))
            )
        );
        assert_eq!(
            t("postgres://u@h/db?sslmode=disable&socket_timeout=7"),
            (
                "postgres://u@h/db?sslmode=disable".to_owned(),
                Some(Duration::from_secs(7))
            )
        );
        assert_eq!(
            t("postgres://u@h/db?socket_timeout=0"),
            ("postgres://u@h/db".to_owned(), None)
        );
        assert_eq!(
            t("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), Some(DEFAULT_TIMEOUT))
        );
        assert_eq!(
            t("host=/run/postgresql socket_timeout=3 dbname=city"),
            (
                "host=/run/postgresql dbname=city".to_owned(),
                Some(Duration::from_secs(3))
            )
        );
        assert_eq!(
            t("host=h password=a?b socket_timeout=3"),
            (
                "host=h password=a?b".to_owned(),
                Some(Duration::from_secs(3))
            )
        );
        for bad in [
            "postgres://u@h/db?socket_timeout=soon",
            "postgres://u@h/db?socket_timeout=-1",
            "postgres://u@h/db?socket_timeout=NaN",
            "host=h socket_timeout=1e9",
        ] {
            let e = take_timeout(bad).expect_err(bad);
            assert!(e.contains("socket_timeout="), "{e}");
        }
    }
}
