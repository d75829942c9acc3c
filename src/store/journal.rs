//! Durable history: every accepted emergency is committed to SQLite before its publisher is told
//! it was accepted, and a restarted server loads its history and sequence from there.
//!
//! SQLite runs on a thread of its own, so the executor never blocks on the disk. That thread
//! assigns sequence numbers and serializes envelopes as it writes them, which keeps the seqs on
//! disk gap-free whatever fails. It commits everything waiting in its queue as one transaction
//! (group commit: a burst pays one fsync), then hands the committed emergencies, in seq order, to
//! the executor, which broadcasts them and answers their publishers. A failed commit assigns no
//! seq and answers those publishers with an error.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender};
use log::{error, info};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::value::RawValue;

use crate::core::{Receipt, Stored};
use crate::protocol::{self, Source};

/// Submissions waiting for the storage thread; more are refused as "storage busy".
pub const MAX_QUEUED: usize = 4096;
/// Most submissions committed in one transaction.
const MAX_BATCH: usize = 512;
/// Committed transactions waiting for the executor to deliver them; then the storage thread waits.
const COMMITTED_BATCHES: usize = 64;
const DATABASE_FILE: &str = "history.sqlite3";
const LOCK_FILE: &str = "lock";

/// How much history is kept, on disk and in memory.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_count: usize,
    pub max_age: Duration,
}

/// What a data dir holds at start.
#[derive(Debug)]
pub struct Loaded {
    /// The identity of this history, created with the data dir.
    pub stream_id: String,
    pub last_seq: u64,
    /// Retained emergencies, oldest first.
    pub retained: Vec<Stored>,
}

/// Why the journal did not store a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// `MAX_QUEUED` submissions are already waiting for the disk.
    Busy,
    /// Writing to the data dir failed, or the storage thread has stopped; nothing was stored.
    Failed(String),
}

/// The publisher's side of a submission: its `Receipt`, or why it was not stored.
pub type Reply = Sender<Result<Receipt, StorageError>>;

/// Emergencies committed in one transaction, in seq order, with their publishers' replies.
#[derive(Debug)]
pub struct Committed(pub Vec<(Stored, Reply)>);

enum Request {
    Append {
        data: Box<RawValue>,
        source: Source,
        received_at: SystemTime,
        reply: Reply,
    },
    /// Delete what is older than the retention allows, even when nothing is published.
    Sweep,
}

/// The executor's handle on the storage thread.
#[derive(Debug)]
pub struct Journal {
    requests: Sender<Request>,
    /// Submissions sent and not yet taken by the storage thread, at most `MAX_QUEUED`. Counted
    /// here because a bounded channel would preallocate (and touch) every slot: 228 KB idle.
    queued: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Append { .. } => "Append",
            Request::Sweep => "Sweep",
        })
    }
}

/// Where the history lives.
#[derive(Debug)]
pub enum Storage {
    /// Lost at restart.
    Memory,
    /// In a data dir: what it held at start, and the journal that keeps it.
    Durable { journal: Journal, loaded: Loaded, committed: Receiver<Committed> },
}

/// Opens (or creates) the history in `dir`, loads it, and starts the storage thread. Every
/// error names the data dir and what is wrong with it.
pub fn open(dir: &Path, retention: Retention) -> Result<(Journal, Loaded, Receiver<Committed>), String> {
    let shown = dir.display();
    fs::create_dir_all(dir).map_err(|e| format!("cannot create data dir {shown}: {e}"))?;
    let lock =
        File::create(dir.join(LOCK_FILE)).map_err(|e| format!("cannot write to data dir {shown}: {e}"))?;
    lock.try_lock().map_err(|_| format!("data dir {shown} is in use by another resq-push"))?;
    let path = dir.join(DATABASE_FILE);
    let mut db =
        open_database(&path).map_err(|e| format!("data dir {shown}: {} is unusable: {e}", path.display()))?;
    let loaded =
        load(&mut db, retention).map_err(|e| format!("data dir {shown}: cannot read the history: {e}"))?;

    let (requests, incoming) = async_channel::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    let taken = Arc::clone(&queued);
    // Batches, each up to MAX_BATCH emergencies: a few cover everything the requests can hold.
    // (async-channel writes every slot up front; 4096 of them were 132 KB of idle RSS.)
    let (committed_sender, committed) = async_channel::bounded(COMMITTED_BATCHES);
    let last_seq = loaded.last_seq;
    let thread = std::thread::Builder::new()
        .name("resq-journal".into())
        .spawn(move || {
            // The lock lives as long as the thread that writes.
            let _lock = lock;
            run(db, last_seq, retention, incoming, &taken, committed_sender);
        })
        .map_err(|e| format!("cannot start the storage thread: {e}"))?;
    Ok((Journal { requests, queued, thread: Some(thread) }, loaded, committed))
}

impl Journal {
    /// Queues a checked submission for storage; the receiver gets its receipt once committed
    /// and broadcast. Refused at once if the storage thread is `MAX_QUEUED` behind.
    pub fn append(
        &self,
        data: Box<RawValue>,
        source: Source,
    ) -> Result<Receiver<Result<Receipt, StorageError>>, StorageError> {
        if self.queued.fetch_add(1, Ordering::Relaxed) >= MAX_QUEUED {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(StorageError::Busy);
        }
        let (reply, receipt) = async_channel::bounded(1);
        let request = Request::Append { data, source, received_at: SystemTime::now(), reply };
        match self.requests.try_send(request) {
            Ok(()) => Ok(receipt),
            Err(_) => {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                Err(StorageError::Failed("the storage thread has stopped".into()))
            }
        }
    }

    /// Asks the storage thread to delete what has aged out.
    pub fn sweep(&self) {
        let _ = self.requests.try_send(Request::Sweep);
    }

    /// Takes no more submissions: the storage thread commits what is queued, hands it over and
    /// stops, which closes the committed channel. Unlike dropping the journal, this does not
    /// wait for the thread, so the executor can go on delivering what it commits.
    pub fn close(&self) {
        self.requests.close();
    }
}

impl Drop for Journal {
    /// Lets the storage thread finish what it has, then waits for it.
    fn drop(&mut self) {
        self.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn open_database(path: &PathBuf) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    // WAL with synchronous=FULL: a commit is on disk when it returns, and survives power loss.
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
    if check != "ok" {
        return Err(rusqlite::Error::InvalidParameterName(format!("integrity check failed: {check}")));
    }
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS emergencies (
             seq INTEGER PRIMARY KEY,
             received_at_ms INTEGER NOT NULL,
             envelope TEXT NOT NULL
         );",
    )?;
    Ok(db)
}

fn load(db: &mut Connection, retention: Retention) -> rusqlite::Result<Loaded> {
    let existing: Option<String> =
        db.query_row("SELECT value FROM meta WHERE key = 'stream_id'", [], |row| row.get(0)).optional()?;
    let stream_id = match existing {
        Some(stream_id) => stream_id,
        None => {
            let stream_id = new_stream_id();
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('stream_id', ?1), ('last_seq', '0')",
                [&stream_id],
            )?;
            info!("new history {stream_id} created");
            stream_id
        }
    };
    let recorded: Option<String> =
        db.query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |row| row.get(0)).optional()?;
    let highest: Option<i64> = db.query_row("SELECT MAX(seq) FROM emergencies", [], |row| row.get(0))?;
    let last_seq = recorded.and_then(|text| text.parse().ok()).unwrap_or(0).max(highest.unwrap_or(0) as u64);
    delete_expired(db, last_seq, retention)?;
    let mut statement = db.prepare("SELECT seq, received_at_ms, envelope FROM emergencies ORDER BY seq")?;
    let retained = statement
        .query_map([], |row| {
            Ok(Stored {
                seq: row.get::<_, i64>(0)? as u64,
                received_at: UNIX_EPOCH + Duration::from_millis(row.get::<_, i64>(1)?.max(0) as u64),
                envelope: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(statement);
    Ok(Loaded { stream_id, last_seq, retained })
}

/// The storage thread: commit what is queued, hand it to the executor, repeat.
fn run(
    mut db: Connection,
    mut last_seq: u64,
    retention: Retention,
    incoming: Receiver<Request>,
    queued: &AtomicUsize,
    committed: Sender<Committed>,
) {
    while let Ok(first) = incoming.recv_blocking() {
        let mut appends = Vec::new();
        let mut request = Some(first);
        while let Some(next) = request.take() {
            if let Request::Append { data, source, received_at, reply } = next {
                queued.fetch_sub(1, Ordering::Relaxed);
                appends.push((data, source, received_at, reply));
            }
            if appends.len() < MAX_BATCH {
                request = incoming.try_recv().ok();
            }
        }
        match write_batch(&mut db, last_seq, &appends, retention) {
            Ok(stored) => {
                last_seq += stored.len() as u64;
                let replies = appends.into_iter().map(|(_, _, _, reply)| reply);
                if !stored.is_empty()
                    && committed.send_blocking(Committed(stored.into_iter().zip(replies).collect())).is_err()
                {
                    return;
                }
            }
            Err(e) => {
                error!("storing {} emergencies failed, none was accepted: {e}", appends.len());
                for (_, _, _, reply) in appends {
                    let _ = reply.try_send(Err(StorageError::Failed(e.to_string())));
                }
            }
        }
    }
}

/// Stores `appends` as seqs `last_seq + 1 ..` in one transaction, with the retention applied.
fn write_batch(
    db: &mut Connection,
    last_seq: u64,
    appends: &[(Box<RawValue>, Source, SystemTime, Reply)],
    retention: Retention,
) -> rusqlite::Result<Vec<Stored>> {
    let transaction = db.transaction()?;
    let mut stored = Vec::with_capacity(appends.len());
    {
        let mut insert = transaction
            .prepare("INSERT INTO emergencies (seq, received_at_ms, envelope) VALUES (?1, ?2, ?3)")?;
        for (offset, (data, source, received_at, _)) in appends.iter().enumerate() {
            let seq = last_seq + 1 + offset as u64;
            let envelope = protocol::envelope_json(seq, *received_at, *source, data);
            insert.execute(params![seq as i64, unix_millis(*received_at), envelope])?;
            stored.push(Stored { seq, received_at: *received_at, envelope });
        }
    }
    let new_last = last_seq + stored.len() as u64;
    if !stored.is_empty() {
        transaction.execute("UPDATE meta SET value = ?1 WHERE key = 'last_seq'", [new_last.to_string()])?;
    }
    delete_expired(&transaction, new_last, retention)?;
    transaction.commit()?;
    Ok(stored)
}

fn delete_expired(db: &Connection, last_seq: u64, retention: Retention) -> rusqlite::Result<usize> {
    let oldest_kept_seq = last_seq.saturating_sub(retention.max_count as u64);
    let oldest_kept_ms = unix_millis(SystemTime::now()) - retention.max_age.as_millis() as i64;
    // By age, everything up to the newest seq that is too old: the history stays one unbroken
    // run of seqs even if the clock jumped (a board without a real-time clock before NTP).
    db.execute(
        "DELETE FROM emergencies WHERE seq <= ?1
             OR seq <= (SELECT MAX(seq) FROM emergencies WHERE received_at_ms < ?2)",
        params![oldest_kept_seq as i64, oldest_kept_ms],
    )
}

fn unix_millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as i64
}

/// A new random stream id: 16 hex digits from the kernel's random source.
pub fn new_stream_id() -> String {
    let mut bytes = [0u8; 8];
    let from_kernel = File::open("/dev/urandom").and_then(|mut urandom| urandom.read_exact(&mut bytes));
    if from_kernel.is_err() {
        // Unique enough to tell two histories apart, which is all the id is for.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        bytes = (now.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data dir of one test's own, removed when the test ends, passed or failed.
    struct TestDir(PathBuf);

    impl TestDir {
        /// Unique per process, per call and per test, so parallel tests and concurrent runs never
        /// share one; a leftover from a killed run with the same pid is removed first.
        fn new(test: &str) -> TestDir {
            static CREATED: AtomicUsize = AtomicUsize::new(0);
            let serial = CREATED.fetch_add(1, Ordering::Relaxed);
            let name = format!("resq-push-journal-{}-{serial}-{test}", std::process::id());
            TestDir::at(std::env::temp_dir().join(name))
        }

        fn at(path: PathBuf) -> TestDir {
            match fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{}: {e}", path.display()),
                _ => {}
            }
            fs::create_dir(&path).unwrap();
            TestDir(path)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_test_dir_starts_empty_and_is_removed_even_when_its_test_fails() {
        let leftover =
            std::env::temp_dir().join(format!("resq-push-journal-{}-leftover", std::process::id()));
        fs::create_dir_all(&leftover).unwrap();
        fs::write(leftover.join(DATABASE_FILE), "from a killed run").unwrap();
        let dir = TestDir::at(leftover.clone());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        let failed = std::panic::catch_unwind(move || {
            let _dir = dir;
            panic!("a failing test");
        });
        assert!(failed.is_err());
        assert!(!leftover.exists());
    }

    #[test]
    fn appends_beyond_max_queued_are_refused_as_storage_busy() {
        let dir = TestDir::new("storage-busy");
        let retention = Retention { max_count: 10, max_age: Duration::from_secs(3600) };
        let (journal, _, committed) = open(dir.path(), retention).unwrap();
        let data = || RawValue::from_string("{}".into()).unwrap();
        journal.queued.store(MAX_QUEUED, Ordering::Relaxed);
        assert_eq!(journal.append(data(), Source::Unix).err(), Some(StorageError::Busy));
        journal.queued.store(0, Ordering::Relaxed);
        let _receipt = journal.append(data(), Source::Unix).unwrap();
        let Committed(batch) = committed.recv_blocking().unwrap();
        assert_eq!(batch[0].0.seq, 1);
        assert_eq!(journal.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn expiry_by_age_never_leaves_a_gap() {
        let dir = TestDir::new("gap");
        let retention = Retention { max_count: 10, max_age: Duration::from_secs(3600) };
        let (journal, _, committed) = open(dir.path(), retention).unwrap();
        for _ in 0..5 {
            journal.append(RawValue::from_string("{}".into()).unwrap(), Source::Unix).unwrap();
            committed.recv_blocking().unwrap();
        }
        drop(journal);
        // Seq 3 stamped before the clock was set: it and everything before it go, nothing after.
        let db = Connection::open(dir.path().join(DATABASE_FILE)).unwrap();
        db.execute("UPDATE emergencies SET received_at_ms = 1000 WHERE seq = 3", []).unwrap();
        delete_expired(&db, 5, retention).unwrap();
        let seqs: Vec<i64> = {
            let mut query = db.prepare("SELECT seq FROM emergencies ORDER BY seq").unwrap();
            query.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
        };
        assert_eq!(seqs, [4, 5]);
    }
}
