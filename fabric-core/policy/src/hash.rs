//! A stable hash: the same value for the same bytes across runs, builds and machines (unlike std's
//! SipHash with random keys), spread over the whole range even for ids alike but for their end.

/// FNV-1a, then splitmix64's finaliser so similar ids (`req-1`, `req-2`, `edge-1`, `edge-2`) spread
/// over the whole range (FNV alone leaves the high bits to their common prefix).
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_alike_but_for_their_end_spread_over_the_high_bits() {
        // 1,000 ids differing in their last characters: every sixteenth of the range holds 30-100.
        let mut buckets = [0u32; 16];
        for i in 0..1000 {
            buckets[(stable_hash(format!("edge-{i}").as_bytes()) >> 60) as usize] += 1;
        }
        assert!(buckets.iter().all(|n| (30..=100).contains(n)), "{buckets:?}");
        assert_eq!(stable_hash(b"edge-1"), stable_hash(b"edge-1"));
    }
}
