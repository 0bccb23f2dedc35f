//! External tools some tests drive (Chromium, promtool, systemd-analyze). `scripts/test.sh`
//! installs them and sets `FABRIC_REQUIRE_TOOLS=1`, so there a missing tool fails the test; a plain
//! `cargo test` on a machine without them skips those tests with a line that says so.

use std::path::PathBuf;

/// The first of `names` on the `PATH`; `None` (after printing why the test is skipped) when none is
/// there and `FABRIC_REQUIRE_TOOLS` is unset; a panic saying what to run when it is set.
pub fn tool(names: &[&str]) -> Option<PathBuf> {
    let dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(found) = names.iter().flat_map(|n| dirs.iter().map(move |d| d.join(n))).find(|p| p.is_file()) {
        return Some(found);
    }
    let wanted = names.join(" or ");
    if std::env::var_os("FABRIC_REQUIRE_TOOLS").is_some_and(|v| !v.is_empty() && v != "0") {
        panic!("`{wanted}` is not installed: run scripts/setup.sh (it installs Debian's package)");
    }
    eprintln!("SKIPPED: `{wanted}` is not installed (scripts/setup.sh installs it; scripts/test.sh requires it)");
    None
}
