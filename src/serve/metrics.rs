//! Counters for `GET /metrics`, written in the Prometheus text format (version 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::decode::Done;

/// The server's counters. Cheap to update from any thread.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests answered, by (endpoint, status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    /// Decode steps and their total time, in microseconds.
    decode_steps: AtomicU64,
    decode_micros: AtomicU64,
    /// Times to the first token (queue wait + prefill), in microseconds.
    first_token_count: AtomicU64,
    first_token_micros: AtomicU64,
    /// Requests turned away with 429 / ended by a client that went away.
    rejected: AtomicU64,
    cancelled: AtomicU64,
}

/// Gauges read at scrape time.
#[derive(Debug, Clone, Copy)]
pub struct Gauges {
    pub queued: usize,
    pub active: usize,
    pub parallel: usize,
    pub queue_capacity: usize,
    /// Batched decode passes run, and the requests' steps they held (their ratio is the mean
    /// batch).
    pub decode_batches: usize,
    pub batched_steps: usize,
    /// The prompt cache: prompts found there and not, entries and bytes held.
    pub prompt_cache: crate::runtime::PromptCacheStats,
}

impl Metrics {
    /// Count one answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_string(), status)).or_default() += 1;
        }
    }

    /// Count a finished generation.
    pub fn generation(&self, prompt: usize, done: &Done) {
        self.prompt_tokens
            .fetch_add(prompt as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(done.completion_tokens as u64, Ordering::Relaxed);
        self.decode_steps
            .fetch_add(done.decode_steps as u64, Ordering::Relaxed);
        self.decode_micros
            .fetch_add((done.decode_secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Count the time from a request's arrival to its first token.
    pub fn first_token(&self, secs: f64) {
        self.first_token_count.fetch_add(1, Ordering::Relaxed);
        self.first_token_micros
            .fetch_add((secs * 1e6) as u64, Ordering::Relaxed);
    }

    /// Count a request turned away because the queue was full.
    pub fn rejected(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a generation stopped because its client went away.
    pub fn cancelled(&self) {
        self.cancelled.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self, g: Gauges) -> String {
        let mut s = String::new();
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let _ = writeln!(
            s,
            "# HELP stancemix_requests_total HTTP requests answered, by endpoint and status."
        );
        let _ = writeln!(s, "# TYPE stancemix_requests_total counter");
        if let Ok(m) = self.requests.lock() {
            for ((e, st), n) in m.iter() {
                let _ = writeln!(
                    s,
                    "stancemix_requests_total{{endpoint=\"{}\",status=\"{st}\"}} {n}",
                    e.replace('\\', "\\\\").replace('"', "\\\"")
                );
            }
        }
        let mut counter = |name: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {v}");
        };
        counter(
            "stancemix_prompt_tokens_total",
            "Prompt tokens read.",
            get(&self.prompt_tokens) as f64,
        );
        counter(
            "stancemix_generated_tokens_total",
            "Tokens generated.",
            get(&self.completion_tokens) as f64,
        );
        counter(
            "stancemix_rejected_total",
            "Requests turned away with 429 (queue full).",
            get(&self.rejected) as f64,
        );
        counter(
            "stancemix_cancelled_total",
            "Generations stopped because the client went away.",
            get(&self.cancelled) as f64,
        );
        let mut summary = |name: &str, help: &str, count: u64, micros: u64| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} summary");
            let _ = writeln!(s, "{name}_sum {}", micros as f64 / 1e6);
            let _ = writeln!(s, "{name}_count {count}");
        };
        summary(
            "stancemix_time_per_token_seconds",
            "Time of one decode step (one generated token after the first).",
            get(&self.decode_steps),
            get(&self.decode_micros),
        );
        summary(
            "stancemix_time_to_first_token_seconds",
            "Time from a request's arrival to its first token (queue wait and prompt).",
            get(&self.first_token_count),
            get(&self.first_token_micros),
        );
        let mut gauge = |name: &str, help: &str, v: usize| {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} gauge");
            let _ = writeln!(s, "{name} {v}");
        };
        gauge(
            "stancemix_queue_depth",
            "Requests waiting for a decoding slot.",
            g.queued,
        );
        gauge(
            "stancemix_active_requests",
            "Requests being decoded.",
            g.active,
        );
        gauge(
            "stancemix_parallel_slots",
            "Decoding slots (--parallel).",
            g.parallel,
        );
        gauge(
            "stancemix_queue_capacity",
            "Places in the queue (--queue).",
            g.queue_capacity,
        );
        gauge(
            "stancemix_prompt_cache_entries",
            "Whole prompts kept with their KV caches (--prompt-cache-mib).",
            g.prompt_cache.entries,
        );
        gauge(
            "stancemix_prompt_cache_bytes",
            "Bytes those prompts' caches hold.",
            g.prompt_cache.bytes,
        );
        for (name, help, v) in [
            (
                "stancemix_decode_batches_total",
                "Batched decode passes run (one forward pass for the steps of every decoding request).",
                g.decode_batches,
            ),
            (
                "stancemix_batched_steps_total",
                "Requests' decode steps run in those passes (divided by the passes: the mean batch).",
                g.batched_steps,
            ),
            (
                "stancemix_prompt_cache_hits_total",
                "Prompts found in the prompt cache (not computed again).",
                g.prompt_cache.hits as usize,
            ),
            (
                "stancemix_prompt_cache_misses_total",
                "Prompts computed (and offered to the prompt cache).",
                g.prompt_cache.misses as usize,
            ),
        ] {
            let _ = writeln!(s, "# HELP {name} {help}");
            let _ = writeln!(s, "# TYPE {name} counter");
            let _ = writeln!(s, "{name} {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::super::decode::Finish;
    use super::*;

    #[test]
    fn renders_prometheus_text_with_every_family_typed() {
        let m = Metrics::default();
        m.request("/v1/chat/completions", 200);
        m.request("/v1/chat/completions", 200);
        m.request("/v1/models", 401);
        let done = Done {
            finish: Finish::Length,
            completion_tokens: 5,
            decode_steps: 4,
            decode_secs: 0.2,
        };
        m.generation(10, &done);
        let text = m.render(Gauges {
            queued: 1,
            active: 2,
            parallel: 2,
            queue_capacity: 8,
            decode_batches: 3,
            batched_steps: 5,
            prompt_cache: crate::runtime::PromptCacheStats {
                entries: 2,
                bytes: 100,
                hits: 7,
                misses: 3,
            },
        });
        assert!(text.contains(
            "stancemix_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"} 2"
        ));
        assert!(text.contains("stancemix_generated_tokens_total 5"));
        assert!(text.contains("stancemix_time_per_token_seconds_count 4"));
        assert!(text.contains("stancemix_queue_depth 1"));
        assert!(text.contains("stancemix_prompt_cache_hits_total 7"));
        assert!(text.contains("stancemix_batched_steps_total 5"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name.trim_end_matches("_sum").trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{name} has no TYPE line"
            );
        }
    }
}
