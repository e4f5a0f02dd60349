//! Traffic counts per domain, kept in memory on each node (never in the log): requests by status
//! class, bytes each way, a latency histogram, open connections and TLS handshakes. Read by
//! `coyote stats` and the Prometheus text of `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram's buckets, in milliseconds (the last bucket is unbounded).
pub const LATENCY_BUCKETS_MS: [u64; 10] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000];

/// Domains counted at most; requests for more are counted under [`OTHER`].
pub const DOMAINS_MAX: usize = 4096;
/// Where requests for unknown names, and for names past [`DOMAINS_MAX`], are counted.
pub const OTHER: &str = "(other)";

#[derive(Default)]
pub struct Stats {
    open: AtomicU64,
    connections: AtomicU64,
    handshakes: AtomicU64,
    handshake_failures: AtomicU64,
    domains: Mutex<BTreeMap<String, Counts>>,
}

/// One domain's counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests answered with 1xx, 2xx, 3xx, 4xx, 5xx.
    pub by_class: [u64; 5],
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Requests by latency bucket (see [`LATENCY_BUCKETS_MS`]), the last for slower ones.
    pub latency: [u64; LATENCY_BUCKETS_MS.len() + 1],
    pub latency_sum_ms: u64,
}

impl Stats {
    pub fn connection_opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn handshake(&self, ok: bool) {
        let counter = if ok { &self.handshakes } else { &self.handshake_failures };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answered request for `domain` (`None`: a name no service has).
    pub fn request(&self, domain: Option<&str>, status: u16, bytes_in: u64, bytes_out: u64, took: Duration) {
        let mut domains = self.domains.lock().expect("stats lock");
        let key = match domain {
            Some(d) if domains.contains_key(d) || domains.len() < DOMAINS_MAX => d,
            _ => OTHER,
        };
        let counts = match domains.get_mut(key) {
            Some(c) => c,
            None => domains.entry(key.to_string()).or_default(),
        };
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        counts.by_class[class] += 1;
        counts.bytes_in += bytes_in;
        counts.bytes_out += bytes_out;
        let ms = took.as_millis() as u64;
        let bucket = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BUCKETS_MS.len());
        counts.latency[bucket] += 1;
        counts.latency_sum_ms += ms;
    }

    /// Adds `n` bytes sent to a client to `domain`'s count.
    pub fn bytes_out(&self, domain: &str, n: u64) {
        if let Some(counts) = self.domains.lock().expect("stats lock").get_mut(domain) {
            counts.bytes_out += n;
        }
    }

    /// Open connections now, connections ever, TLS handshakes done and failed.
    pub fn connections(&self) -> (u64, u64, u64, u64) {
        (
            self.open.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
            self.handshakes.load(Ordering::Relaxed),
            self.handshake_failures.load(Ordering::Relaxed),
        )
    }

    pub fn domains(&self) -> BTreeMap<String, Counts> {
        self.domains.lock().expect("stats lock").clone()
    }

    /// The Prometheus text of these counts.
    pub fn prometheus(&self) -> String {
        let mut out = String::new();
        let (open, total, handshakes, failures) = self.connections();
        let _ = writeln!(out, "# TYPE coyote_proxy_open_connections gauge");
        let _ = writeln!(out, "coyote_proxy_open_connections {open}");
        let _ = writeln!(out, "# TYPE coyote_proxy_connections_total counter");
        let _ = writeln!(out, "coyote_proxy_connections_total {total}");
        let _ = writeln!(out, "# TYPE coyote_proxy_tls_handshakes_total counter");
        let _ = writeln!(out, "coyote_proxy_tls_handshakes_total{{result=\"ok\"}} {handshakes}");
        let _ = writeln!(out, "coyote_proxy_tls_handshakes_total{{result=\"failed\"}} {failures}");
        let domains = self.domains();
        let _ = writeln!(out, "# TYPE coyote_proxy_requests_total counter");
        for (domain, c) in &domains {
            for (i, n) in c.by_class.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "coyote_proxy_requests_total{{domain=\"{domain}\",class=\"{}xx\"}} {n}",
                    i + 1
                );
            }
        }
        let _ = writeln!(out, "# TYPE coyote_proxy_bytes_total counter");
        for (domain, c) in &domains {
            let _ = writeln!(
                out,
                "coyote_proxy_bytes_total{{domain=\"{domain}\",direction=\"in\"}} {}",
                c.bytes_in
            );
            let _ = writeln!(
                out,
                "coyote_proxy_bytes_total{{domain=\"{domain}\",direction=\"out\"}} {}",
                c.bytes_out
            );
        }
        let _ = writeln!(out, "# TYPE coyote_proxy_request_duration_seconds histogram");
        for (domain, c) in &domains {
            let mut cumulative = 0;
            for (i, n) in c.latency.iter().enumerate() {
                cumulative += n;
                let le = match LATENCY_BUCKETS_MS.get(i) {
                    Some(ms) => format!("{}", *ms as f64 / 1000.0),
                    None => "+Inf".to_string(),
                };
                let _ = writeln!(
                    out,
                    "coyote_proxy_request_duration_seconds_bucket{{domain=\"{domain}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "coyote_proxy_request_duration_seconds_sum{{domain=\"{domain}\"}} {}",
                c.latency_sum_ms as f64 / 1000.0
            );
            let _ = writeln!(
                out,
                "coyote_proxy_request_duration_seconds_count{{domain=\"{domain}\"}} {cumulative}"
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_class_and_latency() {
        let stats = Stats::default();
        stats.request(Some("a.example"), 200, 10, 100, Duration::from_millis(3));
        stats.request(Some("a.example"), 502, 10, 50, Duration::from_millis(7000));
        stats.request(None, 404, 1, 2, Duration::from_millis(0));
        let domains = stats.domains();
        let a = &domains["a.example"];
        assert_eq!(a.by_class, [0, 1, 0, 0, 1]);
        assert_eq!((a.bytes_in, a.bytes_out), (20, 150));
        assert_eq!(a.latency[1], 1, "3 ms is in the 5 ms bucket");
        assert_eq!(a.latency[LATENCY_BUCKETS_MS.len()], 1, "7 s is past the last bound");
        assert_eq!(domains[OTHER].by_class[3], 1);
        let text = stats.prometheus();
        assert!(text.contains("coyote_proxy_requests_total{domain=\"a.example\",class=\"5xx\"} 1"), "{text}");
        assert!(
            text.contains("coyote_proxy_request_duration_seconds_count{domain=\"a.example\"} 2"),
            "{text}"
        );
    }
}
