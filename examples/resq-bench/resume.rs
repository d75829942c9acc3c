//! `resume-storm`: the site's Wi-Fi access point reboots and every tablet reconnects at once with
//! `?since=` a few dozen emergencies back, while dispatch goes on publishing. Measures the time
//! until every client holds the publisher's latest seq, checks each client's books from its
//! `since` (nothing lost, nothing twice, in order), and the ping gaps during the storm.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use serde_json::json;
use smol::{Timer, future};

use crate::client::{self, ClientReport, Fleet, Target};
use crate::publish::{self, Ingest, Live};
use crate::report::{Percentiles, Report, round3};
use crate::{Books, Ctx, ResumeStormArgs, collect, cpu_rows, drained, pair, publish_rows, start_server};

/// How long the clients may take to catch up before the run gives up on them.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(120);

pub fn resume_storm(ctx: &Ctx, a: &ResumeStormArgs) -> Result<Report, String> {
    let mut report = Report::new("resume-storm");
    let ping = a.ping_interval.to_string();
    let ping_given = ctx.server_args.iter().any(|arg| arg == "--ping-interval");
    let mode_args: &[&str] = if ping_given { &[] } else { &["--ping-interval", &ping] };
    let server = start_server(ctx, &mut report, a.clients, mode_args)?;
    report.set(
        "params",
        json!({"clients": a.clients, "emergencies": a.emergencies, "behind": a.behind, "rate": a.rate,
               "hold_s": a.hold, "ping_interval_s": a.ping_interval, "size": a.size}),
    );
    let t0 = Instant::now();
    let (backlog, stream) = smol::block_on(ctx.ex.run(async {
        let log =
            publish::flood(t0, &Ingest::Http, &ctx.target, a.size, 16, far_future(), a.emergencies).await;
        (log, client::connect(&ctx.target).await.map(|(_, welcome)| welcome.stream))
    }));
    let latest = backlog.accepted.iter().copied().max().unwrap_or(0);
    if backlog.accepted.len() as u64 != a.emergencies {
        return Err(format!(
            "resume-storm: {} of {} emergencies accepted before the storm: {:?}",
            backlog.accepted.len(),
            a.emergencies,
            backlog.first_error
        ));
    }
    let since = latest.saturating_sub(a.behind);
    let target = resuming(&ctx.target, since, stream?.as_deref());
    report.note(format!("clients resume with {}", target.ws_url));
    let (stop, stop_rx) = async_channel::bounded(1);
    let fleet = Arc::new(Fleet {
        since: Some(since),
        catch_up_to: latest,
        ..Fleet::new(target, t0, a.clients, None, stop_rx)
    });
    let live = Live::default();
    live.latest.store(latest, Relaxed);
    eprintln!("resq-bench: resume-storm: {} clients at once, since={since} of {latest}", a.clients);
    let before = pair(server.pid);
    let storm_start = Instant::now();
    let tasks: Vec<_> =
        (0..a.clients).map(|i| ctx.ex.spawn(client::run(Arc::clone(&fleet), i, true))).collect();
    let run = smol::block_on(ctx.ex.run(async {
        let limit = Duration::from_secs_f64(CATCH_UP_LIMIT.as_secs_f64() + a.hold + 10.0);
        let count = (a.rate * limit.as_secs_f64()).ceil() as u64;
        let publishing =
            publish::paced(t0, &Ingest::Http, &ctx.target, a.rate, count, a.size, limit, Some(&live));
        let measuring = async {
            let caught_up = caught_up(&fleet, &live, CATCH_UP_LIMIT).await;
            let after_storm = pair(server.pid);
            Timer::after(Duration::from_secs_f64(a.hold)).await;
            live.stop.store(true, Relaxed);
            (caught_up, after_storm)
        };
        let (log, (caught_up, after_storm)) = future::zip(publishing, measuring).await;
        let last = log.accepted.iter().copied().max().unwrap_or(latest);
        let drained_ok = drained(&fleet, last, Duration::from_secs(10)).await;
        (caught_up, after_storm, log, drained_ok, collect(stop, tasks).await)
    }));
    let (caught_up, after_storm, mut log, drained_ok, mut reports) = run;
    let mut published = backlog.accepted.clone();
    published.extend_from_slice(&log.accepted);
    storm_rows(&mut report, a, storm_start, caught_up, &mut reports);
    publish_rows(&mut report, &mut log, false);
    cpu_rows(&mut report, "storm", "until all caught up", before, after_storm, 0);
    let books = Books::of(&mut reports, &published, None);
    report.info(
        "messages delivered (replayed and live)",
        format!("{}{}", books.events, if drained_ok { "" } else { " (drain timed out after 10 s)" }),
    );
    report.info("delivery latency of live emergencies", books.latency.summary_ms());
    let gap = books.max_ping_gap.as_secs_f64();
    let allowed = a.ping_interval * 2.0;
    report.target(
        "longest gap between pings (any client)",
        format!("{gap:.2} s"),
        &format!("<= {allowed} s (2 x ping interval)"),
        gap <= allowed,
    );
    report.info("pings per client (min)", books.min_pings.to_string());
    report.set("pings", json!({"max_gap_s": round3(gap), "min_per_client": books.min_pings}));
    books.add_to(&mut report, true);
    crate::stop_server(&mut report, server);
    Ok(report)
}

/// `target` with `?since=N&stream=ID` on its URL.
fn resuming(target: &Target, since: u64, stream: Option<&str>) -> Target {
    let join = if target.ws_url.contains('?') { '&' } else { '?' };
    let stream = stream.map(|s| format!("&stream={s}")).unwrap_or_default();
    Target { ws_url: format!("{}{join}since={since}{stream}", target.ws_url), ..target.clone() }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(3600)
}

/// Waits until every client has ended or holds the publisher's latest seq; the time it took, or
/// `None` past `limit`.
async fn caught_up(fleet: &Fleet, live: &Live, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut last_print = started;
    loop {
        let behind = fleet.behind(live.latest.load(Relaxed));
        if behind == 0 {
            return Some(started.elapsed());
        }
        if started.elapsed() > limit {
            return None;
        }
        if last_print.elapsed() > Duration::from_secs(2) {
            eprintln!("resq-bench: resume-storm: {behind} of {} clients behind", fleet.progress.len());
            last_print = Instant::now();
        }
        Timer::after(Duration::from_millis(2)).await;
    }
}

/// The storm's own rows: time until every client caught up, and each client's time to the seq
/// that was the latest when the storm began.
fn storm_rows(
    report: &mut Report,
    a: &ResumeStormArgs,
    start: Instant,
    caught_up: Option<Duration>,
    reports: &mut [ClientReport],
) {
    let us = |at: Instant| (at - start).as_micros().min(u128::from(u32::MAX)) as u32;
    let mut backlog_us: Vec<u32> = reports.iter().filter_map(|r| r.caught_up_at.map(us)).collect();
    let mut welcome_us: Vec<u32> = reports.iter().filter_map(|r| r.welcomed_at.map(us)).collect();
    let (backlog, welcome) = (Percentiles::of(&mut backlog_us), Percentiles::of(&mut welcome_us));
    let secs = caught_up.map(|d| d.as_secs_f64());
    report.target(
        "every client caught up with the publisher (from the storm's start)",
        secs.map_or(format!("not within {} s", CATCH_UP_LIMIT.as_secs()), |s| format!("{s:.2} s")),
        &format!("< {} s", a.within),
        secs.is_some_and(|s| s < a.within),
    );
    report.info("time to welcome", welcome.summary_ms());
    report.info("time to the storm's starting seq (replay done)", backlog.summary_ms());
    report.must_be_zero("clients that never caught up", (reports.len() - backlog.count) as u64);
    report.set(
        "resume",
        json!({"all_caught_up_s": secs.map(round3), "welcome_ms": welcome.json_ms(),
               "replay_done_ms": backlog.json_ms(), "caught_up_clients": backlog.count}),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_urls_carry_since_and_stream() {
        let plain = Target::parse("ws://127.0.0.1:9", None, None, None).unwrap();
        assert_eq!(
            resuming(&plain, 150, Some("ab12")).ws_url,
            "ws://127.0.0.1:9/ws/emergencias?since=150&stream=ab12"
        );
        let query = Target::parse("ws://127.0.0.1:9/ws/emergencias?token=t", None, None, None).unwrap();
        assert_eq!(resuming(&query, 3, None).ws_url, "ws://127.0.0.1:9/ws/emergencias?token=t&since=3");
    }
}
