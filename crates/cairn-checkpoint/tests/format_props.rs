//! Property tests for every stored format: encode/decode roundtrips, and damage of any kind (a
//! flipped bit anywhere, truncation to any length, trailing bytes) is detected, never decoded.

use cairn_checkpoint::codec::{decode_json, decode_state, encode_json, encode_state};
use cairn_checkpoint::frame::ObjectKind;
use cairn_checkpoint::merge::merge_chain;
use cairn_checkpoint::table::key_order;
use cairn_checkpoint::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

fn arb_graph() -> impl Strategy<Value = GraphDescription> {
    (
        prop::collection::vec(
            ("[a-z]{1,8}", "[a-z_]{1,12}", "[a-z0-9:]{0,10}", ".{0,10}", any::<u32>()),
            0..4,
        ),
        any::<u32>(),
    )
        .prop_map(|(ops, parallelism)| GraphDescription {
            operators: ops
                .into_iter()
                .map(|(name, kind, key_type, state_type, state_version)| OperatorDescription {
                    name,
                    kind: kind.into(),
                    key_type,
                    state_type,
                    state_version,
                    key_shape: None,
                    state_shape: None,
                    state_encoding: Default::default(),
                    renamed_from: Vec::new(),
                    migrations: Vec::new(),
                })
                .collect(),
            parallelism,
        })
}

fn partition() -> impl Strategy<Value = SourcePartition> {
    prop_oneof![
        ".{0,12}".prop_map(SourcePartition::Named),
        (".{0,12}", any::<i32>()).prop_map(|(topic, partition)| SourcePartition::Topic { topic, partition }),
    ]
}

fn arb_plan() -> impl Strategy<Value = BatchPlan> {
    (
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        prop::collection::vec(
            ("[a-z]{1,6}", prop::collection::vec((partition(), any::<u64>(), any::<u64>()), 0..4)),
            0..3,
        ),
    )
        .prop_map(|(b, t, p, sources)| BatchPlan {
            batch_id: BatchId(b),
            batch_time_ms: t,
            planned_at_ms: p,
            sources: sources
                .into_iter()
                .map(|(source, ranges)| SourcePlan {
                    source,
                    ranges: ranges
                        .into_iter()
                        .map(|(partition, start, end)| OffsetRange { partition, start, end })
                        .collect(),
                })
                .collect(),
            previous_commit: None,
            previous_plan: None,
            epoch: b % 7,
        })
}

type Ops = Vec<(Vec<u8>, Option<Vec<u8>>)>;

fn arb_ops() -> impl Strategy<Value = Ops> {
    // Values around and past 127 bytes exercise multi-byte length varints.
    let value =
        prop_oneof![prop::collection::vec(any::<u8>(), 0..6), prop::collection::vec(any::<u8>(), 120..300)];
    prop::collection::vec((prop::collection::vec(0u8..6, 0..3), prop::option::of(value)), 0..24)
}

fn table(id: &str, ops: &Ops) -> TableData {
    let mut w = TableWriter::new();
    for (k, v) in ops {
        match v {
            Some(v) => w.put(k, v),
            None => w.delete(k),
        }
    }
    w.finish(id)
}

fn arb_checkpoint() -> impl Strategy<Value = StateCheckpoint> {
    (
        any::<u64>(),
        prop::option::of(any::<u64>()),
        any::<i64>(),
        arb_graph(),
        prop::collection::vec(("[a-z/$]{1,8}", arb_ops()), 0..3),
    )
        .prop_map(|(b, parent, created_ms, graph, tables)| StateCheckpoint {
            batch_id: BatchId(b),
            kind: parent.map_or(CheckpointKind::Full, |p| CheckpointKind::Delta { parent: BatchId(p) }),
            created_ms,
            graph,
            tables: tables.iter().map(|(id, ops)| table(id, ops)).collect(),
            epoch: b.rotate_left(17),
        })
}

/// Every single-bit flip of `bytes` must make `decode` fail.
fn all_flips_detected(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> bool,
    byte: usize,
    bit: u8,
) -> Result<(), TestCaseError> {
    let mut bad = bytes.to_vec();
    let i = byte % bad.len();
    bad[i] ^= 1 << (bit % 8);
    prop_assert!(!decode(&bad), "flipping bit {} of byte {i} went unnoticed", bit % 8);
    Ok(())
}

fn truncations_detected(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> bool,
    cut: usize,
) -> Result<(), TestCaseError> {
    let len = cut % bytes.len();
    prop_assert!(!decode(&bytes[..len]), "truncation to {len} of {} bytes went unnoticed", bytes.len());
    let mut longer = bytes.to_vec();
    longer.push(0);
    prop_assert!(!decode(&longer), "a trailing byte went unnoticed");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn plan_roundtrip_and_damage(plan in arb_plan(), byte in any::<usize>(), bit in any::<u8>(), cut in any::<usize>()) {
        let bytes = encode_json(ObjectKind::Plan, &plan);
        prop_assert_eq!(decode_json::<BatchPlan>("p", &bytes, ObjectKind::Plan).unwrap(), plan);
        let ok = |b: &[u8]| decode_json::<BatchPlan>("p", b, ObjectKind::Plan).is_ok();
        all_flips_detected(&bytes, ok, byte, bit)?;
        truncations_detected(&bytes, ok, cut)?;
        prop_assert!(decode_json::<BatchPlan>("p", &bytes, ObjectKind::Commit).is_err(), "wrong kind accepted");
    }

    #[test]
    fn commit_and_lease_and_metadata_roundtrip(b in any::<u64>(), t in any::<i64>(), n in any::<u64>(), name in ".{0,20}",
                                               graph in arb_graph(), byte in any::<usize>(), bit in any::<u8>(), cut in any::<usize>()) {
        let c = BatchCommit { batch_id: BatchId(b), committed_at_ms: t, input_records: n, processing_ms: n / 3, epoch: n / 5 };
        let bytes = encode_json(ObjectKind::Commit, &c);
        prop_assert_eq!(decode_json::<BatchCommit>("c", &bytes, ObjectKind::Commit).unwrap(), c);
        let ok = |x: &[u8]| decode_json::<BatchCommit>("c", x, ObjectKind::Commit).is_ok();
        all_flips_detected(&bytes, ok, byte, bit)?;
        truncations_detected(&bytes, ok, cut)?;

        let l = LeaseRecord { owner: name.clone(), host: "h".into(), pid: n as u32, started_ms: t, heartbeat_ms: t, ttl_ms: n, epoch: b, released: n % 2 == 0, fence_from: None };
        let bytes = encode_json(ObjectKind::Lease, &l);
        prop_assert_eq!(decode_json::<LeaseRecord>("l", &bytes, ObjectKind::Lease).unwrap(), l);

        let m = JobMetadata { format_version: FORMAT_VERSION, app_name: name, job_id: "j".into(), created_ms: t,
                              batch_interval_ms: n, start_time_ms: t, graph };
        let bytes = encode_json(ObjectKind::Metadata, &m);
        prop_assert_eq!(decode_json::<JobMetadata>("m", &bytes, ObjectKind::Metadata).unwrap(), m);
        let ok = |x: &[u8]| decode_json::<JobMetadata>("m", x, ObjectKind::Metadata).is_ok();
        all_flips_detected(&bytes, ok, byte, bit)?;
        truncations_detected(&bytes, ok, cut)?;
    }

    #[test]
    fn state_roundtrip_and_damage(c in arb_checkpoint(), byte in any::<usize>(), bit in any::<u8>(), cut in any::<usize>()) {
        let bytes = encode_state(&c);
        // Stored tables hold the same entries, in key order (equal keys in written order).
        let mut stored = c.clone();
        for t in &mut stored.tables {
            let mut pairs: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                t.reader().map(|e| e.map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))).collect::<Result<_>>().unwrap();
            pairs.sort_by(|a, b| key_order(&a.0, &b.0));
            t.data = table(&t.id, &pairs).data;
        }
        prop_assert_eq!(decode_state("s", &bytes).unwrap(), stored);
        let ok = |b: &[u8]| decode_state("s", b).is_ok();
        all_flips_detected(&bytes, ok, byte, bit)?;
        truncations_detected(&bytes, ok, cut)?;
    }

    #[test]
    fn partition_keys_roundtrip_and_keep_distinct_partitions_apart(a in partition(), b in partition()) {
        prop_assert_eq!(SourcePartition::from_key_bytes(&a.key_bytes()), Some(a.clone()));
        prop_assert_eq!(a.key_bytes() == b.key_bytes(), a == b);
    }

    #[test]
    fn table_roundtrip(ops in arb_ops()) {
        let t = table("t", &ops);
        let got: Vec<(Vec<u8>, Option<Vec<u8>>)> =
            t.reader().map(|e| e.map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))).collect::<Result<_>>().unwrap();
        prop_assert_eq!(got, ops.clone());
        prop_assert_eq!(t.entries as usize, ops.len());
    }

    /// Merging a chain equals applying its operations in order to a map.
    #[test]
    fn merge_matches_a_model(base in arb_ops(), deltas in prop::collection::vec(arb_ops(), 0..4)) {
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        // A full snapshot has no tombstones; later puts of a key override earlier ones.
        let base: Ops = base.into_iter().filter(|(_, v)| v.is_some()).collect();
        for (k, v) in &base {
            model.insert(k.clone(), v.clone().unwrap());
        }
        let mut chain = vec![StateCheckpoint { batch_id: BatchId(0), kind: CheckpointKind::Full, created_ms: 0,
                                               graph: GraphDescription::default(), tables: vec![table("t", &base)], epoch: 0 }];
        for (i, ops) in deltas.iter().enumerate() {
            for (k, v) in ops {
                match v {
                    Some(v) => { model.insert(k.clone(), v.clone()); }
                    None => { model.remove(k); }
                }
            }
            chain.push(StateCheckpoint { batch_id: BatchId(i as u64 + 1), kind: CheckpointKind::Delta { parent: BatchId(i as u64) },
                                         created_ms: 0, graph: GraphDescription::default(), tables: vec![table("t", ops)], epoch: 0 });
        }
        let merged = merge_chain(chain).unwrap();
        prop_assert_eq!(merged.kind, CheckpointKind::Full);
        let got: BTreeMap<Vec<u8>, Vec<u8>> = merged.tables.iter().filter(|t| t.id == "t").flat_map(|t| t.reader())
            .map(|e| { let (k, v) = e.unwrap(); (k.to_vec(), v.expect("no tombstones after a merge").to_vec()) }).collect();
        prop_assert_eq!(got, model);
    }
}

#[test]
fn a_chain_must_link_up() {
    let full = |b| StateCheckpoint {
        batch_id: BatchId(b),
        kind: CheckpointKind::Full,
        created_ms: 0,
        graph: GraphDescription::default(),
        tables: vec![],
        epoch: 0,
    };
    let delta = |b, p| StateCheckpoint { kind: CheckpointKind::Delta { parent: BatchId(p) }, ..full(b) };
    assert!(merge_chain(vec![full(0), delta(2, 1)]).is_err(), "a delta on a missing parent is refused");
    assert!(merge_chain(vec![delta(1, 0)]).is_err(), "a chain must start with a full snapshot");
    assert!(merge_chain(vec![]).is_err());
    assert!(merge_chain(vec![full(0), delta(1, 0), delta(2, 1)]).is_ok());
}

#[test]
fn newer_format_versions_are_refused_by_name() {
    let mut bytes = encode_json(
        ObjectKind::Commit,
        &BatchCommit {
            batch_id: BatchId(1),
            committed_at_ms: 0,
            input_records: 0,
            processing_ms: 0,
            epoch: 0,
        },
    );
    bytes[4] = 9; // version 9
    let body_end = bytes.len() - 4;
    let crc = crc32(&bytes[..body_end]);
    bytes[body_end..].copy_from_slice(&crc.to_le_bytes());
    let err = decode_json::<BatchCommit>("log/x.commit", &bytes, ObjectKind::Commit).unwrap_err().to_string();
    assert!(err.contains("format version 9") && err.contains("log/x.commit"), "{err}");
}

/// CRC-32 (IEEE), bitwise: an independent implementation to re-seal a deliberately edited header.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
