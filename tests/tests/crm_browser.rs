//! The CRM in a real browser (headless chromium through chromedriver): activation, logout and
//! login, creating a service, an event arriving live on the events page, clearing an alarm.
//! Screenshots of each page land in `target/screens/`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use coyote_tests::webdriver::Browser;
use coyote_tests::{free_port, Node};

const PASSWORD: &str = "correct-horse-battery";

#[test]
fn an_admin_activates_logs_in_creates_a_service_and_follows_events_live() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    let addr = format!("127.0.0.1:{}", free_port());
    node.crm = Some(addr.clone());
    node.up()?;
    let created = node.cli_json(&["crm", "activate"])?;
    let url = created["url"].as_str().context("the activation URL")?.to_string();
    let mut b = Browser::start()?;

    // Activation creates the admin and logs her in.
    b.goto(&url)?;
    b.screenshot("activate")?;
    b.type_into("#activate input[name=name]", "alice")?;
    b.type_into("#activate input[name=password]", PASSWORD)?;
    b.type_into("#activate input[name=password2]", PASSWORD)?;
    b.click("#activate-submit")?;
    b.wait_text("h1", "Overview", Duration::from_secs(20))?;
    b.wait_text("#nodes", "127.0.0.1", Duration::from_secs(5))?;
    b.screenshot("overview")?;

    // Log out, then in again.
    b.click("#logout-submit")?;
    b.wait_text("h1", "Log in", Duration::from_secs(20))?;
    b.type_into("#login input[name=name]", "alice")?;
    b.type_into("#login input[name=password]", PASSWORD)?;
    b.screenshot("login")?;
    b.click("#login-submit")?;
    b.wait_text("h1", "Overview", Duration::from_secs(20))?;

    // Create a service on its page.
    b.goto(&format!("http://{addr}/services"))?;
    b.type_into("#service-create input[name=name]", "blog")?;
    b.type_into("#service-create input[name=image]", "busybox:latest")?;
    b.type_into("#service-create input[name=domains]", "blog.example.org")?;
    b.click("#service-create-submit")?;
    b.wait_text("h1", "blog", Duration::from_secs(20))?;
    ensure!(b.url()?.ends_with("/services/blog"), "not on the service's page: {}", b.url()?);
    b.wait_text("#spec", "blog.example.org", Duration::from_secs(5))?;
    b.screenshot("service")?;

    // The events page shows it, and what happens next arrives without a reload.
    b.goto(&format!("http://{addr}/events"))?;
    b.wait_text("#events", "user:alice", Duration::from_secs(5))?;
    let out = node.cli(&["service", "create", "wiki", "--image", "busybox:latest"]);
    ensure!(out.status.success(), "service create: {}", String::from_utf8_lossy(&out.stderr));
    b.wait_text("#events tbody tr:first-child", "wiki", Duration::from_secs(20))?;
    b.screenshot("events")?;

    // An alarm, cleared from its page.
    let (code, _) = node.api(
        "POST",
        "/v1/alarms",
        r#"{"key":"test/browser","message":"disk nearly full","node":null,"service":null}"#,
    )?;
    ensure!(code == 200, "raising an alarm answered {code}");
    b.goto(&format!("http://{addr}/alarms"))?;
    b.wait_text("#alarms", "disk nearly full", Duration::from_secs(5))?;
    b.screenshot("alarms")?;
    b.click("#alarms form.clear button")?;
    b.wait_text("#no-alarms", "No open alarm", Duration::from_secs(20))?;
    let events = node.events()?;
    let cleared = events.iter().find(|e| e["kind"] == "alarm_cleared").context("alarm_cleared")?;
    ensure!(cleared["actor"] == "user:alice", "{cleared}");

    b.goto(&format!("http://{addr}/keys"))?;
    b.find("#key-create")?;
    b.screenshot("keys")?;
    Ok(())
}
