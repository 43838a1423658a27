//! The `chorus` binary: parse flags, load the configuration, serve until
//! SIGINT or SIGTERM, then drain and exit 0.

use std::process::ExitCode;

use chorus::config::{parse_cli, CliAction, Config};
use chorus::server::Server;

/// Hands the allocator's free pages back to the OS (see `chorus::memory`).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_memory() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks;
    // it takes no pointer and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_memory() {}

fn main() -> ExitCode {
    chorus::memory::set_release_hook(release_memory);
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match parse_cli(std::env::args().skip(1)) {
        Ok(CliAction::Run(cli)) => cli,
        Ok(CliAction::Help(usage)) => {
            println!("{usage}");
            return ExitCode::SUCCESS;
        }
        Ok(CliAction::Version) => {
            println!("chorus {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("chorus: {e}");
            return ExitCode::from(2);
        }
    };
    let (config, unknown_env) = match Config::from_cli(&cli) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("chorus: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    for var in unknown_env {
        log::warn!("ignoring {var}: it names no configuration key");
    }
    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    }) {
        eprintln!("chorus: cannot install the signal handler: {e}");
        return ExitCode::FAILURE;
    }
    let mut server = match Server::start(config) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("chorus: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Tests and scripts read this line to learn the port (also with port 0).
    println!("chorus listening on http://{}", server.local_addr());
    let _ = stop_rx.recv();
    server.shutdown();
    ExitCode::SUCCESS
}
