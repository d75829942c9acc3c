//! The express lane: one task that writes what the hub queued for parked WebSocket clients straight
//! to their sockets, so that a fan-out to a thousand idle tablets is a thousand `writev`s from one
//! loop, not a thousand session tasks woken, polled and put back to sleep.
//!
//! A session parks (`Doorbell::park`) only while it waits with everything written, on a plain
//! socket; the hub then lists it instead of waking it. The lane writes for a listed client what
//! its session would have (`Hub::take_listed_pending`, the same batch limits), records the
//! delivery, and parks it again. What the socket does not take at once (a full send buffer, an
//! error) is left here, with the session woken to write the rest under `--write-timeout` and its
//! slow-client rule, before anything else: a frame is never cut by another. TLS and SSE sessions
//! never park: their framing state is their session's.
//!
//! The heartbeat's sweep writes a parked client's pings here too (`Express::ping`), so that an
//! idle tablet's session wakes only to read its pong.

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem;
use std::net::TcpStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::SystemTime;

use crate::app::App;
use crate::core::hub::Hub;
use crate::core::receipts::ReceiptEvent;
use crate::runtime::scheduler::FanOut;
use crate::ws::frame::{Frame, PING, WRITE_BATCH_BYTES, WRITE_BATCH_FRAMES, slices_for, unwritten_slices};
use smol::{Async, future};
use socket2::SockRef;

/// Listed clients written per scheduling round, so that publishes, pings and accepts get their
/// turns during a large fan-out: a round then writes for about 3 ms (a `send` to a loopback socket
/// is about 13 µs). 64 (a round of session turns) made a fan-out to 1000 clients 16 rounds and its
/// p99 about 4 ms later (BENCHMARKS.md, "Round 6").
const CLIENTS_PER_TURN: usize = 256;

/// The plain WebSocket sessions that may park, by their hub key.
pub struct Express {
    lanes: RefCell<Vec<Option<Lane>>>,
}

/// A parked-capable session: its socket, and what the lane could not write for it.
struct Lane {
    client_id: u64,
    socket: Arc<Async<TcpStream>>,
    leftover: Option<Box<Leftover>>,
}

/// A batch the lane began and the session must finish: `written` bytes of `frames` are on the
/// socket; `seqs` count as delivered once all are.
pub struct Leftover {
    pub frames: Vec<Frame>,
    pub written: usize,
    pub seqs: Vec<u64>,
}

impl Express {
    /// Room reserved for `max_clients` lanes, touched only as clients come.
    pub fn new(max_clients: usize) -> Rc<Express> {
        Rc::new(Express { lanes: RefCell::new(Vec::with_capacity(max_clients)) })
    }

    /// Registers a session's socket under its hub key, which the hub lists it by.
    pub fn join(&self, key: usize, client_id: u64, socket: Arc<Async<TcpStream>>) {
        let mut lanes = self.lanes.borrow_mut();
        if lanes.len() <= key {
            lanes.resize_with(key + 1, || None);
        }
        lanes[key] = Some(Lane { client_id, socket, leftover: None });
    }

    /// The session ended: its socket is no longer written here.
    pub fn leave(&self, key: usize, client_id: u64) {
        let mut lanes = self.lanes.borrow_mut();
        if lane_mut(&mut lanes, key, client_id).is_some() {
            lanes[key] = None;
        }
    }

    /// What the lane left for this session to finish, if anything.
    pub fn take_leftover(&self, key: usize, client_id: u64) -> Option<Box<Leftover>> {
        lane_mut(&mut self.lanes.borrow_mut(), key, client_id)?.leftover.take()
    }

    /// Writes a ping for the heartbeat (`heartbeat::ParkedPinger`) to the client under hub key
    /// `key` whose client id's low 32 bits are `tag`, while its session is parked with nothing
    /// of the lane's left to finish (a listed one is left to its session): `true` once it is on
    /// its way, `false` if its session must write it.
    pub fn ping(&self, hub: &mut Hub, key: usize, tag: u32) -> bool {
        self.ping_with(hub, key, tag, send_now)
    }

    /// `ping`, with the system call given: tests make the socket take part of the Ping.
    fn ping_with(&self, hub: &mut Hub, key: usize, tag: u32, send: fn(&TcpStream, &[u8]) -> usize) -> bool {
        let mut lanes = self.lanes.borrow_mut();
        let Some(lane) = lanes.get_mut(key).and_then(Option::as_mut) else { return false };
        if lane.client_id as u32 != tag || lane.leftover.is_some() || !hub.is_parked(key, lane.client_id) {
            return false;
        }
        let written = send(lane.socket.get_ref(), PING);
        if written == 0 {
            return false;
        }
        if written < PING.len() {
            let frames = vec![Frame::ping()];
            lane.leftover = Some(Box::new(Leftover { frames, written, seqs: Vec::new() }));
            hub.wake_to_finish(key, lane.client_id);
        }
        true
    }

    /// Serves the hub's list until the server stops, `CLIENTS_PER_TURN` per scheduling round.
    pub async fn run(self: Rc<Self>, app: Rc<App>, fan_out: Rc<FanOut>) {
        let mut listed = Vec::new();
        loop {
            future::poll_fn(|cx| app.hub.with(|hub| hub.poll_listed(cx))).await;
            app.hub.with(|hub| hub.take_listed(&mut listed));
            for turn in listed.chunks(CLIENTS_PER_TURN) {
                self.serve(&app, turn);
                fan_out.next_round().await;
            }
            listed.clear();
        }
    }

    /// Writes for each listed client of `turn` and records what was delivered, once for all.
    fn serve(&self, app: &App, turn: &[(usize, u64)]) {
        let mut batch = Batch::new(SystemTime::now());
        let mut lanes = self.lanes.borrow_mut();
        app.hub.with(|hub| {
            for &(key, client_id) in turn {
                match lane_mut(&mut lanes, key, client_id) {
                    Some(lane) => batch.write_for(hub, key, lane),
                    // Not a session that parks: it cannot be listed, but if it were, it is woken.
                    None => hub.express_served(key, client_id, false),
                }
            }
        });
        drop(lanes);
        app.metrics.count_delivered(batch.delivered);
        if !batch.events.is_empty() {
            app.publisher.record(batch.events);
        }
    }
}

/// The lane of the session `client_id` under hub key `key`, if it still has one: keys are reused.
fn lane_mut(lanes: &mut [Option<Lane>], key: usize, client_id: u64) -> Option<&mut Lane> {
    lanes.get_mut(key)?.as_mut().filter(|lane| lane.client_id == client_id)
}

/// One turn's buffers, reused from client to client, and what it delivered.
struct Batch {
    /// When the turn's deliveries happened, for their receipts.
    at: SystemTime,
    frames: Vec<Frame>,
    seqs: Vec<u64>,
    /// The emergencies `wire_seqs`, framed end to end. The clients of a fan-out are mostly sent
    /// the same seqs, so they get the same bytes: one `send` of one buffer each, with no iovecs
    /// for the kernel to import. Kept for one turn only: a new history numbers its seqs again.
    wire: Vec<u8>,
    wire_seqs: Vec<u64>,
    delivered: u64,
    events: Vec<ReceiptEvent>,
}

impl Batch {
    fn new(at: SystemTime) -> Batch {
        Batch {
            at,
            frames: Vec::new(),
            seqs: Vec::new(),
            wire: Vec::new(),
            wire_seqs: Vec::new(),
            delivered: 0,
            events: Vec::new(),
        }
    }

    /// Writes the batch taken for one client as far as its socket takes it now: from `wire` when
    /// it is emergencies only (framed once per turn), else frame by frame.
    fn write_now(&mut self, socket: &TcpStream) -> usize {
        let (frames, seqs) = (&self.frames, &self.seqs);
        if frames.is_empty() || seqs.len() < frames.len() {
            return write_now(socket, frames);
        }
        if self.wire_seqs != *seqs {
            self.wire.clear();
            self.wire.extend(frames.iter().flat_map(Frame::parts).flatten());
            self.wire_seqs.clone_from(seqs);
        }
        send_now(socket, &self.wire)
    }

    fn write_for(&mut self, hub: &mut Hub, key: usize, lane: &mut Lane) {
        let (frames, seqs) = (&mut self.frames, &mut self.seqs);
        let taken =
            hub.take_listed_pending(key, lane.client_id, WRITE_BATCH_FRAMES, WRITE_BATCH_BYTES, |out| {
                seqs.extend(out.seq);
                frames.push(Frame::text(out.json));
            });
        let Some(taken) = taken else { return };
        let written = self.write_now(lane.socket.get_ref());
        let (frames, seqs) = (&mut self.frames, &mut self.seqs);
        if written < frames.iter().map(Frame::len).sum() {
            let (frames, seqs) = (mem::take(frames), mem::take(seqs));
            lane.leftover = Some(Box::new(Leftover { frames, written, seqs }));
            return hub.express_served(key, lane.client_id, false);
        }
        self.delivered += seqs.len() as u64;
        self.events.extend(hub.delivered(key, lane.client_id, seqs, self.at));
        // A full batch may not be all: the session takes the rest, yielding between batches.
        hub.express_served(key, lane.client_id, taken < WRITE_BATCH_FRAMES);
        frames.clear();
        seqs.clear();
    }
}

/// Sends as much of `bytes` as the socket takes now; returns how many.
fn send_now(socket: &TcpStream, bytes: &[u8]) -> usize {
    let socket = SockRef::from(socket);
    send_until_full(bytes.len(), |from| socket.send(&bytes[from..]))
}

/// As `send_now`, for `frames` as they are. `sendmsg`, not `writev`: the socket's own path,
/// without the file layer's (`perf`: `vfs_writev` was 4 % of a paced fan-out's samples).
fn write_now(socket: &TcpStream, frames: &[Frame]) -> usize {
    let socket = SockRef::from(socket);
    let total = frames.iter().map(Frame::len).sum();
    send_until_full(total, |from| {
        let mut slices = [IoSlice::new(&[]); slices_for(WRITE_BATCH_FRAMES)];
        let count = unwritten_slices(frames, from, &mut slices);
        socket.send_vectored(&slices[..count])
    })
}

/// Calls `send` with the count written so far until `total` bytes are, or the socket is full or
/// fails; returns the count. An error is left for the session to meet when it writes the rest.
fn send_until_full(total: usize, mut send: impl FnMut(usize) -> io::Result<usize>) -> usize {
    let mut written = 0;
    while written < total {
        match send(written) {
            Ok(0) => break,
            Ok(n) => written += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::handle::{HubHandle, Ingress};
    use crate::core::hub::HubLimits;
    use crate::core::receipts::ReceiptLimits;
    use crate::core::subscription::Subscription;
    use crate::protocol::Source;
    use crate::runtime::heartbeat::Heartbeat;
    use crate::runtime::heartbeat::tests::CountingWaker;
    use serde_json::value::RawValue;
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;
    use std::task::{Context, Waker};
    use std::time::Duration;

    fn hub() -> (HubHandle, Ingress) {
        let limits = HubLimits {
            history: 8,
            history_bytes: 1 << 20,
            queue: 8,
            max_clients: 4,
            history_max_age: Duration::from_secs(3600),
            status_queue: 8,
            receipts: ReceiptLimits { max_open: 0, max_open_bytes: 1 << 20, max_unnamed: 4 },
            ack_timeout: None,
        };
        HubHandle::new(Hub::new(limits, "s"))
    }

    /// A client of `hub` on a lane of `express`, its session parked, and the peer's end of its
    /// socket.
    fn parked_client(hub: &HubHandle, express: &Express) -> (Subscription, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (socket, _) = listener.accept().unwrap();
        let (client, _) = Subscription::open(hub, "127.0.0.1:9".parse().unwrap(), None, None).unwrap();
        express.join(client.key(), client.client_id, Arc::new(Async::new(socket).unwrap()));
        client.park();
        (client, peer)
    }

    fn ping(express: &Express, hub: &HubHandle, client: &Subscription) -> bool {
        hub.with(|hub| express.ping(hub, client.key(), client.client_id as u32))
    }

    /// What the peer has been sent so far (a loopback `send` is there when it returns).
    fn received(peer: &mut TcpStream) -> Vec<u8> {
        peer.set_nonblocking(true).unwrap();
        let mut bytes = vec![0; 64];
        let count = peer.read(&mut bytes).unwrap_or(0);
        bytes.truncate(count);
        bytes
    }

    #[test]
    fn a_parked_client_is_sent_its_ping_and_stays_parked() {
        let (hub, _) = hub();
        let express = Express::new(4);
        let (client, mut peer) = parked_client(&hub, &express);
        assert!(ping(&express, &hub, &client));
        assert_eq!(received(&mut peer), PING);
        assert!(hub.with(|hub| hub.is_parked(client.key(), client.client_id)));
    }

    #[test]
    fn a_ping_is_left_to_the_session_of_a_listed_busy_or_unfinished_client_or_another_one() {
        let (hub, ingress) = hub();
        let express = Express::new(4);
        let (client, mut peer) = parked_client(&hub, &express);
        let tag = client.client_id as u32;
        let key = client.key();
        // Listed: an emergency came for it, which the lane writes first.
        let data = RawValue::from_string("{}".to_owned()).unwrap();
        assert!(ingress.publish(&data, Source::Http, None).is_ok());
        assert!(!ping(&express, &hub, &client), "listed");
        // Busy: its session woke.
        client.unpark();
        assert!(!ping(&express, &hub, &client), "busy");
        // A batch the lane began and its session has not finished.
        client.park();
        let leftover = Leftover { frames: vec![Frame::ping()], written: 1, seqs: Vec::new() };
        lane_mut(&mut express.lanes.borrow_mut(), key, client.client_id).unwrap().leftover =
            Some(Box::new(leftover));
        assert!(!ping(&express, &hub, &client), "unfinished");
        assert!(express.take_leftover(key, client.client_id).is_some());
        // Another client under the same key (keys are reused).
        assert!(!hub.with(|hub| express.ping(hub, key, tag.wrapping_add(1))), "another client");
        assert!(received(&mut peer).is_empty(), "nothing was written");
        assert!(ping(&express, &hub, &client), "parked again, with nothing left over");
    }

    #[test]
    fn a_ping_the_socket_takes_in_part_is_finished_by_its_session() {
        let (hub, _) = hub();
        let express = Express::new(4);
        let (client, _peer) = parked_client(&hub, &express);
        let (key, id) = (client.key(), client.client_id);
        let none = hub.with(|hub| express.ping_with(hub, key, id as u32, |_, _| 0));
        assert!(!none, "a socket that takes nothing leaves the ping to the session");
        assert!(express.take_leftover(key, id).is_none());
        assert!(hub.with(|hub| express.ping_with(hub, key, id as u32, |_, _| 1)));
        assert!(!hub.with(|hub| hub.is_parked(key, id)));
        assert!(hub.borrow().is_rung(key, id), "its session is woken");
        let leftover = express.take_leftover(key, id).expect("the rest is its session's");
        assert_eq!((leftover.frames.len(), leftover.written), (1, 1));
    }

    /// The heartbeat wired to the lane as `server` wires them: the sweep pings a parked client
    /// without waking its session.
    #[test]
    fn the_sweep_pings_a_parked_client_through_the_lane_without_waking_it() {
        let (hub, _) = hub();
        let express = Express::new(4);
        let (client, mut peer) = parked_client(&hub, &express);
        let heartbeat = Heartbeat::new(Duration::from_secs(8 * 3600), Duration::from_secs(2 * 3600), 1);
        let (lane, handle) = (Rc::clone(&express), hub.clone());
        heartbeat.ping_parked_with(Box::new(move |key, tag| handle.with(|hub| lane.ping(hub, key, tag))));
        let pulse = heartbeat.register(client.key(), client.client_id);
        let session = Arc::new(CountingWaker::default());
        let waker = Waker::from(Arc::clone(&session));
        assert!(pulse.poll_due(&mut Context::from_waker(&waker)).is_pending());
        heartbeat.sweep_now(9);
        assert_eq!(received(&mut peer), PING);
        assert_eq!(session.0.load(Ordering::Relaxed), 0, "the session slept on");
        assert!(pulse.awaiting_answer());
    }
}
