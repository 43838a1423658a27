//! Validation: the constraints on values that the types alone cannot
//! express (minimums, addresses, URLs, settings that must agree with each
//! other). It runs on the finished [`Config`], after every source is
//! applied, and reports the first broken rule.

use std::fmt;
use std::net::SocketAddr;

use super::{Config, ConfigError};

impl Config {
    /// Checks constraints that the types alone cannot express. Errors carry
    /// no origin; [`Config::load`] fills it in.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Err(err) = self.server.bind.parse::<SocketAddr>() {
            return Err(invalid(
                "server.bind",
                format!(
                    "{:?} is not a socket address (ip:port): {err}",
                    self.server.bind
                ),
            ));
        }
        at_least(
            "server.connection_stack_kib",
            self.server.connection_stack_kib,
            32,
        )?;
        at_least("server.outbox_frames", self.server.outbox_frames, 16)?;
        at_least("server.pong_timeout_ms", self.server.pong_timeout_ms, 1)?;
        for host in &self.server.allowed_hosts {
            if host != "*" && crate::authority::Authority::parse(host).is_none() {
                return Err(invalid(
                    "server.allowed_hosts",
                    format!("{host:?} is not a host or host:port (or \"*\")"),
                ));
            }
        }
        at_least("server.outbox_bytes", self.server.outbox_bytes, 64 << 10)?;
        at_least(
            "server.http_max_body_bytes",
            self.server.http_max_body_bytes,
            1 << 10,
        )?;
        at_least(
            "history.max_answer_bytes",
            self.history.max_answer_bytes,
            4 << 10,
        )?;
        if self.history.max_answer_bytes > self.server.outbox_bytes / 2 {
            return Err(invalid(
                "history.max_answer_bytes",
                format!(
                    "{} is more than half of server.outbox_bytes ({}): a history answer must fit a connection's outbox",
                    self.history.max_answer_bytes, self.server.outbox_bytes
                ),
            ));
        }
        if self.llm.simulated.token_bytes > 1 << 20 {
            return Err(invalid(
                "llm.simulated.token_bytes",
                format!(
                    "{} is above the maximum of 1048576",
                    self.llm.simulated.token_bytes
                ),
            ));
        }
        let l = &self.llm;
        at_least("llm.connect_timeout_ms", l.connect_timeout_ms, 1)?;
        at_least("llm.read_timeout_ms", l.read_timeout_ms, 1)?;
        at_least("llm.retry_max_ms", l.retry_max_ms, l.retry_base_ms)?;
        for (i, p) in l.providers.iter().enumerate() {
            let base_url = if p.base_url.is_empty() {
                &l.base_url
            } else {
                &p.base_url
            };
            if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
                return Err(invalid(
                    &format!("llm.providers[{i}].base_url"),
                    format!("{base_url:?} is not an http:// or https:// URL"),
                ));
            }
        }
        if l.providers.is_empty()
            && !(l.base_url.starts_with("http://") || l.base_url.starts_with("https://"))
        {
            return Err(invalid(
                "llm.base_url",
                format!("{:?} is not an http:// or https:// URL", l.base_url),
            ));
        }
        if let Err(e) = crate::tools::Toolbox::new(&self.tools.builtins, &self.tools.direct) {
            return Err(invalid("tools.builtins", e.to_string()));
        }
        at_least("tools.max_rounds", self.tools.max_rounds, 1)?;
        at_least("tools.max_calls", self.tools.max_calls, 1)?;
        at_least("tools.max_argument_bytes", self.tools.max_argument_bytes, 1)?;
        let w = &self.workers;
        at_least("workers.cache_workers", w.cache_workers, 1)?;
        at_least(
            "workers.max_concurrent_leaders",
            w.max_concurrent_leaders,
            1,
        )?;
        at_least(
            "workers.max_concurrent_followers",
            w.max_concurrent_followers,
            1,
        )?;
        at_least(
            "workers.max_concurrent_llm_streams",
            w.max_concurrent_llm_streams,
            1,
        )?;
        at_least("workers.intake_queue", w.intake_queue, 1)?;
        at_least("workers.prepared_queue", w.prepared_queue, 1)?;
        at_least("workers.follow_queue", w.follow_queue, 1)?;
        at_least("workers.prepare_queue", w.prepare_queue, 1)?;
        at_least(
            "timeouts.janitor_interval_ms",
            self.timeouts.janitor_interval_ms,
            1,
        )?;
        at_least("cache.max_entries", self.cache.max_entries, 1)?;
        at_least("cache.redis_timeout_ms", self.cache.redis_timeout_ms, 1)?;
        at_least("cache.redis_pool_size", self.cache.redis_pool_size, 1)?;
        at_least("cluster.redis_timeout_ms", self.cluster.redis_timeout_ms, 1)?;
        if self.history.sqlite_path.is_empty() {
            return Err(invalid(
                "history.sqlite_path",
                "must not be empty".to_owned(),
            ));
        }
        at_least("history.read_pool_size", self.history.read_pool_size, 1)?;
        Ok(())
    }
}

fn invalid(key: &str, reason: String) -> ConfigError {
    ConfigError::InvalidValue {
        key: key.to_owned(),
        origin: None,
        reason,
    }
}

fn at_least<T: PartialOrd + fmt::Display>(key: &str, value: T, min: T) -> Result<(), ConfigError> {
    if value < min {
        Err(invalid(
            key,
            format!("{value} is below the minimum of {min}"),
        ))
    } else {
        Ok(())
    }
}
