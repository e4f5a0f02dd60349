//! The CRM of a real node, over HTTP: activation, login and its limits, CSRF and origin checks,
//! escaping, the live event stream, and API keys with their scopes.

use anyhow::{ensure, Context, Result};
use coyote_tests::web::Web;
use coyote_tests::{free_port, Node};

/// A node serving its CRM, and the activation URL's path it printed.
fn node_with_crm(root: &std::path::Path) -> Result<(Node, String)> {
    let mut node = Node::new(root, "n1");
    node.crm = Some(format!("127.0.0.1:{}", free_port()));
    node.up()?;
    let created = node.cli_json(&["crm", "activate", "--ttl", "10m"])?;
    let url = created["url"].as_str().context("the activation names its URL")?;
    let path = url.split_once("//").and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_string()));
    Ok((node, path.context("a URL with a path")?))
}

const PASSWORD: &str = "correct-horse-battery";
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Activates the cluster as `alice` through `web`.
fn activate(web: &mut Web, path: &str) -> Result<()> {
    let page = web.get(path)?;
    ensure!(page.status == 200, "the activation page answered {}", page.status);
    let csrf = page.input("csrf").context("the activation form has a CSRF token")?;
    let done = web
        .post(path, &[("csrf", &csrf), ("name", "alice"), ("password", PASSWORD), ("password2", PASSWORD)])?;
    ensure!(done.status == 303, "activation answered {}: {}", done.status, done.body);
    Ok(())
}

#[test]
fn activation_is_single_use_and_forms_need_their_token_and_origin() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (node, path) = node_with_crm(root.path())?;
    let addr = node.crm.clone().unwrap();

    // Without the CSRF token, and from another site: refused, and nobody is created.
    let mut mallory = Web::new(&addr);
    let page = mallory.get(&path)?;
    let csrf = page.input("csrf").context("csrf")?;
    let fields = [("name", "mallory"), ("password", PASSWORD), ("password2", PASSWORD)];
    let no_token = mallory.post(&path, &fields)?;
    assert_eq!(no_token.status, 403, "{}", no_token.body);
    let with_token: Vec<(&str, &str)> = std::iter::once(("csrf", csrf.as_str())).chain(fields).collect();
    let elsewhere = mallory.post_from(&path, &with_token, Some("http://evil.example"))?;
    assert_eq!(elsewhere.status, 403, "{}", elsewhere.body);
    assert!(elsewhere.body.contains("another site"), "{}", elsewhere.body);
    let users = node.cli_json_lines(&["crm", "users"])?;
    assert!(users.is_empty(), "a refused form created a user: {users:?}");

    // The first use creates the admin, and logs her in.
    let mut alice = Web::new(&addr);
    activate(&mut alice, &path)?;
    let overview = alice.get("/")?;
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("Account (alice)"), "{}", overview.body);
    let cookie = overview.header("content-security-policy").unwrap_or_default().to_string();
    assert!(cookie.contains("script-src 'self'") && !cookie.contains("unsafe-inline"), "CSP: {cookie}");

    // A second use of the same URL is refused, whoever tries.
    let page = mallory.get(&path)?;
    let csrf = page.input("csrf").context("csrf")?;
    let again = mallory.post(
        &path,
        &[("csrf", &csrf), ("name", "mallory"), ("password", PASSWORD), ("password2", PASSWORD)],
    )?;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("already used"), "{}", again.body);
    let users = node.cli_json_lines(&["crm", "users"])?;
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0]["role"], "Admin");

    // The use is an event, with no password hash in it.
    let events = node.events()?;
    let activated = events.iter().find(|e| e["kind"] == "admin_activated").context("admin_activated")?;
    assert!(activated["actor"].as_str().unwrap_or("").starts_with("activation:"), "{activated}");
    assert!(!activated.to_string().contains("$argon2id$"), "a password hash is shown: {activated}");
    Ok(())
}

#[test]
fn wrong_passwords_are_limited_and_names_are_escaped() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (node, path) = node_with_crm(root.path())?;
    let addr = node.crm.clone().unwrap();
    let mut alice = Web::new(&addr);
    activate(&mut alice, &path)?;

    let mut guesser = Web::new(&addr);
    let login = |web: &mut Web, password: &str| -> Result<u16> {
        let page = web.get("/login")?;
        let csrf = page.input("csrf").context("csrf")?;
        Ok(web.post("/login", &[("csrf", &csrf), ("name", "alice"), ("password", password)])?.status)
    };
    for i in 0..5 {
        assert_eq!(login(&mut guesser, &format!("wrong-password-{i}"))?, 401);
    }
    assert_eq!(login(&mut guesser, "wrong-password-6")?, 429, "the sixth wrong password in a minute");
    // The account is held for a minute, even with the right password.
    assert_eq!(login(&mut Web::new(&addr), PASSWORD)?, 429);

    // Text from outside is escaped: a service name, and an alarm message.
    let page = alice.get("/services")?;
    let csrf = page.input("csrf").context("csrf")?;
    let bad = alice
        .post("/services", &[("csrf", &csrf), ("name", "<script>alert(1)</script>"), ("image", "busybox")])?;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("alert(1)"), "the name is not shown: {}", bad.body);
    assert!(!bad.body.contains("<script>alert"), "a name is not escaped: {}", bad.body);
    let (code, _) = node.api(
        "POST",
        "/v1/alarms",
        r#"{"key":"test/xss","message":"<img src=x onerror=alert(1)>","node":null,"service":null}"#,
    )?;
    assert_eq!(code, 200);
    let overview = alice.get("/")?;
    assert!(overview.body.contains("onerror=alert(1)"), "the message is not shown: {}", overview.body);
    assert!(!overview.body.contains("<img src=x"), "an alarm message is not escaped");
    Ok(())
}

#[test]
fn the_event_stream_is_live_and_resumes_and_keys_have_scopes() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (node, path) = node_with_crm(root.path())?;
    let addr = node.crm.clone().unwrap();
    let mut alice = Web::new(&addr);
    activate(&mut alice, &path)?;

    // Nobody logged in sees no events.
    let anonymous = Web::new(&addr).get("/events")?;
    assert_eq!(anonymous.status, 303, "{anonymous:?}");

    let mut stream = alice.stream("/events/stream", None)?;
    let page = alice.get("/services")?;
    let csrf = page.input("csrf").context("csrf")?;
    let created = alice.post(
        "/services",
        &[("csrf", &csrf), ("name", "blog"), ("image", "busybox:latest"), ("domains", "blog.example.org")],
    )?;
    assert_eq!(created.status, 303, "{}", created.body);
    let event = loop {
        let e = stream.next_event()?;
        if e.data.contains("service_created") {
            break e;
        }
    };
    assert!(event.data.contains("\"actor\":\"user:alice\""), "{}", event.data);
    let id = event.id.context("events have ids")?;

    // After a reconnect with Last-Event-ID, the stream starts after that event.
    let (code, _) = node.api(
        "POST",
        "/v1/alarms",
        r#"{"key":"test/resume","message":"after the reconnect","node":null,"service":null}"#,
    )?;
    assert_eq!(code, 200);
    let mut resumed = alice.stream("/events/stream", Some(id))?;
    let next = resumed.next_event()?;
    assert_eq!(next.id, Some(id + 1), "{next:?}");

    // API keys: shown once; read keys read, write keys write, no key reaches the accounts.
    let key = |web: &mut Web, scope: &str| -> Result<String> {
        let page = web.get("/keys")?;
        let csrf = page.input("csrf").context("csrf")?;
        let shown =
            web.post("/keys", &[("csrf", &csrf), ("label", &format!("{scope} script")), ("scope", scope)])?;
        let at = shown.body.find("<code id=\"new-key\">").context("the new key is shown")?;
        let rest = &shown.body[at + 19..];
        Ok(rest[..rest.find('<').context("end of key")?].to_string())
    };
    let read = key(&mut alice, "read")?;
    let write = key(&mut alice, "write")?;
    assert!(!alice.get("/keys")?.body.contains(&read), "a key is shown twice");
    let api = |key: &str, method: &str, path: &str, body: Option<&str>| -> Result<u16> {
        let headers =
            [("Authorization", format!("Bearer {key}")), ("Content-Type", "application/json".into())];
        Ok(Web::new(&addr).request(method, path, &headers, body.map(str::as_bytes))?.status)
    };
    let spec = r#"{"name":"wiki","image":"busybox:latest","domains":[],"ports":[],"memory_bytes":null,"on_demand":false}"#;
    assert_eq!(api(&read, "GET", "/api/v1/services", None)?, 200);
    assert_eq!(api(&read, "POST", "/api/v1/services", Some(spec))?, 403);
    assert_eq!(api(&write, "POST", "/api/v1/services", Some(spec))?, 200);
    assert_eq!(api(&write, "GET", "/api/v1/keys", None)?, 403);
    assert_eq!(api("coyote_nokey_0000", "GET", "/api/v1/services", None)?, 401);
    assert_eq!(Web::new(&addr).get("/api/v1/services")?.status, 401);
    let events = node.events()?;
    let wiki = events
        .iter()
        .find(|e| e["kind"] == "service_created" && e["summary"].as_str().unwrap_or("").contains("wiki"))
        .context("wiki created")?;
    assert!(wiki["actor"].as_str().unwrap_or("").starts_with("key:"), "{wiki}");

    // The API's OpenAPI document is public and describes the routes a key reaches, no others.
    let reply = Web::new(&addr).get("/api/v1/openapi.json")?;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let doc: serde_json::Value = serde_json::from_str(&reply.body).context("the document is JSON")?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", doc["openapi"]);
    assert_eq!(doc["servers"][0]["url"], "/api");
    assert_eq!(doc["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    let paths = doc["paths"].as_object().context("the document has paths")?;
    assert!(paths["/v1/services"].get("get").is_some() && paths["/v1/services"].get("post").is_some());
    assert!(paths.contains_key("/v1/services/{name}/switch") && paths.contains_key("/v1/backups/{service}"));
    for keyless in ["/v1/keys", "/v1/users", "/v1/activations"] {
        assert!(!paths.contains_key(keyless), "{keyless} is only for the pages, yet documented");
    }
    // Every documented read without parameters is a route (a path no route takes gets "no such
    // route"), and every answer is JSON, errors included.
    let mut reads = 0;
    for (path, item) in paths {
        if path.contains('{') || item.get("get").is_none() {
            continue;
        }
        let headers = [("Authorization", format!("Bearer {read}"))];
        let answer = Web::new(&addr).request("GET", &format!("/api{path}"), &headers, None)?;
        let body = serde_json::from_str::<serde_json::Value>(&answer.body).with_context(|| {
            format!("GET /api{path} answered {} without JSON: {:?}", answer.status, answer.body)
        })?;
        assert_ne!(body["error"], "no such route", "GET /api{path}");
        reads += 1;
    }
    assert!(reads >= 10, "only {reads} documented reads");
    let headers = [("Authorization", format!("Bearer {read}"))];
    let nowhere = Web::new(&addr).request("GET", "/api/v1/nowhere", &headers, None)?;
    assert_eq!((nowhere.status, nowhere.body.as_str()), (404, r#"{"error":"no such route"}"#));
    let headers = [("Authorization", format!("Bearer {write}")), ("Content-Type", "application/json".into())];
    let bad = Web::new(&addr).request("POST", "/api/v1/services", &headers, Some(b"{\"name\":"))?;
    assert_eq!(bad.status, 400, "{bad:?}");
    let error: serde_json::Value = serde_json::from_str(&bad.body).context("a bad body's error is JSON")?;
    assert!(error["error"].as_str().is_some_and(|e| e.contains("EOF")), "{error}");
    // A spec made of the schema's required fields only is accepted.
    let schema = &doc["components"]["schemas"]["ServiceSpec"];
    let mut spec = serde_json::Map::new();
    for field in schema["required"].as_array().context("the spec's schema lists required fields")? {
        let field = field.as_str().context("a field name")?;
        let value = match (field, schema["properties"][field]["type"].as_str()) {
            ("name", _) => serde_json::json!("docs"),
            ("image", _) => serde_json::json!("busybox:latest"),
            (_, Some("array")) => serde_json::json!([]),
            (_, Some("boolean")) => serde_json::json!(false),
            (_, Some("integer")) => serde_json::json!(0),
            (_, Some("string")) => serde_json::json!(""),
            (_, other) => anyhow::bail!("required field {field} of type {other:?}"),
        };
        spec.insert(field.to_string(), value);
    }
    let spec = serde_json::Value::Object(spec).to_string();
    assert_eq!(api(&write, "POST", "/api/v1/services", Some(&spec))?, 200, "{spec}");
    Ok(())
}

/// Signs up as `name` through `web` (with an invite code, if any); the answer to the form.
fn sign_up(web: &mut Web, name: &str, invite: &str) -> Result<coyote_tests::web::Reply> {
    let page = web.get(&format!("/signup?invite={invite}"))?;
    let csrf = page.input("csrf").context("the signup page has a form")?;
    web.post(
        "/signup",
        &[
            ("csrf", &csrf),
            ("name", name),
            ("password", PASSWORD),
            ("password2", PASSWORD),
            ("invite", invite),
        ],
    )
}

fn settings(admin: &mut Web, mode: &str) -> Result<()> {
    let page = admin.get("/settings")?;
    let csrf = page.input("csrf").context("csrf")?;
    let saved = admin.post(
        "/settings",
        &[
            ("csrf", &csrf),
            ("cluster_name", "Club des randonneurs"),
            ("signup", mode),
            ("image", "busybox:latest"),
            ("domain", "club.example.org"),
            ("http_port", "8080"),
        ],
    )?;
    ensure!(
        saved.status == 200 && saved.body.contains("Saved."),
        "settings: {} {}",
        saved.status,
        saved.body
    );
    Ok(())
}

#[test]
fn each_signup_mode_creates_members_and_their_services() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (node, path) = node_with_crm(root.path())?;
    let addr = node.crm.clone().unwrap();
    let mut admin = Web::new(&addr);
    activate(&mut admin, &path)?;

    // Closed by default.
    let closed = Web::new(&addr).get("/signup")?;
    assert_eq!(closed.status, 403);
    assert!(closed.body.contains("closed"), "{}", closed.body);

    // Public: the member and the service exist at once, and the member lands on their own page.
    settings(&mut admin, "public")?;
    let mut bob = Web::new(&addr);
    let done = sign_up(&mut bob, "bob", "")?;
    assert_eq!(done.status, 303, "{}", done.body);
    let me = bob.get("/me")?;
    assert!(me.body.contains("bob.club.example.org"), "{}", me.body);
    assert_eq!(bob.get("/")?.header("location"), Some("/me"), "a member does not see the admin pages");
    let service = node.cli_json(&["service", "show", "bob"])?;
    assert_eq!(service["spec"]["http_port"], 8080, "{service}");
    // The master observes that it serves the service: the last step.
    coyote_tests::wait_until("bob's site served", std::time::Duration::from_secs(30), || {
        let me = bob.get("/me")?;
        Ok(me.body.contains("(Server 1)").then_some(()))
    })?;
    assert_eq!(sign_up(&mut Web::new(&addr), "bob", "")?.status, 409, "a name signs up once");

    // Approval: nothing until an admin approves.
    settings(&mut admin, "approval")?;
    let mut carol = Web::new(&addr);
    assert_eq!(sign_up(&mut carol, "carol", "")?.status, 303);
    let waiting = carol.get("/me")?;
    assert!(waiting.body.contains("waiting") && !waiting.body.contains("carol.club"), "{}", waiting.body);
    ensure!(node.cli_json(&["service", "show", "carol"]).is_err(), "carol's service exists before approval");
    let list = admin.get("/signups")?;
    let csrf = list.input("csrf").context("csrf")?;
    let approved = admin.post("/signups/carol/decide", &[("csrf", &csrf), ("decision", "approve")])?;
    assert_eq!(approved.status, 303, "{}", approved.body);
    assert!(carol.get("/me")?.body.contains("carol.club.example.org"));
    node.cli_json(&["service", "show", "carol"])?;
    let mut dave = Web::new(&addr);
    assert_eq!(sign_up(&mut dave, "dave", "")?.status, 303);
    admin.post(
        "/signups/dave/decide",
        &[("csrf", &csrf), ("decision", "reject"), ("reason", "unknown to us")],
    )?;
    assert!(dave.get("/me")?.body.contains("unknown to us"));

    // Invite: refused without a link; a link works once.
    settings(&mut admin, "invite")?;
    let refused = sign_up(&mut Web::new(&addr), "erin", "")?;
    assert_eq!(refused.status, 409);
    assert!(refused.body.contains("invite link"), "{}", refused.body);
    let list = admin.get("/signups")?;
    let csrf = list.input("csrf").context("csrf")?;
    let made = admin.post("/invites", &[("csrf", &csrf), ("days", "7")])?;
    let at = made.body.find("<code id=\"new-invite\">").context("the invite link is shown")?;
    let link = &made.body[at + 22..];
    let link = &link[..link.find('<').context("end")?];
    let code = link.split_once("invite=").context("a link with its code")?.1.to_string();
    assert_eq!(sign_up(&mut Web::new(&addr), "erin", &code)?.status, 303);
    let twice = sign_up(&mut Web::new(&addr), "frank", &code)?;
    assert_eq!(twice.status, 409);
    assert!(twice.body.contains("already used"), "{}", twice.body);

    // Every step is an event with its actor.
    let events = node.events()?;
    let requested: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "signup_requested")
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert!(requested.contains(&"signup:bob") && requested.contains(&"signup:erin"), "{requested:?}");
    let decided = events.iter().find(|e| e["kind"] == "signup_decided").context("signup_decided")?;
    assert_eq!(decided["actor"], "user:alice");
    assert!(!events.iter().any(|e| e.to_string().contains("$argon2id$")), "a password hash is shown");
    Ok(())
}

#[test]
fn a_spec_change_shows_its_diff_first_and_can_be_reverted_and_tokens_are_made_on_a_page() -> Result<()> {
    let root = tempfile::tempdir()?;
    let (node, path) = node_with_crm(root.path())?;
    let addr = node.crm.clone().unwrap();
    let mut alice = Web::new(&addr);
    activate(&mut alice, &path)?;
    let out =
        node.cli(&["service", "create", "blog", "--image", "busybox:1", "--domain", "blog.example.org"]);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let image = || -> Result<String> {
        Ok(node.cli_json(&["service", "show", "blog"])?["spec"]["image"].as_str().unwrap_or("").to_string())
    };

    // The change is shown before it is committed, and nothing changes until it is confirmed.
    let page = alice.get("/services/blog")?;
    let csrf = page.input("csrf").context("csrf")?;
    let fields = [("csrf", csrf.as_str()), ("image", "busybox:2"), ("domains", "blog.example.org")];
    let preview = alice.post("/services/blog/update", &fields)?;
    assert_eq!(preview.status, 200, "{}", preview.body);
    assert!(preview.body.contains("- ") && preview.body.contains("busybox:1"), "{}", preview.body);
    assert!(preview.body.contains("+ ") && preview.body.contains("busybox:2"), "{}", preview.body);
    assert_eq!(image()?, "busybox:1", "a preview changed the spec");
    let confirmed: Vec<(&str, &str)> = fields.iter().copied().chain([("confirm", "yes")]).collect();
    assert_eq!(alice.post("/services/blog/update", &confirmed)?.status, 303);
    assert_eq!(image()?, "busybox:2");

    // Reverted from its event: a new event restores the old spec.
    let events = node.events()?;
    let change = events.iter().rev().find(|e| e["kind"] == "service_spec_changed").context("the change")?;
    assert_eq!(change["actor"], "user:alice");
    let index = change["index"].as_u64().context("index")?;
    let listed = alice.get("/events")?;
    assert!(listed.body.contains(&format!("/events/{index}/revert")), "no revert link");
    let shown = alice.get(&format!("/events/{index}/revert"))?;
    assert!(shown.body.contains("busybox:1"), "{}", shown.body);
    let csrf = shown.input("csrf").context("csrf")?;
    let reverted = alice.post(&format!("/events/{index}/revert"), &[("csrf", &csrf), ("confirm", "yes")])?;
    assert_eq!(reverted.status, 303, "{}", reverted.body);
    assert_eq!(image()?, "busybox:1");
    let events = node.events()?;
    let last = events.iter().rev().find(|e| e["kind"] == "service_spec_changed").context("the revert")?;
    assert!(last["index"].as_u64() > Some(index), "the revert is a new event");

    // A join token, with the command to run, and revoked.
    let page = alice.get("/tokens")?;
    let csrf = page.input("csrf").context("csrf")?;
    let made = alice.post("/tokens", &[("csrf", &csrf), ("hours", "2"), ("uses", "1")])?;
    assert!(made.body.contains("<code id=\"join-command\">coyote join "), "{}", made.body);
    let tokens = node.cli_json_lines(&["token", "list"])?;
    let id = tokens[0]["id"].as_str().context("a token")?.to_string();
    assert_eq!(tokens[0]["status"], "valid");
    assert_eq!(alice.post(&format!("/tokens/{id}/revoke"), &[("csrf", &csrf)])?.status, 303);
    assert_eq!(node.cli_json_lines(&["token", "list"])?[0]["status"], "revoked");
    Ok(())
}

#[test]
fn the_crm_of_a_follower_writes_through_the_leader_and_a_signup_survives_the_leader() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes =
        coyote_tests::cluster_with(root.path(), 3, |n| n.crm = Some(format!("127.0.0.1:{}", free_port())))?;
    let leader = coyote_tests::leader_index(&nodes)?;
    let follower = (leader + 1) % 3;
    let addr = nodes[follower].crm.clone().context("a CRM")?;
    let created = nodes[follower].cli_json(&["crm", "activate"])?;
    let url = created["url"].as_str().context("url")?;
    let path = &url[url.find("/activate/").context("path")?..];
    let mut admin = Web::new(&addr);
    activate(&mut admin, path)?;
    settings(&mut admin, "approval")?;
    let mut carol = Web::new(&addr);
    assert_eq!(sign_up(&mut carol, "carol", "")?.status, 303);

    // The leader dies between the request and the approval.
    nodes[leader].kill9();
    let list = admin.get("/signups")?;
    let csrf = list.input("csrf").context("csrf")?;
    coyote_tests::wait_until("the approval to commit", std::time::Duration::from_secs(30), || {
        let r = admin.post("/signups/carol/decide", &[("csrf", &csrf), ("decision", "approve")])?;
        Ok((r.status == 303).then_some(()))
    })?;
    let me = carol.get("/me")?;
    assert!(me.body.contains("carol.club.example.org"), "{}", me.body);
    let other = 3 - leader - follower;
    coyote_tests::wait_until(
        "the other survivor to see carol's service",
        std::time::Duration::from_secs(10),
        || Ok(nodes[other].cli_json(&["service", "show", "carol"]).ok()),
    )?;
    let events = nodes[other].events()?;
    let actors: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "signup_requested" || e["kind"] == "signup_decided")
        .filter(|e| e["outcome"] == "applied")
        .filter_map(|e| e["actor"].as_str())
        .collect();
    assert_eq!(actors, ["signup:carol", "user:alice"]);

    // A session made by one node's pages is taken by every other's, its form token included.
    let other_addr = nodes[other].crm.clone().context("a CRM")?;
    let mut elsewhere = Web::new(&other_addr);
    elsewhere.cookie = admin.cookie.clone();
    let page = elsewhere.get("/account")?;
    assert_eq!(page.status, 200, "the session of node {follower} at node {other}: {page:?}");
    let csrf = page.input("csrf").context("csrf")?;
    let changed = elsewhere.post(
        "/account/password",
        &[
            ("csrf", &csrf),
            ("current", PASSWORD),
            ("password", "another-horse-battery"),
            ("password2", "another-horse-battery"),
        ],
    )?;
    assert_eq!(changed.status, 200, "{}", changed.body);
    // The password change ends the other sessions of the user on every node (once each has applied
    // it), not this one.
    let old_cookie = admin.cookie.clone();
    for (at, name) in [(&addr, follower), (&other_addr, other)] {
        coyote_tests::wait_until(&format!("node {name} to refuse the old session"), TIMEOUT, || {
            let mut stale = Web::new(at);
            stale.cookie = old_cookie.clone();
            Ok((stale.get("/account")?.status == 303).then_some(()))
        })?;
    }
    assert_eq!(elsewhere.get("/account")?.status, 200, "the session that changed the password ended");
    let mut moved = Web::new(&addr);
    moved.cookie = elsewhere.cookie.clone();
    assert_eq!(moved.get("/account")?.status, 200, "the renewed session is not taken at node {follower}");
    // A session cookie that was tampered with is a new visitor's.
    let mut forged = Web::new(&addr);
    forged.cookie = elsewhere.cookie.as_ref().map(|c| c.replacen('.', ".9", 1));
    assert_eq!(forged.get("/account")?.status, 303);
    Ok(())
}

#[test]
fn the_stats_page_charts_the_traffic_of_each_domain() -> Result<()> {
    use std::io::{Read, Write};
    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    node.crm = Some(format!("127.0.0.1:{}", free_port()));
    let http = format!("127.0.0.1:{}", free_port());
    node.front = Some((http.clone(), format!("127.0.0.1:{}", free_port())));
    node.up()?;
    let addr = node.crm.clone().unwrap();
    let code = node.cli_json(&["crm", "activate"])?["code"].as_str().context("code")?.to_string();
    let mut alice = Web::new(&addr);
    activate(&mut alice, &format!("/activate/{code}"))?;
    let out =
        node.cli(&["service", "create", "blog", "--image", "busybox:latest", "--domain", "blog.example.org"]);
    ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..3 {
        let mut s = std::net::TcpStream::connect(&http)?;
        write!(s, "GET / HTTP/1.1\r\nHost: blog.example.org\r\nConnection: close\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
    }
    // A sample every 10 s: the domain appears with its chart once a sample has counted it.
    let page = coyote_tests::wait_until("the domain's chart", std::time::Duration::from_secs(30), || {
        let page = alice.get("/stats")?;
        Ok(page.body.contains("data-domain=\"blog.example.org\"").then_some(page))
    })?;
    assert!(page.body.contains("<svg") && page.body.contains("<polyline"), "{}", page.body);
    assert!(page.body.contains("blog.example.org: requests"), "{}", page.body);
    Ok(())
}

/// `curl -i` against the node's proxy, with `name` resolved to 127.0.0.1 on both of its ports.
fn curl_front(front: &(u16, u16), ca: &std::path::Path, name: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-i", "--max-time", "20", "--cacert"])
        .arg(ca)
        .args(["--resolve", &format!("{name}:{}:127.0.0.1", front.0)])
        .args(["--resolve", &format!("{name}:{}:127.0.0.1", front.1)])
        .args(args)
        .output()
        .context("curl is needed by this test")?;
    ensure!(out.status.success(), "curl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn the_proxy_serves_the_crm_at_the_admin_domain_over_https_with_secure_cookies() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    node.crm = Some(format!("127.0.0.1:{}", free_port()));
    let front = (free_port(), free_port());
    node.front = Some((format!("127.0.0.1:{}", front.0), format!("127.0.0.1:{}", front.1)));
    node.flags = vec!["--acme".into(), "off".into()];
    node.up()?;
    let created = node.cli_json(&["crm", "activate", "--ttl", "10m"])?;
    let url = created["url"].as_str().context("an activation URL")?;
    let path =
        url.split_once("//").and_then(|(_, r)| r.find('/').map(|i| r[i..].to_string())).context("a path")?;
    activate(&mut Web::new(node.crm.as_deref().unwrap_or_default()), &path)?;

    let admin = format!("admin-{}.test", std::process::id());
    let (code, mut settings) = node.api("GET", "/v1/settings", "")?;
    ensure!(code == 200, "GET /v1/settings answered {code}");
    // No domain is served before the admin names one.
    let ca = node.dir.join("tls").join("ca.pem");
    let https = |p: &str| format!("https://{admin}:{}{p}", front.1);
    let before = curl_front(&front, &ca, &admin, &[&https("/login")]).err().context("no name before")?;
    assert!(before.to_string().contains("unrecognized name"), "{before}");
    settings["admin_domain"] = serde_json::Value::String(admin.clone());
    let (code, answer) = node.api("PUT", "/v1/settings", &settings.to_string())?;
    ensure!(code == 200, "PUT /v1/settings answered {code}: {answer}");

    // Over HTTPS, with a certificate of the cluster's CA for that name: the login page, a Secure
    // session cookie, HSTS; over HTTP/2 too.
    let page = curl_front(&front, &ca, &admin, &[&https("/login")])?;
    assert!(page.starts_with("HTTP/") && page.contains(" 200"), "{page}");
    let cookie =
        page.lines().find(|l| l.to_ascii_lowercase().starts_with("set-cookie:")).context("a cookie")?;
    assert!(cookie.contains("HttpOnly") && cookie.contains("; Secure"), "{cookie}");
    assert!(page.to_ascii_lowercase().contains("strict-transport-security: max-age="), "{page}");
    let h2 = curl_front(&front, &ca, &admin, &["--http2", &https("/login")])?;
    assert!(h2.starts_with("HTTP/2 200"), "{h2}");
    // Plain HTTP is sent to HTTPS.
    let plain = curl_front(&front, &ca, &admin, &[&format!("http://{admin}:{}/login", front.0)])?;
    assert!(plain.contains(" 308") && plain.contains(&format!("https://{admin}/login")), "{plain}");

    // Logging in works through the proxy: the form's token, the cookie, the origin check.
    let jar = root.path().join("jar");
    let jar = jar.to_str().context("a path")?;
    let login = curl_front(&front, &ca, &admin, &["-c", jar, &https("/login")])?;
    let csrf =
        login.split("name=\"csrf\" value=\"").nth(1).and_then(|r| r.split('"').next()).context("csrf")?;
    let origin = format!("Origin: https://{admin}:{}", front.1);
    let body = format!("csrf={csrf}&name=alice&password={PASSWORD}");
    let posted = curl_front(
        &front,
        &ca,
        &admin,
        &["-b", jar, "-c", jar, "-H", &origin, "--data", &body, &https("/login")],
    )?;
    assert!(posted.contains(" 303"), "{posted}");
    let overview = curl_front(&front, &ca, &admin, &["-b", jar, &https("/")])?;
    assert!(overview.contains("Account (alice)"), "{overview}");

    // The name is the CRM's: no service may take it.
    let err = node.cli_err(&["service", "create", "squat", "--image", "none:1", "--domain", &admin])?;
    assert!(err.contains("admin domain"), "{err}");
    Ok(())
}

#[test]
fn the_overview_shows_what_the_cluster_can_lose_and_removes_a_dead_server() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes =
        coyote_tests::cluster_with(root.path(), 3, |n| n.crm = Some(format!("127.0.0.1:{}", free_port())))?;
    let addr = nodes[0].crm.clone().context("a CRM")?;
    let created = nodes[0].cli_json(&["crm", "activate"])?;
    let url = created["url"].as_str().context("url")?;
    let mut admin = Web::new(&addr);
    activate(&mut admin, &url[url.find("/activate/").context("path")?..])?;
    let page = admin.get("/")?;
    assert!(page.body.contains("Servers it can lose now: 1 of 3"), "{}", page.body);
    assert!(!page.body.contains("action=\"/nodes/"), "no remove button while every server answers");

    let dead = nodes[2].id()?;
    nodes[2].kill9();
    let page = coyote_tests::wait_until("the overview to show the dead server", TIMEOUT, || {
        let page = admin.get("/")?;
        Ok(page.body.contains("Servers it can lose now: 0 of 3").then_some(page))
    })?;
    assert!(page.body.contains("one more failure stops every change"), "{}", page.body);
    let action = format!("action=\"/nodes/{dead}/remove\"");
    assert!(page.body.contains(&action), "a remove button for node {dead}: {}", page.body);
    let csrf = page.input("csrf").context("csrf")?;
    let path = format!("/nodes/{dead}/remove");
    // Refused (the page says why) until the others report it gone; then removed.
    coyote_tests::wait_until("the removal", TIMEOUT, || {
        let r = admin.post(&path, &[("csrf", &csrf)])?;
        if r.status != 303 {
            assert!(r.body.contains("is not gone"), "{}", r.body);
        }
        Ok((r.status == 303).then_some(()))
    })?;
    let events = nodes[1].events()?;
    let removal = events.iter().find(|e| e["kind"] == "node_removed").context("the removal")?;
    assert_eq!(removal["actor"], "user:alice", "{removal}");
    coyote_tests::wait_until("the membership to shrink", TIMEOUT, || {
        let page = admin.get("/")?;
        Ok((page.body.contains("Servers it can lose now: 0 of 2") && !page.body.contains(&action))
            .then_some(()))
    })?;
    Ok(())
}
