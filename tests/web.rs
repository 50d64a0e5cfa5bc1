//! The node's web page in a real headless Chromium (the Debian package; CI
//! installs it with scripts/ci-deps.sh). Two nodes on loopback, readings
//! published through HTTP, and the checks made on the page as rendered: the
//! chart's SVG lines hold the readings, the peer table shows the peer. A
//! screenshot is kept in `target/artifacts/`.
//!
//! Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: JSON messages, each ended by a NUL byte, on its
//! fds 3 and 4, which a shell connects to two FIFOs).

mod cli_common;

use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use base64::Engine as _;
use cli_common::*;
use serde_json::{Value, json};

/// The browser; `MULTIFEED_CHROMIUM` overrides it.
fn chromium() -> String {
    std::env::var("MULTIFEED_CHROMIUM").unwrap_or_else(|_| "chromium".into())
}

/// On a fresh machine the README's test command installs Chromium itself, with
/// the project's own script (once per run; the tests share it).
fn install_if_missing(binary: &str) {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let runs = || {
        Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|out| out.status.success())
    };
    if std::env::var_os("MULTIFEED_CHROMIUM").is_some() || runs() {
        return;
    }
    INSTALLED.get_or_init(|| {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ci-deps.sh");
        eprintln!("Chromium is missing: running {}", script.display());
        let status = Command::new("bash").arg(&script).status();
        eprintln!("{} ended: {status:?}", script.display());
    });
}

/// Where screenshots are kept: `target/artifacts`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("artifacts");
    std::fs::create_dir_all(&dir).expect("target/artifacts");
    dir
}

/// A headless Chromium and one page in it, driven over the DevTools protocol.
struct Browser {
    child: Child,
    commands: File,
    replies: mpsc::Receiver<Value>,
    session: String,
    next_id: u64,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium on an empty profile and opens `url`. Fails, saying what
    /// to do, when Chromium is not installed: this test never skips.
    fn open(url: &str) -> Browser {
        let binary = chromium();
        install_if_missing(&binary);
        match Command::new(&binary).arg("--version").output() {
            Ok(out) if out.status.success() => {}
            other => panic!(
                "Chromium ({binary}) cannot be run ({other:?}): the web page's test needs it; install it with scripts/ci-deps.sh (Debian package `chromium`) or point MULTIFEED_CHROMIUM at a Chromium binary"
            ),
        }
        let profile = tempfile::tempdir().unwrap();
        let (to_browser, from_browser) = (profile.path().join("in"), profile.path().join("out"));
        for fifo in [&to_browser, &from_browser] {
            let made = Command::new("mkfifo").arg(fifo).status().expect("mkfifo");
            assert!(made.success(), "mkfifo {}", fifo.display());
        }
        let log = File::create(profile.path().join("chromium.log")).unwrap();
        let child = Command::new("bash")
            .arg("-c")
            .arg(r#"in=$1; out=$2; shift 2; exec "$@" 3<"$in" 4>"$out""#)
            .arg("chromium-pipe")
            .arg(&to_browser)
            .arg(&from_browser)
            .arg(&binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-pipe",
                "--window-size=1200,1100",
            ])
            .arg(format!(
                "--user-data-dir={}",
                profile.path().join("profile").display()
            ))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("bash runs chromium");
        // The shell opens its end of `in` first, then `out`: the same order here.
        let commands = OpenOptions::new().write(true).open(&to_browser).unwrap();
        let (sender, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok(out) = File::open(&from_browser) else {
                return;
            };
            for message in BufReader::new(out).split(0) {
                let Ok(message) = message else { return };
                let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                    continue;
                };
                if sender.send(value).is_err() {
                    return;
                }
            }
        });
        let mut browser = Browser {
            child,
            commands,
            replies,
            session: String::new(),
            next_id: 0,
            profile,
        };
        let target = browser.call("Target.createTarget", json!({ "url": url }), false);
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target["targetId"], "flatten": true }),
            false,
        );
        browser.session = attached["sessionId"].as_str().expect("a session").into();
        browser
    }

    /// Sends one command (to the page's session when `on_page`); its result.
    fn call(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.next_id += 1;
        let mut command = json!({ "id": self.next_id, "method": method, "params": params });
        if on_page {
            command["sessionId"] = json!(self.session);
        }
        let mut bytes = command.to_string().into_bytes();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .unwrap_or_else(|e| panic!("Chromium went away ({e}): {}", self.log()));
        loop {
            let reply = self.replies.recv_timeout(WAIT).unwrap_or_else(|e| {
                panic!("no answer to {method} from Chromium ({e}): {}", self.log())
            });
            // Events (no id) and answers to other commands pass by.
            if reply["id"] == self.next_id {
                assert!(
                    reply.get("error").is_none(),
                    "{method} failed: {}",
                    reply["error"]
                );
                return reply["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression on the page.
    fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
            true,
        );
        assert!(
            result.get("exceptionDetails").is_none(),
            "the page threw: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Saves the whole page as a PNG.
    fn screenshot(&mut self, path: &Path) {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({ "format": "png", "captureBeyondViewport": true }),
            true,
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64");
        std::fs::write(path, png).expect("write the screenshot");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let id = self.next_id + 1;
        let mut close = json!({ "id": id, "method": "Browser.close" }).to_string();
        close.push('\0');
        let _ = self.commands.write_all(close.as_bytes());
        let closed = poll_until(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !closed {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What the page shows, read from its DOM: per chart (by its caption) the
/// points of each SVG line and its last value, the peer rows' cells, the facts.
const PAGE_STATE: &str = r##"(() => {
  if (!document.getElementById("status")) return null; // still loading
  const charts = {};
  for (const figure of document.querySelectorAll("figure.chart")) {
    const series = {};
    for (const line of figure.querySelectorAll("svg polyline")) {
      series[line.dataset.series] = {
        points: line.getAttribute("points").trim().split(/\s+/).length,
        last: Number(line.dataset.last),
      };
    }
    charts[figure.querySelector(".topic").textContent] = {
      series,
      legend: figure.querySelector(".legend").textContent,
    };
  }
  const peers = [...document.querySelectorAll("#peers tbody tr")]
    .map((row) => [...row.cells].map((cell) => cell.textContent));
  const feeds = [...document.querySelectorAll("#feeds tbody tr")]
    .map((row) => [...row.cells].map((cell) => cell.textContent));
  const mqttRow = document.querySelector("#mqtt-counters tbody tr");
  return {
    charts,
    peers,
    feeds,
    mqtt: document.getElementById("mqtt").hidden || !mqttRow
      ? null : [...mqttRow.cells].map((cell) => cell.textContent),
    name: document.getElementById("name").textContent,
    group: document.getElementById("group").textContent,
    node: document.getElementById("node").textContent,
    status: document.getElementById("status").textContent,
    injected: document.querySelectorAll("#charts b, #charts img, #charts script").length,
    pwned: window.pwned === true,
  };
})()"##;

/// Waits until the page's state satisfies `ready`; panics with the last state
/// seen (and a screenshot) if it never does.
fn wait_for_page(browser: &mut Browser, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut state = Value::Null;
    if poll_until(WAIT, || {
        state = browser.eval(PAGE_STATE);
        ready(&state)
    }) {
        return state;
    }
    let shot = artifacts().join("web-failed.png");
    browser.screenshot(&shot);
    panic!(
        "the page never showed {what} (screenshot {}); last state: {state:#}",
        shot.display()
    );
}

fn series<'a>(state: &'a Value, topic: &str, field: &str) -> &'a Value {
    &state["charts"][topic]["series"][field]
}

/// A payload and a topic name that would run script if the page used them as HTML.
const HOSTILE_TOPIC: &str = "<img src=x onerror=window.pwned=true>";

#[test]
fn the_page_charts_readings_published_on_a_peer_and_shows_the_peer() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 2);
    let pa = format!("127.0.0.1:{}", free_port());
    let a = gws[0].node(&["--listen", &pa, "--http", "127.0.0.1:0", "--name", "roof-a"]);
    let mqtt_b = format!("127.0.0.1:{}", free_port());
    let b = gws[1].node(&[
        "--peer",
        &pa,
        "--http",
        "127.0.0.1:0",
        "--name",
        "site-b",
        "--mqtt-listen",
        &mqtt_b,
        "--mqtt-publish-remote",
        "remote",
    ]);

    // History: readings published on A before the page is opened on B.
    let temps: Vec<f64> = (0..25).map(|i| 20.0 + f64::from(i % 7) * 0.5).collect();
    for t in &temps {
        publish(&a.http, "temp", &t.to_string()).expect("acknowledged");
    }
    for i in 0..10 {
        let reading = format!(
            r#"{{"temp": {}.5, "hum": {}, "site": "roof"}}"#,
            18 + i,
            40 + i
        );
        publish(&a.http, "env", &reading).expect("acknowledged");
    }
    let hostile = r#"{"v": 1, "note": "<script>window.pwned = true</script><b>x</b>"}"#;
    let topic = "%3Cimg%20src%3Dx%20onerror%3Dwindow.pwned%3Dtrue%3E";
    publish(&a.http, topic, hostile).expect("acknowledged");
    let group_id = http(&a.http, "GET", "/health", &[], b"").unwrap().json()["group"]
        .as_str()
        .expect("the group id")
        .to_owned();

    let mut browser = Browser::open(&format!("http://{}/", b.http));
    let state = wait_for_page(&mut browser, "the replicated readings and the peer", |s| {
        series(s, "temp", "value")["points"] == temps.len()
            && series(s, "env", "hum")["points"] == 10
            && s["peers"].as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r[0] == pa.as_str() && r[2] == "configured" && r[3] == "connected")
            })
    });
    assert_eq!(series(&state, "temp", "value")["last"], temps[24]);
    assert_eq!(series(&state, "env", "temp")["points"], 10);
    assert_eq!(series(&state, "env", "temp")["last"], 27.5);
    assert!(
        series(&state, "env", "site").is_null(),
        "text fields are not charted"
    );
    assert_eq!(state["group"], group_id.as_str());
    assert_eq!(state["status"], "live");
    // The feeds learnt from A show A's gateway name; the heading shows B's own.
    let state = wait_for_page(&mut browser, "A's gateway name on its feeds", |s| {
        s["feeds"]
            .as_array()
            .is_some_and(|rows| rows.len() >= 3 && rows.iter().all(|r| r[1] == "roof-a"))
    });
    assert_eq!(state["name"], "· site-b");
    // Untrusted text is shown as text.
    assert_eq!(series(&state, HOSTILE_TOPIC, "v")["points"], 1);
    assert_eq!(state["injected"], 0);
    assert_eq!(state["pwned"], false);

    // Live: readings published now arrive over SSE, on a chart already drawn.
    for t in [30.5, 31.0, 31.5] {
        publish(&a.http, "temp", &t.to_string()).expect("acknowledged");
    }
    let state = wait_for_page(&mut browser, "the live readings", |s| {
        series(s, "temp", "value")["points"] == temps.len() + 3
    });
    assert_eq!(series(&state, "temp", "value")["last"], 31.5);
    assert!(
        state["charts"]["temp"]["legend"]
            .as_str()
            .is_some_and(|l| l.contains("31.5")),
        "{state:#}"
    );
    // B's MQTT side: every message from A went out through egress (column 10).
    let state = wait_for_page(&mut browser, "MQTT egress counters", |s| {
        s["mqtt"][9] == (temps.len() + 10 + 1 + 3).to_string().as_str()
    });
    assert_eq!(state["mqtt"][0], "0", "no MQTT clients: {state:#}");
    browser.screenshot(&artifacts().join("web.png"));
    drop(browser);
    a.running.stop();
    b.running.stop();
}

#[test]
fn off_loopback_the_page_works_with_the_token_given_once_in_its_address() {
    let root = tempfile::tempdir().unwrap();
    let gws = group(root.path(), 1);
    let token = std::fs::read_to_string(gws[0].dir.with_extension("token"))
        .expect("init writes the token file")
        .trim()
        .to_owned();
    let node = gws[0].node(&["--http", "0.0.0.0:0"]);
    let port = node.http.rsplit(':').next().unwrap().to_owned();
    let local = format!("127.0.0.1:{port}");
    let bearer = format!("Bearer {token}");
    for value in [1.5, 2.5] {
        let answer = http(
            &local,
            "POST",
            "/topics/temp/messages",
            &[("Authorization", &bearer)],
            value.to_string().as_bytes(),
        )
        .expect("answer");
        assert_eq!(answer.status, 201, "{}", answer.body);
    }

    // The page's cookie authorizes reads, never a publish.
    let cookie = format!("multifeed_token={token}");
    let read = http(&local, "GET", "/topics", &[("Cookie", &cookie)], b"").expect("answer");
    assert_eq!(read.status, 200, "{}", read.body);
    let publish = http(
        &local,
        "POST",
        "/topics/temp/messages",
        &[("Cookie", &cookie)],
        b"9",
    )
    .expect("answer");
    assert_eq!(publish.status, 401, "{}", publish.body);

    // Without the token the page loads but shows no data, and asks for it.
    let mut browser = Browser::open(&format!("http://{local}/"));
    wait_for_page(&mut browser, "that it needs the token", |s| {
        s["status"] == "needs token"
    });
    assert_eq!(
        browser.eval("document.getElementById('token-form').hidden"),
        false
    );
    drop(browser);

    // With it in the fragment: the API and the SSE follow answer, and the
    // token leaves the address bar.
    let mut browser = Browser::open(&format!("http://{local}/#token={token}"));
    let state = wait_for_page(&mut browser, "the readings", |s| {
        series(s, "temp", "value")["points"] == 2
    });
    assert_eq!(series(&state, "temp", "value")["last"], 2.5);
    assert_eq!(browser.eval("location.hash"), "");
    drop(browser);
    node.running.stop();
}
