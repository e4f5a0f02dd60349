//! What a hosted service is: its image, names, ports and limits.
//!
//! # Encoding
//!
//! A spec is part of events in the log, of archived events and of snapshots, all encoded with bincode,
//! which does not describe its fields: adding one would make every spec already written unreadable.
//! So [`ServiceSpec`] extends its binary form by hand, in a way that keeps old bytes valid: the
//! `on_demand` flag, a bool written as one byte (0 or 1), is read as a byte of flags, and the
//! [`FLAG_DUMP`] bit says that a dump command follows. A spec without a dump command is encoded byte
//! for byte as before (so its [`ServiceSpec::hash`], the label on its container, does not change),
//! and every spec written before dump commands existed decodes as a spec without one. A spec with a
//! dump command cannot be read by a coyote that predates them (it fails to decode, loudly: an unknown
//! flag is an error, never ignored). Human-readable formats (the JSON of the API and the CLI) use the
//! field names, with `dump` optional.

use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

use crate::data::Retention;
use crate::Rejection;

/// Smallest memory limit accepted: Docker refuses limits under 6 MiB.
pub const MEMORY_MIN_BYTES: u64 = 6 * 1024 * 1024;
/// Bounds on the lists a spec carries.
pub const DOMAINS_MAX: usize = 32;
pub const PORTS_MAX: usize = 32;
/// Bounds on a dump command: arguments, and bytes of all arguments together.
pub const DUMP_ARGS_MAX: usize = 64;
pub const DUMP_BYTES_MAX: usize = 4096;

/// In the binary encoding, the byte that was `on_demand`: bit 0 is `on_demand`, this bit says a dump
/// command follows (see the module docs).
pub const FLAG_DUMP: u8 = 0b10;
/// An HTTP check path follows (after the dump command).
pub const FLAG_HTTP_CHECK: u8 = 0b100;
/// A DNS zone check follows (after the HTTP check path).
pub const FLAG_ZONE: u8 = 0b1000;
/// The container port the proxy sends the service's web traffic to follows (last); without it, 80.
pub const FLAG_HTTP_PORT: u8 = 0b1_0000;
/// The proxy passes TLS connections for the service's domains through to its container, which
/// terminates TLS itself (no data follows).
pub const FLAG_TLS_PASSTHROUGH: u8 = 0b10_0000;
/// A retention of the service's snapshots follows.
pub const FLAG_KEEP: u8 = 0b100_0000;
const FLAG_ON_DEMAND: u8 = 0b01;
const FLAGS_KNOWN: u8 = FLAG_ON_DEMAND
    | FLAG_DUMP
    | FLAG_HTTP_CHECK
    | FLAG_ZONE
    | FLAG_HTTP_PORT
    | FLAG_TLS_PASSTHROUGH
    | FLAG_KEEP;
/// The container port web traffic goes to when a spec names none.
pub const HTTP_PORT_DEFAULT: u16 = 80;
/// The container port that passed-through TLS connections go to.
pub const TLS_PASSTHROUGH_PORT: u16 = 443;
/// Bounds on the health checks: the HTTP path's length, and the nameservers of a zone check.
pub const HTTP_CHECK_PATH_MAX: usize = 1024;
pub const NAMESERVERS_MAX: usize = 8;

/// The DNS zone of a service, and the nameservers that serve it from its master: while any of them
/// answers an SOA query for the zone, the failover does not take over (see the monitor).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ZoneCheck {
    pub zone: String,
    /// `HOST:PORT` or `HOST` (port 53); HOST is an IP address or a name.
    pub nameservers: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    pub domains: Vec<String>,
    pub ports: Vec<PortMap>,
    pub memory_bytes: Option<u64>,
    /// Stopped until a connection arrives on one of its ports.
    pub on_demand: bool,
    /// Run inside the container (an argv, no shell: `["sh", "-c", "..."]` for one) before coyote
    /// stops it when idle or short of memory; if it fails, the container keeps running and an alarm
    /// is raised.
    pub dump: Option<Vec<String>>,
    /// How the monitor checks the service at its master: `None`, a TCP connection to its first
    /// port; `Some(path)`, an HTTP `GET path` on that port, healthy when answered with a status below
    /// 500.
    pub http_check: Option<String>,
    /// The service's DNS zone: the failover takes over only while the service AND its zone are
    /// unreachable from where it stands. `None`: the service check alone counts.
    pub zone: Option<ZoneCheck>,
    /// The container port the proxy sends requests for the service's domains to, over the coyote
    /// network (`None`: [`HTTP_PORT_DEFAULT`]).
    pub http_port: Option<u16>,
    /// TLS connections for the service's domains go to its container undecrypted, routed by the
    /// name in their ClientHello, to the container's port [`TLS_PASSTHROUGH_PORT`].
    pub tls_passthrough: bool,
    /// Which of the service's snapshots the ledger keeps (`None`: [`crate::data::RETENTION`]).
    pub keep: Option<Retention>,
}

/// The JSON form of a spec: named fields, `dump` optional.
#[derive(Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename = "ServiceSpec")]
struct SpecFields {
    name: String,
    image: String,
    domains: Vec<String>,
    ports: Vec<PortMap>,
    memory_bytes: Option<u64>,
    on_demand: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dump: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_check: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zone: Option<ZoneCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http_port: Option<u16>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tls_passthrough: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keep: Option<Retention>,
}

/// The schema of a spec is that of its JSON form.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ServiceSpec {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        <SpecFields as utoipa::PartialSchema>::schema()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ServiceSpec {
    fn name() -> std::borrow::Cow<'static, str> {
        "ServiceSpec".into()
    }

    fn schemas(schemas: &mut Vec<(String, utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>)>) {
        <SpecFields as utoipa::ToSchema>::schemas(schemas)
    }
}

impl Serialize for ServiceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            let ServiceSpec {
                name,
                image,
                domains,
                ports,
                memory_bytes,
                on_demand,
                dump,
                http_check,
                zone,
                http_port,
                tls_passthrough,
                keep,
            } = self.clone();
            return SpecFields {
                name,
                image,
                domains,
                ports,
                memory_bytes,
                on_demand,
                dump,
                http_check,
                zone,
                http_port,
                tls_passthrough,
                keep,
            }
            .serialize(serializer);
        }
        let mut flags = if self.on_demand { FLAG_ON_DEMAND } else { 0 };
        if self.dump.is_some() {
            flags |= FLAG_DUMP;
        }
        if self.http_check.is_some() {
            flags |= FLAG_HTTP_CHECK;
        }
        if self.zone.is_some() {
            flags |= FLAG_ZONE;
        }
        if self.http_port.is_some() {
            flags |= FLAG_HTTP_PORT;
        }
        if self.tls_passthrough {
            flags |= FLAG_TLS_PASSTHROUGH;
        }
        if self.keep.is_some() {
            flags |= FLAG_KEEP;
        }
        let extra = usize::from(self.dump.is_some())
            + usize::from(self.http_check.is_some())
            + usize::from(self.zone.is_some())
            + usize::from(self.http_port.is_some())
            + usize::from(self.keep.is_some());
        let mut t = serializer.serialize_tuple(6 + extra)?;
        t.serialize_element(&self.name)?;
        t.serialize_element(&self.image)?;
        t.serialize_element(&self.domains)?;
        t.serialize_element(&self.ports)?;
        t.serialize_element(&self.memory_bytes)?;
        t.serialize_element(&flags)?;
        if let Some(dump) = &self.dump {
            t.serialize_element(dump)?;
        }
        if let Some(path) = &self.http_check {
            t.serialize_element(path)?;
        }
        if let Some(zone) = &self.zone {
            t.serialize_element(zone)?;
        }
        if let Some(port) = &self.http_port {
            t.serialize_element(port)?;
        }
        if let Some(keep) = &self.keep {
            t.serialize_element(keep)?;
        }
        t.end()
    }
}

impl<'de> Deserialize<'de> for ServiceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let SpecFields {
                name,
                image,
                domains,
                ports,
                memory_bytes,
                on_demand,
                dump,
                http_check,
                zone,
                http_port,
                tls_passthrough,
                keep,
            } = SpecFields::deserialize(deserializer)?;
            return Ok(ServiceSpec {
                name,
                image,
                domains,
                ports,
                memory_bytes,
                on_demand,
                dump,
                http_check,
                zone,
                http_port,
                tls_passthrough,
                keep,
            });
        }
        struct Binary;
        impl<'de> Visitor<'de> for Binary {
            type Value = ServiceSpec;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a service spec")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ServiceSpec, A::Error> {
                let missing = |what: &str| de::Error::custom(format!("service spec without {what}"));
                let name = seq.next_element()?.ok_or_else(|| missing("name"))?;
                let image = seq.next_element()?.ok_or_else(|| missing("image"))?;
                let domains = seq.next_element()?.ok_or_else(|| missing("domains"))?;
                let ports = seq.next_element()?.ok_or_else(|| missing("ports"))?;
                let memory_bytes = seq.next_element()?.ok_or_else(|| missing("memory"))?;
                let flags: u8 = seq.next_element()?.ok_or_else(|| missing("flags"))?;
                if flags & !FLAGS_KNOWN != 0 {
                    return Err(de::Error::custom(format!(
                        "service spec with unknown flags {flags:#04x} (written by a newer coyote?)"
                    )));
                }
                let dump = if flags & FLAG_DUMP != 0 {
                    Some(seq.next_element()?.ok_or_else(|| missing("its dump command"))?)
                } else {
                    None
                };
                let http_check = if flags & FLAG_HTTP_CHECK != 0 {
                    Some(seq.next_element()?.ok_or_else(|| missing("its HTTP check path"))?)
                } else {
                    None
                };
                let zone = if flags & FLAG_ZONE != 0 {
                    Some(seq.next_element()?.ok_or_else(|| missing("its zone check"))?)
                } else {
                    None
                };
                let http_port = if flags & FLAG_HTTP_PORT != 0 {
                    Some(seq.next_element()?.ok_or_else(|| missing("its HTTP port"))?)
                } else {
                    None
                };
                let keep = if flags & FLAG_KEEP != 0 {
                    Some(seq.next_element()?.ok_or_else(|| missing("its retention"))?)
                } else {
                    None
                };
                let on_demand = flags & FLAG_ON_DEMAND != 0;
                let tls_passthrough = flags & FLAG_TLS_PASSTHROUGH != 0;
                Ok(ServiceSpec {
                    name,
                    image,
                    domains,
                    ports,
                    memory_bytes,
                    on_demand,
                    dump,
                    http_check,
                    zone,
                    http_port,
                    tls_passthrough,
                    keep,
                })
            }
        }
        deserializer.deserialize_tuple(11, Binary)
    }
}

impl ServiceSpec {
    /// Checks that the spec is well formed, explaining the first thing that is not.
    pub fn validate(&self) -> Result<(), Rejection> {
        validate_name(&self.name)?;
        if self.image.is_empty() || self.image.len() > 255 || self.image.chars().any(|c| c.is_whitespace()) {
            return Err(Rejection::new(format!(
                "image {:?} is not a valid image reference (1-255 characters, no spaces)",
                self.image
            )));
        }
        if self.domains.len() > DOMAINS_MAX {
            return Err(Rejection::new(format!("at most {DOMAINS_MAX} domains per service")));
        }
        for d in &self.domains {
            validate_domain(d)?;
        }
        if self.ports.len() > PORTS_MAX {
            return Err(Rejection::new(format!("at most {PORTS_MAX} ports per service")));
        }
        let mut hosts = std::collections::BTreeSet::new();
        for p in &self.ports {
            if p.host == 0 || p.container == 0 {
                return Err(Rejection::new(format!("port {}:{} uses port 0", p.host, p.container)));
            }
            if !hosts.insert(p.host) {
                return Err(Rejection::new(format!("host port {} is listed twice", p.host)));
            }
        }
        if let Some(m) = self.memory_bytes {
            if m < MEMORY_MIN_BYTES {
                return Err(Rejection::new(format!("memory limit {m} bytes is below the minimum of 6M")));
            }
        }
        if let Some(dump) = &self.dump {
            validate_dump(dump)?;
        }
        if let Some(path) = &self.http_check {
            validate_http_path(path)?;
        }
        if let Some(zone) = &self.zone {
            validate_zone(zone)?;
        }
        if self.http_port == Some(0) {
            return Err(Rejection::new("the HTTP port cannot be 0".to_string()));
        }
        if self.tls_passthrough && self.domains.is_empty() {
            return Err(Rejection::new(
                "TLS passthrough needs at least one domain (the name it is routed by)".to_string(),
            ));
        }
        if let Some(keep) = &self.keep {
            keep.validate()?;
        }
        Ok(())
    }

    /// Hex SHA-256 of the encoded spec: containers are labelled with it to detect drift. The dump
    /// command and the health checks are left out: they are not part of the container, so changing
    /// them does not replace one.
    pub fn hash(&self) -> String {
        let container = ServiceSpec {
            dump: None,
            http_check: None,
            zone: None,
            http_port: None,
            tls_passthrough: false,
            keep: None,
            ..self.clone()
        };
        hex::encode(Sha256::digest(crate::encode(&container)))
    }

    /// The container port the proxy sends the service's web traffic to.
    pub fn web_port(&self) -> u16 {
        self.http_port.unwrap_or(HTTP_PORT_DEFAULT)
    }

    pub fn describe(&self) -> String {
        let mut parts = vec![format!("image {}", self.image)];
        if !self.domains.is_empty() {
            parts.push(format!("domains {}", self.domains.join(",")));
        }
        if !self.ports.is_empty() {
            let ports: Vec<String> =
                self.ports.iter().map(|p| format!("{}:{}", p.host, p.container)).collect();
            parts.push(format!("ports {}", ports.join(",")));
        }
        if let Some(m) = self.memory_bytes {
            parts.push(format!("memory {}", format_bytes(m)));
        }
        if self.on_demand {
            parts.push("on demand".into());
        }
        if let Some(dump) = &self.dump {
            parts.push(format!("dump {}", format_argv(dump)));
        }
        if let Some(path) = &self.http_check {
            parts.push(format!("http check {path}"));
        }
        if let Some(zone) = &self.zone {
            parts.push(format!("zone {} at {}", zone.zone, zone.nameservers.join(",")));
        }
        if let Some(port) = self.http_port {
            parts.push(format!("http port {port}"));
        }
        if self.tls_passthrough {
            parts.push("TLS passthrough".into());
        }
        if let Some(keep) = &self.keep {
            parts.push(format!("keeps {keep}"));
        }
        parts.join(", ")
    }
}

/// A dump command is an argv: at least the program, no NUL bytes (they cannot pass through exec),
/// bounded in size.
pub fn validate_dump(argv: &[String]) -> Result<(), Rejection> {
    match argv.first() {
        None => return Err(Rejection::new("the dump command is empty: give at least a program to run")),
        Some(program) if program.trim().is_empty() => {
            return Err(Rejection::new("the dump command's program (its first word) is empty"))
        }
        Some(_) => {}
    }
    if argv.len() > DUMP_ARGS_MAX {
        return Err(Rejection::new(format!(
            "the dump command has {} arguments; at most {DUMP_ARGS_MAX}",
            argv.len()
        )));
    }
    let bytes: usize = argv.iter().map(|a| a.len()).sum();
    if bytes > DUMP_BYTES_MAX {
        return Err(Rejection::new(format!(
            "the dump command is {bytes} bytes long; at most {DUMP_BYTES_MAX}"
        )));
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err(Rejection::new("the dump command contains a NUL byte"));
    }
    Ok(())
}

/// An HTTP check path: absolute, printable ASCII without spaces, bounded.
pub fn validate_http_path(path: &str) -> Result<(), Rejection> {
    if !path.starts_with('/') {
        return Err(Rejection::new(format!("the HTTP check path {path:?} must start with /")));
    }
    if path.len() > HTTP_CHECK_PATH_MAX {
        return Err(Rejection::new(format!(
            "the HTTP check path is longer than {HTTP_CHECK_PATH_MAX} bytes"
        )));
    }
    if !path.chars().all(|c| c.is_ascii_graphic()) {
        return Err(Rejection::new(format!(
            "the HTTP check path {path:?} may hold only printable ASCII characters, no spaces"
        )));
    }
    Ok(())
}

/// A zone check: a valid zone name and 1 to [`NAMESERVERS_MAX`] nameservers, `HOST` or `HOST:PORT`.
pub fn validate_zone(check: &ZoneCheck) -> Result<(), Rejection> {
    validate_domain(check.zone.trim_end_matches('.'))
        .map_err(|_| Rejection::new(format!("zone {:?} is not a valid DNS name", check.zone)))?;
    if check.nameservers.is_empty() {
        return Err(Rejection::new(format!("the zone check of {} names no nameserver", check.zone)));
    }
    if check.nameservers.len() > NAMESERVERS_MAX {
        return Err(Rejection::new(format!("at most {NAMESERVERS_MAX} nameservers per zone check")));
    }
    for ns in &check.nameservers {
        nameserver_addr(ns)?;
    }
    Ok(())
}

/// A nameserver as `(host, port)`: `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address.
pub fn nameserver_addr(ns: &str) -> Result<(String, u16), Rejection> {
    let bad = || Rejection::new(format!("nameserver {ns:?} is not HOST or HOST:PORT"));
    if ns.is_empty() || ns.len() > 255 || ns.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad());
    }
    if ns.parse::<std::net::IpAddr>().is_ok() {
        return Ok((ns.to_string(), 53));
    }
    if let Ok(addr) = ns.parse::<std::net::SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad());
        }
        return Ok((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = match ns.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
        None => (ns, 53),
    };
    if port == 0 || (host.parse::<std::net::IpAddr>().is_err() && validate_host(host).is_err()) {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

fn validate_host(host: &str) -> Result<(), Rejection> {
    if host.contains('.') {
        validate_domain(host)
    } else if !host.is_empty()
        && host.len() <= 63
        && !host.starts_with('-')
        && !host.ends_with('-')
        && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        Ok(())
    } else {
        Err(Rejection::new(format!("{host:?} is not a host name")))
    }
}

/// An argv as one line: arguments with spaces or quotes are single-quoted.
pub fn format_argv(argv: &[String]) -> String {
    let word = |a: &String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(word).collect::<Vec<_>>().join(" ")
}

/// Service names become container and volume names: lowercase letters, digits and dashes, starting
/// with a letter, at most 63 characters.
pub fn validate_name(name: &str) -> Result<(), Rejection> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(Rejection::new(format!(
            "service name {name:?} is invalid: use 1-63 lowercase letters, digits and dashes, starting with a letter"
        )))
    }
}

fn validate_domain(domain: &str) -> Result<(), Rejection> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let ok = domain.len() <= 253 && domain.contains('.') && domain.split('.').all(label_ok);
    if ok {
        Ok(())
    } else {
        Err(Rejection::new(format!("domain {domain:?} is not a valid host name")))
    }
}

/// Parses `256M`, `1G`, `512k`, `1048576` into bytes.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, ""),
    };
    let n: u64 = digits.parse().map_err(|_| format!("{text:?} is not a size (examples: 256M, 1G)"))?;
    let mult: u64 = match unit.to_ascii_lowercase().trim_end_matches(['b', 'i']) {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return Err(format!("{text:?} has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{text:?} is too large"))
}

pub fn format_bytes(n: u64) -> String {
    if n.is_multiple_of(1 << 30) {
        format!("{}G", n >> 30)
    } else if n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// A size as people read it: `0 B`, `512 B`, `1.5 KiB`, `3.2 MiB`, `1.1 GiB` (not meant to be
/// parsed back; [`format_bytes`] is exact).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Parses `HOST:CONTAINER` or a single `PORT` (same on both sides).
pub fn parse_port(text: &str) -> Result<PortMap, String> {
    let parse =
        |s: &str| s.parse::<u16>().map_err(|_| format!("{text:?} is not a port mapping (HOST:CONTAINER)"));
    match text.split_once(':') {
        Some((h, c)) => Ok(PortMap { host: parse(h)?, container: parse(c)? }),
        None => {
            let p = parse(text)?;
            Ok(PortMap { host: p, container: p })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("256M").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("512KiB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("12X").is_err());
        assert!(parse_bytes("").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
        assert_eq!(format_bytes(256 << 20), "256M");
    }

    #[test]
    fn ports_parse() {
        assert_eq!(parse_port("8080:80").unwrap(), PortMap { host: 8080, container: 80 });
        assert_eq!(parse_port("25").unwrap(), PortMap { host: 25, container: 25 });
        assert!(parse_port("x:1").is_err());
        assert!(parse_port("70000:1").is_err());
    }

    fn spec(dump: Option<Vec<String>>) -> ServiceSpec {
        ServiceSpec {
            name: "blog".into(),
            image: "img:1".into(),
            domains: vec!["blog.example.org".into()],
            ports: vec![PortMap { host: 8080, container: 80 }],
            memory_bytes: Some(256 << 20),
            on_demand: true,
            dump,
            http_check: None,
            zone: None,
            http_port: None,
            tls_passthrough: false,
            keep: None,
        }
    }

    #[test]
    fn a_retention_round_trips_without_changing_the_hash_or_old_bytes() {
        let plain = spec(None);
        let keep: Retention = "last=3, daily=2".parse().unwrap();
        assert_eq!(keep, Retention { last: 3, daily: 2, ..crate::data::RETENTION });
        assert_eq!(keep.to_string().parse::<Retention>().unwrap(), keep);
        let with = ServiceSpec { keep: Some(keep), dump: Some(vec!["true".into()]), ..spec(None) };
        assert!(with.validate().is_ok());
        let bytes = crate::encode(&with);
        assert_eq!(crate::decode::<ServiceSpec>(&bytes).unwrap(), with);
        let pair = (with.clone(), 7u64);
        assert_eq!(crate::decode::<(ServiceSpec, u64)>(&crate::encode(&pair)).unwrap(), pair);
        assert_eq!(with.hash(), plain.hash(), "the retention is not part of the container");
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["keep"]["last"], 3);
        assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), with);
        assert!(serde_json::to_value(&plain).unwrap().get("keep").is_none());
        assert!(with.describe().contains("keeps last=3,hourly=24,daily=2,weekly=4"));
        // A spec without one is encoded as before.
        assert_eq!(
            crate::encode(&plain)[..],
            crate::encode(&ServiceSpec { keep: None, ..plain.clone() })[..]
        );
        for bad in ["last=0", "last=401", "hourly=400", "monthly=3", "last", "last=x"] {
            assert!(bad.parse::<Retention>().is_err(), "{bad}");
        }
        let over =
            ServiceSpec { keep: Some(Retention { last: 0, hourly: 1, daily: 1, weekly: 1 }), ..spec(None) };
        assert!(over.validate().is_err());
    }

    #[test]
    fn web_options_round_trip_without_changing_the_hash_or_old_bytes() {
        let plain = spec(None);
        assert_eq!(plain.web_port(), HTTP_PORT_DEFAULT);
        for (http_port, tls_passthrough) in [(Some(8080), false), (None, true), (Some(3000), true)] {
            let with =
                ServiceSpec { http_port, tls_passthrough, dump: Some(vec!["true".into()]), ..spec(None) };
            assert!(with.validate().is_ok());
            let bytes = crate::encode(&with);
            assert_eq!(crate::decode::<ServiceSpec>(&bytes).unwrap(), with);
            let pair = (with.clone(), 7u64);
            assert_eq!(crate::decode::<(ServiceSpec, u64)>(&crate::encode(&pair)).unwrap(), pair);
            assert_eq!(
                with.hash(),
                plain.hash(),
                "where the proxy sends traffic is not part of the container"
            );
            let json = serde_json::to_value(&with).unwrap();
            assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), with);
            assert!(crate::decode::<SpecV1>(&bytes).is_err(), "an old reader refuses it");
        }
        assert_eq!(
            crate::encode(&plain),
            crate::encode(&v1(&plain)),
            "a spec without them is encoded as before"
        );
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("http_port").is_none() && json.get("tls_passthrough").is_none());
        assert!(ServiceSpec { http_port: Some(0), ..spec(None) }.validate().is_err());
        let bare = ServiceSpec { domains: vec![], tls_passthrough: true, ..spec(None) };
        assert!(bare.validate().unwrap_err().reason.contains("needs at least one domain"));
    }

    fn zone() -> ZoneCheck {
        ZoneCheck {
            zone: "example.org".into(),
            nameservers: vec!["192.0.2.1".into(), "ns1.example.org:5353".into()],
        }
    }

    #[test]
    fn health_checks_round_trip_without_changing_the_hash() {
        let dump = Some(vec!["true".to_string()]);
        for (dump, http_check, zone) in [
            (None, Some("/health".to_string()), None),
            (None, None, Some(zone())),
            (dump.clone(), Some("/".to_string()), Some(zone())),
            (dump, None, Some(zone())),
        ] {
            let with = ServiceSpec { http_check, zone, ..spec(dump.clone()) };
            assert!(with.validate().is_ok());
            let bytes = crate::encode(&with);
            assert_eq!(crate::decode::<ServiceSpec>(&bytes).unwrap(), with);
            let pair = (with.clone(), 7u64);
            assert_eq!(crate::decode::<(ServiceSpec, u64)>(&crate::encode(&pair)).unwrap(), pair);
            assert_eq!(with.hash(), spec(None).hash(), "checks are not part of the container");
            let json = serde_json::to_value(&with).unwrap();
            assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), with);
            assert!(crate::decode::<SpecV1>(&bytes).is_err(), "an old reader refuses it");
        }
        let without = serde_json::to_value(spec(None)).unwrap();
        assert!(without.get("http_check").is_none() && without.get("zone").is_none());
    }

    #[test]
    fn health_checks_are_checked() {
        let http = |p: &str| ServiceSpec { http_check: Some(p.into()), ..spec(None) }.validate();
        assert!(http("/healthz?full=1").is_ok());
        for (bad, why) in [("health", "start with /"), ("/a b", "printable"), ("/\u{e9}", "printable")] {
            let err = http(bad).unwrap_err();
            assert!(err.reason.contains(why), "{bad:?}: {err}");
        }
        assert!(http(&format!("/{}", "a".repeat(HTTP_CHECK_PATH_MAX))).is_err());
        let zoned = |zone: &str, ns: &[&str]| {
            let zone =
                ZoneCheck { zone: zone.into(), nameservers: ns.iter().map(|s| s.to_string()).collect() };
            ServiceSpec { zone: Some(zone), ..spec(None) }.validate()
        };
        assert!(
            zoned("example.org.", &["127.0.0.1:5353", "::1", "[::1]:53", "ns1.example.org", "ns"]).is_ok()
        );
        assert!(zoned("not a zone", &["127.0.0.1"]).unwrap_err().reason.contains("valid DNS name"));
        assert!(zoned("example.org", &[]).unwrap_err().reason.contains("no nameserver"));
        for bad in ["", "a b", "127.0.0.1:0", "127.0.0.1:99999", "host:port", "-bad-"] {
            assert!(zoned("example.org", &[bad]).is_err(), "{bad:?} accepted");
        }
        assert!(zoned("example.org", &["127.0.0.1"; NAMESERVERS_MAX + 1]).is_err());
        assert_eq!(nameserver_addr("ns1.example.org").unwrap(), ("ns1.example.org".into(), 53));
        assert_eq!(nameserver_addr("[::1]:5353").unwrap(), ("::1".into(), 5353));
    }

    /// The spec as it was before dump commands, with its derived encoding.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct SpecV1 {
        name: String,
        image: String,
        domains: Vec<String>,
        ports: Vec<PortMap>,
        memory_bytes: Option<u64>,
        on_demand: bool,
    }

    fn v1(s: &ServiceSpec) -> SpecV1 {
        SpecV1 {
            name: s.name.clone(),
            image: s.image.clone(),
            domains: s.domains.clone(),
            ports: s.ports.clone(),
            memory_bytes: s.memory_bytes,
            on_demand: s.on_demand,
        }
    }

    #[test]
    fn specs_without_a_dump_encode_as_before() {
        for on_demand in [false, true] {
            let new = ServiceSpec { on_demand, ..spec(None) };
            let old_bytes = crate::encode(&v1(&new));
            assert_eq!(crate::encode(&new), old_bytes, "same bytes as before");
            assert_eq!(crate::decode::<ServiceSpec>(&old_bytes).unwrap(), new, "old bytes still decode");
            assert_eq!(new.hash(), hex::encode(Sha256::digest(&old_bytes)), "same container label");
        }
    }

    #[test]
    fn a_dump_round_trips_and_does_not_change_the_hash() {
        let argv = vec!["sh".to_string(), "-c".into(), "pg_dumpall > /data/dump.sql".into()];
        let with = spec(Some(argv));
        let bytes = crate::encode(&with);
        assert_eq!(crate::decode::<ServiceSpec>(&bytes).unwrap(), with);
        assert_eq!(with.hash(), spec(None).hash());
        // Inside an event, followed by more fields: the decoder reads exactly the spec.
        let pair = (with.clone(), 7u64);
        assert_eq!(crate::decode::<(ServiceSpec, u64)>(&crate::encode(&pair)).unwrap(), pair);
        // An old reader refuses it (it reads the flags as a bool), rather than misreading it.
        assert!(crate::decode::<SpecV1>(&bytes).is_err());
        // Unknown flags are an error.
        let mut bad = crate::encode(&spec(None));
        *bad.last_mut().unwrap() = 0b1_0000;
        assert!(crate::decode::<ServiceSpec>(&bad).is_err());
    }

    #[test]
    fn json_names_the_dump_and_may_leave_it_out() {
        let with = spec(Some(vec!["true".into()]));
        let json = serde_json::to_value(&with).unwrap();
        assert_eq!(json["dump"], serde_json::json!(["true"]));
        assert_eq!(serde_json::from_value::<ServiceSpec>(json).unwrap(), with);
        let without = serde_json::to_value(spec(None)).unwrap();
        assert!(without.get("dump").is_none());
        // JSON from a client that knows nothing of dumps.
        let old = serde_json::to_value(v1(&spec(None))).unwrap();
        assert_eq!(serde_json::from_value::<ServiceSpec>(old).unwrap(), spec(None));
    }

    #[test]
    fn dump_commands_are_checked() {
        assert!(spec(Some(vec!["sh".into(), "-c".into(), "x".into()])).validate().is_ok());
        let bad: Vec<(Vec<String>, &str)> = vec![
            (vec![], "empty"),
            (vec![" ".into()], "program"),
            (vec!["a".into(); DUMP_ARGS_MAX + 1], "arguments"),
            (vec!["a".repeat(DUMP_BYTES_MAX + 1)], "bytes"),
            (vec!["a\0b".into()], "NUL"),
        ];
        for (argv, why) in bad {
            let err = spec(Some(argv.clone())).validate().unwrap_err();
            assert!(err.reason.contains(why), "{argv:?}: {err}");
        }
        assert_eq!(
            format_argv(&["sh".into(), "-c".into(), "echo 'hi' > /data/x".into()]),
            r"sh -c 'echo '\''hi'\'' > /data/x'"
        );
    }

    #[test]
    fn names_and_domains_are_checked() {
        assert!(validate_name("blog-1").is_ok());
        for bad in ["", "1blog", "Blog", "blog-", "a_b", &"a".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(validate_domain("example.org").is_ok());
        for bad in ["localhost", "a..b", "-a.b", "a b.c"] {
            assert!(validate_domain(bad).is_err(), "{bad:?} accepted");
        }
    }
}
