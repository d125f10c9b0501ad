//! Runs portcullis locally: the real components in the Spin-compatible host, with the ARM
//! emulator in the same process. No Azure account and no Spin install needed.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use portcullis_host::emulator;
use portcullis_host::local::{self, DEMO_KEYS, DEMO_SWEEP_SECRET, LocalOptions};

/// Just-in-time access to VMs, running locally against an ARM emulator.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where the API listens.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Where the ARM emulator listens.
    #[arg(long, default_value = "127.0.0.1:3001")]
    emulator: SocketAddr,
    /// Where state (the key-value store) is kept.
    #[arg(long, default_value = ".portcullis")]
    state_dir: PathBuf,
    /// Seconds an ARM operation takes in the emulator (its Retry-After; one poll each).
    #[arg(long, default_value_t = 1)]
    arm_delay: u64,
    /// Print the components' output.
    #[arg(long)]
    verbose: bool,
    /// A Spin runtime configuration file, as `spin up --runtime-config-file` takes: its
    /// `[key_value_store.default]` replaces the SQLite file in the state directory.
    #[arg(long)]
    runtime_config_file: Option<PathBuf>,
    /// Test hook: the guests' clock runs this many seconds ahead of real time, read from the
    /// file every 100 ms (tests moving the clock of several processes at once).
    #[arg(long, hide = true)]
    clock_file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let service = local::start(LocalOptions {
        listen: args.listen,
        emulator_listen: args.emulator,
        state_dir: args.state_dir.clone(),
        run_cron: true,
        echo_guest_logs: args.verbose,
        polls: 1,
        retry_after: args.arm_delay,
        variables: Default::default(),
        manifest: None,
        runtime_config: args.runtime_config_file.clone(),
    })
    .await?;
    let api = service.host.url();
    let arm = service.emulator.url();
    println!("portcullis is listening on {api}");
    println!(
        "  ARM emulator:  {arm} (token: POST {arm}/{}/oauth2/v2.0/token, client {} / {})",
        emulator::TENANT,
        emulator::CLIENT_ID,
        emulator::CLIENT_SECRET
    );
    println!("  demo VM:       {} (private IP {})", emulator::DEMO_VM, emulator::DEMO_PRIVATE_IP);
    println!("  demo NSG:      {}", emulator::DEMO_NSG);
    println!("  state:         {}", args.state_dir.join("kv.sqlite").display());
    let secret =
        if local::from_environment("sweep_secret") { "<SPIN_VARIABLE_SWEEP_SECRET>" } else { DEMO_SWEEP_SECRET };
    println!(
        "  sweep:         every minute (cron), or POST {api}/internal/sweep with 'Authorization: Bearer {secret}'"
    );
    println!("  health:        GET {api}/api/health (no credential)");
    if local::from_environment("api_keys") {
        println!("  API keys:      from SPIN_VARIABLE_API_KEYS (the demo keys are off)");
    } else {
        println!("  API keys (send as 'Authorization: Bearer <key>'):");
        for key in &DEMO_KEYS {
            println!("    {:<11} {:<6} roles {:?} groups {:?}", key.key, key.principal, key.roles, key.groups);
        }
    }
    if let Some(file) = args.clock_file {
        let clock = service.host.clock().clone();
        tokio::spawn(async move {
            loop {
                if let Ok(text) = tokio::fs::read_to_string(&file).await
                    && let Ok(seconds) = text.trim().parse::<i64>()
                {
                    clock.set_offset(chrono::TimeDelta::seconds(seconds));
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        });
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result?,
        _ = terminate.recv() => {}
    }
    println!("stopping: {}", service.host.stats_summary());
    Ok(())
}
