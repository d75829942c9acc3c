//! Durable history: every accepted emergency is committed to SQLite before its publisher is told
//! it was accepted, and a restarted server loads its history and sequence from there.
//!
//! SQLite runs on a thread of its own, so the executor never blocks on the disk. That thread
//! assigns sequence numbers and serializes envelopes as it writes them, which keeps the seqs on
//! disk gap-free whatever fails. It commits everything waiting in its queue as one transaction
//! (group commit: a burst pays one fsync), then hands the committed emergencies, in seq order, to
//! the executor, which broadcasts them and answers their publishers. A failed commit assigns no
//! seq and answers those publishers with an error. Each transaction also deletes what retention
//! no longer keeps: by count, and by age when the clock can be trusted (`core::clock`). The
//! outcome of the last commit is kept as the `StorageState` that `/healthz` reports. Before and
//! after each commit the database file at its path must still be the one opened at start
//! (`DatabaseFile`): a data dir removed under the server is refused, not written to unlinked files.
//!
//! The idempotency key of a submission is decided here too, where its seq would be assigned: the
//! key and the digest of the body are stored in the emergency's row, in the same transaction, and
//! go with the row when retention deletes it. A submission whose key is in a retained row (one
//! committed earlier, or earlier in the same transaction) is a duplicate or a conflict: it gets no
//! seq, no row, and is not delivered to the hub.

use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_channel::{Receiver, Sender};
use log::{Level, error, info};
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use serde_json::value::RawValue;
use smol::lock::{Semaphore, SemaphoreGuardArc};

use crate::core::clock::{Reading, RetentionClock};
use crate::core::idempotency::{BodyDigest, Fingerprint};
use crate::core::receipts::ReceiptEvent;
use crate::core::{Outcome, Receipt, Stored};
use crate::protocol::{self, Source};
use crate::store::ClusterOnly;
use crate::support::logger::WarningThrottle;

/// Submissions waiting for the storage thread (`Place`s); a publisher that cannot wait for one
/// (HTTP) is refused as "storage busy".
pub const MAX_QUEUED: usize = 4096;
/// Most submissions committed in one transaction.
const MAX_BATCH: usize = 512;
/// Receipt events past which no further request joins a transaction (one request's events are
/// never split): a flood of acks makes several transactions, not one growing one.
const MAX_BATCH_EVENTS: usize = 16 * 1024;
/// Committed transactions waiting for the executor to deliver them; then the storage thread waits.
const COMMITTED_BATCHES: usize = 64;
const DATABASE_FILE: &str = "history.sqlite3";
const LOCK_FILE: &str = "lock";

/// How much history is kept, on disk and in memory.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    pub max_count: usize,
    pub max_age: Duration,
    /// Open emergencies kept however old (`--max-open`): only closed ones age out, and open
    /// ones beyond the newest `max_open`.
    pub max_open: usize,
}

/// Retention as the storage thread applies it: by count always, by age when the clock can be
/// trusted (`RetentionClock`).
#[derive(Debug)]
struct Expiry {
    retention: Retention,
    clock: RetentionClock,
}

/// The newest emergency stored: the next one follows it.
#[derive(Clone, Copy, Debug)]
struct Tail {
    seq: u64,
    received_at: SystemTime,
}

/// What a data dir holds at start.
#[derive(Debug)]
pub struct Loaded {
    /// The identity of this history, created with the data dir.
    pub stream_id: String,
    pub last_seq: u64,
    /// Retained emergencies, oldest first: the history, and older ones still open.
    pub retained: Vec<Stored>,
    /// Their stored receipts, closes and escalations.
    pub events: Vec<ReceiptEvent>,
}

/// Why the journal did not store a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// `MAX_QUEUED` submissions are already waiting for the disk.
    Busy,
    /// Writing to the data dir failed, or the storage thread has stopped; nothing was stored.
    Failed { cause: FailureCause, detail: String },
}

impl StorageError {
    pub fn cause(&self) -> FailureCause {
        match self {
            StorageError::Busy => FailureCause::Busy,
            StorageError::Failed { cause, .. } => *cause,
        }
    }
}

/// Why storage did not take a submission, in a few kinds an operator acts on differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureCause {
    /// The disk is full: free space.
    DiskFull,
    /// The OS failed a read or write, or refused the file: check the disk and the data dir.
    Io,
    /// The disk does not keep up (`MAX_QUEUED` waiting), or another process holds the database.
    Busy,
    /// The storage thread is gone.
    Stopped,
    /// The data dir was removed or replaced while the server ran: restart it (a new history).
    DataDirGone,
    Other,
}

impl FailureCause {
    /// The cause's name in metrics and `/healthz`.
    pub fn label(self) -> &'static str {
        match self {
            FailureCause::DiskFull => "disk_full",
            FailureCause::Io => "io",
            FailureCause::Busy => "busy",
            FailureCause::Stopped => "stopped",
            FailureCause::DataDirGone => "data_dir_gone",
            FailureCause::Other => "other",
        }
    }

    fn of(error: &rusqlite::Error) -> FailureCause {
        match error.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => FailureCause::DiskFull,
            Some(
                ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly
                | ErrorCode::PermissionDenied
                | ErrorCode::NoLargeFileSupport,
            ) => FailureCause::Io,
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => FailureCause::Busy,
            _ => FailureCause::Other,
        }
    }
}

/// Whether the journal can store: the outcome of its last commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StorageState {
    /// The last commit succeeded, or none was needed yet.
    #[default]
    Ok,
    /// Commits fail: since the first failure of this run of them, with the latest error.
    Failing { since: SystemTime, cause: FailureCause, last_error: String },
}

/// The storage state, written by the storage thread after every commit and read by `/healthz`.
#[derive(Debug, Default)]
struct SharedState(Mutex<StorageState>);

impl SharedState {
    fn succeeded(&self) {
        *self.lock() = StorageState::Ok;
    }

    /// Keeps the time of the first failure of a run, so that `since` says how long it has lasted.
    fn failed(&self, cause: FailureCause, last_error: String) {
        let mut state = self.lock();
        let since = match &*state {
            StorageState::Failing { since, .. } => *since,
            StorageState::Ok => SystemTime::now(),
        };
        *state = StorageState::Failing { since, cause, last_error };
    }

    fn get(&self) -> StorageState {
        self.lock().clone()
    }

    /// A thread that panicked holding the lock left a state still worth reading.
    fn lock(&self) -> MutexGuard<'_, StorageState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The publisher's side of a submission: what became of it, or why it was not stored.
pub type Reply = Sender<Result<Outcome<Receipt>, StorageError>>;

/// What one transaction committed: the submissions decided, in the order they came, with their
/// publishers' replies (the new emergencies among them in seq order), then the receipt events
/// stored, and those waiting to hear that their events are stored.
///
/// In cluster mode the journal is the cache of the engine's stream: what the follower took from
/// it comes out here too (`Journal::cacher`), in `cached`.
#[derive(Debug, Default)]
pub struct Committed {
    pub outcomes: Vec<(Outcome<Stored>, Reply)>,
    pub events: Vec<ReceiptEvent>,
    pub waiting: Vec<Sender<()>>,
    /// Cluster mode only: `None` in the edge build, as the compiler sees (`Cached` holds a
    /// `ClusterOnly`), so the executor's code for it is left out there.
    pub cached: Option<Cached>,
}

/// What a transaction of the cache (cluster mode) hands the executor, beside `Committed`'s.
#[derive(Debug)]
pub struct Cached {
    /// The cache was emptied for this new stream identity: it comes before anything after it.
    pub reset: Option<String>,
    /// New emergencies the engine committed, in seq order: no local publisher waits for them.
    pub emergencies: Vec<Stored>,
    /// The deliveries of other boxes among `Committed::events`, which the hub applies (its own
    /// are in its receipts from the moment they were made).
    pub followed_deliveries: Vec<ReceiptEvent>,
    pub only: ClusterOnly,
}

/// One checked submission for the storage thread.
struct Append {
    data: Box<RawValue>,
    source: Source,
    received_at: SystemTime,
    fingerprint: Option<Fingerprint>,
    reply: Reply,
}

/// A submission's place in the queue to the storage thread, given back when the thread takes
/// it: at most `MAX_QUEUED` are out. Counted by a semaphore rather than a bounded channel, which
/// would preallocate (and touch) every slot: 228 KB idle.
#[derive(Debug)]
pub struct Place {
    _permit: SemaphoreGuardArc,
}

enum Request {
    /// Its `Place` is dropped as soon as the storage thread takes it.
    Append(Append, Place),
    /// Delete what is older than the retention allows, even when nothing is published.
    Sweep,
    /// Store receipt events in the next transaction; `Some` hears once they are applied. No
    /// `Place`: the hub asks for each delivery, ack, close and escalation once, so these are
    /// bounded by the receipts it holds.
    Record(Vec<ReceiptEvent>, Option<Sender<()>>),
    /// Cluster mode: emergencies the engine committed, with its seqs, for the cache and then
    /// the hub (`Cacher::cache`). One place for the batch.
    Cache(Vec<Stored>, Place, ClusterOnly),
    /// Cluster mode: the stream was recreated: empty the cache, take this identity.
    Reset(String, ClusterOnly),
    /// Cluster mode: receipt events the engine committed, from its receipts stream.
    CacheEvents(Vec<ReceiptEvent>, Place, ClusterOnly),
}

/// The executor's handle on the storage thread.
#[derive(Debug)]
pub struct Journal {
    requests: Sender<Request>,
    /// `MAX_QUEUED` places; those out are submissions sent and not yet taken.
    places: Arc<Semaphore>,
    state: Arc<SharedState>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Append(..) => "Append",
            Request::Sweep => "Sweep",
            Request::Record(..) => "Record",
            Request::Cache(..) => "Cache",
            Request::Reset(..) => "Reset",
            Request::CacheEvents(..) => "CacheEvents",
        })
    }
}

/// Opens (or creates) the history in `dir`, loads it, and starts the storage thread. Every
/// error names the data dir and what is wrong with it.
#[cfg(test)]
pub fn open(dir: &Path, retention: Retention) -> Result<(Journal, Loaded, Receiver<Committed>), String> {
    open_as(dir, retention, None)
}

/// As `open`; with `stream_id` (cluster mode: the engine's stream identity, read at start) a
/// cache of another stream is emptied first and takes that identity.
pub fn open_as(
    dir: &Path,
    retention: Retention,
    stream_id: Option<&str>,
) -> Result<(Journal, Loaded, Receiver<Committed>), String> {
    let shown = dir.display();
    fs::create_dir_all(dir).map_err(|e| format!("cannot create data dir {shown}: {e}"))?;
    let lock =
        File::create(dir.join(LOCK_FILE)).map_err(|e| format!("cannot write to data dir {shown}: {e}"))?;
    lock.try_lock().map_err(|_| format!("data dir {shown} is in use by another resq-push"))?;
    let path = dir.join(DATABASE_FILE);
    let mut db = open_database(&path).map_err(|unusable| unusable.explain(dir, &path))?;
    let file = DatabaseFile::opened(dir, &path).map_err(|e| format!("data dir {shown}: {e}"))?;
    let mut expiry = Expiry::new(retention);
    if let Some(stream_id) = stream_id {
        adopt(&mut db, stream_id).map_err(|e| format!("data dir {shown}: cannot reset the cache: {e}"))?;
    }
    let loaded = load(&mut db, &mut expiry, Reading::now())
        .map_err(|e| format!("data dir {shown}: cannot read the history: {e}"))?;

    let (requests, incoming) = async_channel::unbounded();
    let places = Arc::new(Semaphore::new(MAX_QUEUED));
    let state = Arc::new(SharedState::default());
    let outcomes = Arc::clone(&state);
    // Batches, each up to MAX_BATCH emergencies: a few cover everything the requests can hold.
    // (async-channel writes every slot up front; 4096 of them were 132 KB of idle RSS.)
    let (committed_sender, committed) = async_channel::bounded(COMMITTED_BATCHES);
    let tail = loaded.tail();
    let thread = std::thread::Builder::new()
        .name("resq-journal".into())
        .spawn(move || {
            // The lock lives as long as the thread that writes.
            let _lock = lock;
            run(Database { db, file }, tail, expiry, Incoming(incoming), &outcomes, committed_sender);
        })
        .map_err(|e| format!("cannot start the storage thread: {e}"))?;
    Ok((Journal { requests, places, state, thread: Some(thread) }, loaded, committed))
}

impl Journal {
    /// A place in the queue, if the storage thread is not `MAX_QUEUED` behind.
    pub fn try_place(&self) -> Result<Place, StorageError> {
        let permit = self.places.try_acquire_arc().ok_or(StorageError::Busy)?;
        Ok(Place { _permit: permit })
    }

    /// Waits until the storage thread takes enough submissions to leave a place free.
    pub async fn place(&self) -> Place {
        Place { _permit: self.places.acquire_arc().await }
    }

    /// Queues a checked submission for storage in its place; the receiver gets its receipt
    /// once committed and broadcast, or hears that its key makes it a duplicate or a conflict.
    pub fn append(
        &self,
        place: Place,
        data: Box<RawValue>,
        source: Source,
        fingerprint: Option<Fingerprint>,
    ) -> Result<Receiver<Result<Outcome<Receipt>, StorageError>>, StorageError> {
        let (reply, receipt) = async_channel::bounded(1);
        let received_at = SystemTime::now();
        let request = Request::Append(Append { data, source, received_at, fingerprint, reply }, place);
        match self.requests.try_send(request) {
            Ok(()) => Ok(receipt),
            Err(_) => {
                let detail = "the storage thread has stopped".to_owned();
                self.state.failed(FailureCause::Stopped, detail.clone());
                Err(StorageError::Failed { cause: FailureCause::Stopped, detail })
            }
        }
    }

    /// Queues receipt events for the next transaction (no fsync of their own when other work is
    /// queued: they join its commit). `done` hears once they are committed and applied.
    pub fn record(&self, events: Vec<ReceiptEvent>, done: Option<Sender<()>>) -> Result<(), StorageError> {
        self.requests.try_send(Request::Record(events, done)).map_err(|_| StorageError::Failed {
            cause: FailureCause::Stopped,
            detail: "the storage thread has stopped".to_owned(),
        })
    }

    /// The storage thread's door for the engine's follower (cluster mode), usable from its thread.
    pub fn cacher(&self, engine: &crate::store::Engine) -> Cacher {
        Cacher {
            requests: self.requests.clone(),
            places: Arc::clone(&self.places),
            only: engine.cluster_only(),
        }
    }

    /// The outcome of the last commit.
    pub fn state(&self) -> StorageState {
        self.state.get()
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
    /// Lets the storage thread finish what it has, then waits for it, but only for `STOP_WAIT`.
    fn drop(&mut self) {
        // By the time the last `App` drops, shutdown has waited for the thread to commit and stop
        // (or given up after its grace); what is left is closing SQLite. A thread stuck in fsync
        // (a stuck disk) must not keep the process from exiting, within systemd's 15 s to stop.
        // Leaving it is safe: with WAL and synchronous=FULL every commit is durable when it
        // returns, and SQLite recovers the WAL at the next start.
        const STOP_WAIT: Duration = Duration::from_secs(2);
        self.close();
        if let Some(thread) = self.thread.take()
            && !crate::support::join::join_within(thread, STOP_WAIT)
        {
            log::warn!(
                "the storage thread is still busy after {STOP_WAIT:?} (a stuck disk?); exiting anyway: \
                 SQLite recovers what it was writing at the next start"
            );
        }
    }
}

/// What the engine's follower (on its own thread) hands the storage thread: emergencies the
/// engine committed, in seq order, and a new stream identity when the stream was recreated.
/// Each batch waits for a place like a local submission, so a cache that does not keep up
/// stops the follower instead of queueing without bound.
#[derive(Debug, Clone)]
pub struct Cacher {
    requests: Sender<Request>,
    places: Arc<Semaphore>,
    only: ClusterOnly,
}

impl Cacher {
    /// Queues `batch` for the cache and then the hub; `false` once the storage thread is gone.
    pub async fn cache(&self, batch: Vec<Stored>) -> bool {
        let place = Place { _permit: self.places.acquire_arc().await };
        self.requests.send(Request::Cache(batch, place, self.only)).await.is_ok()
    }

    /// Receipt events read from the engine's receipts stream, for the cache and then the hub
    /// (each at most once: a repeated one changes nothing).
    pub async fn cache_events(&self, events: Vec<ReceiptEvent>) -> bool {
        let place = Place { _permit: self.places.acquire_arc().await };
        self.requests.send(Request::CacheEvents(events, place, self.only)).await.is_ok()
    }

    /// Receipt events the engine committed for this box's own publisher: stored and applied
    /// as `Journal::record` does; `done` hears once they are.
    pub fn record(&self, events: Vec<ReceiptEvent>, done: Option<Sender<()>>) -> bool {
        self.requests.try_send(Request::Record(events, done)).is_ok()
    }

    /// Empties the cache for the stream `stream_id`; the hub starts over once it is done.
    pub async fn reset(&self, stream_id: String) -> bool {
        self.requests.send(Request::Reset(stream_id, self.only)).await.is_ok()
    }
}

/// Empties a cache that holds another stream than `stream_id`, and takes that identity.
fn adopt(db: &mut Connection, stream_id: &str) -> rusqlite::Result<()> {
    let held: Option<String> =
        db.query_row("SELECT value FROM meta WHERE key = 'stream_id'", [], |row| row.get(0)).optional()?;
    if held.as_deref() == Some(stream_id) {
        return Ok(());
    }
    if let Some(held) = held {
        log::warn!("the engine's stream is {stream_id}, the cache held {held}: the cache starts over");
    }
    empty_cache(db, stream_id)
}

/// Deletes every emergency and receipt, and makes `stream_id` the history's identity.
fn empty_cache(db: &mut Connection, stream_id: &str) -> rusqlite::Result<()> {
    let transaction = db.transaction()?;
    transaction.execute_batch("DELETE FROM receipts; DELETE FROM emergencies; DELETE FROM meta;")?;
    transaction
        .execute("INSERT INTO meta (key, value) VALUES ('stream_id', ?1), ('last_seq', '0')", [stream_id])?;
    transaction.commit()
}

/// The database file as it was opened, to notice when the data dir is removed or replaced under
/// the running server: SQLite would go on writing to the unlinked file, and what it committed
/// there would be gone at the next start, though its publishers had been told "ok".
#[derive(Debug)]
struct DatabaseFile {
    dir: PathBuf,
    path: PathBuf,
    /// (device, inode) of the file opened at start.
    opened: (u64, u64),
    /// Set once a commit went to the file after it had left its path: those seqs were neither
    /// acknowledged nor delivered, so nothing may follow them, even if the file comes back.
    abandoned: Option<String>,
    /// Whether the current loss is logged: once, not once per refused commit.
    reported: bool,
}

impl DatabaseFile {
    fn opened(dir: &Path, path: &Path) -> io::Result<DatabaseFile> {
        let metadata = fs::metadata(path)?;
        Ok(DatabaseFile {
            dir: dir.to_owned(),
            path: path.to_owned(),
            opened: (metadata.dev(), metadata.ino()),
            abandoned: None,
            reported: false,
        })
    }

    /// Whether the file opened at start is still at its path (one `stat`); if not, why, for
    /// the publishers and `/healthz`.
    fn check(&mut self) -> Result<(), String> {
        if let Some(detail) = &self.abandoned {
            return Err(detail.clone());
        }
        let Some(detail) = self.missing() else {
            self.reported = false;
            return Ok(());
        };
        if !std::mem::replace(&mut self.reported, true) {
            error!("{detail}");
        }
        Err(detail)
    }

    /// After a commit: if the file left its path meanwhile, the commit is lost with it, and the
    /// journal stores nothing more.
    fn check_committed(&mut self) -> Result<(), String> {
        self.check().inspect_err(|detail| self.abandoned = Some(detail.clone()))
    }

    fn missing(&self) -> Option<String> {
        let found = match fs::metadata(&self.path) {
            Ok(metadata) if (metadata.dev(), metadata.ino()) == self.opened => return None,
            Ok(_) => format!("{DATABASE_FILE} is another file than the one opened at start"),
            Err(error) => format!("{DATABASE_FILE}: {error}"),
        };
        Some(format!(
            "data dir {} was removed or replaced ({found}): nothing is stored until it is back \
             or resq-push is restarted (a new history)",
            self.dir.display()
        ))
    }
}

/// Answers every submission of a batch that was not stored, and records the failure.
fn refuse(appends: Vec<Append>, cause: FailureCause, detail: String, state: &SharedState) {
    state.failed(cause, detail.clone());
    for append in appends {
        let _ = append.reply.try_send(Err(StorageError::Failed { cause, detail: detail.clone() }));
    }
}

/// Why the database file in a data dir cannot be used.
#[derive(Debug)]
enum Unusable {
    /// SQLite could not open, read or set it up (not a database, no permission, ...).
    Sqlite(rusqlite::Error),
    /// It is a database, damaged: what `PRAGMA quick_check` found, on one line.
    Damaged(String),
}

impl From<rusqlite::Error> for Unusable {
    fn from(error: rusqlite::Error) -> Unusable {
        Unusable::Sqlite(error)
    }
}

impl Unusable {
    /// The start-up error: the data dir, the file, what is wrong and, if it is damaged, what
    /// the operator can do.
    fn explain(&self, dir: &Path, file: &Path) -> String {
        let (dir, file) = (dir.display(), file.display());
        match self {
            Unusable::Sqlite(error) => format!("data dir {dir}: {file} is unusable: {error}"),
            Unusable::Damaged(findings) => format!(
                "data dir {dir}: {file} failed its integrity check (quick_check: {findings}); \
                 move it and any {DATABASE_FILE}-wal and -shm beside it out of the data dir to start \
                 an empty history (resuming tablets are told it is a new stream), or restore it from a backup"
            ),
        }
    }
}

fn open_database(path: &Path) -> Result<Connection, Unusable> {
    let db = Connection::open(path)?;
    // Before anything is written to it: a damaged file stays as it was found.
    check_integrity(&db)?;
    // WAL with synchronous=FULL: a commit is on disk when it returns, and survives power loss.
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS emergencies (
             seq INTEGER PRIMARY KEY,
             received_at_ms INTEGER NOT NULL,
             envelope TEXT NOT NULL
         );",
    )?;
    add_idempotency_columns(&db)?;
    add_receipt_tables(&db)?;
    Ok(db)
}

/// The receipts table and the close and escalation columns, added to a data dir from before
/// them; the partial index finds the open emergencies.
///
/// The emergencies a data dir from before closes holds were handled back then, by radio or
/// otherwise: they are added closed (at the time they were received), or an upgrade would
/// escalate every one of them and resend them all to every fresh tablet. The column and the
/// closes are one transaction, so a crash between them cannot leave them open.
fn add_receipt_tables(db: &Connection) -> rusqlite::Result<()> {
    add_filled_column(db, "closed_at_ms", "received_at_ms")?;
    for (column, kind) in [("close_detail", "TEXT"), ("escalated_at_ms", "INTEGER")] {
        add_column(db, column, kind)?;
    }
    add_column(db, "queued_to", "INTEGER")?;
    // Every command of an escalation stored before this column had started, or was lost.
    add_filled_column(db, "command_started_at_ms", "escalated_at_ms")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS receipts (
             seq INTEGER NOT NULL,
             tablet TEXT NOT NULL,
             delivered_at_ms INTEGER,
             acked_at_ms INTEGER,
             PRIMARY KEY (seq, tablet)
         ) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS open_emergencies ON emergencies (seq) WHERE closed_at_ms IS NULL;",
    )
}

fn has_column(db: &Connection, column: &str) -> rusqlite::Result<bool> {
    db.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('emergencies') WHERE name = ?1",
        [column],
        |row| row.get(0),
    )
}

/// Adds the INTEGER `column`, set to `fill` (an expression) in every row there is, in one
/// transaction.
fn add_filled_column(db: &Connection, column: &str, fill: &str) -> rusqlite::Result<()> {
    if has_column(db, column)? {
        return Ok(());
    }
    db.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         ALTER TABLE emergencies ADD COLUMN {column} INTEGER;
         UPDATE emergencies SET {column} = {fill};
         COMMIT;"
    ))
}

fn add_column(db: &Connection, column: &str, kind: &str) -> rusqlite::Result<()> {
    if !has_column(db, column)? {
        db.execute_batch(&format!("ALTER TABLE emergencies ADD COLUMN {column} {kind}"))?;
    }
    Ok(())
}

/// Runs `PRAGMA quick_check`; damage comes back with its first few findings on one line.
fn check_integrity(db: &Connection) -> Result<(), Unusable> {
    let mut check = db.prepare("PRAGMA quick_check(3)")?;
    let findings =
        check.query_map([], |row| row.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()?;
    if findings == ["ok"] {
        return Ok(());
    }
    Err(Unusable::Damaged(findings.join("; ").replace('\n', " ")))
}

/// The key columns, added to a data dir from before them (the rows it has keep no key), and the
/// index that finds a key and keeps it unique among the retained rows.
fn add_idempotency_columns(db: &Connection) -> rusqlite::Result<()> {
    for (column, kind) in [("idempotency_key", "TEXT"), ("body_sha1", "BLOB")] {
        add_column(db, column, kind)?;
    }
    db.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS emergencies_by_idempotency_key
             ON emergencies (idempotency_key) WHERE idempotency_key IS NOT NULL",
    )
}

fn load(db: &mut Connection, expiry: &mut Expiry, reading: Reading) -> rusqlite::Result<Loaded> {
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
    expiry.delete_expired(db, last_seq, reading)?;
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
    let events = load_events(db)?;
    Ok(Loaded { stream_id, last_seq, retained, events })
}

/// The receipts, closes and escalations stored with the retained emergencies.
fn load_events(db: &Connection) -> rusqlite::Result<Vec<ReceiptEvent>> {
    let mut events = Vec::new();
    let mut receipts = db.prepare(
        "SELECT seq, tablet, delivered_at_ms, acked_at_ms FROM receipts ORDER BY seq, acked_at_ms",
    )?;
    let mut rows = receipts.query([])?;
    while let Some(row) = rows.next()? {
        let (seq, tablet) = (row.get::<_, i64>(0)? as u64, row.get::<_, String>(1)?);
        if let Some(at) = row.get::<_, Option<i64>>(2)? {
            events.push(ReceiptEvent::Delivered { seq, tablet: tablet.clone(), at: from_unix_millis(at) });
        }
        if let Some(at) = row.get::<_, Option<i64>>(3)? {
            events.push(ReceiptEvent::Acked { seq, tablet, at: from_unix_millis(at) });
        }
    }
    let mut marks = db.prepare(
        "SELECT seq, closed_at_ms, close_detail, escalated_at_ms, command_started_at_ms, queued_to
         FROM emergencies WHERE closed_at_ms IS NOT NULL OR escalated_at_ms IS NOT NULL
             OR queued_to IS NOT NULL ORDER BY seq",
    )?;
    let mut rows = marks.query([])?;
    while let Some(row) = rows.next()? {
        let seq = row.get::<_, i64>(0)? as u64;
        if let Some(clients) = row.get::<_, Option<i64>>(5)? {
            events.push(ReceiptEvent::Queued { seq, clients: clients.max(0) as usize });
        }
        if let Some(at) = row.get::<_, Option<i64>>(3)? {
            events.push(ReceiptEvent::Escalated { seq, at: from_unix_millis(at) });
        }
        if let Some(at) = row.get::<_, Option<i64>>(4)? {
            events.push(ReceiptEvent::CommandStarted { seq, at: from_unix_millis(at) });
        }
        if let Some(at) = row.get::<_, Option<i64>>(1)? {
            events.push(ReceiptEvent::Closed { seq, at: from_unix_millis(at), detail: row.get(2)? });
        }
    }
    Ok(events)
}

/// Stores receipt events in `transaction`: each at most once (a repeated one changes nothing),
/// and only for an emergency still retained. Each upsert is one row from `VALUES`, not an
/// `INSERT ... SELECT`: a statement that may write several rows needs a statement journal, and
/// SQLite copied every page it touched into one for each delivery (a sixth of the server's
/// instructions per delivery under callgrind). Whether the emergency is retained is asked once
/// per seq of the batch.
fn write_events(transaction: &Connection, events: &[ReceiptEvent]) -> rusqlite::Result<()> {
    let mut delivered = transaction.prepare_cached(
        "INSERT INTO receipts (seq, tablet, delivered_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (seq, tablet) DO UPDATE SET delivered_at_ms = COALESCE(delivered_at_ms, excluded.delivered_at_ms)",
    )?;
    let mut acked = transaction.prepare_cached(
        "INSERT INTO receipts (seq, tablet, acked_at_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (seq, tablet) DO UPDATE SET acked_at_ms = COALESCE(acked_at_ms, excluded.acked_at_ms)",
    )?;
    let mut retained = transaction.prepare_cached("SELECT 1 FROM emergencies WHERE seq = ?1")?;
    let mut last_checked: Option<(u64, bool)> = None;
    let mut is_retained = |seq: u64| -> rusqlite::Result<bool> {
        if let Some((checked, answer)) = last_checked
            && checked == seq
        {
            return Ok(answer);
        }
        let answer = retained.exists([seq as i64])?;
        last_checked = Some((seq, answer));
        Ok(answer)
    };
    for event in events {
        match event {
            ReceiptEvent::Queued { seq, clients } => {
                execute_cached(
                    transaction,
                    "UPDATE emergencies SET queued_to = ?2 WHERE seq = ?1 AND queued_to IS NULL",
                    params![*seq as i64, *clients as i64],
                )?;
            }
            ReceiptEvent::Delivered { seq, tablet, at } => {
                if is_retained(*seq)? {
                    delivered.execute(params![*seq as i64, tablet, unix_millis(*at)])?;
                }
            }
            ReceiptEvent::Acked { seq, tablet, at } => {
                if is_retained(*seq)? {
                    acked.execute(params![*seq as i64, tablet, unix_millis(*at)])?;
                }
            }
            ReceiptEvent::Closed { seq, at, detail } => {
                execute_cached(
                    transaction,
                    "UPDATE emergencies SET closed_at_ms = ?2, close_detail = ?3
                     WHERE seq = ?1 AND closed_at_ms IS NULL",
                    params![*seq as i64, unix_millis(*at), detail],
                )?;
            }
            ReceiptEvent::Escalated { seq, at } => {
                execute_cached(
                    transaction,
                    "UPDATE emergencies SET escalated_at_ms = ?2 WHERE seq = ?1 AND escalated_at_ms IS NULL",
                    params![*seq as i64, unix_millis(*at)],
                )?;
            }
            ReceiptEvent::CommandStarted { seq, at } => {
                execute_cached(
                    transaction,
                    "UPDATE emergencies SET command_started_at_ms = ?2
                     WHERE seq = ?1 AND command_started_at_ms IS NULL",
                    params![*seq as i64, unix_millis(*at)],
                )?;
            }
        }
    }
    Ok(())
}

/// Runs `sql` with `params` through the connection's statement cache: the storage thread runs the
/// same few statements in every transaction, and parsing them again each time cost more than
/// executing them (a quarter of the instructions per delivery under callgrind).
fn execute_cached(db: &Connection, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    db.prepare_cached(sql)?.execute(params)
}

fn from_unix_millis(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64)
}

impl Tail {
    /// The tail once `outcomes` are committed: their newest new emergency, if any (a duplicate or
    /// a conflict takes no seq and leaves it where it was).
    fn after(self, outcomes: &[Outcome<Stored>]) -> Tail {
        let newest = outcomes.iter().rev().find_map(|outcome| match outcome {
            Outcome::New(stored) => Some(Tail { seq: stored.seq, received_at: stored.received_at }),
            Outcome::Duplicate { .. } | Outcome::Conflict { .. } => None,
        });
        newest.unwrap_or(self)
    }
}

impl Loaded {
    fn tail(&self) -> Tail {
        let received_at = self.retained.iter().map(|stored| stored.received_at).max();
        Tail { seq: self.last_seq, received_at: received_at.unwrap_or(UNIX_EPOCH) }
    }
}

/// The storage thread's end of the request queue. However the thread ends, even by a panic,
/// what is still queued is dropped with it: its places come back, so that no publisher waits for
/// one forever, and its publishers hear that storage stopped.
struct Incoming(Receiver<Request>);

impl Drop for Incoming {
    fn drop(&mut self) {
        self.0.close();
        while self.0.try_recv().is_ok() {}
    }
}

/// What the storage thread writes to: the connection, and the file it has open.
struct Database {
    db: Connection,
    file: DatabaseFile,
}

/// The storage thread: commit what is queued, hand it to the executor, repeat. Nothing is
/// written while the database file is not at its path, and nothing committed to it once it
/// has left is acknowledged.
fn run(
    Database { mut db, mut file }: Database,
    mut tail: Tail,
    mut expiry: Expiry,
    incoming: Incoming,
    state: &SharedState,
    committed: Sender<Committed>,
) {
    // A disk that stays full fails every commit: one line per period says so, with the count.
    let failures = WarningThrottle::default();
    // Receipt events not yet committed: a failed commit keeps them for the next one.
    let mut events: Vec<ReceiptEvent> = Vec::new();
    let mut waiting: Vec<Sender<()>> = Vec::new();
    let mut followed_deliveries: Vec<ReceiptEvent> = Vec::new();
    // Cluster mode, from the follower's first request on; never in the edge build.
    let mut cluster: Option<ClusterOnly> = None;
    while let Ok(first) = incoming.0.recv_blocking() {
        let mut appends = Vec::new();
        let mut cached = Vec::new();
        let mut reset: Option<(String, ClusterOnly)> = None;
        let mut request = Some(first);
        while let Some(next) = request.take() {
            match next {
                Request::Append(append, _place) => appends.push(append),
                Request::Record(recorded, done) => {
                    events.extend(recorded);
                    waiting.extend(done);
                }
                Request::Cache(batch, _place, only) => {
                    cached.extend(batch);
                    cluster = Some(only);
                }
                Request::CacheEvents(recorded, _place, only) => {
                    let delivered =
                        recorded.iter().filter(|event| matches!(event, ReceiptEvent::Delivered { .. }));
                    followed_deliveries.extend(delivered.cloned());
                    events.extend(recorded);
                    cluster = Some(only);
                }
                // What came before it is committed first; what comes after it, after it.
                Request::Reset(stream_id, only) => reset = Some((stream_id, only)),
                Request::Sweep => {}
            }
            if reset.is_none() && appends.len() + cached.len() < MAX_BATCH && events.len() < MAX_BATCH_EVENTS
            {
                request = incoming.0.try_recv().ok();
            }
        }
        if let Some(only) = cluster.filter(|_| !cached.is_empty()) {
            let emergencies = cache_batch(&mut db, &mut tail, cached, &mut expiry, state, &failures);
            let cached = Cached { reset: None, emergencies, followed_deliveries: Vec::new(), only };
            let batch = Committed { cached: Some(cached), ..Committed::default() };
            if committed.send_blocking(batch).is_err() {
                return;
            }
        }
        if let Some((stream_id, only)) = reset {
            if let Err(e) = empty_cache(&mut db, &stream_id) {
                failures
                    .note_at(Level::Error, &format!("emptying the cache for stream {stream_id} failed: {e}"));
            }
            tail = Tail { seq: 0, received_at: UNIX_EPOCH };
            let cached = Cached {
                reset: Some(stream_id),
                emergencies: Vec::new(),
                followed_deliveries: Vec::new(),
                only,
            };
            let batch = Committed { cached: Some(cached), ..Committed::default() };
            if committed.send_blocking(batch).is_err() {
                return;
            }
        }
        if let Err(detail) = file.check() {
            refuse(appends, FailureCause::DataDirGone, detail, state);
            continue;
        }
        let changes_before = db.total_changes();
        let written = write_batch(&mut db, tail, &appends, &events, &mut expiry, Reading::now());
        if written.is_ok()
            && let Err(detail) = file.check_committed()
        {
            refuse(appends, FailureCause::DataDirGone, detail, state);
            continue;
        }
        match written {
            Ok(outcomes) => {
                // A transaction that wrote nothing (a sweep that deleted nothing, or a batch of
                // only retries and conflicts, which store no row) succeeds on a full disk too: it
                // leaves the state as it was. A failed one is a failure whatever it held.
                if db.total_changes() != changes_before {
                    state.succeeded();
                }
                tail = tail.after(&outcomes);
                let replies = appends.into_iter().map(|append| append.reply);
                let followed_deliveries = std::mem::take(&mut followed_deliveries);
                let batch = Committed {
                    outcomes: outcomes.into_iter().zip(replies).collect(),
                    events: std::mem::take(&mut events),
                    waiting: std::mem::take(&mut waiting),
                    cached: cluster.map(|only| Cached {
                        reset: None,
                        emergencies: Vec::new(),
                        followed_deliveries,
                        only,
                    }),
                };
                let anything =
                    !(batch.outcomes.is_empty() && batch.events.is_empty() && batch.waiting.is_empty());
                if anything && committed.send_blocking(batch).is_err() {
                    return;
                }
            }
            Err(e) => {
                let what = format!("storing {} emergencies failed, none was accepted: {e}", appends.len());
                failures.note_at(Level::Error, &what);
                let (cause, detail) = (FailureCause::of(&e), e.to_string());
                state.failed(cause, detail.clone());
                for append in appends {
                    let _ =
                        append.reply.try_send(Err(StorageError::Failed { cause, detail: detail.clone() }));
                }
            }
        }
    }
}

/// Stores what the engine committed (cluster mode) in one transaction, each at its own seq
/// (those the cache has already are skipped), and returns what is new, for the hub. A failed write is
/// logged and handed on all the same: the engine holds it, the cache is only a cache, and
/// nothing may stop the box from following the stream.
fn cache_batch(
    db: &mut Connection,
    tail: &mut Tail,
    cached: Vec<Stored>,
    expiry: &mut Expiry,
    state: &SharedState,
    failures: &WarningThrottle,
) -> Vec<Stored> {
    let fresh: Vec<Stored> = cached.into_iter().filter(|stored| stored.seq > tail.seq).collect();
    match write_cached(db, &fresh, expiry, Reading::now()) {
        Ok(()) => state.succeeded(),
        Err(e) => {
            let what = format!("caching {} emergencies failed (the engine holds them): {e}", fresh.len());
            failures.note_at(Level::Error, &what);
            state.failed(FailureCause::of(&e), e.to_string());
        }
    }
    if let Some(newest) = fresh.last() {
        *tail = Tail { seq: newest.seq, received_at: newest.received_at.max(tail.received_at) };
    }
    fresh
}

fn write_cached(
    db: &mut Connection,
    cached: &[Stored],
    expiry: &mut Expiry,
    reading: Reading,
) -> rusqlite::Result<()> {
    let Some(newest) = cached.last() else { return Ok(()) };
    let transaction = db.transaction()?;
    {
        let mut insert = transaction.prepare(
            "INSERT OR REPLACE INTO emergencies (seq, received_at_ms, envelope) VALUES (?1, ?2, ?3)",
        )?;
        for stored in cached {
            insert.execute(params![stored.seq as i64, unix_millis(stored.received_at), stored.envelope])?;
        }
    }
    transaction.execute("UPDATE meta SET value = ?1 WHERE key = 'last_seq'", [newest.seq.to_string()])?;
    expiry.delete_expired(&transaction, newest.seq, reading)?;
    transaction.commit()
}

/// Decides `appends` in one transaction, in order: each new one is stored as the next seq after
/// `tail`, with its key; retries and conflicts are answered from the rows their keys name, and
/// take no seq. Then the retention is applied by the clocks read at `reading`.
fn write_batch(
    db: &mut Connection,
    tail: Tail,
    appends: &[Append],
    events: &[ReceiptEvent],
    expiry: &mut Expiry,
    reading: Reading,
) -> rusqlite::Result<Vec<Outcome<Stored>>> {
    let transaction = db.transaction()?;
    let mut outcomes = Vec::with_capacity(appends.len());
    let mut newest = tail;
    {
        let mut insert = transaction.prepare_cached(
            "INSERT INTO emergencies (seq, received_at_ms, envelope, idempotency_key, body_sha1)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut find_key = transaction
            .prepare_cached("SELECT seq, body_sha1 FROM emergencies WHERE idempotency_key = ?1")?;
        for append in appends {
            if let Some(known) = recall(&mut find_key, append.fingerprint.as_ref())? {
                outcomes.push(known);
                continue;
            }
            let seq = newest.seq + 1;
            // Never before the previous emergency, so the history stays in order if the clock
            // steps back, and expiring by age is always deleting the oldest.
            let received_at = append.received_at.max(newest.received_at);
            let envelope = protocol::envelope_json(seq, received_at, append.source, &append.data);
            let key = append.fingerprint.as_ref().map(|fingerprint| fingerprint.key.as_str());
            let digest = append.fingerprint.as_ref().map(|fingerprint| fingerprint.digest.0.as_slice());
            insert.execute(params![seq as i64, unix_millis(received_at), envelope, key, digest])?;
            outcomes.push(Outcome::New(Stored { seq, received_at, envelope }));
            newest = Tail { seq, received_at };
        }
    }
    let new_last = newest.seq;
    if new_last != tail.seq {
        execute_cached(
            &transaction,
            "UPDATE meta SET value = ?1 WHERE key = 'last_seq'",
            [new_last.to_string()],
        )?;
    }
    write_events(&transaction, events)?;
    expiry.delete_expired(&transaction, new_last, reading)?;
    transaction.commit()?;
    Ok(outcomes)
}

/// What a keyed submission is if a retained row holds its key: a duplicate of that row, or a
/// conflict with it. `None` for a new key, or no key.
fn recall(
    find_key: &mut rusqlite::Statement<'_>,
    fingerprint: Option<&Fingerprint>,
) -> rusqlite::Result<Option<Outcome<Stored>>> {
    let Some(fingerprint) = fingerprint else { return Ok(None) };
    let row = find_key
        .query_row([fingerprint.key.as_str()], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Option<Vec<u8>>>(1)?))
        })
        .optional()?;
    Ok(row.map(|(seq, stored)| {
        let seq = seq as u64;
        // A digest that is not one (a row edited by hand) matches no body: the key is refused,
        // rather than failing the whole batch or storing the emergency twice.
        match stored.as_deref().and_then(BodyDigest::from_slice) {
            Some(stored) => fingerprint.against(seq, &stored),
            None => Outcome::Conflict { seq },
        }
    }))
}

impl Expiry {
    fn new(retention: Retention) -> Expiry {
        Expiry { retention, clock: RetentionClock::new(retention.max_age) }
    }

    /// Deletes what the retention no longer keeps, `last_seq` being the newest seq and `reading`
    /// the clocks read now.
    fn delete_expired(
        &mut self,
        db: &Connection,
        last_seq: u64,
        reading: Reading,
    ) -> rusqlite::Result<usize> {
        let newest_over_count = last_seq.saturating_sub(self.retention.max_count as u64);
        let max_age_ms = i64::try_from(self.retention.max_age.as_millis()).unwrap_or(i64::MAX);
        let too_old_before_ms = self
            .clock
            .expiry_now(reading)
            .map_or(i64::MIN, |now| unix_millis(now).saturating_sub(max_age_ms));
        // The newest open emergency beyond `max_open` (the partial index holds only open ones):
        // it and older open ones age out like closed ones.
        let open_cap = db
            .prepare_cached(
                "SELECT seq FROM emergencies WHERE closed_at_ms IS NULL ORDER BY seq DESC LIMIT 1 OFFSET ?1",
            )?
            .query_row([self.retention.max_open as i64], |row| row.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0);
        let mut delete = db.prepare_cached(DELETE_EXPIRED)?;
        let deleted = delete
            .query_map(params![newest_over_count as i64, too_old_before_ms, i64::MAX, open_cap], |row| {
                row.get::<_, i64>(0)
            })?
            .collect::<rusqlite::Result<Vec<i64>>>()?;
        let mut receipts = db.prepare_cached("DELETE FROM receipts WHERE seq = ?1")?;
        for seq in &deleted {
            receipts.execute([seq])?;
        }
        Ok(deleted.len())
    }
}

/// Deletes every seq up to `?1` (over the count), and by age the oldest while they are too old
/// (stamped before `?2`), as in the hub: the history stays one unbroken run of seqs, and one
/// stamped too early (by a clock that stepped back, before stamps were kept in order) does not
/// take newer emergencies with it. `?3` is the largest seq, for when every one is too old.
///
/// Both go by the primary key only, from the cut on: a commit's delete costs what it deletes
/// plus one lookup, however long the history (`--history 100000` is 100 000 rows), plus the
/// open emergencies kept below the cut (at most `--max-open`): an open one stays unless it is
/// `?4` or older, the newest open one beyond the cap. Returns the seqs deleted, whose receipts
/// go with them.
const DELETE_EXPIRED: &str = "DELETE FROM emergencies WHERE seq < MAX(?1 + 1, COALESCE(
         (SELECT seq FROM emergencies WHERE seq > ?1 AND received_at_ms >= ?2 ORDER BY seq LIMIT 1),
         ?3)) AND (closed_at_ms IS NOT NULL OR seq <= ?4) RETURNING seq";

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
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use smol::future;

    use super::*;
    use crate::core::clock::tests::{HOUR, MINUTE, SECOND, YEARS, kept_time, reading_after};
    use crate::support::timestamp::rfc3339_millis;

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

    /// Runs `work` to its end, or gives up after 10 s.
    fn within_10s<T>(work: impl Future<Output = T>) -> Option<T> {
        let give_up = async {
            smol::Timer::after(Duration::from_secs(10)).await;
            None
        };
        smol::block_on(future::or(async { Some(work.await) }, give_up))
    }

    /// Queues `{}` in a place free now.
    fn append_now(journal: &Journal) -> Receiver<Result<Outcome<Receipt>, StorageError>> {
        let data = RawValue::from_string("{}".into()).unwrap();
        journal.append(journal.try_place().unwrap(), data, Source::Unix, None).unwrap()
    }

    #[test]
    fn beyond_max_queued_there_is_no_place_until_the_storage_thread_takes_one() {
        let dir = TestDir::new("storage-busy");
        let (journal, _, committed) = open(dir.path(), RETENTION).unwrap();
        let mut held: Vec<Place> = (1..MAX_QUEUED).map(|_| journal.try_place().unwrap()).collect();
        let _receipt = append_now(&journal);
        let Committed { outcomes: batch, .. } = committed.recv_blocking().unwrap();
        assert!(matches!(batch[0].0, Outcome::New(Stored { seq: 1, .. })), "{batch:?}");
        // Taken, the submission gave its place back: one is free again, and no more.
        held.push(within_10s(journal.place()).expect("no place came free"));
        assert_eq!(journal.try_place().err(), Some(StorageError::Busy));
        held.pop();
        assert!(journal.try_place().is_ok());
    }

    #[test]
    fn a_storage_thread_that_stops_gives_back_every_place_and_answers_what_it_held() {
        let dir = TestDir::new("stopped");
        let (journal, _, committed) = open(dir.path(), RETENTION).unwrap();
        // Nobody delivers: the first commit ends the thread, with the rest still queued.
        drop(committed);
        // The thread may stop while these are queued: an append after that is refused at once.
        let data = || RawValue::from_string("{}".into()).unwrap();
        for _ in 0..2 * MAX_BATCH {
            let Ok(place) = journal.try_place() else { continue };
            match journal.append(place, data(), Source::Unix, None) {
                Ok(receipt) => assert!(within_10s(receipt.recv()).is_some_and(|answer| answer.is_err())),
                Err(refused) => assert!(matches!(refused, StorageError::Failed { .. }), "{refused:?}"),
            }
        }
        let places = within_10s(async {
            let mut places = Vec::with_capacity(MAX_QUEUED);
            for _ in 0..MAX_QUEUED {
                places.push(journal.place().await);
            }
            places
        });
        assert_eq!(places.map(|places| places.len()), Some(MAX_QUEUED));
    }

    #[test]
    fn a_sweep_that_writes_nothing_does_not_clear_a_failure() {
        let dir = TestDir::new("sweep");
        let (journal, _, _committed) = open(dir.path(), RETENTION).unwrap();
        journal.state.failed(FailureCause::DiskFull, "database or disk is full".into());
        journal.sweep();
        let state = Arc::clone(&journal.state);
        // Dropping the journal lets its thread run the sweep, then joins it.
        drop(journal);
        assert!(matches!(state.get(), StorageState::Failing { cause: FailureCause::DiskFull, .. }));
    }

    #[test]
    fn a_sweep_notices_a_removed_data_dir() {
        let dir = TestDir::new("removed");
        let (journal, _, _committed) = open(dir.path(), RETENTION).unwrap();
        fs::remove_dir_all(dir.path()).unwrap();
        journal.sweep();
        let state = Arc::clone(&journal.state);
        drop(journal);
        let StorageState::Failing { cause, last_error, .. } = state.get() else {
            panic!("{:?}", state.get())
        };
        assert_eq!(cause, FailureCause::DataDirGone);
        let named = format!("data dir {} was removed or replaced", dir.path().display());
        assert!(last_error.starts_with(&named), "{last_error}");
    }

    #[test]
    fn nothing_follows_a_commit_to_a_file_that_had_left_its_path() {
        let dir = TestDir::new("moved");
        let (path, away) = (dir.path().join(DATABASE_FILE), dir.path().join("away"));
        fs::write(&path, "").unwrap();
        let mut file = DatabaseFile::opened(dir.path(), &path).unwrap();
        assert_eq!(file.check(), Ok(()));
        fs::rename(&path, &away).unwrap();
        assert!(file.check().unwrap_err().contains("(history.sqlite3: No such file"));
        fs::rename(&away, &path).unwrap();
        assert_eq!(file.check(), Ok(()), "back before anything was written to it elsewhere");
        fs::rename(&path, &away).unwrap();
        fs::write(&path, "").unwrap();
        let replaced = file.check_committed().unwrap_err();
        assert!(replaced.contains("(history.sqlite3 is another file than the one opened at start)"));
        fs::remove_file(&path).unwrap();
        fs::rename(&away, &path).unwrap();
        assert_eq!(file.check(), Err(replaced), "a commit went to it while away");
    }

    #[test]
    fn a_batch_of_only_retries_writes_nothing_and_does_not_clear_a_failure() {
        let dir = TestDir::new("retry-state");
        let (journal, _, committed) = open(dir.path(), RETENTION).unwrap();
        let keyed = |body: &str| {
            let Append { data, fingerprint, .. } = append(body, Some("k"));
            journal.append(journal.try_place().unwrap(), data, Source::Unix, fingerprint).unwrap()
        };
        let _first = keyed(r#"{"n":1}"#);
        assert!(matches!(committed.recv_blocking().unwrap().outcomes[0].0, Outcome::New(_)));
        journal.state.failed(FailureCause::DiskFull, "database or disk is full".into());
        // A retry and a conflict commit a transaction that stores no row.
        let _retry = keyed(r#"{"n":1}"#);
        let _conflict = keyed(r#"{"n":2}"#);
        let mut decided_so_far = Vec::new();
        while decided_so_far.len() < 2 {
            decided_so_far
                .extend(committed.recv_blocking().unwrap().outcomes.into_iter().map(|(outcome, _)| outcome));
        }
        assert!(
            matches!(decided_so_far[..], [Outcome::Duplicate { seq: 1 }, Outcome::Conflict { seq: 1 }]),
            "{decided_so_far:?}"
        );
        assert!(matches!(journal.state(), StorageState::Failing { cause: FailureCause::DiskFull, .. }));
        // A new emergency is a write that succeeded.
        let _new = append_now(&journal);
        assert!(matches!(
            committed.recv_blocking().unwrap().outcomes[0].0,
            Outcome::New(Stored { seq: 2, .. })
        ));
        assert_eq!(journal.state(), StorageState::Ok);
    }

    #[test]
    fn failures_are_told_apart_by_cause() {
        use rusqlite::ffi;
        let failure = |code| FailureCause::of(&rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
        assert_eq!(failure(ffi::SQLITE_FULL), FailureCause::DiskFull);
        assert_eq!(failure(ffi::SQLITE_IOERR_WRITE), FailureCause::Io);
        assert_eq!(failure(ffi::SQLITE_READONLY), FailureCause::Io);
        assert_eq!(failure(ffi::SQLITE_BUSY), FailureCause::Busy);
        assert_eq!(failure(ffi::SQLITE_LOCKED), FailureCause::Busy);
        assert_eq!(failure(ffi::SQLITE_CORRUPT), FailureCause::Other);
        assert_eq!(FailureCause::of(&rusqlite::Error::InvalidQuery), FailureCause::Other);
        assert_eq!(StorageError::Busy.cause().label(), "busy");
    }

    const RETENTION: Retention = Retention { max_count: 10, max_age: HOUR, max_open: 0 };
    const EMPTY: Tail = Tail { seq: 0, received_at: UNIX_EPOCH };

    /// A new history in `dir`, its clock first read at `start`, keeping 10 emergencies an hour.
    fn new_history(dir: &TestDir, start: Reading) -> (Connection, Expiry) {
        let (db, expiry, _) = reopen(dir, RETENTION, start);
        (db, expiry)
    }

    /// The history in `dir` opened and loaded as at start, its clock first read at `start`.
    fn reopen(dir: &TestDir, retention: Retention, start: Reading) -> (Connection, Expiry, Loaded) {
        let mut db = open_database(&dir.path().join(DATABASE_FILE)).unwrap();
        let mut expiry = Expiry::new(retention);
        let loaded = load(&mut db, &mut expiry, start).unwrap();
        (db, expiry, loaded)
    }

    #[test]
    fn receipts_are_stored_only_for_retained_emergencies_and_only_once() {
        let dir = TestDir::new("receipts-retained");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        let now = SystemTime::now();
        commit(&mut db, EMPTY, &[now], &mut expiry, start);
        let later = now + SECOND;
        let events = [
            ReceiptEvent::Delivered { seq: 1, tablet: "a".into(), at: now },
            ReceiptEvent::Delivered { seq: 1, tablet: "a".into(), at: later },
            ReceiptEvent::Delivered { seq: 2, tablet: "a".into(), at: now },
            ReceiptEvent::Acked { seq: 2, tablet: "b".into(), at: now },
            ReceiptEvent::Acked { seq: 1, tablet: "b".into(), at: now },
            ReceiptEvent::Delivered { seq: 1, tablet: "b".into(), at: now },
        ];
        write_events(&db, &events).unwrap();
        let mut rows = db.prepare("SELECT seq, tablet, delivered_at_ms, acked_at_ms FROM receipts").unwrap();
        let rows: Vec<(i64, String, Option<i64>, Option<i64>)> = rows
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let at = Some(unix_millis(now));
        assert_eq!(
            rows,
            [(1, "a".to_owned(), at, None), (1, "b".to_owned(), at, at)],
            "seq 2 is not retained"
        );
    }

    /// Commits one emergency per stamp after `tail`, as the storage thread would at `reading`.
    fn commit(
        db: &mut Connection,
        tail: Tail,
        stamps: &[SystemTime],
        expiry: &mut Expiry,
        reading: Reading,
    ) -> Vec<Stored> {
        let appends: Vec<_> =
            stamps.iter().map(|&received_at| Append { received_at, ..append("{}", None) }).collect();
        let outcomes = write_batch(db, tail, &appends, &[], expiry, reading).unwrap();
        let new = |outcome| match outcome {
            Outcome::New(stored) => stored,
            other => panic!("an emergency without a key was not stored: {other:?}"),
        };
        outcomes.into_iter().map(new).collect()
    }

    fn seqs(db: &Connection) -> Vec<i64> {
        let mut query = db.prepare("SELECT seq FROM emergencies ORDER BY seq").unwrap();
        query.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn expiry_by_age_never_leaves_a_gap_nor_takes_a_recent_emergency_with_it() {
        let dir = TestDir::new("gap");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        commit(&mut db, EMPTY, &[start.wall; 5], &mut expiry, start);
        // Written before stamps were kept in order: seq 4 by a clock that had stepped back. The
        // oldest go while they are too old; seq 3 is not, so seq 4 stays too.
        let too_old = unix_millis(start.wall - 2 * HOUR);
        db.execute("UPDATE emergencies SET received_at_ms = ?1 WHERE seq IN (1, 2, 4)", [too_old]).unwrap();
        expiry.delete_expired(&db, 5, kept_time(start, MINUTE)).unwrap();
        assert_eq!(seqs(&db), [3, 4, 5]);
        expiry.delete_expired(&db, 5, kept_time(start, HOUR + MINUTE)).unwrap();
        assert_eq!(seqs(&db), [] as [i64; 0]);
    }

    /// What SQLite plans for `sql`, one line per step.
    fn query_plan(db: &Connection, sql: &str, values: impl rusqlite::Params) -> Vec<String> {
        let mut explain = db.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        explain.query_map(values, |row| row.get::<_, String>(3)).unwrap().map(Result::unwrap).collect()
    }

    #[test]
    fn the_retention_delete_goes_by_seq_and_never_scans_the_table() {
        let dir = TestDir::new("by-seq");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        let plan = query_plan(&db, DELETE_EXPIRED, params![1, unix_millis(start.wall), i64::MAX, i64::MAX]);
        let by_key = |step: &String| step.starts_with("SEARCH emergencies USING INTEGER PRIMARY KEY");
        assert!(plan.iter().filter(|step| step.contains("emergencies")).all(by_key), "{plan:?}");
        commit(&mut db, EMPTY, &[start.wall; 8], &mut expiry, start);
        let now = unix_millis(start.wall);
        // Nothing to delete, two by count, everything by age: each a walk by seq, never a scan.
        for (cut, too_old_before, left) in [(0, now, 8), (2, now, 6), (2, now + 1, 0)] {
            let mut delete = db.prepare(DELETE_EXPIRED).unwrap();
            let deleted =
                delete.query_map(params![cut, too_old_before, i64::MAX, i64::MAX], |_| Ok(())).unwrap();
            assert!(deleted.map(Result::unwrap).count() <= 8);
            assert_eq!(delete.get_status(rusqlite::StatementStatus::FullscanStep), 0);
            assert_eq!(seqs(&db).len(), left);
        }
    }

    #[test]
    fn a_clock_that_steps_back_never_stamps_an_emergency_before_the_one_before_it() {
        let dir = TestDir::new("step-back");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        let stepped_back = start.wall - HOUR;
        let stored = commit(&mut db, EMPTY, &[start.wall, stepped_back], &mut expiry, start);
        assert_eq!(stored[1].received_at, start.wall);
        assert!(stored[1].envelope.contains(&rfc3339_millis(start.wall)), "{}", stored[1].envelope);
        let tail = Tail { seq: 2, received_at: stored[1].received_at };
        let next = commit(&mut db, tail, &[stepped_back + MINUTE], &mut expiry, kept_time(start, MINUTE));
        assert_eq!(next[0].received_at, start.wall);
        let on_disk: Vec<i64> = {
            let mut query = db.prepare("SELECT received_at_ms FROM emergencies ORDER BY seq").unwrap();
            query.query_map([], |row| row.get(0)).unwrap().map(Result::unwrap).collect()
        };
        assert_eq!(on_disk, [unix_millis(start.wall); 3]);
    }

    #[test]
    fn a_clock_that_jumps_ahead_and_back_deletes_nothing_recent() {
        let dir = TestDir::new("jump-and-back");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        commit(&mut db, EMPTY, &[start.wall; 3], &mut expiry, start);
        expiry.delete_expired(&db, 3, reading_after(start, MINUTE, start.wall + YEARS)).unwrap();
        assert_eq!(seqs(&db), [1, 2, 3]);
        // Corrected: trusted again at once, so what is really an hour old goes.
        expiry.delete_expired(&db, 3, kept_time(start, 2 * MINUTE)).unwrap();
        assert_eq!(seqs(&db), [1, 2, 3]);
        expiry.delete_expired(&db, 3, kept_time(start, HOUR + 3 * MINUTE)).unwrap();
        assert_eq!(seqs(&db), [] as [i64; 0]);
    }

    #[test]
    fn a_clock_that_jumps_ahead_is_trusted_once_it_has_kept_time_for_max_age() {
        let dir = TestDir::new("jump");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        commit(&mut db, EMPTY, &[start.wall; 3], &mut expiry, start);
        let jumped = reading_after(start, MINUTE, start.wall + YEARS);
        expiry.delete_expired(&db, 3, jumped).unwrap();
        expiry.delete_expired(&db, 3, kept_time(jumped, HOUR - SECOND)).unwrap();
        assert_eq!(seqs(&db), [1, 2, 3]);
        expiry.delete_expired(&db, 3, kept_time(jumped, HOUR)).unwrap();
        assert_eq!(seqs(&db), [] as [i64; 0]);
    }

    #[test]
    fn a_clock_set_after_boot_deletes_nothing_received_before_it_was_set() {
        // A board without a real-time clock boots in 1970 and stamps what it receives by it.
        let dir = TestDir::new("set-after-boot");
        let boot = Reading { wall: UNIX_EPOCH + 10 * MINUTE, mono: Instant::now() };
        let (mut db, mut expiry) = new_history(&dir, boot);
        commit(&mut db, EMPTY, &[boot.wall; 2], &mut expiry, boot);
        let set = reading_after(boot, MINUTE, SystemTime::now());
        expiry.delete_expired(&db, 2, set).unwrap();
        assert_eq!(seqs(&db), [1, 2]);
        expiry.delete_expired(&db, 2, kept_time(set, HOUR)).unwrap();
        assert_eq!(seqs(&db), [] as [i64; 0]);
    }

    #[test]
    fn the_clock_at_start_expires_what_aged_out_while_the_server_was_down() {
        let dir = TestDir::new("restart");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        commit(&mut db, EMPTY, &[start.wall - 2 * HOUR, start.wall], &mut expiry, start);
        assert_eq!(seqs(&db), [2]);
        let restart = Reading { wall: start.wall + 2 * HOUR, mono: Instant::now() };
        let loaded = load(&mut db, &mut Expiry::new(RETENTION), restart).unwrap();
        assert_eq!((loaded.last_seq, loaded.retained.len()), (2, 0));
    }

    /// Overwrites the root page of the emergencies table with garbage: the file is still a
    /// database, and the table is not.
    fn corrupt_the_emergencies_table(path: &Path) {
        let (root, page_size) = {
            let db = Connection::open(path).unwrap();
            let root: i64 = db
                .query_row("SELECT rootpage FROM sqlite_schema WHERE name = 'emergencies'", [], |row| {
                    row.get(0)
                })
                .unwrap();
            let page_size: i64 = db.query_row("PRAGMA page_size", [], |row| row.get(0)).unwrap();
            (root, page_size)
        };
        let mut bytes = fs::read(path).unwrap();
        let (start, size) = ((root as usize - 1) * page_size as usize, page_size as usize);
        bytes[start..start + size].fill(0x5a);
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_database_that_fails_its_integrity_check_says_so_and_what_to_do() {
        let dir = TestDir::new("corrupt");
        let (journal, _, committed) = open(dir.path(), RETENTION).unwrap();
        for n in 0..8 {
            let data = format!(r#"{{"n":{n},"text":"{}"}}"#, "x".repeat(1000));
            let data = RawValue::from_string(data).unwrap();
            journal.append(journal.try_place().unwrap(), data, Source::Unix, None).unwrap();
            committed.recv_blocking().unwrap();
        }
        drop(journal);
        let file = dir.path().join(DATABASE_FILE);
        corrupt_the_emergencies_table(&file);
        let damaged = fs::read(&file).unwrap();
        let error = open(dir.path(), RETENTION).unwrap_err();
        assert!(fs::read(&file).unwrap() == damaged, "the damaged file was written to");
        assert!(!error.contains("Invalid parameter name"), "{error}");
        assert!(error.starts_with(&format!("data dir {}:", dir.path().display())), "{error}");
        assert!(error.contains("history.sqlite3 failed its integrity check"), "{error}");
        assert!(error.contains("(quick_check: *** in database main *** "), "{error}");
        assert!(error.contains("move it") && error.contains("restore it"), "{error}");
        assert!(!error.contains('\n'), "one line: {error}");
    }

    fn append(body: &str, key: Option<&str>) -> Append {
        let key = key.map(|key| crate::core::idempotency::IdempotencyKey::parse(key).unwrap());
        Append {
            data: RawValue::from_string(body.into()).unwrap(),
            source: Source::Unix,
            received_at: SystemTime::now(),
            fingerprint: key.map(|key| Fingerprint::new(key, body)),
            reply: async_channel::bounded(1).0,
        }
    }

    /// Each outcome with the seq of what it stored or names.
    fn decided(outcomes: &[Outcome<Stored>]) -> Vec<Outcome<u64>> {
        let seq = |outcome: &Outcome<Stored>| match outcome {
            Outcome::New(stored) => Outcome::New(stored.seq),
            Outcome::Duplicate { seq } => Outcome::Duplicate { seq: *seq },
            Outcome::Conflict { seq } => Outcome::Conflict { seq: *seq },
        };
        outcomes.iter().map(seq).collect()
    }

    #[test]
    fn a_key_is_decided_in_the_transaction_that_assigns_the_seqs() {
        let dir = TestDir::new("keys");
        let start = Reading::now();
        let retention = Retention { max_count: 3, ..RETENTION };
        let (mut db, mut expiry, _) = reopen(&dir, retention, start);
        let batch = [
            append(r#"{"n":1}"#, Some("k")),
            append(r#"{"n":1}"#, Some("k")),
            append(r#"{"n":2}"#, Some("k")),
            append("{}", None),
            append("{}", None),
        ];
        let outcomes = write_batch(&mut db, EMPTY, &batch, &[], &mut expiry, start).unwrap();
        use Outcome::{Conflict, Duplicate, New};
        assert_eq!(decided(&outcomes), [New(1), Duplicate { seq: 1 }, Conflict { seq: 1 }, New(2), New(3)]);
        drop(db);

        // Committed, the key outlives a restart; it goes with its row.
        let (mut db, mut expiry, loaded) = reopen(&dir, retention, start);
        assert_eq!(loaded.last_seq, 3);
        let mut write = |tail: Tail, batch: &[Append]| {
            let outcomes = write_batch(&mut db, tail, batch, &[], &mut expiry, start).unwrap();
            (decided(&outcomes), tail.after(&outcomes))
        };
        let (retried, tail) = write(loaded.tail(), &[append(r#"{"n":1}"#, Some("k"))]);
        assert_eq!(retried, [Duplicate { seq: 1 }]);
        assert_eq!(tail.seq, 3, "a retry takes no seq");
        // Seq 4 pushes seq 1 out of the retained 3, and its key with it.
        let (pushed, tail) = write(tail, &[append("{}", None)]);
        assert_eq!(pushed, [New(4)]);
        let (again, _) = write(tail, &[append(r#"{"n":1}"#, Some("k"))]);
        assert_eq!(again, [New(5)]);
        let last_seq: String =
            db.query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |row| row.get(0)).unwrap();
        assert_eq!(last_seq, "5");
    }

    #[test]
    fn a_retry_or_a_conflict_takes_no_seq_and_leaves_the_tail_where_it_was() {
        let dir = TestDir::new("keys-tail");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        let stepped_back = start.wall - HOUR;
        let batch = [
            Append { received_at: start.wall, ..append(r#"{"n":1}"#, Some("k")) },
            Append { received_at: start.wall + HOUR, ..append(r#"{"n":1}"#, Some("k")) },
            Append { received_at: start.wall + HOUR, ..append(r#"{"n":2}"#, Some("k")) },
            Append { received_at: stepped_back, ..append("{}", None) },
        ];
        let outcomes = write_batch(&mut db, EMPTY, &batch, &[], &mut expiry, start).unwrap();
        use Outcome::{Conflict, Duplicate, New};
        assert_eq!(decided(&outcomes), [New(1), Duplicate { seq: 1 }, Conflict { seq: 1 }, New(2)]);
        // Seq 2 follows seq 1, not the retries' later stamps, and never goes before seq 1.
        let Outcome::New(second) = &outcomes[3] else { unreachable!() };
        assert_eq!(second.received_at, start.wall);
        let tail = EMPTY.after(&outcomes);
        assert_eq!((tail.seq, tail.received_at), (2, start.wall));
        let retried = write_batch(&mut db, tail, &[append(r#"{"n":1}"#, Some("k"))], &[], &mut expiry, start);
        let retried = retried.unwrap();
        assert_eq!(decided(&retried), [Duplicate { seq: 1 }]);
        let after = tail.after(&retried);
        assert_eq!((after.seq, after.received_at), (tail.seq, tail.received_at));
        assert_eq!(seqs(&db), [1, 2]);
    }

    #[test]
    fn a_row_whose_digest_is_damaged_refuses_its_key_and_fails_nothing_else() {
        let dir = TestDir::new("digest");
        let start = Reading::now();
        let (mut db, mut expiry) = new_history(&dir, start);
        let keyed = [append("{}", Some("null")), append("{}", Some("short"))];
        let stored = write_batch(&mut db, EMPTY, &keyed, &[], &mut expiry, start).unwrap();
        db.execute("UPDATE emergencies SET body_sha1 = NULL WHERE seq = 1", []).unwrap();
        db.execute("UPDATE emergencies SET body_sha1 = x'00' WHERE seq = 2", []).unwrap();
        let batch = [append("{}", Some("null")), append("{}", Some("short")), append("{}", None)];
        let outcomes = write_batch(&mut db, EMPTY.after(&stored), &batch, &[], &mut expiry, start).unwrap();
        assert_eq!(
            decided(&outcomes),
            [Outcome::Conflict { seq: 1 }, Outcome::Conflict { seq: 2 }, Outcome::New(3)]
        );
    }
}
