//! The WebSocket client side: a minimal blocking client, and a reactor that
//! drives many connections from one thread with kernel receive timestamps
//! (its transport-neutral half, [`Sockets`], also drives the HTTP clients of
//! [`crate::http_client`]).

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    ws: WebSocket<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Result<Client, String> {
        let tcp = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
        tcp.set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client::client(format!("ws://{addr}/ws"), tcp)
            .map_err(|e| format!("handshake: {e}"))?;
        Ok(Client { ws })
    }

    pub fn send(&mut self, v: &Value) -> Result<(), String> {
        self.ws
            .send(Message::text(v.to_string()))
            .map_err(|e| format!("send: {e}"))
    }

    /// The next frame; token frames (the bulk) come back as `None` without
    /// being parsed, so the load generator spends little CPU of its own on
    /// the cores it shares with the server.
    pub fn recv(&mut self) -> Result<Option<Value>, String> {
        loop {
            match self.ws.read().map_err(|e| format!("read: {e}"))? {
                Message::Text(t) if t.as_str().starts_with(r#"{"type":"token""#) => {
                    return Ok(None)
                }
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str())
                        .map(Some)
                        .map_err(|e| format!("bad JSON: {e}"))
                }
                Message::Close(_) => return Err("server closed the connection".into()),
                _ => {}
            }
        }
    }
}

/// What one chat looked like from the client.
pub struct Observed {
    pub sent: Instant,
    pub first_token: Option<Instant>,
    pub token_times: Vec<Instant>,
    /// Kernel receive times of the tokens (reactor clients only).
    pub kernel_times: Vec<f64>,
    pub end: Value,
    pub role: String,
}

/// Sends a chat and reads until its end, timing each token.
pub fn chat(c: &mut Client, id: &str, message: &str) -> Result<Observed, String> {
    let sent = Instant::now();
    c.send(&json!({"type": "chat", "id": id, "message": message}))?;
    let mut observed = Observed {
        sent,
        first_token: None,
        token_times: Vec::new(),
        kernel_times: Vec::new(),
        end: Value::Null,
        role: String::new(),
    };
    loop {
        let Some(v) = c.recv()? else {
            let now = Instant::now();
            observed.first_token.get_or_insert(now);
            observed.token_times.push(now);
            continue;
        };
        match v["type"].as_str() {
            Some("start") => observed.role = v["role"].as_str().unwrap_or("").to_owned(),
            Some("done") => {
                observed.end = v;
                return Ok(observed);
            }
            Some("error") if v["id"] == id || v["request"].is_string() => {
                return Err(format!("chat failed: {v}"))
            }
            _ => {}
        }
    }
}

/// What a [`Reactor`] does with a connection after one of its frames.
pub enum Next {
    Read,
    Send(Value),
    Finished,
}

/// When a frame reached the client.
#[derive(Clone, Copy)]
pub struct Arrival {
    /// When the reactor read it.
    pub read: Instant,
    /// When the kernel put its bytes on the client's socket (`SO_TIMESTAMPNS`,
    /// seconds of the real-time clock): the moment a client on another
    /// machine would have had it, free of this client's own scheduling.
    pub kernel: f64,
}

struct ReactorConn {
    /// For sending (tungstenite masks client frames); its socket is read by
    /// the reactor's [`Sockets`] through a clone.
    ws: WebSocket<TcpStream>,
    /// Bytes read and not yet parsed into frames.
    buf: Vec<u8>,
}

/// Many WebSocket connections on one thread: non-blocking sockets and one
/// epoll set ([`Sockets`]). A thread per connection would charge the server
/// for waking thousands of client threads (on loopback the sender's system
/// call runs the receiver's wake-up), which no real, remote client costs it.
pub struct Reactor {
    sockets: Sockets,
    conns: Vec<ReactorConn>,
}

impl Reactor {
    pub fn new(clients: Vec<Client>) -> Result<Reactor, String> {
        let mut readers = Vec::with_capacity(clients.len());
        let mut conns = Vec::with_capacity(clients.len());
        for c in clients {
            readers.push(c.ws.get_ref().try_clone().map_err(|e| e.to_string())?);
            conns.push(ReactorConn {
                ws: c.ws,
                buf: Vec::new(),
            });
        }
        Ok(Reactor {
            sockets: Sockets::new(readers)?,
            conns,
        })
    }

    pub fn send(&mut self, i: usize, v: &Value) -> Result<(), String> {
        send_frame(&mut self.conns[i].ws, v)
    }

    /// Reads every connection until `on_frame` has said `Finished` for each.
    /// `on_frame` gets the connection's index, when its frame arrived, and
    /// the frame: `None` for a token frame (not parsed, to keep the client
    /// cheap), the parsed JSON otherwise.
    pub fn run(
        &mut self,
        mut on_frame: impl FnMut(usize, Arrival, Option<Value>) -> Result<Next, String>,
    ) -> Result<(), String> {
        let conns = &mut self.conns;
        self.sockets.run(|i, arrival, bytes| {
            let conn = &mut conns[i];
            conn.buf.extend_from_slice(bytes);
            let mut parsed = 0;
            let mut frames = Vec::new();
            while let Some((opcode, payload, used)) = server_frame(&conn.buf[parsed..]) {
                if opcode == 0x8 {
                    return Err("server closed the connection".into());
                }
                if opcode == 0x1 {
                    frames.push(if payload.starts_with(br#"{"type":"token""#) {
                        None
                    } else {
                        Some(
                            serde_json::from_slice::<Value>(payload)
                                .map_err(|e| format!("bad JSON: {e}"))?,
                        )
                    });
                }
                parsed += used;
            }
            conn.buf.drain(..parsed);
            for frame in frames {
                match on_frame(i, arrival, frame)? {
                    Next::Read => {}
                    Next::Send(v) => send_frame(&mut conn.ws, &v)?,
                    Next::Finished => return Ok(true),
                }
            }
            Ok(false)
        })
    }
}

fn send_frame(ws: &mut WebSocket<TcpStream>, v: &Value) -> Result<(), String> {
    // The socket is shared with the non-blocking reader, so this may
    // find it full: the bytes then wait in tungstenite's buffer.
    match ws.send(Message::text(v.to_string())) {
        Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
        r => r.map_err(|e| format!("send: {e}")),
    }
}

/// The transport-neutral half of a reactor: sockets made non-blocking with
/// kernel receive timestamps (`SO_TIMESTAMPNS`) in one epoll set, read from
/// one thread. The WebSocket [`Reactor`] and the HTTP one
/// ([`crate::http_client::HttpReactor`]) parse what it reads.
pub struct Sockets {
    epoll: rustix::fd::OwnedFd,
    sockets: Vec<TcpStream>,
}

impl Sockets {
    pub fn new(sockets: Vec<TcpStream>) -> Result<Sockets, String> {
        use rustix::event::epoll;
        use std::os::fd::AsRawFd;
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(|e| e.to_string())?;
        for (i, socket) in sockets.iter().enumerate() {
            socket.set_nonblocking(true).map_err(|e| e.to_string())?;
            let on: libc::c_int = 1;
            // SAFETY: a valid socket, option and option length.
            let rc = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                return Err(format!(
                    "SO_TIMESTAMPNS: {}",
                    std::io::Error::last_os_error()
                ));
            }
            epoll::add(
                &epoll,
                socket,
                epoll::EventData::new_u64(i as u64),
                epoll::EventFlags::IN,
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(Sockets { epoll, sockets })
    }

    /// Connection `i`'s socket (non-blocking).
    pub fn socket(&self, i: usize) -> &TcpStream {
        &self.sockets[i]
    }

    /// Reads every socket until `on_bytes` has returned `true` (finished)
    /// for each. `on_bytes` gets the connection's index, when the bytes
    /// arrived, and the bytes of one read.
    pub fn run(
        &self,
        mut on_bytes: impl FnMut(usize, Arrival, &[u8]) -> Result<bool, String>,
    ) -> Result<(), String> {
        use rustix::event::epoll;
        let mut open = self.sockets.len();
        let mut finished = vec![false; open];
        let mut events = Vec::with_capacity(1024);
        let mut scratch = vec![0u8; 64 * 1024];
        let timeout = rustix::event::Timespec {
            tv_sec: READ_TIMEOUT.as_secs() as i64,
            tv_nsec: 0,
        };
        while open > 0 {
            events.clear();
            epoll::wait(
                &self.epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            )
            .map_err(|e| e.to_string())?;
            if events.is_empty() {
                return Err(format!("nothing read for {READ_TIMEOUT:?}"));
            }
            for event in &events {
                let i = event.data.u64() as usize;
                while !finished[i] {
                    let (n, kernel) = match recv_stamped(&self.sockets[i], &mut scratch) {
                        Ok((0, _)) => return Err("server closed the connection".into()),
                        Ok(got) => got,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("read: {e}")),
                    };
                    let arrival = Arrival {
                        read: Instant::now(),
                        kernel,
                    };
                    if on_bytes(i, arrival, &scratch[..n])? {
                        finished[i] = true;
                        open -= 1;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads what `socket` holds, with the kernel's receive time of the bytes.
fn recv_stamped(socket: &TcpStream, buf: &mut [u8]) -> std::io::Result<(usize, f64)> {
    use std::os::fd::AsRawFd;
    // u64s keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer in it refers to a live
    // buffer of the stated length, and the cmsg walk stays inside `control`.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT);
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut stamp = f64::NAN;
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast());
                stamp = ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9;
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        Ok((n as usize, stamp))
    }
}

/// One complete unmasked server frame at the start of `buf`: its opcode,
/// payload and encoded length. Server frames are never fragmented.
fn server_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let opcode = buf.first()? & 0x0f;
    let (len, header) = match buf.get(1)? & 0x7f {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(header..header + len)?;
    Some((opcode, payload, header + len))
}
