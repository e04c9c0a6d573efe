//! External components: a test that needs one is skipped when it is absent, unless
//! `FHIRHOSE_REQUIRE_EXTERNAL=1` (as `scripts/test.sh` and CI set), where its absence fails.

use std::path::PathBuf;

/// Whether missing external components are failures (`FHIRHOSE_REQUIRE_EXTERNAL=1`).
pub fn required() -> bool {
    std::env::var("FHIRHOSE_REQUIRE_EXTERNAL").as_deref() == Ok("1")
}

/// A non-empty environment variable.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A component is missing: panics with `why` when components are required, else prints that
/// the test is skipped.
pub fn skip(why: &str) {
    assert!(
        !required(),
        "{why}, and external components are required (FHIRHOSE_REQUIRE_EXTERNAL=1)"
    );
    eprintln!("skipped: {why}");
}

/// The address of an external component from `var` (set by `scripts/test.sh`), or `None` — the
/// test is skipped — unless components are required, where its absence is a failure.
pub fn external(name: &str, script: &str) -> Option<String> {
    let v = var(name);
    if v.is_none() {
        skip(&format!("{name} is not set (run {script})"));
    }
    v
}

/// An installed tool: the path in `var`, else `default` under the repository (where the
/// project's scripts install it).
pub fn tool(name: &str, default: &str) -> PathBuf {
    std::env::var(name)
        .map(PathBuf::from)
        .unwrap_or_else(|_| crate::repo_root().join(default))
}
