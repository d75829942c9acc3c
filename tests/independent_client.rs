//! Proves that resq-push interoperates with a WebSocket client it shares no code with.
//!
//! `tests/python/independent_client.py` drives the built binary with Python's `websockets`
//! library (not tungstenite): the welcome frame, answering the server's pings while idle,
//! publishing over the Unix socket and HTTP with byte-for-byte delivery, `ping` texts, acks,
//! `?since=` replay with the status of what it had, a client-side close, and close code 1001
//! plus a clean exit on SIGTERM. A bug that both halves of the Rust stack would agree on shows
//! up here.
//!
//! Needs `python3` with `websockets`: `bash scripts/test` puts it in a virtual environment first
//! (or `pip install -r tests/python/requirements.txt`). Without
//! them the test fails rather than skips, so a missing dependency cannot pass unnoticed.

use std::path::Path;
use std::process::{Command, Output};

fn shown(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn require_python_websockets(root: &Path) {
    let probe = Command::new("python3").args(["-c", "import websockets"]).current_dir(root).output();
    match probe {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "python3 cannot import websockets; run `pip install -r tests/python/requirements.txt`\n{}",
            shown(&output)
        ),
        Err(error) => panic!(
            "cannot run python3 ({error}); install Python 3 and run \
             `pip install -r tests/python/requirements.txt`"
        ),
    }
}

#[test]
fn python_websockets_client_passes_every_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    require_python_websockets(root);
    let output = Command::new("python3")
        .arg(root.join("tests/python/independent_client.py"))
        .arg(env!("CARGO_BIN_EXE_resq-push"))
        .current_dir(root)
        .output()
        .expect("cannot run python3");
    assert!(output.status.success(), "the independent client failed:\n{}", shown(&output));
    println!("{}", shown(&output));
}
