//! Log set-up for binaries that embed the broker.
//!
//! rumqttd opens an ERROR-level span for every message it routes, with the
//! topic's bytes Debug-formatted into it; any log subscriber that shows
//! errors (every sane configuration) paid that formatting on the router
//! thread for each message (~5 % of the broker's CPU in steady traffic).
//! These spans are filtered out here; rumqttd's events are kept until the
//! binary starts stopping ([`stopping`]): rumqttd has no shutdown API, and
//! its router then logs ERRORs about links we closed on purpose ("no-connection
//! id N is already gone"), which a user must not read as a failure.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::filter::{filter_fn, FilterExt};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// One of rumqttd's per-message spans.
pub fn is_router_span(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("rumqttd")
}

static STOPPING: AtomicBool = AtomicBool::new(false);

/// From now on rumqttd logs nothing: call before shutting the broker (or
/// the controller, whose link closes with it) down.
pub fn stopping() {
    STOPPING.store(true, Ordering::Relaxed);
}

fn is_router_event_while_stopping(meta: &tracing::Metadata<'_>) -> bool {
    meta.target().starts_with("rumqttd") && STOPPING.load(Ordering::Relaxed)
}

/// Logs to stderr with `directives` (`RUST_LOG` syntax; invalid ones fall
/// back to `warn`), without rumqttd's per-message spans. A no-op when a
/// subscriber is already set.
pub fn init_stderr(directives: &str, ansi: bool) {
    let filter = EnvFilter::try_new(directives)
        .unwrap_or_else(|_| EnvFilter::new("warn"))
        .and(filter_fn(|meta| {
            !is_router_span(meta) && !is_router_event_while_stopping(meta)
        }));
    let _ = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_filter(filter),
        )
        .try_init();
}
