//! Exactly-once output to PostgreSQL.
//!
//! Each batch is written in one transaction that also records the batch id in a progress table
//! (`cairn_sink_progress`, one row per sink and job). Before writing, the transaction reads that
//! row under a lock: a batch at or below the recorded id was committed by an earlier attempt (the
//! job crashed after PostgreSQL committed but before cairn did) and is skipped. Batches are written
//! in order, so "at or below" is exact. The job id is part of the key because a job started on a
//! new checkpoint location numbers its batches from 0 again: keyed by sink name alone, its output
//! would be skipped as "already written" by the old job.
//!
//! In a scaled-out job every task has its own job id, so its own row, and the row also records
//! the task and the ownership epoch of the process that wrote it last. A write whose epoch is
//! older than the row's is refused ([`Error::Fenced`]): a process that lost the task (paused past
//! the consumer group's session timeout, cut off) cannot commit after the new owner did. The
//! sink's sessions end on the server when idle inside a transaction for
//! [`IDLE_IN_TRANSACTION`], so a paused process cannot hold the row's lock against the new
//! owner either. With [`PostgresSink::record_commits`] every committed batch also leaves a row
//! in `cairn_sink_commits` (sink, job, task, batch, epoch, rows, writer, time): an audit of who
//! committed what.
//!
//! Two ways to write a batch's rows:
//!
//! - [`PostgresSink::new`]: one parameterised statement per row, pipelined (up to [`PIPELINE`]
//!   statements in flight on the connection at once; tokio-postgres sends them without waiting
//!   for each answer), so a batch costs a few round trips instead of one per row. Any statement.
//! - [`PostgresSink::copy_upsert`]: the batch's rows streamed with binary `COPY` into a temporary
//!   staging table, then one `INSERT ... SELECT ... ON CONFLICT DO UPDATE` into the target table:
//!   about three times the rows per second of the statements (see `docs/benchmarks.md`).
//!
//! Either way the rows and the progress row commit in the same transaction.

use crate::pending::Pending;
use cairn::{BatchContext, BatchInfo, BatchWrite, DStream, Data, Sink, UserError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

/// Statements in flight at once while writing a batch.
pub const PIPELINE: usize = 512;

/// Parameters of one row for the sink's statement (`$1`, `$2`, ... in order).
pub type Row = Vec<Box<dyn ToSql + Sync + Send>>;

type ToRow<T> = Arc<dyn Fn(&BatchInfo, &T) -> Row + Send + Sync>;

/// Errors from the PostgreSQL sink.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The statement does not fit the table (a missing column, a wrong type...).
    #[error("PostgreSQL sink {sink:?}: the statement does not fit the database: {message} (statement: {statement})")]
    Schema {
        /// The sink's name.
        sink: String,
        /// The SQL that failed: the sink's statement, or its setup SQL when that failed.
        statement: String,
        /// The server's error message.
        message: String,
    },
    /// A process with a newer ownership epoch of the task already committed through this sink:
    /// this process lost the task and must not write for it any more.
    #[error("PostgreSQL sink {sink:?}: batch {batch} of job {job} not written: it is fenced, epoch {epoch} is older than epoch {newer} that committed last (this process lost the task)")]
    Fenced {
        /// The sink's name.
        sink: String,
        /// The job (in a scaled-out job, the task's job id).
        job: String,
        /// The batch that was not written.
        batch: u64,
        /// This writer's epoch.
        epoch: u64,
        /// The epoch recorded in the progress row.
        newer: u64,
    },
    /// The database could not be reached or kept failing; the batch was not committed.
    #[error("PostgreSQL sink {sink:?}: batch {batch} failed after {attempts} attempt(s): {message}")]
    Unavailable {
        /// The sink's name.
        sink: String,
        /// The batch that was not written.
        batch: u64,
        /// Attempts made, each on a new connection when the previous one broke.
        attempts: u32,
        /// The last attempt's error (the server's message for a database error).
        message: String,
        /// Whether the last error was the connection's (refused, broken, the server shutting
        /// down or not accepting connections yet), which waiting may cure; otherwise the
        /// statement itself kept failing.
        transient: bool,
    },
}

/// What writing a batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The batch's rows were written and its id recorded.
    Written {
        /// Rows written: one statement per element of the batch.
        rows: u64,
    },
    /// An earlier attempt committed this batch; nothing was written.
    AlreadyCommitted,
}

/// Writes each batch's elements to PostgreSQL exactly once per batch id: with one parameterised
/// statement per element ([`new`](Self::new): an `INSERT`, or an upsert with `ON CONFLICT ... DO
/// UPDATE`), or as one binary `COPY` and one upsert per batch ([`copy_upsert`](Self::copy_upsert)).
///
/// ```no_run
/// use cairn_connectors::postgres::PostgresSink;
/// let ctx = cairn::StreamingContext::builder().checkpoint("ckpt").build().unwrap();
/// let totals = ctx.generator("g", 1, 10, |_, o| (o as i64 % 5, 1i64)).unwrap()
///     .update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| Some(old.unwrap_or(0) + v.len() as i64));
/// PostgresSink::new(
///     "host=127.0.0.1 user=postgres dbname=app",
///     "totals",
///     "INSERT INTO totals (key, total) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET total = EXCLUDED.total",
///     |_, (k, t): &(i64, i64)| vec![Box::new(*k), Box::new(*t)],
/// )
/// .attach(&totals);
/// ```
pub struct PostgresSink<T> {
    name: String,
    conn: String,
    /// The per-row statement, or in the copy mode the upsert from the staging table.
    statement: String,
    /// The copy mode's table and columns; `None`: one statement per row.
    copy: Option<CopyUpsert>,
    to_row: ToRow<T>,
    client: Mutex<Option<Connection>>,
    attempts: u32,
    setup: Option<String>,
    record_commits: bool,
    /// The partitions of the batch being written, gathered until commit.
    pending: Pending<T>,
}

/// How long a sink's session may sit idle inside a transaction before the server ends it: a
/// process paused mid-batch (SIGSTOP, a frozen VM) then stops holding its progress row's lock,
/// and the task's next owner can commit.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// The copy mode's target: each batch is copied into [`STAGE`] and upserted from there.
struct CopyUpsert {
    table: String,
    columns: Vec<String>,
    /// The upsert that keeps each key's last row when a batch holds a key more than once (the
    /// fast one, [`PostgresSink::statement`], then fails with a cardinality violation).
    upsert_last: String,
}

/// The copy mode's staging table: one per connection (temporary), emptied at every commit.
pub const STAGE: &str = "cairn_stage";

/// A connection and the single-threaded runtime that drives it (the sink runs on the
/// scheduler's thread; the runtime only turns while a batch is being written).
struct Connection {
    rt: tokio::runtime::Runtime,
    client: Client,
    /// In the copy mode, the staging table's column types once it was created on this
    /// connection.
    stage: Option<Vec<Type>>,
}

/// Why a connection could not be opened.
enum OpenError {
    /// The connection's runtime could not start (the process is out of threads or descriptors).
    Runtime(std::io::Error),
    /// The database refused or could not be reached.
    Db(tokio_postgres::Error),
}

impl Connection {
    fn open(conn: &str, setup: Option<&str>) -> Result<Self, OpenError> {
        let rt =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(OpenError::Runtime)?;
        let client = rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!("PostgreSQL connection ended: {e}");
                }
            });
            client
                .batch_execute(&format!(
                    "SET idle_in_transaction_session_timeout = {}",
                    IDLE_IN_TRANSACTION.as_millis()
                ))
                .await?;
            // Concurrent `CREATE TABLE IF NOT EXISTS` can fail on PostgreSQL's catalog (the
            // tasks of a scaled-out job connect at once): one connection at a time runs the DDL.
            client
                .batch_execute(&format!(
                    "BEGIN; SELECT pg_advisory_xact_lock({DDL_LOCK}); {PROGRESS_DDL} COMMIT;"
                ))
                .await?;
            if let Some(sql) = setup {
                client
                    .batch_execute(&format!(
                        "BEGIN; SELECT pg_advisory_xact_lock({DDL_LOCK}); {sql}; COMMIT;"
                    ))
                    .await?;
            }
            Ok::<_, tokio_postgres::Error>(client)
        });
        Ok(Self { rt, client: client.map_err(OpenError::Db)?, stage: None })
    }
}

/// The advisory lock the sinks' DDL runs under (an arbitrary number, "cairn" in ASCII).
const DDL_LOCK: i64 = 0x63_61_69_72_6e;

const PROGRESS_DDL: &str = "CREATE TABLE IF NOT EXISTS cairn_sink_progress (\
    sink TEXT NOT NULL, job_id TEXT NOT NULL, batch_id BIGINT NOT NULL, \
    committed_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (sink, job_id)); \
    ALTER TABLE cairn_sink_progress ADD COLUMN IF NOT EXISTS task INTEGER, \
    ADD COLUMN IF NOT EXISTS epoch BIGINT; \
    CREATE TABLE IF NOT EXISTS cairn_sink_commits (seq BIGSERIAL PRIMARY KEY, sink TEXT NOT NULL, \
    job_id TEXT NOT NULL, task INTEGER, batch_id BIGINT NOT NULL, epoch BIGINT, rows BIGINT NOT NULL, \
    writer TEXT NOT NULL, committed_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());";

impl<T: Data> PostgresSink<T> {
    /// A sink named `name` (its id in the progress table; keep it stable across restarts)
    /// connecting with `conn` (a libpq-style string) and writing each element with `statement`,
    /// whose parameters `to_row` gives.
    pub fn new(
        conn: impl Into<String>,
        name: impl Into<String>,
        statement: impl Into<String>,
        to_row: impl Fn(&BatchInfo, &T) -> Row + Send + Sync + 'static,
    ) -> Self {
        Self {
            name: name.into(),
            conn: conn.into(),
            statement: statement.into(),
            copy: None,
            to_row: Arc::new(to_row),
            client: Mutex::new(None),
            attempts: 4,
            setup: None,
            record_commits: false,
            pending: Pending::default(),
        }
    }

    /// A sink that writes each batch with binary `COPY` into a temporary staging table and then
    /// one upsert into `table`: `INSERT INTO table (columns) SELECT columns FROM the staging table
    /// ON CONFLICT (key) DO UPDATE SET` every column not in `key` `= EXCLUDED.column` (`DO
    /// NOTHING` when every column is in `key`). `to_row` gives each element's values for
    /// `columns`, in order, of the table's column types (an `i64` for a `BIGINT`, a `String` for
    /// a `TEXT`...; a mismatch is an [`Error::Schema`]). `key` must be the columns of a primary
    /// key or unique constraint of `table`. A batch with a key more than once keeps the key's
    /// last row (the batch is then upserted a second, slower way). The table, column and key
    /// names go into the SQL as written: quote them yourself where needed.
    ///
    /// The staging table (`cairn_stage`, `ON COMMIT DELETE ROWS`) is created with the
    /// connection, with the columns' types, so only the staged rows cross the network; the
    /// progress row is written in the same transaction, as in [`new`](Self::new). Much faster
    /// than one statement per row; any write other than an upsert or a plain insert (an
    /// `UPDATE`, several tables) needs [`new`](Self::new).
    ///
    /// ```no_run
    /// use cairn_connectors::postgres::PostgresSink;
    /// let ctx = cairn::StreamingContext::builder().checkpoint("ckpt").build().unwrap();
    /// let totals = ctx.generator("g", 1, 10, |_, o| (format!("user-{}", o % 5), 1i64)).unwrap()
    ///     .update_state_by_key("totals", |_, v: Vec<i64>, old: Option<i64>| Some(old.unwrap_or(0) + v.len() as i64));
    /// // CREATE TABLE totals (key TEXT PRIMARY KEY, total BIGINT NOT NULL)
    /// PostgresSink::copy_upsert(
    ///     "host=127.0.0.1 user=postgres dbname=app",
    ///     "totals",
    ///     "totals",
    ///     &["key", "total"],
    ///     &["key"],
    ///     |_, (k, t): &(String, i64)| vec![Box::new(k.clone()), Box::new(*t)],
    /// )
    /// .attach(&totals);
    /// ```
    pub fn copy_upsert(
        conn: impl Into<String>,
        name: impl Into<String>,
        table: impl Into<String>,
        columns: &[&str],
        key: &[&str],
        to_row: impl Fn(&BatchInfo, &T) -> Row + Send + Sync + 'static,
    ) -> Self {
        let table = table.into();
        let cols = columns.join(", ");
        let keys = key.join(", ");
        let updates: Vec<String> =
            columns.iter().filter(|c| !key.contains(c)).map(|c| format!("{c} = EXCLUDED.{c}")).collect();
        let action = if updates.is_empty() {
            "DO NOTHING".to_string()
        } else {
            format!("DO UPDATE SET {}", updates.join(", "))
        };
        // The staging table is emptied at every commit and `COPY` appends, so physical order
        // (ctid) is the batch's order.
        let upsert =
            format!("INSERT INTO {table} ({cols}) SELECT {cols} FROM {STAGE} ON CONFLICT ({keys}) {action}");
        let upsert_last = format!(
            "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({keys}) {cols} FROM {STAGE} \
             ORDER BY {keys}, ctid DESC ON CONFLICT ({keys}) {action}"
        );
        let mut sink = Self::new(conn, name, upsert, to_row);
        sink.copy =
            Some(CopyUpsert { table, columns: columns.iter().map(|c| c.to_string()).collect(), upsert_last });
        sink
    }

    /// SQL run on every new connection before the sink writes (e.g. `CREATE TABLE IF NOT
    /// EXISTS ...`); an error in it fails the batch like a failed connection.
    pub fn setup(mut self, sql: impl Into<String>) -> Self {
        self.setup = Some(sql.into());
        self
    }

    /// Also records every committed batch in `cairn_sink_commits`: sink, job id, task, batch,
    /// ownership epoch, rows, the writing process (`host:pid`) and the time. Off by default (one
    /// more row per batch); an audit of which process committed which batch in which epoch.
    pub fn record_commits(mut self, yes: bool) -> Self {
        self.record_commits = yes;
        self
    }

    /// Attempts per batch when the connection fails (default 4, with backoff).
    pub fn attempts(mut self, n: u32) -> Self {
        self.attempts = n.max(1);
        self
    }

    /// Makes the sink the output of `stream`: every batch is written (or skipped as already
    /// committed) before cairn commits the batch.
    pub fn attach(self, stream: &DStream<T>) {
        stream.write_to(self);
    }

    /// Writes one batch, retrying (with a new connection) when the database connection fails.
    pub fn write_batch(&self, info: &BatchInfo, rows: &[T]) -> Result<Outcome, Error> {
        self.write(&BatchContext::new(info.job_id.clone(), info.batch_id, info.batch_time_ms), rows)
    }

    /// Like [`write_batch`](Self::write_batch), for the batch of a task in an ownership epoch:
    /// refused with [`Error::Fenced`] when a newer epoch already committed.
    pub fn write(&self, batch: &BatchContext, rows: &[T]) -> Result<Outcome, Error> {
        let info = &batch.info();
        let mut guard = self.client.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = String::new();
        let mut last_transient = false;
        for attempt in 1..=self.attempts {
            if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
                match Connection::open(&self.conn, self.setup.as_deref()) {
                    Ok(c) => *guard = Some(c),
                    // Not the database's fault, and not something a retry fixes.
                    Err(OpenError::Runtime(e)) => {
                        return Err(Error::Unavailable {
                            sink: self.name.clone(),
                            batch: info.batch_id.0,
                            attempts: attempt,
                            message: format!("cannot start the connection's runtime: {e}"),
                            transient: false,
                        })
                    }
                    Err(OpenError::Db(e)) if is_schema_error(&e) => {
                        return Err(Error::Schema {
                            sink: self.name.clone(),
                            statement: self.setup.clone().unwrap_or_default(),
                            message: describe(&e),
                        })
                    }
                    Err(OpenError::Db(e)) => (last, last_transient) = (describe(&e), is_connection_error(&e)),
                }
            }
            if let Some(c) = guard.as_mut() {
                if let (Some(copy), None) = (&self.copy, &c.stage) {
                    match c.rt.block_on(create_stage(&c.client, copy)) {
                        Ok(types) => c.stage = Some(types),
                        Err(e) if is_schema_error(&e) => {
                            return Err(Error::Schema {
                                sink: self.name.clone(),
                                statement: format!("(staging table for) {}", self.statement),
                                message: describe(&e),
                            })
                        }
                        Err(e) => {
                            (last, last_transient) = (describe(&e), is_connection_error(&e));
                            *guard = None;
                        }
                    }
                }
            }
            if let Some(c) = guard.as_mut() {
                match c.rt.block_on(self.transaction(&mut c.client, c.stage.as_deref(), batch, rows)) {
                    Ok(Ok(o)) => return Ok(o),
                    Ok(Err(fenced)) => return Err(fenced),
                    Err(e) if is_schema_error(&e) => {
                        // Closed rather than kept: the aborted transaction (or a `COPY` cut
                        // off by a value that did not encode) is only sent to the server when
                        // the runtime turns again, and holds the progress row's lock until then.
                        *guard = None;
                        return Err(Error::Schema {
                            sink: self.name.clone(),
                            statement: self.statement.clone(),
                            message: describe(&e),
                        });
                    }
                    Err(e) => {
                        (last, last_transient) = (describe(&e), is_connection_error(&e));
                        *guard = None; // reconnect: the connection may be broken
                    }
                }
            }
            tracing::warn!(
                "PostgreSQL sink {:?}: batch {} attempt {attempt} failed: {last}",
                self.name,
                info.batch_id
            );
            if attempt < self.attempts {
                std::thread::sleep(Duration::from_millis(100 << attempt.min(6)));
            }
        }
        Err(Error::Unavailable {
            sink: self.name.clone(),
            batch: info.batch_id.0,
            attempts: self.attempts,
            message: last,
            transient: last_transient,
        })
    }

    /// One attempt: `Ok(Err(_))` is a refusal (fenced) that no retry changes.
    async fn transaction(
        &self,
        client: &mut Client,
        stage: Option<&[Type]>,
        batch: &BatchContext,
        rows: &[T],
    ) -> Result<Result<Outcome, Error>, tokio_postgres::Error> {
        let info = &batch.info();
        let tx = client.transaction().await?;
        let job = &*info.job_id;
        let task = batch.task.map(|t| t.0 as i32);
        let epoch = batch.epoch.map(|e| e as i64);
        // Create the progress row of this sink and job if missing, then lock it: the two
        // statements pipelined (sent together, run in order).
        let (created, row) = futures::future::try_join(
            tx.execute(
                "INSERT INTO cairn_sink_progress (sink, job_id, batch_id, task) VALUES ($1, $2, -1, $3) \
             ON CONFLICT (sink, job_id) DO NOTHING",
                &[&self.name, &job, &task],
            ),
            tx.query_one(
                "SELECT batch_id, epoch FROM cairn_sink_progress WHERE sink = $1 AND job_id = $2 FOR UPDATE",
                &[&self.name, &job],
            ),
        )
        .await?;
        if created == 1 {
            let others = tx
                .query(
                    "SELECT job_id, batch_id, task FROM cairn_sink_progress WHERE sink = $1 AND job_id <> $2",
                    &[&self.name, &job],
                )
                .await?;
            for r in &others {
                let (other, batch, other_task): (String, i64, Option<i32>) = (r.get(0), r.get(1), r.get(2));
                if !earlier_writer(task, other_task) {
                    continue;
                }
                tracing::warn!(
                    "PostgreSQL sink {:?}: job {job} writes its output from batch {} on; job {other} \
                     (an earlier checkpoint location?) wrote up to batch {batch} with this sink name",
                    self.name,
                    info.batch_id
                );
            }
        }
        let (done, row_epoch): (i64, Option<i64>) = (row.get(0), row.get(1));
        let batch_id = info.batch_id.0 as i64;
        if let (Some(newer), Some(mine)) = (row_epoch, epoch) {
            if newer > mine {
                tx.rollback().await?;
                return Ok(Err(Error::Fenced {
                    sink: self.name.clone(),
                    job: job.to_string(),
                    batch: batch_id as u64,
                    epoch: mine as u64,
                    newer: newer as u64,
                }));
            }
        }
        if done >= batch_id {
            if epoch > row_epoch {
                // A new owner replaying what its predecessor committed: nothing to write, but
                // from now on the predecessor is fenced here too.
                tx.execute(
                    "UPDATE cairn_sink_progress SET epoch = $3, task = $4 WHERE sink = $1 AND job_id = $2",
                    &[&self.name, &job, &epoch, &task],
                )
                .await?;
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            tracing::info!(
                "PostgreSQL sink {:?}: batch {batch_id} was already committed; skipping",
                self.name
            );
            return Ok(Ok(Outcome::AlreadyCommitted));
        }
        match (&self.copy, stage) {
            (Some(copy), Some(types)) => self.copy_rows(&tx, copy, types, info, rows).await?,
            _ => {
                let stmt = tx.prepare(&self.statement).await?;
                for chunk in rows.chunks(PIPELINE) {
                    let params: Vec<Row> = chunk.iter().map(|r| (self.to_row)(info, r)).collect();
                    let refs: Vec<Vec<&(dyn ToSql + Sync)>> = params
                        .iter()
                        .map(|p| p.iter().map(|x| &**x as &(dyn ToSql + Sync)).collect())
                        .collect();
                    // Polled together, the executes are pipelined on the one connection.
                    futures::future::try_join_all(refs.iter().map(|r| tx.execute(&stmt, r))).await?;
                }
            }
        }
        tx.execute(
            "UPDATE cairn_sink_progress SET batch_id = $3, committed_at = now(), epoch = $4, task = $5 \
             WHERE sink = $1 AND job_id = $2",
            &[&self.name, &job, &batch_id, &epoch, &task],
        )
        .await?;
        if self.record_commits {
            tx.execute(
                "INSERT INTO cairn_sink_commits (sink, job_id, task, batch_id, epoch, rows, writer) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&self.name, &job, &task, &batch_id, &epoch, &(rows.len() as i64), &writer()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(Outcome::Written { rows: rows.len() as u64 }))
    }
}

impl<T: Data> PostgresSink<T> {
    /// The copy mode's write: the rows into the staging table with binary `COPY`, then one
    /// upsert from it (under a savepoint: a batch with a key twice fails the fast upsert, and is
    /// then upserted keeping each key's last row).
    async fn copy_rows(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        copy: &CopyUpsert,
        types: &[Type],
        info: &BatchInfo,
        rows: &[T],
    ) -> Result<(), tokio_postgres::Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let sql = format!("COPY {STAGE} ({}) FROM STDIN (FORMAT binary)", copy.columns.join(", "));
        let writer = BinaryCopyInWriter::new(tx.copy_in(&sql).await?, types);
        futures::pin_mut!(writer);
        for r in rows {
            let row = (self.to_row)(info, r);
            writer.as_mut().write_raw(row.iter().map(|x| &**x as &(dyn ToSql + Sync))).await?;
        }
        writer.finish().await?;
        // One simple query (no parameters): one round trip for both, no statement to prepare.
        match tx.batch_execute(&format!("SAVEPOINT cairn_upsert; {}", self.statement)).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::CARDINALITY_VIOLATION) => {
                tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT cairn_upsert; {}", copy.upsert_last)).await
            }
            Err(e) => Err(e),
        }
    }
}

/// Creates the copy mode's staging table on a new connection, with the types of `columns` of
/// `table`, and returns those types (for the binary `COPY`).
async fn create_stage(client: &Client, copy: &CopyUpsert) -> Result<Vec<Type>, tokio_postgres::Error> {
    let cols = copy.columns.join(", ");
    client
        .batch_execute(&format!(
            "CREATE TEMP TABLE IF NOT EXISTS {STAGE} ON COMMIT DELETE ROWS AS SELECT {cols} FROM {} WITH NO DATA",
            copy.table
        ))
        .await?;
    let stmt = client.prepare(&format!("SELECT {cols} FROM {STAGE}")).await?;
    Ok(stmt.columns().iter().map(|c| c.type_().clone()).collect())
}

/// Whether another job's progress row for this sink is worth a warning when a job first writes
/// through it: a job that is not a task (`None`) is told of every other; a task only of jobs that
/// were not tasks or were the same task (another location's task of that number, most likely an
/// earlier location of the same job), not of its siblings, which share the sink by design.
fn earlier_writer(task: Option<i32>, other_task: Option<i32>) -> bool {
    match (task, other_task) {
        (None, _) | (Some(_), None) => true,
        (Some(mine), Some(other)) => mine == other,
    }
}

/// This process as `host:pid`, for the commit audit.
fn writer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
}

/// The server's own message for a database error (`Display` says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    e.as_db_error().map_or_else(|| e.to_string(), |d| d.message().to_string())
}

/// Errors of the connection rather than the statement: no SQLSTATE (refused, reset, closed), a
/// connection exception (class 08), or the server shutting down, crashed or still starting
/// (57P01–57P03). A job may wait these out.
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    match e.code() {
        None => true,
        Some(c) => {
            c.code().starts_with("08")
                || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW]
                    .contains(c)
        }
    }
}

/// Errors a retry cannot fix: the statement does not match the table.
fn is_schema_error(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    e.code().is_some_and(|c| {
        [
            SqlState::UNDEFINED_TABLE,
            SqlState::UNDEFINED_COLUMN,
            SqlState::DATATYPE_MISMATCH,
            SqlState::SYNTAX_ERROR,
            SqlState::INVALID_TEXT_REPRESENTATION,
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_OBJECT,
            SqlState::WRONG_OBJECT_TYPE,
            SqlState::INVALID_COLUMN_REFERENCE,
        ]
        .contains(c)
    }) || e.to_string().contains("error serializing parameter")
}

/// A batch is written in one transaction at commit, with the batch id recorded in it, so the
/// partitions are gathered first (one connection for the batch: the progress row and the rows
/// must commit together).
impl<T: Data> Sink<T> for PostgresSink<T> {
    fn name(&self) -> &str {
        &self.name
    }
    fn open(&self, _: &BatchContext) -> Result<BatchWrite, UserError> {
        self.pending.clear();
        Ok(BatchWrite::Write)
    }
    fn write_partition(&self, _: &BatchContext, partition: usize, data: Vec<T>) -> Result<(), UserError> {
        self.pending.push(partition, data);
        Ok(())
    }
    fn commit(&self, batch: &BatchContext) -> Result<(), UserError> {
        let rows = self.pending.take_in_order();
        match self.write(batch, &rows) {
            Ok(_) => {}
            Err(e @ Error::Unavailable { transient: true, .. }) => return Err(cairn::Transient::wrap(e)),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }
    fn abort(&self, _: &BatchContext) {
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::earlier_writer;

    #[test]
    fn a_task_is_not_warned_about_its_sibling_tasks_but_about_other_writers() {
        assert!(earlier_writer(None, None), "single-process jobs: every other one is news");
        assert!(earlier_writer(None, Some(3)), "a single-process job after a scaled-out one");
        assert!(earlier_writer(Some(3), None), "a task after a single-process job");
        assert!(earlier_writer(Some(3), Some(3)), "another location's task 3");
        assert!(!earlier_writer(Some(3), Some(4)), "task 4 of the same job shares the sink");
    }
}
