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

/// Logs `name` in through the login page.
fn log_in(b: &mut Browser, addr: &str, name: &str) -> Result<()> {
    b.goto(&format!("http://{addr}/login"))?;
    b.type_into("#login input[name=name]", name)?;
    b.type_into("#login input[name=password]", PASSWORD)?;
    b.click("#login-submit")?;
    b.wait_text("nav", name, Duration::from_secs(20))?;
    Ok(())
}

fn log_out(b: &mut Browser) -> Result<()> {
    b.click("#logout-submit")?;
    b.wait_text("h1", "Log in", Duration::from_secs(20))?;
    Ok(())
}

/// Signs up as `name` on the signup page at `url`.
fn sign_up(b: &mut Browser, url: &str, name: &str) -> Result<()> {
    b.goto(url)?;
    b.type_into("#signup input[name=name]", name)?;
    b.type_into("#signup input[name=password]", PASSWORD)?;
    b.type_into("#signup input[name=password2]", PASSWORD)?;
    b.click("#signup-submit")?;
    Ok(())
}

/// Chooses the signup mode on the settings page (with the template set).
fn set_mode(b: &mut Browser, addr: &str, mode: &str) -> Result<()> {
    b.goto(&format!("http://{addr}/settings"))?;
    b.find("#settings")?;
    b.run(&format!("document.querySelector('#settings select[name=signup]').value = '{mode}';"))?;
    b.run("document.querySelector('#settings input[name=image]').value = 'busybox:latest';")?;
    b.run("document.querySelector('#settings input[name=domain]').value = 'club.example.org';")?;
    b.click("#settings-submit")?;
    b.wait_text("#notice", "Saved", Duration::from_secs(20))?;
    Ok(())
}

#[test]
fn each_signup_mode_end_to_end_and_a_switch_of_authority_in_a_browser() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes =
        coyote_tests::cluster_with(root.path(), 2, |n| n.crm = Some(format!("127.0.0.1:{}", free_port())))?;
    let addr = nodes[0].crm.clone().context("a CRM")?;
    let created = nodes[0].cli_json(&["crm", "activate"])?;
    let url = created["url"].as_str().context("the activation URL")?.to_string();
    let mut b = Browser::start()?;
    b.goto(&url)?;
    b.type_into("#activate input[name=name]", "alice")?;
    b.type_into("#activate input[name=password]", PASSWORD)?;
    b.type_into("#activate input[name=password2]", PASSWORD)?;
    b.click("#activate-submit")?;
    b.wait_text("h1", "Overview", Duration::from_secs(20))?;
    b.wait_text("#nodes", "voter", Duration::from_secs(20))?;

    // Switch authority, after a confirmation.
    let out = nodes[0].cli(&["service", "create", "blog", "--image", "busybox:latest"]);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let placement = nodes[0].cli_json(&["service", "show", "blog"])?["placement"].clone();
    let master = placement["master"].as_u64().context("a master")?;
    let other = if master == 1 { 2 } else { 1 };
    b.goto(&format!("http://{addr}/services/blog"))?;
    b.run(&format!("document.querySelector('#switch select[name=to]').value = '{other}';"))?;
    b.click("#switch input[name=now]")?;
    b.click("#switch-submit")?;
    b.find("#switch-confirm")?;
    b.screenshot("switch-confirm")?;
    ensure!(b.text("#master")? == master.to_string(), "the switch happened before it was confirmed");
    b.click("#switch-confirm-submit")?;
    b.wait_text("#master", &other.to_string(), Duration::from_secs(20))?;
    let events = nodes[0].events()?;
    let switched = events.iter().find(|e| e["kind"] == "authority_switched").context("authority_switched")?;
    ensure!(switched["actor"] == "user:alice", "{switched}");

    // Public: the account and the site at once.
    set_mode(&mut b, &addr, "public")?;
    b.screenshot("settings")?;
    log_out(&mut b)?;
    sign_up(&mut b, &format!("http://{addr}/signup"), "bob")?;
    b.wait_text("#domain", "bob.club.example.org", Duration::from_secs(20))?;
    b.screenshot("me")?;
    log_out(&mut b)?;

    // Approval: waiting, then approved by the admin.
    log_in(&mut b, &addr, "alice")?;
    set_mode(&mut b, &addr, "approval")?;
    log_out(&mut b)?;
    sign_up(&mut b, &format!("http://{addr}/signup"), "carol")?;
    b.wait_text("#steps", "waiting", Duration::from_secs(20))?;
    b.goto(&format!("http://{addr}/login"))?;
    log_in(&mut b, &addr, "alice")?;
    b.goto(&format!("http://{addr}/signups"))?;
    b.screenshot("signups")?;
    b.click("tr[data-signup=carol] form.approve button")?;
    b.wait_text("tr[data-signup=carol] .status", "approved", Duration::from_secs(20))?;
    log_out(&mut b)?;
    log_in(&mut b, &addr, "carol")?;
    b.goto(&format!("http://{addr}/me"))?;
    b.wait_text("#domain", "carol.club.example.org", Duration::from_secs(20))?;
    log_out(&mut b)?;

    // Invite: a link works once.
    log_in(&mut b, &addr, "alice")?;
    set_mode(&mut b, &addr, "invite")?;
    b.goto(&format!("http://{addr}/signups"))?;
    b.click("#invite-create-submit")?;
    let link = b.text("#new-invite")?;
    log_out(&mut b)?;
    sign_up(&mut b, &link, "erin")?;
    b.wait_text("#domain", "erin.club.example.org", Duration::from_secs(20))?;
    log_out(&mut b)?;
    sign_up(&mut b, &link, "frank")?;
    b.wait_text("#error", "already used", Duration::from_secs(20))?;
    b.screenshot("invite-used")?;
    Ok(())
}
