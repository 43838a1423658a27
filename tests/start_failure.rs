//! A start that fails leaves no thread behind: the port is bound before
//! any thread starts, and a failure found after threads started stops
//! them all.
//!
//! The server runs in this process and threads are counted in
//! `/proc/self/task`, so this file holds a single test: the harness runs
//! the tests of one binary on parallel threads, which would be counted too.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use chorus::config::Config;
use chorus::server::{Server, ServerError};

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// Waits up to 10 s for the thread count to come back to `baseline`
/// (a pool's threads may take a moment to exit after being told to);
/// returns the last count.
fn settled_count(baseline: usize) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = threads();
        if now <= baseline || Instant::now() >= deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".to_owned();
    config.history.sqlite_path = dir.join("chat.db").to_string_lossy().into_owned();
    config
}

#[test]
fn a_failed_start_leaves_no_thread_behind() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("chat.db");
    let baseline = threads();

    // A taken port: found before anything starts, so not even the
    // database is opened.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut busy = config(dir.path());
    busy.server.bind = taken.local_addr().unwrap().to_string();
    busy.validate().expect("a valid configuration");
    match Server::start(busy) {
        Err(ServerError::Bind { .. }) => {}
        Err(e) => panic!("expected a bind error, got {e}"),
        Ok(_) => panic!("started on a taken port"),
    }
    assert!(
        !db.exists(),
        "the history was opened before the port was bound"
    );
    assert_eq!(
        settled_count(baseline),
        baseline,
        "threads left by a start that could not bind"
    );

    // A cluster Redis URL without its scheme passes validation and is only
    // refused when the pipeline starts, after the port is bound and the
    // history writer runs.
    let mut late = config(dir.path());
    late.cluster.enabled = true;
    late.cluster.redis_url = "127.0.0.1:6379".to_owned();
    late.validate().expect("a valid configuration");
    match Server::start(late) {
        Err(ServerError::Bind { .. }) => panic!("the port should have been free"),
        Err(e) => assert!(e.to_string().contains("cannot start"), "{e}"),
        Ok(_) => panic!("started with a malformed cluster.redis_url"),
    }
    assert!(
        db.exists(),
        "the failure came before the history was opened"
    );
    assert_eq!(
        settled_count(baseline),
        baseline,
        "threads left by a start that failed after threads started"
    );

    // The database the failed start opened is usable by the next one.
    let mut server = Server::start(config(dir.path())).expect("server starts");
    server.shutdown();
}
