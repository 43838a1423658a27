//! Runs the scripts of `tests/openai_sdk/`, which drive chorus through the
//! official OpenAI Python SDK, and hands their one JSON object back to the
//! Rust test that asserts on it.
//!
//! The interpreter is the one of the virtual environment that
//! `scripts/test.sh` creates with the SDK's pinned versions: `py-venv`
//! under the target directory, which is `$CARGO_TARGET_DIR` when that is
//! set (relative to the package root when relative, as cargo takes it when
//! run from there) and `target/` in the package root otherwise. A missing
//! interpreter fails the test with a message saying to run
//! `scripts/test.sh`; it is never a skip.
//!
//! A script is run as `python SCRIPT BASE_URL API_KEY PARAMS_JSON`, with
//! its standard output and error captured, and bounded by [`SCRIPT_WAIT`]:
//! one that runs longer is killed (by its process id) and fails the test.
//! Proxy variables are removed from its environment so that the SDK talks
//! to the loopback server directly.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long one script may run.
pub const SCRIPT_WAIT: Duration = Duration::from_secs(60);

/// Environment variables through which an HTTP client may be sent through
/// a proxy instead of straight to loopback.
const PROXY_VARS: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];

/// The target directory the virtual environment lives in.
fn target_dir() -> PathBuf {
    let package = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => package.join(dir),
        _ => package.join("target"),
    }
}

/// The virtual environment's interpreter; panics, saying how to create
/// it, when it is not there.
pub fn python() -> PathBuf {
    let python = target_dir().join("py-venv").join("bin").join("python");
    assert!(
        python.exists(),
        "the OpenAI SDK's Python environment is missing: {} does not exist. \
         Run scripts/test.sh, which creates it (tests/openai_sdk/requirements.txt \
         lists what it installs).",
        python.display()
    );
    python
}

/// `tests/openai_sdk/NAME`.
fn script_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_sdk")
        .join(name)
}

/// A script that is running; [`Script::finish`] waits for its result.
/// Dropping it unfinished kills it.
pub struct Script {
    name: String,
    child: Option<Child>,
    stdout: Option<JoinHandle<String>>,
    stderr: Option<JoinHandle<String>>,
    started: Instant,
}

/// Reads all of `pipe` on a thread of its own, so a script never blocks
/// on a full pipe while the test waits for it.
fn drain(pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut pipe = pipe;
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

impl Script {
    /// Starts `tests/openai_sdk/NAME BASE_URL API_KEY PARAMS`.
    pub fn spawn(name: &str, base_url: &str, api_key: &str, params: &Value) -> Script {
        let path = script_path(name);
        assert!(path.exists(), "no script {}", path.display());
        let mut command = Command::new(python());
        command
            .arg(&path)
            .arg(base_url)
            .arg(api_key)
            .arg(params.to_string())
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .env("NO_PROXY", "*")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for var in PROXY_VARS {
            command.env_remove(var);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name} with the SDK's Python: {e}"));
        let stdout = drain(child.stdout.take().expect("piped stdout"));
        let stderr = drain(child.stderr.take().expect("piped stderr"));
        Script {
            name: name.to_owned(),
            child: Some(child),
            stdout: Some(stdout),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    /// Whether the script has exited already (it may have failed early).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|child| !matches!(child.try_wait(), Ok(None)))
    }

    /// Waits for the script to exit, at most until [`SCRIPT_WAIT`] after it
    /// started, and returns the JSON object it printed. Fails the test,
    /// with the script's standard error, when it ran too long, exited with
    /// an error or printed something else.
    pub fn finish(mut self) -> Value {
        let mut child = self.child.take().expect("finished once");
        let status = wait(&mut child, self.started + SCRIPT_WAIT);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = self.stdout.take().map(join).unwrap_or_default();
        let stderr = self.stderr.take().map(join).unwrap_or_default();
        let name = &self.name;
        let Some(status) = status else {
            panic!(
                "{name} ran longer than {SCRIPT_WAIT:?} and was killed\n\
                 stdout:\n{stdout}\nstderr:\n{stderr}"
            );
        };
        assert!(
            status.success(),
            "{name} failed ({status})\nstdout:\n{stdout}\nstderr:\n{stderr}{}",
            hint(&stderr)
        );
        let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
        line.and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| {
                panic!("{name} did not print a JSON object\nstdout:\n{stdout}\nstderr:\n{stderr}")
            })
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a script to its end: [`Script::spawn`] then [`Script::finish`].
pub fn run(name: &str, base_url: &str, api_key: &str, params: &Value) -> Value {
    Script::spawn(name, base_url, api_key, params).finish()
}

fn join(handle: JoinHandle<String>) -> String {
    handle.join().unwrap_or_default()
}

/// Polls for the child's exit until `deadline`.
fn wait(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What to do about a failure that is the environment's, not the server's.
fn hint(stderr: &str) -> &'static str {
    if stderr.contains("ModuleNotFoundError") || stderr.contains("ImportError") {
        "\nThe SDK's Python environment is incomplete: run scripts/test.sh."
    } else {
        ""
    }
}
