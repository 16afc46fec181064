//! "Pods": real servers listening on a pod address inside a test namespace. Each answers with
//! its name, and counts the connections it accepted, how many are open, and the requests it
//! served: the backends' own view that the tests check socklb's maps against.
//!
//! TCP pods speak enough HTTP/1.1 with keep-alive for wrk and for `socklb-client`: every
//! request head (ended by an empty line) gets `200 OK` with the pod name as the body (padded
//! to N bytes for `GET /?bytes=N`), except `GET /stream`, which gets a server-sent event
//! stream: one event with the pod name every 50 to 100 ms until the client goes. UDP pods answer each datagram with their name.
//!
//! The listener is created on a short-lived thread that entered the namespace; the socket
//! stays in that namespace while the serving threads run in the test process as usual.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
};

use anyhow::Result;

use crate::netns::Netns;

#[derive(Default)]
pub struct PodStats {
    pub accepted: AtomicU64,
    pub open: AtomicU64,
    pub requests: AtomicU64,
}

pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<PodStats>,
    listener: Listener,
    connections: Arc<Mutex<Vec<TcpStream>>>,
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Pod {
    /// A TCP (HTTP/1.1) pod at `addr`, which must be an address of `netns`.
    pub fn tcp(netns: &Netns, name: &str, addr: impl Into<SocketAddr>) -> Result<Pod> {
        let addr = addr.into();
        let listener = netns.run(move || TcpListener::bind(addr))?;
        let stats = Arc::new(PodStats::default());
        let connections = Arc::new(Mutex::new(Vec::new()));
        let accept = listener.try_clone()?;
        let (name_, stats_, conns_) = (name.to_owned(), stats.clone(), connections.clone());
        thread::spawn(move || {
            // Ends when Drop shuts the listener down.
            for stream in accept.incoming() {
                let Ok(stream) = stream else { break };
                stats_.accepted.fetch_add(1, Ordering::Relaxed);
                stats_.open.fetch_add(1, Ordering::Relaxed);
                if let Ok(clone) = stream.try_clone() {
                    conns_.lock().expect("lock").push(clone);
                }
                let (name, stats) = (name_.clone(), stats_.clone());
                thread::spawn(move || {
                    let _ = serve_http(stream, &name, &stats);
                    stats.open.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Pod {
            name: name.to_owned(),
            addr,
            stats,
            listener: Listener::Tcp(listener),
            connections,
        })
    }

    /// A UDP pod at `addr`: answers each datagram with its name.
    pub fn udp(netns: &Netns, name: &str, addr: impl Into<SocketAddr>) -> Result<Pod> {
        let addr = addr.into();
        let socket = netns.run(move || UdpSocket::bind(addr))?;
        let stats = Arc::new(PodStats::default());
        let serve = socket.try_clone()?;
        let (name_, stats_) = (name.to_owned(), stats.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Clients never send empty datagrams; a 0-byte read is the shutdown from Drop.
            while let Ok((n, from)) = serve.recv_from(&mut buf) {
                if n == 0 {
                    break;
                }
                stats_.requests.fetch_add(1, Ordering::Relaxed);
                let _ = serve.send_to(name_.as_bytes(), from);
            }
        });
        Ok(Pod {
            name: name.to_owned(),
            addr,
            stats,
            listener: Listener::Udp(socket),
            connections: Arc::default(),
        })
    }

    /// The name tests give the pod at `ip`: `pod-N` for 10.244.x.N, `pod6-N` for fd00:…::N.
    pub fn name_for(ip: IpAddr) -> String {
        match ip {
            IpAddr::V4(v4) => format!("pod-{}", v4.octets()[3]),
            IpAddr::V6(v6) => format!("pod6-{:x}", v6.segments()[7]),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.stats.accepted.load(Ordering::Relaxed)
    }

    pub fn open(&self) -> u64 {
        self.stats.open.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        // shutdown(2) wakes the thread blocked in accept/recv, which then ends.
        let fd = match &self.listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Udp(u) => u.as_raw_fd(),
        };
        // SAFETY: fd is owned by self.listener, alive until the end of this function.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        for c in self.connections.lock().expect("lock").drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn serve_http(stream: TcpStream, name: &str, stats: &PodStats) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let body = format!("{name}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut line = String::new();
    loop {
        // One request head: lines up to an empty one.
        let mut first = None;
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Ok(()); // the client closed
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            first.get_or_insert_with(|| line.clone());
        }
        let Some(request) = first else { continue };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        if request.starts_with("GET /stream ") {
            return stream_events(out, name);
        }
        match padded_size(&request) {
            Some(size) => {
                let mut body = format!("{name}\n");
                body.push_str(&".".repeat(size.saturating_sub(body.len())));
                out.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )?;
            }
            None => out.write_all(response.as_bytes())?,
        }
    }
}

/// N of a `GET /?bytes=N` request line.
fn padded_size(request: &str) -> Option<usize> {
    let rest = request.strip_prefix("GET /?bytes=")?;
    rest.split_whitespace().next()?.parse().ok()
}

/// A server-sent event stream: an event every 50 to 100 ms until the client goes.
fn stream_events(mut out: TcpStream, name: &str) -> std::io::Result<()> {
    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")?;
    let mut n: u64 = 0;
    loop {
        n += 1;
        out.write_all(format!("data: {name} {n}\n\n").as_bytes())?;
        // 50-100 ms, varied without a random source: a small LCG over the event number.
        let jitter = (n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1) >> 33) % 51;
        thread::sleep(std::time::Duration::from_millis(50 + jitter));
    }
}
