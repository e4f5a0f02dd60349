//! The people who use the CRM and their keys: users with a role, API keys with a scope, and the
//! one-time activation URLs that create admins.
//!
//! Only hashes of secrets enter the log: a password as its argon2id hash (computed by the CRM), an
//! activation URL's and an API key's secret as their SHA-256. [`crate::Event::redacted`] blanks the
//! password hashes, so `events tail` and the API never show them.
//!
//! An activation URL is issued by whoever holds the server (`coyote up` prints the first one;
//! `coyote crm activate` prints another, for instance after the admin forgot a password). It is used
//! at most once and lapses after its lifetime; the first use that commits creates the admin, and any
//! other use of the same URL is rejected by `apply`, so there is never a race for who becomes admin.
//!
//! Who may do what (an admin creates users, a read-scoped key cannot write) is decided where the
//! request arrives, in the CRM; the log records who acted in each event's envelope.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::ServiceSpec;
use crate::{NodeId, Rejection};

/// Default lifetime of an activation URL.
pub const ACTIVATION_TTL_MS: u64 = 3_600_000;
/// Longest lifetime an activation URL may be given.
pub const ACTIVATION_TTL_MAX_MS: u64 = 24 * 3_600_000;
/// Activation URLs kept: used or lapsed ones are forgotten a day after they lapse.
const ACTIVATIONS_KEPT_MS: u64 = 24 * 3_600_000;
/// Valid (unused, unexpired) activation URLs at once, at most.
pub const ACTIVATIONS_OPEN_MAX: usize = 16;
pub const USERS_MAX: usize = 10_000;
pub const API_KEYS_MAX: usize = 1_000;
/// Longest user name, in bytes.
pub const USER_NAME_MAX: usize = 32;
/// Longest API key label, in bytes.
pub const KEY_LABEL_MAX: usize = 64;
/// Longest password hash (an argon2id PHC string is about 100 bytes).
const PASSWORD_HASH_MAX: usize = 256;

/// What a user may do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum UserRole {
    /// Runs the cluster: every page and action.
    Admin,
    /// Hosted by the cluster: their own account and status.
    Member,
}

impl UserRole {
    pub fn name(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Member => "member",
        }
    }
}

/// What an API key may do.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum KeyScope {
    /// Reads only (`GET`).
    Read,
    /// Reads and writes.
    Write,
}

impl KeyScope {
    pub fn name(self) -> &'static str {
        match self {
            KeyScope::Read => "read",
            KeyScope::Write => "write",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub role: UserRole,
    /// The argon2id hash of the password, as a PHC string.
    pub password_hash: String,
    pub created_at_ms: u64,
    pub password_changed_at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    pub id: String,
    pub secret_sha256: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The admin it created, once used.
    pub used_by: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: String,
    /// The user it acts for.
    pub owner: String,
    pub label: String,
    pub scope: KeyScope,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    /// When a request last used it, as recorded (at most once a minute, see [`KEY_USE_RECORD_MS`]).
    pub last_used_at_ms: Option<u64>,
    pub revoked: bool,
}

/// Who may sign up on the CRM's signup page.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SignupMode {
    /// Nobody: the page says signups are closed.
    #[default]
    Off,
    /// Anyone: the account and its service are created at once.
    Public,
    /// Anyone may ask; an admin approves or rejects each request.
    Approval,
    /// Only with an invite link from an admin, each used once.
    Invite,
}

impl SignupMode {
    pub fn name(self) -> &'static str {
        match self {
            SignupMode::Off => "off",
            SignupMode::Public => "public",
            SignupMode::Approval => "approval",
            SignupMode::Invite => "invite",
        }
    }

    pub fn parse(text: &str) -> Option<SignupMode> {
        [SignupMode::Off, SignupMode::Public, SignupMode::Approval, SignupMode::Invite]
            .into_iter()
            .find(|m| m.name() == text)
    }
}

/// What a signup provisions: a service named after the member, at `NAME.DOMAIN`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignupTemplate {
    pub image: String,
    /// The domain under which each member's service gets its name (`alice.DOMAIN`).
    pub domain: String,
    pub http_port: Option<u16>,
    pub memory_bytes: Option<u64>,
    pub on_demand: bool,
}

impl SignupTemplate {
    /// The spec of `name`'s service.
    pub fn spec(&self, name: &str) -> ServiceSpec {
        ServiceSpec {
            name: name.to_string(),
            image: self.image.clone(),
            domains: vec![format!("{name}.{}", self.domain)],
            ports: Vec::new(),
            memory_bytes: self.memory_bytes,
            on_demand: self.on_demand,
            dump: None,
            http_check: None,
            zone: None,
            http_port: self.http_port,
            tls_passthrough: false,
            keep: None,
        }
    }
}

/// The CRM's settings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CrmSettings {
    /// The cluster's name, as the pages show it.
    pub cluster_name: String,
    /// The domain the proxy serves the CRM at.
    pub admin_domain: Option<String>,
    pub signup: SignupMode,
    /// What a signup provisions (`None`: signups cannot be opened).
    pub template: Option<SignupTemplate>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Invite {
    pub id: String,
    pub secret_sha256: String,
    pub issued_at_ms: u64,
    pub expires_at_ms: u64,
    /// The member who signed up with it.
    pub used_by: Option<String>,
    pub revoked: bool,
}

/// The use of an invite link in a signup: its id and its secret's SHA-256.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InviteUse {
    pub invite_id: String,
    pub secret_sha256: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum SignupStatus {
    /// Waiting for an admin (approval mode).
    Pending,
    Approved,
    Rejected {
        reason: String,
    },
}

/// A signup and its steps, each with the index of the event that made it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Signup {
    pub name: String,
    /// Kept until the account is created, then cleared.
    pub password_hash: String,
    pub requested_at_ms: u64,
    pub requested_index: u64,
    pub invite: Option<String>,
    pub status: SignupStatus,
    /// The event that approved it (the request itself in public and invite modes): it created
    /// the member's account and service.
    pub approved_index: Option<u64>,
    /// When the master of the member's service reported serving it, and which node that was.
    pub served_at_ms: Option<u64>,
    pub served_by: Option<NodeId>,
}

/// Signups waiting for an admin, at most.
pub const SIGNUPS_PENDING_MAX: usize = 1_000;
/// Valid invite links at once, at most.
pub const INVITES_OPEN_MAX: usize = 1_000;
/// Longest lifetime of an invite link.
pub const INVITE_TTL_MAX_MS: u64 = 30 * 24 * 3_600_000;

/// A key's use is recorded again only this long after the last recorded use.
pub const KEY_USE_RECORD_MS: u64 = 60_000;

/// Users, API keys and activation URLs, as the log knows them.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Accounts {
    pub users: BTreeMap<String, User>,
    pub api_keys: BTreeMap<String, ApiKey>,
    pub activations: BTreeMap<String, Activation>,
    pub settings: CrmSettings,
    pub invites: BTreeMap<String, Invite>,
    /// By the member's name.
    pub signups: BTreeMap<String, Signup>,
}

/// The events about accounts (one variant of [`crate::Event`]). New variants go at the end.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum AccountEvent {
    /// A one-time URL that creates an admin was issued; the log holds its secret's SHA-256.
    ActivationIssued {
        activation_id: String,
        secret_sha256: String,
        expires_at_ms: u64,
    },
    /// An activation URL was used: it creates the admin `name`.
    AdminActivated {
        activation_id: String,
        secret_sha256: String,
        name: String,
        password_hash: String,
    },
    UserCreated {
        name: String,
        role: UserRole,
        password_hash: String,
    },
    PasswordChanged {
        name: String,
        password_hash: String,
    },
    ApiKeyCreated {
        key_id: String,
        owner: String,
        label: String,
        scope: KeyScope,
        secret_sha256: String,
    },
    ApiKeyRevoked {
        key_id: String,
    },
    /// A request used the key (recorded at most once per [`KEY_USE_RECORD_MS`]).
    ApiKeyUsed {
        key_id: String,
    },
    SettingsChanged {
        settings: CrmSettings,
    },
    InviteIssued {
        invite_id: String,
        secret_sha256: String,
        expires_at_ms: u64,
    },
    InviteRevoked {
        invite_id: String,
    },
    /// Someone asks for an account on the signup page. In public mode, and with a valid invite,
    /// `apply` approves it at once: this event creates the member and their service.
    SignupRequested {
        name: String,
        password_hash: String,
        invite: Option<InviteUse>,
    },
    /// An admin's decision on a pending signup; an approval creates the member and their service.
    SignupDecided {
        name: String,
        approve: bool,
        reason: String,
    },
    /// The master of a member's service reports that it serves it.
    SignupServed {
        name: String,
        node: NodeId,
    },
}

/// Whether `name` can name a user: 1 to [`USER_NAME_MAX`] bytes of lowercase letters, digits, `.`,
/// `_` and `-`, starting with a letter or a digit.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= USER_NAME_MAX
        && name.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// An id of an activation URL or an API key: 1 to 32 lowercase letters and digits.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn valid_sha256(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_password_hash(hash: &str) -> bool {
    hash.starts_with("$argon2id$")
        && hash.len() <= PASSWORD_HASH_MAX
        && hash.bytes().all(|b| b.is_ascii_graphic())
}

/// Longest cluster name, in characters.
pub const CLUSTER_NAME_MAX: usize = 64;

fn valid_domain(d: &str) -> bool {
    d.len() <= 253
        && d.contains('.')
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

fn check_settings(settings: &CrmSettings) -> Result<(), Rejection> {
    let reject = |m: String| Err(Rejection::new(m));
    let name = &settings.cluster_name;
    if name.chars().count() > CLUSTER_NAME_MAX || name.chars().any(char::is_control) {
        return reject(format!("a cluster name is at most {CLUSTER_NAME_MAX} printable characters"));
    }
    if let Some(d) = &settings.admin_domain {
        if !valid_domain(d) {
            return reject(format!("{d:?} is not a domain name (lowercase, like admin.example.org)"));
        }
    }
    match &settings.template {
        None if settings.signup != SignupMode::Off => {
            return reject("signups need a template (image and domain)".into());
        }
        None => {}
        Some(t) => {
            if t.image.is_empty()
                || t.image.len() > 256
                || t.image.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return reject(format!("{:?} is not an image name", t.image));
            }
            if !valid_domain(&t.domain) {
                return reject(format!("{:?} is not a domain name (lowercase, like example.org)", t.domain));
            }
            if t.http_port == Some(0) {
                return reject("the template's HTTP port cannot be 0".into());
            }
        }
    }
    Ok(())
}

impl AccountEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            AccountEvent::ActivationIssued { .. } => "activation_issued",
            AccountEvent::AdminActivated { .. } => "admin_activated",
            AccountEvent::UserCreated { .. } => "user_created",
            AccountEvent::PasswordChanged { .. } => "password_changed",
            AccountEvent::ApiKeyCreated { .. } => "api_key_created",
            AccountEvent::ApiKeyRevoked { .. } => "api_key_revoked",
            AccountEvent::ApiKeyUsed { .. } => "api_key_used",
            AccountEvent::SettingsChanged { .. } => "settings_changed",
            AccountEvent::InviteIssued { .. } => "invite_issued",
            AccountEvent::InviteRevoked { .. } => "invite_revoked",
            AccountEvent::SignupRequested { .. } => "signup_requested",
            AccountEvent::SignupDecided { .. } => "signup_decided",
            AccountEvent::SignupServed { .. } => "signup_served",
        }
    }

    pub const KINDS: &'static [&'static str] = &[
        "activation_issued",
        "admin_activated",
        "user_created",
        "password_changed",
        "api_key_created",
        "api_key_revoked",
        "api_key_used",
        "settings_changed",
        "invite_issued",
        "invite_revoked",
        "signup_requested",
        "signup_decided",
        "signup_served",
    ];

    pub fn summary(&self) -> String {
        match self {
            AccountEvent::ActivationIssued { activation_id, expires_at_ms, .. } => format!(
                "activation URL {activation_id} issued, valid until {}",
                crate::format_ms(*expires_at_ms)
            ),
            AccountEvent::AdminActivated { activation_id, name, .. } => {
                format!("admin {name} created with activation URL {activation_id}")
            }
            AccountEvent::UserCreated { name, role, .. } => format!("user {name} created ({})", role.name()),
            AccountEvent::PasswordChanged { name, .. } => format!("password of {name} changed"),
            AccountEvent::ApiKeyCreated { key_id, owner, label, scope, .. } => {
                format!("API key {key_id} ({label:?}, {}) created for {owner}", scope.name())
            }
            AccountEvent::ApiKeyRevoked { key_id } => format!("API key {key_id} revoked"),
            AccountEvent::ApiKeyUsed { key_id } => format!("API key {key_id} used"),
            AccountEvent::SettingsChanged { settings } => format!(
                "settings: name {:?}, admin domain {}, signups {}{}",
                settings.cluster_name,
                settings.admin_domain.as_deref().unwrap_or("-"),
                settings.signup.name(),
                settings
                    .template
                    .as_ref()
                    .map(|t| format!(" (image {}, under {})", t.image, t.domain))
                    .unwrap_or_default()
            ),
            AccountEvent::InviteIssued { invite_id, expires_at_ms, .. } => {
                format!("invite {invite_id} issued, valid until {}", crate::format_ms(*expires_at_ms))
            }
            AccountEvent::InviteRevoked { invite_id } => format!("invite {invite_id} revoked"),
            AccountEvent::SignupRequested { name, invite, .. } => match invite {
                Some(i) => format!("signup of {name} with invite {}", i.invite_id),
                None => format!("signup of {name} requested"),
            },
            AccountEvent::SignupDecided { name, approve: true, .. } => format!("signup of {name} approved"),
            AccountEvent::SignupDecided { name, reason, .. } => {
                format!("signup of {name} rejected: {reason}")
            }
            AccountEvent::SignupServed { name, node } => format!("service of {name} served by node {node}"),
        }
    }

    /// The event without its password hash.
    pub fn redact(&mut self) {
        match self {
            AccountEvent::AdminActivated { password_hash, .. }
            | AccountEvent::UserCreated { password_hash, .. }
            | AccountEvent::PasswordChanged { password_hash, .. }
            | AccountEvent::SignupRequested { password_hash, .. } => password_hash.clear(),
            _ => {}
        }
    }
}

impl Accounts {
    pub fn admins(&self) -> impl Iterator<Item = &User> {
        self.users.values().filter(|u| u.role == UserRole::Admin)
    }

    /// The activation URLs that can still be used at `at_ms`.
    pub fn open_activations(&self, at_ms: u64) -> impl Iterator<Item = &Activation> {
        self.activations.values().filter(move |a| a.used_by.is_none() && a.expires_at_ms > at_ms)
    }

    pub(crate) fn check(&self, event: &AccountEvent, at_ms: u64) -> Result<(), Rejection> {
        let reject = |m: String| Err(Rejection::new(m));
        let new_user = |name: &str, hash: &str| {
            if !valid_user_name(name) {
                return reject(format!(
                    "{name:?} is not a user name: 1 to {USER_NAME_MAX} lowercase letters, digits, '.', '_' or '-'"
                ));
            }
            if !valid_password_hash(hash) {
                return reject("the password hash is not an argon2id hash".into());
            }
            if self.users.contains_key(name) {
                return reject(format!("user {name} already exists"));
            }
            if self.users.len() >= USERS_MAX {
                return reject(format!("too many users (at most {USERS_MAX})"));
            }
            Ok(())
        };
        match event {
            AccountEvent::ActivationIssued { activation_id, secret_sha256, expires_at_ms } => {
                if !valid_id(activation_id) || !valid_sha256(secret_sha256) {
                    return reject("activation id or secret hash is malformed".into());
                }
                if self.activations.contains_key(activation_id) {
                    return reject(format!("activation {activation_id} already exists"));
                }
                if *expires_at_ms <= at_ms || *expires_at_ms - at_ms > ACTIVATION_TTL_MAX_MS {
                    return reject("an activation URL lasts from a moment to a day".into());
                }
                if self.open_activations(at_ms).count() >= ACTIVATIONS_OPEN_MAX {
                    return reject(format!(
                        "too many activation URLs open (at most {ACTIVATIONS_OPEN_MAX}): wait until some lapse"
                    ));
                }
            }
            AccountEvent::AdminActivated { activation_id, secret_sha256, name, password_hash } => {
                let Some(a) = self.activations.get(activation_id) else {
                    return reject("this activation URL does not exist".into());
                };
                if a.secret_sha256 != *secret_sha256 {
                    return reject("this activation URL does not exist".into());
                }
                if let Some(by) = &a.used_by {
                    return reject(format!("this activation URL was already used (it created {by})"));
                }
                if a.expires_at_ms <= at_ms {
                    return reject("this activation URL has expired".into());
                }
                new_user(name, password_hash)?;
            }
            AccountEvent::UserCreated { name, password_hash, .. } => new_user(name, password_hash)?,
            AccountEvent::PasswordChanged { name, password_hash } => {
                if !self.users.contains_key(name) {
                    return reject(format!("user {name} does not exist"));
                }
                if !valid_password_hash(password_hash) {
                    return reject("the password hash is not an argon2id hash".into());
                }
            }
            AccountEvent::ApiKeyCreated { key_id, owner, label, secret_sha256, .. } => {
                if !valid_id(key_id) || !valid_sha256(secret_sha256) {
                    return reject("key id or secret hash is malformed".into());
                }
                if self.api_keys.contains_key(key_id) {
                    return reject(format!("API key {key_id} already exists"));
                }
                if !self.users.contains_key(owner) {
                    return reject(format!("user {owner} does not exist"));
                }
                if label.is_empty() || label.len() > KEY_LABEL_MAX || label.chars().any(char::is_control) {
                    return reject(format!("a key's label is 1 to {KEY_LABEL_MAX} printable characters"));
                }
                if self.api_keys.values().filter(|k| !k.revoked).count() >= API_KEYS_MAX {
                    return reject(format!("too many API keys (at most {API_KEYS_MAX}): revoke some"));
                }
            }
            AccountEvent::ApiKeyRevoked { key_id } | AccountEvent::ApiKeyUsed { key_id } => {
                match self.api_keys.get(key_id) {
                    None => return reject(format!("API key {key_id} does not exist")),
                    Some(k) if k.revoked => return reject(format!("API key {key_id} is revoked")),
                    Some(_) => {}
                }
            }
            AccountEvent::SettingsChanged { settings } => check_settings(settings)?,
            AccountEvent::InviteIssued { invite_id, secret_sha256, expires_at_ms } => {
                if !valid_id(invite_id) || !valid_sha256(secret_sha256) {
                    return reject("invite id or secret hash is malformed".into());
                }
                if self.invites.contains_key(invite_id) {
                    return reject(format!("invite {invite_id} already exists"));
                }
                if *expires_at_ms <= at_ms || *expires_at_ms - at_ms > INVITE_TTL_MAX_MS {
                    return reject("an invite link lasts from a moment to 30 days".into());
                }
                if self.open_invites(at_ms).count() >= INVITES_OPEN_MAX {
                    return reject(format!("too many invite links open (at most {INVITES_OPEN_MAX})"));
                }
            }
            AccountEvent::InviteRevoked { invite_id } => match self.invites.get(invite_id) {
                None => return reject(format!("invite {invite_id} does not exist")),
                Some(i) if i.revoked => return reject(format!("invite {invite_id} is already revoked")),
                Some(_) => {}
            },
            AccountEvent::SignupRequested { name, password_hash, invite } => {
                if self.settings.signup == SignupMode::Off {
                    return reject("signups are closed".into());
                }
                if self.settings.template.is_none() {
                    return reject(
                        "signups have no template: an admin must choose one in the settings".into(),
                    );
                }
                if let Some(s) = self.signups.get(name) {
                    if !matches!(s.status, SignupStatus::Rejected { .. }) {
                        return reject(format!("{name} has already signed up"));
                    }
                }
                new_user(name, password_hash)?;
                match invite {
                    Some(i) => self.check_invite(i, at_ms)?,
                    None if self.settings.signup == SignupMode::Invite => {
                        return reject("signups need an invite link".into());
                    }
                    None => {}
                }
                let pending = self.signups.values().filter(|s| s.status == SignupStatus::Pending).count();
                if self.settings.signup == SignupMode::Approval
                    && invite.is_none()
                    && pending >= SIGNUPS_PENDING_MAX
                {
                    return reject(format!(
                        "too many signups wait for an admin (at most {SIGNUPS_PENDING_MAX})"
                    ));
                }
            }
            AccountEvent::SignupDecided { name, approve, .. } => {
                match self.signups.get(name) {
                    None => return reject(format!("{name} has not signed up")),
                    Some(s) if s.status != SignupStatus::Pending => {
                        return reject(format!("the signup of {name} was already decided"));
                    }
                    Some(_) => {}
                }
                if *approve {
                    if self.users.contains_key(name) {
                        return reject(format!("user {name} already exists"));
                    }
                    if self.settings.template.is_none() {
                        return reject(
                            "signups have no template: an admin must choose one in the settings".into(),
                        );
                    }
                }
            }
            AccountEvent::SignupServed { name, .. } => match self.signups.get(name) {
                Some(s) if s.status == SignupStatus::Approved && s.served_at_ms.is_none() => {}
                Some(_) => return reject(format!("the signup of {name} is not waiting to be served")),
                None => return reject(format!("{name} has not signed up")),
            },
        }
        Ok(())
    }

    /// The spec of the service `event` creates for a new member, if it creates one (checked by the
    /// state as any new service is).
    pub(crate) fn provisions(&self, event: &AccountEvent) -> Option<ServiceSpec> {
        let template = self.settings.template.as_ref()?;
        match event {
            AccountEvent::SignupRequested { name, invite, .. }
                if self.settings.signup == SignupMode::Public || invite.is_some() =>
            {
                Some(template.spec(name))
            }
            AccountEvent::SignupDecided { name, approve: true, .. } => Some(template.spec(name)),
            _ => None,
        }
    }

    /// The invite links that can still be used at `at_ms`.
    pub fn open_invites(&self, at_ms: u64) -> impl Iterator<Item = &Invite> {
        self.invites.values().filter(move |i| i.used_by.is_none() && !i.revoked && i.expires_at_ms > at_ms)
    }

    fn check_invite(&self, invite: &InviteUse, at_ms: u64) -> Result<(), Rejection> {
        let reject = |m: &str| Err(Rejection::new(m));
        let Some(i) = self.invites.get(&invite.invite_id) else {
            return reject("this invite link does not exist");
        };
        if i.secret_sha256 != invite.secret_sha256 {
            return reject("this invite link does not exist");
        }
        if i.used_by.is_some() {
            return reject("this invite link was already used");
        }
        if i.revoked {
            return reject("this invite link was revoked");
        }
        if i.expires_at_ms <= at_ms {
            return reject("this invite link has expired");
        }
        Ok(())
    }

    /// Applies a checked event.
    pub(crate) fn mutate(&mut self, event: &AccountEvent, at_ms: u64, index: u64) {
        let user = |name: &String, role, hash: &String| User {
            name: name.clone(),
            role,
            password_hash: hash.clone(),
            created_at_ms: at_ms,
            password_changed_at_ms: at_ms,
        };
        match event {
            AccountEvent::ActivationIssued { activation_id, secret_sha256, expires_at_ms } => {
                self.activations.retain(|_, a| a.expires_at_ms.saturating_add(ACTIVATIONS_KEPT_MS) > at_ms);
                self.activations.insert(
                    activation_id.clone(),
                    Activation {
                        id: activation_id.clone(),
                        secret_sha256: secret_sha256.clone(),
                        issued_at_ms: at_ms,
                        expires_at_ms: *expires_at_ms,
                        used_by: None,
                    },
                );
            }
            AccountEvent::AdminActivated { activation_id, name, password_hash, .. } => {
                let a = self.activations.get_mut(activation_id).expect("checked: activation exists");
                a.used_by = Some(name.clone());
                self.users.insert(name.clone(), user(name, UserRole::Admin, password_hash));
            }
            AccountEvent::UserCreated { name, role, password_hash } => {
                self.users.insert(name.clone(), user(name, *role, password_hash));
            }
            AccountEvent::PasswordChanged { name, password_hash } => {
                let u = self.users.get_mut(name).expect("checked: user exists");
                u.password_hash = password_hash.clone();
                u.password_changed_at_ms = at_ms;
            }
            AccountEvent::ApiKeyCreated { key_id, owner, label, scope, secret_sha256 } => {
                self.api_keys.insert(
                    key_id.clone(),
                    ApiKey {
                        id: key_id.clone(),
                        owner: owner.clone(),
                        label: label.clone(),
                        scope: *scope,
                        secret_sha256: secret_sha256.clone(),
                        created_at_ms: at_ms,
                        last_used_at_ms: None,
                        revoked: false,
                    },
                );
            }
            AccountEvent::ApiKeyRevoked { key_id } => {
                self.api_keys.get_mut(key_id).expect("checked: key exists").revoked = true;
            }
            AccountEvent::ApiKeyUsed { key_id } => {
                self.api_keys.get_mut(key_id).expect("checked: key exists").last_used_at_ms = Some(at_ms);
            }
            AccountEvent::SettingsChanged { settings } => self.settings = settings.clone(),
            AccountEvent::InviteIssued { invite_id, secret_sha256, expires_at_ms } => {
                self.invites.retain(|_, i| i.expires_at_ms.saturating_add(ACTIVATIONS_KEPT_MS) > at_ms);
                self.invites.insert(
                    invite_id.clone(),
                    Invite {
                        id: invite_id.clone(),
                        secret_sha256: secret_sha256.clone(),
                        issued_at_ms: at_ms,
                        expires_at_ms: *expires_at_ms,
                        used_by: None,
                        revoked: false,
                    },
                );
            }
            AccountEvent::InviteRevoked { invite_id } => {
                self.invites.get_mut(invite_id).expect("checked: invite exists").revoked = true;
            }
            AccountEvent::SignupRequested { name, password_hash, invite } => {
                let now = self.settings.signup == SignupMode::Public || invite.is_some();
                if let Some(i) = invite {
                    self.invites.get_mut(&i.invite_id).expect("checked: invite exists").used_by =
                        Some(name.clone());
                }
                if now {
                    self.users.insert(name.clone(), user(name, UserRole::Member, password_hash));
                }
                let signup = Signup {
                    name: name.clone(),
                    password_hash: if now { String::new() } else { password_hash.clone() },
                    requested_at_ms: at_ms,
                    requested_index: index,
                    invite: invite.as_ref().map(|i| i.invite_id.clone()),
                    status: if now { SignupStatus::Approved } else { SignupStatus::Pending },
                    approved_index: now.then_some(index),
                    served_at_ms: None,
                    served_by: None,
                };
                self.signups.insert(name.clone(), signup);
            }
            AccountEvent::SignupDecided { name, approve, reason } => {
                let signup = self.signups.get_mut(name).expect("checked: signup exists");
                let hash = std::mem::take(&mut signup.password_hash);
                if *approve {
                    signup.status = SignupStatus::Approved;
                    signup.approved_index = Some(index);
                    self.users.insert(name.clone(), user(name, UserRole::Member, &hash));
                } else {
                    signup.status = SignupStatus::Rejected { reason: reason.clone() };
                }
            }
            AccountEvent::SignupServed { name, node } => {
                let signup = self.signups.get_mut(name).expect("checked: signup exists");
                signup.served_at_ms = Some(at_ms);
                signup.served_by = Some(*node);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA";

    fn sha(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn issued(id: &str, at: u64) -> (Accounts, AccountEvent) {
        let mut a = Accounts::default();
        let issue = AccountEvent::ActivationIssued {
            activation_id: id.into(),
            secret_sha256: sha('a'),
            expires_at_ms: at + ACTIVATION_TTL_MS,
        };
        a.check(&issue, at).unwrap();
        a.mutate(&issue, at, 1);
        let activate = AccountEvent::AdminActivated {
            activation_id: id.into(),
            secret_sha256: sha('a'),
            name: "alice".into(),
            password_hash: HASH.into(),
        };
        (a, activate)
    }

    #[test]
    fn an_activation_url_creates_one_admin_once() {
        let (mut a, activate) = issued("act1", 1000);
        a.check(&activate, 2000).unwrap();
        a.mutate(&activate, 2000, 1);
        assert_eq!(a.admins().count(), 1);
        let again = AccountEvent::AdminActivated {
            activation_id: "act1".into(),
            secret_sha256: sha('a'),
            name: "mallory".into(),
            password_hash: HASH.into(),
        };
        let err = a.check(&again, 2001).unwrap_err();
        assert!(err.reason.contains("already used"), "{err}");
    }

    #[test]
    fn an_activation_url_lapses_and_needs_its_secret() {
        let (a, activate) = issued("act1", 1000);
        assert!(a.check(&activate, 1000 + ACTIVATION_TTL_MS).unwrap_err().reason.contains("expired"));
        let AccountEvent::AdminActivated { activation_id, name, password_hash, .. } = activate else {
            unreachable!()
        };
        let wrong =
            AccountEvent::AdminActivated { activation_id, secret_sha256: sha('b'), name, password_hash };
        assert!(a.check(&wrong, 2000).unwrap_err().reason.contains("does not exist"));
    }

    #[test]
    fn bad_names_and_hashes_are_refused() {
        let (a, _) = issued("act1", 1000);
        for (name, hash) in
            [("Alice", HASH), ("", HASH), ("<script>", HASH), ("bob", "plain"), ("bob", "$argon2i$v=19$x")]
        {
            let e = AccountEvent::UserCreated {
                name: name.into(),
                role: UserRole::Member,
                password_hash: hash.into(),
            };
            assert!(a.check(&e, 2000).is_err(), "{name:?} {hash:?} accepted");
        }
    }

    #[test]
    fn a_revoked_key_is_not_used() {
        let (mut a, activate) = issued("act1", 1000);
        a.mutate(&activate, 2000, 1);
        let create = AccountEvent::ApiKeyCreated {
            key_id: "k1".into(),
            owner: "alice".into(),
            label: "backup script".into(),
            scope: KeyScope::Read,
            secret_sha256: sha('c'),
        };
        a.check(&create, 3000).unwrap();
        a.mutate(&create, 3000, 1);
        let used = AccountEvent::ApiKeyUsed { key_id: "k1".into() };
        a.check(&used, 4000).unwrap();
        a.mutate(&used, 4000, 1);
        assert_eq!(a.api_keys["k1"].last_used_at_ms, Some(4000));
        let revoke = AccountEvent::ApiKeyRevoked { key_id: "k1".into() };
        a.mutate(&revoke, 5000, 1);
        assert!(a.check(&used, 6000).is_err());
        assert!(a.check(&revoke, 6000).is_err());
    }

    #[test]
    fn redaction_blanks_password_hashes() {
        let (_, mut activate) = issued("act1", 1000);
        activate.redact();
        assert!(
            matches!(activate, AccountEvent::AdminActivated { password_hash, .. } if password_hash.is_empty())
        );
    }
}
