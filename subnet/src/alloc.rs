//! Choosing a free subnet for a new lease (pure: no store, no clock, no RNG).
//!
//! flannel's rule, kept so allocations look the same in a mixed cluster: walk
//! the candidate subnets from `SubnetMin` to `SubnetMax` (inclusive) in steps of
//! the subnet size, skip every candidate that overlaps an existing lease, stop
//! after 100 free candidates and pick one of them at random. The random pick
//! keeps nodes that start together from all trying the same subnet.

use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::config::Ipv4Settings;

/// How many free candidates flannel collects before picking one at random.
pub const CANDIDATE_LIMIT: usize = 100;

/// Whether `subnet` is one this network may hand out: the configured length,
/// aligned, and within `[SubnetMin, SubnetMax]`. Leases that fail this (after
/// a config change, say) are not reused.
pub fn is_allocatable(cfg: &Ipv4Settings, subnet: Ipv4Network) -> bool {
    subnet.prefix() == cfg.subnet_len
        && subnet.network() == subnet.ip()
        && subnet.ip() >= cfg.subnet_min
        && subnet.ip() <= cfg.subnet_max
}

/// Up to `limit` free subnets in ascending order, skipping every candidate
/// that overlaps one of `taken` (of any length). Runs in
/// O(taken log taken + candidates scanned), and jumps over long taken runs.
pub fn free_candidates(
    cfg: &Ipv4Settings,
    taken: &[Ipv4Network],
    limit: usize,
) -> Vec<Ipv4Network> {
    let mut ranges: Vec<(u64, u64)> = taken.iter().map(|n| span(*n)).collect();
    ranges.sort_unstable();

    let size = 1u64 << (32 - u32::from(cfg.subnet_len.min(32)));
    let last = u64::from(u32::from(cfg.subnet_max));
    let mut start = u64::from(u32::from(cfg.subnet_min));
    let mut next_range = 0;
    // Highest end address of every taken range that starts at or before the
    // current candidate's end. A candidate overlaps iff this reaches its start.
    let mut reach: Option<u64> = None;
    let mut free = Vec::new();

    while start <= last && free.len() < limit {
        let end = start + size - 1;
        while let Some(&(range_start, range_end)) = ranges.get(next_range) {
            if range_start > end {
                break;
            }
            reach = Some(reach.map_or(range_end, |r| r.max(range_end)));
            next_range += 1;
        }
        match reach {
            Some(r) if r >= start => {
                // Everything up to `r` is covered by one range: skip past it.
                start = (r / size + 1) * size;
            }
            _ => {
                free.extend(to_network(start, cfg.subnet_len));
                start += size;
            }
        }
    }
    free
}

/// Picks a free subnet the way flannel does: uniformly among the first
/// [`CANDIDATE_LIMIT`] free candidates. `random_index(n)` must return a value
/// in `0..n`. `None` means the range is full.
pub fn pick_subnet(
    cfg: &Ipv4Settings,
    taken: &[Ipv4Network],
    random_index: impl FnOnce(usize) -> usize,
) -> Option<Ipv4Network> {
    let free = free_candidates(cfg, taken, CANDIDATE_LIMIT);
    if free.is_empty() {
        return None;
    }
    let index = random_index(free.len()).min(free.len() - 1);
    free.get(index).copied()
}

/// The inclusive address span of a network, as integers.
fn span(net: Ipv4Network) -> (u64, u64) {
    (
        u64::from(u32::from(net.network())),
        u64::from(u32::from(net.broadcast())),
    )
}

fn to_network(start: u64, len: u8) -> Option<Ipv4Network> {
    let addr = Ipv4Addr::from(u32::try_from(start).ok()?);
    Ipv4Network::new(addr, len).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn settings(network: &str, len: u8, min: &str, max: &str) -> Ipv4Settings {
        Ipv4Settings {
            network: network.parse().unwrap(),
            subnet_len: len,
            subnet_min: min.parse().unwrap(),
            subnet_max: max.parse().unwrap(),
        }
    }

    fn default_net() -> Ipv4Settings {
        settings("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0")
    }

    fn net(s: &str) -> Ipv4Network {
        s.parse().unwrap()
    }

    #[test]
    fn first_candidates_start_at_subnet_min() {
        let free = free_candidates(&default_net(), &[], 3);
        assert_eq!(
            free,
            vec![
                net("10.244.1.0/24"),
                net("10.244.2.0/24"),
                net("10.244.3.0/24")
            ]
        );
    }

    #[test]
    fn taken_subnets_and_overlaps_are_skipped() {
        let taken = [
            net("10.244.1.0/24"),
            net("10.244.4.0/23"),
            net("10.244.2.128/25"),
        ];
        let free = free_candidates(&default_net(), &taken, 3);
        assert_eq!(
            free,
            vec![
                net("10.244.3.0/24"),
                net("10.244.6.0/24"),
                net("10.244.7.0/24")
            ]
        );
    }

    #[test]
    fn a_lease_covering_the_range_leaves_nothing() {
        let free = free_candidates(&default_net(), &[net("10.0.0.0/8")], 100);
        assert!(free.is_empty());
        assert_eq!(
            pick_subnet(&default_net(), &[net("10.0.0.0/8")], |_| 0),
            None
        );
    }

    #[test]
    fn range_includes_subnet_max_and_counts_255() {
        let all = free_candidates(&default_net(), &[], usize::MAX);
        assert_eq!(all.len(), 255);
        assert_eq!(all.last(), Some(&net("10.244.255.0/24")));
    }

    #[test]
    fn top_of_address_space_does_not_overflow() {
        let cfg = settings("255.255.255.0/24", 26, "255.255.255.64", "255.255.255.192");
        let all = free_candidates(&cfg, &[], usize::MAX);
        assert_eq!(all.len(), 3);
    }

    #[test]
    fn pick_uses_the_random_index_among_first_100() {
        let seen = std::cell::Cell::new(0);
        let pick = pick_subnet(&default_net(), &[], |n| {
            seen.set(n);
            99
        });
        assert_eq!(seen.get(), 100);
        assert_eq!(pick, Some(net("10.244.100.0/24")));
        // An out-of-range index from a careless RNG is clamped, not a panic.
        assert!(pick_subnet(&default_net(), &[], |_| 1000).is_some());
    }

    #[test]
    fn allocatable_checks_length_alignment_and_range() {
        let cfg = default_net();
        assert!(is_allocatable(&cfg, net("10.244.7.0/24")));
        assert!(!is_allocatable(&cfg, net("10.244.0.0/24")));
        assert!(!is_allocatable(&cfg, net("10.244.7.0/25")));
        assert!(!is_allocatable(&cfg, net("10.245.7.0/24")));
    }

    proptest! {
        /// An allocation never overlaps a lease, never leaves the range, and
        /// fails exactly when every candidate is taken.
        #[test]
        fn picks_are_free_and_in_range(
            taken_idx in proptest::collection::vec((0u32..300, 20u8..27), 0..80),
            choice in 0usize..100,
        ) {
            let cfg = default_net();
            let taken: Vec<Ipv4Network> = taken_idx
                .iter()
                .map(|(i, len)| {
                    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + (i << 8));
                    let n = Ipv4Network::new(addr, *len).unwrap();
                    Ipv4Network::new(n.network(), *len).unwrap()
                })
                .collect();
            let brute: Vec<Ipv4Network> = (1u32..=255)
                .map(|i| net(&format!("10.244.{i}.0/24")))
                .filter(|c| !taken.iter().any(|t| t.overlaps(*c)))
                .collect();
            let fast = free_candidates(&cfg, &taken, usize::MAX);
            prop_assert_eq!(&fast, &brute);
            match pick_subnet(&cfg, &taken, |n| choice % n) {
                Some(s) => {
                    prop_assert!(is_allocatable(&cfg, s));
                    prop_assert!(!taken.iter().any(|t| t.overlaps(s)));
                }
                None => prop_assert!(brute.is_empty()),
            }
        }
    }
}
