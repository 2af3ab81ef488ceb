//! Staging files left by crashed writers on a local file system.
//!
//! object_store's `LocalFileSystem` writes an object to `<name>#<n>` next to it and renames it
//! into place. A process killed during the write leaves the staging file behind: invisible to
//! object_store's listings, but a file all the same, growing the directory forever and, in a
//! file sink's output, visible to a reader that takes every `part-*` file as data. The file sink
//! therefore stages its writes under `_staging/` (a name that Spark, Hive and cairn's readers
//! skip), and both locations are swept here: at recovery, and with every retention pass.
//!
//! A staging file is removed only once it has not been modified for [`DEBRIS_GRACE`]: a live
//! writer (one day, another process sharing the location) finishes an object far sooner, so a
//! file that old belongs to a writer that is gone.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a staging file must be untouched before it counts as debris.
pub const DEBRIS_GRACE: Duration = Duration::from_secs(15 * 60);

/// The directory under a file sink's output where writes are staged before they are renamed into
/// place (see [`crate::paths::Paths::sink_staging`]).
pub const SINK_STAGING_DIR: &str = "_staging";

/// Whether `file_name` is an object_store staging name: `<name>#<digits>`.
///
/// ```
/// use cairn_checkpoint::debris::is_staging_name;
/// assert!(is_staging_name("00000000000000000007.plan#3"));
/// assert!(!is_staging_name("00000000000000000007.plan"));
/// assert!(!is_staging_name("notes#draft"));
/// ```
pub fn is_staging_name(file_name: &str) -> bool {
    file_name
        .rsplit_once('#')
        .is_some_and(|(stem, n)| !stem.is_empty() && !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
}

/// Removes debris under `dir` (recursively): staging files (`<name>#<digits>`), and every file
/// under a [`SINK_STAGING_DIR`] directory, that have not been modified for `grace` as of `now`.
/// Returns the removed files. Files that vanish meanwhile are skipped; other I/O errors are
/// returned.
pub fn sweep(dir: &Path, grace: Duration, now: SystemTime) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    sweep_into(dir, false, grace, now, &mut removed)?;
    Ok(removed)
}

fn sweep_into(
    dir: &Path,
    in_staging: bool,
    grace: Duration,
    now: SystemTime,
    removed: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            sweep_into(&path, in_staging || name == SINK_STAGING_DIR, grace, now, removed)?;
            continue;
        }
        if !(in_staging || is_staging_name(&name)) {
            continue;
        }
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
        if age < grace {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
    fn touch(path: &Path, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"partial").unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    #[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
    fn removes_old_staging_files_only() {
        let d = tempfile::tempdir().unwrap();
        let hour = Duration::from_secs(3600);
        let old_plan = d.path().join("log/00000000000000000003.plan#2");
        let fresh_plan = d.path().join("log/00000000000000000004.plan#1");
        let data = d.path().join("log/00000000000000000003.plan");
        let old_part = d.path().join("out/_staging/part-00000000000000000003.txt");
        let fresh_part = d.path().join("out/_staging/part-00000000000000000004.txt#7");
        let foreign = d.path().join("notes#draft");
        touch(&old_plan, hour);
        touch(&fresh_plan, Duration::ZERO);
        touch(&data, hour);
        touch(&old_part, hour);
        touch(&fresh_part, Duration::from_secs(1));
        touch(&foreign, hour);
        let mut removed = sweep(d.path(), DEBRIS_GRACE, SystemTime::now()).unwrap();
        removed.sort();
        assert_eq!(removed, vec![old_plan, old_part]);
        for kept in [fresh_plan, data, fresh_part, foreign] {
            assert!(kept.exists(), "{} must stay", kept.display());
        }
        assert!(sweep(&d.path().join("missing"), DEBRIS_GRACE, SystemTime::now()).unwrap().is_empty());
    }
}
