//! A small HTTP/1.1 client with a cookie, for the CRM's tests: one request per connection, so
//! what a test sees is exactly what the server answered.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A visitor of one site: its address and the session cookie the site gave.
pub struct Web {
    pub addr: String,
    pub cookie: Option<String>,
}

/// One answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The value of the first `<input name="NAME" value="...">` in the page.
    pub fn input(&self, name: &str) -> Option<String> {
        let at = self.body.find(&format!("name=\"{name}\" value=\""))?;
        let rest = &self.body[at + name.len() + 15..];
        Some(rest[..rest.find('"')?].to_string())
    }
}

/// `application/x-www-form-urlencoded` of `fields`.
pub fn form(fields: &[(&str, &str)]) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    fields.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

impl Web {
    pub fn new(addr: &str) -> Web {
        Web { addr: addr.to_string(), cookie: None }
    }

    pub fn get(&mut self, path: &str) -> Result<Reply> {
        self.request("GET", path, &[], None)
    }

    /// Posts `fields` as a form, from this site's own origin.
    pub fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Result<Reply> {
        let origin = format!("http://{}", self.addr);
        self.post_from(path, fields, Some(&origin))
    }

    /// Posts `fields` as a form with the `Origin` given (none: no `Origin` header).
    pub fn post_from(&mut self, path: &str, fields: &[(&str, &str)], origin: Option<&str>) -> Result<Reply> {
        let mut headers = vec![("Content-Type", "application/x-www-form-urlencoded".to_string())];
        if let Some(o) = origin {
            headers.push(("Origin", o.to_string()));
        }
        self.request("POST", path, &headers, Some(form(fields).as_bytes()))
    }

    /// One request; keeps the session cookie the answer sets.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> Result<Reply> {
        let mut s = TcpStream::connect(&self.addr).with_context(|| format!("connecting to {}", self.addr))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", self.addr);
        if let Some(c) = &self.cookie {
            head.push_str(&format!("Cookie: {c}\r\n"));
        }
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body = body.unwrap_or_default();
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        s.write_all(head.as_bytes())?;
        s.write_all(body)?;
        let raw = read_answer(&mut s).with_context(|| format!("reading the answer to {method} {path}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            bail!("no complete answer to {method} {path}: {text:?}");
        };
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .with_context(|| format!("no status line in {head:?}"))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let reply = Reply { status, headers, body: body.to_string() };
        if let Some(set) = reply.header("set-cookie") {
            if let Some(pair) = set.split(';').next() {
                self.cookie = Some(pair.to_string());
            }
        }
        Ok(reply)
    }

    /// Opens `path` as a server-sent event stream; `last_id` resumes after that event.
    pub fn stream(&self, path: &str, last_id: Option<u64>) -> Result<EventStream> {
        let mut s = TcpStream::connect(&self.addr)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut head = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n", self.addr);
        if let Some(c) = &self.cookie {
            head.push_str(&format!("Cookie: {c}\r\n"));
        }
        if let Some(id) = last_id {
            head.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes())?;
        let mut reader = BufReader::new(s);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        if !status.contains(" 200 ") {
            bail!("the stream answered {status:?}");
        }
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Ok(EventStream { reader })
    }
}

/// An answer's bytes: up to the end of its `Content-Length` body, or to the end of the connection
/// when it has none (some servers keep the connection open despite `Connection: close`).
fn read_answer(s: &mut TcpStream) -> Result<Vec<u8>> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 << 10];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok());
            if let Some(length) = length {
                while raw.len() < end + 4 + length {
                    let n = s.read(&mut buf)?;
                    if n == 0 {
                        bail!("the connection closed inside the body");
                    }
                    raw.extend_from_slice(&buf[..n]);
                }
                return Ok(raw);
            }
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A server-sent event stream (chunked HTTP/1.1), read event by event.
pub struct EventStream {
    reader: BufReader<TcpStream>,
}

/// One server-sent event.
#[derive(Debug)]
pub struct StreamEvent {
    pub id: Option<u64>,
    pub data: String,
}

impl EventStream {
    /// The next event with data (keep-alive comments are skipped).
    pub fn next_event(&mut self) -> Result<StreamEvent> {
        let (mut id, mut data) = (None, String::new());
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("the stream ended");
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            } else if line.is_empty() && !data.is_empty() {
                return Ok(StreamEvent { id, data });
            }
            // Chunk sizes of the chunked encoding, `event:` lines and comments are skipped.
        }
    }
}
