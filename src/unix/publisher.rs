//! One Unix-socket publisher connection: read lines, stage them as one burst, reply in order.

use std::io;
use std::rc::Rc;
use std::time::Instant;

use log::{debug, info, warn};
use smol::future;
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::net::unix::UnixStream;

use crate::app::App;
use crate::ingest::{CloseOutcome, INFLIGHT_WAIT, Rejection, Staged, WhenBusy, parse_close_command};
use crate::protocol::{self, CloseReply, Source, error_json};
use crate::runtime::deadline;
use crate::runtime::slots::SlotGuard;
use crate::unix::lines::{self, LineSplitter};

/// Serves one publisher connection until it closes, fails, the server stops, or it is evicted
/// (idle while every slot is taken). Only a clean end of input completes a last line without
/// newline; otherwise a partial line is dropped unanswered: it was never a complete submission.
/// `sender` names the connecting process in the log line of each emergency it publishes.
pub async fn serve(app: Rc<App>, mut stream: UnixStream, slot: SlotGuard, sender: Box<str>) {
    let max_line = app.config.max_body_bytes;
    let mut splitter = LineSplitter::new(max_line);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        slot.set_idle(true);
        let stopped_or_evicted = async {
            future::or(app.stopping(), slot.evicted()).await;
            None
        };
        let read = future::or(async { Some(stream.read(&mut chunk).await) }, stopped_or_evicted).await;
        slot.set_idle(false);
        let mut lines: Vec<Result<Vec<u8>, Rejection>> = Vec::new();
        let collect = |line: lines::Line<'_>| {
            lines.push(match line {
                lines::Line::Complete(bytes) => Ok(bytes.to_vec()),
                lines::Line::TooLong => Err(Rejection::TooLarge { limit: max_line }),
            })
        };
        let at_end = match read {
            None => return,
            Some(Err(error)) => {
                drop_unfinished_line(&splitter, &error);
                return;
            }
            Some(Ok(0)) => {
                splitter.finish(collect);
                true
            }
            Some(Ok(n)) => {
                splitter.feed(&chunk[..n], collect);
                false
            }
        };
        let replies = publish_lines(&app, lines, &sender).await;
        if !replies.is_empty()
            && !matches!(
                deadline::within(app.config.write_timeout, stream.write_all(replies.as_bytes())).await,
                Ok(Ok(()))
            )
        {
            warn!("closed a Unix-socket publisher that stopped reading its replies");
            return;
        }
        if at_end {
            return;
        }
    }
}

/// A staged line: an emergency on its way into the history, or a close command.
enum Line {
    Emergency(Staged),
    Close(Result<(u64, Option<String>), Rejection>),
}

/// A `{"type":"cerrar","seq":N,...}` line: the reply line, or why not.
async fn close(app: &App, seq: u64, detail: Option<String>, sender: &str) -> Result<String, Rejection> {
    Ok(match app.publisher.close(seq, detail).await? {
        CloseOutcome::Unknown => error_json("unknown seq"),
        CloseOutcome::Closed { already } => {
            if !already {
                info!("closed seq {seq} over unix from {sender}");
            }
            protocol::to_json(&CloseReply { ok: true, seq, closed: true, already_closed: already })
        }
    })
}

/// A failed read is not the end of the input: the last line may have been cut anywhere, and
/// its reply could not be read, so the publisher would send it again. It is not published.
fn drop_unfinished_line(splitter: &LineSplitter, error: &io::Error) {
    if splitter.has_unfinished_line() {
        warn!("dropped a partial line from a Unix-socket publisher whose connection failed: {error}");
    } else {
        debug!("a Unix-socket publisher's connection failed: {error}");
    }
}

/// Stages every line (in memory, each waits for room in `FanOut`, so the sessions a burst wakes
/// get to write; durable, a line waits for a place when the journal's queue is full, and the
/// socket is not read meanwhile), then waits for each outcome in order: a burst on one connection
/// is committed together. The whole burst holds its bytes of `--max-inflight-bytes` until every
/// line is answered. Both loops yield after each `Config::publish_burst` lines: an outcome already
/// there is taken without a `Pending`, and each is a log line. Returns one reply line per input
/// line; each emergency published is logged with its sender.
async fn publish_lines(app: &App, lines: Vec<Result<Vec<u8>, Rejection>>, sender: &str) -> String {
    let bytes_in_flight = lines.iter().flatten().map(Vec::len).sum();
    // Held until every line is answered; refused, every line is told the server is busy.
    let held = app.publisher.reserve(bytes_in_flight, Instant::now() + INFLIGHT_WAIT).await;
    let mut staged = Vec::with_capacity(lines.len());
    for (index, line) in lines.into_iter().enumerate() {
        staged.push(match (line, &held) {
            (Ok(bytes), Ok(_)) => match parse_close_command(&bytes) {
                // Run in order with the replies, after the emergencies before it are in.
                Some(command) => (0, Ok(Line::Close(command))),
                None => {
                    let length = bytes.len();
                    let staged = app.publisher.stage(bytes, Source::Unix, None, WhenBusy::Wait).await;
                    (length, staged.map(Line::Emergency))
                }
            },
            (Ok(_), Err(rejection)) => (0, Err(rejection.clone())),
            (Err(rejection), _) => (0, Err(rejection)),
        });
        if (index + 1) % app.config.publish_burst() == 0 {
            future::yield_now().await;
        }
    }
    let mut replies = String::new();
    let mut rejected = 0;
    let mut first_rejection = None;
    for (index, (bytes, staged)) in staged.into_iter().enumerate() {
        let outcome = match staged {
            Ok(Line::Emergency(staged)) => app.publisher.settle(staged, Source::Unix).await.map(|accepted| {
                info!("{accepted} ({bytes} bytes) over unix from {sender}");
                app.publisher.reply(accepted)
            }),
            Ok(Line::Close(Ok((seq, detail)))) => close(app, seq, detail, sender).await,
            Ok(Line::Close(Err(rejection))) | Err(rejection) => Err(rejection),
        };
        let reply = match outcome {
            Ok(reply) => reply,
            Err(rejection) => {
                rejected += 1;
                app.metrics.count("resq_push_unix_rejections_total", rejection.label());
                let message = rejection.to_string();
                first_rejection.get_or_insert_with(|| message.clone());
                error_json(&message)
            }
        };
        replies.push_str(&reply);
        replies.push('\n');
        if (index + 1) % app.config.publish_burst() == 0 {
            future::yield_now().await;
        }
    }
    if let Some(first) = first_rejection {
        warn!("rejected {rejected} line(s) on the Unix socket: {first}");
    }
    replies
}
