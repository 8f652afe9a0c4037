//! The audit log's hash chain: every entry carries the hash of the one
//! before it and its own, so an entry edited, removed or moved after it was
//! written is found by walking the chain. Pure: the store chains entries as
//! it writes them, `audit-verify` and `cityplane audit verify --file` walk
//! them with [`Verifier`].
//!
//! An entry's hash is the SHA-256 (hex) of its JSON without the `hash`
//! field (serde writes a struct's fields in declaration order, so the bytes
//! are the same on every machine). The first chained entry's `prev` is
//! empty. Entries written before the chain existed carry no hash and may
//! only come before the first chained one.

use serde::Serialize;

use crate::model::AuditEntry;

/// SHA-256 (lowercase hex) of the entry as written, without its own hash.
pub fn hash_of(entry: &AuditEntry) -> String {
    let unhashed = AuditEntry {
        hash: String::new(),
        ..entry.clone()
    };
    let bytes = serde_json::to_vec(&unhashed).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The end of a chain that verified.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Head {
    /// Sequence of the last entry.
    pub seq: u64,
    /// Hash of the last entry (empty for a chain with no chained entry).
    pub hash: String,
    /// Entries walked.
    pub entries: u64,
}

/// The first entry that does not fit the chain, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("audit entry {seq}: {reason}")]
pub struct Broken {
    pub seq: u64,
    pub reason: String,
}

/// Walks a chain entry by entry (in the order they are stored).
#[derive(Debug, Default)]
pub struct Verifier {
    head: Head,
    chained: bool,
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier::default()
    }

    pub fn push(&mut self, e: &AuditEntry) -> Result<(), Broken> {
        let broken = |reason: String| Broken { seq: e.seq, reason };
        if self.head.entries > 0 && e.seq <= self.head.seq {
            return Err(broken(format!(
                "it comes after entry {}: entries were reordered or repeated",
                self.head.seq
            )));
        }
        if e.hash.is_empty() {
            if self.chained {
                return Err(broken(
                    "it carries no hash, after chained entries: it was inserted or stripped"
                        .to_owned(),
                ));
            }
            self.head.seq = e.seq;
            self.head.entries += 1;
            return Ok(());
        }
        if hash_of(e) != e.hash {
            return Err(broken(
                "its contents do not match its hash: it was changed after it was written"
                    .to_owned(),
            ));
        }
        if e.prev != self.head.hash {
            return Err(broken(if self.chained {
                format!(
                    "it does not follow entry {}: an entry between them was removed, or entries \
                     were moved",
                    self.head.seq
                )
            } else {
                "it names a previous entry that is not there: the entries before it were removed"
                    .to_owned()
            }));
        }
        self.chained = true;
        self.head = Head {
            seq: e.seq,
            hash: e.hash.clone(),
            entries: self.head.entries + 1,
        };
        Ok(())
    }

    pub fn head(&self) -> &Head {
        &self.head
    }
}

/// Verifies a whole chain.
pub fn verify<'a>(entries: impl IntoIterator<Item = &'a AuditEntry>) -> Result<Head, Broken> {
    let mut v = Verifier::new();
    for e in entries {
        v.push(e)?;
    }
    Ok(v.head)
}

/// Chains `entries` after `prev` (the hash of the last stored entry),
/// returning the new head's hash.
pub fn chain(entries: &mut [AuditEntry], prev: &str) -> String {
    let mut last = prev.to_owned();
    for e in entries {
        e.prev = last;
        e.hash = hash_of(e);
        last = e.hash.clone();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<AuditEntry> {
        let mut v: Vec<AuditEntry> = (1..=n)
            .map(|seq| AuditEntry {
                seq,
                at: format!("2026-11-30T12:00:{seq:02}Z"),
                who: "op".into(),
                action: "apply".into(),
                name: format!("doc{seq}"),
                result: "accepted generation 1".into(),
                org: Some("city".into()),
                devices: Vec::new(),
                prev: String::new(),
                hash: String::new(),
            })
            .collect();
        chain(&mut v, "");
        v
    }

    #[test]
    fn an_intact_chain_verifies_to_its_head() {
        let v = entries(5);
        let head = verify(&v).expect("intact");
        assert_eq!((head.seq, head.entries), (5, 5));
        assert_eq!(head.hash, v[4].hash);
        // Chaining more later continues from the head.
        let mut more = entries(7).split_off(5);
        chain(&mut more, &head.hash);
        let all: Vec<AuditEntry> = v.into_iter().chain(more).collect();
        assert_eq!(verify(&all).expect("continued").seq, 7);
    }

    #[test]
    fn an_edited_a_deleted_and_a_moved_entry_are_each_named() {
        let mut edited = entries(5);
        edited[2].result = "rejected".into();
        assert_eq!(verify(&edited).expect_err("edited").seq, 3);
        // Editing and re-hashing it breaks the next link instead.
        edited[2].hash = hash_of(&edited[2]);
        let e = verify(&edited).expect_err("re-hashed");
        assert_eq!(e.seq, 4, "{e}");

        let mut deleted = entries(5);
        deleted.remove(2);
        let e = verify(&deleted).expect_err("deleted");
        assert_eq!(e.seq, 4, "{e}");
        assert!(e.reason.contains("removed"), "{e}");

        // 1, 3, 2, 4, 5: entry 3 is the first out of place.
        let mut moved = entries(5);
        moved.swap(1, 2);
        let e = verify(&moved).expect_err("moved");
        assert_eq!(e.seq, 3, "{e}");

        let mut first_gone = entries(5);
        first_gone.remove(0);
        assert_eq!(verify(&first_gone).expect_err("head cut").seq, 2);

        let mut stripped = entries(5);
        stripped[3].hash.clear();
        assert_eq!(verify(&stripped).expect_err("stripped").seq, 4);
    }

    #[test]
    fn entries_from_before_the_chain_may_only_come_first() {
        let mut v = entries(4);
        for e in &mut v[..2] {
            e.hash.clear();
            e.prev.clear();
        }
        chain(&mut v[2..], "");
        assert_eq!(verify(&v).expect("legacy first").entries, 4);
    }
}
