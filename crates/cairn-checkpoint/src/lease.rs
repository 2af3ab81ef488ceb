//! A single-writer fence for a checkpoint location, built from create-only objects so it works on
//! every backend (object_store's local file system has no compare-and-swap, S3/GCS/Azure/memory
//! do; create-only works on all of them).
//!
//! Every process that takes the location claims the next **epoch** by creating
//! `lease/<epoch>.claim` (`PutMode::Create`: of two racing starters exactly one wins). It then
//! lists the location and creates `lease/<epoch>.fence` with the point it took over from: objects
//! of older epochs about that batch or later are not accepted (see
//! [`crate::protocol::fenced`]). Liveness is `lease/<epoch>.heartbeat`, rewritten by the holder
//! only; a paused old holder rewriting its own heartbeat cannot affect a newer epoch. A holder
//! has lost the lease exactly when `lease/<epoch+1>.claim` exists, which every commit checks
//! (one GET) before and after it writes.
//!
//! Takeover rules: a holder that died on this host (its pid is gone) is taken over at once, so a
//! job restarted after `kill -9` does not wait; a live holder elsewhere once its heartbeat is
//! older than the TTL; a holder that released the location at once.

use crate::frame::ObjectKind;
use crate::paths::ObjectName;
use crate::protocol::{self, Fences, Listing, Takeover};
use crate::store::{Created, Held};
use crate::{codec, CheckpointStore, Epoch, Error, FenceRecord, LeaseRecord, Result};
use futures::TryStreamExt;
use object_store::{ObjectMeta, PutMode};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A held lease. Dropping it stops the heartbeat; [`Lease::release`] also marks the epoch
/// released so the next process need not wait for the TTL.
pub struct Lease {
    store: CheckpointStore,
    record: LeaseRecord,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
    heartbeat: Option<JoinHandle<()>>,
}

#[allow(clippy::disallowed_methods)] // liveness is about real time, not batch time
pub(crate) fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn unique_owner() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{:x}-{n}", hostname(), std::process::id(), wall_ms())
}

/// The owners of the leases this process holds now (every [`Lease`] not yet dropped).
static HELD_HERE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn held_here(owner: &str) -> bool {
    HELD_HERE.lock().unwrap_or_else(|e| e.into_inner()).contains(owner)
}

/// Whether a process of this host is running: present in /proc and not a zombie (a process
/// killed a moment ago stays a zombie until its parent reaps it).
fn pid_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may contain spaces.
        Ok(stat) => {
            stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        }
        Err(_) => false,
    }
}

fn describe(r: &LeaseRecord, now: i64) -> String {
    format!(
        "epoch {}: pid {} on host {}, last heartbeat {:.1}s ago",
        r.epoch,
        r.pid,
        r.host,
        (now - r.heartbeat_ms).max(0) as f64 / 1e3
    )
}

impl CheckpointStore {
    /// The lease objects of the location (one LIST of the `lease/` prefix).
    fn lease_listing(&self) -> Result<Listing> {
        let dir = self.paths().lease_dir();
        let metas: Vec<ObjectMeta> = self
            .block_on(self.object_store().list(Some(&dir)).try_collect::<Vec<_>>())
            .map_err(|e| Error::storage(&dir, e))?;
        Ok(Listing::new(metas.iter().filter_map(|m| self.paths().parse(&m.location))))
    }

    fn read_lease_object(&self, name: ObjectName) -> Result<Option<LeaseRecord>> {
        let path = self.paths().path(name);
        match self.get(&path)? {
            None => Ok(None),
            Some(b) => codec::decode_json(path.as_ref(), &b, ObjectKind::Lease).map(Some),
        }
    }

    /// The holder of epoch `epoch`: its claim, with the liveness of its latest heartbeat. A
    /// missing or unreadable claim is answered from the heartbeat alone (one damaged lease object
    /// must not hide a live holder); `Ok(None)` when neither names anybody.
    fn epoch_holder(&self, epoch: Epoch) -> Result<Option<LeaseRecord>> {
        let claim = self.read_lease_object(ObjectName::LeaseClaim(epoch));
        let heartbeat = self.read_lease_object(ObjectName::LeaseHeartbeat(epoch));
        match (claim, heartbeat) {
            (Ok(Some(mut claim)), hb) => {
                match hb {
                    Ok(Some(hb)) if hb.owner == claim.owner => {
                        claim.heartbeat_ms = claim.heartbeat_ms.max(hb.heartbeat_ms);
                        claim.released = hb.released;
                        claim.fence_from = hb.fence_from;
                    }
                    Ok(_) => {}
                    // A torn heartbeat only costs liveness information: the claim's own time counts.
                    Err(e) => tracing::warn!("ignoring an unreadable lease heartbeat: {e}"),
                }
                Ok(Some(claim))
            }
            (claim, Ok(Some(hb))) => {
                if let Err(e) = claim {
                    tracing::warn!("the claim of lease epoch {epoch} is unreadable ({e}); its heartbeat names the holder");
                }
                Ok(Some(hb))
            }
            (Err(e), _) => Err(e),
            (Ok(None), Err(e)) => {
                tracing::warn!("ignoring an unreadable lease heartbeat: {e}");
                Ok(None)
            }
            (Ok(None), Ok(None)) => Ok(None),
        }
    }

    /// The current lease holder (the newest epoch), if any.
    pub fn read_lease(&self) -> Result<Option<LeaseRecord>> {
        match protocol::latest_epoch(&self.lease_listing()?) {
            Some(e) => self.epoch_holder(e),
            None => Ok(None),
        }
    }

    /// Every fence point of the location: epoch → the batch it took the location over from.
    pub fn read_fences(&self) -> Result<Fences> {
        Ok(self.fences_with_repairs()?.0)
    }

    /// The fence points, and the fence records that are damaged or lost but whose point survives
    /// in the epoch's heartbeat (the holder rewrites them). An epoch with neither a fence nor a
    /// heartbeat died before fencing (the fence is written before the first heartbeat) and fences
    /// nothing. A fence that cannot be read and has no copy is an error naming both objects: which
    /// objects are accepted cannot be decided without it.
    fn fences_with_repairs(&self) -> Result<(Fences, Vec<FenceRecord>)> {
        let listing = self.lease_listing()?;
        let mut epochs: Vec<Epoch> = listing
            .names()
            .filter_map(|n| match n {
                ObjectName::LeaseFence(e) | ObjectName::LeaseHeartbeat(e) => Some(e),
                _ => None,
            })
            .collect();
        epochs.sort_unstable();
        epochs.dedup();
        let (mut out, mut repairs) = (Fences::new(), Vec::new());
        for e in epochs {
            let name = ObjectName::LeaseFence(e);
            let path = self.paths().path(name);
            let record = match self.get(&path)? {
                Some(b) => codec::decode_json::<FenceRecord>(path.as_ref(), &b, ObjectKind::Fence).map(Some),
                None => Ok(None),
            };
            let damage = match record {
                Ok(Some(f)) => {
                    out.insert(e, f.from_batch);
                    continue;
                }
                Ok(None) => "missing".to_string(),
                Err(err) => err.to_string(),
            };
            let hb_name = ObjectName::LeaseHeartbeat(e);
            let copy = match self.read_lease_object(hb_name) {
                Ok(Some(hb)) => match hb.fence_from {
                    Some(from_batch) => Some(FenceRecord { epoch: e, from_batch, owner: hb.owner }),
                    None => None,
                },
                Ok(None) if !listing.contains(name) => continue, // never fenced
                Ok(None) | Err(_) => None,
            };
            match copy {
                Some(f) => {
                    tracing::warn!("{path} is {damage}; its heartbeat's copy of the fence point is used");
                    out.insert(e, f.from_batch);
                    repairs.push(f);
                }
                None => {
                    return Err(Error::Unrecoverable {
                        location: self.location().to_string(),
                        reason: format!(
                            "the fence of lease epoch {e} is {damage} and its heartbeat {} holds no copy, so which objects that epoch fenced off is unknown; start from an older copy of the location, or from scratch on a new one",
                            self.paths().path(hb_name)
                        ),
                    })
                }
            }
        }
        Ok((out, repairs))
    }

    /// The newest lease epoch claimed at this location (`None` before the first start).
    pub fn latest_epoch(&self) -> Result<Option<Epoch>> {
        Ok(protocol::latest_epoch(&self.lease_listing()?))
    }

    /// `Err(LeaseLost)` when this store's lease epoch has been taken over (the next epoch's
    /// claim exists). Without a lease there is nothing to check.
    pub fn check_lease(&self) -> Result<()> {
        let Some(held) = self.held() else { return Ok(()) };
        let next = ObjectName::LeaseClaim(held.epoch + 1);
        let path = self.paths().path(next);
        let Some(bytes) = self.get(&path)? else { return Ok(()) };
        // The claim exists: whatever its content, this epoch is over.
        let holder = match codec::decode_json::<LeaseRecord>(path.as_ref(), &bytes, ObjectKind::Lease) {
            Ok(r) => describe(&r, wall_ms()),
            Err(e) => format!("epoch {} (unreadable claim: {e})", held.epoch + 1),
        };
        Err(Error::LeaseLost { location: self.location().to_string(), holder })
    }

    /// Takes the location for this process in a new epoch, or fails with [`Error::Locked`]
    /// naming the holder.
    pub fn acquire_lease(&self, ttl: Duration) -> Result<Lease> {
        self.claim_lease(ttl, false, None)
    }

    /// Takes the location in a new epoch whoever holds it now, live or not. For a holder chosen
    /// from outside (a consumer group assigned this process the task the location belongs to):
    /// the previous holder may still be running, paused or cut off, and from the new epoch's
    /// fence on nothing it writes is accepted (every commit of its store checks for the next
    /// epoch's claim before and after it writes, and stops with [`Error::LeaseLost`]).
    ///
    /// With `after: Some(e)` (a process that held epoch `e` and takes the location again, for
    /// example to restart after a failure) it fails with [`Error::LeaseLost`] when an epoch after
    /// `e` exists: somebody else was given the location meanwhile, and taking it back would
    /// undo that decision.
    pub fn take_over_lease(&self, ttl: Duration, after: Option<Epoch>) -> Result<Lease> {
        self.claim_lease(ttl, true, after)
    }

    fn claim_lease(&self, ttl: Duration, force: bool, after: Option<Epoch>) -> Result<Lease> {
        let ttl_ms = ttl.as_millis().max(100) as u64;
        let host = hostname();
        let owner = unique_owner();
        // A holder on this host that was just killed may take a moment to exit: give it that.
        let mut patience = 20;
        let record = loop {
            let latest = protocol::latest_epoch(&self.lease_listing()?);
            if let (Some(held), Some(latest)) = (after, latest) {
                if latest > held {
                    let holder = match self.epoch_holder(latest) {
                        Ok(Some(r)) => describe(&r, wall_ms()),
                        _ => format!("epoch {latest}"),
                    };
                    return Err(Error::LeaseLost { location: self.location().to_string(), holder });
                }
            }
            if let (Some(latest_epoch), true) = (latest, force) {
                tracing::info!("taking over the lease after epoch {latest_epoch}, as assigned");
            } else if let Some(latest_epoch) = latest {
                match self.epoch_holder(latest_epoch) {
                    Ok(Some(cur)) => {
                        let now = wall_ms();
                        let alive = cur.host == host
                            && if cur.pid == std::process::id() {
                                held_here(&cur.owner)
                            } else {
                                pid_alive(cur.pid)
                            };
                        match protocol::takeover(&cur, now, &host, std::process::id(), alive) {
                            Takeover::Free => {}
                            Takeover::DeadHere => {
                                tracing::info!("taking over the lease of pid {} (no longer running)", cur.pid)
                            }
                            Takeover::WaitHere if patience > 0 => {
                                patience -= 1;
                                std::thread::sleep(Duration::from_millis(100));
                                continue;
                            }
                            Takeover::WaitHere => {
                                let left = cur.ttl_ms as i64 - (now - cur.heartbeat_ms);
                                return Err(self.locked(&cur, now, left.max(0) as u64));
                            }
                            Takeover::Held { wait_ms } => return Err(self.locked(&cur, now, wait_ms)),
                        }
                    }
                    // Deleted between the listing and the read: nobody holds that epoch now.
                    Ok(None) => {}
                    // A torn claim names nobody; its epoch number is still used up.
                    Err(e) => tracing::warn!(
                        "taking the epoch after {latest_epoch}, whose claim is unreadable: {e}"
                    ),
                }
            }
            let now = wall_ms();
            let epoch = latest.unwrap_or(0) + 1;
            let record = LeaseRecord {
                owner: owner.clone(),
                host: host.clone(),
                pid: std::process::id(),
                started_ms: now,
                heartbeat_ms: now,
                ttl_ms,
                epoch,
                released: false,
                fence_from: None,
            };
            let path = self.paths().path(ObjectName::LeaseClaim(epoch));
            match self.put(&path, codec::encode_json(ObjectKind::Lease, &record), PutMode::Create)? {
                Created::New => break record,
                Created::Exists(old) => {
                    match codec::decode_json::<LeaseRecord>(path.as_ref(), &old, ObjectKind::Lease) {
                        // A retried create whose first attempt landed: the claim is ours.
                        Ok(r) if r.owner == owner => break record,
                        // Taking over as assigned: a racer (the previous holder restarting, say)
                        // is fenced by the next epoch, unless this process must not go past
                        // `after`, which the next round checks.
                        Ok(_) if force => continue,
                        Ok(r) => return Err(self.locked(&r, wall_ms(), r.ttl_ms)),
                        Err(_) => continue, // a torn claim: that epoch is used up, try the next
                    }
                }
            }
        };
        let epoch = record.epoch;
        // Listed only now that the claim exists: an older holder's object created before the
        // claim is in this listing (below the fence); one created after can see the claim.
        let from_batch = protocol::fence_point(&self.listing()?);
        let fence = FenceRecord { epoch, from_batch, owner: owner.clone() };
        let path = self.paths().path(ObjectName::LeaseFence(epoch));
        if let Created::Exists(old) =
            self.put(&path, codec::encode_json(ObjectKind::Fence, &fence), PutMode::Create)?
        {
            match codec::decode_json::<FenceRecord>(path.as_ref(), &old, ObjectKind::Fence) {
                Ok(f) if f.owner == owner => {} // our own retried create
                _ => {
                    return Err(Error::Conflict {
                        path: path.to_string(),
                        reason: format!("the fence of lease epoch {epoch} was written by another process"),
                    })
                }
            }
        }
        self.set_held(Some(Held { epoch, from_batch }));
        let record = LeaseRecord { fence_from: Some(from_batch), ..record };
        self.write_heartbeat(&record)?;
        // Older epochs' fences that are damaged but survive in their heartbeats are rewritten, so
        // the location has two copies again.
        for f in self.fences_with_repairs()?.1 {
            let path = self.paths().path(ObjectName::LeaseFence(f.epoch));
            self.put(&path, codec::encode_json(ObjectKind::Fence, &f), PutMode::Overwrite)?;
            tracing::info!("rewrote {path} from its heartbeat's copy");
        }
        tracing::info!("holding the checkpoint lease in epoch {epoch} (fence at batch {from_batch})");
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Mutex::new(None));
        let heartbeat = {
            let (store, stop, lost, mut beating) = (self.clone(), stop.clone(), lost.clone(), record.clone());
            let spawned = std::thread::Builder::new()
                .name("cairn-lease".into())
                .spawn(move || heartbeat_loop(&store, &stop, &lost, &mut beating));
            match spawned {
                Ok(h) => h,
                Err(e) => {
                    // Give the epoch back at once: nobody will keep it alive.
                    let released = LeaseRecord { released: true, ..record.clone() };
                    if let Err(w) = self.write_heartbeat(&released) {
                        tracing::warn!("could not release lease epoch {epoch}: {w}");
                    }
                    self.set_held(None);
                    return Err(Error::Io {
                        path: self.location().to_string(),
                        source: std::io::Error::other(format!(
                            "cannot start the lease heartbeat thread: {e}"
                        )),
                    });
                }
            }
        };
        HELD_HERE.lock().unwrap_or_else(|e| e.into_inner()).insert(record.owner.clone());
        Ok(Lease { store: self.clone(), record, stop, lost, heartbeat: Some(heartbeat) })
    }

    fn locked(&self, holder: &LeaseRecord, now: i64, wait_ms: u64) -> Error {
        Error::Locked {
            location: self.location().to_string(),
            holder: describe(holder, now),
            wait_s: wait_ms.div_ceil(1000),
        }
    }

    fn write_heartbeat(&self, r: &LeaseRecord) -> Result<()> {
        let path = self.paths().path(ObjectName::LeaseHeartbeat(r.epoch));
        // Only the epoch's holder writes this object, so an overwrite races with nobody.
        self.put(&path, codec::encode_json(ObjectKind::Lease, r), PutMode::Overwrite).map(|_| ())
    }
}

fn heartbeat_loop(
    store: &CheckpointStore,
    stop: &AtomicBool,
    lost: &Mutex<Option<String>>,
    record: &mut LeaseRecord,
) {
    let period = Duration::from_millis((record.ttl_ms / 4).max(25));
    let mut waited = Duration::ZERO;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(25));
        waited += Duration::from_millis(25);
        if waited < period {
            continue;
        }
        waited = Duration::ZERO;
        match store.check_lease() {
            Err(Error::LeaseLost { holder, .. }) => {
                tracing::error!("lost the checkpoint lease to {holder}");
                *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(holder);
                return;
            }
            Ok(()) => {
                record.heartbeat_ms = wall_ms();
                if let Err(e) = store.write_heartbeat(record) {
                    tracing::warn!("lease heartbeat failed (will retry): {e}");
                }
            }
            Err(e) => tracing::warn!("cannot check the lease (will retry): {e}"),
        }
    }
}

impl Lease {
    /// `Some(holder)` once another process has taken the location over.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The epoch this lease holds.
    pub fn epoch(&self) -> Epoch {
        self.record.epoch
    }

    /// Stops the heartbeat and marks the epoch released if this process still holds it.
    pub fn release(mut self) -> Result<()> {
        self.stop_heartbeat();
        self.mark_released()
    }

    fn mark_released(&mut self) -> Result<()> {
        match self.store.check_lease() {
            Ok(()) => {
                let mut r = self.record.clone();
                r.heartbeat_ms = wall_ms();
                r.released = true;
                self.store.write_heartbeat(&r)
            }
            // Taken over: the location is not ours to release.
            Err(Error::LeaseLost { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn stop_heartbeat(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.heartbeat.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Lease {
    /// A lease dropped without `release` (a context prepared but never run, a panicked
    /// scheduler) gives the location back too, if this process still holds it.
    fn drop(&mut self) {
        HELD_HERE.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.record.owner);
        if self.heartbeat.is_none() {
            return; // released already
        }
        self.stop_heartbeat();
        if let Err(e) = self.mark_released() {
            tracing::warn!("could not release the checkpoint lease: {e}");
        }
    }
}
