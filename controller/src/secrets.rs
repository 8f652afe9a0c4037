//! Server-generated device secrets (`admin_password` and the like): made
//! from the system CSPRNG, sealed with ChaCha20-Poly1305 under the secrets
//! key (`secrets.key`, 32 bytes, never the CA key), stored sealed in the
//! store's `secrets` tree, opened only to fill in a command just before it
//! is published on the device's own commands topic.
//!
//! Desired and reported state, records, audit entries, rollout views and
//! logs only ever hold a reference ([`SecretRef`]: fingerprint and rotation
//! time). The core stays pure: rollout admission asks a [`Minter`] (the
//! runtime's, which seals and queues the write for the next commit) for a
//! device's new reference, and [`Secrets::fill_command`] adds plaintexts on
//! the way out.

use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use cityplane_proto::messages::Command;
use cityplane_proto::secrets::{fingerprint, SecretRef};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::model::{rfc3339, Millis};
use crate::store::Store;

/// The secrets key's file name in the data directory (the default place).
pub const KEY_FILE: &str = "secrets.key";
/// Random bytes in a generated secret: 160 bits, above the 128 asked for.
const SECRET_BYTES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secrets key {path} is readable or writable by group or others (mode {mode:o}); \
         it must be 0600: recreate it or fix its mode yourself"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("secrets key {path} is not 32 bytes in base64 on one line")]
    Malformed { path: PathBuf },
    #[error("the system random generator failed")]
    Random,
    #[error("a sealed secret does not open (wrong key, or moved to another device or name)")]
    Open,
    #[error(
        "secrets key {path} does not open the secrets the store holds (device {device:?}): \
         they were sealed with another key. Every controller of a store needs the same key \
         (--secrets-key, or secrets.key in --data): copy the one the store was used with"
    )]
    WrongKey { path: PathBuf, device: String },
}

/// A secret as stored: sealed, with what may be shown of it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    pub fingerprint: String,
    pub rotated_at: Millis,
    /// Standard base64 of the 12-byte nonce (random per sealing).
    nonce: String,
    /// Standard base64 of ciphertext and tag.
    ciphertext: String,
}

impl std::fmt::Debug for Sealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealed")
            .field("fingerprint", &self.fingerprint)
            .field("rotated_at", &self.rotated_at)
            .finish_non_exhaustive()
    }
}

impl Sealed {
    pub fn reference(&self) -> SecretRef {
        SecretRef {
            fingerprint: self.fingerprint.clone(),
            rotated_at: rfc3339(self.rotated_at),
        }
    }
}

/// What the store keeps per device and key: the newest secret and the one
/// a rollback of its rotation would restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub current: Sealed,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Sealed>,
}

impl Slot {
    /// `new` becomes current; previous is the stored secret whose
    /// fingerprint is `keep` (what the device reported when the rotation
    /// admitted it: what a rollback gives back), else the old current.
    pub fn rotate(old: Option<Slot>, new: Sealed, keep: Option<&str>) -> Slot {
        let previous = old.and_then(|o| {
            let kept = keep.and_then(|k| {
                [Some(&o.current), o.previous.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|s| s.fingerprint == k)
                    .cloned()
            });
            kept.or(Some(o.current))
        });
        Slot {
            current: new,
            previous,
        }
    }

    /// The stored secret with this fingerprint.
    pub fn find(&self, fingerprint: &str) -> Option<&Sealed> {
        [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.fingerprint == fingerprint)
    }
}

/// One new secret for the store's next commit.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub device: String,
    pub name: String,
    pub sealed: Sealed,
    /// The fingerprint to keep as previous (see [`Slot::rotate`]).
    pub keep: Option<String>,
}

/// The store key of a device's secret: `<device>\0<name>` (neither holds a
/// NUL: ids are validated, names are state keys checked at create).
pub fn slot_key(device: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + name.len() + 1);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// A temporary key file older than this is a crash's leftover
/// ([`Vault::remove_stale_temporaries`]).
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// The sealing key and the random generator.
pub struct Vault {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Vault {
    /// Reads the key at `path`, or creates it (0600 from the start, in a
    /// new file: never a chmod afterwards). A key others may read or
    /// write is refused: whoever reads it reads every secret.
    pub fn open_or_create(path: &Path) -> Result<Vault, SecretsError> {
        Vault::remove_stale_temporaries(path);
        let rng = SystemRandom::new();
        let raw = match std::fs::File::open(path) {
            Ok(file) => Vault::read_raw(path, file)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vault::create_key(path, &rng)?,
            Err(source) => {
                return Err(SecretsError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Vault::from_raw(&raw, rng)
    }

    /// The key in `file` (at `path`), refused if others may read or write it.
    fn read_raw(path: &Path, file: std::fs::File) -> Result<[u8; 32], SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mode = file.metadata().map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        let mut text = String::new();
        file.take(256).read_to_string(&mut text).map_err(io)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| SecretsError::Malformed {
                path: path.to_path_buf(),
            })
    }

    /// Removes what [`Vault::create_key`] leaves after a crash between
    /// writing its temporary file and removing it: an unused key, 0600,
    /// under `<key>.new-<n>`. Only files older than [`STALE_AFTER`]: a
    /// controller starting beside this one may be writing its own right
    /// now. Best effort: a file left here harms nothing.
    fn remove_stale_temporaries(path: &Path) {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
            return;
        };
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let mut prefix = name.to_owned();
        prefix.push(".new-");
        let prefix = prefix.as_encoded_bytes();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let now = std::time::SystemTime::now();
        for entry in entries.flatten() {
            if !entry.file_name().as_encoded_bytes().starts_with(prefix) {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= STALE_AFTER);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(file = %entry.path().display(), "removed a secrets key's temporary file left by a crash");
            }
        }
    }

    /// A new key at `path`, whole or not at all: written and fsynced
    /// under a temporary name born 0600, then linked into place (a crash
    /// leaves no half-written key, and a key already there is never
    /// replaced).
    fn create_key(path: &Path, rng: &SystemRandom) -> Result<[u8; 32], SecretsError> {
        let io = |source| SecretsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut raw = [0u8; 32];
        rng.fill(&mut raw).map_err(|_| SecretsError::Random)?;
        let line = base64::engine::general_purpose::STANDARD.encode(raw) + "\n";
        // A name of its own: controllers started together on one data
        // directory each write theirs, and the first linked wins. A
        // leftover from a crash is never reused (`create_new`).
        let mut nonce = [0u8; 8];
        rng.fill(&mut nonce).map_err(|_| SecretsError::Random)?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(format!(".new-{}", u64::from_be_bytes(nonce)));
        let tmp = PathBuf::from(tmp_name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {}
            // Another process made one meanwhile: that one is the key.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Vault::read_raw(path, std::fs::File::open(path).map_err(io)?);
            }
            Err(e) => return Err(io(e)),
        }
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(raw)
    }

    fn from_raw(raw: &[u8; 32], rng: SystemRandom) -> Result<Vault, SecretsError> {
        let key =
            UnboundKey::new(&aead::CHACHA20_POLY1305, raw).map_err(|_| SecretsError::Random)?;
        Ok(Vault {
            key: LessSafeKey::new(key),
            rng,
        })
    }

    /// A new random secret for `name` on `device`, sealed; the plaintext
    /// leaves this function only inside the seal.
    pub fn mint(&self, device: &str, name: &str, now: Millis) -> Result<Sealed, SecretsError> {
        let mut raw = [0u8; SECRET_BYTES];
        self.rng.fill(&mut raw).map_err(|_| SecretsError::Random)?;
        let plaintext = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        self.seal(device, name, &plaintext, now)
    }

    /// Seals `plaintext` for `name` on `device`: the additional data binds
    /// it to both, so a sealed secret copied to another device's or key's
    /// slot does not open.
    pub fn seal(
        &self,
        device: &str,
        name: &str,
        plaintext: &str,
        now: Millis,
    ) -> Result<Sealed, SecretsError> {
        let mut nonce = [0u8; aead::NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| SecretsError::Random)?;
        let mut buf = plaintext.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot_key(device, name)),
                &mut buf,
            )
            .map_err(|_| SecretsError::Random)?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(Sealed {
            fingerprint: fingerprint(plaintext),
            rotated_at: now,
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(buf),
        })
    }

    /// The plaintext of a sealed secret of `name` on `device`.
    pub fn open(&self, device: &str, name: &str, sealed: &Sealed) -> Result<String, SecretsError> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64
            .decode(&sealed.nonce)
            .ok()
            .and_then(|n| <[u8; aead::NONCE_LEN]>::try_from(n).ok())
            .ok_or(SecretsError::Open)?;
        let mut buf = b64
            .decode(&sealed.ciphertext)
            .map_err(|_| SecretsError::Open)?;
        let plain = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot_key(device, name)),
                &mut buf,
            )
            .map_err(|_| SecretsError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SecretsError::Open)
    }
}

/// What rollout admission asks for a device's new secret. The fleet core
/// calls it and gets only the reference back; whatever it does to keep the
/// secret (the runtime's seals it and queues it for the next commit, which
/// is durable before any command referring to it is published) is outside
/// the core.
pub trait Minter: Send + Sync {
    /// A new secret for `name` on `device`; `keep` is the fingerprint the
    /// device reports now (kept for a rollback).
    fn mint(
        &self,
        device: &str,
        name: &str,
        keep: Option<&str>,
        now: Millis,
    ) -> Result<SecretRef, String>;
}

/// The runtime's secrets: the vault and the store that holds them sealed.
pub struct Secrets {
    pub vault: Vault,
    pub store: Arc<Store>,
}

impl Minter for Secrets {
    fn mint(
        &self,
        device: &str,
        name: &str,
        keep: Option<&str>,
        now: Millis,
    ) -> Result<SecretRef, String> {
        let sealed = self
            .vault
            .mint(device, name, now)
            .map_err(|e| e.to_string())?;
        let reference = sealed.reference();
        self.store.queue_secret(Rotation {
            device: device.to_owned(),
            name: name.to_owned(),
            sealed,
            keep: keep.map(str::to_owned),
        });
        Ok(reference)
    }
}

impl Secrets {
    /// A command's payload with the plaintext of every secret reference
    /// its state sets, for `device`'s own commands topic only. Anything
    /// else passes unchanged. A reference with no stored secret goes
    /// without one: the device refuses it ("secret missing") and the
    /// rollout says so.
    /// [`Secrets::fill_command`] when `topic` is a device's commands topic
    /// (what both runtimes publish from); that device, if so.
    pub fn fill_if_command<'t>(&self, topic: &'t str, payload: &mut Vec<u8>) -> Option<&'t str> {
        let (device, leaf) = cityplane_proto::topics::split_device_topic(topic)?;
        if leaf != cityplane_proto::topics::DEVICE_SUBSCRIBE_LEAF {
            return None;
        }
        *payload = self.fill_command(device, std::mem::take(payload));
        Some(device)
    }

    pub fn fill_command(&self, device: &str, payload: Vec<u8>) -> Vec<u8> {
        // Cheap test first: most commands set no secret (serde_json's
        // compact output spells a reference exactly so).
        if !contains(&payload, b"{\"secret\":{") {
            return payload;
        }
        let Ok(mut cmd) = serde_json::from_slice::<Command>(&payload) else {
            return payload;
        };
        let refs: Vec<(String, SecretRef)> = cmd
            .state
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), SecretRef::of(v)?)))
            .collect();
        if refs.is_empty() {
            return payload;
        }
        for (name, r) in refs {
            let slot = match self.store.secret_slot(device, &name) {
                Ok(slot) => slot,
                Err(e) => {
                    tracing::error!(device, key = %name, error = %e, "could not read a device's secret; the command goes without it");
                    continue;
                }
            };
            let opened = slot
                .as_ref()
                .and_then(|s| s.find(&r.fingerprint))
                .map(|sealed| self.vault.open(device, &name, sealed));
            match opened {
                Some(Ok(plain)) => cmd.secrets.insert(name, plain),
                Some(Err(e)) => {
                    tracing::error!(device, key = %name, fingerprint = %r.fingerprint, error = %e, "a stored secret does not open; the command goes without it")
                }
                None => {
                    tracing::warn!(device, key = %name, fingerprint = %r.fingerprint, "no stored secret has this fingerprint; the command goes without it")
                }
            }
        }
        serde_json::to_vec(&cmd).unwrap_or(payload)
    }
}

/// `get-secrets` (`cityplane secrets list`): per device, each key whose
/// desired or reported value is a secret reference, with the fingerprint
/// and rotation time on each side: what was rotated and whether the device
/// took it, never a plaintext (the records hold none). Rows sorted by
/// device id, `limit` of them from `offset`.
pub fn listing<'a>(
    devices: impl Iterator<Item = &'a crate::model::DeviceRecord>,
    offset: usize,
    limit: usize,
) -> serde_json::Value {
    let side = |state: &cityplane_proto::messages::State, key: &str| {
        state
            .get(key)
            .and_then(SecretRef::of)
            .map(|r| serde_json::json!({"fingerprint": r.fingerprint, "rotated_at": r.rotated_at}))
    };
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut devices: Vec<&crate::model::DeviceRecord> = devices.collect();
    devices.sort_by(|a, b| a.id.cmp(&b.id));
    for d in devices {
        let reported = d.reported.to_state();
        let keys: std::collections::BTreeSet<&String> = d
            .desired
            .iter()
            .chain(reported.iter())
            .filter(|(_, v)| SecretRef::of(v).is_some())
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let (desired, reported) = (side(&d.desired, key), side(&reported, key));
            rows.push(serde_json::json!({
                "id": d.id, "key": key,
                "converged": desired.is_some() && desired == reported,
                "desired": desired, "reported": reported,
            }));
        }
    }
    let total = rows.len();
    let page: Vec<serde_json::Value> = rows.into_iter().skip(offset).take(limit).collect();
    serde_json::json!({"total": total, "offset": offset, "secrets": page})
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Where the secrets key is when nobody says: `secrets.key` in the data
/// directory. Keep it elsewhere (`serve --secrets-key`) to make a copy of
/// the data directory useless on its own.
pub fn default_key_path(data: &Path) -> PathBuf {
    data.join(KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vault(dir: &Path) -> Vault {
        Vault::open_or_create(&dir.join(KEY_FILE)).expect("vault")
    }

    #[test]
    fn a_sealed_secret_opens_only_for_its_device_and_name_and_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(dir.path());
        let s = v.seal("dev1", "admin_password", "pw-1", 0).expect("seal");
        assert_eq!(s.fingerprint, fingerprint("pw-1"));
        assert_eq!(v.open("dev1", "admin_password", &s).expect("open"), "pw-1");
        assert!(v.open("dev2", "admin_password", &s).is_err());
        assert!(v.open("dev1", "api_secret", &s).is_err());
        // The same file opens it again; another key does not.
        assert!(vault(dir.path()).open("dev1", "admin_password", &s).is_ok());
        let other = tempfile::tempdir().expect("tempdir");
        assert!(vault(other.path())
            .open("dev1", "admin_password", &s)
            .is_err());
        // Neither the sealed form nor its Debug shows the plaintext.
        let shown = format!("{s:?} {}", serde_json::to_string(&s).expect("json"));
        assert!(!shown.contains("pw-1"), "{shown}");
    }

    #[test]
    fn the_key_is_born_0600_and_an_open_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        Vault::open_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loose = dir.path().join("loose.key");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&loose)
            .and_then(|mut f| f.write_all(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"))
            .expect("write");
        assert!(matches!(
            Vault::open_or_create(&loose),
            Err(SecretsError::Permissions { .. })
        ));
    }

    /// Controllers started together on one data directory (the sharded
    /// bench's three) all open the same key: one makes it, the others
    /// read it, none fails or ends with another key.
    #[test]
    fn controllers_started_together_all_get_the_one_key() {
        for _ in 0..50 {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join(KEY_FILE);
            let sealed: Vec<Result<Sealed, String>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|_| {
                        s.spawn(|| {
                            Vault::open_or_create(&path)
                                .map_err(|e| e.to_string())
                                .and_then(|v| v.seal("d", "k", "pw", 0).map_err(|e| e.to_string()))
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("thread"))
                    .collect()
            });
            let file = Vault::open_or_create(&path).expect("the key");
            for s in sealed {
                let s = s.expect("every one opens the key");
                assert_eq!(
                    file.open("d", "k", &s).expect("sealed with the file's key"),
                    "pw"
                );
            }
        }
    }

    #[test]
    fn a_temporary_key_left_by_a_crash_is_removed_and_one_being_written_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(KEY_FILE);
        let left = dir.path().join(format!("{KEY_FILE}.new-1"));
        let writing = dir.path().join(format!("{KEY_FILE}.new-2"));
        let other = dir.path().join("other.new-3");
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for f in [&left, &writing, &other] {
            let file = std::fs::File::create(f).expect("create");
            if f != &writing {
                file.set_modified(hour_ago).expect("mtime");
            }
        }
        Vault::open_or_create(&path).expect("the key");
        assert!(!left.exists(), "a crash's leftover stays");
        assert!(writing.exists(), "a key being written now was removed");
        assert!(other.exists(), "a file not of the key was removed");
        // Also when the key already exists.
        std::fs::File::create(&left)
            .and_then(|f| f.set_modified(hour_ago))
            .expect("leftover");
        Vault::open_or_create(&path).expect("the key");
        assert!(!left.exists());
    }

    #[test]
    fn minted_secrets_differ_and_rotation_keeps_what_a_rollback_needs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let v = vault(dir.path());
        let a = v.mint("d", "k", 1).expect("a");
        let b = v.mint("d", "k", 2).expect("b");
        let c = v.mint("d", "k", 3).expect("c");
        assert_ne!(a.fingerprint, b.fingerprint);
        let s = Slot::rotate(None, a.clone(), None);
        assert_eq!(s.previous, None);
        let s = Slot::rotate(Some(s), b.clone(), Some(&a.fingerprint));
        assert_eq!(s.previous.as_ref(), Some(&a));
        // The device still reports a (b was rolled back): a stays.
        let s = Slot::rotate(Some(s), c.clone(), Some(&a.fingerprint));
        assert_eq!((&s.current, s.previous.as_ref()), (&c, Some(&a)));
        assert!(s.find(&b.fingerprint).is_none());
    }
}
