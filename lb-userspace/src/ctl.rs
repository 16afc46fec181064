//! socklbctl: what is programmed, read from the pinned maps (so it works while the agent is
//! stopped); only `pod list` asks the running agent, which alone knows the node's pods. Each
//! command builds rows of named columns; the same rows print as an aligned table, as JSON
//! (`-j`) or as pretty JSON (`-p`), like bpftool.

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result, bail};
use lb_common::{ServiceName, SlotKey, backend_state, map_names, service_flags};
use serde_json::{Map, Value, json};

use crate::{
    datapath::{self, Maps, Tools},
    programmed::{algorithm_of, backend_addr, frontend_key, name_str},
    sockets,
};

/// One output row: column name -> value, in column order.
pub type Row = Map<String, Value>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    PrettyJson,
}

pub fn render(rows: &[Row], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string(rows).expect("rows serialise") + "\n",
        Format::PrettyJson => serde_json::to_string_pretty(rows).expect("rows serialise") + "\n",
        Format::Table => table(rows),
    }
}

/// Aligned columns with an upper-case header; numbers right-aligned.
fn table(rows: &[Row]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let columns: Vec<&String> = first.keys().collect();
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(&r[*c]).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let mut out = String::new();
    let line = |out: &mut String, cells: Vec<(String, bool)>| {
        let mut l = String::new();
        for (i, ((text, right), w)) in cells.into_iter().zip(&widths).enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            if right {
                let _ = write!(l, "{text:>w$}");
            } else {
                let _ = write!(l, "{text:<w$}");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(
        &mut out,
        columns.iter().map(|c| (c.to_uppercase(), false)).collect(),
    );
    for r in rows {
        line(
            &mut out,
            columns
                .iter()
                .map(|c| (cell(&r[*c]), r[*c].is_number()))
                .collect(),
        );
    }
    out
}

fn row(pairs: Vec<(&str, Value)>) -> Row {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// Rows of a map keyed by (service id, index) with backend ids as values (SLOTS, MAGLEV).
fn slot_rows(map: &std::collections::BTreeMap<SlotKey, u32>) -> Vec<Row> {
    map.iter()
        .map(|(k, id)| {
            row(vec![
                ("service_id", json!(k.service_id)),
                ("index", json!(k.index)),
                ("backend_id", json!(id)),
            ])
        })
        .collect()
}

fn service_label(name: Option<&ServiceName>) -> (String, String) {
    match name {
        Some(n) => (
            format!("{}/{}", name_str(&n.namespace), name_str(&n.name)),
            name_str(&n.port_name),
        ),
        None => ("?".into(), String::new()),
    }
}

/// `service list`: one row per Service port.
pub fn service_list(maps: &Maps) -> Result<Vec<Row>> {
    let p = maps.read_programmed()?;
    let mut rows = Vec::new();
    for (key, service) in p.services() {
        let (name, port_name) = service_label(p.names().get(&service.id));
        let frontend = frontend_key(key).map_or_else(|| "?".into(), |k| k.to_string());
        let connections: u64 = p
            .backends()
            .iter()
            .filter(|(_, b)| b.service_id == service.id)
            .map(|(id, _)| maps.connections(*id))
            .sum();
        let stats = maps.stats(service.id);
        let rebalance = service.flags & service_flags::REBALANCE != 0;
        rows.push(row(vec![
            ("service", json!(name)),
            ("port_name", json!(port_name)),
            ("frontend", json!(frontend)),
            ("algorithm", json!(algorithm_of(service).name())),
            (
                "affinity_s",
                json!((service.affinity_timeout > 0).then_some(service.affinity_timeout)),
            ),
            ("rebalance", json!(if rebalance { "on" } else { "off" })),
            ("backends", json!(service.count)),
            ("connections", json!(connections)),
            ("connects", json!(stats.connects)),
            ("refused", json!(stats.refused)),
            ("rebalanced", json!(maps.rebalance_stats(service.id).closed)),
            ("id", json!(service.id)),
        ]));
    }
    rows.sort_by_key(|r| (r["service"].to_string(), r["frontend"].to_string()));
    Ok(rows)
}

/// `backend list`: one row per backend, draining ones included, with live connections.
pub fn backend_list(maps: &Maps) -> Result<Vec<Row>> {
    let p = maps.read_programmed()?;
    let frontends: std::collections::BTreeMap<u32, String> = p
        .services()
        .iter()
        .filter_map(|(k, s)| Some((s.id, frontend_key(k)?.to_string())))
        .collect();
    let windows: std::collections::BTreeMap<u32, u64> = p
        .services()
        .values()
        .map(|s| (s.id, u64::from(s.slow_start_ms) * 1_000_000))
        .collect();
    let now_ns = crate::bpf_sys::monotonic_ns();
    let underflows = maps.underflows();
    let mut rows = Vec::new();
    for (id, b) in p.backends() {
        // Time left in its slow start, if it is ramping up.
        let window_ns = windows.get(&b.service_id).copied().unwrap_or(0);
        let ends_ns = b.since_ns + window_ns;
        let slow_start_left_ms =
            (b.since_ns != 0 && b.state == backend_state::ACTIVE && ends_ns > now_ns)
                .then(|| (ends_ns - now_ns) / 1_000_000);
        let (name, port_name) = service_label(p.names().get(&b.service_id));
        let addr = backend_addr(b);
        let state = if b.state == backend_state::ACTIVE {
            "active"
        } else {
            "draining"
        };
        rows.push(row(vec![
            ("service", json!(name)),
            ("port_name", json!(port_name)),
            ("frontend", json!(frontends.get(&b.service_id))),
            ("ip", json!(addr.ip().to_string())),
            ("port", json!(addr.port())),
            ("state", json!(state)),
            ("connections", json!(maps.connections(*id))),
            ("slow_start_left_ms", json!(slow_start_left_ms)),
            // Decrements the programs refused because the count was already zero: a count
            // that went wrong somewhere (never expected).
            (
                "underflows",
                json!(underflows.get(id).copied().unwrap_or(0)),
            ),
            ("id", json!(id)),
        ]));
    }
    rows.sort_by_key(|r| {
        (
            r["service"].to_string(),
            r["port_name"].to_string(),
            r["ip"]
                .as_str()
                .and_then(|ip| ip.parse::<std::net::IpAddr>().ok()),
            r["port"].as_u64(),
        )
    });
    Ok(rows)
}

/// `rebalance list`: for each Service that opted in, the live connections per backend and
/// what rebalancing has closed.
pub fn rebalance_list(maps: &Maps) -> Result<Vec<Row>> {
    let p = maps.read_programmed()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut rows = Vec::new();
    for (key, service) in p.services() {
        if service.flags & service_flags::REBALANCE == 0 {
            continue;
        }
        let (name, port_name) = service_label(p.names().get(&service.id));
        let counts: Vec<u64> = (0..service.count)
            .filter_map(|index| {
                p.slots().get(&SlotKey {
                    service_id: service.id,
                    index,
                })
            })
            .map(|id| maps.connections(*id))
            .collect();
        let r = maps.rebalance_stats(service.id);
        rows.push(row(vec![
            ("service", json!(name)),
            ("port_name", json!(port_name)),
            ("frontend", json!(frontend_key(key).map(|k| k.to_string()))),
            (
                "connections",
                json!(
                    counts
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("/")
                ),
            ),
            ("closed", json!(r.closed)),
            ("rounds", json!(r.rounds)),
            ("largest_round", json!(r.largest_round)),
            ("errors", json!(r.errors)),
            (
                "last_s_ago",
                json!((r.last_unix > 0).then(|| now.saturating_sub(r.last_unix))),
            ),
        ]));
    }
    Ok(rows)
}

/// `socket list`: every socket socklb assigned, from the socket iterator.
pub fn socket_list(maps: &Maps, pin_path: &Path) -> Result<Vec<Row>> {
    let p = maps.read_programmed()?;
    let tools = Tools::open(pin_path)?;
    let mut rows: Vec<Row> = tools
        .sockets
        .list()?
        .into_iter()
        .map(|r| {
            let s = &r.state;
            let (name, port_name) = service_label(p.names().get(&s.service_id));
            let (local, peer) = sockets::endpoints(s);
            let proto = match s.protocol {
                lb_common::IPPROTO_TCP => "TCP",
                lb_common::IPPROTO_UDP => "UDP",
                _ => "?",
            };
            let family = if i32::from(s.family) == libc::AF_INET6 {
                "inet6"
            } else {
                "inet"
            };
            row(vec![
                ("service", json!(name)),
                ("port_name", json!(port_name)),
                ("proto", json!(proto)),
                ("family", json!(family)),
                // The local side of a UDP socket is not recorded.
                (
                    "local",
                    json!((s.local_port != 0).then(|| local.to_string())),
                ),
                ("backend", json!(peer.to_string())),
                ("backend_id", json!(s.backend_id)),
                ("netns", json!(s.netns)),
                ("cookie", json!(r.cookie)),
            ])
        })
        .collect();
    rows.sort_by_key(|r| {
        (
            r["service"].to_string(),
            r["backend"].to_string(),
            r["cookie"].as_u64(),
        )
    });
    Ok(rows)
}

/// `map dump NAME`: the decoded entries of one map.
pub fn map_dump(maps: &Maps, name: &str) -> Result<Vec<Row>> {
    let p = maps.read_programmed()?;
    let rows = match name {
        map_names::SERVICES => p
            .services()
            .iter()
            .map(|(k, s)| {
                row(vec![
                    ("key", json!(frontend_key(k).map(|k| k.to_string()))),
                    ("id", json!(s.id)),
                    ("count", json!(s.count)),
                    ("algorithm", json!(algorithm_of(s).name())),
                ])
            })
            .collect(),
        map_names::SLOTS => slot_rows(p.slots()),
        map_names::BACKENDS => p
            .backends()
            .iter()
            .map(|(id, b)| {
                row(vec![
                    ("id", json!(id)),
                    ("addr", json!(backend_addr(b).to_string())),
                    ("state", json!(b.state)),
                    ("service_id", json!(b.service_id)),
                ])
            })
            .collect(),
        map_names::SERVICE_NAMES => p
            .names()
            .iter()
            .map(|(id, n)| {
                row(vec![
                    ("id", json!(id)),
                    ("namespace", json!(name_str(&n.namespace))),
                    ("name", json!(name_str(&n.name))),
                    ("port_name", json!(name_str(&n.port_name))),
                ])
            })
            .collect(),
        // Arrays: only the entries in use (a backend or service refers to them).
        map_names::CONN_COUNTS => p
            .backends()
            .keys()
            .map(|id| {
                row(vec![
                    ("backend_id", json!(id)),
                    ("connections", json!(maps.connections(*id))),
                ])
            })
            .collect(),
        map_names::SERVICE_STATS => p
            .services()
            .values()
            .map(|s| {
                let st = maps.stats(s.id);
                row(vec![
                    ("service_id", json!(s.id)),
                    ("connects", json!(st.connects)),
                    ("refused", json!(st.refused)),
                ])
            })
            .collect(),
        map_names::MAGLEV => slot_rows(p.maglev()),
        map_names::AFFINITY => maps
            .affinity
            .iter()
            .filter_map(Result::ok)
            .map(|(k, a)| {
                row(vec![
                    ("service_id", json!(k.service_id)),
                    ("client_netns_cookie", json!(k.client)),
                    ("backend_id", json!(a.backend_id)),
                    ("last_used_ns", json!(a.last_used_ns)),
                ])
            })
            .collect(),
        map_names::REBALANCE_STATS => p
            .services()
            .values()
            .map(|s| {
                let r = maps.rebalance_stats(s.id);
                row(vec![
                    ("service_id", json!(s.id)),
                    ("closed", json!(r.closed)),
                    ("rounds", json!(r.rounds)),
                    ("largest_round", json!(r.largest_round)),
                    ("last_unix", json!(r.last_unix)),
                    ("errors", json!(r.errors)),
                ])
            })
            .collect(),
        map_names::RR_CURSORS => {
            bail!("{name} holds per-CPU round-robin positions; nothing to show")
        }
        map_names::UDP_PEERS => bail!(
            "{name} is socket-local storage of unconnected UDP sockets, which the agent does not \
             iterate; see `socket list` for the assigned sockets"
        ),
        map_names::EVENTS => {
            let events = maps.events()?;
            vec![row(vec![
                ("changes_started", json!(events.started)),
                ("changes_finished", json!(events.finished)),
            ])]
        }
        map_names::V6ONLY => bail!(
            "{name} is socket-local storage (which IPv6 sockets set IPV6_V6ONLY); nothing to list"
        ),
        map_names::COUNT_UNDERFLOWS => maps
            .underflows()
            .into_iter()
            .map(|(id, n)| row(vec![("backend_id", json!(id)), ("underflows", json!(n))]))
            .collect(),
        other => bail!(
            "unknown map {other:?} (maps: {})",
            map_names::ALL.join(", ")
        ),
    };
    Ok(rows)
}

/// `pod list`: the node's pods as the agent at `status_address` sees them (its `/pods`).
pub fn pod_list(status_address: &str) -> Result<Vec<Row>> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(status_address)
        .with_context(|| format!("asking the agent at {status_address} (--status-address)"))?;
    write!(
        stream,
        "GET /pods HTTP/1.0\r\nHost: {status_address}\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!(
            "the agent at {status_address} answered {:?} (is it in Kubernetes mode?)",
            head.lines().next().unwrap_or("")
        );
    }
    serde_json::from_str(body).context("reading the agent's /pods")
}

/// `prog show`: the attached programs, their links and run statistics.
pub fn prog_show(pin_path: &Path) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for a in datapath::attached_programs(pin_path)? {
        let p = a.program.as_ref();
        rows.push(row(vec![
            ("name", json!(a.name)),
            ("link_id", json!(a.link.link_id)),
            ("prog_id", json!(a.link.prog_id)),
            ("tag", json!(p.map(|p| format!("{:016x}", p.tag())))),
            ("cgroup_id", json!(a.link.cgroup_id)),
            ("xlated_bytes", json!(p.and_then(|p| p.size_translated()))),
            ("run_cnt", json!(p.map(|p| p.run_count()))),
            (
                "run_time_ns",
                json!(p.map(|p| p.run_time().as_nanos() as u64)),
            ),
        ]));
    }
    if rows.is_empty() {
        bail!("no programs pinned under {}/links", pin_path.display());
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_right_aligns_numbers() {
        let rows = vec![
            row(vec![
                ("service", json!("ns/web")),
                ("connections", json!(5)),
            ]),
            row(vec![
                ("service", json!("ns/a-longer-name")),
                ("connections", json!(12)),
            ]),
        ];
        assert_eq!(
            render(&rows, Format::Table),
            "SERVICE           CONNECTIONS\nns/web                      5\nns/a-longer-name           12\n"
        );
        assert_eq!(
            render(&rows[..1], Format::Json),
            "[{\"service\":\"ns/web\",\"connections\":5}]\n"
        );
    }
}
