//! Real client stacks the tests drive, where users' clients react differently from our own
//! `socklb-client`: a JVM (tests/clients/PoolClient.java, java.net.http.HttpClient with the
//! runtime's defaults) and gRPC's C-core (tests/clients/grpc_channels.py, Debian's
//! python3-grpcio), with gRPC pods to talk to (grpc_pod.py). Each client runs inside a test's
//! network namespace and cgroup and reports JSON lines on its standard output.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

use crate::{client::place, netns::Netns};

/// Debian's Python, which has python3-grpcio (the one on PATH may be another).
const PYTHON: &str = "/usr/bin/python3";

/// A program speaking one JSON line per round.
struct LineProgram {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl LineProgram {
    fn spawn(mut command: Command, netns: &Netns, cgroup: &Path, what: &str) -> Result<Self> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        place(&mut command, netns, Some(cgroup))?;
        let mut child = command
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        Ok(LineProgram {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            what: what.to_owned(),
        })
    }

    fn read<T: for<'de> Deserialize<'de>>(&mut self) -> Result<T> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let mut err = String::new();
            if let Some(mut e) = self.child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            bail!("{} ended: {err}", self.what);
        }
        serde_json::from_str(&line).with_context(|| format!("{}: {line:?}", self.what))
    }

    /// Reads lines until one is `word`.
    fn expect(&mut self, word: &str) -> Result<()> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{} ended before saying {word:?}: {err}", self.what);
            }
            if line.trim() == word {
                return Ok(());
            }
        }
    }

    fn next(&mut self) -> Result<()> {
        let stdin = self.stdin.as_mut().context("input already closed")?;
        writeln!(stdin)?;
        stdin.flush()?;
        Ok(())
    }

    /// Closes its input and waits for it to end.
    fn finish(&mut self) -> Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait()?;
        if !status.success() {
            bail!("{} exited with {status}", self.what);
        }
        Ok(())
    }
}

impl Drop for LineProgram {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one round of requests did.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Round {
    /// Requests answered per pod (by the pod's name).
    pub pods: BTreeMap<String, u64>,
    /// Requests that failed (never retried).
    pub failed: u64,
}

/// A JVM HttpClient holding a pool of `n` keep-alive connections to `url`.
pub struct JvmPool(LineProgram);

impl JvmPool {
    /// Starts it and runs the first round (which opens the pool's connections).
    pub fn start(netns: &Netns, cgroup: &Path, url: &str, n: usize) -> Result<(JvmPool, Round)> {
        let mut command = Command::new("java");
        command
            .arg(source("PoolClient.java"))
            .arg(url)
            .arg(n.to_string());
        let mut program = LineProgram::spawn(command, netns, cgroup, "java PoolClient")?;
        let first = program.read()?;
        Ok((JvmPool(program), first))
    }

    /// Another round on the pooled connections.
    pub fn round(&mut self) -> Result<Round> {
        self.0.next()?;
        self.0.read()
    }

    /// Ends the JVM (and with it the pool's connections).
    pub fn finish(mut self) -> Result<()> {
        self.0.finish()
    }
}

/// A gRPC pod: grpc_pod.py answering with its name on `addr`, inside `netns`; it ends when
/// this is dropped.
pub struct GrpcPod {
    _process: LineProgram,
}

impl GrpcPod {
    pub fn start(netns: &Netns, name: &str, addr: SocketAddr) -> Result<GrpcPod> {
        netns.add_address(addr.ip())?;
        let mut command = netns.command(PYTHON);
        command
            .arg(source("grpc_pod.py"))
            .args([name, &addr.ip().to_string(), &addr.port().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting grpc_pod.py")?;
        let mut program = LineProgram {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().expect("piped")),
            child,
            what: format!("gRPC pod {name}"),
        };
        program.expect("ready")?;
        Ok(GrpcPod { _process: program })
    }
}

/// What the gRPC channels did.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Calls {
    pub calls: u64,
    /// Calls that failed, for any reason (none is retried).
    pub failed: u64,
    /// Calls answered per pod.
    pub pods: BTreeMap<String, u64>,
    /// The first few failures.
    pub errors: Vec<String>,
}

/// gRPC C-core channels (grpc.aio, default options), each calling every `period_ms`.
pub struct GrpcChannels(LineProgram);

impl GrpcChannels {
    pub fn start(
        netns: &Netns,
        cgroup: &Path,
        target: SocketAddr,
        channels: usize,
        period_ms: u64,
    ) -> Result<GrpcChannels> {
        let mut command = Command::new(PYTHON);
        command
            .arg(source("grpc_channels.py"))
            .arg(target.to_string())
            .args([channels.to_string(), period_ms.to_string()]);
        let mut program = LineProgram::spawn(command, netns, cgroup, "grpc_channels.py")?;
        program.expect("started")?;
        Ok(GrpcChannels(program))
    }

    /// Stops the calls and closes the channels; what they did.
    pub fn finish(mut self) -> Result<Calls> {
        drop(self.0.stdin.take());
        let calls = self.0.read()?;
        self.0.finish()?;
        Ok(calls)
    }
}

/// A client program's source under tests/clients.
fn source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join(name)
}
