//! What the pipeline knows is running, and its one lock: the requests
//! (live, and finished ones for the replay window), the request that
//! holds each busy conversation, and the generations not yet over.
//!
//! Locking rule, in one place: the registry's lock is one
//! `parking_lot::RwLock` over all four maps, and it is taken *last*: every
//! method takes it for one map operation and lets it go before returning,
//! so nothing that holds a request's or a generation's lock ever waits for
//! another of those while holding this one, and nothing is ended, sent or
//! stored under it. Whoever needs to act on many entries (the janitor,
//! shutdown) takes a [`Registry::snapshot`] and works on that.
//!
//! Threads: connection threads (admission, `cancel`, `resume`), the
//! pipeline's workers (generations listed and unlisted, requests ended),
//! the history writer (a request stored moves to the replay window), the
//! cluster's lookup thread and the janitor (expiry).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use super::records::Generation;
use super::records::Request;

/// Finished requests kept for `resume` at most, whatever the replay window:
/// under a flood of short requests the window alone would let the map grow
/// with the request rate; past the cap the oldest leave early (a late
/// `resume` then gets `not_found`).
const MAX_REPLAYABLE: usize = 100_000;

/// See the module doc.
#[derive(Default)]
pub(super) struct Registry {
    maps: RwLock<Maps>,
}

#[derive(Default)]
struct Maps {
    /// Live requests, and finished ones still inside the replay window.
    requests: HashMap<Arc<str>, Arc<Request>>,
    /// Requests not yet finished: what the janitor checks for timeouts.
    live: HashMap<Arc<str>, Arc<Request>>,
    /// Finished requests in the order they finished, so expiring the replay
    /// window costs nothing per request still inside it.
    finished: VecDeque<(Instant, Arc<str>)>,
    /// Conversations with a request in flight, and that request.
    busy_conversations: HashMap<String, Arc<Request>>,
    /// Generations not yet over.
    generations: HashMap<u64, Arc<Generation>>,
}

/// What [`Registry::expire`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Expired {
    /// Finished requests forgotten.
    pub forgot: usize,
    /// They were the last of a burst: nothing runs any more, and the maps
    /// gave back the capacity they kept from the peak.
    pub idle: bool,
}

impl Registry {
    /// Lists a request admitted here: findable by id, and live.
    pub fn admit(&self, request: &Arc<Request>) {
        let mut maps = self.maps.write();
        maps.requests.insert(request.id.clone(), request.clone());
        maps.live.insert(request.id.clone(), request.clone());
    }

    /// Lists the stand-in of a request resumed from another node, unless a
    /// request of that id is already known here (false then).
    pub fn admit_resumed(&self, request: &Arc<Request>) -> bool {
        let mut maps = self.maps.write();
        if maps.requests.contains_key(&request.id) {
            return false;
        }
        maps.requests.insert(request.id.clone(), request.clone());
        true
    }

    /// The request of that id, live or in the replay window.
    pub fn get(&self, id: &str) -> Option<Arc<Request>> {
        self.maps.read().requests.get(id).cloned()
    }

    /// Forgets `request` at once (a stand-in whose lookup failed), unless
    /// its id now names another request.
    pub fn forget(&self, request: &Arc<Request>) {
        let mut maps = self.maps.write();
        if maps
            .requests
            .get(&request.id)
            .is_some_and(|r| Arc::ptr_eq(r, request))
        {
            maps.requests.remove(&request.id);
        }
    }

    /// Makes `request` the holder of its conversation, or returns the
    /// request that holds it.
    pub fn claim_conversation(&self, request: &Arc<Request>) -> Result<(), Arc<Request>> {
        let mut maps = self.maps.write();
        match maps.busy_conversations.get(&request.conversation) {
            Some(holder) => Err(holder.clone()),
            None => {
                maps.busy_conversations
                    .insert(request.conversation.clone(), request.clone());
                Ok(())
            }
        }
    }

    /// The request holding `conversation`, if any.
    pub fn conversation_holder(&self, conversation: &str) -> Option<Arc<Request>> {
        self.maps
            .read()
            .busy_conversations
            .get(conversation)
            .cloned()
    }

    /// Frees `request`'s conversation, if `request` is the one holding it.
    pub fn release_conversation(&self, request: &Arc<Request>) {
        let mut maps = self.maps.write();
        if maps
            .busy_conversations
            .get(&request.conversation)
            .is_some_and(|holder| Arc::ptr_eq(holder, request))
        {
            maps.busy_conversations.remove(&request.conversation);
        }
    }

    /// Moves `request` from the live requests to the replay window.
    pub fn finish(&self, request: &Request) {
        let mut maps = self.maps.write();
        maps.live.remove(&request.id);
        maps.finished
            .push_back((Instant::now(), request.id.clone()));
        while maps.finished.len() > MAX_REPLAYABLE {
            if let Some((_, id)) = maps.finished.pop_front() {
                maps.requests.remove(&id);
            }
        }
    }

    /// Lists a generation: visible to the janitor and to shutdown.
    pub fn add_generation(&self, generation: &Arc<Generation>) {
        self.maps
            .write()
            .generations
            .insert(generation.id, generation.clone());
    }

    /// Unlists a generation that is over.
    pub fn remove_generation(&self, id: u64) {
        self.maps.write().generations.remove(&id);
    }

    /// Generations not yet over.
    pub fn generations(&self) -> usize {
        self.maps.read().generations.len()
    }

    /// The live requests and the listed generations, to act on without the
    /// lock.
    pub fn snapshot(&self) -> (Vec<Arc<Request>>, Vec<Arc<Generation>>) {
        let maps = self.maps.read();
        (
            maps.live.values().cloned().collect(),
            maps.generations.values().cloned().collect(),
        )
    }

    /// The live requests, to act on without the lock.
    pub fn live(&self) -> Vec<Arc<Request>> {
        self.maps.read().live.values().cloned().collect()
    }

    /// Forgets the requests that finished more than `window` before `now`.
    /// When that leaves nothing running, the maps give back the capacity
    /// they kept from the peak (a busy server would only grow them again).
    pub fn expire(&self, now: Instant, window: Duration) -> Expired {
        let due = |maps: &Maps| {
            maps.finished
                .front()
                .is_some_and(|(at, _)| now.duration_since(*at) > window)
        };
        let mut expired = Expired {
            forgot: 0,
            idle: false,
        };
        // Most sweeps find nothing due: a read lock tells.
        if !due(&self.maps.read()) {
            return expired;
        }
        let mut maps = self.maps.write();
        while due(&maps) {
            if let Some((_, id)) = maps.finished.pop_front() {
                maps.requests.remove(&id);
                expired.forgot += 1;
            }
        }
        expired.idle = expired.forgot > 0 && maps.live.is_empty() && maps.generations.is_empty();
        if expired.idle {
            maps.requests.shrink_to_fit();
            maps.live.shrink_to_fit();
            maps.finished.shrink_to_fit();
            maps.busy_conversations.shrink_to_fit();
            maps.generations.shrink_to_fit();
        }
        expired
    }

    /// How many requests the maps have room for without growing.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.maps.read().requests.capacity()
    }

    /// Requests known (live or in the replay window).
    #[cfg(test)]
    pub fn requests(&self) -> usize {
        self.maps.read().requests.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request in `conversation` (its id is made up by `Request::new`).
    fn request(conversation: &str) -> Arc<Request> {
        Request::new("client-id".into(), conversation.into(), "m".into())
    }

    #[test]
    fn a_conversation_has_one_holder_until_that_holder_releases_it() {
        let registry = Registry::default();
        let (first, second) = (request("c"), request("c"));
        assert!(registry.claim_conversation(&first).is_ok());
        let holder = registry.claim_conversation(&second).unwrap_err();
        assert!(Arc::ptr_eq(&holder, &first));
        // Only the holder frees it.
        registry.release_conversation(&second);
        assert!(registry.conversation_holder("c").is_some());
        registry.release_conversation(&first);
        assert!(registry.claim_conversation(&second).is_ok());
    }

    #[test]
    fn finished_requests_stay_findable_for_the_window_then_go() {
        let registry = Registry::default();
        let r = request("c");
        registry.admit(&r);
        registry.finish(&r);
        assert!(registry.get(&r.id).is_some());
        let window = Duration::from_secs(60);
        let now = Instant::now();
        assert_eq!(registry.expire(now, window).forgot, 0);
        let later = now + window + Duration::from_secs(1);
        assert_eq!(
            registry.expire(later, window),
            Expired {
                forgot: 1,
                idle: true
            }
        );
        assert!(registry.get(&r.id).is_none());
    }

    #[test]
    fn a_resumed_stand_in_never_replaces_a_known_request() {
        let registry = Registry::default();
        let known = request("c");
        registry.admit(&known);
        let stand_in = Request::resumed(&known.id, 0);
        assert!(!registry.admit_resumed(&stand_in));
        assert!(Arc::ptr_eq(&registry.get(&known.id).unwrap(), &known));
        // Forgetting a stand-in that lost leaves the known one alone.
        registry.forget(&stand_in);
        assert!(registry.get(&known.id).is_some());
        // A stand-in for an unknown id is listed, and can be forgotten.
        let other = Request::resumed("r-elsewhere", 0);
        assert!(registry.admit_resumed(&other));
        registry.forget(&other);
        assert!(registry.get("r-elsewhere").is_none());
    }

    #[test]
    fn many_threads_admit_finish_and_expire_without_losing_an_entry() {
        let registry = Arc::new(Registry::default());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let registry = registry.clone();
                std::thread::spawn(move || {
                    for _ in 0..2_000 {
                        let r = request(&format!("c{t}"));
                        registry.admit(&r);
                        assert!(registry.claim_conversation(&r).is_ok());
                        assert!(registry.get(&r.id).is_some());
                        registry.release_conversation(&r);
                        registry.finish(&r);
                        // Nothing finished a minute ago: nothing expires.
                        registry.expire(Instant::now(), Duration::from_secs(60));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(registry.requests(), 16_000);
        assert_eq!(registry.snapshot().0.len(), 0, "a request stayed live");
        let later = Instant::now() + Duration::from_secs(61);
        let expired = registry.expire(later, Duration::from_secs(60));
        assert_eq!(expired.forgot, 16_000);
        assert!(expired.idle);
        assert_eq!(registry.requests(), 0);
    }
}
