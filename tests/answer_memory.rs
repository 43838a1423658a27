//! What one answer costs in memory, counted by the allocator: a finished
//! generation's stream holds its answer once (the encoded tokens), not a
//! second copy of the text beside them.
//!
//! One test in this binary, because the count is process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use chorus::broadcast::Broadcast;
use chorus::delivery::Attachment;

/// The system allocator, counting the bytes live at any moment.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counter only observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[test]
fn a_finished_stream_holds_its_answer_once() {
    const TOKENS: usize = 1000;
    const TOKEN_BYTES: usize = 4096;
    let token = "x".repeat(TOKEN_BYTES);
    let broadcast = Broadcast::<Attachment>::new();
    let before = LIVE.load(Ordering::Relaxed);
    for _ in 0..TOKENS {
        broadcast.publish(&token);
    }
    let produced = broadcast.finish();
    assert_eq!(produced.text.len(), TOKENS * TOKEN_BYTES);
    drop(produced);
    let held = LIVE.load(Ordering::Relaxed) - before;
    let answer = (TOKENS * TOKEN_BYTES) as isize;
    // The encoded tokens (each a little longer than its text), nothing more.
    assert!(
        held < answer + answer / 8,
        "a {answer}-byte answer holds {held} bytes"
    );
    assert!(held >= answer, "{held}");
}
