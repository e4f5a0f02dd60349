//! How the monitor checks a service at its master: a TCP connection or an HTTP request to the
//! service's first published port, and an SOA query to the nameservers of its DNS zone.
//!
//! The wire formats are written here as plain functions over bytes and streams, so that the
//! simulator runs the same checks over its own network ([`ServiceProbe`] is the seam).

use std::future::Future;
use std::time::Duration;

use coyote_state_machine::spec::nameserver_addr;
use coyote_state_machine::ZoneCheck;
use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// What the monitor asks of a service at its master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A TCP connection to `addr` is accepted.
    Tcp { addr: String },
    /// `GET path` on `addr` (with `Host: host`) is answered with a status below 500.
    Http { addr: String, host: String, path: String },
}

impl Check {
    pub fn addr(&self) -> &str {
        match self {
            Check::Tcp { addr } | Check::Http { addr, .. } => addr,
        }
    }
}

/// How the monitor reaches services and zones: [`NetProbe`] in production (the kernel's network),
/// the simulator's network in `sim/`.
pub trait ServiceProbe: Send + Sync {
    /// True if the check passed within `timeout`.
    fn probe(&self, check: Check, timeout: Duration) -> BoxFuture<'static, bool>;
    /// True if any of the zone's nameservers answered an SOA query for it within `timeout`.
    fn zone(&self, zone: ZoneCheck, timeout: Duration) -> BoxFuture<'static, bool>;
}

/// The production probe: tokio's TCP and UDP sockets.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetProbe;

impl ServiceProbe for NetProbe {
    fn probe(&self, check: Check, timeout: Duration) -> BoxFuture<'static, bool> {
        Box::pin(async move {
            let addr = check.addr().to_string();
            let connect = async move {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                let _ = stream.set_nodelay(true);
                Ok(stream)
            };
            check_over(&check, timeout, connect).await
        })
    }

    fn zone(&self, zone: ZoneCheck, timeout: Duration) -> BoxFuture<'static, bool> {
        Box::pin(async move {
            any_nameserver(&zone, timeout, |name, ns, i| async move {
                soa_over_udp(&ns, &name, query_id(i)).await
            })
            .await
        })
    }
}

/// Runs `check` over the stream that `connect` opens, all within `timeout`: for TCP the connection
/// is the answer, for HTTP [`http_check`] over it. Each [`ServiceProbe`] supplies only its sockets.
pub async fn check_over<S, C>(check: &Check, timeout: Duration, connect: C) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
    C: Future<Output = std::io::Result<S>>,
{
    let run = async {
        let stream = connect.await.ok()?;
        match check {
            Check::Tcp { .. } => Some(true),
            Check::Http { host, path, .. } => Some(http_check(stream, host, path).await),
        }
    };
    matches!(tokio::time::timeout(timeout, run).await, Ok(Some(true)))
}

/// Asks every nameserver of `zone` in parallel, each within `timeout`: true as soon as one answered
/// (the others are not waited for: a nameserver that is down must not hold up the monitor's round of
/// probes for the whole timeout), false once all failed.
/// `ask(zone name, nameserver, position)` sends one SOA query and tells whether it was answered.
pub async fn any_nameserver<A, F>(zone: &ZoneCheck, timeout: Duration, ask: A) -> bool
where
    A: Fn(String, String, usize) -> F,
    F: Future<Output = bool>,
{
    let mut asks: futures::stream::FuturesUnordered<_> = zone
        .nameservers
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let run = ask(zone.zone.clone(), ns.clone(), i);
            async move { matches!(tokio::time::timeout(timeout, run).await, Ok(true)) }
        })
        .collect();
    while let Some(answered) = futures::StreamExt::next(&mut asks).await {
        if answered {
            return true;
        }
    }
    false
}

/// A query id that differs between queries (not a secret: the answer is also matched by question).
fn query_id(salt: usize) -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (nanos as u16) ^ (salt as u16).wrapping_mul(0x9e37)
}

async fn soa_over_udp(nameserver: &str, zone: &str, id: u16) -> bool {
    let Ok((host, port)) = nameserver_addr(nameserver) else { return false };
    let Ok(mut addrs) = tokio::net::lookup_host((host.as_str(), port)).await else { return false };
    let Some(addr) = addrs.next() else { return false };
    let bind = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else { return false };
    if socket.connect(addr).await.is_err() {
        return false;
    }
    let Some(query) = soa_query(id, zone) else { return false };
    if socket.send(&query).await.is_err() {
        return false;
    }
    let mut buf = vec![0u8; 4096];
    // Datagrams that are not the answer (late answers to an earlier query) are skipped.
    loop {
        match socket.recv(&mut buf).await {
            Ok(n) if soa_answered(id, zone, &buf[..n]) => return true,
            Ok(n) if answers_query(id, &buf[..n]) => return false,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Sends `GET path` over `stream` and reads the status line: healthy below 500.
pub async fn http_check<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, host: &str, path: &str) -> bool {
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: coyote-monitor\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    http_status(&head).is_some_and(|status| status < 500)
}

/// The status code of an HTTP/1.x status line at the start of `head`.
pub fn http_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut words = line.split(' ');
    let version = words.next()?;
    if !version.starts_with("HTTP/1.") {
        return None;
    }
    let code = words.next()?;
    if code.len() != 3 {
        return None;
    }
    code.parse().ok().filter(|c| (100..600).contains(c))
}

const TYPE_SOA: u16 = 6;
const CLASS_IN: u16 = 1;

/// An SOA query for `zone` (no recursion asked: the nameservers serve the zone themselves). None if
/// the name cannot be encoded.
pub fn soa_query(id: u16, zone: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(32 + zone.len());
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0, 0]); // a standard query, no flags
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // one question
    q.extend_from_slice(&encode_name(zone)?);
    q.extend_from_slice(&TYPE_SOA.to_be_bytes());
    q.extend_from_slice(&CLASS_IN.to_be_bytes());
    Some(q)
}

fn encode_name(name: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
    (out.len() <= 255).then_some(out)
}

/// Whether `msg` is an answer to query `id` at all (whatever it says).
fn answers_query(id: u16, msg: &[u8]) -> bool {
    msg.len() >= 12 && msg[0..2] == id.to_be_bytes() && msg[2] & 0x80 != 0
}

/// Whether `msg` answers the SOA query `id` for `zone` with no error and an SOA record for the zone.
pub fn soa_answered(id: u16, zone: &str, msg: &[u8]) -> bool {
    let Some(name) = encode_name(zone) else { return false };
    if !answers_query(id, msg) || msg[3] & 0x0f != 0 {
        return false; // not our answer, or an error (NXDOMAIN, SERVFAIL, REFUSED, ...)
    }
    let count = |at: usize| u16::from_be_bytes([msg[at], msg[at + 1]]);
    let (questions, answers) = (count(4), count(6));
    if questions != 1 || answers == 0 {
        return false;
    }
    // The question must be ours.
    let qname_end = 12 + name.len();
    if msg.len() < qname_end + 4 || !msg[12..qname_end].eq_ignore_ascii_case(&name) {
        return false;
    }
    if msg[qname_end..qname_end + 4] != [0, TYPE_SOA as u8, 0, CLASS_IN as u8] {
        return false;
    }
    // Some answer record must be an SOA of class IN.
    let mut at = qname_end + 4;
    for _ in 0..answers {
        let Some(after_name) = skip_name(msg, at) else { return false };
        if msg.len() < after_name + 10 {
            return false;
        }
        let rtype = u16::from_be_bytes([msg[after_name], msg[after_name + 1]]);
        let class = u16::from_be_bytes([msg[after_name + 2], msg[after_name + 3]]);
        let rdlen = u16::from_be_bytes([msg[after_name + 8], msg[after_name + 9]]) as usize;
        if msg.len() < after_name + 10 + rdlen {
            return false;
        }
        if rtype == TYPE_SOA && class == CLASS_IN {
            return true;
        }
        at = after_name + 10 + rdlen;
    }
    false
}

/// The offset just past a (possibly compressed) name starting at `at`.
fn skip_name(msg: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *msg.get(at)?;
        match len {
            0 => return Some(at + 1),
            l if l & 0xc0 == 0xc0 => {
                msg.get(at + 1)?;
                return Some(at + 2);
            }
            l if l & 0xc0 == 0 => at += 1 + l as usize,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(http_status(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(http_status(b"HTTP/1.0 503 Service Unavailable\r\nX: y"), Some(503));
        assert_eq!(http_status(b"HTTP/1.1 404\r\n"), Some(404));
        for bad in
            [&b""[..], b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 20 OK\r\n", b"HTTP/1.1 999 x\r\n", b"\xff\xfe"]
        {
            assert_eq!(http_status(bad), None, "{bad:?}");
        }
    }

    /// An answer as a nameserver would write it: the question, then one record whose name is a
    /// pointer to the question's name.
    fn answer(id: u16, zone: &str, rcode: u8, rtype: u16) -> Vec<u8> {
        let mut m = soa_query(id, zone).unwrap();
        m[2] = 0x84; // an authoritative answer
        m[3] = rcode;
        m[7] = 1; // one answer
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&rtype.to_be_bytes());
        m.extend_from_slice(&CLASS_IN.to_be_bytes());
        m.extend_from_slice(&[0, 0, 0, 60, 0, 4, 1, 2, 3, 4]);
        m
    }

    #[test]
    fn soa_answers_are_recognised() {
        assert!(soa_answered(7, "example.org", &answer(7, "example.org", 0, TYPE_SOA)));
        assert!(soa_answered(7, "Example.ORG.", &answer(7, "example.org", 0, TYPE_SOA)));
        assert!(!soa_answered(8, "example.org", &answer(7, "example.org", 0, TYPE_SOA)), "another id");
        assert!(!soa_answered(7, "example.net", &answer(7, "example.org", 0, TYPE_SOA)), "another zone");
        assert!(!soa_answered(7, "example.org", &answer(7, "example.org", 3, TYPE_SOA)), "NXDOMAIN");
        assert!(!soa_answered(7, "example.org", &answer(7, "example.org", 0, 1)), "an A record");
        let query = soa_query(7, "example.org").unwrap();
        assert!(!soa_answered(7, "example.org", &query), "the query itself");
        // Truncated or garbage answers are refused, never a panic.
        let good = answer(7, "example.org", 0, TYPE_SOA);
        for n in 0..good.len() {
            assert!(!soa_answered(7, "example.org", &good[..n]));
        }
        assert!(soa_query(1, "a..b").is_none());
        assert!(soa_query(1, &format!("{}.org", "a".repeat(64))).is_none());
    }
}
