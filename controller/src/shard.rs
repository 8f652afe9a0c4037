//! Which controller acts on which device when several share one fleet
//! (docs/DESIGN-SHARDING.md). Pure: the store's `ShardKeeper` does the
//! I/O (leases, membership) and asks this module what to hold.
//!
//! - A device belongs to one of `shards` fixed shards, by a stable hash of
//!   its id ([`shard_of`]): every controller, of whatever build, computes
//!   the same one. std's hasher is not promised to stay the same across
//!   Rust releases, so a rolling upgrade could disagree with it.
//! - [`assign`] gives each shard an owner among the live members by
//!   rendezvous hashing: each member's score for a shard is a hash of
//!   both, the highest wins. A member joining or leaving moves only the
//!   shards it wins or held; the others stay where they are.
//! - The assignment only says who *tries* to hold a shard. Holding it is
//!   the lease row's business: two members that see membership
//!   differently for a moment both try, and one of them is refused.

use std::collections::BTreeSet;

/// Shards of a store created without saying otherwise: enough for a
/// handful of controllers to share the load evenly, few enough for one
/// MQTT session each.
pub const DEFAULT_SHARDS: u32 = 16;

/// The most shards a store may have (each is a lease row and, later, a
/// session).
pub const MAX_SHARDS: u32 = 1024;

/// FNV-1a, 64 bits: tiny, stable, defined by its constants.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's finalizer: FNV's low bits are weak for short inputs that
/// differ in their last byte (`lamp0001`, `lamp0002`), and rendezvous
/// scores need every bit mixed.
fn mix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shard `device` belongs to, in `0..shards` (`shards` ≥ 1).
pub fn shard_of(device: &str, shards: u32) -> u32 {
    (mix(fnv1a(device.as_bytes())) % u64::from(shards.max(1))) as u32
}

/// The lease row that guards `shard`.
pub fn lease_row(shard: u32) -> String {
    format!("shard-{shard}")
}

/// Which devices a sharded controller may write: those of the shards it
/// holds. Unsharded, a controller owns every device (`Fleet::owner` is
/// `None`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ownership {
    shards: u32,
    held: BTreeSet<u32>,
}

impl Ownership {
    /// A controller of a store of `shards` shards that holds none yet.
    pub fn none_of(shards: u32) -> Ownership {
        Ownership {
            shards: shards.max(1),
            held: BTreeSet::new(),
        }
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    pub fn held(&self) -> &BTreeSet<u32> {
        &self.held
    }

    pub fn owns(&self, device: &str) -> bool {
        self.held.contains(&shard_of(device, self.shards))
    }

    /// Holds exactly `held` from now on; returns the shards gained.
    pub fn hold(&mut self, held: BTreeSet<u32>) -> BTreeSet<u32> {
        let gained = held.difference(&self.held).copied().collect();
        self.held = held;
        gained
    }
}

/// `member`'s rendezvous score for `shard`.
fn score(member: &str, shard: u32) -> u64 {
    mix(fnv1a(member.as_bytes()) ^ mix(u64::from(shard).wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// The owner of each shard (index = shard) among `members`; `None` when
/// there are no members. The order of `members` does not matter, and a
/// name listed twice counts once.
pub fn assign(shards: u32, members: &[String]) -> Vec<Option<&str>> {
    (0..shards)
        .map(|shard| {
            members
                .iter()
                .map(String::as_str)
                // Ties (vanishingly rare) go to the smaller name, so the
                // answer does not depend on the list's order.
                .max_by(|a, b| score(a, shard).cmp(&score(b, shard)).then(b.cmp(a)))
        })
        .collect()
}

/// What a member should do with its shards, given who is live.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Assigned to it and not held: try to take them.
    pub take: BTreeSet<u32>,
    /// Held and assigned to another member: stop acting on them, finish
    /// what is under way, then release them so that member can take them.
    pub give_up: BTreeSet<u32>,
}

/// `me`'s plan when `members` are live (`me` counts as live whether or
/// not it is listed: it is asking) and it holds `held`.
pub fn plan(me: &str, shards: u32, members: &[String], held: &BTreeSet<u32>) -> Plan {
    let mut live = members.to_vec();
    if !live.iter().any(|m| m == me) {
        live.push(me.to_owned());
    }
    let owners = assign(shards, &live);
    let mine: BTreeSet<u32> = (0..shards)
        .filter(|&s| owners[s as usize] == Some(me))
        .collect();
    Plan {
        take: mine.difference(held).copied().collect(),
        give_up: held.difference(&mine).copied().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ctl-{i}")).collect()
    }

    fn counts(owners: &[Option<&str>], members: &[String]) -> Vec<usize> {
        members
            .iter()
            .map(|m| owners.iter().filter(|o| **o == Some(m.as_str())).count())
            .collect()
    }

    /// The hash is part of the stored data's meaning: a device moving
    /// shard between builds would let two controllers write it. These
    /// values must never change.
    #[test]
    fn a_device_shard_is_the_same_in_every_build() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        let pinned: Vec<u32> = ["lamp0001", "lamp0002", "bin-17", "cam.north"]
            .iter()
            .map(|d| shard_of(d, DEFAULT_SHARDS))
            .collect();
        assert_eq!(pinned, [6, 11, 5, 3]);
    }

    #[test]
    fn devices_spread_evenly_over_the_shards() {
        let mut per = [0u32; DEFAULT_SHARDS as usize];
        for i in 0..16_000 {
            per[shard_of(&format!("lamp{i:05}"), DEFAULT_SHARDS) as usize] += 1;
        }
        // 1,000 expected each; a fair hash stays well within ±15 %.
        assert!(per.iter().all(|n| (850..=1150).contains(n)), "{per:?}");
    }

    #[test]
    fn every_shard_has_exactly_one_owner_and_the_order_of_members_does_not_matter() {
        let members = names(3);
        let owners = assign(DEFAULT_SHARDS, &members);
        assert!(owners.iter().all(Option::is_some));
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(assign(DEFAULT_SHARDS, &reversed), owners);
        let per = counts(&owners, &members);
        assert_eq!(per.iter().sum::<usize>(), DEFAULT_SHARDS as usize);
        assert!(per.iter().all(|n| (3..=8).contains(n)), "{per:?}");
        assert!(assign(DEFAULT_SHARDS, &[]).iter().all(Option::is_none));
    }

    /// Over many fleets of members, one joining moves only the shards it
    /// wins, and one leaving only the shards it held.
    #[test]
    fn a_member_joining_or_leaving_moves_only_its_own_share() {
        for fleet in 1..40 {
            let members: Vec<String> = (0..(fleet % 5) + 1)
                .map(|i| format!("host{fleet}-{i}"))
                .collect();
            let before = assign(DEFAULT_SHARDS, &members);
            let mut joined = members.clone();
            joined.push(format!("new{fleet}"));
            let after = assign(DEFAULT_SHARDS, &joined);
            for (b, a) in before.iter().zip(&after) {
                assert!(a == b || *a == Some(joined.last().unwrap().as_str()));
            }
            let left = &members[1..];
            let after = assign(DEFAULT_SHARDS, left);
            for (b, a) in before.iter().zip(&after) {
                assert!(a == b || *b == Some(members[0].as_str()));
            }
        }
    }

    #[test]
    fn the_plan_takes_what_is_assigned_and_gives_up_the_rest() {
        let members = names(2);
        let owners = assign(DEFAULT_SHARDS, &members);
        let of = |m: &str| -> BTreeSet<u32> {
            (0..DEFAULT_SHARDS)
                .filter(|&s| owners[s as usize] == Some(m))
                .collect()
        };
        // Alone so far (the other not yet live), ctl-0 holds everything.
        let all: BTreeSet<u32> = (0..DEFAULT_SHARDS).collect();
        assert_eq!(
            plan("ctl-0", DEFAULT_SHARDS, &[], &BTreeSet::new()),
            Plan {
                take: all.clone(),
                give_up: BTreeSet::new()
            }
        );
        // ctl-1 is live: ctl-0 gives up ctl-1's share and takes nothing.
        let p = plan("ctl-0", DEFAULT_SHARDS, &members, &all);
        assert_eq!(p.give_up, of("ctl-1"));
        assert!(p.take.is_empty());
        // ctl-1 (not listed yet: its own heartbeat not seen) takes its share.
        let p = plan("ctl-1", DEFAULT_SHARDS, &members[..1], &BTreeSet::new());
        assert_eq!(p.take, of("ctl-1"));
    }
}
