//! Publishers: one connection over HTTP (`POST /emergencias`, keep-alive, pipelined) or the Unix
//! socket (one JSON line each), either paced at a fixed rate or as fast as replies come back.
//! Every body is `{"t":<ns since the bench's t0>,"i":<n>,"pad":"xx…"}`, padded to `--size` bytes.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use smol::Timer;
use smol::future;
use smol::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use smol::net::TcpStream;
use smol::net::unix::UnixStream;

use crate::client::Target;

#[derive(Clone, Debug)]
pub enum Ingest {
    Http,
    Unix(PathBuf),
}

impl Ingest {
    pub fn name(&self) -> &'static str {
        match self {
            Ingest::Http => "http",
            Ingest::Unix(_) => "unix",
        }
    }
}

/// An emergency body of exactly `size` bytes when `size` leaves room for the padding.
pub fn body(t_ns: u64, i: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"t\":{t_ns},\"i\":{i},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut body = Vec::with_capacity(head.len() + pad + 2);
    body.extend_from_slice(head.as_bytes());
    body.resize(head.len() + pad, b'x');
    body.extend_from_slice(b"\"}");
    body
}

/// The publisher's reply to one emergency.
#[derive(Debug, PartialEq)]
pub struct Reply {
    pub seq: Option<u64>,
    pub error: Option<String>,
}

pub struct PubWriter {
    stream: Box<dyn AsyncWrite + Unpin + Send>,
    http_prefix: Option<String>,
}

pub struct PubReader {
    reader: BufReader<Box<dyn AsyncRead + Unpin + Send>>,
    http: bool,
    line: String,
}

/// Opens one publisher connection.
pub async fn open(ingest: &Ingest, target: &Target) -> io::Result<(PubWriter, PubReader)> {
    match ingest {
        Ingest::Http => {
            let stream = TcpStream::connect(target.http_addr).await?;
            stream.set_nodelay(true)?;
            let auth = target
                .publish_token
                .as_ref()
                .map(|t| format!("Authorization: Bearer {t}\r\n"))
                .unwrap_or_default();
            let prefix = format!(
                "POST /emergencias HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}Content-Length: ",
                target.authority
            );
            Ok((
                PubWriter { stream: Box::new(stream.clone()), http_prefix: Some(prefix) },
                PubReader { reader: BufReader::new(Box::new(stream)), http: true, line: String::new() },
            ))
        }
        Ingest::Unix(path) => {
            let stream = UnixStream::connect(path).await?;
            Ok((
                PubWriter { stream: Box::new(stream.clone()), http_prefix: None },
                PubReader { reader: BufReader::new(Box::new(stream)), http: false, line: String::new() },
            ))
        }
    }
}

impl PubWriter {
    /// Appends one emergency, framed for this ingest path, to `out`.
    pub fn frame(&self, body: &[u8], out: &mut Vec<u8>) {
        match &self.http_prefix {
            Some(prefix) => {
                out.extend_from_slice(prefix.as_bytes());
                out.extend_from_slice(body.len().to_string().as_bytes());
                out.extend_from_slice(b"\r\n\r\n");
                out.extend_from_slice(body);
            }
            None => {
                out.extend_from_slice(body);
                out.push(b'\n');
            }
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }
}

impl PubReader {
    pub async fn reply(&mut self) -> io::Result<Reply> {
        let eof = || io::Error::new(io::ErrorKind::UnexpectedEof, "publisher connection closed");
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            return Err(eof());
        }
        let json = if self.http {
            let status = self.line.split(' ').nth(1).unwrap_or("").to_owned();
            let mut length = 0usize;
            loop {
                self.line.clear();
                if self.reader.read_line(&mut self.line).await? == 0 {
                    return Err(eof());
                }
                let header = self.line.trim_end();
                if header.is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            self.reader.read_exact(&mut body).await?;
            if status != "202" {
                let text = String::from_utf8_lossy(&body);
                return Ok(Reply { seq: None, error: Some(format!("HTTP {status}: {text}")) });
            }
            String::from_utf8_lossy(&body).into_owned()
        } else {
            self.line.trim_end().to_owned()
        };
        let value: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("reply {json:?}: {e}")))?;
        if value["ok"] == true {
            Ok(Reply { seq: value["seq"].as_u64(), error: None })
        } else {
            Ok(Reply { seq: None, error: Some(value["error"].as_str().unwrap_or(&json).to_owned()) })
        }
    }
}

/// What a publisher did.
#[derive(Default)]
pub struct PublishLog {
    /// Seqs of accepted emergencies.
    pub accepted: Vec<u64>,
    pub rejected: u64,
    /// The connection failed (open, write or read), as opposed to a refusal or giving up.
    pub broken: bool,
    pub first_error: Option<String>,
    /// Round trip of each accepted publish (write to reply), microseconds.
    pub rtt_us: Vec<u32>,
    /// Paced only: how late the latest send was against its schedule.
    pub max_lag: Duration,
    pub started: Option<Instant>,
    pub finished: Option<Instant>,
}

impl PublishLog {
    fn note(&mut self, reply: io::Result<Reply>, sent: Instant) -> bool {
        match reply {
            Ok(Reply { seq: Some(seq), .. }) => {
                self.accepted.push(seq);
                self.rtt_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                true
            }
            Ok(Reply { error, .. }) => {
                self.rejected += 1;
                self.first_error.get_or_insert(error.unwrap_or_else(|| "accepted without a seq".into()));
                false
            }
            Err(error) => {
                self.broken = true;
                self.first_error.get_or_insert(error.to_string());
                false
            }
        }
    }

    pub fn seconds(&self) -> f64 {
        match (self.started, self.finished) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

impl PublishLog {
    /// The log of a publisher that could not even connect.
    fn cannot_open(error: io::Error) -> PublishLog {
        PublishLog {
            first_error: Some(format!("cannot open publisher: {error}")),
            broken: true,
            ..Default::default()
        }
    }
}

/// A paced publisher's state as it goes, for whoever runs beside it.
#[derive(Default)]
pub struct Live {
    /// The highest seq accepted so far.
    pub latest: AtomicU64,
    /// Set to stop the publisher before its next publish.
    pub stop: AtomicBool,
}

/// Publishes `count` emergencies of `size` bytes at `rate` per second, one at a time, each
/// stamped with the moment it is written; stops after `give_up_after` if the server cannot keep
/// up with the rate, so that a run stays bounded, or once `live.stop` is set.
#[allow(clippy::too_many_arguments)]
pub async fn paced(
    t0: Instant,
    ingest: &Ingest,
    target: &Target,
    rate: f64,
    count: u64,
    size: usize,
    give_up_after: Duration,
    live: Option<&Live>,
) -> PublishLog {
    let mut log = PublishLog::default();
    let (mut writer, mut reader) = match open(ingest, target).await {
        Ok(pair) => pair,
        Err(error) => return PublishLog::cannot_open(error),
    };
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    log.started = Some(start);
    let mut frame = Vec::with_capacity(size + 256);
    for i in 0..count {
        if start.elapsed() > give_up_after {
            log.first_error =
                Some(format!("stopped after {give_up_after:?}: the server could not keep the rate"));
            break;
        }
        let due = start + period.mul_f64(i as f64);
        Timer::at(due).await;
        if live.is_some_and(|live| live.stop.load(Relaxed)) {
            break;
        }
        let sent = Instant::now();
        log.max_lag = log.max_lag.max(sent - due);
        frame.clear();
        writer.frame(&body((sent - t0).as_nanos() as u64, i, size), &mut frame);
        if let Err(error) = writer.write(&frame).await {
            log.first_error.get_or_insert(format!("write: {error}"));
            log.broken = true;
            break;
        }
        let reply = reader.reply().await;
        let failed = reply.is_err();
        log.note(reply, sent);
        if let (Some(live), Some(&seq)) = (live, log.accepted.last()) {
            live.latest.fetch_max(seq, Relaxed);
        }
        if failed {
            break;
        }
    }
    log.finished = Some(Instant::now());
    log
}

/// Publishes as fast as the server replies, keeping up to `window` emergencies in flight, until
/// `until`, `max_count`, or the first error or refusal.
pub async fn flood(
    t0: Instant,
    ingest: &Ingest,
    target: &Target,
    size: usize,
    window: usize,
    until: Instant,
    max_count: u64,
) -> PublishLog {
    let mut log = PublishLog::default();
    let (mut writer, mut reader) = match open(ingest, target).await {
        Ok(pair) => pair,
        Err(error) => return PublishLog::cannot_open(error),
    };
    // Send instants of the emergencies in flight; its capacity is the window.
    let (in_flight, replies_due) = async_channel::bounded::<Instant>(window.max(1));
    let refused = Arc::new(AtomicBool::new(false));
    log.started = Some(Instant::now());
    let write_side = {
        let refused = Arc::clone(&refused);
        async move {
            let mut frame = Vec::new();
            let mut i = 0u64;
            while i < max_count && Instant::now() < until && !refused.load(Relaxed) {
                // Wait for one slot, then take every free slot: one write per batch.
                if in_flight.send(Instant::now()).await.is_err() {
                    break;
                }
                frame.clear();
                let now = Instant::now();
                writer.frame(&body((now - t0).as_nanos() as u64, i, size), &mut frame);
                i += 1;
                while i < max_count && in_flight.try_send(now).is_ok() {
                    writer.frame(&body((now - t0).as_nanos() as u64, i, size), &mut frame);
                    i += 1;
                }
                if writer.write(&frame).await.is_err() {
                    break;
                }
            }
            drop(in_flight);
        }
    };
    let read_side = async {
        while let Ok(sent) = replies_due.recv().await {
            if !log.note(reader.reply().await, sent) {
                refused.store(true, Relaxed);
                break;
            }
        }
        // The write side may be waiting for a slot that no reply will free now.
        replies_due.close();
    };
    // A server that stops answering (killed) must not hang the bench.
    let hard_stop = until + Duration::from_secs(30);
    future::or(
        async {
            future::zip(write_side, read_side).await;
        },
        async {
            Timer::at(hard_stop).await;
        },
    )
    .await;
    log.finished = Some(Instant::now());
    log
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_have_the_requested_size() {
        let b = body(123_456_789, 7, 512);
        assert_eq!(b.len(), 512);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!((v["t"].as_u64(), v["i"].as_u64()), (Some(123_456_789), Some(7)));
        assert!(b.starts_with(br#"{"t":123456789,"#));
    }
}
