//! `flame-head`: the head of a Flame cluster.
//!
//! It keeps the cluster's state in a redb file in its data directory, schedules executors
//! on nodes, and serves clients and nodes over QUIC with TLS 1.3.

mod admin;
mod auth;
mod certs;
mod config;
mod core;
mod counted;
mod failpoints;
mod names;
mod node_streams;
mod owner_uids;
mod quotas;
mod scheduler;
#[cfg(test)]
mod scheduler_sim;
mod server;
#[cfg(test)]
mod sim_traces;
#[cfg(test)]
mod simulation;
mod storage_fault;
mod store;
mod tls;
mod watch;

use anyhow::Context;
use clap::Parser;
use flame_protocol::model::ApplicationSpec;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;

fn main() -> std::process::ExitCode {
    let args = config::Args::parse();
    if let Some(config::HeadCommand::GenerateDocs { out }) = &args.command {
        return match flame_manuals::write_all(
            <config::Args as clap::CommandFactory>::command(),
            flame_manuals::Section::Admin,
            out,
        ) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLAME_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The built-in ping application: `flame-ping` next to this binary, else from `PATH`.
fn ping_application() -> ApplicationSpec {
    builtin_application("ping", "flame-ping")
}

/// The built-in shell runner of `flame submit --each`: `flame-shell` next to this binary,
/// else from `PATH`.
fn shell_application() -> ApplicationSpec {
    let mut spec = builtin_application(flame_protocol::shell::APPLICATION, "flame-shell");
    spec.resources.memory_bytes = Some(flame_protocol::shell::MEMORY_DEFAULT_BYTES);
    spec
}

/// A built-in application named `name` that runs `binary`, found next to this binary,
/// else from `PATH`.
fn builtin_application(name: &str, binary: &str) -> ApplicationSpec {
    let command = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(binary)))
        .filter(|p| p.exists())
        .map_or_else(|| binary.to_string(), |p| p.display().to_string());
    // Never root (`allow_root` stays false): every user may run them, as themselves.
    ApplicationSpec {
        max_instances: 1024,
        ..ApplicationSpec::new(name, command)
    }
}

/// Makes the data directory, private: the store, the CA key and the tokens are the head's
/// alone; no executor, whatever user it runs as, may read them.
pub(crate) fn prepare_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).with_context(|| {
        format!(
            "cannot make the data directory {} private (mode 0700)",
            dir.display()
        )
    })
}

/// The names the head's certificate must carry.
pub(crate) fn sans(config: &config::HeadConfig) -> Vec<String> {
    let mut sans = tls::default_sans();
    sans.extend(config.tls_san.iter().cloned());
    sans
}

async fn run(mut args: config::Args) -> anyhow::Result<()> {
    let command = args.command.take();
    let config = config::HeadConfig::resolve(args)?;
    match command {
        None => {}
        Some(config::HeadCommand::Init { admin_name }) => return admin::init(&config, &admin_name),
        Some(config::HeadCommand::Token(command)) => return admin::token(&config, command).await,
        Some(config::HeadCommand::Cert(command)) => return admin::cert(&config, command).await,
        Some(config::HeadCommand::UserCert {
            name,
            admin,
            out,
            ttl,
        }) => return admin::user_cert(&config, &name, admin, &out, ttl),
        // Handled in `main`, before anything else starts.
        Some(config::HeadCommand::GenerateDocs { .. }) => return Ok(()),
    }
    failpoints::arm_from_env().map_err(anyhow::Error::msg)?;
    prepare_data_dir(&config.data_dir)?;
    // The state first: a damaged store is the more urgent news.
    let (store, loaded) = store::Store::open_and_load(&config.data_dir)?;
    if !tls::is_initialized(&config.data_dir) {
        anyhow::bail!(
            "{} holds no cluster CA: run `flame-head --data-dir {} init` once first; it \
             creates the CA, the head's certificate and an admin token",
            config.data_dir.display(),
            config.data_dir.display()
        );
    }
    let identity = tls::HeadIdentity::load(&config.data_dir, &sans(&config))?;
    let reset_key = tls::ensure_reset_key(&config.data_dir)?;
    let job_credentials = auth::JobCredentials::new(&reset_key, identity.fingerprint());
    let tokens = auth::TokenBook::new(store.load_tokens()?, job_credentials.clone());
    let certs = certs::CertBook::new(store.load_certs()?);

    // At most 600 s (config::HEARTBEAT_TIMEOUT_MAX), so it fits.
    let heartbeat_timeout_ms = config.heartbeat_timeout.as_millis() as u64;
    let mut core = core::Core::new(
        core::CoreConfig {
            task_input_bytes_max: config.task_input_bytes_max,
            owner_weights: config.owner_weights.clone(),
            preemption_grace_ms: config
                .preemption_grace
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            job_credentials: Some(job_credentials),
            heartbeat_timeout_ms,
            quotas: config.quotas.clone(),
            owner_uid_range: config.owner_uid_range,
            groups: config.groups.clone(),
            object_inline_max: config.object_inline_max,
            task_output_bytes_max: config.task_output_bytes_max,
            // At most 60 s (config::LOCALITY_WAIT_MAX), so it fits.
            locality_wait_ms: config.locality_wait.as_millis() as u64,
            // At most a week (config::OBJECT_RETENTION_MAX), so it fits.
            object_retention_ms: config.object_retention.as_millis() as u64,
            // Fresh at each start: grants live minutes, and nodes get the key when they
            // register.
            grant_signer: Some(std::sync::Arc::new(
                flame_protocol::object_grant::GrantSigner::generate()
                    .map_err(|e| anyhow::anyhow!("cannot make the object grant key: {e}"))?,
            )),
            ..Default::default()
        },
        loaded,
    );
    core.ensure_application(ping_application());
    core.ensure_application(shell_application());
    // Nodes that knew the previous head get a heartbeat timeout to come back and report
    // the tasks they still run before anything is dispatched again.
    core.start_recovery(server::now_ms(), heartbeat_timeout_ms);
    let (events, core_task) = server::start_core(core, store.clone(), config.low_space_bytes)
        .context("cannot start the store writer")?;

    let endpoint = flame_protocol::endpoint::server(
        config.listen,
        identity.certs(),
        identity.key(),
        &reset_key,
        identity.ca_der(),
    )?;
    let local = endpoint
        .local_addr()
        .context("cannot read the bound address")?;
    // The one line on stdout: launchers (`flame local`, tests) wait for it.
    println!("{}", flame_protocol::ready::Daemon::Head.ready_line(local));
    std::io::stdout().flush().ok();
    tracing::info!(
        %local,
        data_dir = %config.data_dir.display(),
        ca_file = %tls::ca_cert_path(&config.data_dir).display(),
        "flame-head ready"
    );
    let state = server::ServerState {
        store,
        tokens,
        certs,
        identity: std::sync::Arc::new(identity),
        quotas: config.quotas.clone(),
    };
    server::serve(endpoint, events, state, shutdown_signal()).await;
    core_task.abort();
    tracing::info!("flame-head stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the head runs until killed.
            std::future::pending::<()>().await;
        }
    }
}
