//! Drives a `socklb-client` process running inside a test's cgroup and network namespace.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::netns::Netns;

/// One connect as the client saw it.
#[derive(Clone, Debug, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    pub pod: Option<String>,
    pub peer: Option<String>,
    pub from: Option<String>,
    pub error: Option<String>,
    pub errno: Option<i32>,
    pub millis: u64,
}

pub struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    /// Starts a client in `netns`, and in `cgroup` if given (outside it, socklb leaves its
    /// connections alone).
    pub fn spawn(netns: &Netns, cgroup: Option<&Path>) -> Result<Client> {
        let mut command = Command::new(crate::bin("socklb-client"));
        command.stdin(Stdio::piped()).stdout(Stdio::piped());
        place(&mut command, netns, cgroup)?;
        let mut child = command.spawn().context("starting socklb-client")?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Client {
            child,
            stdin,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn call(&mut self, command: Value) -> Result<Value> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("socklb-client exited");
        }
        let reply: Value = serde_json::from_str(&line)?;
        if let Some(e) = reply.get("error") {
            bail!("socklb-client: {e}");
        }
        Ok(reply)
    }

    /// Opens `count` TCP connections at once and keeps them. The socket's family is the
    /// target's: `[::ffff:VIP]:port` is an AF_INET6 socket to an IPv4 address, as Java's.
    pub fn open(&mut self, target: impl Into<SocketAddr>, count: usize) -> Result<Vec<Outcome>> {
        let target = target.into();
        self.open_with(json!({ "cmd": "open", "target": target.to_string(), "count": count }))
    }

    /// Opens `count` TCP connections one after the other. Least-conn is exact this way; a
    /// burst from several CPUs is only even to within one (two connects can see the same
    /// least-loaded pod at the same moment).
    pub fn open_one_by_one(
        &mut self,
        target: impl Into<SocketAddr>,
        count: usize,
    ) -> Result<Vec<Outcome>> {
        let target = target.into();
        let mut all = Vec::new();
        for _ in 0..count {
            all.extend(self.open(target, 1)?);
        }
        Ok(all)
    }

    /// Opens `count` connections with extra options (`proto`, `timeout_ms`).
    pub fn open_with(&mut self, command: Value) -> Result<Vec<Outcome>> {
        let reply = self.call(command)?;
        Ok(serde_json::from_value(reply["results"].clone())?)
    }

    /// Sends `rounds` requests on every open connection; requests per pod.
    pub fn requests(&mut self, rounds: usize) -> Result<BTreeMap<String, u64>> {
        let r = self.try_requests(rounds)?;
        if r.errors != 0 {
            bail!("requests failed: {r:?}");
        }
        Ok(r.pods)
    }

    /// Like `requests`, reporting failures instead of failing.
    pub fn try_requests(&mut self, rounds: usize) -> Result<Requests> {
        let reply = self.call(json!({ "cmd": "request", "rounds": rounds }))?;
        Ok(serde_json::from_value(reply)?)
    }

    /// Makes `count` unconnected UDP sockets for `target`, kept for `dgram_ask`.
    pub fn dgram_open(&mut self, target: impl Into<SocketAddr>, count: usize) -> Result<()> {
        let target = target.into();
        self.call(json!({ "cmd": "dgram_open", "target": target.to_string(), "count": count }))
            .map(drop)
    }

    /// Disconnects every open connected UDP socket (`connect(AF_UNSPEC)`); they become kept
    /// unconnected sockets that `dgram_ask` sends from, to the address they were connected
    /// to. Returns how many.
    pub fn disconnect(&mut self) -> Result<u64> {
        let reply = self.call(json!({ "cmd": "disconnect" }))?;
        Ok(reply["disconnected"].as_u64().unwrap_or(0))
    }

    /// `rounds` datagrams (`sendto`) from each kept unconnected socket, in order of creation.
    pub fn dgram_ask(&mut self, rounds: usize) -> Result<Vec<Datagrams>> {
        let reply = self.call(json!({ "cmd": "dgram_ask", "rounds": rounds }))?;
        Ok(serde_json::from_value(reply["sockets"].clone())?)
    }

    /// `count` connect-request-close cycles; returns (successes, errors by message).
    pub fn churn(
        &mut self,
        target: impl Into<SocketAddr>,
        count: usize,
    ) -> Result<(u64, BTreeMap<String, u64>)> {
        let target = target.into();
        let reply =
            self.call(json!({ "cmd": "churn", "target": target.to_string(), "count": count }))?;
        Ok((
            reply["ok"].as_u64().unwrap_or(0),
            serde_json::from_value(reply["errors"].clone())?,
        ))
    }

    /// Asks for answers of `bytes` bytes from now on (0: the pod's name alone).
    pub fn answers(&mut self, bytes: usize) -> Result<()> {
        self.call(json!({ "cmd": "answers", "bytes": bytes }))
            .map(drop)
    }

    /// Starts `rate` requests per second on every open connection, until `stop_pacing`.
    pub fn pace(&mut self, rate: u64) -> Result<()> {
        self.pace_pipelined(rate, 1)
    }

    /// Like `pace`, with `depth` requests pipelined per turn.
    pub fn pace_pipelined(&mut self, rate: u64, depth: usize) -> Result<()> {
        self.call(json!({ "cmd": "pace", "rate": rate, "depth": depth }))
            .map(drop)
    }

    /// Opens `count` server-sent event streams, read in the background until `stop_streams`.
    pub fn streams(&mut self, target: impl Into<SocketAddr>, count: usize) -> Result<()> {
        let target = target.into();
        self.call(json!({ "cmd": "streams", "target": target.to_string(), "count": count }))
            .map(drop)
    }

    /// Stops reading the streams: events per pod, and how many streams were cut.
    pub fn stop_streams(&mut self) -> Result<(BTreeMap<String, u64>, u64)> {
        let reply = self.call(json!({ "cmd": "streams_stop" }))?;
        Ok((
            serde_json::from_value(reply["pods"].clone())?,
            reply["cut"].as_u64().unwrap_or(0),
        ))
    }

    /// Stops pacing; returns what the pacing did.
    pub fn stop_pacing(&mut self) -> Result<Paced> {
        let reply = self.call(json!({ "cmd": "stop" }))?;
        Ok(Paced {
            pods: serde_json::from_value(reply["pods"].clone())?,
            reconnects: reply["reconnects"].as_u64().unwrap_or(0),
            failed: reply["errors"].as_u64().unwrap_or(0),
        })
    }

    /// Opens one connection per local port, in order (see socklb-client).
    pub fn open_bound(
        &mut self,
        target: impl Into<SocketAddr>,
        ports: &[u16],
    ) -> Result<Vec<Outcome>> {
        let target = target.into();
        self.open_with(json!({ "cmd": "open", "target": target.to_string(), "bind_ports": ports }))
    }

    /// `count` connect + first-byte round trips (HTTP/1.0) one after another.
    pub fn latency(&mut self, target: impl Into<SocketAddr>, count: usize) -> Result<Latency> {
        let target = target.into();
        let reply =
            self.call(json!({ "cmd": "latency", "target": target.to_string(), "count": count }))?;
        if reply["errors"].as_u64() != Some(0) {
            bail!("connects failed: {reply}");
        }
        Ok(Latency {
            p50_us: reply["p50_us"].as_f64().unwrap_or(0.0),
            p99_us: reply["p99_us"].as_f64().unwrap_or(0.0),
            per_second: reply["per_second"].as_f64().unwrap_or(0.0),
        })
    }

    /// `rounds` unconnected UDP sockets each sending `count` datagrams to `target`; per socket
    /// the pods that answered and where the answers came from.
    pub fn sendto(
        &mut self,
        target: impl Into<SocketAddr>,
        rounds: usize,
        count: usize,
    ) -> Result<Vec<(Vec<String>, Vec<String>)>> {
        let target = target.into();
        let reply = self.call(json!({ "cmd": "sendto", "target": target.to_string(), "rounds": rounds, "count": count }))?;
        let mut out = Vec::new();
        for s in reply["sockets"].as_array().cloned().unwrap_or_default() {
            if let Some(e) = s.get("error") {
                bail!("sendto: {e}");
            }
            out.push((
                serde_json::from_value(s["pods"].clone())?,
                serde_json::from_value(s["from"].clone())?,
            ));
        }
        Ok(out)
    }

    /// Connects `count` TCP sockets one after the other and keeps them idle; how many.
    pub fn hold(&mut self, target: impl Into<SocketAddr>, count: usize) -> Result<u64> {
        let target = target.into();
        let reply =
            self.call(json!({ "cmd": "hold", "target": target.to_string(), "count": count }))?;
        if reply["errors"].as_u64() != Some(0) {
            bail!("connects failed: {reply}");
        }
        Ok(reply["held"].as_u64().unwrap_or(0))
    }

    pub fn close_all(&mut self) -> Result<u64> {
        let reply = self.call(json!({ "cmd": "close" }))?;
        Ok(reply["closed"].as_u64().unwrap_or(0))
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `try_requests` saw.
#[derive(Clone, Debug, Deserialize)]
pub struct Requests {
    pub pods: BTreeMap<String, u64>,
    pub errors: u64,
    /// The errno of each failure (None for an end of stream).
    pub errnos: Vec<Option<i32>>,
}

/// What one kept unconnected UDP socket got back.
#[derive(Clone, Debug, Deserialize)]
pub struct Datagrams {
    /// The pod that answered each datagram.
    pub pods: Vec<String>,
    /// Where each answer came from (recvmsg's source address).
    pub from: Vec<String>,
    pub unanswered: u64,
}

/// Connect + first byte latency and rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p99_us: f64,
    pub per_second: f64,
}

/// What a client's pacing did: requests per pod, connections reopened after the server side
/// closed them while idle, requests that failed (never retried).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paced {
    pub pods: BTreeMap<String, u64>,
    pub reconnects: u64,
    pub failed: u64,
}

/// Makes `command` start inside `netns`, and inside `cgroup` if given: where a client pod's
/// processes run.
pub fn place(command: &mut Command, netns: &Netns, cgroup: Option<&Path>) -> Result<()> {
    let ns = netns.fd().try_clone_to_owned()?;
    let procs = cgroup.map(crate::cgroup::procs_file).transpose()?;
    // SAFETY: between fork and exec only async-signal-safe calls on fds opened before.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &procs {
                crate::cgroup::join_from_child(procs)?;
            }
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Pod name -> number of outcomes that reached it.
pub fn per_pod(outcomes: &[Outcome]) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for o in outcomes {
        if let Some(pod) = &o.pod {
            *m.entry(pod.clone()).or_default() += 1;
        }
    }
    m
}

/// Connects made one at a time, in order, that each went to a pod with the fewest connections
/// so far among `pods` (least-conn's exact choice when nothing else holds connections): `Err`
/// names the first that did not.
pub fn least_loaded_each_time(pods: &[String], outcomes: &[Outcome]) -> Result<(), String> {
    let mut load: BTreeMap<&str, u64> = pods.iter().map(|p| (p.as_str(), 0)).collect();
    for (i, o) in outcomes.iter().enumerate() {
        let pod = o
            .pod
            .as_deref()
            .ok_or(format!("connect {i} failed: {o:?}"))?;
        let fewest = load.values().copied().min().unwrap_or(0);
        match load.get(pod).copied() {
            Some(n) if n == fewest => *load.get_mut(pod).expect("present") += 1,
            Some(n) => {
                return Err(format!(
                    "connect {i} went to {pod} with {n} while a pod had {fewest}: {load:?}"
                ));
            }
            None => return Err(format!("connect {i} went to {pod}, not one of {pods:?}")),
        }
    }
    Ok(())
}
