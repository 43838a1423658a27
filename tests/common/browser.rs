//! A real headless Chromium, driven over the Chrome DevTools Protocol on a
//! loopback WebSocket, for end-to-end tests of the demo page.
//!
//! Debian's `/usr/bin/chromium` is started with its own throwaway profile
//! and every background service switched off, so the only requests it makes
//! are the page's own; [`Page::requests`] lists them for the "no outside
//! request" check. Nothing here downloads a browser.
//!
//! One [`Browser`] per test: its process is killed (by PID) when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Where Debian installs Chromium (the test command installs it if missing).
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest wait for any browser answer or page condition.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for a new Chromium to announce its DevTools endpoint: it
/// normally takes a second or two, but the test command starts it right
/// after building every test binary, when the disk may still be busy (a
/// run once took over 20 s for two of them).
const STARTUP: Duration = Duration::from_secs(60);

/// A running headless Chromium with one page.
pub struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    /// Events received while waiting for a command's answer.
    events: VecDeque<Value>,
    /// Every URL the page requested, in order.
    requests: Vec<String>,
    /// Uncaught exceptions, `console.error` messages and browser-side
    /// errors (a CSP violation, a failed load) of the page.
    errors: Vec<String>,
    /// `alert`/`confirm`/`prompt` dialogs the page opened.
    dialogs: Vec<String>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium with a `width` × `height` window and opens a blank page.
    pub fn launch(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-default-apps",
                "--metrics-recording-only",
                "--remote-debugging-port=0",
                &format!("--window-size={width},{height}"),
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start /usr/bin/chromium (the test command installs it)");
        // Chromium announces its DevTools endpoint on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent {
                    if let Some(at) = line.find("ws://") {
                        let _ = tx.send(line[at..].trim().to_owned());
                        sent = true;
                    }
                }
            }
        });
        let url = rx
            .recv_timeout(STARTUP)
            .expect("chromium did not announce its DevTools endpoint");
        let authority = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("endpoint authority")
            .to_owned();
        let tcp = TcpStream::connect(&authority).expect("connect to DevTools");
        tcp.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let (ws, _) = tungstenite::client::client(url.as_str(), tcp).expect("DevTools handshake");
        let mut browser = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            events: VecDeque::new(),
            requests: Vec::new(),
            errors: Vec::new(),
            dialogs: Vec::new(),
            _profile: profile,
        };
        let target = browser.call_browser("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("target id").to_owned();
        let attached = browser.call_browser(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().expect("session").to_owned();
        for domain in [
            "Page.enable",
            "Runtime.enable",
            "Network.enable",
            "Log.enable",
        ] {
            browser.call(domain, json!({}));
        }
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}),
        );
        browser
    }

    fn send(&mut self, method: &str, params: Value, session: Option<String>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(session) = session {
            message["sessionId"] = json!(session);
        }
        self.ws
            .send(Message::text(message.to_string()))
            .expect("send to DevTools");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            assert!(
                Instant::now() < deadline,
                "DevTools did not answer {method}"
            );
            let v = self.read_one();
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    panic!("{method} failed: {error}");
                }
                return v["result"].clone();
            }
            self.note(v);
        }
    }

    fn read_one(&mut self) -> Value {
        loop {
            match self.ws.read().expect("read from DevTools") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("DevTools JSON")
                }
                Message::Close(_) => panic!("DevTools closed the connection"),
                _ => {}
            }
        }
    }

    /// Records what the page did from an event; keeps the event for waits.
    fn note(&mut self, v: Value) {
        match v["method"].as_str() {
            Some("Network.requestWillBeSent") => {
                if let Some(url) = v["params"]["request"]["url"].as_str() {
                    self.requests.push(url.to_owned());
                }
            }
            Some("Network.webSocketCreated") => {
                if let Some(url) = v["params"]["url"].as_str() {
                    self.requests.push(url.to_owned());
                }
            }
            Some("Runtime.exceptionThrown") => {
                self.errors
                    .push(v["params"]["exceptionDetails"].to_string());
            }
            Some("Runtime.consoleAPICalled") if v["params"]["type"] == "error" => {
                self.errors.push(v["params"]["args"].to_string());
            }
            // Browser-side errors: blocked by the CSP, failed loads.
            Some("Log.entryAdded") if v["params"]["entry"]["level"] == "error" => {
                self.errors.push(v["params"]["entry"]["text"].to_string());
            }
            Some("Page.javascriptDialogOpening") => {
                self.dialogs
                    .push(v["params"]["message"].as_str().unwrap_or("").to_owned());
            }
            _ => {}
        }
        self.events.push_back(v);
        if self.events.len() > 1000 {
            self.events.pop_front();
        }
    }

    fn call_browser(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A DevTools command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(session))
    }

    /// Loads `url` and waits until the document is complete.
    pub fn goto(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
        self.wait_for("document.readyState === 'complete'");
    }

    /// Reloads the page and waits until the document is complete.
    pub fn reload(&mut self) {
        self.call("Page.reload", json!({}));
        std::thread::sleep(Duration::from_millis(100));
        self.wait_for("document.readyState === 'complete'");
    }

    /// Evaluates `expression` in the page (promises are awaited) and returns
    /// its value; a thrown exception fails the test.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
        );
        if let Some(details) = result.get("exceptionDetails") {
            panic!("{expression} threw: {details}");
        }
        result["result"]["value"].clone()
    }

    /// Polls `condition` (a JavaScript expression) until it is truthy and
    /// returns its value; fails the test after a while.
    pub fn wait_for(&mut self, condition: &str) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let v = self.eval(&format!(
                "(() => {{ try {{ return {condition}; }} catch (e) {{ return null; }} }})()"
            ));
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {condition}\npage errors: {:?}",
                self.errors
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Types `text` into the focused element the way a keyboard would.
    pub fn type_text(&mut self, selector: &str, text: &str) {
        self.eval(&format!(
            "document.querySelector({}).focus()",
            json!(selector)
        ));
        self.call("Input.insertText", json!({"text": text}));
    }

    /// Presses a key (e.g. `Enter`) on the focused element.
    pub fn press(&mut self, key: &str, code: u32) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": key, "code": key, "windowsVirtualKeyCode": code}),
            );
        }
    }

    /// Clicks the first element matching `selector`.
    pub fn click(&mut self, selector: &str) {
        self.wait_for(&format!("document.querySelector({})", json!(selector)));
        self.eval(&format!(
            "document.querySelector({}).click()",
            json!(selector)
        ));
    }

    /// Saves a PNG of the page under `target/browser-screenshots/`.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-screenshots");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, bytes).expect("write screenshot");
        path
    }

    /// Every URL requested so far (events read up to now).
    pub fn requests(&mut self) -> Vec<String> {
        self.drain_events();
        self.requests.clone()
    }

    /// Uncaught exceptions and console errors so far.
    pub fn errors(&mut self) -> Vec<String> {
        self.drain_events();
        self.errors.clone()
    }

    /// Dialogs (`alert` and friends) the page opened so far.
    pub fn dialogs(&mut self) -> Vec<String> {
        self.drain_events();
        self.dialogs.clone()
    }

    /// Reads events that arrived without a command waiting for them.
    fn drain_events(&mut self) {
        // A harmless round trip flushes everything sent before its answer.
        self.call("Runtime.evaluate", json!({"expression": "0"}));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
