//! Real server software as pods, for the benchmarks: nginx (HTTP/1.1 on 8080 and HTTP/2
//! cleartext on 8081) and redis-server (6379), each a process inside the test namespace bound
//! to its pod address. Their own statistics (nginx stub_status, redis INFO) are read over a
//! connection made from inside the namespace, outside socklb's cgroup, so reading them neither
//! goes through a balancer nor counts as load (the reads are subtracted).

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{netns::Netns, wait_for};

pub const HTTP_PORT: u16 = 8080;
pub const H2C_PORT: u16 = 8081;
pub const REDIS_PORT: u16 = 6379;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nginx,
    Redis,
}

/// What a server reports about itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Load {
    /// Client connections open now.
    pub connections: u64,
    /// Requests (commands for redis) served since it started.
    pub requests: u64,
}

pub struct ServerPod {
    pub ip: IpAddr,
    pub kind: Kind,
    child: Child,
    dir: PathBuf,
    /// Stats reads made so far: each counts as one request on the server.
    reads: AtomicU64,
}

impl ServerPod {
    pub fn start(netns: &Netns, kind: Kind, ip: impl Into<IpAddr>) -> Result<ServerPod> {
        let ip = ip.into();
        netns.add_address(ip)?;
        let dir = std::env::temp_dir().join(crate::unique("srv"));
        fs::create_dir_all(&dir)?;
        let mut command = match kind {
            Kind::Nginx => {
                let conf = dir.join("nginx.conf");
                fs::write(&conf, nginx_conf(ip, &dir))?;
                let mut c = netns.command("nginx");
                c.arg("-p").arg(&dir).arg("-c").arg(&conf);
                c
            }
            Kind::Redis => {
                let mut c = netns.command("redis-server");
                c.args(["--bind", &ip.to_string(), "--port", &REDIS_PORT.to_string()])
                    .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
                    .args(["--daemonize", "no", "--maxclients", "10000"])
                    .arg("--dir")
                    .arg(&dir);
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {kind:?} on {ip}"))?;
        let pod = ServerPod {
            ip,
            kind,
            child,
            dir,
            reads: AtomicU64::new(0),
        };
        wait_for(
            &format!("{kind:?} on {ip} to answer"),
            Duration::from_secs(10),
            || Ok(pod.load(netns).ok()),
        )?;
        Ok(pod)
    }

    pub fn port(&self) -> u16 {
        match self.kind {
            Kind::Nginx => HTTP_PORT,
            Kind::Redis => REDIS_PORT,
        }
    }

    /// The server's own counts, without the reads themselves.
    pub fn load(&self, netns: &Netns) -> Result<Load> {
        let addr = SocketAddr::new(self.ip, self.port());
        let kind = self.kind;
        let text = netns.run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            match kind {
                Kind::Nginx => s.write_all(b"GET /status HTTP/1.0\r\n\r\n")?,
                Kind::Redis => s.write_all(b"*1\r\n$4\r\nINFO\r\n")?,
            }
            read_reply(s, kind)
        })?;
        let before = self.reads.fetch_add(1, Ordering::Relaxed);
        let (connections, requests) = match self.kind {
            Kind::Nginx => parse_stub_status(&text)?,
            Kind::Redis => parse_info(&text)?,
        };
        // The read's own connection is open while it is counted; earlier reads were requests
        // (nginx counts this one too, redis counts a command once it is done).
        let own = match self.kind {
            Kind::Nginx => before + 1,
            Kind::Redis => before,
        };
        Ok(Load {
            connections: connections.saturating_sub(1),
            requests: requests.saturating_sub(own),
        })
    }
}

fn read_reply(s: TcpStream, kind: Kind) -> std::io::Result<String> {
    let mut text = String::new();
    match kind {
        Kind::Nginx => {
            BufReader::new(s).read_to_string(&mut text)?;
        }
        Kind::Redis => {
            // A bulk string: "$<len>\r\n<body>\r\n".
            let mut r = BufReader::new(s);
            let mut header = String::new();
            r.read_line(&mut header)?;
            let len: usize = header.trim().trim_start_matches('$').parse().unwrap_or(0);
            let mut body = vec![0; len];
            r.read_exact(&mut body)?;
            text = String::from_utf8_lossy(&body).into_owned();
        }
    }
    Ok(text)
}

/// "Active connections: 3 \nserver accepts handled requests\n 10 10 100 \n..."
fn parse_stub_status(text: &str) -> Result<(u64, u64)> {
    let body = text.split("\r\n\r\n").nth(1).unwrap_or(text);
    let mut lines = body.lines();
    let active = lines
        .next()
        .and_then(|l| l.strip_prefix("Active connections:"))
        .and_then(|v| v.trim().parse().ok());
    let requests = lines
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(2)?.parse().ok());
    match (active, requests) {
        (Some(a), Some(r)) => Ok((a, r)),
        _ => bail!("unexpected stub_status answer: {text:?}"),
    }
}

fn parse_info(text: &str) -> Result<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    match (
        field("connected_clients:"),
        field("total_commands_processed:"),
    ) {
        (Some(c), Some(r)) => Ok((c, r)),
        _ => bail!("unexpected INFO answer"),
    }
}

/// One worker, no master, in the foreground: one process per pod to start and stop.
fn nginx_conf(ip: IpAddr, dir: &std::path::Path) -> String {
    let d = dir.display();
    // nginx wants IPv6 listen addresses in brackets.
    let ip = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    };
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  keepalive_requests 1000000;\n  keepalive_timeout 300s;\n  http2_max_requests 1000000;\n\
         \x20 server {{\n    listen {ip}:{HTTP_PORT};\n    listen {ip}:{H2C_PORT} http2;\n    location = /status {{ stub_status; }}\n    location / {{ return 200 \"pod {ip}\\n\"; }}\n  }}\n}}\n"
    )
}

impl Drop for ServerPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stub_status_and_info_are_read() {
        let status = "HTTP/1.1 200 OK\r\nServer: nginx\r\n\r\nActive connections: 5 \nserver accepts handled requests\n 12 12 340 \nReading: 0 Writing: 1 Waiting: 4 \n";
        assert_eq!(parse_stub_status(status).unwrap(), (5, 340));
        let info = "# Clients\r\nconnected_clients:7\r\n# Stats\r\ntotal_commands_processed:99\r\n";
        assert_eq!(parse_info(info).unwrap(), (7, 99));
    }
}
