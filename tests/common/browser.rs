//! Driving headless Chromium from a test: a node script under `tests/browser` (Playwright,
//! `playwright-core` pinned by its package-lock.json, with Debian's `/usr/bin/chromium` or
//! `RESQ_CHROMIUM`) reads one JSON command per line on stdin and answers one JSON line each on
//! stdout (`{"ok":true,"state":...}` or `{"ok":false,"error":...}`); its first line, unasked,
//! says the browser is ready. Without node, the npm packages or Chromium the tests fail with a
//! message saying so: they never skip.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::PATIENCE;

/// The longest any command may take to be answered (a wait for a reconnect included).
const ANSWER_PATIENCE: Duration = Duration::from_secs(60);

/// One node script driving one headless Chromium.
pub struct Browser {
    child: Child,
    stdin: Option<ChildStdin>,
    answers: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    script: String,
}

impl Browser {
    /// Runs `tests/browser/<script>` with `args`, then Chromium's path.
    pub fn launch(script: &str, args: &[&OsStr]) -> Browser {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let chromium = std::env::var_os("RESQ_CHROMIUM")
            .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
        assert!(
            chromium.exists(),
            "Chromium is missing at {}: `apt-get install chromium` (.ci/run does), or set RESQ_CHROMIUM",
            chromium.display()
        );
        let scripts = root.join("tests/browser");
        assert!(
            scripts.join("node_modules/playwright-core/package.json").exists(),
            "playwright-core is not installed in {}: run `npm ci` there (bash scripts/test does)",
            scripts.display()
        );
        let mut child = Command::new("node")
            .arg(scripts.join(script))
            .args(args)
            .arg(&chromium)
            .current_dir(&scripts)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot run node ({error}): install Node.js 20 or later"));
        let (sender, answers) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut chunk = [0; 4096];
            while let Ok(read @ 1..) = pipe.read(&mut chunk) {
                sink.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
        });
        let stdin = child.stdin.take();
        let mut browser = Browser { child, stdin, answers, stderr, script: script.to_owned() };
        let ready = browser.answer();
        assert_eq!(ready["ready"], true, "{ready}");
        browser
    }

    /// What the script has written to stderr so far (a copy: no lock is held while panicking).
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn answer(&mut self) -> Value {
        match self.answers.recv_timeout(ANSWER_PATIENCE) {
            Ok(line) => serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")),
            Err(error) => {
                let status = self.child.try_wait().unwrap();
                panic!(
                    "no answer from {} ({error}; exit status {status:?}); its stderr:\n{}",
                    self.script,
                    self.stderr()
                )
            }
        }
    }

    /// Sends one command and returns the page's state; fails the test on an error answer.
    pub fn call(&mut self, command: Value) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let answer = self.answer();
        if answer["ok"] != true {
            panic!(
                "{command} failed: {}\npage state: {:#}\n{}'s stderr:\n{}",
                answer["error"],
                answer["state"],
                self.script,
                self.stderr()
            );
        }
        answer["state"].clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // End of input: the script closes Chromium and exits. Killing node would orphan it.
        drop(self.stdin.take());
        let deadline = Instant::now() + PATIENCE;
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                super::signal(self.child.id(), "TERM"); // Playwright closes the browser on SIGTERM
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Shown with the output of a failed test: each command and how long it took.
        eprintln!("{}'s stderr:\n{}", self.script, self.stderr());
    }
}
