//! socklbctl: inspect what socklb has programmed (bpftool style).
use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_userspace::{
    ctl::{self, Format},
    datapath::{self, Maps},
};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// JSON output.
    #[arg(short = 'j', long, global = true)]
    json: bool,
    /// Pretty-printed JSON output.
    #[arg(short = 'p', long, global = true)]
    pretty: bool,
    #[arg(long, global = true, default_value = datapath::DEFAULT_PIN_PATH)]
    pin_path: PathBuf,
    /// The running agent's status address (its --status-address), for `pod list`.
    #[arg(long, global = true, default_value = "127.0.0.1:9967")]
    status_address: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Service ports.
    Service {
        #[command(subcommand)]
        command: List,
    },
    /// Backends with their live connection counts.
    Backend {
        #[command(subcommand)]
        command: List,
    },
    /// Rebalancing: per opted-in Service, connections per backend and what was closed.
    Rebalance {
        #[command(subcommand)]
        command: List,
    },
    /// The sockets socklb assigned, in every network namespace (the BPF socket iterator).
    Socket {
        #[command(subcommand)]
        command: List,
    },
    /// Raw map contents.
    Map {
        #[command(subcommand)]
        command: MapCommand,
    },
    /// Attached programs.
    Prog {
        #[command(subcommand)]
        command: ProgCommand,
    },
    /// This node's pods and whether socklb balances each (on, waiting, off) and why; asked of
    /// the running agent (Kubernetes mode).
    Pod {
        #[command(subcommand)]
        command: List,
    },
}

#[derive(Subcommand)]
enum List {
    List,
}

#[derive(Subcommand)]
enum MapCommand {
    /// Dump one map (SERVICES, SLOTS, BACKENDS, CONN_COUNTS, SERVICE_STATS, SERVICE_NAMES,
    /// SOCKETS, MAGLEV, AFFINITY, REBALANCE_STATS, COUNT_UNDERFLOWS).
    Dump { name: String },
}

#[derive(Subcommand)]
enum ProgCommand {
    Show,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let format = match (cli.pretty, cli.json) {
        (true, _) => Format::PrettyJson,
        (false, true) => Format::Json,
        _ => Format::Table,
    };
    let rows = match cli.command {
        Command::Prog {
            command: ProgCommand::Show,
        } => ctl::prog_show(&cli.pin_path)?,
        Command::Pod {
            command: List::List,
        } => ctl::pod_list(&cli.status_address)?,
        Command::Socket {
            command: List::List,
        } => ctl::socket_list(&Maps::open_pinned(&cli.pin_path)?, &cli.pin_path)?,
        Command::Map {
            command: MapCommand::Dump { name },
        } if name == lb_common::map_names::SOCKETS => {
            ctl::socket_list(&Maps::open_pinned(&cli.pin_path)?, &cli.pin_path)?
        }
        command => {
            let maps = Maps::open_pinned(&cli.pin_path)?;
            match command {
                Command::Service {
                    command: List::List,
                } => ctl::service_list(&maps)?,
                Command::Backend {
                    command: List::List,
                } => ctl::backend_list(&maps)?,
                Command::Rebalance {
                    command: List::List,
                } => ctl::rebalance_list(&maps)?,
                Command::Map {
                    command: MapCommand::Dump { name },
                } => ctl::map_dump(&maps, &name)?,
                Command::Prog { .. } | Command::Socket { .. } | Command::Pod { .. } => {
                    unreachable!("handled above")
                }
            }
        }
    };
    print!("{}", ctl::render(&rows, format));
    Ok(())
}
