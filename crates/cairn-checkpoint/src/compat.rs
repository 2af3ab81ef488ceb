//! Comparing a stored graph description with a new one: what a deployment adds, removes or
//! retypes. Pure; used by the engine at start and by `cairn checkpoint diff` before a deploy.

use crate::OperatorKind;
use crate::{GraphDescription, OperatorDescription};

/// One difference between the stored graph and the new one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// A new stateful operator or source: it starts empty. Compatible.
    Added {
        /// The new operator's stable name.
        operator: String,
        /// What the new operator is.
        kind: OperatorKind,
    },
    /// A stateful operator whose state the checkpoint holds is gone. Incompatible unless its
    /// state is dropped explicitly.
    Removed {
        /// The removed operator's stable name.
        operator: String,
        /// What the operator was, as the checkpoint recorded it.
        kind: OperatorKind,
    },
    /// A removed source: its offsets are dropped. Compatible.
    SourceRemoved {
        /// The removed source's stable name.
        operator: String,
    },
    /// Kind, key type, state type (their [`StateSchema`](crate::schema::StateSchema) shape) or
    /// state version changed. Incompatible: the stored state cannot be read as the new type.
    Retyped {
        /// The operator's stable name.
        operator: String,
        /// Each change, in words, naming the stored value and then the new one.
        differences: Vec<String>,
    },
    /// The state version or type changed and the new code declares a migration that reads the
    /// stored version: the state is converted at restore. Compatible.
    Migrated {
        /// The operator's stable name.
        operator: String,
        /// The stored state version.
        from_version: u32,
        /// The new code's state version.
        to_version: u32,
    },
    /// A stateful operator now has another name and declares the stored one as its former
    /// name (`OpName::renamed_from`): its state is restored under the new name. Compatible.
    Renamed {
        /// The stored name.
        from: String,
        /// The new name.
        to: String,
    },
    /// The number of partitions changed: state is redistributed by key. Compatible.
    Parallelism {
        /// The parallelism the checkpoint was written with.
        from: u32,
        /// The new graph's parallelism.
        to: u32,
    },
}

impl Change {
    /// Whether a job with this change can start on the checkpoint (given the operators whose
    /// state the user agreed to drop).
    pub fn is_compatible(&self, dropped: &[String]) -> bool {
        match self {
            Change::Removed { operator, .. } | Change::Retyped { operator, .. } => dropped.contains(operator),
            _ => true,
        }
    }

    /// The operator concerned, if any.
    pub fn operator(&self) -> Option<&str> {
        match self {
            Change::Added { operator, .. }
            | Change::Removed { operator, .. }
            | Change::SourceRemoved { operator }
            | Change::Retyped { operator, .. }
            | Change::Migrated { operator, .. } => Some(operator),
            Change::Renamed { to, .. } => Some(to),
            Change::Parallelism { .. } => None,
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added { operator, kind } => write!(f, "new {kind} operator {operator:?} starts with empty state"),
            Change::Removed { operator, kind } => write!(
                f,
                "the {kind} operator {operator:?} was removed from the job but the checkpoint holds its state; restore it, or drop that state explicitly"
            ),
            Change::SourceRemoved { operator } => write!(f, "source {operator:?} was removed; its offsets are dropped"),
            Change::Retyped { operator, differences } => write!(
                f,
                "operator {operator:?}: {}; the stored state cannot be read as the new type: raise the state version and declare a migration from the stored one (OpName::migrate_from), drop that state (drop_state), or use a new operator name",
                differences.join(", ")
            ),
            Change::Migrated { operator, from_version, to_version } => write!(
                f,
                "operator {operator:?}: state migrated from version {from_version} to version {to_version} at restore"
            ),
            Change::Renamed { from, to } => {
                write!(f, "operator {from:?} is now {to:?}: its state is restored under the new name")
            }
            Change::Parallelism { from, to } => {
                write!(f, "parallelism changed from {from} to {to}: state is redistributed by key")
            }
        }
    }
}

fn differences(old: &OperatorDescription, new: &OperatorDescription) -> Vec<String> {
    let mut d = Vec::new();
    if old.kind != new.kind {
        d.push(format!("kind changed from {} to {}", old.kind, new.kind));
    }
    // Types are compared by identity (schema fingerprint, or a legacy type path), and named by
    // it: the stored one, then the new one.
    let types = [
        ("key type", old.key_identity(), new.key_identity()),
        ("state type", old.state_identity(), new.state_identity()),
    ];
    // JSON state values carry their field names: a changed state type is read value by value
    // at restore (a value that does not fit stops the restore, naming its key).
    let json =
        old.state_encoding == crate::StateEncoding::Json && new.state_encoding == crate::StateEncoding::Json;
    for (what, a, b) in types {
        if !(a.matches(&b) || json && what == "state type") {
            d.push(format!("{what} changed from {a} to {b}"));
        }
    }
    if old.state_encoding != new.state_encoding {
        d.push(format!("state encoding changed from {} to {}", old.state_encoding, new.state_encoding));
    }
    if old.state_version != new.state_version {
        d.push(format!("state version changed from {} to {}", old.state_version, new.state_version));
    }
    d
}

/// Every difference between `stored` and `new`, removed and retyped operators first.
///
/// ```
/// use cairn_checkpoint::compat::{diff, Change};
/// use cairn_checkpoint::{GraphDescription, OperatorDescription, OperatorKind};
/// let op = |name: &str, state: &str| OperatorDescription {
///     name: name.into(), kind: OperatorKind::MapWithState, key_type: "u64".into(),
///     state_type: state.into(), state_version: 1, key_shape: None, state_shape: None, state_encoding: Default::default(), renamed_from: vec![], migrations: vec![] };
/// let old = GraphDescription { operators: vec![op("a", "u64"), op("b", "u64")], parallelism: 2 };
/// let new = GraphDescription { operators: vec![op("a", "i64"), op("c", "u64")], parallelism: 2 };
/// let changes = diff(&old, &new);
/// assert!(matches!(&changes[0], Change::Removed { operator, .. } if operator == "b"));
/// assert!(matches!(&changes[1], Change::Retyped { operator, .. } if operator == "a"));
/// assert!(matches!(&changes[2], Change::Added { operator, .. } if operator == "c"));
/// assert!(!changes[0].is_compatible(&[]) && changes[0].is_compatible(&["b".to_string()]));
/// ```
pub fn diff(stored: &GraphDescription, new: &GraphDescription) -> Vec<Change> {
    let mut removed = Vec::new();
    let mut retyped = Vec::new();
    let mut other = Vec::new();
    let mut renamed_to = Vec::new();
    for old in &stored.operators {
        let same_name = new.operators.iter().find(|o| o.name == old.name);
        let renamed = || new.operators.iter().find(|o| o.renamed_from.contains(&old.name));
        let found = match same_name {
            Some(n) => Some(n),
            None => renamed().inspect(|n| {
                other.push(Change::Renamed { from: old.name.clone(), to: n.name.clone() });
                renamed_to.push(n.name.clone());
            }),
        };
        match found {
            None if old.kind == OperatorKind::Source => {
                other.push(Change::SourceRemoved { operator: old.name.clone() })
            }
            None => removed.push(Change::Removed { operator: old.name.clone(), kind: old.kind.clone() }),
            Some(n) => {
                let mut differences = differences(old, n);
                if differences.is_empty() {
                    continue;
                }
                // Only the state changed (same kind and key) and a declared migration reads
                // what is stored: converted at restore.
                let same_key = old.kind == n.kind && old.key_identity().matches(&n.key_identity());
                if same_key && n.migrations.iter().any(|m| m.reads(old)) {
                    other.push(Change::Migrated {
                        operator: n.name.clone(),
                        from_version: old.state_version,
                        to_version: n.state_version,
                    });
                    continue;
                }
                if !n.migrations.is_empty() {
                    let versions: Vec<u32> = n.migrations.iter().map(|m| m.from_version).collect();
                    differences.push(if same_key {
                        format!(
                            "none of its migrations (from versions {versions:?}) reads what is stored: state version {} of type {}",
                            old.state_version,
                            old.state_identity()
                        )
                    } else {
                        "a migration converts state values only, but the key type or the operator kind changed too"
                            .to_string()
                    });
                }
                retyped.push(Change::Retyped { operator: n.name.clone(), differences });
            }
        }
    }
    for n in &new.operators {
        if !stored.operators.iter().any(|o| o.name == n.name) && !renamed_to.contains(&n.name) {
            other.push(Change::Added { operator: n.name.clone(), kind: n.kind.clone() });
        }
    }
    if stored.parallelism != 0 && stored.parallelism != new.parallelism {
        other.push(Change::Parallelism { from: stored.parallelism, to: new.parallelism });
    }
    removed.into_iter().chain(retyped).chain(other).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::StateSchema;

    fn op(key_type: String, state_type: String) -> OperatorDescription {
        OperatorDescription {
            name: "totals".into(),
            kind: OperatorKind::MapWithState,
            key_type,
            state_type,
            state_version: 1,
            key_shape: None,
            state_shape: None,
            state_encoding: Default::default(),
            renamed_from: Vec::new(),
            migrations: Vec::new(),
        }
    }

    fn graph(op: OperatorDescription) -> GraphDescription {
        GraphDescription { operators: vec![op], parallelism: 2 }
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Tally {
        n: u64,
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Tally2 {
        n: u64,
        extra: u8,
    }

    /// A checkpoint from before schema identities stored type paths: the same path is the same
    /// type, another path (a moved type: nothing tells that the shape is the same) is refused.
    #[test]
    fn a_legacy_type_path_matches_the_schema_written_for_the_same_path() {
        let new =
            op(StateSchema::of::<u64>().type_text("u64"), StateSchema::of::<Tally>().type_text("app::Tally"));
        assert!(diff(&graph(op("u64".into(), "app::Tally".into())), &graph(new.clone())).is_empty());
        let changes = diff(&graph(op("u64".into(), "app::old::Tally".into())), &graph(new));
        assert_eq!(changes.len(), 1);
        let text = changes[0].to_string();
        assert!(text.contains("state type changed from app::old::Tally to Tally (shape "), "{text}");
    }

    /// Between schema identities only the shape counts: the path may change, the shape may not.
    #[test]
    fn schema_identities_compare_by_fingerprint() {
        let key = StateSchema::of::<u64>().type_text("u64");
        let stored = graph(op(key.clone(), StateSchema::of::<Tally>().type_text("app::Tally")));
        let moved = graph(op(key.clone(), StateSchema::of::<Tally>().type_text("app::model::Tally")));
        assert!(diff(&stored, &moved).is_empty());
        let grown = graph(op(key, StateSchema::of::<Tally2>().type_text("app::Tally")));
        let changes = diff(&stored, &grown);
        assert!(matches!(&changes[..], [Change::Retyped { operator, differences }]
            if operator == "totals" && differences.len() == 1 && differences[0].starts_with("state type changed from Tally (shape ")));
        assert!(!changes[0].is_compatible(&[]));
    }

    /// A version bump with a migration that reads the stored version and shape is a compatible
    /// `Migrated`; a migration from another version or shape leaves it refused, saying why.
    #[test]
    fn a_migration_that_reads_the_stored_state_makes_a_retyping_compatible() {
        let key = StateSchema::of::<u64>().type_text("u64");
        let tally = StateSchema::of::<Tally>().type_text("Tally");
        let stored = graph(op(key.clone(), tally.clone()));
        let with = |from_version: u32, state_type: &str| {
            let mut n = op(key.clone(), StateSchema::of::<Tally2>().type_text("Tally2"));
            n.state_version = 2;
            n.migrations = vec![crate::MigrationSource { from_version, state_type: state_type.into() }];
            graph(n)
        };
        let changes = diff(&stored, &with(1, &tally));
        assert!(
            matches!(&changes[..], [Change::Migrated { operator, from_version: 1, to_version: 2 }] if operator == "totals")
        );
        assert!(changes[0].is_compatible(&[]));
        assert_eq!(
            changes[0].to_string(),
            "operator \"totals\": state migrated from version 1 to version 2 at restore"
        );
        for refused in [with(3, &tally), with(1, &StateSchema::of::<u64>().type_text("u64"))] {
            let changes = diff(&stored, &refused);
            assert!(!changes[0].is_compatible(&[]));
            let text = changes[0].to_string();
            assert!(text.contains("reads what is stored: state version 1 of type Tally (shape "), "{text}");
        }
    }

    /// An operator found under a former name is renamed, not removed and added; its types are
    /// still compared, under the new name.
    #[test]
    fn a_former_name_makes_a_rename_not_a_removal() {
        let key = StateSchema::of::<u64>().type_text("u64");
        let stored = graph(op(key.clone(), StateSchema::of::<Tally>().type_text("Tally")));
        let mut n = op(key.clone(), StateSchema::of::<Tally>().type_text("Tally"));
        n.name = "tallies".into();
        n.renamed_from = vec!["totals".into()];
        let changes = diff(&stored, &graph(n.clone()));
        assert!(
            matches!(&changes[..], [Change::Renamed { from, to }] if from == "totals" && to == "tallies")
        );
        assert!(changes[0].is_compatible(&[]));
        n.state_type = StateSchema::of::<Tally2>().type_text("Tally2");
        let changes = diff(&stored, &graph(n));
        assert!(matches!(&changes[0], Change::Retyped { operator, .. } if operator == "tallies"));
        assert!(matches!(&changes[1], Change::Renamed { .. }));
    }
}
