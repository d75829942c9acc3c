//! The `resq-push` binary: parse flags, bind the sockets, serve until SIGTERM or SIGINT.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::ExitCode;

use async_signal::{Signal, Signals};
use log::{info, warn};
use resq_push::{
    Access, CertificateFiles, CommandLine, Config, Control, Credentials, EngineSettings, Follow, Retention,
    ServerCertificate, Storage, StreamSettings, TlsListener,
};
use smol::stream::StreamExt;
use socket2::{Domain, Protocol, Socket, Type};

/// The exit code of a command line the server refuses: a flag to fix, not a failure to retry.
const EXIT_INVALID_FLAGS: u8 = 2;

fn main() -> ExitCode {
    let config = match command_line() {
        CommandLine::Serve(config) => *config,
        CommandLine::Print(text) => {
            // `resq-push --help | head` closes stdout early; that is no error.
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            return ExitCode::SUCCESS;
        }
        CommandLine::Invalid(message) => {
            resq_push::init_logging();
            resq_push::error_past_filter(&format!("invalid configuration: {message}"));
            return ExitCode::from(EXIT_INVALID_FLAGS);
        }
    };
    resq_push::init_logging();
    match start(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            resq_push::error_past_filter(&message);
            ExitCode::FAILURE
        }
    }
}

/// Parses the process's arguments; one that is not UTF-8 is an invalid flag like any other.
fn command_line() -> CommandLine {
    let mut args = Vec::new();
    for arg in std::env::args_os().skip(1) {
        match arg.into_string() {
            Ok(arg) => args.push(arg),
            Err(arg) => {
                return CommandLine::Invalid(format!("{} is not valid UTF-8", arg.to_string_lossy()));
            }
        }
    }
    CommandLine::parse(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn start(config: Config) -> Result<(), String> {
    let access = Access::load(
        config.publish_token_file.as_deref(),
        config.subscribe_token_file.as_deref(),
        &config.allowed_origin,
    )?;
    let certificate = load_certificate(&config)?;
    check_ca_cert(&config)?;
    let signals = Signals::new([Signal::Term, Signal::Int, Signal::Hup])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let tcp = listen(config.listen, config.listen_backlog)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    let local_addr = tcp.local_addr().map_err(|e| e.to_string())?;
    let tls = match (config.tls_listen, certificate) {
        (Some(addr), Some(certificate)) => {
            let listener = listen(addr, config.listen_backlog)
                .map_err(|e| format!("cannot listen on {addr} (--tls-listen): {e}"))?;
            Some(TlsListener { listener, certificate })
        }
        _ => None,
    };
    let tls_addr =
        tls.as_ref().map(|tls| tls.listener.local_addr()).transpose().map_err(|e| e.to_string())?;
    let unix = config
        .unix_socket
        .as_deref()
        .map(resq_push::bind_unix_socket)
        .transpose()
        .map_err(|e| e.to_string())?;
    let storage = open_storage(&config)?;

    info!(
        "resq-push {} listening on {local_addr} (ws://{local_addr}/ws/emergencias){}{}",
        env!("CARGO_PKG_VERSION"),
        tls_addr.map(|addr| format!(", TLS on {addr} (wss://{addr}/ws/emergencias)")).unwrap_or_default(),
        unix.as_ref().map(|u| format!(", Unix socket {}", u.path().display())).unwrap_or_default()
    );
    if let Some(tls) = &tls {
        info!("TLS certificate {}", tls.certificate.describe());
    }
    info!(
        "ping every {:?}, pong timeout {:?}, history {} emergencies, queue {} per client, at most {} clients",
        config.ping_interval, config.pong_timeout, config.history, config.queue, config.max_clients
    );
    warn_if_open(&config, &access, local_addr);
    if tls_addr.is_some() && !local_addr.ip().is_loopback() {
        info!(
            "the plain listener {local_addr} is reachable from the network: tokens and emergencies cross it \
             in clear (--listen 127.0.0.1:PORT keeps it to local apps)"
        );
    }
    let controls = signals.filter_map(|signal| match signal {
        Ok(Signal::Hup) => Some(Control::Reload),
        Ok(signal) => {
            info!("received {signal:?}");
            Some(Control::Shutdown)
        }
        Err(_) => None,
    });
    resq_push::serve(config, access, storage, tcp, tls, unix, controls).map_err(|e| e.to_string())
}

/// Reads and checks `--tls-cert` and `--tls-key`, when `--tls-listen` is given.
fn load_certificate(config: &Config) -> Result<Option<ServerCertificate>, String> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else { return Ok(None) };
    ServerCertificate::load(CertificateFiles { cert: cert.clone(), key: key.clone() }).map(Some)
}

/// Checks at start that `--ca-cert` can be served: a readable PEM certificate.
fn check_ca_cert(config: &Config) -> Result<(), String> {
    let Some(path) = &config.ca_cert else { return Ok(()) };
    resq_push::read_ca_cert(path).map(|_| ())
}

/// Opens the durable history in `--data-dir`, or says plainly that there is none.
fn open_storage(config: &Config) -> Result<Storage, String> {
    if config.in_memory {
        warn!("--in-memory: the history is NOT durable; emergencies not yet seen are lost at restart");
        return Ok(Storage::Memory);
    }
    let retention =
        Retention { max_count: config.history, max_age: config.history_max_age, max_open: config.max_open };
    let (engine, identity) = match engine_settings(config)? {
        Some(settings) => {
            let (engine, identity) = resq_push::start_engine(settings)?;
            (Some(Box::new(engine)), identity)
        }
        None => (None, None),
    };
    let (journal, loaded, committed) =
        resq_push::open_journal(&config.data_dir, retention, identity.as_deref())?;
    let what = if engine.is_some() { "cache of the cluster's history" } else { "history" };
    info!(
        "{what} {} in {}: last seq {}, {} emergencies retained",
        loaded.stream_id,
        config.data_dir.display(),
        loaded.last_seq,
        loaded.retained.len()
    );
    if let Some(engine) = &engine {
        let follow = Follow {
            cacher: journal.cacher(engine),
            stream_id: loaded.stream_id.clone(),
            last_seq: loaded.last_seq,
        };
        engine.follow(follow);
    }
    Ok(Storage::Durable { journal, loaded, committed, engine })
}

/// Cluster mode's settings, with the NATS secrets read from their files; `None` without `--nats`.
fn engine_settings(config: &Config) -> Result<Option<EngineSettings>, String> {
    // Without the feature `Config::validate` refused `--nats` already; the compiler sees it here.
    let Some(urls) = config.nats.as_ref().filter(|_| cfg!(feature = "cluster")) else { return Ok(None) };
    let secret = |flag: &str, path: &std::path::Path| {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
        match text.trim() {
            "" => Err(format!("{flag} {}: the file is empty", path.display())),
            secret => Ok(secret.to_owned()),
        }
    };
    let credentials =
        match (&config.nats_token, &config.nats_user, &config.nats_password_file, &config.nats_creds) {
            (Some(token), ..) => Credentials::Token(secret("--nats-token", token)?),
            (_, Some(user), Some(password), _) => Credentials::UserPassword {
                user: user.clone(),
                password: secret("--nats-password-file", password)?,
            },
            (.., Some(creds)) => Credentials::CredsFile(creds.clone()),
            _ => Credentials::None,
        };
    let box_name = config.box_name.clone().unwrap_or_else(host_name);
    info!("cluster mode: box {box_name}, NATS {}, stream {}", urls.0.join(","), config.nats_stream);
    Ok(Some(EngineSettings {
        urls: urls.0.clone(),
        stream: StreamSettings {
            name: config.nats_stream.clone(),
            replicas: config.nats_replicas,
            max_messages: config.history,
            max_age: config.history_max_age,
        },
        credentials,
        ca_cert: config.nats_ca_cert.clone(),
        timeout: config.nats_timeout,
        queue: config.nats_queue,
        box_name,
    }))
}

/// The host's name, for `--box-name`'s default.
fn host_name() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    match name.trim() {
        "" => "resq-push".to_owned(),
        name => name.to_owned(),
    }
}

/// Binds the TCP listener with a listen backlog of our choosing (std's is fixed at 128).
fn listen(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(socket.into())
}

/// Warns at start when the server can be reached from the network without tokens.
fn warn_if_open(config: &Config, access: &Access, local_addr: SocketAddr) {
    let addresses = [Some(local_addr), config.tls_listen];
    let Some(exposed) = addresses.into_iter().flatten().map(|addr| addr.ip()).find(|ip| !ip.is_loopback())
    else {
        return;
    };
    if access.subscribe.is_none() {
        warn!(
            "listening on {exposed} without --subscribe-token-file: anyone on the network can read the emergencies"
        );
    }
    if access.publish.is_none() {
        warn!(
            "listening on {exposed} without --publish-token-file: anyone on the network can publish over HTTP"
        );
    }
    if config.allowed_origin.is_empty() {
        info!("no --allowed-origin: pages from any origin may open WebSockets (tokens still apply)");
    }
}
