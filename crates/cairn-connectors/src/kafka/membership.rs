//! Membership of a job that runs on several processes: each process is one member of a Kafka
//! consumer group, and the partitions of the job's anchor topic the group assigns to it are its
//! tasks. Kafka's group protocol does the failure detection (session timeout) and the assignment
//! (`cooperative-sticky`, so a rebalance moves only the tasks that must move); cairn builds no
//! cluster manager of its own.
//!
//! The membership consumer fetches nothing: every assigned partition is paused at once, it never
//! commits offsets (positions live in the checkpoint location), and it exists for heartbeats and
//! the rebalance callbacks. Data is read by the job's sources with explicit assignments.

use cairn::UserError;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientContext, TopicPartitionList};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A task: one partition number of the anchor topic (co-partitioned topics share it).
pub type Task = i32;

/// A change of the tasks this member owns, in the order the group made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskChange {
    /// Tasks given to this member: restore their state, replay their logged batches, run them.
    Assigned(BTreeSet<Task>),
    /// Tasks handed over in a rebalance while this member was healthy. The revoke hook ran before
    /// the group could give them to another member.
    Revoked(BTreeSet<Task>),
    /// Tasks taken from this member without a handover (its session expired: it was paused, cut
    /// off or too slow). Another member may already run them: stop touching them at once.
    Lost(BTreeSet<Task>),
}

/// Settings of a member.
///
/// ```
/// use cairn_connectors::kafka::MembershipConfig;
/// let cfg = MembershipConfig::new("127.0.0.1:9092", "cairn-clicks-18c2", "clicks");
/// assert_eq!(cfg.session_timeout.as_secs(), 10);
/// ```
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Comma-separated `host:port` of the brokers.
    pub brokers: String,
    /// The consumer group: one per job (`cairn-<job id>` unless the user names it).
    pub group: String,
    /// The topic whose partitions are the tasks.
    pub anchor_topic: String,
    /// How long the group waits for a silent member before giving its tasks to others; the
    /// detection part of a failover. Brokers bound it (`group.min.session.timeout.ms`, 6 s by
    /// default).
    pub session_timeout: Duration,
    /// Extra librdkafka settings (security, client id).
    pub config: Vec<(String, String)>,
}

impl MembershipConfig {
    /// A member of `group` whose tasks are the partitions of `anchor_topic`, with a 10 s session.
    pub fn new(brokers: &str, group: &str, anchor_topic: &str) -> Self {
        Self {
            brokers: brokers.to_string(),
            group: group.to_string(),
            anchor_topic: anchor_topic.to_string(),
            session_timeout: Duration::from_secs(10),
            config: Vec::new(),
        }
    }
}

type RevokeHook = Box<dyn FnMut(&BTreeSet<Task>) + Send>;

struct Ctx {
    topic: String,
    changes: Mutex<Vec<TaskChange>>,
    owned: Mutex<BTreeSet<Task>>,
    on_revoke: Mutex<Option<RevokeHook>>,
    /// The first error of a rebalance (librdkafka reports some only through the callback).
    error: Mutex<Option<String>>,
    /// Whether the revocation in progress is a loss: read before the unassign, which clears
    /// librdkafka's flag.
    revoke_lost: AtomicBool,
}

impl Ctx {
    fn tasks(&self, tpl: &TopicPartitionList) -> BTreeSet<Task> {
        tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
    }
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tasks = self.tasks(tpl);
            let lost = consumer.assignment_lost();
            self.revoke_lost.store(lost, Ordering::SeqCst);
            // A lost assignment may already run elsewhere: nothing may be written for it, so the
            // hook (which checkpoints) runs only for a handover.
            if !lost && !tasks.is_empty() {
                if let Some(hook) = self.on_revoke.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                    hook(&tasks);
                }
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let change = match rebalance {
            Rebalance::Assign(tpl) => {
                // Fetch nothing: the member exists for its heartbeats and callbacks.
                if let Err(e) = consumer.pause(tpl) {
                    self.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!(
                        "cannot pause the assigned partitions of {}: {e}",
                        self.topic
                    ));
                }
                let tasks = self.tasks(tpl);
                self.owned.lock().unwrap_or_else(|e| e.into_inner()).extend(&tasks);
                TaskChange::Assigned(tasks)
            }
            Rebalance::Revoke(tpl) => {
                let tasks = self.tasks(tpl);
                let mut owned = self.owned.lock().unwrap_or_else(|e| e.into_inner());
                owned.retain(|t| !tasks.contains(t));
                if self.revoke_lost.swap(false, Ordering::SeqCst) {
                    TaskChange::Lost(tasks)
                } else {
                    TaskChange::Revoked(tasks)
                }
            }
            Rebalance::Error(e) => {
                self.error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(format!("rebalance failed: {e}"));
                return;
            }
        };
        let empty = matches!(&change, TaskChange::Assigned(t) | TaskChange::Revoked(t) | TaskChange::Lost(t) if t.is_empty());
        if !empty {
            tracing::info!("tasks of {}: {change:?}", self.topic);
            self.changes.lock().unwrap_or_else(|e| e.into_inner()).push(change);
        }
    }
}

/// One process's membership in its job's consumer group.
///
/// Call [`Membership::poll`] between batches (never during one): it serves the group's
/// callbacks and returns the task changes since the last call. Heartbeats run on librdkafka's
/// own threads, so a long batch does not lose the tasks; a batch longer than
/// `max.poll.interval.ms` (5 min by default) does.
pub struct Membership {
    consumer: BaseConsumer<Ctx>,
}

impl Membership {
    /// Joins the group and subscribes to the anchor topic. `on_revoke` runs inside
    /// [`Membership::poll`] when the group takes tasks from this healthy member, before another
    /// member can get them: the place to checkpoint them, so the next owner replays nothing.
    pub fn join(
        cfg: &MembershipConfig,
        on_revoke: impl FnMut(&BTreeSet<Task>) + Send + 'static,
    ) -> Result<Self, UserError> {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", cfg.session_timeout.as_millis().to_string())
            .set("heartbeat.interval.ms", (cfg.session_timeout.as_millis() / 4).max(100).to_string())
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            .set("broker.address.family", "v4");
        for (k, v) in &cfg.config {
            c.set(k, v);
        }
        let ctx = Ctx {
            topic: cfg.anchor_topic.clone(),
            changes: Mutex::default(),
            owned: Mutex::default(),
            on_revoke: Mutex::new(Some(Box::new(on_revoke))),
            error: Mutex::default(),
            revoke_lost: AtomicBool::new(false),
        };
        let consumer: BaseConsumer<Ctx> = c
            .create_with_context(ctx)
            .map_err(|e| format!("cannot create the membership consumer for {}: {e}", cfg.brokers))?;
        consumer
            .subscribe(&[&cfg.anchor_topic])
            .map_err(|e| format!("cannot subscribe to the anchor topic {}: {e}", cfg.anchor_topic))?;
        Ok(Self { consumer })
    }

    /// Serves the group for up to `timeout` (returning early once a change arrived) and returns
    /// the task changes since the last call.
    pub fn poll(&self, timeout: Duration) -> Result<Vec<TaskChange>, UserError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // Partitions are paused, so a message here is one fetched before the pause: dropped.
            if let Some(Err(e)) = self.consumer.poll(left.min(Duration::from_millis(100))) {
                tracing::debug!("membership consumer: {e}");
            }
            if let Some(e) = self.consumer.context().error.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return Err(e.into());
            }
            let changes = std::mem::take(
                &mut *self.consumer.context().changes.lock().unwrap_or_else(|e| e.into_inner()),
            );
            if !changes.is_empty() || left.is_zero() {
                return Ok(changes);
            }
        }
    }

    /// The tasks this member owns now.
    pub fn tasks(&self) -> BTreeSet<Task> {
        self.consumer.context().owned.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Leaves the group gracefully: the revoke hook runs for the owned tasks, and the group
    /// gives them to the other members at once instead of after the session timeout.
    pub fn leave(self) -> Result<Vec<TaskChange>, UserError> {
        self.consumer.unsubscribe();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut changes = Vec::new();
        while !self.tasks().is_empty() && Instant::now() < deadline {
            changes.extend(self.poll(Duration::from_millis(200))?);
        }
        Ok(changes)
    }
}
