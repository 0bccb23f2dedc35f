//! Which cached model files a node deletes to stay within its cache budget: never a file it serves
//! (or was asked to serve), then the most recently used ones are kept (the previous stable version
//! first of all: a rollback needs it), and the oldest go first.

/// One cached model file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedFile {
    /// Its digest (the file's name).
    pub digest: String,
    /// Bytes.
    pub size: u64,
    /// Last used, in any monotonic unit (seconds since the epoch of its modification time).
    pub last_used: u64,
    /// Served now or wanted by the desired state.
    pub in_use: bool,
}

/// The digests to delete so the cache holds at most `budget` bytes (files in use are never deleted,
/// even over the budget), oldest first.
pub fn evictions(files: &[CachedFile], budget: u64) -> Vec<String> {
    let mut total: u64 = files.iter().map(|f| f.size).sum();
    let mut candidates: Vec<&CachedFile> = files.iter().filter(|f| !f.in_use).collect();
    candidates.sort_by(|a, b| a.last_used.cmp(&b.last_used).then_with(|| a.digest.cmp(&b.digest)));
    let mut out = Vec::new();
    for f in candidates {
        if total <= budget {
            break;
        }
        total -= f.size;
        out.push(f.digest.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(digest: &str, size: u64, last_used: u64, in_use: bool) -> CachedFile {
        CachedFile { digest: digest.into(), size, last_used, in_use }
    }

    #[test]
    fn keeps_what_serves_and_deletes_the_oldest_first() {
        let files = [f("v3", 10, 30, true), f("v2", 10, 20, false), f("v1", 10, 10, false), f("v0", 10, 5, false)];
        let cases: Vec<(u64, Vec<&str>, &str)> = vec![
            (100, vec![], "under budget: nothing goes"),
            (30, vec!["v0"], "one over: the oldest goes"),
            (20, vec!["v0", "v1"], "the previous stable (v2) stays while it fits"),
            (10, vec!["v0", "v1", "v2"], "only what serves stays"),
            (0, vec!["v0", "v1", "v2"], "what serves stays even over the budget"),
        ];
        for (budget, want, why) in cases {
            assert_eq!(evictions(&files, budget), want, "{why}");
        }
    }
}
