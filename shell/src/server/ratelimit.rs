//! Per-key rate limits as token buckets: requests per minute, and tokens per minute
//! (prompt plus generated, charged while a request runs). A request is admitted when the
//! request bucket holds a whole request and the token bucket is not in debt; the tokens it
//! then uses may drive the bucket below zero, which holds back the key's next requests
//! until the debt refills. Reported as OpenAI does (`x-ratelimit-*` headers, 429 with
//! Retry-After).

use super::keys::Key;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One bucket: `per_minute` units, refilled continuously.
#[derive(Debug, Clone)]
struct Bucket {
    per_minute: f64,
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(per_minute: u64, now: Instant) -> Bucket {
        Bucket { per_minute: per_minute as f64, level: per_minute as f64, at: now }
    }

    /// Refills up to capacity; follows a changed limit (the key file was edited).
    fn refill(&mut self, per_minute: u64, now: Instant) {
        let per_minute = per_minute as f64;
        if per_minute != self.per_minute {
            self.level = self.level.min(per_minute);
            self.per_minute = per_minute;
        }
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + secs * per_minute / 60.0).min(per_minute);
        self.at = now;
    }

    /// Time until the level reaches `target`.
    fn time_to(&self, target: f64) -> Duration {
        if self.level >= target || self.per_minute <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(((target - self.level) * 60.0 / self.per_minute).min(1e9))
    }

    fn quota(&self) -> Quota {
        Quota {
            limit: self.per_minute as u64,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.time_to(self.per_minute),
        }
    }
}

/// One dimension of a key's limit as the headers report it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// What a key may still do, for the response headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    pub requests: Option<Quota>,
    pub tokens: Option<Quota>,
}

impl Usage {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`; reset as a Go-style
    /// duration (`1s`, `6m0s`), as OpenAI sends it.
    pub fn headers(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (what, q) in [("requests", self.requests), ("tokens", self.tokens)] {
            if let Some(q) = q {
                out.push((format!("x-ratelimit-limit-{what}"), q.limit.to_string()));
                out.push((format!("x-ratelimit-remaining-{what}"), q.remaining.to_string()));
                out.push((format!("x-ratelimit-reset-{what}"), go_duration(q.reset)));
            }
        }
        out
    }
}

/// A refused request: which limit, and when to come back.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub message: String,
    pub retry_after: Duration,
    pub usage: Usage,
}

impl Limited {
    /// Whole seconds, rounded up, for the Retry-After header.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        d.as_secs() + u64::from(d.subsec_nanos() > 0)
    }
}

#[derive(Default)]
struct Buckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Every key's buckets.
#[derive(Default)]
pub struct Limiter {
    keys: Mutex<HashMap<String, Buckets>>,
}

fn sync(bucket: &mut Option<Bucket>, limit: Option<u64>, now: Instant) {
    match limit {
        None => *bucket = None,
        Some(n) => bucket.get_or_insert_with(|| Bucket::new(n, now)).refill(n, now),
    }
}

impl Limiter {
    /// Admits one request of `key`, taking one from its request bucket.
    pub fn admit(&self, key: &Key) -> Result<Usage, Limited> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &Key, now: Instant) -> Result<Usage, Limited> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let b = keys.entry(key.id.clone()).or_default();
        sync(&mut b.requests, key.rpm, now);
        sync(&mut b.tokens, key.tpm, now);
        let usage = |b: &Buckets| Usage {
            requests: b.requests.as_ref().map(Bucket::quota),
            tokens: b.tokens.as_ref().map(Bucket::quota),
        };
        if let Some(r) = b.requests.as_ref().filter(|r| r.level < 1.0) {
            let message = format!("rate limit exceeded: {} requests per minute", key.rpm.unwrap_or(0));
            return Err(Limited { message, retry_after: r.time_to(1.0), usage: usage(b) });
        }
        if let Some(t) = b.tokens.as_ref().filter(|t| t.level <= 0.0) {
            let message = format!("rate limit exceeded: {} tokens per minute", key.tpm.unwrap_or(0));
            // Strictly above zero, so a request admitted after the wait is admitted.
            let retry_after = t.time_to(0.0) + Duration::from_millis(1);
            return Err(Limited { message, retry_after, usage: usage(b) });
        }
        if let Some(r) = b.requests.as_mut() {
            r.level -= 1.0;
        }
        Ok(usage(b))
    }

    /// Charges `tokens` used by a request of key `id`.
    pub fn charge(&self, id: &str, tokens: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = keys.get_mut(id).and_then(|b| b.tokens.as_mut()) {
            t.level -= tokens as f64;
        }
    }
}

/// Go's `time.Duration.String` at whole-millisecond precision: `0s`, `250ms`, `1.5s`, `6m0s`, `1h2m3s`.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m, s, frac) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    let secs = if frac == 0 { format!("{s}s") } else { format!("{s}.{}s", format!("{frac:03}").trim_end_matches('0')) };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rpm: Option<u64>, tpm: Option<u64>) -> Key {
        Key::for_tests("k1", rpm, tpm)
    }

    #[test]
    fn requests_per_minute() {
        let l = Limiter::default();
        let k = key(Some(2), None);
        let t0 = Instant::now();
        assert_eq!(l.admit_at(&k, t0).unwrap().requests.unwrap().remaining, 1);
        assert_eq!(l.admit_at(&k, t0).unwrap().requests.unwrap().remaining, 0);
        let refused = l.admit_at(&k, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs(), 30);
        assert!(refused.message.contains("2 requests per minute"));
        assert!(l.admit_at(&k, t0 + Duration::from_secs(30)).is_ok());
        assert!(l.admit_at(&k, t0 + Duration::from_secs(31)).is_err());
    }

    #[test]
    fn tokens_per_minute_charged_as_used() {
        let l = Limiter::default();
        let k = key(None, Some(600));
        let t0 = Instant::now();
        let u = l.admit_at(&k, t0).unwrap();
        assert_eq!(u.tokens.unwrap(), Quota { limit: 600, remaining: 600, reset: Duration::ZERO });
        assert!(u.requests.is_none());
        l.charge("k1", 700);
        let refused = l.admit_at(&k, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs(), 11, "100 tokens of debt at 10 per second");
        assert_eq!(refused.usage.tokens.unwrap().remaining, 0);
        let later = l.admit_at(&k, t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(later.tokens.unwrap().remaining, 100);
    }

    #[test]
    fn headers_and_durations() {
        let u =
            Usage { requests: Some(Quota { limit: 60, remaining: 59, reset: Duration::from_secs(1) }), tokens: None };
        assert_eq!(
            u.headers(),
            vec![
                ("x-ratelimit-limit-requests".to_string(), "60".to_string()),
                ("x-ratelimit-remaining-requests".to_string(), "59".to_string()),
                ("x-ratelimit-reset-requests".to_string(), "1s".to_string()),
            ]
        );
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(go_duration(Duration::from_secs(3723)), "1h2m3s");
    }
}
