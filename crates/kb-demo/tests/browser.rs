//! End to end in headless Chromium: kb-serve on the fixture model, the real kb-demo binary,
//! chromedriver driven with fantoccini. Saves screenshots under
//! `<target>/kb-demo-screenshots/`.
//!
//! Skipped (with a message) when Chromium or chromedriver is not installed; on Debian:
//! `apt-get install -y chromium chromium-driver`. `KB_DEMO_CHROMIUM` and
//! `KB_DEMO_CHROMEDRIVER` point at other binaries; `KB_DEMO_TEST_MODEL` runs kb-serve on another
//! model folder than the tiny fixture (for screenshots with real keywords).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{dead_server, Demo, KbServe, ERROR_MESSAGE};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const QUESTION: &str = "이사화물 통관예약을 하면 뭐가 좋나요?";
const SECOND_QUESTION: &str = "직구로 캠핑용품 사면 관세 내야 하나요?";
const ENTER: &str = "\u{E007}";
const SHIFT: &str = "\u{E008}";
const TAB: &str = "\u{E004}";

/// Chromium and chromedriver, when both are installed.
fn browser_binaries() -> Option<(PathBuf, PathBuf)> {
    let pick = |var: &str, default: &str| {
        PathBuf::from(std::env::var_os(var).unwrap_or_else(|| default.into()))
    };
    let chromium = pick("KB_DEMO_CHROMIUM", "/usr/bin/chromium");
    let driver = pick("KB_DEMO_CHROMEDRIVER", "/usr/bin/chromedriver");
    (chromium.is_file() && driver.is_file()).then_some((chromium, driver))
}

/// Where screenshots go: `<target dir>/kb-demo-screenshots`.
fn screenshot_dir() -> PathBuf {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let dir = tmp.parent().unwrap_or(tmp).join("kb-demo-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot folder");
    dir
}

/// A chromedriver process, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start(binary: &Path) -> Driver {
        let port = dead_server()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .expect("a free port");
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = common::client()
                .get(format!("{}/status", driver.url))
                .send()
                .await
            {
                if r.status() == 200 {
                    return driver;
                }
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        "--lang=ko-KR",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--user-data-dir={}", profile.display())])
    .collect::<Vec<_>>();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({ "binary": chromium, "args": args }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a Chromium session")
}

/// Runs `script` (a function body) and returns its value.
async fn js(c: &Client, script: &str) -> Value {
    c.execute(script, vec![])
        .await
        .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Waits until `expr` (a JavaScript expression) is truthy.
async fn wait_for(c: &Client, what: &str, expr: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let script = format!("return !!({expr});");
    loop {
        if js(c, &script).await == Value::Bool(true) {
            return;
        }
        if Instant::now() > deadline {
            let body = js(c, "return document.body.innerText;").await;
            panic!("timed out waiting for {what} ({expr}); the page says:\n{body}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn count(c: &Client, css: &str) -> u64 {
    js(
        c,
        &format!("return document.querySelectorAll({css:?}).length;"),
    )
    .await
    .as_u64()
    .unwrap_or(0)
}

/// Resizes the window so that the page's viewport is `width` x `height` CSS pixels.
async fn set_viewport(c: &Client, width: i64, height: i64) {
    let (mut w, mut h) = (width, height);
    for _ in 0..3 {
        c.set_window_size(w as u32, h as u32).await.expect("resize");
        let inner = js(c, "return [window.innerWidth, window.innerHeight];").await;
        let (iw, ih) = (
            inner[0].as_i64().unwrap_or(0),
            inner[1].as_i64().unwrap_or(0),
        );
        if (iw, ih) == (width, height) {
            return;
        }
        w += width - iw;
        h += height - ih;
    }
    let inner = js(c, "return [window.innerWidth, window.innerHeight];").await;
    panic!("cannot get a {width}x{height} viewport (got {inner})");
}

async fn screenshot(c: &Client, name: &str) -> PathBuf {
    // Let the spinner and transitions settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let png = c.screenshot().await.expect("screenshot");
    let path = screenshot_dir().join(name);
    std::fs::write(&path, png).expect("write screenshot");
    println!("screenshot: {}", path.display());
    path
}

async fn open(c: &Client, url: &str) {
    c.goto(url).await.expect("the page opens");
    wait_for(c, "the page", "document.readyState === 'complete'").await;
}

/// Types `text` into the prompt and presses Enter, then waits for answer number `n`.
async fn ask(c: &Client, text: &str, n: u64) {
    let input = c.find(Locator::Id("prompt")).await.expect("the prompt");
    input.clear().await.expect("clear");
    input.send_keys(text).await.expect("typing");
    input.send_keys(ENTER).await.expect("Enter");
    wait_for(
        c,
        &format!("answer {n}"),
        &format!("document.querySelectorAll('.msg.answer').length >= {n} && document.getElementById('pending').hidden"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_headless_chromium() {
    let Some((chromium, driver_bin)) = browser_binaries() else {
        println!(
            "SKIP chat_in_headless_chromium: /usr/bin/chromium or /usr/bin/chromedriver is not \
             installed (Debian: apt-get install -y chromium chromium-driver)"
        );
        return;
    };
    let serve = match std::env::var("KB_DEMO_TEST_MODEL") {
        Ok(model) => KbServe::start_model(&model).await,
        Err(_) => KbServe::start().await,
    };
    let demo = Demo::start(&serve.base, &[]);
    let driver = Driver::start(&driver_bin).await;
    let profile = tempfile::tempdir().expect("profile folder");
    let client = connect(&driver, &chromium, profile.path()).await;

    // The scenario runs in its own task so that the browser is closed even when it fails.
    let scenario = tokio::spawn(scenario(client.clone(), demo.base.clone(), serve));
    let outcome = scenario.await;
    let _ = client.close().await;
    drop(driver);
    if let Err(e) = outcome {
        eprintln!("kb-demo log:\n{}", demo.logs());
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(c: Client, base: String, mut serve: KbServe) {
    set_viewport(&c, 1280, 800).await;
    open(&c, &base).await;

    // The original page's texts, labelled controls, readiness.
    assert_eq!(c.title().await.unwrap(), "KoBART Keyword Extract");
    let h1 = c
        .find(Locator::Css("h1"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(h1, "KoBART Keyword Extract");
    let greeting = c.find(Locator::Css(".greeting .bubble p")).await.unwrap();
    assert_eq!(
        greeting.text().await.unwrap(),
        "문장 입력시 keyword를 추출해드립니다."
    );
    let input = c.find(Locator::Id("prompt")).await.unwrap();
    assert_eq!(
        input.attr("placeholder").await.unwrap().as_deref(),
        Some("문장을 여기 입력해주세요.")
    );
    let labelled = js(
        &c,
        "return [...document.querySelectorAll('button, textarea')].every(e => \
            (e.labels && e.labels.length > 0) || e.getAttribute('aria-label'));",
    )
    .await;
    assert_eq!(labelled, true, "every control has a label");
    wait_for(
        &c,
        "the ready badge",
        "document.getElementById('status').dataset.state === 'ready'",
    )
    .await;

    // Keyboard only: the prompt has focus, Tab goes to the send button.
    wait_for(
        &c,
        "focus on the prompt",
        "document.activeElement.id === 'prompt'",
    )
    .await;
    input.send_keys(TAB).await.unwrap();
    wait_for(&c, "focus on send", "document.activeElement.id === 'send'").await;
    input.click().await.unwrap();

    // Enter during an IME composition (isComposing, or keyCode 229) sends nothing.
    let ime = js(
        &c,
        "const p = document.getElementById('prompt'); p.value = '한'; \
         const a = new KeyboardEvent('keydown', {key: 'Enter', isComposing: true, bubbles: true, cancelable: true}); \
         const b = new KeyboardEvent('keydown', {key: 'Enter', keyCode: 229, bubbles: true, cancelable: true}); \
         p.dispatchEvent(a); p.dispatchEvent(b); \
         return [a.defaultPrevented, b.defaultPrevented, p.value, document.querySelectorAll('.msg.user').length];",
    )
    .await;
    assert_eq!(
        ime,
        json!([false, false, "한", 0]),
        "a composing Enter sent something"
    );

    // Shift+Enter makes a new line, and sends nothing.
    input.clear().await.unwrap();
    input
        .send_keys(&format!("첫 줄{SHIFT}{ENTER}{SHIFT}둘째 줄"))
        .await
        .unwrap();
    let value = js(&c, "return document.getElementById('prompt').value;").await;
    assert_eq!(value, "첫 줄\n둘째 줄");
    assert_eq!(count(&c, ".msg.user").await, 0);

    // Ask: the spinner shows while waiting, then the keywords come as tags with the raw text
    // and the latency.
    js(
        &c,
        "window.sawSpinner = false; const p = document.getElementById('pending'); \
         new MutationObserver(() => { if (!p.hidden) window.sawSpinner = true; }) \
           .observe(p, {attributes: true});",
    )
    .await;
    ask(&c, QUESTION, 1).await;
    assert_eq!(
        js(&c, "return window.sawSpinner;").await,
        true,
        "no spinner"
    );
    let user = c.find(Locator::Css(".msg.user .query")).await.unwrap();
    assert_eq!(user.text().await.unwrap(), QUESTION);
    let expected = common::post(
        &format!("{base}/api/keywords"),
        json!({ "query": QUESTION }).to_string(),
    )
    .await
    .json();
    let expected = &expected["results"][0];
    let tags = js(
        &c,
        "return [...document.querySelectorAll('.msg.answer .tag')].map(t => t.textContent);",
    )
    .await;
    assert_eq!(&tags, &expected["keywords"], "tags are the keywords");
    let raw = c.find(Locator::Css(".msg.answer .raw-text")).await.unwrap();
    assert_eq!(
        raw.text().await.unwrap(),
        expected["text"].as_str().unwrap()
    );
    let latency = c.find(Locator::Css(".msg.answer .latency")).await.unwrap();
    assert!(latency.text().await.unwrap().contains("응답 시간"));
    assert_eq!(count(&c, ".msg.error").await, 0);

    ask(&c, SECOND_QUESTION, 2).await;
    assert_eq!(count(&c, ".msg.user").await, 2);

    // The copy button copies and says so.
    if count(&c, ".msg.answer .copy:not([disabled])").await > 0 {
        c.find(Locator::Css(".msg.answer .copy:not([disabled])"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        wait_for(
            &c,
            "copy feedback",
            "[...document.querySelectorAll('.copy')].some(b => b.textContent === '복사됨')",
        )
        .await;
    }
    screenshot(&c, "desktop.png").await;

    // History survives a reload.
    c.refresh().await.unwrap();
    wait_for(&c, "the page", "document.readyState === 'complete'").await;
    assert_eq!(count(&c, ".msg.user").await, 2, "history lost on reload");
    assert_eq!(count(&c, ".msg.answer").await, 2);
    assert_eq!(
        count(&c, ".tag").await as usize,
        tags.as_array().unwrap().len()
            + {
                let second = js(&c, "return document.querySelectorAll('.msg.answer')[1].querySelectorAll('.tag').length;").await;
                second.as_u64().unwrap() as usize
            }
    );

    // Phone width (390x844): nothing overflows sideways.
    set_viewport(&c, 390, 844).await;
    let overflow = js(
        &c,
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth;",
    )
    .await;
    assert!(
        overflow.as_i64().unwrap_or(1) <= 0,
        "horizontal overflow: {overflow}"
    );
    screenshot(&c, "phone.png").await;
    set_viewport(&c, 1280, 800).await;

    // Reset clears the history, also across a reload.
    // (with the keyboard: Enter on the focused button)
    let reset = c.find(Locator::Id("reset")).await.unwrap();
    js(&c, "document.getElementById('reset').focus();").await;
    reset.send_keys(ENTER).await.unwrap();
    wait_for(
        &c,
        "the reset",
        "document.querySelectorAll('.msg.user').length === 0",
    )
    .await;
    wait_for(
        &c,
        "focus back on the prompt",
        "document.activeElement.id === 'prompt'",
    )
    .await;
    assert_eq!(count(&c, ".msg.greeting").await, 1);
    c.refresh().await.unwrap();
    wait_for(&c, "the page", "document.readyState === 'complete'").await;
    assert_eq!(count(&c, ".msg.user").await, 0, "history back after reset");
    assert_eq!(
        js(&c, "return localStorage.getItem('kb-demo.history.v1');").await,
        Value::Null
    );
    screenshot(&c, "desktop-empty.png").await;

    // kb-serve down: the original error message, and the badge says so.
    serve.stop().await;
    ask(&c, QUESTION, 1).await;
    let error = c
        .find(Locator::Css(".msg.error .error-message"))
        .await
        .unwrap();
    assert_eq!(error.text().await.unwrap(), ERROR_MESSAGE);
    wait_for(
        &c,
        "the offline badge",
        "document.getElementById('status').dataset.state === 'offline'",
    )
    .await;
    screenshot(&c, "desktop-error.png").await;
    set_viewport(&c, 390, 844).await;
    screenshot(&c, "phone-error.png").await;
}
