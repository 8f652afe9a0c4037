//! Sign-in links for the operator dashboard.
//!
//! An operator proves who they are with their certificate over mTLS
//! (`dashboard-login` on `fleet/ops/`); the controller answers with a
//! one-time token the dashboard exchanges for a session. Browsers make
//! client certificates awkward (import dialogs, no headless support), so
//! the certificate is proven where it already is, on MQTT, and the browser
//! gets a short-lived bearer of that proof.
//!
//! Tokens are 128 random bits from the system CSPRNG, kept only as their
//! SHA-256 (a memory dump shows no usable token), single use, and expire
//! after [`SignIns::ttl_ms`]. Time is an argument.

use std::collections::HashMap;
use std::sync::Mutex;

use cityplane_proto::Identity;
use ring::rand::{SecureRandom, SystemRandom};

use crate::model::Millis;

/// Pending sign-ins kept at most; the oldest go first.
const MAX_PENDING: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum SignInError {
    #[error("the system random generator failed")]
    Random,
}

/// The dashboard's pending sign-in tokens, shared by the controller (which
/// issues them to operators it has authenticated) and the dashboard (which
/// redeems them).
pub struct SignIns {
    base_url: String,
    ttl_ms: Millis,
    pending: Mutex<HashMap<[u8; 32], (Identity, Millis)>>,
    rng: SystemRandom,
}

impl SignIns {
    /// `base_url`: where the dashboard answers (`http://127.0.0.1:8080`).
    pub fn new(base_url: impl Into<String>, ttl_ms: Millis) -> SignIns {
        SignIns {
            base_url: base_url.into(),
            ttl_ms,
            pending: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn ttl_ms(&self) -> Millis {
        self.ttl_ms
    }

    /// A new token for `who`, valid until `now + ttl`.
    pub fn issue(&self, who: &Identity, now: Millis) -> Result<String, SignInError> {
        let mut raw = [0u8; 16];
        self.rng.fill(&mut raw).map_err(|_| SignInError::Random)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut pending = self.lock();
        pending.retain(|_, (_, until)| *until > now);
        if pending.len() >= MAX_PENDING {
            if let Some(oldest) = pending
                .iter()
                .min_by_key(|(_, (_, until))| *until)
                .map(|(k, _)| *k)
            {
                pending.remove(&oldest);
            }
        }
        pending.insert(digest(&token), (who.clone(), now + self.ttl_ms));
        Ok(token)
    }

    /// The identity a token was issued to, once: the token is gone after
    /// this call whatever its outcome.
    pub fn redeem(&self, token: &str, now: Millis) -> Option<Identity> {
        let (who, until) = self.lock().remove(&digest(token))?;
        (until > now).then_some(who)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (Identity, Millis)>> {
        // A panic elsewhere while holding it leaves a map that is still
        // consistent (every operation is one insert or remove).
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Never prints a token (nor its hash): only how many are pending.
impl std::fmt::Debug for SignIns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignIns")
            .field("base_url", &self.base_url)
            .field("ttl_ms", &self.ttl_ms)
            .field("pending", &self.lock().len())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use cityplane_proto::Role;

    fn op() -> Identity {
        Identity {
            id: "op".into(),
            role: Role::Operator,
            org: Some("city".into()),
        }
    }

    #[test]
    fn a_token_is_redeemed_once_and_not_after_it_expires() {
        let s = SignIns::new("http://127.0.0.1:1", 60_000);
        let t = s.issue(&op(), 1_000).expect("token");
        assert_eq!(t.len(), 32, "128 bits in hex");
        assert_eq!(s.redeem(&t, 2_000).map(|i| i.id), Some("op".into()));
        assert!(s.redeem(&t, 2_000).is_none(), "single use");
        let late = s.issue(&op(), 1_000).expect("token");
        assert!(s.redeem(&late, 61_000).is_none(), "expired");
        assert!(s.redeem("", 1_000).is_none());
        assert!(s.redeem(&"0".repeat(5000), 1_000).is_none());
        let other = s.issue(&op(), 1_000).expect("token");
        assert_ne!(other, t, "random");
    }
}
