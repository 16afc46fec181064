//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table a Service with
//! the `maglev` algorithm uses. The BPF program hashes the client (`lb_common::client_hash`)
//! to an index; the table says which backend owns it.
//!
//! The table depends only on the backends' addresses, so every node computes the same one and
//! a client goes to the same pod whichever node it connects from. Adding or removing one of n
//! backends moves about 1/n of the entries.

use std::{
    hash::Hasher as _,
    net::{IpAddr, SocketAddr},
};

use lb_common::limits::MAGLEV_TABLE_SIZES;
use siphasher::sip::SipHasher13;

/// Fixed keys: the table must be the same on every node and across restarts.
const OFFSET_KEY: (u64, u64) = (0x736f_636b_6c62_0001, 0x6d61_676c_6576_0001);
const SKIP_KEY: (u64, u64) = (0x736f_636b_6c62_0002, 0x6d61_676c_6576_0002);

fn hash(key: (u64, u64), backend: &SocketAddr) -> u64 {
    let mut h = SipHasher13::new_with_keys(key.0, key.1);
    match backend.ip() {
        IpAddr::V4(ip) => h.write(&ip.octets()),
        IpAddr::V6(ip) => h.write(&ip.octets()),
    }
    h.write(&backend.port().to_be_bytes());
    h.finish()
}

/// The table size for a Service with `backends` backends whose table has `current` entries
/// now (0: none): the smallest of `MAGLEV_TABLE_SIZES` with at least 100 entries per backend
/// (the largest if none has). A table keeps its size while that still gives 100 entries per
/// backend and the Service has more than a quarter of the backends that made it grow to it:
/// a table of another size puts most clients on other pods, so a Service scaling back and
/// forth around a threshold keeps its size.
pub fn table_size(backends: usize, current: u32) -> u32 {
    let wanted = 100 * backends as u64;
    let fitting = MAGLEV_TABLE_SIZES
        .into_iter()
        .find(|m| u64::from(*m) >= wanted)
        .unwrap_or(MAGLEV_TABLE_SIZES[MAGLEV_TABLE_SIZES.len() - 1]);
    let keep = match MAGLEV_TABLE_SIZES.iter().position(|m| *m == current) {
        Some(i) => {
            u64::from(current) >= wanted
                && (i == 0 || 4 * wanted > u64::from(MAGLEV_TABLE_SIZES[i - 1]))
        }
        None => false,
    };
    if keep { current } else { fitting }
}

/// The lookup table of size `m` (a prime): entry i holds an index into `backends`.
/// Empty if there are no backends.
pub fn table(backends: &[SocketAddr], m: u32) -> Vec<u32> {
    let m = m as u64;
    if backends.is_empty() {
        return Vec::new();
    }
    // Each backend's preference list is offset, offset + skip, offset + 2 skip, ... (mod m);
    // with m prime and 0 < skip < m it visits every entry once.
    let prefs: Vec<(u64, u64)> = backends
        .iter()
        .map(|b| (hash(OFFSET_KEY, b) % m, hash(SKIP_KEY, b) % (m - 1) + 1))
        .collect();
    let mut next = vec![0u64; backends.len()];
    let mut entry = vec![u32::MAX; m as usize];
    let mut filled = 0;
    // Backends take turns claiming their next preferred free entry.
    'fill: loop {
        for (i, (offset, skip)) in prefs.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != u32::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    entry
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    /// The smallest table, as a Service with up to 40 backends has.
    const M: u32 = MAGLEV_TABLE_SIZES[0];

    fn pods(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from((Ipv4Addr::new(10, 244, 0, i), 8080)))
            .collect()
    }

    /// Which pod each of many clients lands on.
    fn owners(backends: &[SocketAddr]) -> Vec<SocketAddr> {
        let t = table(backends, M);
        (0..20_000u64)
            .map(|client| backends[t[(lb_common::client_hash(client, 0) % M) as usize] as usize])
            .collect()
    }

    #[test]
    fn every_backend_gets_a_near_equal_share() {
        for n in [1u8, 3, 7, 30] {
            let t = table(&pods(n), M);
            let mut share = vec![0u32; n as usize];
            for i in &t {
                share[*i as usize] += 1;
            }
            let (lo, hi) = (share.iter().min().unwrap(), share.iter().max().unwrap());
            assert!(hi - lo <= 1 + M / n as u32 / 10, "n={n}: {share:?}");
        }
    }

    /// Fraction of clients whose pod changed.
    fn moved(before: &[SocketAddr], after: &[SocketAddr]) -> f64 {
        let n = before.iter().zip(after).filter(|(a, b)| a != b).count();
        n as f64 / before.len() as f64
    }

    #[test]
    fn adding_one_backend_moves_about_one_in_n_of_the_clients() {
        for n in [3u8, 5, 10] {
            let before = owners(&pods(n));
            let after = owners(&pods(n + 1));
            let fraction = moved(&before, &after);
            let ideal = 1.0 / f64::from(n + 1);
            // Maglev is near-minimal, not minimal: a few entries shuffle between old pods too.
            assert!(
                fraction < ideal * 1.25,
                "n={n}: moved {fraction:.3}, ideal {ideal:.3}"
            );
            let to_new = after
                .iter()
                .filter(|a| a.ip() == IpAddr::from(Ipv4Addr::new(10, 244, 0, n + 1)))
                .count() as f64;
            assert!(
                (to_new / after.len() as f64 - ideal).abs() < 0.03,
                "n={n}: new pod share"
            );
        }
    }

    #[test]
    fn removing_one_backend_moves_its_clients_and_few_others() {
        let before = owners(&pods(6));
        let mut five = pods(6);
        five.remove(2);
        let after = owners(&five);
        let others: Vec<(SocketAddr, SocketAddr)> = before
            .iter()
            .zip(&after)
            .filter(|(b, _)| b.ip() != IpAddr::from(Ipv4Addr::new(10, 244, 0, 3)))
            .map(|(b, a)| (*b, *a))
            .collect();
        let (b, a): (Vec<_>, Vec<_>) = others.into_iter().unzip();
        assert!(
            moved(&b, &a) < 0.05,
            "{:.3} of the other clients moved",
            moved(&b, &a)
        );
    }

    #[test]
    fn tables_grow_with_the_backends_and_keep_their_size_within_a_factor_of_four() {
        assert_eq!(table_size(3, 0), 4_093);
        assert_eq!(table_size(40, 0), 4_093);
        assert_eq!(table_size(41, 0), 16_381);
        assert_eq!(table_size(1_000, 0), 131_071);
        assert_eq!(
            table_size(8_192, 0),
            131_071,
            "the largest, beyond 1,310 backends"
        );
        // 41 -> 40 -> 41 -> ... keeps 16,381; far fewer backends shrink it.
        assert_eq!(table_size(40, 16_381), 16_381);
        assert_eq!(table_size(11, 16_381), 16_381);
        assert_eq!(table_size(10, 16_381), 4_093);
        assert_eq!(
            table_size(41, 4_093),
            16_381,
            "too few entries per backend: grows"
        );
        assert_eq!(table_size(5, 12_345), 4_093, "not one of the sizes");
    }

    #[test]
    fn a_thousand_backends_get_shares_within_a_few_percent() {
        // The case: 1,000 backends over 4,093 entries differed by about ±25%.
        let backends: Vec<SocketAddr> = (0..1_000u32)
            .map(|i| SocketAddr::from((Ipv4Addr::from(0x0af4_0000 + i), 8080)))
            .collect();
        let m = table_size(backends.len(), 0);
        let mut share = vec![0u32; backends.len()];
        for i in table(&backends, m) {
            share[i as usize] += 1;
        }
        let ideal = f64::from(m) / backends.len() as f64;
        let (lo, hi) = (share.iter().min().unwrap(), share.iter().max().unwrap());
        assert!(
            f64::from(*hi) / ideal < 1.02 && f64::from(*lo) / ideal > 0.98,
            "{m} entries: shares {lo}..{hi}, ideal {ideal:.1}"
        );
    }

    #[test]
    fn the_table_is_deterministic() {
        assert_eq!(table(&pods(4), M), table(&pods(4), M));
        assert!(table(&[], M).is_empty());
    }
}
