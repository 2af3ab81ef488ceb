//! A single-writer guard for a checkpoint location: the `_lease` object names the process that
//! holds it and is refreshed by a heartbeat. A second process finds a fresh lease and stops with
//! a clear error, leaving the first alone. A holder that died on this host (its pid is gone) is
//! taken over at once, so a job restarted after `kill -9` does not wait; a holder on another host
//! is taken over once its heartbeat is older than the TTL.

use crate::frame::ObjectKind;
use crate::paths::ObjectName;
use crate::{codec, CheckpointStore, Error, LeaseRecord, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A held lease. Dropping it stops the heartbeat; [`Lease::release`] also removes the object.
pub struct Lease {
    store: CheckpointStore,
    owner: String,
    stop: Arc<AtomicBool>,
    lost: Arc<Mutex<Option<String>>>,
    heartbeat: Option<JoinHandle<()>>,
}

#[allow(clippy::disallowed_methods)] // liveness is about real time, not batch time
fn wall_ms() -> i64 {
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

fn unique_owner() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{}-{:x}-{n}", hostname(), std::process::id(), wall_ms())
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
        "pid {} on host {}, last heartbeat {:.1}s ago",
        r.pid,
        r.host,
        (now - r.heartbeat_ms).max(0) as f64 / 1e3
    )
}

impl CheckpointStore {
    /// The current lease record, if any (unreadable ones count as none).
    pub fn read_lease(&self) -> Result<Option<LeaseRecord>> {
        let path = self.paths().path(ObjectName::Lease);
        let bytes = self.block_on(async { self.object_store().get(&path).await?.bytes().await });
        match bytes {
            Ok(b) => match codec::decode_json(path.as_ref(), &b, ObjectKind::Lease) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    tracing::warn!("ignoring an unreadable lease object: {e}");
                    Ok(None)
                }
            },
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::Storage { path: path.to_string(), source: e }),
        }
    }

    fn write_lease(&self, r: &LeaseRecord) -> Result<()> {
        self.write_raw(ObjectName::Lease, codec::encode_json(ObjectKind::Lease, r))
    }

    /// Takes the location for this process, or fails with [`Error::Locked`] naming the holder.
    pub fn acquire_lease(&self, ttl: Duration) -> Result<Lease> {
        let ttl_ms = ttl.as_millis().max(100) as u64;
        let host = hostname();
        // A holder on this host that was just killed may take a moment to exit: give it that.
        let mut patience = 20;
        while let Some(cur) = self.read_lease()? {
            let now = wall_ms();
            let fresh = now - cur.heartbeat_ms < cur.ttl_ms as i64;
            let same_host = cur.host == host && cur.pid != std::process::id();
            let dead_here = same_host && !pid_alive(cur.pid);
            if fresh && !dead_here && same_host && patience > 0 {
                patience -= 1;
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if fresh && !dead_here {
                return Err(Error::Locked {
                    location: self.location().to_string(),
                    holder: describe(&cur, now),
                    wait_s: ((cur.ttl_ms as i64 - (now - cur.heartbeat_ms)).max(0) as u64).div_ceil(1000),
                });
            }
            if dead_here {
                tracing::info!("taking over the lease of pid {} (no longer running)", cur.pid);
            }
            break;
        }
        let now = wall_ms();
        let owner = unique_owner();
        let record = LeaseRecord {
            owner: owner.clone(),
            host,
            pid: std::process::id(),
            started_ms: now,
            heartbeat_ms: now,
            ttl_ms,
        };
        self.write_lease(&record)?;
        // Two starters may both have found the location free; the last write wins, so check.
        std::thread::sleep(Duration::from_millis(50));
        match self.read_lease()? {
            Some(r) if r.owner == owner => {}
            Some(r) => {
                return Err(Error::Locked {
                    location: self.location().to_string(),
                    holder: describe(&r, wall_ms()),
                    wait_s: ttl_ms.div_ceil(1000),
                })
            }
            None => {
                return Err(Error::Locked {
                    location: self.location().to_string(),
                    holder: "another process that removed the lease as it was taken".into(),
                    wait_s: 0,
                })
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(Mutex::new(None));
        let heartbeat = {
            let (store, stop, lost, mut record) = (self.clone(), stop.clone(), lost.clone(), record);
            std::thread::Builder::new()
                .name("cairn-lease".into())
                .spawn(move || heartbeat_loop(&store, &stop, &lost, &mut record))
                .map_err(|e| Error::Locked {
                    location: self.location().to_string(),
                    holder: format!("(cannot start the lease heartbeat: {e})"),
                    wait_s: 0,
                })?
        };
        Ok(Lease { store: self.clone(), owner, stop, lost, heartbeat: Some(heartbeat) })
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
        match store.read_lease() {
            Ok(Some(r)) if r.owner != record.owner => {
                let who = describe(&r, wall_ms());
                tracing::error!("lost the checkpoint lease to {who}");
                *lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(who);
                return;
            }
            Ok(_) => {
                record.heartbeat_ms = wall_ms();
                if let Err(e) = store.write_lease(record) {
                    tracing::warn!("lease heartbeat failed (will retry): {e}");
                }
            }
            Err(e) => tracing::warn!("cannot read the lease (will retry): {e}"),
        }
    }
}

impl Lease {
    /// `Some(holder)` once another process has taken the location over.
    pub fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the heartbeat and removes the lease object if this process still holds it.
    pub fn release(mut self) -> Result<()> {
        self.stop_heartbeat();
        match self.store.read_lease()? {
            Some(r) if r.owner == self.owner => {
                let path = self.store.paths().path(ObjectName::Lease);
                match self.store.block_on(self.store.object_store().delete(&path)) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(Error::Storage { path: path.to_string(), source: e }),
                }
            }
            _ => Ok(()),
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
        if self.heartbeat.is_none() {
            return; // released already
        }
        self.stop_heartbeat();
        if let Ok(Some(r)) = self.store.read_lease() {
            if r.owner == self.owner {
                let path = self.store.paths().path(ObjectName::Lease);
                let _ = self.store.block_on(self.store.object_store().delete(&path));
            }
        }
    }
}
