//! `cairn checkpoint export | import | dump-state` on state of user types (a struct holding an
//! enum with a struct variant, a vector of enums, an option), without the job's types in the
//! `cairn` binary: exported values are the data the job computed; an edited value imported into
//! a new location shows in the job's next output there; an unedited export → import → restart
//! gives the same output as the original location; a row that does not fit is refused.

mod support;
use support::{cairn, text};

use cairn::{StreamingContext, Trigger};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Tier {
    Basic,
    Gold { since_batch: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Move {
    Deposit(i64),
    Withdraw { amount: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Account {
    balance: i64,
    tier: Tier,
    last: Vec<Move>,
    note: Option<String>,
}

/// Batch `b`: per user `u0..u3`, a signed amount.
fn input(batches: usize) -> Vec<Vec<(String, i64)>> {
    (0..batches as i64)
        .map(|b| (0..4).map(|u| (format!("u{u}"), (b * 7 + u * 13) % 40 - 10)).collect())
        .collect()
}

fn step(batch: u64, old: Option<Account>, amounts: Vec<i64>) -> Account {
    let mut a = old.unwrap_or(Account { balance: 0, tier: Tier::Basic, last: Vec::new(), note: None });
    for x in amounts {
        a.balance += x;
        a.last.push(if x >= 0 { Move::Deposit(x) } else { Move::Withdraw { amount: -x } });
    }
    a.last.drain(..a.last.len().saturating_sub(2));
    if a.balance > 50 && a.tier == Tier::Basic {
        a.tier = Tier::Gold { since_batch: batch };
    }
    a.note = (a.balance < 0).then(|| "overdrawn".to_string());
    a
}

type Out = BTreeMap<u64, Vec<(String, Account)>>;

/// Runs the job on `dir` until `batches` batches exist; returns each batch's output.
fn run(dir: &Path, batches: usize) -> Out {
    let ctx = StreamingContext::builder()
        .checkpoint(dir.to_str().unwrap())
        .batch_interval(Duration::from_secs(1))
        .stop_after_batches(batches as u64)
        .trigger(Trigger::AvailableNow)
        .build()
        .unwrap();
    let (q, s) = ctx.queue_stream::<(String, i64)>("moves").unwrap();
    for b in input(batches) {
        q.push(b);
    }
    let out: Arc<Mutex<Out>> = Arc::default();
    let o = out.clone();
    s.update_state_by_key_with_batch("accounts", step).foreach_batch(move |info, mut data| {
        data.sort();
        o.lock().unwrap().insert(info.batch_id.0, data);
        Ok(())
    });
    ctx.run_available().unwrap();
    let got = out.lock().unwrap().clone();
    got
}

/// `update_state_by_key` with the batch id passed to the function (for `Tier::Gold`).
trait WithBatch {
    fn update_state_by_key_with_batch(
        &self,
        name: &str,
        f: fn(u64, Option<Account>, Vec<i64>) -> Account,
    ) -> cairn::DStream<(String, Account)>;
}

impl WithBatch for cairn::DStream<(String, i64)> {
    fn update_state_by_key_with_batch(
        &self,
        name: &str,
        f: fn(u64, Option<Account>, Vec<i64>) -> Account,
    ) -> cairn::DStream<(String, Account)> {
        // The batch id rides along with each amount so the state function can see it.
        self.transform(|info, parts| {
            parts
                .into_iter()
                .map(|p| p.into_iter().map(|(k, v)| (k, (info.batch_id.0, v))).collect())
                .collect()
        })
        .update_state_by_key(name, move |_, vs: Vec<(u64, i64)>, old: Option<Account>| {
            let batch = vs.first().map_or(0, |(b, _)| *b);
            Some(f(batch, old, vs.into_iter().map(|(_, v)| v).collect()))
        })
    }
}

/// `cairn checkpoint import FROM --operator accounts --file FILE --to TO`.
fn import(from: &Path, file: &Path, to: &Path) -> std::process::Output {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    cairn(&[
        "checkpoint",
        "import",
        &path(from),
        "--operator",
        "accounts",
        "--file",
        &path(file),
        "--to",
        &path(to),
    ])
}

/// The state the job holds after `batches` batches, computed independently of cairn.
fn model(batches: usize) -> BTreeMap<String, Account> {
    let mut state: BTreeMap<String, Account> = BTreeMap::new();
    for (b, batch) in input(batches).into_iter().enumerate() {
        let mut per: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for (k, v) in batch {
            per.entry(k).or_default().push(v);
        }
        for (k, vs) in per {
            let old = state.remove(&k);
            state.insert(k, step(b as u64, old, vs));
        }
    }
    state
}

#[test]
fn export_edit_import_and_restart_shows_the_edit_and_an_unedited_round_trip_changes_nothing() {
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = (dirs[0].path(), dirs[1].path(), dirs[2].path());
    run(a, 6);

    // Export: the values are the data the job computed.
    let exported = dirs[3].path().join("accounts.jsonl");
    let o = cairn(&[
        "checkpoint",
        "export",
        a.to_str().unwrap(),
        "--operator",
        "accounts",
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let lines = std::fs::read_to_string(&exported).unwrap();
    let rows: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let got: BTreeMap<String, Account> = rows
        .iter()
        .map(|r| {
            (r["key"].as_str().unwrap().to_string(), serde_json::from_value(r["state"].clone()).unwrap())
        })
        .collect();
    assert_eq!(got, model(6));
    assert!(lines.contains(r#"{"Gold":{"since_batch":"#) || lines.contains(r#""tier":"Basic""#), "{lines}");

    // dump-state reads the same values.
    let o = cairn(&[
        "checkpoint",
        "dump-state",
        a.to_str().unwrap(),
        "--operator",
        "accounts",
        "--format",
        "jsonl",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("balance"), "decoded values: {}", text(&o));

    // Unedited export -> import -> restart: the same output as the original location's.
    let o = import(a, &exported, b);
    assert!(o.status.success(), "{}", text(&o));
    let from_import = run(b, 9);
    let original = run(a, 9);
    assert_eq!(from_import.keys().copied().collect::<Vec<_>>(), vec![6, 7, 8]);
    assert_eq!(from_import, original);

    // Edited: u1's balance set by hand shows in its next output.
    let edited: String = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if r["key"] == "u1" {
                r["state"]["balance"] = serde_json::json!(1_000_000);
            }
            format!("{r}\n")
        })
        .collect();
    let edited_file = dirs[3].path().join("edited.jsonl");
    std::fs::write(&edited_file, edited).unwrap();
    let o = import(a, &edited_file, c);
    // `a` has moved on to batch 9 meanwhile: the import copies its newest restore point.
    assert!(o.status.success(), "{}", text(&o));
    let after = run(c, 10);
    let u1 = &after[&9].iter().find(|(k, _)| k == "u1").unwrap().1;
    let added: i64 = input(10)[9].iter().filter(|(k, _)| k == "u1").map(|(_, v)| v).sum();
    assert_eq!(u1.balance, 1_000_000 + added);
    assert!(matches!(u1.tier, Tier::Gold { .. }));
}

#[test]
fn an_import_row_that_does_not_fit_is_refused_by_line_and_writes_nothing() {
    let a = tempfile::tempdir().unwrap();
    let to = tempfile::tempdir().unwrap();
    let files = tempfile::tempdir().unwrap();
    run(a.path(), 3);
    for (row, why) in [
        (r#"{"key":"u1","state":{"balance":"lots","tier":"Basic","last":[],"note":null}}"#, "row 2: state: "),
        (
            r#"{"key":"u1","state":{"balance":1,"tier":"Platinum","last":[],"note":null}}"#,
            "no variant \"Platinum\"",
        ),
        (r#"{"key":7,"state":{"balance":1,"tier":"Basic","last":[],"note":null}}"#, "row 2: key: "),
    ] {
        let file = files.path().join("rows.jsonl");
        let good = r#"{"key":"u0","state":{"balance":5,"tier":"Basic","last":[{"Deposit":5}],"note":null},"seen_ms":0}"#;
        std::fs::write(&file, format!("{good}\n{row}\n")).unwrap();
        let o = import(a.path(), &file, to.path());
        assert!(!o.status.success(), "accepted {row}");
        assert!(text(&o).contains(why), "{row}: {}", text(&o));
        assert_eq!(std::fs::read_dir(to.path()).unwrap().count(), 0, "nothing written for {row}");
    }
    // Not a keyed operator, or no such operator: said so.
    let o = cairn(&["checkpoint", "export", a.path().to_str().unwrap(), "--operator", "nope"]);
    assert!(!o.status.success() && text(&o).contains("no such operator"), "{}", text(&o));
    let o = cairn(&["checkpoint", "export", a.path().to_str().unwrap(), "--operator", "moves"]);
    assert!(!o.status.success() && text(&o).contains("source state cannot be exported"), "{}", text(&o));
}
