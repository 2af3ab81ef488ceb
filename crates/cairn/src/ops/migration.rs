//! State migrations: converting a keyed operator's stored state, written by an older version of
//! the job, into the state type of the running code.
//!
//! A migration is declared on the operator's name ([`OpName::migrate_from`]) with the old state
//! type and a function to the new one. At restore, when the checkpoint holds the operator's
//! state at that older version (and with that old type's shape), each stored value is decoded as
//! the old type, converted, and encoded as the new one, before the operator loads it; the next
//! checkpoint is then a full snapshot written at the new version. Until that snapshot exists a
//! restart migrates the old state again, from the same objects, so a crash in between loses
//! nothing.
//!
//! [`OpName::migrate_from`]: crate::OpName::migrate_from

use crate::error::{Error, Result};
use crate::graph::state::{type_identity, StateData};
use cairn_checkpoint::schema::TypeIdentity;
use cairn_checkpoint::{MigrationSource, StateEncoding, TableData, TableWriter};
use std::any::TypeId;
use std::sync::Arc;

/// Converts one stored value (`(old state, last data batch time)` in the stored encoding) into
/// the new type in the operator's encoding; `Ok(None)` drops the key.
type Convert = Arc<
    dyn Fn(&[u8], StateEncoding, StateEncoding) -> std::result::Result<Option<Vec<u8>>, String> + Send + Sync,
>;

/// One declared conversion from an older state version to the operator's current state type.
#[derive(Clone)]
pub(crate) struct Migration {
    pub(crate) from_version: u32,
    /// The old state type's identity, as a checkpoint written by that version stores it.
    pub(crate) from_identity: String,
    /// The state type the conversion produces, checked against the operator's.
    pub(crate) to: (TypeId, &'static str),
    convert: Convert,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("from_version", &self.from_version)
            .field("from", &TypeIdentity::parse(&self.from_identity).to_string())
            .field("to", &self.to.1)
            .finish()
    }
}

impl Migration {
    pub(crate) fn new<O: StateData, S: StateData>(
        from_version: u32,
        f: impl Fn(O) -> Option<S> + Send + Sync + 'static,
    ) -> Self {
        let convert: Convert = Arc::new(move |bytes: &[u8], from: StateEncoding, to: StateEncoding| {
            let (old, seen_ms): (O, i64) = match from {
                StateEncoding::Compact => postcard::from_bytes(bytes).map_err(|e| e.to_string())?,
                StateEncoding::Json => serde_json::from_slice(bytes).map_err(|e| e.to_string())?,
            };
            let Some(new) = f(old) else { return Ok(None) };
            match to {
                StateEncoding::Compact => postcard::to_allocvec(&(new, seen_ms)).map_err(|e| e.to_string()),
                StateEncoding::Json => serde_json::to_vec(&(new, seen_ms)).map_err(|e| e.to_string()),
            }
            .map(Some)
        });
        Self {
            from_version,
            from_identity: type_identity::<O>(),
            to: (TypeId::of::<S>(), std::any::type_name::<S>()),
            convert,
        }
    }

    /// What the migration reads, as graph descriptions record it.
    pub(crate) fn source(&self) -> MigrationSource {
        MigrationSource { from_version: self.from_version, state_type: self.from_identity.clone() }
    }

    /// The operator's table with every value converted from the stored encoding `from` to the
    /// operator's `to` (keys the conversion drops become absent). Runs on the restored, merged
    /// state, so there are no tombstones to keep.
    pub(crate) fn apply(
        &self,
        op: &str,
        table: &TableData,
        from: StateEncoding,
        to: StateEncoding,
    ) -> Result<TableData> {
        let mut out = TableWriter::new();
        for entry in table.reader() {
            let (key, value) = entry.map_err(Error::Checkpoint)?;
            let Some(value) = value else { continue };
            let converted = (self.convert)(value, from, to).map_err(|e| {
                Error::state(
                    op,
                    format!(
                        "cannot migrate a stored value from state version {} ({}): {e}",
                        self.from_version,
                        TypeIdentity::parse(&self.from_identity)
                    ),
                )
            })?;
            if let Some(v) = converted {
                out.put(key, &v);
            }
        }
        Ok(out.finish(table.id.clone()))
    }
}

/// Checks an operator's declared migrations against its version and state type; what is wrong
/// is a graph-building mistake, reported when the job starts.
pub(crate) fn check<S: 'static>(op: &str, version: u32, migrations: &[Migration]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for m in migrations {
        if m.to.0 != TypeId::of::<S>() {
            errors.push(format!(
                "operator {op:?}: the migration from version {} produces {} but the operator's state is {}",
                m.from_version,
                m.to.1,
                std::any::type_name::<S>()
            ));
        }
        if m.from_version >= version {
            errors.push(format!(
                "operator {op:?} is at state version {version}: a migration from version {} must come from an older one (raise the version with .with_version)",
                m.from_version
            ));
        }
        if !seen.insert(m.from_version) {
            errors.push(format!("operator {op:?} has two migrations from version {}", m.from_version));
        }
    }
    errors
}
