//! Checkpoint locations written by every released format (`fixtures/`) restore with the current
//! code: the run continued from a fixture produces exactly the output and final state of a run
//! from scratch.

use cairn::checkpoint::CheckpointStore;
use cairn::Clock;
use cairn_sim::fixture::{fixture_context, write_fixture_input, FixtureDirs, FIXTURE_SINKS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Batches the continued run ends with; the fixtures hold 6 (graceful) or 6 plus a crashed 7th.
const END: u64 = 12;
/// The first batch the continued run writes (the crashed fixture's batch 6 is replayed).
const FIRST_COMPARED: u64 = 6;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn outputs(dirs: &FixtureDirs) -> BTreeMap<(String, u64), Vec<String>> {
    let mut out = BTreeMap::new();
    for sink in FIXTURE_SINKS {
        for (cairn::BatchId(batch), mut lines) in cairn::read_text_output(&dirs.out(sink)).unwrap() {
            if batch >= FIRST_COMPARED {
                lines.sort();
                out.insert((sink.to_string(), batch), lines);
            }
        }
    }
    out
}

type Tables = BTreeMap<String, BTreeMap<Vec<u8>, Vec<u8>>>;

fn final_state(dirs: &FixtureDirs) -> (u64, Tables) {
    let store = CheckpointStore::open(&dirs.checkpoint()).unwrap();
    let rec = store.recover().unwrap();
    assert!(rec.replay.is_empty(), "a graceful stop leaves nothing to replay");
    let state = rec.state.expect("a final checkpoint");
    let tables = state
        .tables
        .iter()
        .map(|t| {
            let entries = t.reader().map(|e| e.unwrap()).map(|(k, v)| (k.to_vec(), v.unwrap().to_vec()));
            (t.id.clone(), entries.collect())
        })
        .collect();
    (state.batch_id.0, tables)
}

/// Whether every stateful operator (not source) of the newest checkpoint's graph has schema
/// identities for its key and state types, rather than the bare type paths of format v1.
fn graph_has_schemas(dirs: &FixtureDirs) -> bool {
    use cairn::checkpoint::schema::TypeIdentity;
    let store = CheckpointStore::open(&dirs.checkpoint()).unwrap();
    let graph = store.recover().unwrap().state.expect("a checkpoint").graph;
    let ops: Vec<_> =
        graph.operators.iter().filter(|o| o.kind != cairn::checkpoint::OperatorKind::Source).collect();
    assert!(!ops.is_empty());
    ops.iter().all(|o| {
        matches!(o.key_identity(), TypeIdentity::Schema { .. })
            && matches!(o.state_identity(), TypeIdentity::Schema { .. })
    })
}

fn fixtures() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut found = Vec::new();
    for version in std::fs::read_dir(&root).unwrap() {
        let version = version.unwrap().path();
        if version.is_dir() {
            for f in std::fs::read_dir(&version).unwrap() {
                found.push(f.unwrap().path());
            }
        }
    }
    found.sort();
    found
}

/// A clock stopped at one instant: a fresh run started on it lays its batch times on the same
/// grid as the fixture it is compared with, so state that holds batch times compares exactly.
struct Stopped(i64);

impl Clock for Stopped {
    fn now_ms(&self) -> i64 {
        self.0
    }
}

#[test]
fn every_fixture_restores_to_the_output_and_state_of_a_fresh_run() {
    let found = fixtures();
    assert!(found.len() >= 4, "fixtures are missing: {found:?}");
    for fixture in found {
        let started = CheckpointStore::open(&FixtureDirs::new(&fixture).checkpoint())
            .and_then(|s| s.read_metadata())
            .unwrap()
            .expect("fixture metadata")
            .start_time_ms;
        let fresh_dir = tempfile::tempdir().unwrap();
        let fresh = FixtureDirs::new(fresh_dir.path());
        write_fixture_input(&fresh.input()).unwrap();
        fixture_context(&fresh, END, Some(Arc::new(Stopped(started)))).unwrap().run_available().unwrap();
        let (want_out, want_state) = (outputs(&fresh), final_state(&fresh));
        assert_eq!(want_state.0, END - 1);
        assert_eq!(want_out.len(), FIXTURE_SINKS.len() * (END - FIRST_COMPARED) as usize);

        let dir = tempfile::tempdir().unwrap();
        copy_dir(&fixture, dir.path());
        let dirs = FixtureDirs::new(dir.path());
        let v1 = fixture.parent().is_some_and(|v| v.ends_with("format-v1"));
        assert_eq!(
            graph_has_schemas(&dirs),
            !v1,
            "{}: v1 fixtures store type paths, later ones schema identities",
            fixture.display()
        );
        let summary = fixture_context(&dirs, END, None).unwrap().run_available().unwrap();
        assert!(
            graph_has_schemas(&dirs),
            "{}: restored, it is written with schema identities",
            fixture.display()
        );
        assert_eq!(summary.next_batch.0, END, "{}", fixture.display());
        // It continued from the fixture's checkpoint (batch 5) rather than starting over, and
        // re-ran the crashed fixture's planned batch 6 with its logged input.
        let crashed = fixture.ends_with("killed");
        assert_eq!(summary.replayed_batches, u64::from(crashed), "{}", fixture.display());
        assert_eq!(summary.new_batches, END - FIRST_COMPARED - u64::from(crashed), "{}", fixture.display());
        assert!(
            summary.recovery_warnings.is_empty(),
            "{}: {:?}",
            fixture.display(),
            summary.recovery_warnings
        );
        let got_out = outputs(&dirs);
        for (key, want) in &want_out {
            assert_eq!(got_out.get(key), Some(want), "{}: sink {} batch {}", fixture.display(), key.0, key.1);
        }
        assert_eq!(final_state(&dirs), want_state, "{}: final state", fixture.display());
    }
}
