//! The process's open-file limit. A hub holds a socket per agent tunnel,
//! client flow and mesh link; the distributions' default soft limit (often
//! 1024) would cap a hub far below its configured `limits`, while the hard
//! limit is what the operator granted. Servers raise the soft limit to the
//! hard one at start (Go's runtime does so for every program).

/// Raise the soft `RLIMIT_NOFILE` to the hard limit: the soft limit now.
pub fn raise_to_hard() -> Result<u64, String> {
    rlimit::increase_nofile_limit(u64::MAX).map_err(|e| format!("RLIMIT_NOFILE: {e}"))
}

/// [`raise_to_hard`] at a service's start, logged: what the process may
/// hold, or why it keeps the limit it was given.
pub fn raise_at_start() {
    match raise_to_hard() {
        Ok(limit) => tracing::info!(limit, "open files (RLIMIT_NOFILE)"),
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
}
