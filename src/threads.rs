//! Joining the server's own threads: a thread that panicked is reported
//! (logged with its message, and counted), never dropped silently. Every
//! long-lived thread chorus starts (pool workers, the janitor, the accept
//! thread, the history writer, the upstream reader, the cluster's writer
//! and lookup threads) is joined through [`join`] when it stops.
//!
//! Threads: any thread that stops another.
//!
//! ```
//! let handle = std::thread::spawn(|| 7);
//! assert_eq!(chorus::threads::join(handle, "answer"), Some(7));
//! ```

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

static PANICS: AtomicU64 = AtomicU64::new(0);

/// Waits for `handle`'s thread and returns what it returned; `None` when
/// it panicked, which is logged (as an error, with the panic's message and
/// `what` the thread was) and counted in [`panics`].
pub fn join<T>(handle: JoinHandle<T>, what: &str) -> Option<T> {
    match handle.join() {
        Ok(value) => Some(value),
        Err(payload) => {
            PANICS.fetch_add(1, Ordering::Relaxed);
            log::error!("the {what} thread panicked: {}", message(&*payload));
            None
        }
    }
}

/// Threads found panicked when joined, since the process started.
pub fn panics() -> u64 {
    PANICS.load(Ordering::Relaxed)
}

/// The message of a panic payload (`panic!` makes a `&str` or a `String`).
fn message(payload: &(dyn Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(no message)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicked_thread_is_reported_with_its_message() {
        let before = panics();
        let handle = std::thread::spawn(|| -> u32 { panic!("lost the {}", "plot") });
        assert_eq!(join(handle, "test"), None);
        assert!(panics() > before);
        let payload: Box<dyn Any + Send> = Box::new(String::from("owned"));
        assert_eq!(message(&*payload), "owned");
        let payload: Box<dyn Any + Send> = Box::new(42);
        assert_eq!(message(&*payload), "(no message)");
    }

    #[test]
    fn many_threads_joined_at_once_are_each_counted() {
        let before = panics();
        let handles: Vec<_> = (0..16)
            .map(|i| {
                std::thread::spawn(move || {
                    if i % 2 == 0 {
                        panic!("even {i}");
                    }
                    i
                })
            })
            .collect();
        let joined: Vec<_> = handles.into_iter().map(|h| join(h, "test")).collect();
        assert_eq!(joined.iter().flatten().count(), 8);
        assert!(panics() >= before + 8);
    }
}
