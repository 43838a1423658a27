//! The demo page end to end in a real headless Chromium (Debian's
//! `/usr/bin/chromium`) against the real server. Every test saves a
//! screenshot under `target/browser-screenshots/`.

mod common;

use common::browser::Browser;
use common::Server;
use serde_json::json;

/// A simulated model slow enough to watch: 30 tokens, 60 ms apart.
const SLOW: &str = r#"
[llm.simulated]
first_token_ms = 300
token_interval_ms = 60
tokens = 30
"#;

/// Opens the page on `server` and waits for its WebSocket.
fn open(server: &Server, width: u32, height: u32) -> Browser {
    let mut b = Browser::launch(width, height);
    b.goto(&format!("http://{}/", server.addr));
    b.wait_for("document.querySelector('#connection')?.dataset.state === 'open'");
    b
}

/// Types `text` into the composer and presses Enter.
fn send(b: &mut Browser, text: &str) {
    b.type_text("#composer", text);
    b.press("Enter", 13);
}

/// Loads `url` with the page's scripts switched off: the page as its HTML
/// and CSS alone lay it out, which is what the first paint shows.
fn load_without_scripts(b: &mut Browser, url: &str) {
    b.call(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": true}),
    );
    b.goto(url);
    b.call(
        "Emulation.setScriptExecutionDisabled",
        json!({"value": false}),
    );
    assert_eq!(b.eval("typeof window.chorusDebug"), json!("undefined"));
}

/// Whether the pipeline view is open, by what is drawn (not by the script).
const PIPELINE_SHOWN: &str =
    "getComputedStyle(document.querySelector('#pipeline')).display !== 'none'";

/// Opens or closes the pipeline view with its toggle, whatever its state.
fn set_pipeline(b: &mut Browser, open: bool) {
    if b.eval(PIPELINE_SHOWN) != json!(open) {
        b.click("#toggle-pipeline");
    }
    b.wait_for(&format!("({PIPELINE_SHOWN}) === {open}"));
    assert_eq!(
        b.eval("document.querySelector('#toggle-pipeline').getAttribute('aria-expanded')"),
        json!(open.to_string())
    );
}

/// Where the element matching `selector` is drawn: `shown` is true when all
/// of its box is inside the viewport, it is not hidden by CSS, and it is
/// what a click at its centre would reach (nothing covers it).
fn on_screen(b: &mut Browser, selector: &str) -> serde_json::Value {
    b.eval(&format!(
        r#"(() => {{
            const e = document.querySelector({selector});
            const r = e.getBoundingClientRect();
            const style = getComputedStyle(e);
            const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            const inside = r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0
                && r.right <= innerWidth && r.bottom <= innerHeight;
            return {{
                shown: inside && style.visibility === 'visible' && e.contains(hit),
                rect: [r.left, r.top, r.right, r.bottom],
                viewport: [innerWidth, innerHeight],
                visibility: style.visibility,
                hit: hit?.id || hit?.tagName || null,
            }};
        }})()"#,
        selector = json!(selector)
    ))
}

/// Text of the last assistant answer.
const LAST_ANSWER: &str =
    "[...document.querySelectorAll('#messages .msg.assistant')].pop()?.querySelector('.msg-text')?.textContent ?? ''";
/// State of the last assistant answer.
const LAST_STATE: &str =
    "[...document.querySelectorAll('#messages .msg.assistant')].pop()?.dataset.state ?? ''";

#[test]
fn the_page_loads_with_no_outside_request_at_both_widths() {
    let server = Server::start(SLOW);
    for (width, height) in [(1440, 900), (375, 800)] {
        let mut b = open(&server, width, height);
        let requests = b.requests();
        assert!(
            requests.iter().any(|u| u.ends_with("/ws")),
            "the page's WebSocket is missing from {requests:?}"
        );
        let origin = format!("http://{}", server.addr);
        let ws_origin = format!("ws://{}", server.addr);
        for url in b.requests() {
            assert!(
                url.starts_with(&origin)
                    || url.starts_with(&ws_origin)
                    || url.starts_with("data:")
                    || url.starts_with("about:"),
                "the page requested {url}"
            );
        }
        assert!(b.errors().is_empty(), "page errors: {:?}", b.errors());
        // Every control has a name a screen reader can read.
        let unlabelled = b.eval(
            "[...document.querySelectorAll('button, input, textarea, select')]\
             .filter(e => !(e.getAttribute('aria-label') || e.labels?.length || e.textContent.trim() || e.title))\
             .map(e => e.outerHTML.slice(0, 80))",
        );
        assert_eq!(unlabelled, json!([]), "unlabelled controls");
        b.screenshot(&format!("page-{width}"));
    }
}

#[test]
fn an_answer_streams_in_token_by_token() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    send(&mut b, "Hello, who are you?");
    b.wait_for(&format!("({LAST_ANSWER}).length > 0"));
    // Sample the growing text: several distinct lengths before the end.
    let mut lengths = std::collections::BTreeSet::new();
    while b.eval(LAST_STATE) != json!("done") {
        lengths.insert(
            b.eval(&format!("({LAST_ANSWER}).length"))
                .as_u64()
                .unwrap_or(0),
        );
        std::thread::sleep(std::time::Duration::from_millis(40));
    }
    assert!(lengths.len() >= 4, "the answer did not stream: {lengths:?}");
    assert_eq!(
        b.eval("document.querySelector('#messages .msg.assistant .badge-role').textContent.trim()"),
        json!("leader")
    );
    let timings = b.eval("document.querySelector('#messages .msg.assistant .timings').textContent");
    assert!(timings.as_str().unwrap_or("").contains("ms"), "{timings}");
    assert_eq!(
        b.eval("document.querySelector('#messages .msg.user').textContent.includes('Hello, who are you?')"),
        json!(true)
    );
    b.screenshot("streamed-answer");
}

#[test]
fn stop_cancels_the_running_answer() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    send(&mut b, "Tell me a long story");
    b.wait_for(&format!("({LAST_ANSWER}).length > 10"));
    b.click("#messages .msg.assistant .btn-stop");
    b.wait_for(&format!("({LAST_STATE}) === 'cancelled'"));
    let stopped = b.eval(&format!("({LAST_ANSWER}).length")).as_u64().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        b.eval(&format!("({LAST_ANSWER}).length")).as_u64().unwrap(),
        stopped,
        "text kept coming after Stop"
    );
    b.screenshot("stopped-answer");
}

#[test]
fn regenerate_asks_again_with_a_fresh_generation() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    send(&mut b, "Give me an idea");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let calls_before = server.stats()["upstream"]["calls"].as_u64().unwrap();
    b.click("#messages .msg.assistant .btn-regenerate");
    b.wait_for("document.querySelectorAll('#messages .msg.assistant').length === 2");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    // Fresh: a new generation, not the cache.
    assert_eq!(
        b.eval("[...document.querySelectorAll('#messages .msg.assistant .badge-role')].pop().textContent.trim()"),
        json!("leader")
    );
    assert_eq!(
        server.stats()["upstream"]["calls"].as_u64().unwrap(),
        calls_before + 1
    );
    b.screenshot("regenerated-answer");
}

#[test]
fn markup_in_messages_is_shown_as_text() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    let attack = "<img src=x onerror=alert(1)> <script>alert(2)</script>";
    send(&mut b, attack);
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    assert_eq!(
        b.eval("document.querySelector('#messages .msg.user').textContent.includes('<img src=x onerror=alert(1)>')"),
        json!(true)
    );
    assert_eq!(
        b.eval("document.querySelectorAll('#messages img, #messages script').length"),
        json!(0)
    );
    assert!(b.dialogs().is_empty(), "a dialog opened: {:?}", b.dialogs());
    b.screenshot("markup-as-text");
}

#[test]
fn a_reload_restores_the_conversation_from_history() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    send(&mut b, "Remember this conversation");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let answer = b.eval(LAST_ANSWER);
    b.reload();
    b.wait_for("document.querySelector('#connection')?.dataset.state === 'open'");
    b.wait_for("document.querySelectorAll('#conversations li[data-conversation]').length === 1");
    b.click("#conversations li[data-conversation]");
    b.wait_for(&format!("({LAST_ANSWER}).length > 0"));
    assert_eq!(b.eval(LAST_ANSWER), answer);
    assert_eq!(
        b.eval("document.querySelector('#messages .msg.user').textContent.includes('Remember this conversation')"),
        json!(true)
    );
    b.screenshot("restored-conversation");
}

#[test]
fn a_dropped_connection_resumes_the_answer_without_gaps() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    let question = "Tell me about resuming streams";
    send(&mut b, question);
    b.wait_for(&format!("({LAST_ANSWER}).length > 15"));
    b.eval("window.chorusDebug.dropConnection()");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let shown = b.eval(LAST_ANSWER);
    // The same first question in a new conversation is answered from the
    // cache with the very same text: that is what the page must show.
    let mut c = server.client();
    let reference = c.ask_and_wait(None, question);
    assert_eq!(reference.role.as_deref(), Some("cache"));
    assert_eq!(shown, json!(reference.text));
    assert_eq!(
        b.eval("document.querySelector('#connection').dataset.state"),
        json!("open")
    );
    b.screenshot("resumed-answer");
}

#[test]
fn the_crowd_control_shows_singleflight_at_work() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    // A conversation on screen, for the screenshot the README shows.
    send(&mut b, "Please calculate (2+3)*4");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    set_pipeline(&mut b, true);
    b.eval("document.querySelector('#crowd-n').value = '12'");
    b.type_text("#composer", "What do crowds teach us?");
    let calls_before = server.stats()["upstream"]["calls"].as_u64().unwrap();
    b.click("#crowd-go");
    let summary = b.wait_for("document.querySelector('#crowd-result')?.textContent.match(/follower/) && document.querySelector('#crowd-result').textContent");
    let summary = summary.as_str().unwrap_or_default().to_owned();
    assert!(summary.contains("1 leader"), "{summary}");
    assert!(summary.contains("11 followers"), "{summary}");
    let stats = server.stats();
    assert_eq!(
        stats["upstream"]["calls"].as_u64().unwrap(),
        calls_before + 1
    );
    b.screenshot("crowd");
}

#[test]
fn the_pipeline_view_starts_open_on_wide_screens_and_closed_on_phones() {
    let server = Server::start(SLOW);
    let url = format!("http://{}/", server.addr);
    let expanded = "document.querySelector('#toggle-pipeline').getAttribute('aria-expanded')";

    // Wide: open from the first paint. With scripts off the page is laid
    // out by its CSS alone, and the Crowd control is already where it ends
    // up once the page's modules have run.
    let mut b = Browser::launch(1400, 900);
    load_without_scripts(&mut b, &url);
    assert_eq!(b.eval(PIPELINE_SHOWN), json!(true), "closed at first paint");
    let first_paint = on_screen(&mut b, "#crowd-go");
    b.goto(&url);
    b.wait_for("document.querySelector('#connection')?.dataset.state === 'open'");
    assert_eq!(b.eval(PIPELINE_SHOWN), json!(true));
    assert_eq!(b.eval(expanded), json!("true"));
    for selector in ["#crowd-n", "#crowd-go"] {
        let place = on_screen(&mut b, selector);
        assert_eq!(
            place["shown"],
            json!(true),
            "{selector} at 1400×900: {place}"
        );
    }
    assert_eq!(
        on_screen(&mut b, "#crowd-go")["rect"],
        first_paint["rect"],
        "the Crowd control moved after the first paint"
    );
    // Nothing moved on load: no layout shift but the connection badge's,
    // which narrows when "Connecting…" becomes "Connected".
    let shifted = b.eval(
        r#"new Promise(done => {
            const moved = [];
            new PerformanceObserver(list => {
                for (const shift of list.getEntries())
                    for (const s of shift.sources)
                        if (s.node && !document.querySelector('#connection').contains(s.node))
                            moved.push(s.node.id || s.node.className || s.node.nodeName);
            }).observe({type: 'layout-shift', buffered: true});
            setTimeout(() => done(moved), 200);
        })"#,
    );
    assert_eq!(shifted, json!([]), "moved on load");
    // It is live, and the conversation keeps a usable width beside it.
    b.wait_for("document.querySelector('#pipeline-updated').textContent.startsWith('live')");
    let main = b.eval("document.querySelector('.main').getBoundingClientRect().width");
    assert!(
        main.as_f64().unwrap_or(0.0) >= 540.0,
        "main column {main} px"
    );
    b.screenshot("pipeline-wide");

    // Until the user chooses, the default follows the window across the
    // breakpoint (the script's query and the CSS agree at 1199 and 1200)...
    let resize = |b: &mut Browser, width: u32| {
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        b.wait_for(&format!("innerWidth === {width}"));
        // One frame, for the media query listeners.
        b.eval("new Promise(r => requestAnimationFrame(() => setTimeout(r)))");
    };
    for (width, open) in [(1199, false), (1200, true), (1199, false), (1400, true)] {
        resize(&mut b, width);
        assert_eq!(b.eval(PIPELINE_SHOWN), json!(open), "at {width} px");
        assert_eq!(b.eval(expanded), json!(open.to_string()), "at {width} px");
    }
    // ...and once they close it, it stays closed when the window changes.
    set_pipeline(&mut b, false);
    for width in [1100, 1400] {
        resize(&mut b, width);
        assert_eq!(b.eval(PIPELINE_SHOWN), json!(false), "at {width} px");
        assert_eq!(b.eval(expanded), json!("false"), "at {width} px");
    }
    set_pipeline(&mut b, true);
    assert_eq!(on_screen(&mut b, "#crowd-go")["shown"], json!(true));
    drop(b);

    // A phone: closed, also at first paint, and the page works as before.
    let mut b = Browser::launch(390, 844);
    load_without_scripts(&mut b, &url);
    assert_eq!(b.eval(PIPELINE_SHOWN), json!(false), "open at first paint");
    b.goto(&url);
    b.wait_for("document.querySelector('#connection')?.dataset.state === 'open'");
    assert_eq!(b.eval(PIPELINE_SHOWN), json!(false));
    assert_eq!(b.eval(expanded), json!("false"));
    assert_eq!(on_screen(&mut b, "#crowd-go")["shown"], json!(false));
    assert_eq!(on_screen(&mut b, "#composer")["shown"], json!(true));
    send(&mut b, "Hello from a phone");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    assert!(
        !b.eval(LAST_ANSWER).as_str().unwrap_or("").is_empty(),
        "no answer"
    );
    // Closed, it never asked for the numbers.
    let polls = b
        .requests()
        .iter()
        .filter(|u| u.contains("/api/stats"))
        .count();
    assert_eq!(polls, 0, "polled while closed");
    b.screenshot("pipeline-narrow");
    // The toggle opens it over the page, focus inside, and closes it again.
    set_pipeline(&mut b, true);
    assert_eq!(b.eval("document.activeElement.id"), json!("close-pipeline"));
    assert_eq!(on_screen(&mut b, "#crowd-go")["shown"], json!(true));
    b.screenshot("pipeline-narrow-open");
    b.click("#close-pipeline");
    b.wait_for(&format!("({PIPELINE_SHOWN}) === false"));
    assert_eq!(b.eval(expanded), json!("false"));
    assert_eq!(
        b.eval("document.activeElement.id"),
        json!("toggle-pipeline")
    );
    assert!(b.errors().is_empty(), "page errors: {:?}", b.errors());
}

#[test]
fn tool_calls_and_errors_are_shown_readably() {
    let server = Server::start(&format!("{SLOW}\n[server]\nmax_message_chars = 60\n"));
    let mut b = open(&server, 1440, 900);
    send(&mut b, "Please calculate 2+3*4");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let tool = b.eval(
        "document.querySelector('#messages .msg.assistant details.tool[data-tool=\"calculator\"]')?.textContent ?? ''",
    );
    assert!(tool.as_str().unwrap_or("").contains("14"), "{tool}");
    assert!(b
        .eval(LAST_ANSWER)
        .as_str()
        .unwrap_or("")
        .starts_with("calculator says: 14."));
    // A message over the limit is refused with its code and a sentence.
    send(&mut b, &"x".repeat(80));
    let code = b.wait_for("document.querySelector('#messages .error[data-code]')?.dataset.code");
    assert_eq!(code, json!("too_large"));
    let sentence = b.eval("document.querySelector('#messages .error[data-code]').textContent");
    assert!(sentence.as_str().unwrap_or("").len() > 20, "{sentence}");
    b.screenshot("tools-and-errors");
}

#[test]
fn answers_render_code_as_text_and_every_error_code_has_a_sentence() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    let rendered = b.eval(
        r#"import('/static/render.js').then(m => {
            const div = document.createElement('div');
            m.renderRich(div, "Look:\n```js\nlet a = '<b>x</b>';\n```\nand `<i>y</i>` here");
            return {
                pre: div.querySelector('pre code')?.textContent ?? null,
                inline: [...div.querySelectorAll('code')].map(c => c.textContent),
                markup: div.querySelectorAll('b, i').length,
            };
        })"#,
    );
    assert_eq!(rendered["pre"], json!("let a = '<b>x</b>';"), "{rendered}");
    assert!(
        rendered["inline"].to_string().contains("<i>y</i>"),
        "{rendered}"
    );
    assert_eq!(rendered["markup"], json!(0));
    let codes = [
        "bad_request",
        "too_large",
        "overloaded",
        "rate_limited",
        "conversation_busy",
        "queue_timeout",
        "processing_timeout",
        "upstream_error",
        "cancelled",
        "not_found",
        "slow_consumer",
        "shutting_down",
        "internal",
    ];
    let missing = b.eval(&format!(
        "import('/static/render.js').then(m => {}.filter(c => !m.ERROR_SENTENCES[c]))",
        json!(codes)
    ));
    assert_eq!(missing, json!([]), "error codes without a sentence");
}

#[test]
fn stats_are_polled_only_while_the_pipeline_view_is_open_and_dark_mode_works() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    let stats_requests = |b: &mut Browser| {
        b.requests()
            .iter()
            .filter(|u| u.contains("/api/stats"))
            .count()
    };
    // The view starts open at this width; closed, it does not poll (one
    // request already on its way may still show up).
    set_pipeline(&mut b, false);
    let closed_at = stats_requests(&mut b);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(
        stats_requests(&mut b) <= closed_at + 1,
        "polled while closed"
    );
    let opened_at = stats_requests(&mut b);
    set_pipeline(&mut b, true);
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let open_polls = stats_requests(&mut b) - opened_at;
    assert!((2..=5).contains(&open_polls), "{open_polls} polls in 2.5 s");
    set_pipeline(&mut b, false);
    let closed_at = stats_requests(&mut b);
    std::thread::sleep(std::time::Duration::from_millis(2000));
    assert!(
        stats_requests(&mut b) <= closed_at + 1,
        "kept polling after closing"
    );
    // The streaming answers are announced to screen readers.
    assert_eq!(
        b.eval("document.querySelector('#messages').getAttribute('aria-live')"),
        json!("polite")
    );
    // Dark mode follows the system setting.
    b.call(
        "Emulation.setEmulatedMedia",
        json!({"features": [{"name": "prefers-color-scheme", "value": "dark"}]}),
    );
    send(&mut b, "Good evening");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let background = b.eval("getComputedStyle(document.body).backgroundColor");
    let dark = background
        .as_str()
        .and_then(|c| c.strip_prefix("rgb("))
        .map(|c| {
            c.trim_end_matches(')')
                .split(',')
                .filter_map(|v| v.trim().parse::<u32>().ok())
                .sum::<u32>()
                < 200
        })
        .unwrap_or(false);
    assert!(dark, "background in dark mode: {background}");
    b.screenshot("dark");
}

#[test]
fn the_keyboard_is_enough() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    // Shift+Enter is a new line, not a send.
    b.type_text("#composer", "first line");
    b.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyDown", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": 8}),
    );
    b.call(
        "Input.dispatchKeyEvent",
        json!({"type": "keyUp", "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": 8}),
    );
    b.call("Input.insertText", json!({"text": "\nsecond line"}));
    assert_eq!(
        b.eval("document.querySelectorAll('#messages .msg').length"),
        json!(0),
        "Shift+Enter sent the message"
    );
    b.press("Enter", 13);
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    assert_eq!(
        b.eval("document.querySelector('#messages .msg.user').textContent.includes('second line')"),
        json!(true)
    );
    // Tab moves from the composer to the send button (enabled once there
    // is something to send).
    b.type_text("#composer", "draft");
    b.press("Tab", 9);
    assert_eq!(b.eval("document.activeElement.id"), json!("send"));
    // A new conversation starts empty; the old one stays in the sidebar.
    b.click("#new-conversation");
    b.wait_for("document.querySelectorAll('#messages .msg').length === 0");
    assert_eq!(
        b.eval("document.querySelectorAll('#conversations li[data-conversation]').length"),
        json!(1)
    );
    b.screenshot("keyboard");
}

#[test]
fn a_waiting_answer_shows_where_it_waits() {
    // One streaming slot, held by another client's long answer.
    let server = Server::start(&format!(
        "{SLOW}\n[workers]\nmax_concurrent_llm_streams = 1\n"
    ));
    // The page first: a browser that starts slowly (several tests launch
    // one at once) must not outlast the answer holding the slot.
    let mut b = open(&server, 1440, 900);
    let mut other = server.client();
    let (busy, _) = other.ask(None, "Occupy the only streaming slot");
    other.recv_matching(|v| v["type"] == "token");
    send(&mut b, "Is there a free slot?");
    b.wait_for(&format!("({LAST_STATE}) === 'waiting_stream'"));
    let status =
        b.eval("[...document.querySelectorAll('#messages .msg.assistant')].pop().textContent");
    assert!(
        status
            .as_str()
            .unwrap_or("")
            .contains("waiting for a stream slot"),
        "{status}"
    );
    b.screenshot("waiting");
    assert!(other.answer(&busy).is_done());
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
}

#[test]
fn copy_puts_the_answer_on_the_clipboard() {
    let server = Server::start(SLOW);
    let mut b = open(&server, 1440, 900);
    b.call(
        "Browser.grantPermissions",
        json!({
            "origin": format!("http://{}", server.addr),
            "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]
        }),
    );
    send(&mut b, "Something worth copying");
    b.wait_for(&format!("({LAST_STATE}) === 'done'"));
    let answer = b.eval(LAST_ANSWER);
    b.click("#messages .msg.assistant .btn-copy");
    let copied = b.wait_for("navigator.clipboard.readText()");
    assert_eq!(copied, answer);
}
