//! Riding out outages. When a batch fails for a reason that may heal by itself (a broker,
//! database or object store briefly unreachable: [`Error::is_transient`]), the job does not stop:
//! it forgets its in-memory state and recovers in the same process exactly as a new process would
//! (restore the newest checkpoint, replay the logged batches with their logged input), after an
//! exponential backoff with jitter, for up to the configured outage budget. Sinks skip what they
//! had committed (their batch-id fences), so the output and state are those of a run without the
//! outage. Final errors stop the job at once, as before.

use super::job::{Job, Trigger};
use super::progress::RestartScheduled;
use super::{recovery, scheduler};
use crate::error::{Error, Result};
use crate::runtime::scheduler::RunSummary;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first wait after a failure; it doubles with every attempt of one outage.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How long to wait before attempt `attempt` (1, 2, ...) of an outage that began `outage` ago,
/// or `None` to give up: the error is final, the job has no checkpoint to recover from, or the
/// wait would end past `max_outage` (zero: never wait).
pub(crate) fn backoff(
    transient: bool,
    has_checkpoint: bool,
    outage: Duration,
    attempt: u32,
    max_outage: Duration,
) -> Option<Duration> {
    if !transient || !has_checkpoint {
        return None;
    }
    let factor = 1u32.checked_shl(attempt.saturating_sub(1)).unwrap_or(u32::MAX);
    let wait = FIRST_BACKOFF.saturating_mul(factor).min(MAX_BACKOFF);
    (outage + wait <= max_outage).then_some(wait)
}

/// Between half and all of `wait`, so that processes hit by the same outage do not retry in step.
fn jittered(wait: Duration) -> Duration {
    #[allow(clippy::disallowed_methods)] // entropy for jitter, not a time that matters
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let frac = 0.5 + f64::from(nanos % 1000) / 2000.0;
    wait.mul_f64(frac)
}

fn add(total: &mut Option<RunSummary>, run: RunSummary) {
    match total {
        None => *total = Some(run),
        Some(t) => {
            t.replayed_batches += run.replayed_batches;
            t.new_batches += run.new_batches;
            t.next_batch = run.next_batch;
            t.recovery_warnings.extend(run.recovery_warnings);
            t.checkpoints += run.checkpoints;
            t.checkpoint_bytes += run.checkpoint_bytes;
            t.checkpoint_objects += run.checkpoint_objects;
            t.log_objects += run.log_objects;
            t.forced_full_snapshots += run.forced_full_snapshots;
        }
    }
}

/// Runs the job from `first`, restarting it in place after transient failures.
pub(crate) fn run(job: Arc<Job>, first: recovery::Prepared, trigger: Trigger) -> Result<RunSummary> {
    let max_outage = job.cfg.max_outage;
    let has_checkpoint = job.cfg.checkpoint.is_some() || job.cfg.store.is_some();
    let mut total: Option<RunSummary> = None;
    let mut next = Some(first);
    // When the current outage began, and the attempts made in it.
    let mut outage: Option<(Instant, u32)> = None;
    loop {
        let err = match next.take() {
            Some(prepared) => {
                let (summary, result) = scheduler::run(job.clone(), prepared, trigger);
                // A batch went through: whatever failed next is a new outage.
                if summary.new_batches + summary.replayed_batches > 0 {
                    outage = None;
                }
                add(&mut total, summary);
                match result {
                    Ok(()) => {
                        let mut t = total.expect("added above");
                        t.restarts = job.restarts.load(Ordering::SeqCst);
                        return Ok(t);
                    }
                    Err(e) => e,
                }
            }
            None => match recovery::prepare(&job) {
                Ok(p) => {
                    next = Some(p);
                    continue;
                }
                Err(e) => e,
            },
        };
        // The outage began when the failed batch did: the clients' own retries inside it count.
        let failed_batch_began = job.take_batch_began();
        let (began, attempts) =
            outage.get_or_insert_with(|| (failed_batch_began.unwrap_or_else(Instant::now), 0));
        *attempts += 1;
        let waited = began.elapsed();
        let rides_out = err.is_transient() && has_checkpoint && !max_outage.is_zero();
        let Some(wait) = backoff(err.is_transient(), has_checkpoint, waited, *attempts, max_outage) else {
            return Err(if rides_out {
                Error::Outage { attempts: *attempts - 1, waited, last: Box::new(err) }
            } else {
                err
            });
        };
        let wait = jittered(wait);
        let restart = job.restarts.fetch_add(1, Ordering::SeqCst) + 1;
        let event = RestartScheduled {
            restart,
            attempt: *attempts,
            cause: err.to_string(),
            wait_ms: wait.as_millis() as u64,
            outage_ms: waited.as_millis() as u64,
            max_outage_ms: max_outage.as_millis() as u64,
        };
        tracing::warn!(
            "{}; restarting from the checkpoint in {:.1} s (attempt {} of this outage, {:.1} s of {:.0} s allowed so far)",
            event.cause,
            wait.as_secs_f64(),
            event.attempt,
            waited.as_secs_f64(),
            max_outage.as_secs_f64()
        );
        job.listeners.each(|l| l.on_restart_scheduled(&event));
        let until = Instant::now() + wait;
        while Instant::now() < until {
            if job.stop.load(Ordering::SeqCst) {
                return Err(err);
            }
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
        }
        // Back to what a new process starts from; recovery restores into it.
        for op in job.graph.lock().stateful.iter() {
            op.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn backoff_doubles_up_to_a_cap_within_the_budget() {
        let waits: Vec<_> = (1..=7).map(|a| backoff(true, true, Duration::ZERO, a, MIN)).collect();
        let ms: Vec<_> = waits.iter().map(|w| w.unwrap().as_millis()).collect();
        assert_eq!(ms, [200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(true, true, Duration::from_secs(59), 1, MIN), Some(FIRST_BACKOFF));
        assert_eq!(backoff(true, true, Duration::from_secs(59), 4, MIN), None, "past the budget");
    }

    #[test]
    fn final_errors_no_checkpoint_or_no_budget_never_wait() {
        assert_eq!(backoff(false, true, Duration::ZERO, 1, MIN), None);
        assert_eq!(backoff(true, false, Duration::ZERO, 1, MIN), None);
        assert_eq!(backoff(true, true, Duration::ZERO, 1, Duration::ZERO), None);
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        for _ in 0..100 {
            let j = jittered(Duration::from_millis(1000));
            assert!(j >= Duration::from_millis(500) && j <= Duration::from_millis(1000), "{j:?}");
        }
    }
}
