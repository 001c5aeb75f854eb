//! fluxctl: defines services and rules, and answers "which containers serve X, and which are
//! live". Input is checked here with the model's own checks before anything is sent, and again
//! by fluxd; a refusal is one line on stderr and exit status 2, an unreachable daemon exit 1.

mod args;
mod commands;
pub mod fluxd_debug;
mod health_args;
pub mod output;
mod query;
mod service_set;
mod service_text;
pub(crate) mod traffic_args;

use std::process::ExitCode;

use clap::CommandFactory;
use serde::Serialize;

pub use self::args::*;
use crate::api::client::{Client, ClientError, Endpoint};
use crate::model::InvalidInput;

/// What a command failed with, and so which exit status it gets.
pub(super) enum Failure {
    Usage(String),
    Runtime(String),
}

impl From<InvalidInput> for Failure {
    fn from(e: InvalidInput) -> Self {
        Failure::Usage(e.to_string())
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Rejected { .. } | ClientError::Setup(_) => Failure::Usage(e.to_string()),
            _ => Failure::Runtime(e.to_string()),
        }
    }
}

pub async fn main(cli: Cli) -> ExitCode {
    let docs = match &cli.command {
        Command::Completions { shell } => Some(crate::docs::completions(Cli::command(), *shell)),
        Command::Man { dir } => Some(crate::docs::man_pages(Cli::command(), dir)),
        _ => None,
    };
    if let Some(r) = docs {
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fluxctl: {e}");
                ExitCode::from(1)
            }
        };
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(m)) => {
            eprintln!("fluxctl: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(m)) => {
            eprintln!("fluxctl: {m}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let auth = cli.remote.auth().map_err(Failure::Usage)?;
    let client = Client::with_auth(Endpoint::parse(&cli.api)?, &auth)?;
    let json = cli.json;
    match cli.command {
        Command::Service(ServiceCmd::Add(a)) => commands::service_add(&client, json, &a).await,
        Command::Service(ServiceCmd::Set(a)) => service_set::service_set(&client, json, &a).await,
        Command::Service(ServiceCmd::Rm { names, all }) => {
            commands::service_rm(&client, json, names, all).await
        }
        Command::List { verbose } | Command::Service(ServiceCmd::List { verbose }) => {
            commands::list(&client, json, verbose).await
        }
        Command::Info { name } => commands::info(&client, json, name).await,
        Command::Hosts => commands::hosts(&client, json).await,
        Command::Version => commands::version(&client, json).await,
        Command::Select(a) => commands::select(&client, json, &a).await,
        Command::Deselect { service, rule } => {
            commands::deselect(&client, json, &service, &rule).await
        }
        Command::Query(q) => query::query(&client, json, q).await,
        Command::Instance(InstanceCmd::Add {
            service,
            name,
            address,
        }) => commands::instance_add(&client, json, &service, &name, &address).await,
        Command::Instance(InstanceCmd::Rm { service, name }) => {
            commands::instance_rm(&client, json, &service, &name).await
        }
        Command::Instance(InstanceCmd::Drain { service, name }) => {
            commands::instance_drain(&client, json, &service, &name, true).await
        }
        Command::Instance(InstanceCmd::Undrain { service, name }) => {
            commands::instance_drain(&client, json, &service, &name, false).await
        }
        Command::Completions { .. } | Command::Man { .. } => Ok(()),
    }
}

pub(super) fn body<T: Serialize>(v: &T) -> Vec<u8> {
    crate::model::encode(v)
}

pub(super) fn print<T: Serialize>(json: bool, value: &T, text: impl FnOnce() -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("fluxctl: cannot print JSON: {e}"),
        }
    } else {
        print!("{}", text());
    }
}
