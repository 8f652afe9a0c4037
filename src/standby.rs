//! Several controllers on one PostgreSQL store: one acts, the others
//! stand by (see `cityplane_controller::store::lease`). A process waits
//! here until it holds the store's lease, then keeps renewing it; when it
//! loses the lease it stops, and whoever supervises it starts it again,
//! as a standby.

use anyhow::Context;
use cityplane_controller::store::lease::{RENEW_EVERY, RETRY_EVERY, TTL};
use cityplane_controller::store::{Attempt, Lease};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The lease this process holds.
pub struct Held {
    pub generation: i64,
    /// The name it is held under (`id@host:pid`).
    pub holder: String,
    lease: Arc<Mutex<Lease>>,
    keeper: tokio::task::JoinHandle<()>,
    lost: oneshot::Receiver<String>,
}

/// A name for this process among the controllers: shown to the others
/// while it holds the lease.
pub fn holder(id: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{id}@{host}:{}", std::process::id())
}

async fn blocking<T: Send + 'static>(
    lease: &Arc<Mutex<Lease>>,
    f: impl FnOnce(&mut Lease) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let lease = lease.clone();
    tokio::task::spawn_blocking(move || f(&mut lease.lock().unwrap_or_else(|e| e.into_inner())))
        .await
        .context("lease task")
}

/// Waits until this process holds the lease of the store at `url`,
/// saying once that it stands by (and for whom), then keeps it.
pub async fn take(url: &str, id: &str) -> anyhow::Result<Held> {
    take_as(
        url,
        id,
        "standing by: another controller holds the store's lease; taking over when it stops renewing it",
    )
    .await
}

/// [`take`], saying `waiting` (once per holder) while another holds it.
pub async fn take_as(url: &str, id: &str, waiting: &'static str) -> anyhow::Result<Held> {
    let holder = holder(id);
    let lease = {
        let url = url.to_owned();
        let holder = holder.clone();
        tokio::task::spawn_blocking(move || Lease::connect(&url, &holder))
            .await
            .context("lease task")?
            .context("connecting to the store for its lease")?
    };
    let lease = Arc::new(Mutex::new(lease));
    let mut said: Option<String> = None;
    let generation = loop {
        match blocking(&lease, Lease::try_acquire).await? {
            Ok(Attempt::Held { generation }) => break generation,
            Ok(Attempt::Busy {
                holder: other,
                generation,
                expires_in,
            }) => {
                if said.as_deref() != Some(other.as_str()) {
                    tracing::info!(
                        holder = %other,
                        generation,
                        expires_in_s = expires_in.as_secs_f64().ceil(),
                        "{waiting}"
                    );
                    said = Some(other);
                }
            }
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "store unreachable; asking for its lease again");
            }
            Err(e) => return Err(e).context("taking the store's lease"),
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    tracing::info!(%holder, generation, "holding the store's lease: this controller acts");
    let (lost_tx, lost) = oneshot::channel();
    let keeper = tokio::spawn(keep(lease.clone(), generation, lost_tx));
    Ok(Held {
        generation,
        holder,
        lease,
        keeper,
        lost,
    })
}

/// Renews the lease until it is lost, then says why.
async fn keep(lease: Arc<Mutex<Lease>>, generation: i64, lost: oneshot::Sender<String>) {
    let mut warned = false;
    let mut renewed = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(RENEW_EVERY).await;
        match blocking(&lease, move |l| l.renew(generation)).await {
            Ok(Ok(true)) => {
                renewed = tokio::time::Instant::now();
                warned = false;
            }
            Ok(Ok(false)) => {
                let _ = lost.send(format!(
                    "lease generation {generation} was taken over by another controller"
                ));
                return;
            }
            Ok(Err(e)) => {
                if !warned {
                    warned = true;
                    // Commits are refused meanwhile too (fenced by the
                    // database's clock); renewed in time, nothing changes.
                    tracing::warn!(error = %e, expired = renewed.elapsed() > TTL, "could not renew the store's lease; retrying");
                }
            }
            Err(e) => {
                let _ = lost.send(format!("{e:#}"));
                return;
            }
        }
    }
}

/// Waits for Ctrl-C or, when `lease` is held, for its loss: `Some(why)`
/// then, and the process must stop at once (its commits are already
/// refused; nothing it holds was acknowledged, so the broker hands it to
/// the successor).
pub async fn until_stopped(lease: &mut Option<Held>) -> anyhow::Result<Option<String>> {
    let lost = async {
        match lease.as_mut() {
            Some(held) => held.lost().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        signal = tokio::signal::ctrl_c() => {
            signal.context("waiting for Ctrl-C")?;
            Ok(None)
        }
        why = lost => Ok(Some(why)),
    }
}

/// Takes the lease of `store` when it is PostgreSQL (sled is one
/// process's by itself).
pub async fn take_if_shared(
    store: Option<&cityplane_controller::StoreUrl>,
    id: &str,
) -> anyhow::Result<Option<Held>> {
    match store {
        Some(url) => Ok(Some(take(&url.0, id).await?)),
        None => Ok(None),
    }
}

impl Held {
    /// Resolves when the lease is lost: the controller must stop.
    pub async fn lost(&mut self) -> String {
        (&mut self.lost)
            .await
            .unwrap_or_else(|_| "the lease keeper stopped".into())
    }

    /// Gives the lease up (after the controller stopped), so a standby
    /// takes over at once instead of after the expiry.
    pub async fn release(self) {
        self.keeper.abort();
        let generation = self.generation;
        match blocking(&self.lease, move |l| l.release(generation)).await {
            Ok(Ok(())) => tracing::info!(generation, "store's lease released"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not release the store's lease; a standby takes over once it expires ({} s)", TTL.as_secs())
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "could not release the store's lease")
            }
        }
    }
}
