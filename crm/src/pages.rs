//! The routes: each page is a handler that reads the replica, renders a template, and each form
//! posts to a handler that checks the session and its CSRF token, then calls the node's API.

// The checks that open a handler answer early with a whole page (`Err(Response)`), returned at once.
#![allow(clippy::result_large_err)]

use std::convert::Infallible;
use std::time::Duration;

use askama::Template;
use axum::body::{Body, Bytes};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Extension, Form, Router};
use coyote_state_machine::accounts::{CrmSettings, SignupMode, SignupStatus, SignupTemplate};
use coyote_state_machine::spec::parse_port;
use coyote_state_machine::{format_ms, KeyScope, ServiceSpec, Subject};
use coyote_wire::{Committed, EventView, KeyCreated};
use serde::Deserialize;

use crate::auth::{self, Session};
use crate::text::Text;
use crate::{Crm, CrmError};

/// Events shown on the events page.
const EVENTS_SHOWN: u64 = 200;
/// The Content-Security-Policy of every page: nothing inline, nothing from elsewhere.
const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
const APP_JS: &str = include_str!("../static/app.js");
const APP_CSS: &str = include_str!("../static/app.css");

pub fn router(crm: Crm) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/activate/{code}", get(activate_page).post(activate))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/account", get(account_page))
        .route("/nodes/{id}/remove", post(node_remove))
        .route("/account/password", post(password_change))
        .route("/services", get(services_page).post(service_create))
        .route("/services/{name}", get(service_page))
        .route("/services/{name}/switch", post(service_switch))
        .route("/services/{name}/remove", post(service_remove))
        .route("/services/{name}/update", post(service_update))
        .route("/events/{index}/revert", get(revert_page).post(revert))
        .route("/tokens", get(tokens_page).post(token_create))
        .route("/stats", get(stats_page))
        .route("/tokens/{id}/revoke", post(token_revoke))
        .route("/alarms", get(alarms_page))
        .route("/alarms/{id}/clear", post(alarm_clear))
        .route("/events", get(events_page))
        .route("/events/stream", get(events_stream))
        .route("/keys", get(keys_page).post(key_create))
        .route("/keys/{id}/revoke", post(key_revoke))
        .route("/static/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/static/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
        .route("/signup", get(signup_page).post(signup))
        .route("/me", get(me_page))
        .route("/signups", get(signups_page))
        .route("/signups/{name}/decide", post(signup_decide))
        .route("/invites", post(invite_create))
        .route("/invites/{id}/revoke", post(invite_revoke))
        .route("/settings", get(settings_page).post(settings_save))
        .route("/api/v1/openapi.json", get(api_document))
        .route("/api/v1/{*path}", any(api))
        .layer(axum::middleware::map_response(security_headers))
        .layer(axum::middleware::from_fn(secure_cookies))
        .with_state(crm)
}

/// A request that reached the pages over TLS (the proxy at the admin domain marks it so): its
/// cookies are `Secure`, and the browser is told to come back over HTTPS only.
async fn secure_cookies(request: Request, next: axum::middleware::Next) -> Response {
    let tls = request.extensions().get::<crate::OverTls>().is_some();
    let mut response = next.run(request).await;
    if tls {
        let h = response.headers_mut();
        let cookies: Vec<HeaderValue> = h.get_all(header::SET_COOKIE).iter().cloned().collect();
        h.remove(header::SET_COOKIE);
        for c in cookies {
            let text = c.to_str().unwrap_or_default();
            let secure = if text.contains("; Secure") { text.to_string() } else { format!("{text}; Secure") };
            if let Ok(v) = HeaderValue::from_str(&secure) {
                h.append(header::SET_COOKIE, v);
            }
        }
        h.insert("strict-transport-security", HeaderValue::from_static("max-age=31536000"));
    }
    response
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    response
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

/// What every page needs: the texts, who is logged in, the CSRF token for its forms.
struct Layout {
    t: &'static Text,
    title: String,
    user: Option<String>,
    /// Whether the user is an admin (members see only their own page).
    admin: bool,
    csrf: String,
}

/// A request's session, and the cookie to set when it is new.
struct Visit {
    session: Session,
    set_cookie: Option<HeaderValue>,
    /// The texts in the visitor's language.
    t: &'static Text,
}

impl Visit {
    fn layout(&self, crm: &Crm, title: &str) -> Layout {
        let user = self.session.user.clone();
        let admin = user.as_ref().is_some_and(|u| {
            crm.node().store().with_state(|s| {
                s.accounts.users.get(u).is_some_and(|u| u.role == coyote_state_machine::UserRole::Admin)
            })
        });
        Layout { t: self.t, title: title.to_string(), user, admin, csrf: self.session.csrf.clone() }
    }

    fn actor(&self) -> String {
        format!("user:{}", self.session.user.as_deref().unwrap_or("?"))
    }

    /// `response` with the session cookie set if the session is new.
    fn reply(&self, response: impl IntoResponse) -> Response {
        let mut response = response.into_response();
        if let Some(cookie) = &self.set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie.clone());
        }
        response
    }
}

fn visit(crm: &Crm, headers: &HeaderMap) -> Visit {
    let (session, set_cookie) = crm.session(headers);
    let t = crate::text::for_languages(headers.get(header::ACCEPT_LANGUAGE).and_then(|h| h.to_str().ok()));
    Visit { session, set_cookie, t }
}

/// A page for a logged-in admin: the visit, or the redirect to the login page.
fn admin(crm: &Crm, headers: &HeaderMap) -> Result<Visit, Response> {
    let v = visit(crm, headers);
    let Some(user) = &v.session.user else {
        return Err(v.reply(Redirect::to("/login")));
    };
    let is_admin = crm.node().store().with_state(|s| {
        s.accounts.users.get(user).is_some_and(|u| u.role == coyote_state_machine::UserRole::Admin)
    });
    if !is_admin {
        return Err(v.reply(Redirect::to("/me")));
    }
    Ok(v)
}

/// A form post: the visit, once its CSRF token and origin check out.
fn checked_post(crm: &Crm, headers: &HeaderMap, csrf: &str, need_admin: bool) -> Result<Visit, Response> {
    let v = if need_admin { admin(crm, headers)? } else { visit(crm, headers) };
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        let origin = origin.to_str().unwrap_or("");
        let same = origin.split_once("://").is_some_and(|(_, rest)| rest == host) && !host.is_empty();
        if !same {
            let e = CrmError::new(StatusCode::FORBIDDEN, "this form was posted from another site: refused");
            return Err(error_page(crm, &v, e));
        }
    }
    if !auth::same(csrf, &v.session.csrf) {
        let e = CrmError::new(
            StatusCode::FORBIDDEN,
            "this form's security token is missing or stale: reload the page and send it again",
        );
        return Err(error_page(crm, &v, e));
    }
    Ok(v)
}

fn render(v: &Visit, page: impl Template) -> Response {
    match page.render() {
        Ok(html) => v.reply(Html(html)),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot render the page: {e}")).into_response(),
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    layout: Layout,
    message: String,
}

fn error_page(crm: &Crm, v: &Visit, e: CrmError) -> Response {
    let layout = v.layout(crm, v.t.error_title);
    let mut response = render(v, ErrorPage { layout, message: e.message });
    *response.status_mut() = e.status;
    response
}

// ---- activation, login, account ----

#[derive(Template)]
#[template(path = "activate.html")]
struct ActivatePage {
    layout: Layout,
    code: String,
    error: Option<String>,
}

async fn activate_page(State(crm): State<Crm>, headers: HeaderMap, Path(code): Path<String>) -> Response {
    let v = visit(&crm, &headers);
    let layout = v.layout(&crm, v.t.activate_title);
    render(&v, ActivatePage { layout, code, error: None })
}

#[derive(Deserialize)]
struct ActivateForm {
    #[serde(default)]
    csrf: String,
    name: String,
    password: String,
    password2: String,
}

async fn activate(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(code): Path<String>,
    Form(form): Form<ActivateForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let again = |v: &Visit, status: StatusCode, error: String| {
        let layout = v.layout(&crm, v.t.activate_title);
        let mut r = render(v, ActivatePage { layout, code: code.clone(), error: Some(error) });
        *r.status_mut() = status;
        r
    };
    if let Err(e) = password_rules(&form.password, &form.password2) {
        return again(&v, StatusCode::BAD_REQUEST, e);
    }
    let hash = match auth::hash_password(&form.password) {
        Ok(h) => h,
        Err(e) => return again(&v, StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let id = code.split('.').next().unwrap_or("").to_string();
    let body =
        coyote_wire::ActivationUse { code: code.clone(), name: form.name.clone(), password_hash: hash };
    let actor = format!("activation:{}", id.chars().take(32).collect::<String>());
    match crm.call::<Committed>(&actor, Method::POST, "/v1/activations/use", Some(&body)).await {
        Ok(_) => log_in(&crm, form.name),
        Err(e) => again(&v, e.status, e.message),
    }
}

fn password_rules(password: &str, again: &str) -> Result<(), String> {
    if password != again {
        return Err("the two passwords differ".into());
    }
    let n = password.chars().count();
    if n < auth::PASSWORD_MIN || password.len() > auth::PASSWORD_MAX {
        return Err(format!("a password has {} to {} characters", auth::PASSWORD_MIN, auth::PASSWORD_MAX));
    }
    Ok(())
}

/// Replaces the visitor's session with a new one for `user`, and goes to the overview (which
/// sends members on to their own page).
fn log_in(crm: &Crm, user: String) -> Response {
    let session = crm.new_session(Some(user));
    let cookie = crm.cookie(&session);
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().append(header::SET_COOKIE, cookie);
    r
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    layout: Layout,
    error: Option<String>,
}

async fn login_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = visit(&crm, &headers);
    let layout = v.layout(&crm, v.t.login_title);
    render(&v, LoginPage { layout, error: None })
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    name: String,
    password: String,
}

async fn login(
    State(crm): State<Crm>,
    headers: HeaderMap,
    addr: Option<Extension<ConnectInfo<SocketAddr>>>,
    Form(form): Form<LoginForm>,
) -> Response {
    let addr = addr.map_or_else(|| "unknown".to_string(), |Extension(ConnectInfo(a))| a.ip().to_string());
    let v = match checked_post(&crm, &headers, &form.csrf, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let keys = [format!("addr:{addr}"), format!("user:{}", form.name)];
    let keys = [keys[0].as_str(), keys[1].as_str()];
    let again = |status: StatusCode, error: String| {
        let layout = v.layout(&crm, v.t.login_title);
        let mut r = render(&v, LoginPage { layout, error: Some(error) });
        *r.status_mut() = status;
        r
    };
    if crm.0.limiter.blocked(&keys) {
        return again(
            StatusCode::TOO_MANY_REQUESTS,
            format!(
                "too many wrong passwords: wait a minute ({} tries a minute at most)",
                auth::FAILURES_MAX
            ),
        );
    }
    let hash =
        crm.node().store().with_state(|s| s.accounts.users.get(&form.name).map(|u| u.password_hash.clone()));
    let password = form.password.clone();
    let ok = match hash {
        Some(hash) if password.len() <= auth::PASSWORD_MAX => {
            tokio::task::spawn_blocking(move || auth::verify_password(&password, &hash))
                .await
                .unwrap_or(false)
        }
        _ => false,
    };
    if !ok {
        crm.0.limiter.failed(&keys);
        return again(StatusCode::UNAUTHORIZED, "wrong name or password".into());
    }
    log_in(&crm, form.name)
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(State(crm): State<Crm>, headers: HeaderMap, Form(form): Form<CsrfForm>) -> Response {
    match checked_post(&crm, &headers, &form.csrf, false) {
        Ok(_) => {
            let mut r = Redirect::to("/login").into_response();
            r.headers_mut().append(header::SET_COOKIE, crm.cookie_cleared());
            r
        }
        Err(r) => r,
    }
}

#[derive(Template)]
#[template(path = "account.html")]
struct AccountPage {
    layout: Layout,
    message: Option<String>,
    error: Option<String>,
}

async fn account_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = visit(&crm, &headers);
    if v.session.user.is_none() {
        return v.reply(Redirect::to("/login"));
    }
    let layout = v.layout(&crm, v.t.nav_account);
    render(&v, AccountPage { layout, message: None, error: None })
}

#[derive(Deserialize)]
struct PasswordForm {
    #[serde(default)]
    csrf: String,
    current: String,
    password: String,
    password2: String,
}

async fn password_change(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Form(form): Form<PasswordForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(user) = v.session.user.clone() else {
        return Redirect::to("/login").into_response();
    };
    let page = |message: Option<String>, error: Option<String>, status: StatusCode| {
        let layout = v.layout(&crm, v.t.nav_account);
        let mut r = render(&v, AccountPage { layout, message, error });
        *r.status_mut() = status;
        r
    };
    if let Err(e) = password_rules(&form.password, &form.password2) {
        return page(None, Some(e), StatusCode::BAD_REQUEST);
    }
    let hash =
        crm.node().store().with_state(|s| s.accounts.users.get(&user).map(|u| u.password_hash.clone()));
    let current = form.current.clone();
    let ok = match hash {
        Some(h) => {
            tokio::task::spawn_blocking(move || auth::verify_password(&current, &h)).await.unwrap_or(false)
        }
        None => false,
    };
    if !ok {
        return page(None, Some("the current password is wrong".into()), StatusCode::UNAUTHORIZED);
    }
    let new_hash = match auth::hash_password(&form.password) {
        Ok(h) => h,
        Err(e) => return page(None, Some(e), StatusCode::INTERNAL_SERVER_ERROR),
    };
    let body = coyote_wire::PasswordChange { password_hash: new_hash.clone() };
    let path = format!("/v1/users/{user}/password");
    match crm.call::<Committed>(&v.actor(), Method::POST, &path, Some(&body)).await {
        Ok(_) => {
            // The change ends every session of the user but this one, which gets a new cookie.
            let mut r = page(Some(v.t.password_changed.into()), None, StatusCode::OK);
            r.headers_mut().append(header::SET_COOKIE, crm.cookie_over(&v.session, &new_hash));
            r
        }
        Err(e) => page(None, Some(e.message), e.status),
    }
}

// ---- overview, services ----

struct NodeRow {
    id: u64,
    addr: String,
    role: String,
    reachable: bool,
}

struct ServiceRow {
    name: String,
    image: String,
    domains: String,
    master: String,
    failover: String,
    backups: String,
    served: bool,
}

struct AlarmRow {
    id: u64,
    key: String,
    message: String,
    raised: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct OverviewPage {
    layout: Layout,
    cluster_id: String,
    leader: String,
    term: u64,
    applied: u64,
    nodes: Vec<NodeRow>,
    /// How many servers the cluster can lose now, of its voters.
    can_lose: usize,
    voters: usize,
    services: Vec<ServiceRow>,
    alarms: Vec<AlarmRow>,
}

fn service_rows(crm: &Crm) -> Vec<ServiceRow> {
    let dash = || "-".to_string();
    crm.node().store().with_state(|s| {
        s.services
            .values()
            .map(|svc| {
                let p = svc.placement.as_ref();
                let unreachable = s.reachability.iter().any(|((_, subject), o)| {
                    *subject == Subject::Service(svc.spec.name.clone()) && !o.reachable
                });
                ServiceRow {
                    name: svc.spec.name.clone(),
                    image: svc.spec.image.clone(),
                    domains: svc.spec.domains.join(" "),
                    master: p.map_or_else(dash, |p| p.master.to_string()),
                    failover: p.and_then(|p| p.failover).map_or_else(dash, |f| f.to_string()),
                    backups: p.filter(|p| !p.backups.is_empty()).map_or_else(dash, |p| {
                        p.backups.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(" ")
                    }),
                    served: p.is_some() && !unreachable,
                }
            })
            .collect()
    })
}

fn alarm_rows(crm: &Crm) -> Vec<AlarmRow> {
    crm.node().store().with_state(|s| {
        s.alarms
            .values()
            .map(|a| AlarmRow {
                id: a.id,
                key: a.key.clone(),
                message: a.message.clone(),
                raised: format_ms(a.raised_at_ms),
            })
            .collect()
    })
}

async fn overview(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = match admin(&crm, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let status = crm.node().status().await;
    let nodes = status
        .members
        .iter()
        .map(|m| NodeRow { id: m.id, addr: m.addr.clone(), role: m.role.clone(), reachable: m.reachable })
        .collect();
    let voters: Vec<_> = status.members.iter().filter(|m| m.role != "learner").collect();
    let tolerance = coyote_wire::Tolerance::of(voters.len(), voters.iter().filter(|m| m.reachable).count());
    let page = OverviewPage {
        layout: v.layout(&crm, v.t.nav_overview),
        cluster_id: status.cluster_id.clone(),
        leader: status.leader.map_or_else(|| v.t.none.to_string(), |l| l.to_string()),
        term: status.term,
        applied: status.last_event,
        nodes,
        can_lose: tolerance.can_lose,
        voters: tolerance.voters,
        services: service_rows(&crm),
        alarms: alarm_rows(&crm),
    };
    render(&v, page)
}

/// Takes a server that is gone for good out of the cluster (`coyote node remove`, without force):
/// refused, with the reason shown, while a majority still reaches it or it still masters a service.
async fn node_remove(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let body = coyote_wire::NodeRemove { force: false, reason: Some("removed on the CRM's overview".into()) };
    let path = format!("/v1/nodes/{id}/remove");
    match crm.call::<Committed>(&v.actor(), Method::POST, &path, Some(&body)).await {
        Ok(_) => Redirect::to("/").into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

#[derive(Template)]
#[template(path = "services.html")]
struct ServicesPage {
    layout: Layout,
    services: Vec<ServiceRow>,
    error: Option<String>,
}

async fn services_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = match admin(&crm, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let layout = v.layout(&crm, v.t.nav_services);
    render(&v, ServicesPage { layout, services: service_rows(&crm), error: None })
}

#[derive(Deserialize)]
struct ServiceForm {
    #[serde(default)]
    csrf: String,
    name: String,
    image: String,
    #[serde(default)]
    domains: String,
    #[serde(default)]
    http_port: String,
    #[serde(default)]
    ports: String,
    #[serde(default)]
    memory_mib: String,
    #[serde(default)]
    on_demand: Option<String>,
}

impl ServiceForm {
    fn spec(&self) -> Result<ServiceSpec, String> {
        let number = |text: &str, what: &str| -> Result<Option<u64>, String> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            text.parse::<u64>().map(Some).map_err(|_| format!("{what}: {text:?} is not a number"))
        };
        let http_port = match number(&self.http_port, "the HTTP port")? {
            Some(p) => Some(u16::try_from(p).map_err(|_| format!("the HTTP port {p} is past 65535"))?),
            None => None,
        };
        let memory_bytes = number(&self.memory_mib, "the memory")?.map(|m| m.saturating_mul(1 << 20));
        let spec = ServiceSpec {
            name: self.name.trim().to_string(),
            image: self.image.trim().to_string(),
            domains: self
                .domains
                .split([' ', ',', '\n', '\r', '\t'])
                .filter(|d| !d.is_empty())
                .map(|d| d.to_ascii_lowercase())
                .collect(),
            ports: self
                .ports
                .split([' ', ',', '\n', '\r', '\t'])
                .filter(|p| !p.is_empty())
                .map(|p| parse_port(p).map_err(|e| e.to_string()))
                .collect::<Result<_, _>>()?,
            memory_bytes,
            on_demand: self.on_demand.is_some(),
            dump: None,
            http_check: None,
            zone: None,
            http_port,
            tls_passthrough: false,
            keep: None,
        };
        spec.validate().map_err(|e| e.to_string())?;
        Ok(spec)
    }
}

async fn service_create(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Form(form): Form<ServiceForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let fail = |status: StatusCode, error: String| {
        let layout = v.layout(&crm, v.t.nav_services);
        let mut r = render(&v, ServicesPage { layout, services: service_rows(&crm), error: Some(error) });
        *r.status_mut() = status;
        r
    };
    let spec = match form.spec() {
        Ok(s) => s,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e),
    };
    let name = spec.name.clone();
    match crm.call::<coyote_wire::ServiceCreated>(&v.actor(), Method::POST, "/v1/services", Some(&spec)).await
    {
        Ok(_) => Redirect::to(&format!("/services/{name}")).into_response(),
        Err(e) => fail(e.status, e.message),
    }
}

#[derive(Template)]
#[template(path = "service.html")]
struct ServicePage {
    layout: Layout,
    row: ServiceRow,
    spec_json: String,
    /// The edit form's values.
    edit: EditFields,
    members: Vec<u64>,
    /// The confirmation asked for: `switch` (with its target and how) or `remove`.
    confirm: Option<String>,
    to: u64,
    now: bool,
}

fn service_page_for(
    crm: &Crm,
    v: &Visit,
    name: &str,
    confirm: Option<String>,
    to: u64,
    now: bool,
) -> Response {
    let found = crm.node().store().with_state(|s| {
        s.services.get(name).map(|svc| {
            let others: Vec<u64> = s.members.keys().copied().collect();
            (serde_json::to_string_pretty(&svc.spec).unwrap_or_default(), others, EditFields::of(&svc.spec))
        })
    });
    let Some((spec_json, members, edit)) = found else {
        return error_page(
            crm,
            v,
            CrmError::new(StatusCode::NOT_FOUND, format!("service {name} does not exist")),
        );
    };
    let Some(row) = service_rows(crm).into_iter().find(|r| r.name == name) else {
        return error_page(
            crm,
            v,
            CrmError::new(StatusCode::NOT_FOUND, format!("service {name} does not exist")),
        );
    };
    let layout = v.layout(crm, &format!("{} {name}", v.t.service));
    render(v, ServicePage { layout, row, spec_json, edit, members, confirm, to, now })
}

async fn service_page(State(crm): State<Crm>, headers: HeaderMap, Path(name): Path<String>) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => service_page_for(&crm, &v, &name, None, 0, false),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct SwitchForm {
    #[serde(default)]
    csrf: String,
    to: u64,
    #[serde(default)]
    now: Option<String>,
    /// Present once the admin confirmed.
    #[serde(default)]
    confirm: Option<String>,
}

async fn service_switch(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<SwitchForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let now = form.now.is_some();
    if form.confirm.is_none() {
        return service_page_for(&crm, &v, &name, Some("switch".into()), form.to, now);
    }
    let body = coyote_wire::SwitchRequest { to: form.to, now };
    let path = format!("/v1/services/{name}/switch");
    match crm.call::<coyote_wire::SwitchAnswer>(&v.actor(), Method::POST, &path, Some(&body)).await {
        Ok(_) => Redirect::to(&format!("/services/{name}")).into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

#[derive(Deserialize)]
struct ConfirmForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: Option<String>,
}

async fn service_remove(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<ConfirmForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if form.confirm.is_none() {
        return service_page_for(&crm, &v, &name, Some("remove".into()), 0, false);
    }
    let path = format!("/v1/services/{name}");
    match crm.call::<Committed>(&v.actor(), Method::DELETE, &path, None::<&()>).await {
        Ok(_) => Redirect::to("/services").into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

// ---- alarms ----

#[derive(Template)]
#[template(path = "alarms.html")]
struct AlarmsPage {
    layout: Layout,
    alarms: Vec<AlarmRow>,
}

async fn alarms_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => {
            let layout = v.layout(&crm, v.t.nav_alarms);
            render(&v, AlarmsPage { layout, alarms: alarm_rows(&crm) })
        }
        Err(r) => r,
    }
}

async fn alarm_clear(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let path = format!("/v1/alarms/{id}/clear");
    match crm.call::<Committed>(&v.actor(), Method::POST, &path, None::<&()>).await {
        Ok(_) => Redirect::to("/alarms").into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

// ---- events ----

/// One event as the events page and the stream show it.
#[derive(serde::Serialize)]
struct EventRow {
    index: u64,
    at: String,
    actor: String,
    kind: String,
    summary: String,
    rejected: bool,
}

impl From<EventView> for EventRow {
    fn from(e: EventView) -> Self {
        let summary = match &e.reason {
            Some(reason) => format!("{} (rejected: {reason})", e.summary),
            None => e.summary,
        };
        EventRow {
            index: e.index,
            at: format_ms(e.at_ms),
            actor: e.actor,
            kind: e.kind,
            rejected: e.reason.is_some(),
            summary,
        }
    }
}

#[derive(Deserialize, Default)]
struct EventsFilter {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    actor: String,
    from: Option<u64>,
}

impl EventsFilter {
    fn keeps(&self, e: &EventView) -> bool {
        self.keeps_kind_actor(&e.kind, &e.actor)
    }

    fn keeps_item(&self, item: &crate::FeedItem) -> bool {
        self.keeps_kind_actor(&item.kind, &item.actor)
    }

    fn keeps_kind_actor(&self, kind: &str, actor: &str) -> bool {
        (self.kind.is_empty() || kind == self.kind) && (self.actor.is_empty() || actor.contains(&self.actor))
    }

    fn query(&self) -> String {
        let enc = |s: &str| {
            s.bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect::<String>()
        };
        format!("kind={}&actor={}", enc(&self.kind), enc(&self.actor))
    }
}

#[derive(Template)]
#[template(path = "events.html")]
struct EventsPage {
    layout: Layout,
    events: Vec<EventRow>,
    /// Every kind, and whether it is the one filtered on.
    kinds: Vec<(&'static str, bool)>,
    actor: String,
    stream: String,
}

async fn events_page(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Query(filter): Query<EventsFilter>,
) -> Response {
    let v = match admin(&crm, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let store = crm.node().store();
    let last = store.with_state(|s| s.last_applied);
    // Scan back from the newest event until a page of matches is found (or 10 pages were read).
    let mut rows = Vec::new();
    let mut end = last + 1;
    let mut scanned = 0;
    while end > 1 && rows.len() < EVENTS_SHOWN as usize && scanned < 10 {
        let from = end.saturating_sub(1000).max(1);
        let records = store.events(from, (end - from) as usize).unwrap_or_default();
        let mut page: Vec<EventRow> =
            records.iter().map(EventView::from).filter(|e| filter.keeps(e)).map(EventRow::from).collect();
        page.reverse();
        rows.extend(page);
        end = from;
        scanned += 1;
    }
    rows.truncate(EVENTS_SHOWN as usize);
    let stream = format!("/events/stream?{}&from={}", filter.query(), last + 1);
    let layout = v.layout(&crm, v.t.nav_events);
    let page = EventsPage {
        layout,
        events: rows,
        kinds: coyote_state_machine::Event::KINDS.iter().map(|k| (*k, *k == filter.kind)).collect(),
        actor: filter.actor,
        stream,
    };
    render(&v, page)
}

/// An applied event rendered for the live events page.
pub(crate) fn feed_item(record: &coyote_log::store::EventRecord) -> crate::FeedItem {
    let row = EventRow::from(EventView::from(record));
    // JSON has no raw line break, so the data is one `data:` line.
    let data = serde_json::to_string(&row).unwrap_or_default();
    crate::FeedItem {
        index: row.index,
        frame: Bytes::from(format!("id: {}\nevent: event\ndata: {data}\n\n", row.index)),
        kind: row.kind,
        actor: row.actor,
    }
}

/// A comment line sent to an idle follower, so that proxies keep the connection and the browser
/// notices a dead node.
const STREAM_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events read from the archive at a time by a follower that catches up.
const STREAM_ARCHIVE_BATCH: usize = 1000;

/// A follower of the live event log: it reads the archive up to what it holds, then the feed that
/// renders each batch of events once for every follower. Each wake-up sends every event at hand as
/// one chunk, and the stream is polled by the connection itself (no task, no channel in between).
struct Follower {
    crm: Crm,
    feed: tokio::sync::broadcast::Receiver<std::sync::Arc<crate::FeedBatch>>,
    next: u64,
    filter: EventsFilter,
    live: bool,
    ended: bool,
}

impl Follower {
    /// The next chunk of the stream, or `None` at its end (the node stops, or its archive fails).
    async fn step(mut self) -> Option<(Result<Bytes, Infallible>, Follower)> {
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        let mut chunk: Vec<Bytes> = Vec::new();
        let everything = self.filter.kind.is_empty() && self.filter.actor.is_empty();
        loop {
            if self.ended {
                return None;
            }
            if !self.live {
                let records = self.crm.node().store().events(self.next, STREAM_ARCHIVE_BATCH).ok()?;
                self.live = records.len() < STREAM_ARCHIVE_BATCH;
                for r in &records {
                    self.next = r.envelope.index + 1;
                    let item = feed_item(r);
                    if self.filter.keeps_item(&item) {
                        chunk.push(item.frame);
                    }
                }
            } else {
                let mut received = match tokio::time::timeout(STREAM_KEEP_ALIVE, self.feed.recv()).await {
                    Ok(received) => Some(received),
                    Err(_) => return Some((Ok(Bytes::from_static(b": keep-alive\n\n")), self)),
                };
                while let Some(r) = received.take() {
                    match r {
                        Ok(batch) if batch.last_index() < self.next => {}
                        Ok(batch) if batch.first_index() == self.next && everything => {
                            self.next = batch.last_index() + 1;
                            chunk.push(batch.joined.clone());
                        }
                        Ok(batch) if batch.first_index() <= self.next => {
                            for item in batch.items.iter().filter(|i| i.index >= self.next) {
                                if self.filter.keeps_item(item) {
                                    chunk.push(item.frame.clone());
                                }
                            }
                            self.next = batch.last_index() + 1;
                        }
                        // A gap, or this follower fell behind the feed: back to the archive.
                        Ok(_) | Err(RecvError::Lagged(_)) => {
                            self.live = false;
                            break;
                        }
                        Err(RecvError::Closed) => {
                            self.ended = true;
                            break;
                        }
                    }
                    received = match self.feed.try_recv() {
                        Ok(item) => Some(Ok(item)),
                        Err(TryRecvError::Empty) => None,
                        Err(TryRecvError::Lagged(n)) => Some(Err(RecvError::Lagged(n))),
                        Err(TryRecvError::Closed) => Some(Err(RecvError::Closed)),
                    };
                }
            }
            match chunk.len() {
                0 => {}
                1 => return Some((Ok(chunk.remove(0)), self)),
                _ => return Some((Ok(Bytes::from(chunk.concat())), self)),
            }
        }
    }
}

/// The events from `from` (or after `Last-Event-ID`), then each new one as it is applied, as
/// server-sent events.
async fn events_stream(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Query(filter): Query<EventsFilter>,
) -> Response {
    let v = visit(&crm, &headers);
    if admin(&crm, &headers).is_err() {
        return v.reply(StatusCode::UNAUTHORIZED);
    }
    let resume = headers
        .get("last-event-id")
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok())
        .map(|i| i + 1);
    let next =
        resume.or(filter.from).unwrap_or_else(|| crm.node().store().with_state(|s| s.last_applied + 1));
    // Subscribed before reading the archive, so that no event falls between the two: what the
    // archive gave is skipped in the feed.
    let feed = crm.0.feed.subscribe();
    let follower = Follower { crm, feed, next, filter, live: false, ended: false };
    let stream = futures::stream::unfold(follower, Follower::step);
    v.reply((
        [(header::CONTENT_TYPE, "text/event-stream"), (header::CACHE_CONTROL, "no-cache")],
        Body::from_stream(stream),
    ))
}

// ---- API keys ----

struct KeyRow {
    id: String,
    owner: String,
    label: String,
    scope: &'static str,
    created: String,
    last_used: Option<String>,
    revoked: bool,
}

#[derive(Template)]
#[template(path = "keys.html")]
struct KeysPage {
    layout: Layout,
    keys: Vec<KeyRow>,
    new_key: Option<String>,
    error: Option<String>,
}

fn keys_page_for(crm: &Crm, v: &Visit, new_key: Option<String>, error: Option<String>) -> Response {
    let keys = crm.node().store().with_state(|s| {
        s.accounts
            .api_keys
            .values()
            .map(|k| KeyRow {
                id: k.id.clone(),
                owner: k.owner.clone(),
                label: k.label.clone(),
                scope: k.scope.name(),
                created: format_ms(k.created_at_ms),
                last_used: k.last_used_at_ms.map(format_ms),
                revoked: k.revoked,
            })
            .collect()
    });
    let layout = v.layout(crm, v.t.nav_keys);
    render(v, KeysPage { layout, keys, new_key, error })
}

async fn keys_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => keys_page_for(&crm, &v, None, None),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct KeyForm {
    #[serde(default)]
    csrf: String,
    label: String,
    scope: String,
}

async fn key_create(State(crm): State<Crm>, headers: HeaderMap, Form(form): Form<KeyForm>) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let scope = if form.scope == "write" { KeyScope::Write } else { KeyScope::Read };
    let owner = v.session.user.clone().unwrap_or_default();
    let body = coyote_wire::KeyCreate { owner, label: form.label.trim().to_string(), scope };
    match crm.call::<KeyCreated>(&v.actor(), Method::POST, "/v1/keys", Some(&body)).await {
        Ok(created) => keys_page_for(&crm, &v, Some(created.key), None),
        Err(e) => keys_page_for(&crm, &v, None, Some(e.message)),
    }
}

async fn key_revoke(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crm.call::<Committed>(&v.actor(), Method::DELETE, &format!("/v1/keys/{id}"), None::<&()>).await {
        Ok(_) => Redirect::to("/keys").into_response(),
        Err(e) => keys_page_for(&crm, &v, None, Some(e.message)),
    }
}

// ---- the API for scripts ----

/// Paths of the node's API that no key reaches: accounts are managed on the pages only.
const KEYLESS: &[&str] = &["activations", "users", "keys"];

/// The JSON API's OpenAPI document, public: the node's own document, served under `/api`, less the
/// routes that only the pages may use, with the API key as the way in.
async fn api_document(State(crm): State<Crm>) -> Response {
    match crm.call::<serde_json::Value>("crm", Method::GET, "/v1/openapi.json", None::<&()>).await {
        Ok(mut doc) => {
            public_document(&mut doc);
            axum::Json(doc).into_response()
        }
        Err(e) => (e.status, axum::Json(coyote_wire::ErrorAnswer { error: e.message })).into_response(),
    }
}

/// Turns the node's API document into the document of `/api/v1`.
fn public_document(doc: &mut serde_json::Value) {
    use serde_json::json;
    doc["servers"] = json!([{ "url": "/api", "description": "this CRM" }]);
    if let Some(paths) = doc.get_mut("paths").and_then(|p| p.as_object_mut()) {
        paths.retain(|path, _| {
            let first = path.strip_prefix("/v1/").unwrap_or(path).split('/').next().unwrap_or("");
            !KEYLESS.contains(&first)
        });
    }
    if !doc["components"].is_object() {
        doc["components"] = json!({});
    }
    doc["components"]["securitySchemes"] = json!({
        "api_key": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key made on the keys page (coyote_ID_SECRET). A read key may only GET."
        }
    });
    doc["security"] = json!([{ "api_key": [] }]);
}

async fn api(
    State(crm): State<Crm>,
    path: Result<Path<String>, axum::extract::rejection::PathRejection>,
    request: Request,
) -> Response {
    let json_error = |status: StatusCode, error: &str| {
        (status, axum::Json(coyote_wire::ErrorAnswer { error: error.to_string() })).into_response()
    };
    let path = match path {
        Ok(Path(path)) => path,
        Err(e) => return json_error(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .map(str::trim);
    let Some((id, secret)) = bearer.and_then(coyote_wire::parse_key) else {
        return json_error(
            StatusCode::UNAUTHORIZED,
            "an API key is needed: Authorization: Bearer coyote_ID_SECRET",
        );
    };
    let digest = coyote_state_machine::sha256_hex(secret.as_bytes());
    let key = crm.node().store().with_state(|s| s.accounts.api_keys.get(id).cloned());
    let Some(key) = key.filter(|k| !k.revoked && auth::same(&k.secret_sha256, &digest)) else {
        return json_error(StatusCode::UNAUTHORIZED, "this API key is unknown or revoked");
    };
    // The node's router takes the path as it came (percent-encoded); both forms are checked.
    let raw = request.uri().path().strip_prefix("/api/v1/").unwrap_or_default().to_string();
    let first = |p: &str| p.split('/').next().unwrap_or("").to_ascii_lowercase();
    if KEYLESS.contains(&first(&path).as_str()) || KEYLESS.contains(&first(&raw).as_str()) {
        return json_error(
            StatusCode::FORBIDDEN,
            "users, keys and activations are managed on the web pages only",
        );
    }
    let method = request.method().clone();
    if key.scope == KeyScope::Read && method != Method::GET {
        return json_error(StatusCode::FORBIDDEN, "this API key may only read (GET)");
    }
    let actor = format!("key:{}", key.id);
    let query = request.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let body = match axum::body::to_bytes(request.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "the request body is too large (16 MiB at most)",
            )
        }
    };
    let now = crm.node().now_ms();
    if key
        .last_used_at_ms
        .is_none_or(|t| now.saturating_sub(t) >= coyote_state_machine::accounts::KEY_USE_RECORD_MS)
    {
        let crm = crm.clone();
        let id = key.id.clone();
        tokio::spawn(async move {
            let path = format!("/v1/keys/{id}/used");
            let _ = crm.call::<Committed>(&format!("key:{id}"), Method::POST, &path, None::<&()>).await;
        });
    }
    let body = (!body.is_empty()).then(|| body.to_vec());
    let response = crm.forward(&actor, method, &format!("/v1/{raw}{query}"), body).await;
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(body))
}

// ---- signups ----

#[derive(Template)]
#[template(path = "signup.html")]
struct SignupPage {
    layout: Layout,
    /// `None`: signups are closed.
    intro: Option<&'static str>,
    invite: String,
    error: Option<String>,
}

#[derive(Deserialize, Default)]
struct SignupQuery {
    #[serde(default)]
    invite: String,
}

fn signup_intro(crm: &Crm, t: &'static Text) -> Option<&'static str> {
    match crm.node().store().with_state(|s| s.accounts.settings.signup) {
        SignupMode::Off => None,
        SignupMode::Public => Some(t.signup_intro_public),
        SignupMode::Approval => Some(t.signup_intro_approval),
        SignupMode::Invite => Some(t.signup_intro_invite),
    }
}

async fn signup_page(State(crm): State<Crm>, headers: HeaderMap, Query(q): Query<SignupQuery>) -> Response {
    let v = visit(&crm, &headers);
    let layout = v.layout(&crm, v.t.signup_title);
    let intro = signup_intro(&crm, v.t);
    let mut r = render(&v, SignupPage { layout, intro, invite: q.invite, error: None });
    if intro.is_none() {
        *r.status_mut() = StatusCode::FORBIDDEN;
    }
    r
}

#[derive(Deserialize)]
struct SignupForm {
    #[serde(default)]
    csrf: String,
    name: String,
    password: String,
    password2: String,
    #[serde(default)]
    invite: String,
}

async fn signup(State(crm): State<Crm>, headers: HeaderMap, Form(form): Form<SignupForm>) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, false) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let again = |status: StatusCode, error: String| {
        let layout = v.layout(&crm, v.t.signup_title);
        let page = SignupPage {
            layout,
            intro: signup_intro(&crm, v.t),
            invite: form.invite.clone(),
            error: Some(error),
        };
        let mut r = render(&v, page);
        *r.status_mut() = status;
        r
    };
    if let Err(e) = password_rules(&form.password, &form.password2) {
        return again(StatusCode::BAD_REQUEST, e);
    }
    let hash = match auth::hash_password(&form.password) {
        Ok(h) => h,
        Err(e) => return again(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let name = form.name.trim().to_string();
    let invite = (!form.invite.trim().is_empty()).then(|| form.invite.trim().to_string());
    let body = coyote_wire::SignupCreate { name: name.clone(), password_hash: hash, invite };
    let actor = format!("signup:{}", name.chars().filter(|c| !c.is_control()).take(64).collect::<String>());
    match crm.call::<Committed>(&actor, Method::POST, "/v1/signups", Some(&body)).await {
        Ok(_) => {
            let member = crm.node().store().with_state(|s| s.accounts.users.contains_key(&name));
            if member {
                log_in(&crm, name)
            } else {
                // The visitor's session remembers the signup, for its status page.
                let session = auth::Session { signup: Some(name), ..v.session.clone() };
                let mut r = Redirect::to("/me").into_response();
                r.headers_mut().append(header::SET_COOKIE, crm.cookie(&session));
                r
            }
        }
        Err(e) => again(e.status, e.message),
    }
}

/// One step of a signup, as its member sees it.
struct Step {
    label: &'static str,
    /// The index of the event that did it, or what it waits for.
    done: Option<String>,
}

#[derive(Template)]
#[template(path = "me.html")]
struct MePage {
    layout: Layout,
    name: Option<String>,
    steps: Vec<Step>,
    rejected: Option<String>,
    domain: Option<String>,
}

async fn me_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = visit(&crm, &headers);
    let name = v.session.user.clone().or_else(|| v.session.signup.clone());
    let t = v.t;
    let found = name.as_ref().and_then(|n| {
        crm.node().store().with_state(|s| {
            s.accounts.signups.get(n).map(|su| {
                let service = s.services.get(n);
                (su.clone(), service.map(|svc| svc.spec.domains.join(" ")), s.accounts.users.contains_key(n))
            })
        })
    });
    let (mut steps, mut rejected, mut domain) = (Vec::new(), None, None);
    if let Some((su, service_domain, is_user)) = found {
        let event = |i: u64| format!("event {i}");
        let approved = su.approved_index.map(event);
        steps.push(Step { label: t.step_requested, done: Some(event(su.requested_index)) });
        steps.push(Step { label: t.step_approved, done: approved.clone() });
        steps.push(Step { label: t.step_user, done: approved.clone().filter(|_| is_user) });
        steps.push(Step { label: t.step_service, done: approved.filter(|_| service_domain.is_some()) });
        steps.push(Step {
            label: t.step_served,
            done: su
                .served_at_ms
                .map(|at| format!("{} ({} {})", format_ms(at), t.node, su.served_by.unwrap_or(0))),
        });
        if let SignupStatus::Rejected { reason } = su.status {
            rejected = Some(reason);
        }
        domain = service_domain;
    }
    let layout = v.layout(&crm, t.me_title);
    render(&v, MePage { layout, name, steps, rejected, domain })
}

struct SignupRow {
    name: String,
    status: String,
    pending: bool,
    requested: String,
    invite: String,
}

struct InviteRow {
    id: String,
    expires: String,
    state: String,
    open: bool,
}

#[derive(Template)]
#[template(path = "signups.html")]
struct SignupsPage {
    layout: Layout,
    mode: &'static str,
    signups: Vec<SignupRow>,
    invites: Vec<InviteRow>,
    new_invite: Option<String>,
    error: Option<String>,
}

fn signups_page_for(crm: &Crm, v: &Visit, new_invite: Option<String>, error: Option<String>) -> Response {
    let now = crm.node().now_ms();
    let (mode, signups, invites) = crm.node().store().with_state(|s| {
        let a = &s.accounts;
        let signups = a
            .signups
            .values()
            .map(|su| SignupRow {
                name: su.name.clone(),
                status: match &su.status {
                    SignupStatus::Pending => "pending".to_string(),
                    SignupStatus::Approved if su.served_at_ms.is_some() => "served".to_string(),
                    SignupStatus::Approved => "approved".to_string(),
                    SignupStatus::Rejected { reason } => format!("rejected: {reason}"),
                },
                pending: su.status == SignupStatus::Pending,
                requested: format_ms(su.requested_at_ms),
                invite: su.invite.clone().unwrap_or_default(),
            })
            .collect();
        let invites = a
            .invites
            .values()
            .map(|i| {
                let open = i.used_by.is_none() && !i.revoked && i.expires_at_ms > now;
                let state = match (&i.used_by, i.revoked) {
                    (Some(by), _) => format!("used by {by}"),
                    (None, true) => "revoked".to_string(),
                    (None, false) if i.expires_at_ms <= now => "expired".to_string(),
                    (None, false) => "open".to_string(),
                };
                InviteRow { id: i.id.clone(), expires: format_ms(i.expires_at_ms), state, open }
            })
            .collect();
        (a.settings.signup.name(), signups, invites)
    });
    let layout = v.layout(crm, v.t.nav_signups);
    render(v, SignupsPage { layout, mode, signups, invites, new_invite, error })
}

async fn signups_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => signups_page_for(&crm, &v, None, None),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct DecideForm {
    #[serde(default)]
    csrf: String,
    decision: String,
    #[serde(default)]
    reason: String,
}

async fn signup_decide(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<DecideForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let approve = form.decision == "approve";
    let reason =
        if form.reason.trim().is_empty() { "rejected by an admin".into() } else { form.reason.trim().into() };
    let body = coyote_wire::SignupDecide { approve, reason };
    match crm
        .call::<Committed>(&v.actor(), Method::POST, &format!("/v1/signups/{name}/decide"), Some(&body))
        .await
    {
        Ok(_) => Redirect::to("/signups").into_response(),
        Err(e) => signups_page_for(&crm, &v, None, Some(e.message)),
    }
}

#[derive(Deserialize)]
struct InviteForm {
    #[serde(default)]
    csrf: String,
    days: u64,
}

async fn invite_create(State(crm): State<Crm>, headers: HeaderMap, Form(form): Form<InviteForm>) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let body = coyote_wire::InviteCreate { ttl_ms: form.days.saturating_mul(86_400_000) };
    match crm.call::<coyote_wire::InviteCreated>(&v.actor(), Method::POST, "/v1/invites", Some(&body)).await {
        Ok(created) => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            let scheme = if crm.0.settings.secure { "https" } else { "http" };
            let link = format!("{scheme}://{host}/signup?invite={}", created.code);
            signups_page_for(&crm, &v, Some(link), None)
        }
        Err(e) => signups_page_for(&crm, &v, None, Some(e.message)),
    }
}

async fn invite_revoke(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crm.call::<Committed>(&v.actor(), Method::DELETE, &format!("/v1/invites/{id}"), None::<&()>).await {
        Ok(_) => Redirect::to("/signups").into_response(),
        Err(e) => signups_page_for(&crm, &v, None, Some(e.message)),
    }
}

// ---- settings ----

#[derive(Template)]
#[template(path = "settings.html")]
struct SettingsPage {
    layout: Layout,
    cluster_name: String,
    admin_domain: String,
    /// Each mode's value and label, and whether it is the current one.
    modes: Vec<(&'static str, &'static str, bool)>,
    image: String,
    domain: String,
    http_port: String,
    memory_mib: String,
    on_demand: bool,
    message: Option<String>,
    error: Option<String>,
}

fn settings_page_for(
    crm: &Crm,
    v: &Visit,
    form: Option<&SettingsForm>,
    message: Option<String>,
    error: Option<String>,
) -> Response {
    let t = v.t;
    let current = crm.node().store().with_state(|s| s.accounts.settings.clone());
    let from_state = || {
        let tpl = current.template.clone();
        SettingsForm {
            csrf: String::new(),
            cluster_name: current.cluster_name.clone(),
            admin_domain: current.admin_domain.clone().unwrap_or_default(),
            signup: current.signup.name().to_string(),
            image: tpl.as_ref().map(|t| t.image.clone()).unwrap_or_default(),
            domain: tpl.as_ref().map(|t| t.domain.clone()).unwrap_or_default(),
            http_port: tpl.as_ref().and_then(|t| t.http_port).map(|p| p.to_string()).unwrap_or_default(),
            memory_mib: tpl
                .as_ref()
                .and_then(|t| t.memory_bytes)
                .map(|m| (m >> 20).to_string())
                .unwrap_or_default(),
            on_demand: tpl.as_ref().is_some_and(|t| t.on_demand).then(|| "on".to_string()),
        }
    };
    let owned;
    let f = match form {
        Some(f) => f,
        None => {
            owned = from_state();
            &owned
        }
    };
    let modes = [
        ("off", t.mode_off),
        ("public", t.mode_public),
        ("approval", t.mode_approval),
        ("invite", t.mode_invite),
    ]
    .into_iter()
    .map(|(value, label)| (value, label, value == f.signup))
    .collect();
    let page = SettingsPage {
        layout: v.layout(crm, t.nav_settings),
        cluster_name: f.cluster_name.clone(),
        admin_domain: f.admin_domain.clone(),
        modes,
        image: f.image.clone(),
        domain: f.domain.clone(),
        http_port: f.http_port.clone(),
        memory_mib: f.memory_mib.clone(),
        on_demand: f.on_demand.is_some(),
        message,
        error,
    };
    render(v, page)
}

async fn settings_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => settings_page_for(&crm, &v, None, None, None),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct SettingsForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    cluster_name: String,
    #[serde(default)]
    admin_domain: String,
    signup: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    http_port: String,
    #[serde(default)]
    memory_mib: String,
    #[serde(default)]
    on_demand: Option<String>,
}

impl SettingsForm {
    fn settings(&self) -> Result<CrmSettings, String> {
        let signup = SignupMode::parse(&self.signup)
            .ok_or_else(|| format!("{:?} is not a signup mode", self.signup))?;
        let number = |text: &str, what: &str| -> Result<Option<u64>, String> {
            let text = text.trim();
            if text.is_empty() {
                return Ok(None);
            }
            text.parse::<u64>().map(Some).map_err(|_| format!("{what}: {text:?} is not a number"))
        };
        let template = if self.image.trim().is_empty() && self.domain.trim().is_empty() {
            None
        } else {
            let http_port = match number(&self.http_port, "the HTTP port")? {
                Some(p) => Some(u16::try_from(p).map_err(|_| format!("the HTTP port {p} is past 65535"))?),
                None => None,
            };
            Some(SignupTemplate {
                image: self.image.trim().to_string(),
                domain: self.domain.trim().to_ascii_lowercase(),
                http_port,
                memory_bytes: number(&self.memory_mib, "the memory")?.map(|m| m.saturating_mul(1 << 20)),
                on_demand: self.on_demand.is_some(),
            })
        };
        let admin_domain = self.admin_domain.trim().to_ascii_lowercase();
        Ok(CrmSettings {
            cluster_name: self.cluster_name.trim().to_string(),
            admin_domain: (!admin_domain.is_empty()).then_some(admin_domain),
            signup,
            template,
        })
    }
}

async fn settings_save(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Form(form): Form<SettingsForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let settings = match form.settings() {
        Ok(s) => s,
        Err(e) => return settings_page_for(&crm, &v, Some(&form), None, Some(e)),
    };
    match crm.call::<Committed>(&v.actor(), Method::PUT, "/v1/settings", Some(&settings)).await {
        Ok(_) => settings_page_for(&crm, &v, None, Some(v.t.saved.into()), None),
        Err(e) => {
            let mut r = settings_page_for(&crm, &v, Some(&form), None, Some(e.message));
            *r.status_mut() = e.status;
            r
        }
    }
}

// ---- changing a spec, with its diff first; reverting a change ----

/// The fields of a spec the edit form shows.
struct EditFields {
    image: String,
    domains: String,
    http_port: String,
    ports: String,
    memory_mib: String,
    on_demand: bool,
}

impl EditFields {
    fn of(spec: &ServiceSpec) -> EditFields {
        EditFields {
            image: spec.image.clone(),
            domains: spec.domains.join(" "),
            http_port: spec.http_port.map(|p| p.to_string()).unwrap_or_default(),
            ports: spec
                .ports
                .iter()
                .map(|p| format!("{}:{}", p.host, p.container))
                .collect::<Vec<_>>()
                .join(" "),
            memory_mib: spec.memory_bytes.map(|m| (m >> 20).to_string()).unwrap_or_default(),
            on_demand: spec.on_demand,
        }
    }
}

/// One line of a diff: `-` removed, `+` added, ` ` kept.
struct DiffLine {
    sign: char,
    text: String,
}

/// The lines of `old` and `new` as a diff (longest common subsequence; specs are a few dozen lines).
fn diff(old: &str, new: &str) -> Vec<DiffLine> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut common = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            common[i][j] =
                if a[i] == b[j] { common[i + 1][j + 1] + 1 } else { common[i + 1][j].max(common[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    let line = |sign, text: &str| DiffLine { sign, text: text.to_string() };
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(line(' ', a[i]));
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || common[i][j + 1] >= common[i + 1][j]) {
            out.push(line('+', b[j]));
            j += 1;
        } else {
            out.push(line('-', a[i]));
            i += 1;
        }
    }
    out
}

#[derive(Template)]
#[template(path = "change.html")]
struct ChangePage {
    layout: Layout,
    name: String,
    diff: Vec<DiffLine>,
    /// Where the confirmation posts, and the fields it carries.
    action: String,
    fields: Vec<(String, String)>,
}

fn pretty(spec: &ServiceSpec) -> String {
    serde_json::to_string_pretty(spec).unwrap_or_default()
}

fn current_spec(crm: &Crm, name: &str) -> Option<ServiceSpec> {
    crm.node().store().with_state(|s| s.services.get(name).map(|svc| svc.spec.clone()))
}

#[derive(Deserialize)]
struct UpdateForm {
    #[serde(default)]
    csrf: String,
    image: String,
    #[serde(default)]
    domains: String,
    #[serde(default)]
    http_port: String,
    #[serde(default)]
    ports: String,
    #[serde(default)]
    memory_mib: String,
    #[serde(default)]
    on_demand: Option<String>,
    #[serde(default)]
    confirm: Option<String>,
}

async fn service_update(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(form): Form<UpdateForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(current) = current_spec(&crm, &name) else {
        return error_page(
            &crm,
            &v,
            CrmError::new(StatusCode::NOT_FOUND, format!("service {name} does not exist")),
        );
    };
    let edited = ServiceForm {
        csrf: String::new(),
        name: name.clone(),
        image: form.image.clone(),
        domains: form.domains.clone(),
        http_port: form.http_port.clone(),
        ports: form.ports.clone(),
        memory_mib: form.memory_mib.clone(),
        on_demand: form.on_demand.clone(),
    };
    // The form edits some fields; the others stay as they are.
    let spec = match edited.spec() {
        Ok(e) => ServiceSpec {
            image: e.image,
            domains: e.domains,
            http_port: e.http_port,
            ports: e.ports,
            memory_bytes: e.memory_bytes,
            on_demand: e.on_demand,
            ..current.clone()
        },
        Err(e) => return error_page(&crm, &v, CrmError::new(StatusCode::BAD_REQUEST, e)),
    };
    if form.confirm.is_none() {
        let mut fields = vec![
            ("image".to_string(), form.image.clone()),
            ("domains".to_string(), form.domains.clone()),
            ("http_port".to_string(), form.http_port.clone()),
            ("ports".to_string(), form.ports.clone()),
            ("memory_mib".to_string(), form.memory_mib.clone()),
        ];
        if form.on_demand.is_some() {
            fields.push(("on_demand".into(), "on".into()));
        }
        let page = ChangePage {
            layout: v.layout(&crm, &format!("{} {name}", v.t.spec)),
            name: name.clone(),
            diff: diff(&pretty(&current), &pretty(&spec)),
            action: format!("/services/{name}/update"),
            fields,
        };
        return render(&v, page);
    }
    let path = format!("/v1/services/{name}");
    match crm.call::<coyote_wire::ServiceUpdated>(&v.actor(), Method::PUT, &path, Some(&spec)).await {
        Ok(_) => Redirect::to(&format!("/services/{name}")).into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

/// Events scanned back from a spec change for the spec it replaced, at most.
const REVERT_SCAN: u64 = 100_000;

/// The service a spec change at `index` changed, and the spec it replaced.
fn spec_before(crm: &Crm, index: u64) -> Result<(String, ServiceSpec), CrmError> {
    let store = crm.node().store();
    let not_found = |m: String| CrmError::new(StatusCode::NOT_FOUND, m);
    let record = store
        .events(index, 1)
        .ok()
        .and_then(|r| r.into_iter().next())
        .filter(|r| r.envelope.index == index)
        .ok_or_else(|| not_found(format!("event {index} is not in this node's archive")))?;
    let coyote_state_machine::Event::ServiceSpecChanged { spec } = &record.envelope.event else {
        return Err(CrmError::new(
            StatusCode::BAD_REQUEST,
            format!("event {index} is not a change of a spec"),
        ));
    };
    let name = spec.name.clone();
    let mut end = index;
    while end > 1 && index - end < REVERT_SCAN {
        let from = end.saturating_sub(1000).max(1);
        let records = store.events(from, (end - from) as usize).unwrap_or_default();
        for r in records.iter().rev() {
            if !r.outcome.is_applied() {
                continue;
            }
            match &r.envelope.event {
                coyote_state_machine::Event::ServiceCreated { spec }
                | coyote_state_machine::Event::ServiceSpecChanged { spec }
                    if spec.name == name =>
                {
                    return Ok((name, spec.clone()));
                }
                _ => {}
            }
        }
        end = from;
    }
    Err(not_found(format!("the spec of {name} before event {index} is not in this node's archive")))
}

async fn revert_page(State(crm): State<Crm>, headers: HeaderMap, Path(index): Path<u64>) -> Response {
    let v = match admin(&crm, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (name, old) = match spec_before(&crm, index) {
        Ok(found) => found,
        Err(e) => return error_page(&crm, &v, e),
    };
    let Some(current) = current_spec(&crm, &name) else {
        return error_page(
            &crm,
            &v,
            CrmError::new(StatusCode::NOT_FOUND, format!("service {name} does not exist")),
        );
    };
    let page = ChangePage {
        layout: v.layout(&crm, &format!("{} {name}", v.t.spec)),
        name,
        diff: diff(&pretty(&current), &pretty(&old)),
        action: format!("/events/{index}/revert"),
        fields: Vec::new(),
    };
    render(&v, page)
}

async fn revert(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(index): Path<u64>,
    Form(form): Form<ConfirmForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let (name, old) = match spec_before(&crm, index) {
        Ok(found) => found,
        Err(e) => return error_page(&crm, &v, e),
    };
    let path = format!("/v1/services/{name}");
    match crm.call::<coyote_wire::ServiceUpdated>(&v.actor(), Method::PUT, &path, Some(&old)).await {
        Ok(_) => Redirect::to(&format!("/services/{name}")).into_response(),
        Err(e) => error_page(&crm, &v, e),
    }
}

// ---- join tokens ----

struct TokenRow {
    id: String,
    state: &'static str,
    valid: bool,
    expires: String,
    uses: String,
}

#[derive(Template)]
#[template(path = "tokens.html")]
struct TokensPage {
    layout: Layout,
    tokens: Vec<TokenRow>,
    /// A token just created, and the command to run with it on the new server.
    created: Option<(String, String)>,
    error: Option<String>,
}

fn tokens_page_for(
    crm: &Crm,
    v: &Visit,
    created: Option<(String, String)>,
    error: Option<String>,
) -> Response {
    let now = crm.node().now_ms();
    let tokens = crm.node().store().with_state(|s| {
        s.tokens
            .values()
            .map(|t| {
                let view = coyote_wire::TokenView::new(t, now);
                let state = match view.status {
                    coyote_wire::TokenState::Valid => "valid",
                    coyote_wire::TokenState::Expired => "expired",
                    coyote_wire::TokenState::Used => "used",
                    coyote_wire::TokenState::Revoked => "revoked",
                };
                TokenRow {
                    id: view.id,
                    state,
                    valid: view.status == coyote_wire::TokenState::Valid,
                    expires: format_ms(view.expires_at_ms),
                    uses: format!("{}/{}", view.uses_total - view.uses_left, view.uses_total),
                }
            })
            .collect()
    });
    let layout = v.layout(crm, v.t.nav_tokens);
    render(v, TokensPage { layout, tokens, created, error })
}

async fn tokens_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    match admin(&crm, &headers) {
        Ok(v) => tokens_page_for(&crm, &v, None, None),
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct TokenForm {
    #[serde(default)]
    csrf: String,
    hours: u64,
    uses: u32,
}

async fn token_create(State(crm): State<Crm>, headers: HeaderMap, Form(form): Form<TokenForm>) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let body = coyote_wire::TokenCreate { ttl_ms: form.hours.saturating_mul(3_600_000), uses: form.uses };
    match crm.call::<coyote_wire::TokenCreated>(&v.actor(), Method::POST, "/v1/tokens", Some(&body)).await {
        Ok(created) => {
            let command = format!(
                "coyote join {} --data /var/lib/coyote --listen <THIS-SERVER-IP>:7100",
                created.token
            );
            tokens_page_for(&crm, &v, Some((created.token, command)), None)
        }
        Err(e) => tokens_page_for(&crm, &v, None, Some(e.message)),
    }
}

async fn token_revoke(
    State(crm): State<Crm>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let v = match checked_post(&crm, &headers, &form.csrf, true) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match crm.call::<Committed>(&v.actor(), Method::DELETE, &format!("/v1/tokens/{id}"), None::<&()>).await {
        Ok(_) => Redirect::to("/tokens").into_response(),
        Err(e) => tokens_page_for(&crm, &v, None, Some(e.message)),
    }
}

// ---- stats ----

struct ChartRow {
    name: String,
    total: String,
    /// Server-rendered SVG (its text is escaped by `charts`).
    svg: String,
}

#[derive(Template)]
#[template(path = "stats.html")]
struct StatsPage {
    layout: Layout,
    services: Vec<ChartRow>,
    domains: Vec<ChartRow>,
}

/// The differences between consecutive values: what happened in each interval.
fn deltas(values: &[u64]) -> Vec<u64> {
    values.windows(2).map(|w| w[1].saturating_sub(w[0])).collect()
}

async fn stats_page(State(crm): State<Crm>, headers: HeaderMap) -> Response {
    let v = match admin(&crm, &headers) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let t = v.t;
    let history: Vec<crate::Sample> = crm.0.history.lock().expect("history lock").iter().cloned().collect();
    let latest = history.last().cloned().unwrap_or_default();
    let services = latest
        .services
        .iter()
        .map(|(name, (connections, cold_starts))| {
            let series: Vec<u64> = history.iter().map(|s| s.services.get(name).map_or(0, |c| c.0)).collect();
            let starts: Vec<u64> = history.iter().map(|s| s.services.get(name).map_or(0, |c| c.1)).collect();
            let svg = format!(
                "{}{}",
                crate::charts::line(&format!("{name}: {}", t.stats_connections), &deltas(&series), 320, 80),
                crate::charts::line(&format!("{name}: {}", t.stats_cold_starts), &deltas(&starts), 320, 80)
            );
            ChartRow { name: name.clone(), total: format!("{connections} / {cold_starts}"), svg }
        })
        .collect();
    let domains = latest
        .domains
        .iter()
        .map(|(domain, requests)| {
            let series: Vec<u64> =
                history.iter().map(|s| s.domains.get(domain).copied().unwrap_or(0)).collect();
            let svg =
                crate::charts::line(&format!("{domain}: {}", t.stats_requests), &deltas(&series), 320, 80);
            ChartRow { name: domain.clone(), total: requests.to_string(), svg }
        })
        .collect();
    let layout = v.layout(&crm, t.nav_stats);
    render(&v, StatsPage { layout, services, domains })
}
