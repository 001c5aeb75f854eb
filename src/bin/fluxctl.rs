//! fluxctl: the command line for flux.

use std::process::ExitCode;

use clap::Parser;
use flux::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(cli::main(cli)),
        Err(e) => {
            eprintln!("fluxctl: cannot start the runtime: {e}");
            ExitCode::from(1)
        }
    }
}

/// Help and version go to stdout as usual; a usage error is cut to its first line, so that
/// every fluxctl error is one line on stderr.
fn usage_error(e: clap::Error) -> ExitCode {
    if !e.use_stderr() {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let first = rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad usage")
        .trim_start_matches("error: ");
    eprintln!("fluxctl: {first}");
    ExitCode::from(2)
}
