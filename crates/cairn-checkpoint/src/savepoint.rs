//! State as data, out of and into checkpoint locations: `export` writes a keyed operator's state
//! as JSON rows (decoded with the shapes the checkpoint stores, see [`crate::typed`]); `import`
//! creates a new location whose state is another location's newest restore point with one
//! operator's state replaced by such rows: to fix bad state by hand, to bootstrap state, or to
//! move a job to another storage backend. `cairn checkpoint export|import` are thin layers over
//! this module.

use crate::admin::{load_checkpoint, show};
use crate::schema::TypeShape;
use crate::{
    BatchCommit, BatchId, CheckpointKind, CheckpointStore, Error, JobMetadata, OperatorDescription,
    OperatorKind, Result, StateCheckpoint, StateEncoding, TableWriter,
};
use serde_json::{json, Value};

/// A keyed operator's stored value: its state and the batch time its key last got data.
fn value_shape(state: &TypeShape) -> TypeShape {
    TypeShape::Tuple(vec![state.clone(), TypeShape::Prim("i64".into())])
}

fn refuse(operator: &str, reason: impl Into<String>) -> Error {
    Error::Decode { path: format!("operator {operator:?}"), reason: reason.into() }
}

/// Decodes a stored value of a keyed operator (`[state, seen_ms]`) in its encoding.
pub fn decode_value(
    state: &TypeShape,
    encoding: StateEncoding,
    bytes: &[u8],
) -> std::result::Result<Value, String> {
    match encoding {
        StateEncoding::Compact => crate::typed::decode(&value_shape(state), bytes),
        StateEncoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string()),
    }
}

/// Encodes a keyed operator's value (`[state, seen_ms]`) in its encoding, checked against the
/// state's shape either way.
fn encode_value(
    state: &TypeShape,
    encoding: StateEncoding,
    value: &Value,
) -> std::result::Result<Vec<u8>, String> {
    let compact = crate::typed::encode(&value_shape(state), value)?;
    match encoding {
        StateEncoding::Compact => Ok(compact),
        StateEncoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
    }
}

/// The operator's description, if its state can be read and written as data: a keyed operator
/// whose checkpoint stores its key and state shapes.
fn keyed<'g>(
    graph: &'g crate::GraphDescription,
    operator: &str,
) -> Result<(&'g TypeShape, &'g TypeShape, StateEncoding)> {
    let Some(op) = graph.operators.iter().find(|o| o.name == operator) else {
        let names: Vec<&str> = graph.operators.iter().map(|o| o.name.as_str()).collect();
        return Err(refuse(operator, format!("no such operator in the checkpoint; it has {names:?}")));
    };
    if !matches!(op.kind, OperatorKind::UpdateStateByKey | OperatorKind::MapWithState) {
        return Err(refuse(
            operator,
            format!(
                "{} state cannot be exported or imported yet (update_state_by_key and map_with_state can)",
                op.kind
            ),
        ));
    }
    match op {
        OperatorDescription { key_shape: Some(k), state_shape: Some(s), state_encoding, .. } => {
            Ok((k, s, *state_encoding))
        }
        _ => Err(refuse(
            operator,
            "the checkpoint does not store the shapes of its key and state types (it was written by a \
             cairn release before they were stored, or a type's Deserialize impl could not be traced); \
             run the job once with this release so that its next checkpoint stores them",
        )),
    }
}

/// The newest restorable checkpoint of a location (merged from its chain).
fn newest(store: &CheckpointStore) -> Result<StateCheckpoint> {
    let d = show(store, None)?;
    let b = d.checkpoint_batch.ok_or_else(|| Error::Unrecoverable {
        location: store.location().to_string(),
        reason: "no restorable checkpoint".into(),
    })?;
    load_checkpoint(store, BatchId(b))
}

/// Every key of a keyed operator's state in the newest restorable checkpoint, decoded:
/// `{"key": ..., "state": ..., "seen_ms": ...}` (`seen_ms`: the batch time the key last got
/// data, which idle timeouts count from). Returns the checkpoint's batch and the rows.
pub fn export(store: &CheckpointStore, operator: &str) -> Result<(BatchId, Vec<Value>)> {
    let state = newest(store)?;
    let (key_shape, state_shape, encoding) = keyed(&state.graph, operator)?;
    let mut rows = Vec::new();
    for t in state.tables.iter().filter(|t| t.id == operator) {
        for e in t.reader() {
            let (k, v) = e?;
            let Some(v) = v else { continue };
            let bad = |what: &str, e: String| Error::Decode {
                path: format!("table {}", t.id),
                reason: format!("{what}: {e}"),
            };
            let key = crate::typed::decode(key_shape, k).map_err(|e| bad("a key", e))?;
            let decoded = decode_value(state_shape, encoding, v).map_err(|e| bad("a value", e))?;
            let [state, seen_ms] = <[Value; 2]>::try_from(decoded.as_array().cloned().unwrap_or_default())
                .map_err(|_| bad("a value", "not a (state, time) pair".into()))?;
            rows.push(json!({"key": key, "state": state, "seen_ms": seen_ms}));
        }
    }
    Ok((state.batch_id, rows))
}

/// What an import wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImportReport {
    /// The batch the new location's state stands after; the job resumes with the next one.
    pub batch: u64,
    /// Keys of the operator written.
    pub rows: u64,
    /// The new location's job id (a new job for sinks: they key their progress by it).
    pub job_id: String,
}

/// Creates `target` (which must be empty) as a copy of `source`'s newest restore point with
/// `operator`'s state replaced by `rows` (as [`export`] writes them; a row without `seen_ms`
/// keeps the key's stored time, or the checkpoint's newest one for a new key). Sources'
/// positions and other operators' state are copied as they are, so the job resumes on `target`
/// with the next batch, as a new job for its sinks (new job id). A row that does not fit the
/// stored shapes is refused with its line number, and nothing is written.
pub fn import(
    source: &CheckpointStore,
    target: &CheckpointStore,
    operator: &str,
    rows: &[Value],
    now_ms: i64,
) -> Result<ImportReport> {
    let metadata = source.read_metadata()?.ok_or_else(|| Error::Unrecoverable {
        location: source.location().to_string(),
        reason: "no metadata".into(),
    })?;
    let mut state = newest(source)?;
    let (key_shape, state_shape, encoding) = keyed(&state.graph, operator)?;
    let original = state.tables.iter().find(|t| t.id == operator);
    let mut times = std::collections::HashMap::new();
    let mut newest_time = 0i64;
    if let Some(t) = original {
        for e in t.reader() {
            let (k, v) = e?;
            if let Some(v) = v {
                let pair = decode_value(state_shape, encoding, v).ok();
                let time = pair.as_ref().and_then(|p| p[1].as_i64()).unwrap_or(0);
                newest_time = newest_time.max(time);
                times.insert(k.to_vec(), time);
            }
        }
    }
    let mut table = TableWriter::new();
    for (i, row) in rows.iter().enumerate() {
        let bad = |e: String| Error::Decode { path: format!("row {}", i + 1), reason: e };
        let key = crate::typed::encode(key_shape, row.get("key").ok_or_else(|| bad("no \"key\"".into()))?)
            .map_err(|e| bad(format!("key: {e}")))?;
        let st = row.get("state").ok_or_else(|| bad("no \"state\"".into()))?;
        let seen = match row.get("seen_ms") {
            Some(t) => t.clone(),
            None => json!(times.get(&key).copied().unwrap_or(newest_time)),
        };
        let v = encode_value(state_shape, encoding, &json!([st, seen]))
            .map_err(|e| bad(format!("state: {e}")))?;
        table.put(&key, &v);
    }
    let written = table.len();
    state.tables.retain(|t| t.id != operator);
    state.tables.push(table.finish(operator));
    state.kind = CheckpointKind::Full;

    if target.read_metadata()?.is_some() || !target.list_objects()?.is_empty() {
        return Err(Error::Conflict {
            path: target.location().to_string(),
            reason: "an import creates a new location; this one is not empty".into(),
        });
    }
    let job_id = format!("{}-{now_ms:x}", metadata.app_name);
    target.create_metadata(&JobMetadata { job_id: job_id.clone(), created_ms: now_ms, ..metadata })?;
    target.write_checkpoint(&state)?;
    target.write_commit(&BatchCommit {
        batch_id: state.batch_id,
        committed_at_ms: now_ms,
        input_records: 0,
        processing_ms: 0,
        epoch: target.epoch(),
    })?;
    // What was written must read back as what a restart will restore.
    let check = newest(target)?;
    if check.batch_id != state.batch_id || !check.tables.iter().any(|t| t.id == operator) {
        return Err(Error::Unrecoverable {
            location: target.location().to_string(),
            reason: format!("the imported checkpoint did not read back (found batch {})", check.batch_id),
        });
    }
    Ok(ImportReport { batch: state.batch_id.0, rows: written, job_id })
}
