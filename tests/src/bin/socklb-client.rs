//! socklb-client: a client process the tests run inside a cgroup and network namespace. It
//! reads one JSON command per line on stdin and answers one JSON line on stdout:
//!
//! - `{"cmd":"open","target":"VIP:PORT","count":N,"proto":"tcp"|"udp","timeout_ms":T}` opens N
//!   connections at once (all threads released together), makes one request on each, keeps them
//!   open, and answers with each one's pod, peer address (getpeername) and error if any. The
//!   socket's family is the target's, so `[::ffff:VIP]:PORT` is a dual-mode AF_INET6 socket to
//!   an IPv4 address (what Java and gRPC C-core open); `"v6only":true` sets IPV6_V6ONLY on it,
//!   and keeps it open even if its connect fails (as an application retrying on the same
//!   socket would), until `close`.
//!   With `"bind_ports":[P, ...]` it opens one TCP connection per port instead, one after the
//!   other, each bound to that local port and closed with a reset (no TIME_WAIT) later.
//! - `{"cmd":"request","rounds":K}` sends K more requests on every open connection; answers
//!   with the requests per pod, the failures and their errnos.
//! - `{"cmd":"dgram_open","target":"VIP:PORT","count":N}` makes N unconnected UDP sockets and
//!   keeps them; `{"cmd":"dgram_ask","rounds":K}` sends K datagrams from each with `sendto`
//!   and answers, per socket, the pods that answered, where the answers came from and the
//!   datagrams left unanswered (1 s each).
//! - `{"cmd":"churn","target":"VIP:PORT","count":N}` connects, makes a request and closes, N
//!   times in a row.
//! - `{"cmd":"pace","rate":R}` starts sending R requests per second on every open connection,
//!   in the background, like a pool of steady callers. Before each request the connection is
//!   checked as careful HTTP and database clients check an idle pooled connection (readable
//!   with nothing to read means the peer closed it): one found closed is opened again to the
//!   same address, which counts as a reconnect, not a failure. A request that then fails in
//!   any way (write error, reset, end of stream before the whole answer) counts as failed and
//!   is never retried; the next request goes on a new connection. `{"cmd":"stop"}` ends that
//!   and answers with the requests per pod, the reconnects and the failed requests. With
//!   `"depth":D` each turn pipelines D requests (all written, then the D answers read); a
//!   failure counts every request of the turn not yet answered.
//! - `{"cmd":"streams","target":"VIP:PORT","count":N}` opens N server-sent event streams
//!   (`GET /stream`) and reads them in the background; `{"cmd":"streams_stop"}` answers with
//!   the events per pod and the streams that were cut (ended or failed before the stop).
//! - `{"cmd":"latency","target":"ADDR:PORT","count":N}` connects, sends an HTTP/1.0 request
//!   and waits for the first byte of the answer, N times in a row, and answers with the
//!   latency percentiles and connections per second.
//! - `{"cmd":"sendto","target":"VIP:PORT","count":N}` sends N datagrams from each of `rounds`
//!   fresh unconnected UDP sockets (as a DNS client does) and answers with, per socket, the
//!   pods that answered and the addresses the answers came from.
//! - `{"cmd":"hold","target":"VIP:PORT","count":N}` connects N TCP sockets one after the
//!   other and keeps them, idle, without a request (for the benchmarks' socket counts).
//! - `{"cmd":"disconnect"}` disconnects every open connected UDP socket (`connect` with
//!   AF_UNSPEC) and keeps it, now unconnected; `{"cmd":"dgram_ask"}` then also sends from
//!   these, to the address they were connected to.
//! - `{"cmd":"answers","bytes":N}` asks for answers of N bytes from then on (`GET /?bytes=N`;
//!   0: the pod's name alone).
//! - `{"cmd":"close"}` closes every open connection.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc, Barrier, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Deserialize)]
struct Command {
    cmd: String,
    target: Option<SocketAddr>,
    #[serde(default)]
    count: usize,
    #[serde(default)]
    proto: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    #[serde(default)]
    bind_ports: Vec<u16>,
    #[serde(default)]
    rounds: usize,
    #[serde(default)]
    rate: u64,
    #[serde(default)]
    v6only: bool,
    #[serde(default)]
    depth: usize,
    #[serde(default)]
    bytes: usize,
}

#[derive(Serialize, Default)]
struct Outcome {
    ok: bool,
    pod: Option<String>,
    peer: Option<String>,
    /// UDP: where the answer came from, as recvmsg reports it.
    from: Option<String>,
    error: Option<String>,
    errno: Option<i32>,
    millis: u64,
}

enum Conn {
    Tcp {
        stream: BufReader<TcpStream>,
        target: SocketAddr,
    },
    Udp(UdpSocket),
    /// A socket whose connect failed, kept open.
    Kept(#[allow(dead_code, reason = "held open, never used")] socket2::Socket),
}

/// An unconnected UDP socket and the address it sends to.
struct Dgram {
    socket: UdpSocket,
    target: SocketAddr,
}

/// What a pacing thread hands back: its connection, requests per pod, reconnects, failures.
type Paced = (Conn, BTreeMap<String, u64>, u64, u64);

/// Background senders started by `pace`.
struct Pacer {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<Paced>>,
}

/// The HTTP request every connection sends (see `answers`).
static REQUEST: RwLock<Vec<u8>> = RwLock::new(Vec::new());

fn request_bytes() -> Vec<u8> {
    let r = REQUEST.read().expect("request lock");
    if r.is_empty() {
        b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n".to_vec()
    } else {
        r.clone()
    }
}

fn main() {
    let mut open: Vec<Conn> = Vec::new();
    let mut dgrams: Vec<Dgram> = Vec::new();
    let mut pacer: Option<Pacer> = None;
    let mut streams: Option<Readers> = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let reply = match serde_json::from_str::<Command>(&line) {
            Err(e) => json!({ "error": e.to_string() }),
            Ok(c) => match c.cmd.as_str() {
                "open" => {
                    let (outcomes, conns) = if c.bind_ports.is_empty() {
                        open_many(&c)
                    } else {
                        open_bound(&c)
                    };
                    open.extend(conns);
                    json!({ "results": outcomes })
                }
                "request" => {
                    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
                    let (mut errors, mut errnos) = (0, Vec::new());
                    for _ in 0..c.rounds {
                        for conn in &mut open {
                            match conn.request() {
                                Ok(pod) => *pods.entry(pod).or_default() += 1,
                                Err(e) => {
                                    errors += 1;
                                    errnos.push(e.raw_os_error());
                                }
                            }
                        }
                    }
                    json!({ "pods": pods, "errors": errors, "errnos": errnos })
                }
                "dgram_open" => match dgram_open(&c) {
                    Ok(more) => {
                        let n = more.len();
                        dgrams.extend(more);
                        json!({ "opened": n })
                    }
                    Err(e) => json!({ "error": e.to_string() }),
                },
                "dgram_ask" => dgram_ask(&dgrams, c.rounds),
                "hold" => {
                    let (mut held, mut errors) = (0, 0);
                    for _ in 0..c.count {
                        match c.target.map(TcpStream::connect) {
                            Some(Ok(stream)) => {
                                open.push(Conn::Tcp {
                                    stream: BufReader::new(stream),
                                    target: c.target.expect("checked"),
                                });
                                held += 1;
                            }
                            _ => errors += 1,
                        }
                    }
                    json!({ "held": held, "errors": errors })
                }
                "churn" => churn(&c),
                "latency" => latency(&c),
                "sendto" => sendto(&c),
                "pace" => {
                    let n = open.len();
                    pacer = Some(pace(
                        std::mem::take(&mut open),
                        c.rate.max(1),
                        c.depth.max(1),
                    ));
                    json!({ "pacing": n })
                }
                "stop" => {
                    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
                    let (mut reconnects, mut failed) = (0, 0);
                    if let Some(p) = pacer.take() {
                        p.stop.store(true, Ordering::Relaxed);
                        for t in p.threads {
                            let (conn, served, again, lost) = t.join().expect("pacer thread");
                            open.push(conn);
                            for (pod, n) in served {
                                *pods.entry(pod).or_default() += n;
                            }
                            reconnects += again;
                            failed += lost;
                        }
                    }
                    json!({ "pods": pods, "reconnects": reconnects, "errors": failed })
                }
                "streams" => match c.target {
                    Some(target) => {
                        streams = Some(read_streams(target, c.count));
                        json!({ "streams": c.count })
                    }
                    None => json!({ "error": "no target" }),
                },
                "streams_stop" => {
                    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
                    let mut cut = 0;
                    if let Some(p) = streams.take() {
                        p.stop.store(true, Ordering::Relaxed);
                        for t in p.threads {
                            let (events, ended) = t.join().expect("stream thread");
                            for (pod, n) in events {
                                *pods.entry(pod).or_default() += n;
                            }
                            cut += ended;
                        }
                    }
                    json!({ "pods": pods, "cut": cut })
                }
                "disconnect" => {
                    let mut n = 0;
                    for conn in std::mem::take(&mut open) {
                        match conn {
                            Conn::Udp(socket) => match disconnect(&socket) {
                                Ok(target) => {
                                    dgrams.push(Dgram { socket, target });
                                    n += 1;
                                }
                                Err(_) => open.push(Conn::Udp(socket)),
                            },
                            other => open.push(other),
                        }
                    }
                    json!({ "disconnected": n })
                }
                "answers" => {
                    *REQUEST.write().expect("request lock") =
                        format!("GET /?bytes={} HTTP/1.1\r\nHost: svc\r\n\r\n", c.bytes)
                            .into_bytes();
                    json!({ "bytes": c.bytes })
                }
                "close" => {
                    let n = open.len();
                    open.clear();
                    json!({ "closed": n })
                }
                other => json!({ "error": format!("unknown command {other}") }),
            },
        };
        println!("{reply}");
        let _ = std::io::stdout().flush();
    }
}

impl Conn {
    fn request(&mut self) -> std::io::Result<String> {
        match self {
            Conn::Tcp { stream, .. } => http_request(stream),
            Conn::Udp(s) => udp_request(s),
            Conn::Kept(_) => Err(std::io::ErrorKind::NotConnected.into()),
        }
    }

    /// Whether the peer has closed (or reset) an idle TCP connection: readable with nothing to
    /// read, as a pooled client's check before reuse sees it.
    fn closed_by_peer(&self) -> bool {
        let Conn::Tcp { stream, .. } = self else {
            return false;
        };
        if !stream.buffer().is_empty() {
            return true; // bytes nobody asked for: not a usable idle connection
        }
        let mut byte = [0u8; 1];
        let fd = stream.get_ref().as_raw_fd();
        // SAFETY: a one-byte peek into our buffer on our own socket.
        let n = unsafe {
            libc::recv(
                fd,
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n == 0
            || (n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
    }

    /// `depth` requests written at once, then their answers read: the pods that answered, and
    /// how many requests failed (every one not answered once something went wrong).
    fn pipelined(&mut self, depth: usize) -> (Vec<String>, u64) {
        let Conn::Tcp { stream, .. } = self else {
            return match self.request() {
                Ok(pod) => (vec![pod], 0),
                Err(_) => (Vec::new(), 1),
            };
        };
        if stream
            .get_mut()
            .write_all(&request_bytes().repeat(depth))
            .is_err()
        {
            return (Vec::new(), depth as u64);
        }
        let mut answered = Vec::new();
        for _ in 0..depth {
            match read_answer(stream) {
                Ok(pod) => answered.push(pod),
                Err(_) => break,
            }
        }
        let lost = (depth - answered.len()) as u64;
        (answered, lost)
    }

    /// Opens the connection again to the same address.
    fn reconnect(&mut self) -> std::io::Result<()> {
        if let Conn::Tcp { stream, target } = self {
            *stream = BufReader::new(TcpStream::connect(*target)?);
        }
        Ok(())
    }
}

fn open_many(c: &Command) -> (Vec<Outcome>, Vec<Conn>) {
    let Some(target) = c.target else {
        return (Vec::new(), Vec::new());
    };
    let udp = c.proto.as_deref() == Some("udp");
    let v6only = c.v6only;
    let timeout = c.timeout_ms.map(Duration::from_millis);
    let barrier = Arc::new(Barrier::new(c.count));
    let handles: Vec<_> = (0..c.count)
        .map(|_| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                if udp {
                    open_udp(target)
                } else if v6only {
                    open_v6only(target)
                } else {
                    open_tcp(target, || match timeout {
                        Some(t) => TcpStream::connect_timeout(&target, t),
                        None => TcpStream::connect(target),
                    })
                }
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    let mut conns = Vec::new();
    for h in handles {
        let (outcome, conn) = h.join().expect("client thread");
        outcomes.push(outcome);
        conns.extend(conn);
    }
    (outcomes, conns)
}

/// An AF_INET6 TCP socket with IPV6_V6ONLY set, connecting to `target`; kept open if the
/// connect fails.
fn open_v6only(target: SocketAddr) -> (Outcome, Option<Conn>) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, None).and_then(|s| {
        s.set_only_v6(true)?;
        Ok(s)
    });
    let failed = |e: std::io::Error| Outcome {
        errno: e.raw_os_error(),
        error: Some(e.to_string()),
        ..Outcome::default()
    };
    match socket {
        Err(e) => (failed(e), None),
        Ok(s) => match s.connect(&target.into()) {
            Ok(()) => open_tcp(target, || Ok(s.into())),
            Err(e) => (failed(e), Some(Conn::Kept(s))),
        },
    }
}

/// One connection per local port, in order. They close with a reset, so the same ports can be
/// used again right away.
fn open_bound(c: &Command) -> (Vec<Outcome>, Vec<Conn>) {
    let Some(target) = c.target else {
        return (Vec::new(), Vec::new());
    };
    let mut outcomes = Vec::new();
    let mut conns = Vec::new();
    for port in &c.bind_ports {
        let (outcome, conn) = open_tcp(target, || {
            use socket2::{Domain, Socket, Type};
            let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.set_linger(Some(Duration::ZERO))?;
            s.bind(&SocketAddr::V4(SocketAddrV4::new([0, 0, 0, 0].into(), *port)).into())?;
            s.connect(&target.into())?;
            Ok(s.into())
        });
        outcomes.push(outcome);
        conns.extend(conn);
    }
    (outcomes, conns)
}

fn open_tcp(
    target: SocketAddr,
    connect: impl FnOnce() -> std::io::Result<TcpStream>,
) -> (Outcome, Option<Conn>) {
    let start = Instant::now();
    let mut outcome = Outcome::default();
    let conn = match connect() {
        Ok(stream) => {
            outcome.peer = stream.peer_addr().ok().map(|a| a.to_string());
            let mut reader = BufReader::new(stream);
            match http_request(&mut reader) {
                Ok(pod) => {
                    outcome.ok = true;
                    outcome.pod = Some(pod);
                }
                Err(e) => outcome.error = Some(e.to_string()),
            }
            Some(Conn::Tcp {
                stream: reader,
                target,
            })
        }
        Err(e) => {
            outcome.errno = e.raw_os_error();
            outcome.error = Some(e.to_string());
            None
        }
    };
    outcome.millis = start.elapsed().as_millis() as u64;
    (outcome, conn)
}

fn open_udp(target: SocketAddr) -> (Outcome, Option<Conn>) {
    let start = Instant::now();
    let mut outcome = Outcome::default();
    let result = (|| -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind(any_address(target))?;
        s.connect(target)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        outcome.peer = s.peer_addr().ok().map(|a| a.to_string());
        s.send(b"hello")?;
        let mut buf = [0u8; 256];
        let (n, from) = s.recv_from(&mut buf)?;
        outcome.pod = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
        outcome.from = Some(from.to_string());
        Ok(s)
    })();
    outcome.millis = start.elapsed().as_millis() as u64;
    match result {
        Ok(s) => {
            outcome.ok = true;
            (outcome, Some(Conn::Udp(s)))
        }
        Err(e) => {
            outcome.errno = e.raw_os_error();
            outcome.error = Some(e.to_string());
            (outcome, None)
        }
    }
}

/// The wildcard address of the target's family: an IPv6 target (including `::ffff:VIP`) gets
/// a dual-mode AF_INET6 socket.
fn any_address(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("address"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("address"),
    }
}

/// One HTTP/1.1 request on a keep-alive connection; returns the body (the pod name).
fn http_request(s: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    s.get_mut().write_all(&request_bytes())?;
    read_answer(s)
}

/// One HTTP/1.1 answer: its body (the pod name).
fn read_answer(s: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut length = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if s.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    s.read_exact(&mut body)?;
    // The pod's name is the first line (what follows pads a large answer).
    let body = String::from_utf8_lossy(&body);
    Ok(body.lines().next().unwrap_or("").trim().to_owned())
}

fn udp_request(s: &UdpSocket) -> std::io::Result<String> {
    s.send(b"hello")?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// One thread per connection, each sending a request every 1/rate seconds until stopped.
fn pace(conns: Vec<Conn>, rate: u64, depth: usize) -> Pacer {
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let n = conns.len().max(1) as u32;
    let threads = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut conn)| {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut served: BTreeMap<String, u64> = BTreeMap::new();
                let (mut reconnects, mut failed) = (0, 0);
                let mut broken = false;
                // Staggered starts, so the connections do not all ask at the same moment.
                let mut next = Instant::now() + interval * i as u32 / n;
                thread::sleep(next.saturating_duration_since(Instant::now()));
                while !stop.load(Ordering::Relaxed) {
                    if broken || conn.closed_by_peer() {
                        match conn.reconnect() {
                            Ok(()) => reconnects += 1,
                            Err(_) => failed += 1,
                        }
                    }
                    let (answered, lost) = conn.pipelined(depth);
                    for pod in answered {
                        *served.entry(pod).or_default() += 1;
                    }
                    failed += lost;
                    broken = lost > 0;
                    next += interval;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                (conn, served, reconnects, failed)
            })
        })
        .collect();
    Pacer { stop, threads }
}

/// Background stream readers: each hands back its events per pod and 1 if it was cut.
struct Readers {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<(BTreeMap<String, u64>, u64)>>,
}

/// `count` server-sent event streams from `target`, opened one after the other (so least-conn
/// places each knowing the others), each then read on its own thread until the stop flag.
fn read_streams(target: SocketAddr, count: usize) -> Readers {
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..count)
        .map(|_| {
            let stop = stop.clone();
            let opened = open_stream(target);
            thread::spawn(move || {
                let mut events: BTreeMap<String, u64> = BTreeMap::new();
                let cut = match opened.and_then(|s| follow_stream(s, &stop, &mut events)) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                (events, cut)
            })
        })
        .collect();
    Readers { stop, threads }
}

fn open_stream(target: SocketAddr) -> std::io::Result<BufReader<TcpStream>> {
    let mut stream = TcpStream::connect(target)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.write_all(b"GET /stream HTTP/1.1\r\nHost: svc\r\n\r\n")?;
    Ok(BufReader::new(stream))
}

/// Reads one stream until `stop`; an error or end of stream before it is a cut stream.
fn follow_stream(
    mut reader: BufReader<TcpStream>,
    stop: &AtomicBool,
    events: &mut BTreeMap<String, u64>,
) -> std::io::Result<()> {
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                if let Some(event) = line.strip_prefix("data: ") {
                    let pod = event.split_whitespace().next().unwrap_or("?");
                    *events.entry(pod.to_owned()).or_default() += 1;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn churn(c: &Command) -> serde_json::Value {
    let Some(target) = c.target else {
        return json!({ "error": "no target" });
    };
    let mut ok = 0;
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for _ in 0..c.count {
        match TcpStream::connect(target) {
            Ok(stream) => {
                let mut r = BufReader::new(stream);
                match http_request(&mut r) {
                    Ok(_) => ok += 1,
                    Err(e) => *errors.entry(e.to_string()).or_default() += 1,
                }
            }
            Err(e) => *errors.entry(e.to_string()).or_default() += 1,
        }
    }
    json!({ "ok": ok, "errors": errors })
}

/// Connect + first byte, one connection after the other.
fn latency(c: &Command) -> serde_json::Value {
    let Some(target) = c.target else {
        return json!({ "error": "no target" });
    };
    let mut micros = Vec::with_capacity(c.count);
    let mut errors = 0;
    let start = Instant::now();
    for _ in 0..c.count {
        let t = Instant::now();
        let result = (|| -> std::io::Result<()> {
            let mut s = TcpStream::connect(target)?;
            s.write_all(b"GET / HTTP/1.0\r\nHost: svc\r\n\r\n")?;
            let mut first = [0u8; 1];
            s.read_exact(&mut first)
        })();
        match result {
            Ok(()) => micros.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => errors += 1,
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    micros.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        micros
            .get(((micros.len() as f64 * p) as usize).min(micros.len().saturating_sub(1)))
            .copied()
    };
    json!({
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "per_second": micros.len() as f64 / elapsed,
        "errors": errors,
    })
}

/// Disconnects a connected UDP socket (`connect` to AF_UNSPEC); returns the address it was
/// connected to, as the application asked for it (getpeername shows the VIP).
fn disconnect(socket: &UdpSocket) -> std::io::Result<SocketAddr> {
    let target = socket.peer_addr()?;
    // SAFETY: a zeroed sockaddr with family AF_UNSPEC, passed with its size.
    let rc = unsafe {
        let mut unspec: libc::sockaddr = std::mem::zeroed();
        unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
        libc::connect(
            socket.as_raw_fd(),
            &raw const unspec,
            size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(target)
}

/// `count` unconnected UDP sockets for `target`, kept for `dgram_ask`.
fn dgram_open(c: &Command) -> std::io::Result<Vec<Dgram>> {
    let target = c.target.ok_or(std::io::ErrorKind::InvalidInput)?;
    (0..c.count)
        .map(|_| {
            let socket = UdpSocket::bind(any_address(target))?;
            socket.set_read_timeout(Some(Duration::from_secs(1)))?;
            Ok(Dgram { socket, target })
        })
        .collect()
}

/// `rounds` datagrams from each kept unconnected socket.
fn dgram_ask(dgrams: &[Dgram], rounds: usize) -> serde_json::Value {
    let sockets: Vec<serde_json::Value> = dgrams
        .iter()
        .map(|d| {
            let (mut pods, mut from, mut unanswered) = (Vec::new(), Vec::new(), 0);
            let mut buf = [0u8; 256];
            for _ in 0..rounds {
                let answer = d
                    .socket
                    .send_to(b"query", d.target)
                    .and_then(|_| d.socket.recv_from(&mut buf));
                match answer {
                    Ok((n, source)) => {
                        pods.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                        from.push(source.to_string());
                    }
                    Err(_) => unanswered += 1,
                }
            }
            json!({ "pods": pods, "from": from, "unanswered": unanswered })
        })
        .collect();
    json!({ "sockets": sockets })
}

/// Unconnected UDP: `rounds` sockets, `count` datagrams each, with `sendto`/`recv_from`.
fn sendto(c: &Command) -> serde_json::Value {
    let Some(target) = c.target else {
        return json!({ "error": "no target" });
    };
    let mut sockets = Vec::new();
    for _ in 0..c.rounds.max(1) {
        let result = (|| -> std::io::Result<(Vec<String>, Vec<String>)> {
            let s = UdpSocket::bind(any_address(target))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let (mut pods, mut from) = (Vec::new(), Vec::new());
            let mut buf = [0u8; 256];
            for _ in 0..c.count {
                s.send_to(b"query", target)?;
                let (n, source) = s.recv_from(&mut buf)?;
                pods.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                from.push(source.to_string());
            }
            Ok((pods, from))
        })();
        sockets.push(match result {
            Ok((pods, from)) => json!({ "pods": pods, "from": from }),
            Err(e) => json!({ "error": e.to_string(), "errno": e.raw_os_error() }),
        });
    }
    json!({ "sockets": sockets })
}
