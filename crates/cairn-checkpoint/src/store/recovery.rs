//! Recovery orchestration: reads what the listing names, verifies it, and applies the pure
//! decisions of [`crate::protocol`] to find what a restart loads and replays.

use super::*;

/// State restored from the newest usable checkpoint.
#[derive(Debug, Clone)]
pub struct RestoredState {
    /// The batch after which the state was taken.
    pub batch_id: BatchId,
    /// The graph that wrote it.
    pub graph: GraphDescription,
    /// One merged table per id: only live entries, no tombstones.
    pub tables: Vec<TableData>,
    /// The objects that were loaded, oldest first.
    pub chain: Vec<ObjectName>,
}

/// What recovery found.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// The job metadata, from whichever copy verifies; `None` on a location never initialised.
    pub metadata: Option<JobMetadata>,
    /// The restored state; `None` when there is no checkpoint, or when none restores and the
    /// whole batch log is replayed from empty state.
    pub state: Option<RestoredState>,
    /// Batches planned after the restored checkpoint, in order, to be re-run with identical input.
    pub replay: Vec<BatchPlan>,
    /// Which of the replayed batches already have a commit record.
    pub committed: BTreeSet<BatchId>,
    /// Replayed batches whose plan object was damaged or missing and was rebuilt from its
    /// successor's copy; the engine rewrites them.
    pub rebuilt_plans: Vec<BatchId>,
    /// A copy of the newest plan, for the next plan to carry.
    pub last_plan: Option<crate::PlanCopy>,
    /// State objects that failed verification. Recovery worked around them; the engine deletes
    /// them and writes a full checkpoint next, so that nothing new builds on them and retention
    /// does not count them as a restore point.
    pub damaged_state: Vec<ObjectName>,
    /// The id the next new batch gets.
    pub next_batch: BatchId,
    /// Problems recovery worked around (a corrupt newest checkpoint, a torn trailing plan...).
    pub warnings: Vec<String>,
    /// Objects recovery did not accept because a newer lease epoch fenced their writer off
    /// (see [`protocol::fenced`]); the lease holder removes them with
    /// [`CheckpointStore::remove_fenced`].
    pub fenced: Vec<ObjectName>,
    /// Time spent reading and merging state objects.
    pub restore_ms: u64,
    /// Bytes of state objects read while restoring, including objects that failed verification.
    pub bytes_read: u64,
    /// State objects read while restoring, including objects that failed verification.
    pub objects_read: u64,
}

/// A copy of a redundant object that is missing or damaged, and what is wrong with it.
pub type DamagedCopy = (ObjectName, String);

/// Why a state object could not be used during recovery.
#[derive(Debug, Clone)]
struct Unusable {
    /// It is present but does not verify (checksum, header, name mismatch) or is missing: never
    /// usable again. Storage errors and objects of a newer format are not damage.
    damaged: bool,
    reason: String,
}

impl CheckpointStore {
    /// Reads and verifies a state object: (name, bytes read, checkpoint or why it is unusable).
    fn fetch_state(
        &self,
        name: ObjectName,
    ) -> (ObjectName, u64, std::result::Result<StateCheckpoint, Unusable>) {
        let path = self.paths.path(name);
        let unusable =
            |e: Error| Unusable { damaged: matches!(e, Error::Corrupt { .. }), reason: e.to_string() };
        match self.get_required(&path) {
            Ok(bytes) => (name, bytes.len() as u64, self.decode_state_at(name, &bytes).map_err(unusable)),
            Err(e) => (name, 0, Err(unusable(e))),
        }
    }

    /// Finds what to restore: the newest checkpoint whose objects all verify, and the planned
    /// batches after it. Damage is worked around where possible and reported in `warnings`.
    pub fn recover(&self) -> Result<Recovered> {
        let t0 = std::time::Instant::now();
        let (metadata, bad_metadata) = self.inspect_metadata()?;
        let listing = self.listing()?;
        let mut warnings: Vec<String> = bad_metadata
            .iter()
            // A missing second copy is a location written before copies existed: repaired quietly.
            .filter(|(n, e)| !(*n == ObjectName::MetadataCopy && e == "missing"))
            .map(|(n, e)| format!("{} is {e}; the other copy is used", self.paths.path(*n)))
            .collect();
        let fences = self.read_fences()?;
        // Only objects about a batch at or past some fence point can be fenced off.
        let min_fence = fences.values().min().copied();
        let mut fenced = Vec::new();
        let mut seen: BTreeSet<ObjectName> = BTreeSet::new();
        let mut failures = Vec::new();
        let mut cache: HashMap<ObjectName, std::result::Result<StateCheckpoint, Unusable>> = HashMap::new();
        let mut damaged = BTreeSet::new();
        let (mut bytes_read, mut objects_read) = (0u64, 0u64);
        let mut restored = None;
        let attempts = protocol::recovery_attempts(&listing);
        // The newest checkpoint's objects are read and decoded in parallel: they are what
        // recovery almost always loads, and restore time is what a restart waits for.
        if let Some(first) = attempts.first() {
            let loaded: Vec<(ObjectName, u64, std::result::Result<StateCheckpoint, Unusable>)> =
                std::thread::scope(|sc| {
                    let handles: Vec<_> =
                        first.chain.iter().map(|n| sc.spawn(move || self.fetch_state(*n))).collect();
                    handles.into_iter().filter_map(|h| h.join().ok()).collect()
                });
            for (name, bytes, r) in loaded {
                objects_read += 1;
                bytes_read += bytes;
                cache.insert(name, r);
            }
        }
        for attempt in attempts {
            let mut chain = Vec::with_capacity(attempt.chain.len());
            let mut failure = None;
            for name in &attempt.chain {
                let entry = match cache.remove(name) {
                    Some(e) => e,
                    None => {
                        let (_, bytes, r) = self.fetch_state(*name);
                        objects_read += 1;
                        bytes_read += bytes;
                        r
                    }
                };
                seen.insert(*name);
                let entry = entry.and_then(|c| match protocol::fenced(&fences, c.epoch, c.batch_id) {
                    Some(f) => {
                        if !fenced.contains(name) {
                            fenced.push(*name);
                        }
                        Err(Unusable {
                            damaged: false,
                            reason: format!(
                                "{} was written by lease epoch {} after {f}",
                                self.paths.path(*name),
                                c.epoch
                            ),
                        })
                    }
                    None => Ok(c),
                });
                match entry {
                    Ok(c) => chain.push(c),
                    Err(e) => {
                        if e.damaged {
                            damaged.insert(*name);
                        }
                        cache.insert(*name, Err(e.clone()));
                        failure = Some(e.reason);
                        break;
                    }
                }
            }
            let outcome = match failure {
                Some(e) => Err(e),
                None => merge::merge_chain(chain).map_err(|e| e.to_string()).and_then(|merged| {
                    let replay =
                        protocol::replay_batches(&listing, Some(attempt.batch)).map_err(|e| e.to_string())?;
                    Ok((merged, replay))
                }),
            };
            match outcome {
                Ok((merged, replay)) => {
                    restored = Some((merged, attempt.chain.clone(), replay));
                    break;
                }
                Err(e) => {
                    let w = format!("checkpoint after batch {} unusable: {e}; falling back", attempt.batch);
                    tracing::warn!("{w}");
                    warnings.push(w);
                    failures.push(format!("batch {}: {e}", attempt.batch));
                }
            }
        }
        let (state, replay_ids) = match restored {
            Some((merged, chain, replay)) => (
                Some(RestoredState {
                    batch_id: merged.batch_id,
                    graph: merged.graph,
                    tables: merged.tables,
                    chain,
                }),
                replay,
            ),
            None => {
                // No checkpoint restores (or none exists): replaying the whole log from the
                // start is the last restore point, kept by retention until an independent
                // checkpoint exists.
                let unrecoverable =
                    |reason: String| Error::Unrecoverable { location: self.location.clone(), reason };
                match protocol::restore_without_checkpoint(&listing) {
                    Ok(protocol::WithoutCheckpoint::Fresh(replay)) => (None, replay),
                    Ok(protocol::WithoutCheckpoint::ReplayWholeLog(replay)) => {
                        let w = "no checkpoint could be restored; replaying the batch log from batch 0"
                            .to_string();
                        tracing::warn!("{w}");
                        warnings.push(w);
                        (None, replay)
                    }
                    Ok(protocol::WithoutCheckpoint::NoRestorePoint) => {
                        let why = if failures.is_empty() {
                            "no checkpoint has a complete chain of objects".to_string()
                        } else {
                            format!("every checkpoint failed to load ({})", failures.join("; "))
                        };
                        return Err(unrecoverable(format!(
                            "{why}, and the batch log no longer starts at batch 0; start from an older copy of the location, or from scratch on a new one"
                        )));
                    }
                    Err(damage) => return Err(unrecoverable(damage.to_string())),
                }
            }
        };
        if let (Some(s), Some(newest)) = (&state, listing.checkpoints().last()) {
            if s.batch_id < *newest {
                let w = format!(
                    "restored the checkpoint after batch {} although checkpoints up to batch {newest} exist: the newer ones are damaged or incomplete",
                    s.batch_id
                );
                tracing::warn!("{w}");
                warnings.push(w);
            }
        }
        // State objects no attempt read but a fence may exclude (a stale holder's late write
        // next to a usable snapshot): found now, so the holder can remove them.
        if let Some(min) = min_fence {
            for name in listing.names().filter(|n| !seen.contains(n)) {
                let (ObjectName::Full(b) | ObjectName::Delta { batch: b, .. }) = name else { continue };
                if b < min {
                    continue;
                }
                if let (_, _, Ok(c)) = self.fetch_state(name) {
                    if protocol::fenced(&fences, c.epoch, c.batch_id).is_some() {
                        fenced.push(name);
                    }
                }
            }
        }
        let restore_ms = t0.elapsed().as_millis() as u64;
        let mut commits: BTreeSet<BatchId> = listing.commits().into_iter().collect();
        if let Some(min) = min_fence {
            for b in listing.commits().into_iter().filter(|b| *b >= min) {
                if let Ok(c) = self.read_commit(b) {
                    if protocol::fenced(&fences, c.epoch, c.batch_id).is_some() {
                        commits.remove(&b);
                        fenced.push(ObjectName::Commit(b));
                    }
                }
            }
        }
        let read = replay_ids.iter().map(|id| self.read_plan(*id)).collect();
        let resolved = protocol::resolve_plans(&replay_ids, read, &commits).map_err(|damage| {
            Error::Unrecoverable { location: self.location.clone(), reason: damage.to_string() }
        })?;
        for w in &resolved.warnings {
            tracing::warn!("{w}");
        }
        warnings.extend(resolved.warnings);
        let mut replay = resolved.plans;
        let epochs: Vec<(BatchId, crate::Epoch)> = replay.iter().map(|p| (p.batch_id, p.epoch)).collect();
        let protocol::ReplaySplit { accepted, rejected } = protocol::split_replay(&epochs, &fences)
            .map_err(|e| Error::Unrecoverable { location: self.location.clone(), reason: e.to_string() })?;
        for (b, f) in &rejected {
            let w = format!("the plan of batch {b} is not accepted: its writer was fenced off ({f}); it will be planned again");
            tracing::warn!("{w}");
            warnings.push(w);
            fenced.push(ObjectName::Plan(*b));
        }
        replay.truncate(accepted.len());
        let rebuilt_plans = resolved.rebuilt.into_iter().filter(|b| accepted.contains(b)).collect();
        let next_batch = match (replay.last(), &state) {
            (Some(p), _) => BatchId(p.batch_id.0 + 1),
            (None, Some(s)) => BatchId(s.batch_id.0 + 1),
            (None, None) => BatchId(0),
        };
        // Committedness is judged on the objects recovery accepted: a fenced writer's commit or
        // plan proves nothing.
        let accepted_listing = listing.without(&fenced);
        let committed = replay
            .iter()
            .map(|p| p.batch_id)
            .filter(|b| protocol::is_committed(&accepted_listing, *b))
            .collect();
        // The next plan carries a copy of the newest one; without a replay it was not read yet.
        let last_plan = match replay.last() {
            Some(p) => Some(p.copy()),
            None => next_batch
                .0
                .checked_sub(1)
                .filter(|b| accepted_listing.contains(ObjectName::Plan(BatchId(*b))))
                .and_then(|b| self.read_plan(BatchId(b)).ok())
                .map(|p| p.copy()),
        };
        // Only objects present in the listing: a missing one needs no clean-up.
        let damaged_state = damaged.into_iter().filter(|n| listing.contains(*n)).collect();
        Ok(Recovered {
            damaged_state,
            last_plan,
            rebuilt_plans,
            metadata,
            state,
            replay,
            committed,
            next_batch,
            warnings,
            fenced,
            restore_ms,
            bytes_read,
            objects_read,
        })
    }
}
