//! Memory a client can make the server hold: every connection's output is
//! bounded in bytes, and `history` answers are bounded and paged.

mod common;

use std::net::TcpStream;

use common::{Client, Server};
use socket2::{Domain, Socket, Type};

/// A client whose socket takes almost nothing unless it reads.
fn tiny_window_client(server: &Server) -> Client {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&server.addr.into()).unwrap();
    let tcp: TcpStream = socket.into();
    Client::over(tcp, server.addr)
}

/// 4,000 tokens of 4 KiB: 16 MiB of tokens, far fewer frames than
/// `outbox_frames`, so only a byte bound can cut the reader that never reads.
#[test]
fn a_client_that_never_reads_big_tokens_is_cut_off_by_bytes_and_the_reader_gets_everything() {
    let server = Server::start(
        r#"
[server]
outbox_bytes = 2097152
send_buffer_bytes = 65536
[llm]
max_tokens = 10000
[llm.simulated]
first_token_ms = 300
token_interval_ms = 0
tokens = 4000
token_bytes = 4096
"#,
    );
    let mut idle = tiny_window_client(&server);
    let (idle_request, _) = idle.ask(None, "big tokens please");
    let mut reader = server.client();
    let (read_request, _) = reader.ask(None, "big tokens please");
    let a = reader.answer(&read_request);
    assert!(a.is_done(), "{:?}", a.end);
    assert_eq!(a.role.as_deref(), Some("follower"), "same generation");
    a.assert_contiguous();
    assert_eq!(a.seqs.len(), 4000);
    assert_eq!(a.text.len(), 4000 * 4096);
    // Only now does the idle client read: what was buffered for it, then
    // slow_consumer instead of the other 15 MiB.
    let b = idle.answer(&idle_request);
    assert_eq!(b.code(), "slow_consumer", "{:?}", b.end);
    assert!(b.seqs.len() < 4000, "{} tokens", b.seqs.len());
    b.assert_contiguous();
}
