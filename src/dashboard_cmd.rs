//! `cityplane dashboard login`: a one-time sign-in link for the operator
//! dashboard, for the operator whose certificate this command connects
//! with (see `dashboard/mod.rs` for why a link and not a browser
//! certificate).

use cityplane::client::ConnectArgs;
use serde_json::json;

use crate::governance_cmd::{ask, print_json};
use crate::ops_cmd::Output;

#[derive(clap::Subcommand, Debug)]
pub enum DashboardCommand {
    /// Print a sign-in link for the dashboard (single use, valid 60 s),
    /// proving who you are with your operator certificate.
    #[command(
        after_help = "The server must run the dashboard (cityplane serve --dashboard 127.0.0.1:8080).\n\nExamples:\n  cityplane dashboard login                  # open the printed link in a browser\n  cityplane dashboard login --output json    # {\"url\": …, \"expires_in_s\": 60, …}\n\nThe link signs the browser in as this certificate's operator, with its\norganisation's scope and rights, for 8 hours. Do not share it."
    )]
    Login(LoginArgs),
}

#[derive(clap::Args, Debug)]
pub struct LoginArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub async fn run(cmd: DashboardCommand) -> anyhow::Result<()> {
    match cmd {
        DashboardCommand::Login(args) => {
            let r = ask(&args.connect, "dashboard-login", json!({})).await?;
            match args.output {
                Output::Json => print_json(&r)?,
                Output::Table => {
                    println!("{}", r["url"].as_str().unwrap_or_default());
                    eprintln!(
                        "a single-use link for {} ({}), valid {} s: open it in a browser",
                        r["operator"].as_str().unwrap_or_default(),
                        r["org"].as_str().unwrap_or_default(),
                        r["expires_in_s"]
                    );
                }
            }
            Ok(())
        }
    }
}
