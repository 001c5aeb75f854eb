//! fluxd: the per-host daemon.

use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use flux::daemon::config::{Config, LogFormat, RunArgs};

#[derive(Parser)]
#[command(
    name = "fluxd",
    version = flux::version::LONG,
    about = "flux: service routing for Docker hosts (the per-host daemon)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: store, rules, proxy and local API.
    Run(Box<RunArgs>),
    /// Show the installed rules (annotated), drift, the listener and instance health.
    Debug(DebugArgs),
    /// Remove flux's iptables rules and its bpf steering (after a stop with --keep-rules, or on
    /// uninstall).
    Cleanup(CleanupArgs),
    /// Print a shell completion script for fluxd.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: flux::docs::Shell,
    },
    /// Write fluxd's man pages (one per command) into a directory.
    Man {
        /// Directory to write the pages into (created if missing).
        dir: std::path::PathBuf,
    },
    /// Keep an nginx configuration (one upstream per service) in step with the instances.
    Edge(Box<flux::edge::EdgeArgs>),
}

#[derive(Args)]
struct CleanupArgs {
    /// Where a fluxd pinned its bpf steering (`fluxd run --bpf-dir`).
    #[arg(long, env = "FLUXD_BPF_DIR", default_value = flux::daemon::config::DEFAULT_BPF_DIR)]
    bpf_dir: std::path::PathBuf,
}

#[derive(Args)]
struct DebugArgs {
    /// fluxd's API: unix:///PATH, http://HOST:PORT or https://HOST:PORT (the remote API, with
    /// --token-file).
    #[arg(long, env = "FLUX_API", default_value = "unix:///run/fluxd/fluxd.sock")]
    api: String,
    #[command(flatten)]
    remote: flux::api::client::RemoteFlags,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match &cli.command {
        Command::Completions { shell } => {
            return doc_result(flux::docs::completions(Cli::command(), *shell))
        }
        Command::Man { dir } => return doc_result(flux::docs::man_pages(Cli::command(), dir)),
        _ => {}
    }
    flux::daemon::memory::limit_arenas();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fluxd: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Run(args) => {
            let config = match Config::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fluxd: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.log_format);
            match rt.block_on(flux::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("fluxd: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Edge(args) => {
            let config = match flux::edge::EdgeConfig::load(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("fluxd edge: {e:#}");
                    return ExitCode::from(2);
                }
            };
            init_logging(if config.json_logs {
                LogFormat::Json
            } else {
                LogFormat::Text
            });
            ExitCode::from(rt.block_on(flux::edge::run(config)))
        }
        Command::Debug(a) => rt.block_on(flux::cli::fluxd_debug::main(&a.api, &a.remote, a.json)),
        Command::Cleanup(a) => {
            // Both paths, whichever the last fluxd used: the steering first (its routes make
            // VIPs local), then the nat rules.
            let runner = netfilter::CommandRunner::new();
            let removed = steering::remove_leftovers(&a.bpf_dir, &runner)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    let nf = netfilter::Netfilter::new(runner);
                    nf.remove6().map_err(|e| format!("IPv6 rules: {e}"))?;
                    nf.remove().map_err(|e| e.to_string())
                });
            match removed {
                Ok(()) => {
                    println!("removed flux's rules");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("fluxd: cleanup: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Completions { .. } | Command::Man { .. } => ExitCode::SUCCESS,
    }
}

fn doc_result(r: std::io::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fluxd: {e}");
            ExitCode::from(1)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FLUXD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
