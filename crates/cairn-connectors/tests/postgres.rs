//! The PostgreSQL sink against a real throwaway cluster on 127.0.0.1: exactly once across a
//! failure between the database commit and cairn's, a dropped connection, and a schema mismatch.

use cairn::{StreamingContext, Trigger};
use cairn_connectors::postgres::{Error, PostgresSink};
use cairn_sim::postgres::PgServer;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const BATCHES: u64 = 12;

fn record(o: u64) -> (i64, i64) {
    ((o * 7 % 13) as i64, (o % 5) as i64 + 1)
}

/// The job: running totals per key, upserted into `totals`, and every update appended to
/// `updates` (an append-only table: a batch written twice would show as extra rows).
fn job(dir: &str, conn: &str, fail_after_sink_at: Option<u64>) -> StreamingContext {
    job_with(dir, conn, fail_after_sink_at, |b| b)
}

fn job_with(
    dir: &str,
    conn: &str,
    fail_after_sink_at: Option<u64>,
    f: impl FnOnce(cairn::StreamingContextBuilder) -> cairn::StreamingContextBuilder,
) -> StreamingContext {
    let builder = StreamingContext::builder()
        .checkpoint(dir)
        .trigger(Trigger::AvailableNow)
        .stop_after_batches(BATCHES)
        .max_checkpoint_deferral(0);
    let ctx = f(builder).build().unwrap();
    let totals = ctx
        .generator("events", 1, 20, |_, o| record(o))
        .unwrap()
        .update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| {
            Some(old.unwrap_or(0) + v.iter().sum::<i64>())
        });
    PostgresSink::new(
        conn,
        "totals",
        "INSERT INTO totals (key, total) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET total = EXCLUDED.total",
        |_, (k, t): &(i64, i64)| vec![Box::new(*k), Box::new(*t)],
    )
    .attach(&totals);
    PostgresSink::new(
        conn,
        "updates",
        "INSERT INTO updates (batch_id, key, total) VALUES ($1, $2, $3)",
        |b, (k, t): &(i64, i64)| vec![Box::new(b.batch_id.0 as i64), Box::new(*k), Box::new(*t)],
    )
    .attach(&totals);
    if let Some(at) = fail_after_sink_at {
        // A crash after PostgreSQL committed the batch but before cairn did.
        let failed = Arc::new(AtomicBool::new(false));
        totals.foreach_batch(move |b, _| {
            if b.batch_id.0 == at && !failed.swap(true, Ordering::SeqCst) {
                return Err("simulated crash after the sinks committed".into());
            }
            Ok(())
        });
    } else {
        totals.foreach_batch(|_, _| Ok(()));
    }
    ctx
}

fn expected() -> (BTreeMap<i64, i64>, usize) {
    let mut totals = BTreeMap::new();
    let mut updates = 0;
    for b in 0..BATCHES {
        let mut touched = std::collections::BTreeSet::new();
        for o in b * 20..(b + 1) * 20 {
            let (k, v) = record(o);
            *totals.entry(k).or_insert(0) += v;
            touched.insert(k);
        }
        updates += touched.len();
    }
    (totals, updates)
}

fn schema(conn: &str) {
    let mut c = postgres::Client::connect(conn, postgres::NoTls).unwrap();
    c.batch_execute(
        "DROP TABLE IF EXISTS totals, updates, cairn_sink_progress;
         CREATE TABLE totals (key BIGINT PRIMARY KEY, total BIGINT NOT NULL);
         CREATE TABLE updates (batch_id BIGINT NOT NULL, key BIGINT NOT NULL, total BIGINT NOT NULL, UNIQUE (batch_id, key));",
    )
    .unwrap();
}

fn c_exec(conn: &str, sql: &str) {
    postgres::Client::connect(conn, postgres::NoTls).unwrap().batch_execute(sql).unwrap();
}

fn check(conn: &str) {
    let mut c = postgres::Client::connect(conn, postgres::NoTls).unwrap();
    let got = totals_table(&mut c);
    let (want, updates) = expected();
    assert_eq!(got, want, "totals table");
    let n: i64 = c.query_one("SELECT count(*) FROM updates", &[]).unwrap().get(0);
    assert_eq!(n as usize, updates, "every update appended exactly once");
    // Every job that used the sink got to its last batch.
    let progress = i64_column(&mut c, "SELECT batch_id FROM cairn_sink_progress WHERE sink = 'updates'");
    assert!(!progress.is_empty() && progress.iter().all(|b| *b == BATCHES as i64 - 1), "{progress:?}");
}

#[test]
fn postgres_sink_is_exactly_once() {
    let pg = PgServer::start();
    let conn = pg.conn();

    // A failure after both sinks committed batch 5 but before cairn committed it: the restart
    // replays batch 5, and the sinks skip it.
    schema(&conn);
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let err = job(loc, &conn, Some(5)).run_available().unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    let summary = job(loc, &conn, None).run_available().unwrap();
    assert!(summary.replayed_batches >= 1, "batch 5 is replayed: {summary:?}");
    check(&conn);

    // A new job (a new checkpoint location) on the same tables and sink names numbers its
    // batches from 0 again: its output is written, not skipped as the old job's.
    c_exec(&conn, "TRUNCATE totals, updates");
    let fresh = tempfile::tempdir().unwrap();
    job(fresh.path().to_str().unwrap(), &conn, None).run_available().unwrap();
    check(&conn);

    // The connection dies between batches: the sink reconnects and the batch is retried.
    schema(&conn);
    let dir = tempfile::tempdir().unwrap();
    let ctx = job(dir.path().to_str().unwrap(), &conn, None);
    terminate_connections_after_batch(&ctx, &conn, 3);
    ctx.run_available().expect("a dropped connection is retried");
    check(&conn);

    // A statement that does not fit the table fails at once, naming the sink and the problem.
    let sink = PostgresSink::new(
        &conn,
        "bad",
        "INSERT INTO totals (key, nope) VALUES ($1, $2)",
        |_, (k, t): &(i64, i64)| vec![Box::new(*k), Box::new(*t)],
    );
    let err =
        sink.write_batch(&cairn::BatchInfo::new("test-job", cairn::BatchId(0), 0), &[(1, 1)]).unwrap_err();
    assert!(matches!(err, Error::Schema { .. }), "{err}");
    assert!(err.to_string().contains("\"bad\"") && err.to_string().contains("nope"), "{err}");
    // Setup SQL that cannot run is a schema error too, with the server's message.
    let bad_setup = PostgresSink::new(&conn, "setup", "SELECT 1", |_, _: &(i64, i64)| vec![])
        .setup("CREATE TABLE IF NOT EXISTS broken (key NOSUCHTYPE)");
    let err = bad_setup
        .write_batch(&cairn::BatchInfo::new("test-job", cairn::BatchId(0), 0), &[(1, 1)])
        .unwrap_err();
    assert!(matches!(err, Error::Schema { .. }) && err.to_string().contains("nosuchtype"), "{err}");
    // And an unreachable database is reported after the retries, not silently skipped.
    let dead = PostgresSink::new(
        "host=127.0.0.1 port=1 user=postgres connect_timeout=1",
        "dead",
        "SELECT 1",
        |_, _: &(i64, i64)| vec![],
    )
    .attempts(2);
    let err =
        dead.write_batch(&cairn::BatchInfo::new("test-job", cairn::BatchId(0), 0), &[(1, 1)]).unwrap_err();
    assert!(matches!(err, Error::Unavailable { attempts: 2, .. }), "{err}");
}

/// The causes of the restarts a job announced.
#[derive(Default)]
struct Restarts(std::sync::Mutex<Vec<String>>);

impl cairn::StreamingListener for Restarts {
    fn on_restart_scheduled(&self, e: &cairn::RestartScheduled) {
        self.0.lock().unwrap().push(e.cause.clone());
    }
}

/// The database crashes (`pg_ctl -m immediate`) mid-job and comes back ~4 s later: the same
/// job waits it out (its sink's own retries, then restarts in place from the checkpoint), and the
/// tables end exactly as without the outage. Past the job's outage budget it stops with an error
/// naming the sink and the batch; a restart then finishes exactly.
#[test]
fn a_database_restart_is_ridden_out_exactly() {
    let pg = Arc::new(PgServer::start());
    let conn = pg.conn();
    schema(&conn);
    let dir = tempfile::tempdir().unwrap();
    let ctx = job(dir.path().to_str().unwrap(), &conn, None);
    let restarts = Arc::new(Restarts::default());
    ctx.add_listener(restarts.clone());
    let (server, once) = (pg.clone(), AtomicBool::new(false));
    let outage = Arc::new(std::sync::Mutex::new(None));
    let took = outage.clone();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 3 && !once.swap(true, Ordering::SeqCst) {
            server.crash();
            let (server, took) = (server.clone(), took.clone());
            *took.lock().unwrap() = Some(std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_secs(4));
                server.restart();
            }));
        }
    });
    let t0 = std::time::Instant::now();
    let summary = ctx.run_available().expect("the database's restart is waited out");
    eprintln!("a 4 s database outage: {} restart(s), the job took {:?}", summary.restarts, t0.elapsed());
    outage.lock().unwrap().take().expect("the database was crashed").join().unwrap();
    let causes = restarts.0.lock().unwrap().clone();
    assert!(summary.restarts >= 1 && causes.len() as u64 == summary.restarts, "{summary:?}");
    assert!(causes.iter().all(|c| c.contains("PostgreSQL sink")), "each restart names the sink: {causes:?}");
    check(&conn);

    // Down for longer than the budget: a clear error, then an exact finish once it is back.
    schema(&conn);
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let ctx = job_with(loc, &conn, None, |b| b.max_outage(std::time::Duration::from_secs(2)));
    let server = pg.clone();
    let once = AtomicBool::new(false);
    ctx.on_batch(move |b| {
        if b.batch_id.0 == 2 && !once.swap(true, Ordering::SeqCst) {
            server.crash();
        }
    });
    let err = ctx.run_available().expect_err("the database stays down past the budget");
    let msg = err.to_string();
    assert!(matches!(err, cairn::Error::Outage { .. }), "{msg}");
    assert!(
        msg.contains("gave up after") && msg.contains("PostgreSQL sink") && msg.contains("batch 3"),
        "{msg}"
    );
    pg.restart();
    job(loc, &conn, None).run_available().expect("the database is back");
    check(&conn);
}

/// Fencing by epoch, as a task of a scaled-out job writes: a batch from an older epoch than the
/// progress row's is refused and writes nothing; a new owner that replays a batch its
/// predecessor committed raises the row's epoch, which fences the predecessor from then on; and
/// the audit records who committed what.
#[test]
fn older_epochs_are_fenced_and_commits_are_audited() {
    use cairn::{checkpoint::BatchId, BatchContext, TaskId};
    let pg = PgServer::start();
    let conn = pg.conn();
    c_exec(&conn, "CREATE TABLE fenced (v BIGINT NOT NULL)");
    let sink = || {
        PostgresSink::new(&conn, "fenced", "INSERT INTO fenced (v) VALUES ($1)", |_, v: &i64| {
            vec![Box::new(*v)]
        })
        .record_commits(true)
    };
    let (zombie, owner) = (sink(), sink());
    let batch = |b: u64, epoch: u64| BatchContext::new("job-task3", BatchId(b), 0).as_task(TaskId(3), epoch);
    zombie.write(&batch(0, 1), &[1]).unwrap();
    // The new owner (epoch 2) replays batch 0: already there, but the row now says epoch 2.
    assert_eq!(
        owner.write(&batch(0, 2), &[1]).unwrap(),
        cairn_connectors::postgres::Outcome::AlreadyCommitted
    );
    match zombie.write(&batch(1, 1), &[100]) {
        Err(Error::Fenced { epoch: 1, newer: 2, batch: 1, .. }) => {}
        other => panic!("the old epoch must be fenced: {other:?}"),
    }
    owner.write(&batch(1, 2), &[2]).unwrap();
    let mut c = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
    let rows = i64_column(&mut c, "SELECT v FROM fenced ORDER BY v");
    assert_eq!(rows, vec![1, 2], "the fenced batch wrote nothing");
    assert_eq!(commit_audit(&mut c, "fenced"), vec![(3, 0, 1), (3, 1, 2)]);
    let row: (i32, i64, i64) = c
        .query_one("SELECT task, batch_id, epoch FROM cairn_sink_progress WHERE sink = 'fenced'", &[])
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .unwrap();
    assert_eq!(row, (3, 1, 2));
}

/// The copy mode (`PostgresSink::copy_upsert`: binary `COPY` into a staging table, one upsert
/// per batch): exactly once across a failure between the database commit and cairn's (the
/// audit shows every batch committed once), across a dropped connection (the staging table is
/// created again on the new one), a key twice in a batch (its last row wins), a column that does
/// not fit, and fencing by epoch.
#[test]
fn copy_upsert_is_exactly_once_and_fenced() {
    use cairn::{checkpoint::BatchId, BatchContext, BatchInfo, TaskId};
    let pg = PgServer::start();
    let conn = pg.conn();
    let copy_sink = |conn: &str, name: &str| {
        PostgresSink::copy_upsert(
            conn,
            name,
            "totals",
            &["key", "total"],
            &["key"],
            |_, (k, t): &(i64, i64)| vec![Box::new(*k), Box::new(*t)],
        )
        .record_commits(true)
    };
    let job = |dir: &str, fail_at: Option<u64>| {
        let ctx = StreamingContext::builder()
            .checkpoint(dir)
            .trigger(Trigger::AvailableNow)
            .stop_after_batches(BATCHES)
            .max_checkpoint_deferral(0)
            .build()
            .unwrap();
        let totals = ctx
            .generator("events", 1, 20, |_, o| record(o))
            .unwrap()
            .update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| {
                Some(old.unwrap_or(0) + v.iter().sum::<i64>())
            });
        copy_sink(&conn, "copied").attach(&totals);
        let failed = Arc::new(AtomicBool::new(false));
        totals.foreach_batch(move |b, _| {
            if Some(b.batch_id.0) == fail_at && !failed.swap(true, Ordering::SeqCst) {
                return Err("simulated crash after the sink committed".into());
            }
            Ok(())
        });
        ctx
    };
    let check = |what: &str| {
        let mut c = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
        assert_eq!(totals_table(&mut c), expected().0, "{what}: totals table");
        let committed =
            i64_column(&mut c, "SELECT batch_id FROM cairn_sink_commits WHERE sink = 'copied' ORDER BY seq");
        assert_eq!(committed, (0..BATCHES as i64).collect::<Vec<_>>(), "{what}: every batch committed once");
    };
    let reset = || {
        schema(&conn);
        c_exec(&conn, "DROP TABLE IF EXISTS cairn_sink_commits");
    };

    // A failure after the sink committed batch 5 but before cairn did: batch 5 is replayed and
    // skipped.
    reset();
    let dir = tempfile::tempdir().unwrap();
    let loc = dir.path().to_str().unwrap();
    let err = job(loc, Some(5)).run_available().unwrap_err();
    assert!(err.to_string().contains("simulated crash"), "{err}");
    let summary = job(loc, None).run_available().unwrap();
    assert!(summary.replayed_batches >= 1, "batch 5 is replayed: {summary:?}");
    check("replay");

    // The connection dies between batches: a new one, a new staging table, the batch retried.
    reset();
    let dir = tempfile::tempdir().unwrap();
    let ctx = job(dir.path().to_str().unwrap(), None);
    terminate_connections_after_batch(&ctx, &conn, 3);
    ctx.run_available().expect("a dropped connection is retried");
    check("dropped connection");

    // A key twice in one batch: its last row wins.
    reset();
    let info = |b: u64| BatchInfo::new("dup-job", BatchId(b), 0);
    let sink = copy_sink(&conn, "dups");
    sink.write_batch(&info(0), &[(1, 10), (2, 20), (1, 11)]).unwrap();
    sink.write_batch(&info(1), &[(2, 21), (3, 30)]).unwrap();
    assert_eq!(
        sink.write_batch(&info(1), &[(2, 99)]).unwrap(),
        cairn_connectors::postgres::Outcome::AlreadyCommitted
    );
    let mut c = postgres::Client::connect(&conn, postgres::NoTls).unwrap();
    let got: Vec<(i64, i64)> = c
        .query("SELECT key, total FROM totals ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, vec![(1, 11), (2, 21), (3, 30)]);

    // A column that does not exist, or a value of the wrong type: a schema error naming the sink.
    let bad = PostgresSink::copy_upsert(
        &conn,
        "bad",
        "totals",
        &["key", "nope"],
        &["key"],
        |_, (k, t): &(i64, i64)| vec![Box::new(*k), Box::new(*t)],
    );
    let err = bad.write_batch(&info(0), &[(1, 1)]).unwrap_err();
    assert!(matches!(err, Error::Schema { .. }) && err.to_string().contains("nope"), "{err}");
    let wrong = PostgresSink::copy_upsert(
        &conn,
        "wrong",
        "totals",
        &["key", "total"],
        &["key"],
        |_, (k, _): &(i64, i64)| vec![Box::new(*k), Box::new("text".to_string())],
    );
    let err = wrong.write_batch(&info(0), &[(1, 1)]).unwrap_err();
    assert!(matches!(err, Error::Schema { .. }) && err.to_string().contains("\"wrong\""), "{err}");

    // Fencing by epoch, as for the statement mode: the older epoch writes nothing.
    reset();
    let (zombie, owner) = (copy_sink(&conn, "fenced"), copy_sink(&conn, "fenced"));
    let batch = |b: u64, epoch: u64| BatchContext::new("job-task3", BatchId(b), 0).as_task(TaskId(3), epoch);
    zombie.write(&batch(0, 1), &[(1, 1)]).unwrap();
    assert_eq!(
        owner.write(&batch(0, 2), &[(1, 1)]).unwrap(),
        cairn_connectors::postgres::Outcome::AlreadyCommitted
    );
    match zombie.write(&batch(1, 1), &[(1, 100)]) {
        Err(Error::Fenced { epoch: 1, newer: 2, batch: 1, .. }) => {}
        other => panic!("the old epoch must be fenced: {other:?}"),
    }
    owner.write(&batch(1, 2), &[(2, 2)]).unwrap();
    let got: Vec<(i64, i64)> = c
        .query("SELECT key, total FROM totals ORDER BY key", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(got, vec![(1, 1), (2, 2)], "the fenced batch wrote nothing");
    assert_eq!(commit_audit(&mut c, "fenced"), vec![(3, 0, 1), (3, 1, 2)]);
}

/// After batch `batch` completes, every other connection to the database is terminated, as a
/// server restart or a network cut would: the sink's next batch finds its connection dead.
fn terminate_connections_after_batch(ctx: &StreamingContext, conn: &str, batch: u64) {
    let killer = conn.to_string();
    ctx.on_batch(move |b| {
        if b.batch_id.0 == batch {
            let mut c = postgres::Client::connect(&killer, postgres::NoTls).unwrap();
            c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND datname = 'postgres'", &[])
                .unwrap();
        }
    });
}

/// The sink's commit audit in commit order: (task, batch, epoch).
fn commit_audit(c: &mut postgres::Client, sink: &str) -> Vec<(i32, i64, i64)> {
    c.query("SELECT task, batch_id, epoch FROM cairn_sink_commits WHERE sink = $1 ORDER BY seq", &[&sink])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// The `totals` table: key to total.
fn totals_table(c: &mut postgres::Client) -> BTreeMap<i64, i64> {
    c.query("SELECT key, total FROM totals", &[]).unwrap().iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// The first column of a query's rows, as integers.
fn i64_column(c: &mut postgres::Client, sql: &str) -> Vec<i64> {
    c.query(sql, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}
