//! Secret files (signing secrets, private keys, passwords, tokens) that
//! every user of the machine may read: found at start and reported, so a
//! key shipped with mode 0644 does not go unnoticed. Not refused: volume
//! mounts of orchestrators default to 0644, and refusing would turn a
//! finding into an outage.

use std::path::Path;

/// The configured secret files (config key, path) that are readable by
/// every user (`o+r`). Files that cannot be read are left to the checks
/// that read them.
pub fn world_readable<'a>(files: &[(&'a str, &'a Path)]) -> Vec<(&'a str, &'a Path)> {
    files
        .iter()
        .filter(|(_, p)| is_world_readable(p))
        .copied()
        .collect()
}

#[cfg(unix)]
fn is_world_readable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o004 != 0)
}

#[cfg(not(unix))]
fn is_world_readable(_: &Path) -> bool {
    false
}

/// An agent's start-up warnings: world-readable secret files, and
/// `allow_plaintext_hubs` when set.
pub fn warn_agent(cfg: &crate::config::AgentConfig) {
    warn_world_readable(&cfg.secret_files());
    if cfg.raw.allow_plaintext_hubs {
        tracing::warn!(target: "nowconnect::security", "allow_plaintext_hubs is true: ws:// hub URLs to other hosts carry the agent's token in clear text");
    }
}

/// Log each world-readable secret file as a security warning; returns how
/// many there were.
pub fn warn_world_readable(files: &[(&str, &Path)]) -> usize {
    let found = world_readable(files);
    for (key, path) in &found {
        tracing::warn!(target: "nowconnect::security", key, path = %path.display(), "secret file is readable by every user of this machine: chmod 600 it");
    }
    found.len()
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_files_others_may_read_are_reported() {
        let dir = std::env::temp_dir().join(format!("nc-keyfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let open = dir.join("open.key");
        let closed = dir.join("closed.key");
        let group = dir.join("group.key");
        for (p, mode) in [(&open, 0o644), (&closed, 0o600), (&group, 0o640)] {
            std::fs::write(p, "k").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let missing = dir.join("missing.key");
        let files = [
            ("a", open.as_path()),
            ("b", closed.as_path()),
            ("c", group.as_path()),
            ("d", missing.as_path()),
        ];
        assert_eq!(world_readable(&files), vec![("a", open.as_path())]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
