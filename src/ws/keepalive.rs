//! Dead-peer detection for one WebSocket: when to ping, and when a peer
//! that stays silent is given up.
//!
//! A client that vanishes without a FIN (a laptop closing its lid, a NAT
//! dropping the mapping) leaves a half-open connection that would hold its
//! thread and slot for ever. So every `ping_interval` of silence the server
//! sends a ping; a peer that then sends nothing at all (no pong, no frame)
//! within `pong_timeout` is closed. Any frame from the peer counts as a
//! sign of life, and so does the kernel taking more of our output after it
//! was blocked (the peer's TCP acknowledged, so a slow reader that still
//! reads is not mistaken for a dead one).
//!
//! Threads: owned by its connection's thread; pure bookkeeping over
//! `Instant`s, so it is tested without sockets.

use std::time::{Duration, Instant};

/// What the connection must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing yet.
    Nothing,
    /// Send a ping.
    Ping,
    /// The peer stayed silent past the pong timeout: close the connection.
    Dead,
}

/// See the module docs.
#[derive(Debug)]
pub struct Keepalive {
    interval: Option<Duration>,
    timeout: Duration,
    /// When the next ping goes out, after this much silence.
    next_ping: Instant,
    /// Set while a ping waits for a sign of life.
    deadline: Option<Instant>,
}

impl Keepalive {
    /// A keepalive that pings after `interval` of silence (`None`: never).
    pub fn new(interval: Option<Duration>, timeout: Duration, now: Instant) -> Keepalive {
        Keepalive {
            interval,
            timeout,
            next_ping: now + interval.unwrap_or_default(),
            deadline: None,
        }
    }

    /// The peer showed it is alive at `now`.
    pub fn heard(&mut self, now: Instant) {
        self.deadline = None;
        if let Some(interval) = self.interval {
            self.next_ping = now + interval;
        }
    }

    /// What is due at `now`. `Ping` starts the pong timeout.
    pub fn due(&mut self, now: Instant) -> Due {
        let Some(interval) = self.interval else {
            return Due::Nothing;
        };
        if let Some(deadline) = self.deadline {
            return if now >= deadline {
                Due::Dead
            } else {
                Due::Nothing
            };
        }
        if now >= self.next_ping {
            self.next_ping = now + interval;
            self.deadline = Some(now + self.timeout);
            return Due::Ping;
        }
        Due::Nothing
    }

    /// When [`Keepalive::due`] next has something to say; `None`: never.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.interval?;
        Some(self.deadline.unwrap_or(self.next_ping))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn pings_after_silence_and_gives_up_after_the_timeout() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Some(100 * MS), 30 * MS, t0);
        assert_eq!(k.next_wakeup(), Some(t0 + 100 * MS));
        assert_eq!(k.due(t0 + 99 * MS), Due::Nothing);
        assert_eq!(k.due(t0 + 100 * MS), Due::Ping);
        assert_eq!(k.next_wakeup(), Some(t0 + 130 * MS));
        // One ping at a time.
        assert_eq!(k.due(t0 + 120 * MS), Due::Nothing);
        assert_eq!(k.due(t0 + 130 * MS), Due::Dead);
    }

    #[test]
    fn any_sign_of_life_answers_the_ping_and_delays_the_next() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(Some(100 * MS), 30 * MS, t0);
        assert_eq!(k.due(t0 + 100 * MS), Due::Ping);
        k.heard(t0 + 110 * MS);
        assert_eq!(k.due(t0 + 200 * MS), Due::Nothing);
        assert_eq!(k.next_wakeup(), Some(t0 + 210 * MS));
        assert_eq!(k.due(t0 + 210 * MS), Due::Ping);
        // A chatty peer is never pinged.
        let mut k = Keepalive::new(Some(100 * MS), 30 * MS, t0);
        for step in 1..50 {
            let now = t0 + step * 50 * MS;
            assert_eq!(k.due(now), Due::Nothing);
            k.heard(now);
        }
    }

    #[test]
    fn no_interval_never_pings() {
        let t0 = Instant::now();
        let mut k = Keepalive::new(None, 30 * MS, t0);
        assert_eq!(k.next_wakeup(), None);
        assert_eq!(k.due(t0 + Duration::from_secs(3600)), Due::Nothing);
    }
}
