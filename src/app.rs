//! `App`: what every connection task sees. Built by `server`, shared as `Rc<App>` by the
//! transports (`http`, `ws`, `unix`).

use std::cell::RefCell;
use std::rc::Rc;

use async_channel::Receiver;

use crate::auth::Access;
use crate::config::Config;
use crate::core::handle::HubHandle;
use crate::core::hub::HubLimits;
use crate::core::receipts::ReceiptLimits;
use crate::ingest::Publisher;
use crate::runtime::heartbeat::Heartbeat;
use crate::support::metrics::Metrics;

pub struct App {
    pub config: Config,
    pub hub: HubHandle,
    /// Tokens and origins; replaced as a whole on reload. Borrowed only between awaits.
    pub access: RefCell<Access>,
    /// The one publish path, for every ingest transport.
    pub publisher: Publisher,
    pub metrics: Rc<Metrics>,
    /// Every session's ping (or SSE heartbeat) timer, swept by one task.
    pub heartbeat: Rc<Heartbeat>,
    /// Its `recv` fails once shutdown begins: idle connections race it to close promptly.
    pub stop: Receiver<()>,
}

/// The hub's bounds, from the flags.
pub fn hub_limits(config: &Config) -> HubLimits {
    HubLimits {
        history: config.history,
        history_bytes: config.history_bytes,
        queue: config.queue,
        max_clients: config.max_clients,
        history_max_age: config.history_max_age,
        status_queue: config.status_queue,
        receipts: ReceiptLimits {
            max_open: config.max_open,
            max_open_bytes: config.max_open_bytes,
            max_unnamed: config.max_unnamed_receipts,
        },
        ack_timeout: config.ack_timeout,
    }
}

impl App {
    /// Completes once shutdown has begun.
    pub async fn stopping(&self) {
        let _ = self.stop.recv().await;
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.stop.is_closed()
    }
}

#[cfg(test)]
impl App {
    /// An app on default flags with an in-memory history, for tests of the transports, and the
    /// sender whose close begins its shutdown: while it lives, `stopping` is pending.
    pub fn for_tests() -> (Rc<App>, async_channel::Sender<()>) {
        use argh::FromArgs;

        use crate::core::hub::Hub;
        use crate::runtime::scheduler::Scheduler;

        let config = Config::from_args(&["resq-push"], &["--in-memory"]).unwrap_or_else(|_| unreachable!());
        let (hub, ingress) = HubHandle::new(Hub::new(hub_limits(&config), "test-stream"));
        let metrics = Rc::new(Metrics::default());
        let fan_out = Rc::clone(&Scheduler::new(config.publish_burst()).fan_out);
        let (max_bytes, max_inflight_bytes) = (config.max_body_bytes, config.max_inflight_bytes);
        let publisher =
            Publisher::new(ingress, None, fan_out, Rc::clone(&metrics), max_bytes, max_inflight_bytes);
        let (stop_sender, stop) = async_channel::bounded(1);
        let heartbeat = Heartbeat::new(config.ping_interval, config.pong_timeout, config.max_clients);
        let access = RefCell::new(Access::default());
        let app = App { config, hub, access, publisher, metrics, heartbeat, stop };
        (Rc::new(app), stop_sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_app_is_not_stopping_until_told() {
        let (app, stop_sender) = App::for_tests();
        assert!(!app.is_stopping());
        assert!(smol::block_on(smol::future::poll_once(app.stopping())).is_none());
        stop_sender.close();
        assert!(app.is_stopping());
        assert!(smol::block_on(smol::future::poll_once(app.stopping())).is_some());
    }
}
