//! The `resq-push` binary: parse flags, bind the sockets, serve until SIGTERM or SIGINT.

use std::net::TcpListener;
use std::process::ExitCode;

use async_signal::{Signal, Signals};
use log::{error, info, warn};
use resq_push::config::Config;
use resq_push::{logger, server, unix_ingest};
use smol::stream::StreamExt;

fn main() -> ExitCode {
    let config: Config = argh::from_env();
    logger::init();
    if let Err(message) = config.validate() {
        error!("invalid configuration: {message}");
        return ExitCode::from(2);
    }
    match start(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            error!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn start(config: Config) -> Result<(), String> {
    let mut signals = Signals::new([Signal::Term, Signal::Int])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let tcp =
        TcpListener::bind(config.listen).map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local_addr = tcp.local_addr().map_err(|e| e.to_string())?;
    let unix = config.unix_socket.as_deref().map(unix_ingest::bind).transpose().map_err(|e| e.to_string())?;

    info!(
        "resq-push {} listening on {local_addr} (ws://{local_addr}/ws/emergencias){}",
        env!("CARGO_PKG_VERSION"),
        unix.as_ref().map(|u| format!(", Unix socket {}", u.path().display())).unwrap_or_default()
    );
    info!(
        "ping every {:?}, pong timeout {:?}, history {} emergencies, queue {} per client, at most {} clients",
        config.ping_interval, config.pong_timeout, config.history, config.queue, config.max_clients
    );
    if !local_addr.ip().is_loopback() {
        warn!(
            "listening on {} without access control: anyone on the network can read and publish",
            local_addr.ip()
        );
    }
    let shutdown = async move {
        if let Some(Ok(signal)) = signals.next().await {
            info!("received {signal:?}");
        }
    };
    server::serve(config, tcp, unix, shutdown).map_err(|e| e.to_string())
}
