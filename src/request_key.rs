//! The identical-request key: one type for it everywhere (the
//! singleflight, the cache, the cluster's leases and records), and its
//! spelling in Redis key names and resume records. How it is computed
//! from a request is `pipeline::key`'s business.
//!
//! Threads: pure values and functions, any thread.

/// The identical-request key: a SHA-256 over everything the model would
/// see (see `pipeline::key` for exactly what).
pub type Key = [u8; 32];

/// Lowercase hex of an identical-request key, as it appears in key names
/// and resume records.
pub(crate) fn hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key whose [`hex`] is `text`; `None` for anything else.
pub(crate) fn unhex(text: &str) -> Option<Key> {
    let mut key = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_reads_back_and_nothing_else_does() {
        let key: Key = std::array::from_fn(|i| (i * 37) as u8);
        assert_eq!(unhex(&hex(&key)), Some(key));
        assert_eq!(hex(&[0xab; 32]).len(), 64);
        assert_eq!(unhex(&"ab".repeat(31)), None, "too short");
        assert_eq!(unhex(&"zz".repeat(32)), None, "not hex");
        assert_eq!(unhex(&"é".repeat(32)), None, "not ASCII");
    }
}
