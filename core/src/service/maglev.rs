//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016), as Cilium uses it for service backends.
//!
//! Each backend owns about `M / N` slots of a table of prime size `M`. The datapath picks the
//! backend of a new flow as `table[flow_hash % M]`, so every node holding the same table sends a
//! flow to the same backend without sharing connection state, and a backend set that loses or
//! gains one backend moves little more than that backend's share of flows.

use std::hash::Hasher as _;

use siphasher::sip::SipHasher13;

/// Cilium's default `--bpf-lb-maglev-table-size`: room for about 160 backends at 1% imbalance.
pub const DEFAULT_TABLE_SIZE: u32 = 16381;

/// The smallest table Weft builds: below it, a handful of backends already skew the shares.
const MIN_TABLE_SIZE: u32 = 251;
/// The largest table: the per-service inner map is `M` × 4 bytes, kept under 512 KiB.
const MAX_TABLE_SIZE: u32 = 131_071;
/// Sizes Cilium offers; listed in the error so a user can pick one without doing arithmetic.
const SUGGESTED_SIZES: &str = "251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071";

/// Why a table size was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error(
        "Maglev table size {0} is out of range: pick a prime between {MIN_TABLE_SIZE} and \
         {MAX_TABLE_SIZE}, at least 100 × the largest number of backends of a service \
         (e.g. one of {SUGGESTED_SIZES}; the default is {DEFAULT_TABLE_SIZE})"
    )]
    /// Outside 251..=131071.
    OutOfRange(u32),
    #[error(
        "Maglev table size {0} is not prime: a prime size makes every backend's permutation \
         visit every slot; pick one of {SUGGESTED_SIZES} (the default is {DEFAULT_TABLE_SIZE})"
    )]
    /// In range but not prime.
    NotPrime(u32),
}

/// A Maglev table size `M`: a prime in 251..=131071.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableSize(u32);

impl TableSize {
    /// Checks that `size` is a prime in range.
    pub fn new(size: u32) -> Result<Self, MaglevError> {
        if !(MIN_TABLE_SIZE..=MAX_TABLE_SIZE).contains(&size) {
            return Err(MaglevError::OutOfRange(size));
        }
        if !is_prime(size) {
            return Err(MaglevError::NotPrime(size));
        }
        Ok(Self(size))
    }

    /// The number of slots.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl Default for TableSize {
    fn default() -> Self {
        Self(DEFAULT_TABLE_SIZE)
    }
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut divisor = 2u32;
    while divisor * divisor <= n {
        if n.is_multiple_of(divisor) {
            return false;
        }
        divisor += 1;
    }
    true
}

/// `h(key, seed, which)`: SipHash-1-3 keyed with the seed over the key's bytes followed by one
/// byte naming the hash (0 for the offset, 1 for the skip). Bytes are written explicitly, not
/// through `Hash`, so the value is the same on every architecture and Rust version.
fn hash(key: &[u8], seed: u64, which: u8) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(seed, seed);
    hasher.write(key);
    hasher.write(&[which]);
    hasher.finish()
}

/// Maglev lookup table (Eisenbud et al. 2016): for each slot, the index into `backends` of the
/// backend that owns it.
///
/// The datapath picks slot `flow_hash % M` for a new flow, where `M = size.get()` is the
/// table's length. Keys identify backends (for example `address:port@cluster` as bytes); the
/// table depends only on the set of keys and the seed, not on their order in `backends`, so
/// every node with the same seed and backends builds the same table. Backends listed twice
/// under the same key share one permutation: their slots go to the first index with that key.
/// No backends gives an empty table.
pub fn table<K: AsRef<[u8]>>(backends: &[K], size: TableSize, seed: u64) -> Vec<u32> {
    if backends.is_empty() {
        return Vec::new();
    }
    let m = u64::from(size.get());

    // Fill in the order of the sorted keys so the result is independent of the caller's order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by(|&a, &b| {
        backends[a]
            .as_ref()
            .cmp(backends[b].as_ref())
            .then(a.cmp(&b))
    });
    order.dedup_by(|later, earlier| backends[*later].as_ref() == backends[*earlier].as_ref());

    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|&index| {
            let key = backends[index].as_ref();
            let offset = hash(key, seed, 0) % m;
            let skip = hash(key, seed, 1) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();

    const EMPTY: u32 = u32::MAX;
    let mut slots = vec![EMPTY; size.get() as usize];
    let mut next = vec![0u64; order.len()];
    let mut filled = 0u64;
    // Backends take turns claiming their next unclaimed preferred slot: this is what gives each
    // an almost equal share. M is prime and skip in 1..M, so each permutation visits every slot
    // and the inner loop always ends.
    'fill: loop {
        for (turn, &(offset, skip)) in permutations.iter().enumerate() {
            let mut slot = (offset + next[turn] * skip) % m;
            while slots[slot as usize] != EMPTY {
                next[turn] += 1;
                slot = (offset + next[turn] * skip) % m;
            }
            slots[slot as usize] = order[turn] as u32;
            next[turn] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of flow hashes (SplitMix64), standing in for 5-tuple hashes.
    struct Flows(u64);

    impl Iterator for Flows {
        type Item = u32;
        fn next(&mut self) -> Option<u32> {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            Some((z ^ (z >> 31)) as u32)
        }
    }

    fn backends(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080@1", i / 200, i % 200 + 10))
            .collect()
    }

    fn size() -> TableSize {
        TableSize::new(DEFAULT_TABLE_SIZE).expect("default size is valid")
    }

    /// Each of 10,000 flows' backend key under a table.
    fn assignment(keys: &[String], table: &[u32]) -> Vec<String> {
        Flows(42)
            .take(10_000)
            .map(|flow| keys[table[flow as usize % table.len()] as usize].clone())
            .collect()
    }

    #[test]
    fn every_backend_owns_about_its_share_of_slots() {
        for n in [1, 2, 3, 7, 10, 50, 100] {
            let keys = backends(n);
            let table = table(&keys, size(), 7);
            assert_eq!(table.len(), DEFAULT_TABLE_SIZE as usize);
            let mut owned = vec![0u32; n];
            for &owner in &table {
                owned[owner as usize] += 1;
            }
            let fair = f64::from(DEFAULT_TABLE_SIZE) / n as f64;
            for (backend, &count) in owned.iter().enumerate() {
                let deviation = (f64::from(count) - fair).abs() / fair;
                assert!(
                    deviation < 0.03,
                    "{n} backends: backend {backend} owns {count} slots, fair share {fair:.0}"
                );
            }
        }
    }

    #[test]
    fn same_seed_and_set_in_any_order_give_the_same_table() {
        let keys = backends(10);
        let reference = table(&keys, size(), 99);
        let mut shuffled = keys.clone();
        shuffled.reverse();
        shuffled.swap(2, 7);
        let other = table(&shuffled, size(), 99);
        // Slots hold indices into the caller's slice, so compare the backends they name.
        for (slot, (&a, &b)) in reference.iter().zip(&other).enumerate() {
            assert_eq!(keys[a as usize], shuffled[b as usize], "slot {slot}");
        }
    }

    #[test]
    fn different_seeds_give_different_tables() {
        let keys = backends(5);
        let a = table(&keys, size(), 1);
        let b = table(&keys, size(), 2);
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        assert!(
            differing > a.len() / 2,
            "only {differing} of {} slots differ",
            a.len()
        );
    }

    #[test]
    fn removing_a_backend_moves_little_more_than_its_flows_and_adding_it_back_restores() {
        for n in [3usize, 5, 10] {
            let keys = backends(n);
            let before = table(&keys, size(), 3);
            let before_flows = assignment(&keys, &before);

            let removed = keys[n / 2].clone();
            let fewer: Vec<String> = keys.iter().filter(|k| **k != removed).cloned().collect();
            let after = table(&fewer, size(), 3);
            let after_flows = assignment(&fewer, &after);

            let moved = before_flows
                .iter()
                .zip(&after_flows)
                .filter(|(a, b)| a != b)
                .count();
            let limit = 10_000.0 * (1.0 / n as f64 + 0.01);
            assert!(
                (moved as f64) <= limit,
                "{n} backends: removing one moved {moved} of 10000 flows (limit {limit:.0})"
            );
            assert!(
                after_flows.iter().all(|k| *k != removed),
                "no flow may still go to the removed backend"
            );

            let mut restored_keys = fewer.clone();
            restored_keys.push(removed);
            let restored = table(&restored_keys, size(), 3);
            assert_eq!(assignment(&restored_keys, &restored), before_flows);
        }
    }

    #[test]
    fn no_backends_give_an_empty_table() {
        assert!(table::<&[u8]>(&[], size(), 0).is_empty());
    }

    #[test]
    fn a_backend_listed_twice_owns_its_slots_once() {
        let keys = ["a", "b", "a"];
        let t = table(&keys, TableSize::new(251).expect("prime"), 0);
        assert!(t.iter().all(|&i| i == 0 || i == 1));
    }

    #[test]
    fn table_size_must_be_a_prime_in_range_and_the_error_says_what_to_pick() {
        assert_eq!(TableSize::new(16381).map(TableSize::get), Ok(16381));
        assert_eq!(TableSize::new(251).map(TableSize::get), Ok(251));
        assert_eq!(TableSize::new(131_071).map(TableSize::get), Ok(131_071));
        assert_eq!(TableSize::default().get(), DEFAULT_TABLE_SIZE);

        let not_prime = TableSize::new(16384).unwrap_err();
        assert_eq!(not_prime, MaglevError::NotPrime(16384));
        let message = not_prime.to_string();
        assert!(message.contains("16384 is not prime"), "{message}");
        assert!(message.contains("16381"), "{message}");

        for size in [0, 2, 241, 131_101, u32::MAX] {
            let message = TableSize::new(size).unwrap_err().to_string();
            assert!(message.contains("out of range"), "{message}");
            assert!(message.contains("between 251 and 131071"), "{message}");
        }
    }
}
