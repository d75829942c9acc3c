//! The `--help` text: a short usage line, then argh's own entry for each flag under a heading.
//!
//! argh would print every flag on one usage line of some 800 columns, and the flags in the order
//! of `Config`'s fields; a technician reading it on a board's console needs them grouped.

/// The headings of `--help`, each with its flags in the order shown.
const SECTIONS: &[(&str, &[&str])] = &[
    ("Network", &["--listen", "--listen-backlog", "--unix-socket"]),
    ("TLS", &["--tls-listen", "--tls-cert", "--tls-key", "--ca-cert"]),
    ("Access", &["--subscribe-token-file", "--publish-token-file", "--allowed-origin", "--trusted-proxy"]),
    ("History", &["--data-dir", "--in-memory", "--history", "--history-max-age", "--history-bytes"]),
    (
        "Time limits",
        &["--ping-interval", "--pong-timeout", "--header-timeout", "--min-body-rate", "--write-timeout"],
    ),
    (
        "Limits",
        &[
            "--queue",
            "--max-clients",
            "--max-http-connections",
            "--max-unix-connections",
            "--max-body-bytes",
            "--max-inflight-bytes",
            "--max-poll-bytes",
            "--max-head-bytes",
            "--http-pipeline",
            "--max-client-message-bytes",
            "--client-send-buffer",
            "--status-queue",
            "--max-open",
            "--max-open-bytes",
            "--max-unnamed-receipts",
        ],
    ),
    (
        "Acks and escalation",
        &[
            "--ack-timeout",
            "--on-unacked",
            "--max-escalation-children",
            "--escalation-time-limit",
            "--min-subscribers",
        ],
    ),
    (
        "Cluster (NATS JetStream)",
        &[
            "--nats",
            "--nats-stream",
            "--nats-replicas",
            "--nats-token",
            "--nats-user",
            "--nats-password-file",
            "--nats-creds",
            "--nats-ca-cert",
            "--nats-timeout",
            "--nats-queue",
            "--box-name",
        ],
    ),
    ("Other", &["--version", "--help"]),
];

const INTRO: &str = "\
resq-push: WebSocket push server for emergency dispatch sites. Tablets connect to
/ws/emergencias; local apps publish over a Unix socket or POST /emergencias.
Durations are in seconds, fractions allowed.
";

const LOGGING: &str = "
Logging:
  RUST_LOG          which log lines reach stderr: info (the default), debug, or per
                    module, like warn,resq_push::ws::session=debug

Exit codes: 0 stopped on SIGTERM or SIGINT; 1 could not start (a socket, a token file,
a TLS certificate or key, the data dir: the log says which); 2 an invalid flag (the
message names it).
";

/// Lays out argh's help text (`argh_help`) under `SECTIONS`.
pub fn readable(argh_help: &str) -> String {
    let entries = flag_entries(argh_help);
    if entries.is_empty() {
        // argh changed its layout: its own text is long but complete.
        return argh_help.to_owned();
    }
    let mut text = format!("Usage: resq-push [options]\n\n{INTRO}");
    for (heading, flags) in SECTIONS {
        text.push_str(&format!("\n{heading}:\n"));
        for flag in *flags {
            if let Some((_, entry)) = entries.iter().find(|(name, _)| name == flag) {
                text.push_str(entry);
            }
        }
    }
    let ungrouped: Vec<&(String, String)> = entries.iter().filter(|(name, _)| !in_a_section(name)).collect();
    if !ungrouped.is_empty() {
        text.push_str("\nMore:\n");
        ungrouped.iter().for_each(|(_, entry)| text.push_str(entry));
    }
    text.push_str(LOGGING);
    text
}

fn in_a_section(flag: &str) -> bool {
    SECTIONS.iter().any(|(_, flags)| flags.contains(&flag))
}

/// argh's entries under `Options:`, each with its flag: an entry starts with a line `  --flag`
/// and goes on with the more indented lines that wrap its description.
fn flag_entries(argh_help: &str) -> Vec<(String, String)> {
    let Some((_, options)) = argh_help.split_once("\nOptions:\n") else { return Vec::new() };
    let mut entries: Vec<(String, String)> = Vec::new();
    for line in options.lines().filter(|line| !line.trim().is_empty()) {
        if line.starts_with("  -") {
            let flag = line.trim_start().split([' ', ',']).next().unwrap_or_default();
            entries.push((flag.to_owned(), String::new()));
        }
        if let Some((_, entry)) = entries.last_mut() {
            entry.push_str(line);
            entry.push('\n');
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use argh::FromArgs;

    use super::*;
    use crate::config::Config;

    fn argh_help() -> String {
        Config::from_args(&["resq-push"], &["--help"]).map(|_| ()).unwrap_err().output
    }

    #[test]
    fn every_flag_is_under_a_heading_and_every_heading_names_real_flags() {
        let entries = flag_entries(&argh_help());
        assert!(entries.len() > 20, "{entries:?}");
        let ungrouped: Vec<&String> =
            entries.iter().map(|(flag, _)| flag).filter(|f| !in_a_section(f)).collect();
        assert!(ungrouped.is_empty(), "add these to SECTIONS: {ungrouped:?}");
        for flag in SECTIONS.iter().flat_map(|(_, flags)| *flags) {
            assert!(entries.iter().any(|(name, _)| name == flag), "{flag} is not a flag");
        }
    }

    #[test]
    fn the_help_fits_a_terminal() {
        let help = readable(&argh_help());
        assert!(help.starts_with("Usage: resq-push [options]\n\n"), "{help}");
        let widest = help.lines().map(|line| line.chars().count()).max().unwrap_or(0);
        assert!(widest <= 90, "a line of {widest} columns:\n{help}");
        assert!(help.contains("\nNetwork:\n  --listen "), "{help}");
    }

    #[test]
    fn an_unexpected_layout_falls_back_to_arghs_text() {
        assert_eq!(readable("Usage: x [--y]\n"), "Usage: x [--y]\n");
    }
}
