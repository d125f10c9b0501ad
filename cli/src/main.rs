//! `portcullis`: ask for access to a VM's ports from a terminal, decide requests, keep
//! policies in git, and read the audit trail. A client of portcullis's HTTP API
//! (`openapi.json`); every failure exits with a documented code (see [`api::Failure`]).

mod api;
mod audit;
mod config;
mod duration;
mod policies;
mod requests;
mod show;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::json;

use api::{Api, Failure};
use show::Format;

/// Just-in-time access to VM ports, from a terminal.
///
/// Exit codes: 0 ok, 1 refused by policy or state, 2 usage, 3 authentication, 4 not found,
/// 5 server or network error.
#[derive(Parser)]
#[command(name = "portcullis", version)]
struct Cli {
    /// portcullis's base URL [default: saved by `login`, else http://127.0.0.1:3000].
    #[arg(long, global = true, env = "PORTCULLIS_URL")]
    url: Option<String>,
    /// An API key or bearer token [default: saved by `login`].
    #[arg(long, global = true, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// How to print answers.
    #[arg(long, short = 'o', global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Checks a token, then saves it with the URL in your configuration directory (readable
    /// by you alone). Without --token, reads it from stdin (out of your shell's history).
    Login,
    /// Who your credential names, and the address a request would be opened for.
    Whoami,
    /// Asks for access to ports of a policy's VM.
    Request {
        /// The policy (one per VM).
        policy: String,
        /// A port to open (repeat for several).
        #[arg(long = "port", short = 'p', required = true)]
        ports: Vec<u16>,
        /// For how long: 90m, 1h30m, 2h, or ISO 8601 (PT1H30M).
        #[arg(long = "for")]
        duration: String,
        /// Why (a ticket, an incident).
        #[arg(long)]
        reason: String,
        /// Where from (an address or CIDR prefix) [default: your address as portcullis sees it].
        #[arg(long)]
        source: Option<String>,
        /// Waits, with a spinner, until the request is active or decided (Ctrl-C stops waiting,
        /// not the request).
        #[arg(long)]
        wait: bool,
        /// Gives up waiting after this long (exit 1; the request stays).
        #[arg(long, requires = "wait")]
        timeout: Option<String>,
    },
    /// One request, or your open ones.
    Status { id: Option<String> },
    /// Recent requests.
    List {
        /// Only yours.
        #[arg(long)]
        mine: bool,
        /// Only those waiting for your approval.
        #[arg(long)]
        awaiting_me: bool,
        /// Only in this state (pending, active, expired...).
        #[arg(long)]
        state: Option<String>,
    },
    /// Approves a request.
    Approve {
        id: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Denies a request.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// Withdraws your pending request.
    Cancel { id: String },
    /// Ends a grant now: the rule is removed before the answer.
    Revoke {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Moves a grant's end.
    Extend {
        id: String,
        /// How much longer: 30m, 1h, or ISO 8601.
        #[arg(long = "for")]
        duration: String,
    },
    /// Dry run: would a request by someone be allowed, and approved at once?
    Evaluate {
        policy: String,
        /// The principal asking.
        #[arg(long = "as")]
        principal: String,
        /// Their groups (repeat).
        #[arg(long = "group")]
        groups: Vec<String>,
        #[arg(long = "port", short = 'p', required = true)]
        ports: Vec<u16>,
        #[arg(long = "for")]
        duration: String,
        #[arg(long)]
        source: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Policies as code.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Creates or updates every policy of a YAML or JSON file, after showing what changes.
    Apply {
        #[arg(long = "file", short = 'f')]
        file: PathBuf,
        /// Shows the changes and applies nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also deletes the policies that the file does not have.
        #[arg(long)]
        prune: bool,
        /// Deletes without asking.
        #[arg(long)]
        yes: bool,
    },
    /// One policy, as a file `apply` takes back (`-o yaml` or `-o json`).
    Get { name: String },
    /// Every policy.
    List,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Writes the trail as JSON Lines to stdout.
    Export {
        /// From this sequence number.
        #[arg(long, conflicts_with = "since")]
        from: Option<u64>,
        /// From the first event at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// CloudEvents lines instead.
        #[arg(long)]
        cloudevents: bool,
    },
    /// Verifies an export offline (a checkpoint needs PORTCULLIS_AUDIT_KEY).
    Verify {
        file: PathBuf,
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Follows new events.
    Tail {
        /// Only this action, or a family ending in '.' (request.).
        #[arg(long)]
        action: Option<String>,
        /// Seconds between polls.
        #[arg(long, default_value = "2")]
        interval: u64,
    },
}

fn iso(duration: &str) -> Result<String, Failure> {
    duration::to_iso(duration).map_err(Failure::Usage)
}

/// Checks a token (from --token, else stdin), then saves it with the URL.
fn login(url: &str, token: Option<String>) -> Result<(), Failure> {
    let token = match token {
        Some(token) => token,
        None => {
            eprint!("Token for {url}: ");
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim().to_owned()
        }
    };
    if token.is_empty() {
        return Err(Failure::Usage("login needs a token (--token, PORTCULLIS_TOKEN, or stdin)".into()));
    }
    // Checked before it is kept.
    Api::new(url, Some(token.clone()))?.call("GET", "/api/whoami", None)?;
    let path = config::save(&config::Saved { url: Some(url.to_owned()), token: Some(token) })
        .map_err(|e| Failure::Local(format!("{e:#}")))?;
    eprintln!("Saved {url} and your token in {}", path.display());
    Ok(())
}

fn run(cli: Cli) -> Result<(), Failure> {
    let saved = config::load();
    let url = cli.url.clone().or(saved.url.clone()).unwrap_or_else(|| "http://127.0.0.1:3000".into());
    // A saved token goes only to the portcullis it was saved for.
    let saved_token = saved.token.filter(|_| saved.url.as_deref() == Some(url.as_str()));
    let format = cli.output;
    let api = Api::new(&url, cli.token.clone().or(saved_token))?;
    match cli.command {
        Command::Login => login(&url, cli.token),
        Command::Whoami => requests::whoami(&api, format),
        Command::Request { policy, ports, duration, reason, source, wait, timeout } => {
            let ask = requests::Ask { policy, ports, duration: iso(&duration)?, reason, source };
            let wait = match (wait, timeout) {
                (false, _) => None,
                (true, None) => Some(None),
                (true, Some(limit)) => {
                    let limit = shared::domain::AccessDuration::parse(&iso(&limit)?)
                        .map_err(|e| Failure::Usage(e.to_string()))?;
                    Some(Some(Duration::from_secs(u64::from(limit.as_secs()))))
                }
            };
            requests::request(&api, format, ask, wait)
        }
        Command::Status { id } => requests::status(&api, format, id.as_deref()),
        Command::List { mine, awaiting_me, state } => requests::list(&api, format, mine, awaiting_me, state.as_deref()),
        Command::Approve { id, comment } => requests::decide(&api, format, &id, "approve", json!({"comment": comment})),
        Command::Deny { id, reason } => requests::decide(&api, format, &id, "deny", json!({"reason": reason})),
        Command::Cancel { id } => requests::decide(&api, format, &id, "cancel", json!({})),
        Command::Revoke { id, reason } => requests::decide(&api, format, &id, "revoke", json!({"reason": reason})),
        Command::Extend { id, duration } => {
            requests::decide(&api, format, &id, "extend", json!({"duration": iso(&duration)?}))
        }
        Command::Evaluate { policy, principal, groups, ports, duration, source, reason } => {
            let mut request = json!({"ports": ports, "duration": iso(&duration)?, "justification": reason});
            if let Some(source) = source {
                request["source"] = json!(source);
            }
            requests::evaluate(&api, format, &policy, &principal, &groups, request)
        }
        Command::Policy(PolicyCommand::Apply { file, dry_run, prune, yes }) => {
            policies::apply(&api, format, &file, dry_run, prune, yes)
        }
        Command::Policy(PolicyCommand::Get { name }) => policies::get(&api, format, &name),
        Command::Policy(PolicyCommand::List) => policies::list(&api, format),
        Command::Audit(AuditCommand::Export { from, since, cloudevents }) => {
            audit::export(&api, from, since.as_deref(), cloudevents)
        }
        Command::Audit(AuditCommand::Verify { file, checkpoint }) => {
            audit::verify(format, &file, checkpoint.as_deref())
        }
        Command::Audit(AuditCommand::Tail { action, interval }) => {
            audit::tail(&api, format, Duration::from_secs(interval.max(1)), action.as_deref())
        }
    }
}

fn main() -> ExitCode {
    // clap exits 2 on a usage error by itself.
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {failure}");
            ExitCode::from(failure.exit_code())
        }
    }
}
