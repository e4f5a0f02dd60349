//! A browser for the CRM's tests: Debian's `chromium`, headless, driven through `chromedriver` over
//! the W3C WebDriver protocol (JSON over HTTP, spoken here with [`crate::web`]).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use crate::web::Web;

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless chromium with one WebDriver session; both end when it is dropped.
pub struct Browser {
    driver: Child,
    web: Web,
    session: String,
}

fn find_program(names: &[&str]) -> Option<String> {
    names.iter().find_map(|name| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .find(|p| p.is_file())
                .map(|p| p.display().to_string())
        })
    })
}

impl Browser {
    /// Starts chromedriver and a headless chromium. Fails with what to install when either is missing.
    pub fn start() -> Result<Browser> {
        let driver = find_program(&["chromedriver"]).context(
            "chromedriver is not installed: `apt-get install chromium chromium-driver` (scripts/test.sh does)",
        )?;
        let chromium = find_program(&["chromium", "chromium-browser"])
            .context("chromium is not installed: `apt-get install chromium chromium-driver`")?;
        let port = crate::free_port();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let mut browser =
            Browser { driver: child, web: Web::new(&format!("127.0.0.1:{port}")), session: String::new() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(v) = browser.call("GET", "/status", None) {
                if v["ready"] == true {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not get ready within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"]
            }
        }}});
        let answer = browser.call("POST", "/session", Some(capabilities))?;
        browser.session = answer["sessionId"].as_str().context("a session id")?.to_string();
        Ok(browser)
    }

    /// One WebDriver command; its `value`, or an error with the browser's message.
    fn call(&mut self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let body = body.map(|b| b.to_string());
        let headers = [("Content-Type", "application/json".to_string())];
        let reply = self.web.request(method, path, &headers, body.as_deref().map(str::as_bytes))?;
        let value: Value = serde_json::from_str(&reply.body).with_context(|| {
            format!("WebDriver {method} {path} answered {}: {}", reply.status, reply.body)
        })?;
        if reply.status != 200 {
            bail!("WebDriver {method} {path} failed ({}): {}", reply.status, value["value"]["message"]);
        }
        Ok(value["value"].clone())
    }

    fn session_call(&mut self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let path = format!("/session/{}{path}", self.session);
        self.call(method, &path, body)
    }

    pub fn goto(&mut self, url: &str) -> Result<()> {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).map(drop)
    }

    pub fn url(&mut self) -> Result<String> {
        Ok(self.session_call("GET", "/url", None)?.as_str().unwrap_or_default().to_string())
    }

    /// The element `css` selects, waiting up to 20 s for it to appear.
    pub fn find(&mut self, css: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found =
                self.session_call("POST", "/element", Some(json!({"using": "css selector", "value": css})));
            match found {
                Ok(v) => {
                    return Ok(v[ELEMENT]
                        .as_str()
                        .with_context(|| format!("an element reference in {v}"))?
                        .to_string())
                }
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("no element {css:?}"))),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn type_into(&mut self, css: &str, text: &str) -> Result<()> {
        let element = self.find(css)?;
        self.session_call("POST", &format!("/element/{element}/value"), Some(json!({ "text": text })))
            .map(drop)
    }

    pub fn click(&mut self, css: &str) -> Result<()> {
        let element = self.find(css)?;
        self.session_call("POST", &format!("/element/{element}/click"), Some(json!({}))).map(drop)
    }

    /// Runs `script` in the page (to set a `<select>`, which WebDriver cannot type into).
    pub fn run(&mut self, script: &str) -> Result<()> {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).map(drop)
    }

    pub fn text(&mut self, css: &str) -> Result<String> {
        let element = self.find(css)?;
        Ok(self
            .session_call("GET", &format!("/element/{element}/text"), None)?
            .as_str()
            .unwrap_or("")
            .to_string())
    }

    /// Waits up to `timeout` for the text of `css` to contain `needle`.
    pub fn wait_text(&mut self, css: &str, needle: &str, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text(css).unwrap_or_default();
            if text.contains(needle) {
                return Ok(text);
            }
            if Instant::now() > deadline {
                bail!("{css:?} did not show {needle:?} within {timeout:?}; it shows {text:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a PNG of the page to `target/screens/NAME.png` (under the workspace).
    pub fn screenshot(&mut self, name: &str) -> Result<()> {
        let png = self.session_call("GET", "/screenshot", None)?;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap_or_default())?;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/screens");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), bytes)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.session_call("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
