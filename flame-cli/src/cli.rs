//! The command tree and its dispatch.

pub mod app;
pub mod bench;
pub mod cluster;
pub mod docs;
pub mod each;
pub mod job;
pub mod local;
pub mod logs;
pub mod node;
pub mod object;
pub mod ping;
pub mod queue;
pub mod run;
pub mod session;
pub mod signals;
pub mod submit;
pub mod task;
pub mod whoami;

use clap::{Args, Parser, Subcommand};
use flame_client::report::HintExt as _;
use flame_client::{Client, ClientConfig, ConfigFlags};
use std::path::PathBuf;

/// Run and inspect work on a Flame cluster.
#[derive(Debug, Parser)]
#[command(name = "flame", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the head is, who this client is there, and whom sessions are for; each falls back
/// to the environment, then to the config files.
///
/// There is no flag taking a token's text: command lines are visible to every user of the
/// machine (`ps`). Use --token-file, or FLAME_TOKEN_FILE / FLAME_TOKEN.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Connection (every command; else environment, then config files)")]
pub struct GlobalArgs {
    /// Head address, host:port [else FLAME_HEAD, else `head` in ~/.config/flame/config.toml or /etc/flame/flame.toml]
    #[arg(long, global = true, value_name = "ADDR")]
    pub head: Option<String>,
    /// The cluster's CA certificate (PEM) [else FLAME_CA_FILE, else `ca_file` in the config files, else the CA fingerprint in the token]
    #[arg(long, global = true, value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// File holding your token, from `flame-head token create --user NAME` [else FLAME_TOKEN_FILE or FLAME_TOKEN, else `token_file` or `token` in the config files]
    #[arg(long, global = true, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Your user certificate (PEM), signed by the cluster CA, instead of a token; needs --key [else FLAME_CERT, else `cert_file` in the config files]
    #[arg(long = "cert", global = true, value_name = "PATH")]
    pub cert_file: Option<PathBuf>,
    /// The private key (PEM) of --cert [else FLAME_KEY, else `key_file` in the config files]
    #[arg(long = "key", global = true, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// Task inputs and common data larger than this go to a node's object cache, the task
    /// carrying a reference [else FLAME_OBJECT_INLINE_MAX, else `object_inline_max` in the config files, else 100KiB]
    #[arg(long, global = true, value_name = "SIZE", value_parser = parse_size)]
    pub object_inline_max: Option<u64>,
    /// Admins only: the user that new sessions belong to [else FLAME_OWNER, else `owner` in the config files, else whoever the token or certificate names]
    #[arg(long, global = true, value_name = "NAME")]
    pub owner: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run many tiny tasks through the built-in `ping` application and check every output
    Ping(ping::PingArgs),
    /// Send inputs (lines of a file or stdin, or files of a folder) to a registered
    /// application and print its outputs
    Run(run::RunArgs),
    /// Run a head and a node on this machine until Ctrl-C
    Local(local::LocalArgs),
    /// Print a shell completion script, e.g. `flame completions bash > ~/.local/share/bash-completion/completions/flame`
    Completions(docs::CompletionsArgs),
    /// Write the man pages and completion scripts of `flame` (for packaging)
    #[command(hide = true)]
    GenerateDocs(docs::GenerateDocsArgs),
    /// Register, list, show and remove applications
    #[command(subcommand)]
    App(app::AppCommand),
    /// List, view and close sessions
    #[command(subcommand)]
    Session(session::SessionCommand),
    /// List, drain and undrain nodes
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Put, get, list and remove objects in the nodes' caches
    #[command(subcommand)]
    Object(object::ObjectCommand),
    /// Show how executors are shared between owners and sessions, and why work waits
    Queue(crate::render::OutputArgs),
    /// Show the logs (stderr, and stdout under the unix shim) of a session's executors
    Logs(logs::LogsArgs),
    /// Run a batch job of ranks started together, or a command per line of a file
    Submit(submit::SubmitArgs),
    /// List, view, cancel and read the output of batch jobs
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Show the user the head takes you for, and whether an admin
    Whoami(crate::render::OutputArgs),
    /// Measure Flame on a local cluster of its own, checking every result, and compare it with its peers
    Bench(bench::BenchArgs),
    /// Start, stop and inspect a cluster on hosts reachable by SSH, from a cluster file
    #[command(subcommand)]
    Cluster(cluster::ClusterCommand),
}

/// Ends the `flame` process with this exit code, after whatever was printed; no further
/// message (e.g. a job's first failed rank exited with it).
#[derive(Debug, thiserror::Error)]
#[error("exit code {0}")]
pub struct Exit(pub u8);

/// A usage error that clap could not see (a flag's value checked after parsing, a flag
/// that needs another): reported like any error, but exits 2, as clap's own usage errors
/// do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub String);

impl Usage {
    /// A usage error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Usage(message.into())
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Ping(args) => ping::run(&cli.global, args).await,
        Command::Run(args) => run::run(&cli.global, args).await,
        Command::Local(args) => local::run(args).await,
        Command::Completions(args) => docs::completions(args),
        Command::GenerateDocs(args) => docs::generate(args),
        Command::App(cmd) => app::run(&cli.global, cmd).await,
        Command::Session(cmd) => session::run(&cli.global, cmd).await,
        Command::Node(cmd) => node::run(&cli.global, cmd).await,
        Command::Object(cmd) => object::run(&cli.global, cmd).await,
        Command::Queue(out) => queue::run(&cli.global, out).await,
        Command::Logs(args) => logs::run(&cli.global, args).await,
        // `submit` holds the flags only; `each` and `job` read them (no cycle between them).
        Command::Submit(args) if args.each.is_some() => each::run(&cli.global, args).await,
        Command::Submit(args) => job::submit(&cli.global, args).await,
        Command::Job(cmd) => job::run(&cli.global, cmd).await,
        Command::Whoami(out) => whoami::run(&cli.global, out).await,
        Command::Bench(args) => bench::run(args).await,
        Command::Cluster(cmd) => cluster::run(cmd).await,
    }
}

/// A size such as `100K`, `4MiB` or `65536`, binary units as Slurm's; see
/// [`flame_client::units::parse_size`].
pub fn parse_size(text: &str) -> Result<u64, String> {
    flame_client::units::parse_size(text).map_err(|e| e.to_string())
}

/// A time limit in Slurm's formats (`30`, `1:00:00`, `2-12:00`) or with units (`10m`); see
/// [`flame_client::units::parse_time_limit`].
pub fn parse_time_limit(text: &str) -> Result<std::time::Duration, String> {
    flame_client::units::parse_time_limit(text).map_err(|e| e.to_string())
}

/// Resolves the configuration from the flags, the environment and the config files.
pub fn config(global: &GlobalArgs) -> anyhow::Result<ClientConfig> {
    let flags = ConfigFlags {
        head: global.head.clone(),
        ca_file: global.ca_file.clone(),
        owner: global.owner.clone(),
        token_file: global.token_file.clone(),
        cert_file: global.cert_file.clone(),
        key_file: global.key_file.clone(),
        object_inline_max: global.object_inline_max,
    };
    Ok(ClientConfig::resolve(&flags)?)
}

/// Connects to the configured head.
pub async fn connect(global: &GlobalArgs) -> anyhow::Result<Client> {
    let config = config(global)?;
    connect_to(&config).await
}

/// Connects to the head named by `config`.
pub async fn connect_to(config: &ClientConfig) -> anyhow::Result<Client> {
    // The library's message already names the address and the bound.
    Ok(Client::connect(config).await?)
}

/// Runs `f` with a connected client and closes the connection after it, whatever the
/// outcome, so the head frees it at once.
pub async fn with_client<T, F, Fut>(global: &GlobalArgs, f: F) -> anyhow::Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let client = connect(global).await?;
    let result = f(client.clone()).await;
    client.close().await;
    result
}

/// Parses a `host:port` listen address early, so that a typo is a usage-style error with
/// the flag named rather than a failure inside the head.
pub fn check_listen(addr: &str) -> anyhow::Result<()> {
    addr.parse::<std::net::SocketAddr>()
        .map(drop)
        .map_err(|e| Usage::new(format!("--listen `{addr}` is not an ip:port address: {e}")))
        .hint("for example --listen 127.0.0.1:0 (any free port) or --listen 0.0.0.0:7470")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Clap's own checks of the whole command tree (duplicate flags between the global
    /// ones and a subcommand's, bad defaults), which it otherwise runs only for the
    /// subcommand being parsed.
    #[test]
    fn the_command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn credential_flags_reach_the_configuration() {
        let cli = Cli::try_parse_from([
            "flame", "--head", "h:1", "--cert", "/c.crt", "--key", "/c.key", "whoami", "--output",
            "json",
        ]);
        let Ok(cli) = cli else {
            panic!("{cli:?}");
        };
        assert_eq!(cli.global.cert_file, Some(PathBuf::from("/c.crt")));
        assert_eq!(cli.global.key_file, Some(PathBuf::from("/c.key")));
        // No flag takes a token's text.
        assert!(Cli::try_parse_from(["flame", "--token", "x", "whoami"]).is_err());
    }
}
