//! What a hosted service is: its image, names, ports and limits.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::Rejection;

/// Smallest memory limit accepted: Docker refuses limits under 6 MiB.
pub const MEMORY_MIN_BYTES: u64 = 6 * 1024 * 1024;
/// Bounds on the lists a spec carries.
pub const DOMAINS_MAX: usize = 32;
pub const PORTS_MAX: usize = 32;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortMap {
    pub host: u16,
    pub container: u16,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub image: String,
    pub domains: Vec<String>,
    pub ports: Vec<PortMap>,
    pub memory_bytes: Option<u64>,
    /// Stopped until a connection arrives on one of its ports.
    pub on_demand: bool,
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
        Ok(())
    }

    /// Hex SHA-256 of the encoded spec: containers are labelled with it to detect drift.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(crate::encode(self)))
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
        parts.join(", ")
    }
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
        _ => return Err(format!("{text:?} has an unknown unit (use K, M or G)")),
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
