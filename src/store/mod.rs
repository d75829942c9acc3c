//! Where the history is kept beyond memory. `journal`: SQLite on a thread of its own. A store
//! assigns seqs and serializes envelopes as it commits them, and hands the committed emergencies
//! back to the executor in seq order; it uses the core's types and nothing above them.

pub mod journal;
