//! Membership of a multi-process job against a real broker (nisshi): the anchor topic's
//! partitions split between members; they move to the survivors when a member is SIGKILLed,
//! paused with SIGSTOP past its session timeout, or leaves; a paused member learns after SIGCONT
//! that it lost its tasks (not that they were handed over), and rejoins.

use cairn_connectors::kafka::{Membership, MembershipConfig, TaskChange};
use cairn_sim::kafka::KafkaBroker;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TASKS: i32 = 12;
/// nisshi's shortest session timeout.
const SESSION: Duration = Duration::from_secs(6);
/// The session timeout of the member that leaves gracefully: its session would run out no
/// sooner than 7.5 s after it left (10 s after its last heartbeat, sent every 2.5 s).
const LEAVER_SESSION: Duration = Duration::from_secs(10);
/// How long a rebalance may take on two busy cores, past the session timeout when one applies.
const SETTLE: Duration = Duration::from_secs(40);

fn config(brokers: &str) -> MembershipConfig {
    let mut c = MembershipConfig::new(brokers, "cairn-membership-test", "anchor");
    c.session_timeout = SESSION;
    c
}

fn all() -> BTreeSet<i32> {
    (0..TASKS).collect()
}

/// A member in a child process (this test binary re-run as `membership_child`), reporting its
/// tasks in `<dir>/tasks` and every change in `<dir>/changes`.
struct ChildMember {
    child: Child,
    dir: PathBuf,
}

impl ChildMember {
    fn start(brokers: &str, dir: &Path) -> Self {
        let child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "membership_child", "--ignored", "--nocapture"])
            .env("CAIRN_TEST_MEMBER_DIR", dir)
            .env("CAIRN_TEST_BROKERS", brokers)
            .spawn()
            .unwrap();
        Self { child, dir: dir.to_path_buf() }
    }
    fn tasks(&self) -> BTreeSet<i32> {
        let text = std::fs::read_to_string(self.dir.join("tasks")).unwrap_or_default();
        text.split_whitespace().map(|t| t.parse().unwrap()).collect()
    }
    fn changes(&self) -> String {
        std::fs::read_to_string(self.dir.join("changes")).unwrap_or_default()
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for ChildMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Not a test: the child member of `tasks_move_on_sigkill_sigstop_and_leave`, run by it.
#[test]
#[ignore = "a child process of the membership test, started by it"]
fn membership_child() {
    let (Ok(dir), Ok(brokers)) =
        (std::env::var("CAIRN_TEST_MEMBER_DIR"), std::env::var("CAIRN_TEST_BROKERS"))
    else {
        panic!("run by tasks_move_on_sigkill_sigstop_and_leave only");
    };
    let dir = PathBuf::from(dir);
    let m = Membership::join(&config(&brokers), |_| {}).unwrap();
    let mut log = String::new();
    loop {
        for change in m.poll(Duration::from_millis(200)).unwrap() {
            log.push_str(&format!("{change:?}\n"));
            std::fs::write(dir.join("changes.tmp"), &log).unwrap();
            std::fs::rename(dir.join("changes.tmp"), dir.join("changes")).unwrap();
        }
        let tasks: Vec<String> = m.tasks().iter().map(|t| t.to_string()).collect();
        std::fs::write(dir.join("tasks.tmp"), tasks.join(" ")).unwrap();
        std::fs::rename(dir.join("tasks.tmp"), dir.join("tasks")).unwrap();
    }
}

/// Polls the in-process members until `done` holds; returns how long it took and the first
/// member's changes meanwhile.
fn settle(
    members: &[&Membership],
    what: &str,
    state: impl Fn() -> String,
    done: impl Fn() -> bool,
) -> (Duration, Vec<TaskChange>) {
    let t0 = Instant::now();
    let mut first = Vec::new();
    while !done() {
        assert!(t0.elapsed() < SETTLE, "{what}: not settled after {SETTLE:?}: {}", state());
        for (i, m) in members.iter().enumerate() {
            let changes = m.poll(Duration::from_millis(50)).unwrap();
            if i == 0 {
                first.extend(changes);
            }
        }
    }
    (t0.elapsed(), first)
}

fn split(a: &BTreeSet<i32>, b: &BTreeSet<i32>) -> bool {
    !a.is_empty()
        && !b.is_empty()
        && a.is_disjoint(b)
        && a.union(b).copied().collect::<BTreeSet<_>>() == all()
}

#[test]
fn tasks_move_on_sigkill_sigstop_and_leave() {
    let broker = KafkaBroker::start();
    broker.create_topic("anchor", TASKS);
    let a = Membership::join(&config(&broker.bootstrap), |_| {}).unwrap();
    let child_dir = tempfile::tempdir().unwrap();
    let report = || {
        let read = |f: &str| std::fs::read_to_string(child_dir.path().join(f)).unwrap_or_default();
        format!(
            "first member owns {:?}; child owns [{}], changes:\n{}",
            a.tasks(),
            read("tasks"),
            read("changes")
        )
    };
    settle(&[&a], "a lone member owns every task", report, || a.tasks() == all());

    // A second member in another process: the tasks split, and cooperatively: the first
    // member hands some over (revoked, not lost) and keeps the rest running.
    let c = ChildMember::start(&broker.bootstrap, child_dir.path());
    let (_, changes) = settle(&[&a], "two members split the tasks", report, || split(&a.tasks(), &c.tasks()));
    assert!(
        changes.iter().any(|c| matches!(c, TaskChange::Revoked(_)))
            && !changes.iter().any(|c| matches!(c, TaskChange::Lost(_) | TaskChange::Assigned(_))),
        "the first member only hands tasks over: {changes:?}"
    );

    // Paused past its session timeout: its tasks go to the survivor ...
    c.signal("-STOP");
    let (took, _) = settle(&[&a], "the paused member's tasks move", report, || a.tasks() == all());
    eprintln!("tasks of a paused member moved after {took:?}");
    // ... and once resumed it is told it lost them (it may not write for them any more), then
    // rejoins and gets a share again.
    c.signal("-CONT");
    settle(&[&a], "the resumed member learns it lost its tasks", report, || c.changes().contains("Lost("));
    settle(&[&a], "the resumed member rejoins", report, || split(&a.tasks(), &c.tasks()));

    // SIGKILLed: the survivor gets everything after the session timeout.
    c.signal("-KILL");
    let (took, _) = settle(&[&a], "the killed member's tasks move", report, || a.tasks() == all());
    eprintln!("tasks of a killed member moved after {took:?}");
    drop(c);

    // A member that leaves hands its tasks over at once, after its revoke hook ran for them. Its
    // session timeout is long, so that a move the leave did not cause (the session running out)
    // cannot pass for one it did on a loaded machine.
    let revoked = Arc::new(Mutex::new(BTreeSet::new()));
    let seen = revoked.clone();
    let mut long_session = config(&broker.bootstrap);
    long_session.session_timeout = LEAVER_SESSION;
    let b = Membership::join(&long_session, move |t| seen.lock().unwrap().extend(t)).unwrap();
    settle(&[&a, &b], "a third member takes a share", report, || split(&a.tasks(), &b.tasks()));
    let held = b.tasks();
    let t0 = Instant::now();
    let left = b.leave().unwrap();
    assert!(
        left.iter().all(|c| matches!(c, TaskChange::Revoked(_))),
        "a graceful leave loses nothing: {left:?}"
    );
    assert_eq!(*revoked.lock().unwrap(), held, "the revoke hook saw every task handed over");
    settle(&[&a], "the leaving member's tasks move", report, || a.tasks() == all());
    assert!(
        t0.elapsed() < Duration::from_secs(7),
        "a graceful leave does not wait for the session timeout ({LEAVER_SESSION:?}): {:?}",
        t0.elapsed()
    );
    eprintln!("tasks of a leaving member moved after {:?}", t0.elapsed());
}
