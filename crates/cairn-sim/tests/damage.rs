//! No single damaged object loses a job: every object of a real checkpoint location is damaged in
//! turn (a flipped byte, a truncation, a deletion), and each restart must end with exactly the
//! output and state of an uninterrupted run. The locations come from the crash job stopped
//! gracefully and crashed mid-run (the newest plan is then the only record of its batch).
//!
//! `CAIRN_DAMAGE_SWEEP=full` damages every byte position class more thoroughly (several flip
//! offsets per object); the default sweep flips one byte in the middle of each object.

use cairn_sim::{check_final_state, check_sink_output, JobParams};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EVERY: u64 = 2;
const PARALLELISM: u64 = 2;

fn params(batches: u64) -> JobParams {
    JobParams { batches, rate: 30, keys: 7 }
}

fn run(root: &Path, p: &JobParams, failpoint: Option<&str>) -> Output {
    let s = |d: &str| root.join(d).display().to_string();
    let mut c = Command::new(env!("CARGO_BIN_EXE_crash-job"));
    c.args([s("ckpt"), s("out-totals"), s("out-windows")])
        .args([p.batches, p.rate, p.keys, EVERY, PARALLELISM].map(|n| n.to_string()))
        .env("CAIRN_LOG", "warn");
    match failpoint {
        Some(f) => c.env("CAIRN_FAILPOINT", f),
        None => c.env_remove("CAIRN_FAILPOINT"),
    };
    c.output().expect("run crash-job")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Damage {
    /// XOR one byte at this fraction of the object's length (in per mille).
    Flip(u64),
    Truncate,
    Delete,
}

fn apply(path: &Path, d: Damage) {
    match d {
        Damage::Flip(per_mille) => {
            let mut b = std::fs::read(path).unwrap();
            let i = (b.len() as u64 * per_mille / 1000).min(b.len() as u64 - 1) as usize;
            b[i] ^= 0x5a;
            std::fs::write(path, b).unwrap();
        }
        Damage::Truncate => {
            let b = std::fs::read(path).unwrap();
            std::fs::write(path, &b[..b.len() / 2]).unwrap();
        }
        Damage::Delete => std::fs::remove_file(path).unwrap(),
    }
}

/// Sweeps every object of `base` with every damage; returns (cases, exact restarts).
/// A case counts as detected when the restart reported a recovery warning; the others damaged
/// an object that restart did not need (a plan or checkpoint older than the one it restored, a
/// heartbeat byte outside what is compared).
fn sweep(what: &str, base: &Path, end: &JobParams) -> (usize, usize) {
    let full = std::env::var("CAIRN_DAMAGE_SWEEP").is_ok_and(|v| v == "full");
    let flips: &[u64] = if full { &[0, 5, 10, 100, 500, 900, 999] } else { &[500] };
    let mut damages: Vec<Damage> = flips.iter().map(|f| Damage::Flip(*f)).collect();
    damages.extend([Damage::Truncate, Damage::Delete]);
    let mut objects = Vec::new();
    files(&base.join("ckpt"), &mut objects);
    objects.sort();
    let objects: Vec<PathBuf> =
        objects.into_iter().map(|o| o.strip_prefix(base).unwrap().to_path_buf()).collect();
    assert!(objects.len() >= 8, "a real location has metadata, plans and checkpoints: {objects:?}");
    let (mut cases, mut exact, mut detected) = (0, 0, 0);
    let mut failures = Vec::new();
    for object in &objects {
        for d in &damages {
            cases += 1;
            let tmp = tempfile::tempdir().unwrap();
            copy_dir(base, tmp.path());
            apply(&tmp.path().join(object), *d);
            let out = run(tmp.path(), end, None);
            if String::from_utf8_lossy(&out.stderr).contains("recovery warning:") {
                detected += 1;
            }
            if !out.status.success() {
                failures.push(format!(
                    "{} {d:?}: restart refused: {}",
                    object.display(),
                    String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
                ));
                continue;
            }
            let s = |x: &str| tmp.path().join(x).display().to_string();
            let checked = std::panic::catch_unwind(|| {
                check_sink_output(&s("out-totals"), &s("out-windows"), end);
                check_final_state(&s("ckpt"), end);
            });
            match checked {
                Ok(()) => exact += 1,
                Err(_) => failures.push(format!("{} {d:?}: output or state differs", object.display())),
            }
        }
    }
    eprintln!(
        "damage sweep of the {what} location: {} objects, {cases} cases, {detected} detected (recovery warned), {exact} restarted exactly",
        objects.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {cases} single-object damages lost the job:\n{}",
        failures.len(),
        failures.join("\n")
    );
    (cases, exact)
}

#[test]
fn any_one_damaged_object_of_a_crashed_location_is_survived() {
    let base = tempfile::tempdir().unwrap();
    // Batch 9 is planned and its output written, then the process dies before its commit.
    let out = run(base.path(), &params(14), Some("after-sink@9"));
    assert!(!out.status.success(), "the failpoint must crash the job");
    let (cases, exact) = sweep("crashed", base.path(), &params(14));
    assert_eq!(cases, exact);
}

#[test]
fn any_one_damaged_object_of_a_stopped_location_is_survived() {
    let base = tempfile::tempdir().unwrap();
    let out = run(base.path(), &params(10), None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (cases, exact) = sweep("stopped", base.path(), &params(14));
    assert_eq!(cases, exact);
}

#[test]
fn both_copies_of_the_metadata_damaged_is_refused_naming_them() {
    let base = tempfile::tempdir().unwrap();
    let out = run(base.path(), &params(6), None);
    assert!(out.status.success());
    let ckpt = base.path().join("ckpt");
    apply(&ckpt.join("metadata"), Damage::Flip(500));
    apply(&ckpt.join("metadata.copy"), Damage::Truncate);
    let out = run(base.path(), &params(8), None);
    assert!(!out.status.success(), "two damaged copies cannot be worked around");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("both copies of the job metadata"), "{err}");
    assert!(err.contains("metadata.copy") && err.contains("new location"), "{err}");
}

/// Makes `path` a file last modified `age` ago, as a crashed writer leaves its staging file.
#[allow(clippy::disallowed_methods)] // file ages are wall-clock facts
fn plant(path: &Path, age: std::time::Duration) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"half a write").unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(std::time::SystemTime::now() - age).unwrap();
}

#[test]
fn staging_debris_of_crashed_writers_is_removed_and_never_read_as_data() {
    let base = tempfile::tempdir().unwrap();
    let out = run(base.path(), &params(6), Some("after-sink@5"));
    assert!(!out.status.success());
    let root = base.path();
    let hour = std::time::Duration::from_secs(3600);
    // What object_store's local file system leaves when a write is killed, and what the file
    // sink's own staging leaves when it dies between the write and the rename.
    let old = [
        root.join("ckpt/log/00000000000000000006.plan#3"),
        root.join("ckpt/state/00000000000000000005-00000000000000000003.delta#12"),
        root.join("out-totals/_staging/part-00000000000000000005.txt#1"),
        root.join("out-windows/_staging/part-00000000000000000005.txt"),
    ];
    // A staging file written a moment ago may belong to a live writer: never touched.
    let fresh = root.join("ckpt/log/00000000000000000009.plan#1");
    for f in &old {
        plant(f, hour);
    }
    plant(&fresh, std::time::Duration::ZERO);
    let end = params(10);
    let out = run(root, &end, None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for f in &old {
        assert!(!f.exists(), "{} was left behind", f.display());
    }
    assert!(fresh.exists(), "a fresh staging file may be a live writer's");
    let s = |x: &str| root.join(x).display().to_string();
    check_sink_output(&s("out-totals"), &s("out-windows"), &end);
    check_final_state(&s("ckpt"), &end);
}
