//! `flame-node`: the Flame node agent. It registers with the head, reports its capacity,
//! and runs the executors the head asks for as local processes, each in its own cgroup and
//! as its application's user.
//!
//! A node first gets a certificate with `flame-node join` (see [`join`]); from then on it
//! connects to the head with mutual TLS, and its certificate names it.

mod capacity;
mod cgroup;
mod config;
mod exec_server;
mod executor;
mod join;
mod launcher;
mod lifecycle;
mod link;
mod log_server;
mod logs;
mod objects;
mod pipeline;
mod resources;

use clap::Parser;
use config::CgroupMode;
use flame_protocol::model::{validate_labels, GpuInfo, Isolation, NodeResources};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "flame-node",
    version,
    about = "The Flame node agent",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<NodeCommand>,
    /// TOML file with any of these settings (flags win over it)
    #[arg(long, env = "FLAME_NODE_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the head, `host:port`.
    #[arg(long, env = "FLAME_HEAD")]
    head: Option<String>,
    /// PEM file with the cluster CA certificate to trust for the head [default: TLS_DIR/ca.crt]
    #[arg(long, env = "FLAME_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Folder with this node's certificate, key and the cluster CA, as `flame-node join`
    /// wrote them [default: /var/lib/flame/node-tls]
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// This node's certificate (PEM) [default: TLS_DIR/node.crt]
    #[arg(long)]
    cert: Option<PathBuf>,
    /// This node's private key (PEM) [default: TLS_DIR/node.key]
    #[arg(long)]
    key: Option<PathBuf>,
    /// Name of this node; it must be the name in its certificate (default: that name).
    #[arg(long, env = "FLAME_NODE_NAME")]
    name: Option<String>,
    /// Cpus to offer, fractions allowed (default: detected, within the agent's own cgroup)
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory to offer, e.g. `64GiB` (default: detected, within the agent's own cgroup)
    #[arg(long)]
    memory: Option<String>,
    /// GPU indices to offer, e.g. `0,1`, or `none` (default: detected with nvidia-smi)
    #[arg(long)]
    gpus: Option<String>,
    /// Cpus kept back for the system
    #[arg(long)]
    reserve_cpus: Option<f64>,
    /// Memory kept back for the system, e.g. `2GiB`
    #[arg(long)]
    reserve_memory: Option<String>,
    /// A label `KEY=VALUE` that application selectors can match (repeatable)
    #[arg(long = "label", value_parser = config::parse_label)]
    labels: Vec<(String, String)>,
    /// Parent of the executors' own working directories [default: /var/lib/flame/node]
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Parent of the executors' private socket directories [default: /run/flame/node]
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// Where executor logs are kept [default: /var/log/flame/node]
    #[arg(long)]
    log_dir: Option<PathBuf>,
    /// Who executors run as: `owner-uid` (each owner's uid from the head's range, the
    /// default), `site-user` (the Unix user named like the owner), or `fixed` (every owner
    /// as --executor-user: owners are not isolated)
    #[arg(long, value_enum)]
    executor_identity: Option<config::IdentityChoice>,
    /// With `--executor-identity fixed`: the one user every executor runs as
    #[arg(long)]
    executor_user: Option<String>,
    /// Let executors run as root (off by default)
    #[arg(long)]
    allow_root_executors: bool,
    /// Executor cgroups: `auto` (required when running as root) or `off`
    #[arg(long, value_enum)]
    cgroups: Option<CgroupMode>,
    /// Name of this node's cgroup directory under its own cgroup [default: flame-node-NAME]
    #[arg(long)]
    cgroup_root: Option<String>,
    /// Most tasks the head may have outstanding per executor (the head sizes the queue by
    /// measured task time within this bound) [default: 256]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    credit: Option<u32>,
    /// How long an application may take to say ready after it starts; one that does not
    /// is killed and its launch fails [default: 30s, between 1s and 10m]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    start_timeout: Option<std::time::Duration>,
    /// How long executors keep running after the head is lost, waiting for it to return [default: 60s]
    #[arg(long, value_parser = humantime::parse_duration)]
    head_loss_grace: Option<std::time::Duration>,
    /// Where the node serves its object cache to clients and other nodes (UDP, QUIC), or
    /// `off` (no cache: tasks with object inputs fail here) [default: 0.0.0.0:7471]
    #[arg(long, value_parser = config::parse_object_listen)]
    object_listen: Option<config::ObjectListen>,
    /// The address others reach the object endpoint at, when not the address the head
    /// sees this node connect from and the listening port (NAT, several networks)
    #[arg(long)]
    object_advertise: Option<std::net::SocketAddr>,
    /// Memory for the object cache, e.g. `8GiB`, at most the node's memory [default: 2GiB]
    #[arg(long)]
    object_memory: Option<String>,
    /// Disk for objects spilled from memory, e.g. `100GiB` [default: 16GiB]
    #[arg(long)]
    object_disk: Option<String>,
    /// Folder for spilled objects, made the node's own with mode 0700 [default: WORK_DIR/objects]
    #[arg(long)]
    object_dir: Option<PathBuf>,
    /// Print what this node would offer (cpus, memory, GPUs, cgroups) as JSON and exit
    #[arg(long)]
    print_capacity: bool,
}

/// `flame-node`'s subcommands; without one, it runs the agent.
#[derive(Debug, clap::Subcommand)]
enum NodeCommand {
    /// Get this node a certificate from the head with a join token, then exit.
    ///
    /// Writes TLS_DIR/node.crt, TLS_DIR/node.key (0600) and TLS_DIR/ca.crt. Joining again
    /// renews the certificate.
    Join(join::JoinArgs),
    /// Writes the man pages and shell completions of `flame-node` to OUT (for packaging).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Most processes in one executor's cgroup, unless the config says otherwise.
const PIDS_MAX_DEFAULT: u32 = 4096;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLAME_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match args.command {
        Some(NodeCommand::Join(join_args)) => join::run(join_args),
        Some(NodeCommand::GenerateDocs { out }) => flame_manuals::write_all(
            <Args as clap::CommandFactory>::command(),
            flame_manuals::Section::Admin,
            &out,
        )
        .map(|_| ())
        .map_err(|e| e.to_string()),
        None => run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Said when no head is given and the node is to join one.
const HEAD_NEEDED: &str = "the head's address is needed: --head HOST:PORT (or `head` in --config)";

fn run(args: Args) -> Result<(), String> {
    let file = match &args.config {
        Some(path) => config::load(path)?,
        None => config::FileConfig::default(),
    };
    let tls = TlsFiles::new(&args, &file);
    let asked_name = args.name.clone().or(file.name.clone());
    // Settings first, then the files they name; all before anything is created here.
    if let Some(c) = args.cpus.or(file.cpus) {
        if config::cpu_millis("--cpus", c)? == 0 {
            return Err("--cpus: a node must offer more than 0 cpus".to_string());
        }
    }
    let (name, identity) = if args.print_capacity {
        let name = asked_name.unwrap_or_else(|| resources::hostname().to_lowercase());
        (name, None)
    } else {
        // The head first: with neither it nor the TLS files given, the missing head is
        // what the user must hear about, not the default CA path.
        if args.head.is_none() && file.head.is_none() {
            return Err(HEAD_NEEDED.to_string());
        }
        let (name, identity) = tls.load(asked_name)?;
        (name, Some(identity))
    };
    flame_protocol::model::validate_node_name(&name).map_err(|e| format!("--name: {e}"))?;
    let allocatable = allocatable(&args, &file)?;
    let mut labels = file.labels.clone();
    labels.extend(args.labels.iter().cloned());
    validate_labels("label", &labels).map_err(|e| e.to_string())?;

    // Executors: cgroups, users, directories, logs.
    let root = nix::unistd::geteuid().is_root();
    let cgroups = executor_cgroups(&args, &file, &name, root)?;
    let isolation = match cgroups.as_ref().map(cgroup::CgroupTree::version) {
        Some(cgroup::Version::V1) => Isolation::CgroupV1,
        Some(cgroup::Version::V2) => Isolation::CgroupV2,
        None => Isolation::None,
    };
    // There is an identity unless only the capacity is asked for.
    let Some(identity) = identity else {
        let report = serde_json::json!({
            "name": name,
            // A number, as `flame node list --output json` gives cpus (in millis there).
            "cpus": f64::from(allocatable.cpu_millis) / 1000.0,
            "cpu_millis": allocatable.cpu_millis,
            "memory_bytes": allocatable.memory_bytes,
            "gpus": allocatable.gpus.iter().map(|g| serde_json::json!({
                "index": g.index, "name": g.name, "uuid": g.uuid, "memory_bytes": g.memory_bytes,
            })).collect::<Vec<_>>(),
            "labels": labels,
            "isolation": isolation,
        });
        println!("{report:#}");
        return Ok(());
    };
    // Needed from here on, not to print the capacity.
    let head = args.head.clone().or(file.head.clone()).ok_or(HEAD_NEEDED)?;
    if let Some(tree) = &cgroups {
        match tree.cleanup_stale() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(count = n, "removed executor cgroups left by an earlier run"),
            Err(e) => tracing::warn!("cannot clean up executor cgroups of an earlier run: {e}"),
        }
    }
    let allow_root = args.allow_root_executors || file.allow_root_executors.unwrap_or(false);
    let executor_identity = identity_mode(
        args.executor_identity.or(file.executor_identity),
        args.executor_user.clone().or(file.executor_user.clone()),
        allow_root,
        root,
    )?;
    let dirs = NodeDirs::create(&args, &file, &executor_identity)?;
    let object_settings = object_settings(&args, &file, &dirs, allocatable.memory_bytes)?;
    let public_ca = publish_ca(&tls.ca_file, &dirs.runtime)?;
    let mut log_config = logs::LogConfig::new(&dirs.log);
    if let Some(size) = &file.log_file_bytes_max {
        log_config.file_bytes_max = size.bytes("log_file_bytes_max")?;
    }
    if let Some(kept) = file.log_files_kept {
        log_config.files_kept = kept;
    }
    let logs = logs::LogRegistry::new(log_config)
        .map_err(|e| format!("cannot set up executor logs in {}: {e}", dirs.log.display()))?;
    let head_loss_grace = match (args.head_loss_grace, &file.head_loss_grace) {
        (Some(d), _) => d,
        (None, Some(text)) => humantime::parse_duration(text)
            .map_err(|e| format!("head_loss_grace: `{text}`: {e}"))?,
        (None, None) => std::time::Duration::from_secs(60),
    };
    let credit = args.credit.or(file.credit).unwrap_or(256).clamp(1, 1024);
    let start_timeout = match (args.start_timeout, &file.start_timeout) {
        (Some(d), _) => d,
        (None, Some(text)) => {
            humantime::parse_duration(text).map_err(|e| format!("start_timeout: `{text}`: {e}"))?
        }
        (None, None) => executor::START_TIMEOUT,
    };
    if !(executor::START_TIMEOUT_MIN..=executor::START_TIMEOUT_MAX).contains(&start_timeout) {
        return Err(format!(
            "start_timeout must be between {} and {}, not {}",
            humantime::format_duration(executor::START_TIMEOUT_MIN),
            humantime::format_duration(executor::START_TIMEOUT_MAX),
            humantime::format_duration(start_timeout)
        ));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))?;
    let (objects, object_events) = match object_settings {
        Some(o) => {
            let (objects, events) = runtime.block_on(start_objects(o, &tls, &identity, &name))?;
            (Some(Arc::new(objects)), events)
        }
        // No cache: nothing ever comes on this queue.
        None => (None, tokio::sync::mpsc::channel(1).1),
    };
    let settings = executor::Settings {
        node_name: name.clone(),
        work_dir: dirs.work,
        runtime_dir: dirs.runtime,
        identity: executor_identity,
        allow_root,
        node_is_root: root,
        cgroups,
        pids_max: file.pids_max.unwrap_or(PIDS_MAX_DEFAULT),
        launcher: Box::new(launcher::ProcessLauncher),
        logs,
        credit,
        executors_ended: Default::default(),
        rank_holds: Default::default(),
        rank_holds_changed: Default::default(),
        job_env: job_environment(&head, &public_ca),
        objects,
        start_timeout,
    };
    let config = link::NodeConfig {
        head,
        ca_file: tls.ca_file,
        identity,
        name,
        allocatable,
        labels,
        isolation,
        head_loss_grace,
        executors: Arc::new(settings),
    };
    serve(&runtime, config, object_events)
}

/// Serves the head until a signal or a final refusal, then removes the node's cgroups.
fn serve(
    runtime: &tokio::runtime::Runtime,
    config: link::NodeConfig,
    object_events: tokio::sync::mpsc::Receiver<flame_protocol::object::ObjectEvent>,
) -> Result<(), String> {
    let executors = config.executors.clone();
    let served = runtime
        .block_on(link::run(config, object_events, shutdown_signal()))
        .map_err(|e| e.to_string());
    // A clean stop (or a final refusal) leaves no cgroup behind: the executors removed
    // theirs before `run` returned, and the node's root goes now. After a crash the next
    // start removes what is left.
    if let Some(tree) = &executors.cgroups {
        match tree.destroy() {
            Ok(()) => tracing::info!("removed the node's cgroups"),
            Err(e) => tracing::warn!("cannot remove the node's cgroups: {e}"),
        }
    }
    served
}

/// The object service's settings, from flags, the config file and the defaults; `None`
/// when it is off. The spill folder is made here (mode 0700, the node's own).
struct ObjectSettings {
    listen: std::net::SocketAddr,
    /// `listen` is the default, not asked for: when its port is taken (several nodes on
    /// one machine, as tests and `flame local` run them), any free port does.
    listen_defaulted: bool,
    advertise: Option<std::net::SocketAddr>,
    cache: objects::CacheConfig,
    /// The same-host socket, in the node's runtime folder.
    socket: PathBuf,
}

/// Name of the object cache's Unix socket in the node's runtime folder.
const OBJECT_SOCKET_NAME: &str = "objects.sock";

fn object_settings(
    args: &Args,
    file: &config::FileConfig,
    dirs: &NodeDirs,
    node_memory: u64,
) -> Result<Option<ObjectSettings>, String> {
    use flame_protocol::limits::{NODE_OBJECT_DISK_DEFAULT, NODE_OBJECT_MEMORY_DEFAULT};
    let listen_defaulted = args.object_listen.is_none() && file.object_listen.is_none();
    let listen = match (args.object_listen, &file.object_listen) {
        (Some(l), _) => l,
        (None, Some(text)) => config::parse_object_listen(text)?,
        (None, None) => config::ObjectListen::On(std::net::SocketAddr::from((
            [0, 0, 0, 0],
            config::DEFAULT_OBJECT_PORT,
        ))),
    };
    let config::ObjectListen::On(listen) = listen else {
        return Ok(None);
    };
    let asked_memory = match (&args.object_memory, &file.object_memory) {
        (Some(m), _) => Some(config::parse_size("object_memory", m)?),
        (None, Some(m)) => Some(m.bytes("object_memory")?),
        (None, None) => None,
    };
    let mut memory_bytes = asked_memory.unwrap_or(NODE_OBJECT_MEMORY_DEFAULT);
    if node_memory > 0 && memory_bytes > node_memory {
        if asked_memory.is_some() {
            tracing::warn!(
                asked = memory_bytes,
                node_memory,
                "object_memory is more than the node's memory; the cache keeps to the node's"
            );
        }
        memory_bytes = node_memory;
    }
    let disk_bytes = match (&args.object_disk, &file.object_disk) {
        (Some(d), _) => config::parse_size("object_disk", d)?,
        (None, Some(d)) => d.bytes("object_disk")?,
        (None, None) => NODE_OBJECT_DISK_DEFAULT,
    };
    let spill_dir = args
        .object_dir
        .clone()
        .or(file.object_dir.clone())
        .unwrap_or_else(|| dirs.work.join("objects"));
    std::fs::create_dir_all(&spill_dir).map_err(|e| {
        format!(
            "cannot create the object folder {}: {e}",
            spill_dir.display()
        )
    })?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&spill_dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| {
        format!(
            "cannot set the mode of the object folder {}: {e}",
            spill_dir.display()
        )
    })?;
    owned_by_node("object", &spill_dir)?;
    Ok(Some(ObjectSettings {
        listen,
        listen_defaulted,
        advertise: args.object_advertise.or(file.object_advertise),
        cache: objects::CacheConfig {
            memory_bytes,
            disk_bytes,
            spill_dir,
        },
        socket: dirs.runtime.join(OBJECT_SOCKET_NAME),
    }))
}

/// Opens the object cache, binds its endpoints (QUIC with the node's certificate; the
/// Unix socket) and starts their servers, which run as long as the node.
async fn start_objects(
    settings: ObjectSettings,
    tls: &TlsFiles,
    identity: &flame_protocol::endpoint::ClientIdentity,
    node: &str,
) -> Result<
    (
        executor::objects::NodeObjects,
        tokio::sync::mpsc::Receiver<flame_protocol::object::ObjectEvent>,
    ),
    String,
> {
    use flame_protocol::object_transfer::{host_id, ObjectClient};
    let (store, events) = executor::objects::NodeObjects::open_store(settings.cache)?;
    let endpoint = match object_endpoint(settings.listen, tls) {
        Ok(endpoint) => endpoint,
        Err(e) if settings.listen_defaulted => {
            tracing::warn!("{e}; serving objects on another port instead");
            object_endpoint(std::net::SocketAddr::new(settings.listen.ip(), 0), tls)?
        }
        Err(e) => return Err(e),
    };
    let port = endpoint
        .local_addr()
        .map_err(|e| format!("cannot read the object endpoint's address: {e}"))?
        .port();
    let listener = object_socket(&settings.socket)?;
    let trust = flame_protocol::endpoint::Trust::CaFile(tls.ca_file.clone());
    let client = ObjectClient::new(&trust, Some(identity.clone()))
        .map_err(|e| format!("cannot set up the object client: {e}"))?;
    let service = executor::objects::Service {
        port,
        advertise: settings.advertise,
        host: host_id(),
        socket: Some(settings.socket.display().to_string()),
    };
    let node_objects = executor::objects::NodeObjects::new(store.clone(), client, service);
    let keys = node_objects.grant_key.clone();
    tokio::spawn(objects::server::serve(
        endpoint,
        store.clone(),
        node.to_string(),
        keys.clone(),
    ));
    tokio::spawn(objects::unix::serve_unix(
        listener,
        store,
        node.to_string(),
        keys,
    ));
    tracing::info!(listen = %settings.listen, port, socket = %settings.socket.display(), "serving objects");
    Ok((node_objects, events))
}

/// The object endpoint ([`objects::server::object_endpoint`]) on `addr`, presenting the
/// node's certificate followed by the cluster CA's (readers that pin the CA by its
/// fingerprint find it in the chain).
fn object_endpoint(addr: std::net::SocketAddr, tls: &TlsFiles) -> Result<quinn::Endpoint, String> {
    use flame_protocol::endpoint::{load_certs, load_key};
    let mut certs = load_certs(&tls.cert_file).map_err(|e| e.to_string())?;
    let ca = load_certs(&tls.ca_file)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or_else(|| format!("{} holds no certificate", tls.ca_file.display()))?;
    if !certs.contains(&ca) {
        certs.push(ca.clone());
    }
    let key = load_key(&tls.key_file).map_err(|e| e.to_string())?;
    objects::server::object_endpoint(addr, certs, key, ca).map_err(|e| match e {
        objects::server::ObjectEndpointError::Bind { .. } => format!(
            "{e}\nhint: another program (or another flame-node) holds that port: choose \
             another with --object-listen ADDR, or turn the object cache off with \
             --object-listen off"
        ),
        other => other.to_string(),
    })
}

/// The same-host object socket, mode 0666 in the node's root-owned runtime folder (the
/// grant is the credential). A socket left by an earlier run is replaced.
fn object_socket(path: &std::path::Path) -> Result<tokio::net::UnixListener, String> {
    objects::unix::bind_unix(path).map_err(|e| {
        format!(
            "cannot listen on the object socket {}: {e}\nhint: remove what is in the way, or \
             turn the object cache off with --object-listen off",
            path.display()
        )
    })
}

/// The node's TLS files, from flags, the config file and the defaults beside `tls_dir`.
struct TlsFiles {
    dir: PathBuf,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl TlsFiles {
    fn new(args: &Args, file: &config::FileConfig) -> TlsFiles {
        let dir = args
            .tls_dir
            .clone()
            .or(file.tls_dir.clone())
            .unwrap_or_else(|| PathBuf::from(join::DEFAULT_TLS_DIR));
        TlsFiles {
            ca_file: args
                .ca_file
                .clone()
                .or(file.ca_file.clone())
                .unwrap_or_else(|| join::ca_path(&dir)),
            cert_file: args
                .cert
                .clone()
                .or(file.cert.clone())
                .unwrap_or_else(|| join::cert_path(&dir)),
            key_file: args
                .key
                .clone()
                .or(file.key.clone())
                .unwrap_or_else(|| join::key_path(&dir)),
            dir,
        }
    }

    /// The node's name and identity from its certificate, which a name asked for must
    /// match.
    fn load(
        &self,
        asked_name: Option<String>,
    ) -> Result<(String, flame_protocol::endpoint::ClientIdentity), String> {
        std::fs::metadata(&self.ca_file).map_err(|e| {
            format!(
                "cannot read the CA file {}: {e}\nhint: `flame-node join` writes it next to the node's certificate",
                self.ca_file.display()
            )
        })?;
        let (identity, certified) =
            join::load_node_identity(&self.dir, &self.cert_file, &self.key_file)?;
        if let Some(asked) = asked_name.filter(|asked| *asked != certified) {
            return Err(format!(
                "this node is called `{asked}` (--name or `name` in --config), but its certificate {} names node `{certified}`\n\
                 hint: drop --name to run as `{certified}`, or join again with --name {asked}",
                self.cert_file.display()
            ));
        }
        Ok((certified, identity))
    }
}

/// What the node offers: detected, overridden, less what is reserved.
fn allocatable(args: &Args, file: &config::FileConfig) -> Result<NodeResources, String> {
    let detected = capacity::detect();
    let cpu_millis = match args.cpus.or(file.cpus) {
        Some(c) => config::cpu_millis("--cpus", c)?,
        None => detected.cpu_millis,
    };
    if cpu_millis == 0 {
        return Err("--cpus: a node must offer more than 0 cpus".to_string());
    }
    let memory_bytes = match (&args.memory, &file.memory) {
        (Some(m), _) => config::parse_size("memory", m)?,
        (None, Some(m)) => m.bytes("memory")?,
        (None, None) => detected.memory_bytes,
    };
    let gpus = gpus(args, file, &detected)?;
    let reserve_cpu = match args.reserve_cpus.or(file.reserve_cpus) {
        Some(c) => config::cpu_millis("reserve_cpus", c)?,
        None => 0,
    };
    let reserve_memory = match (&args.reserve_memory, &file.reserve_memory) {
        (Some(m), _) => config::parse_size("reserve_memory", m)?,
        (None, Some(m)) => m.bytes("reserve_memory")?,
        (None, None) => 0,
    };
    if reserve_cpu >= cpu_millis {
        return Err(format!(
            "reserve_cpus ({}) leaves nothing of the {} cpus for executors",
            flame_protocol::model::format_cpus(reserve_cpu),
            flame_protocol::model::format_cpus(cpu_millis)
        ));
    }
    if reserve_memory >= memory_bytes && memory_bytes > 0 {
        return Err("reserve_memory leaves no memory for executors".to_string());
    }
    Ok(NodeResources {
        cpu_millis: cpu_millis - reserve_cpu,
        memory_bytes: memory_bytes.saturating_sub(reserve_memory),
        gpus,
    })
}

/// The GPUs offered: those `--gpus` (or the config) names, as detected where they were,
/// else every one detected.
fn gpus(
    args: &Args,
    file: &config::FileConfig,
    detected: &capacity::Capacity,
) -> Result<Vec<GpuInfo>, String> {
    let gpu_override: Option<Vec<u32>> = match &args.gpus {
        Some(list) if list == "none" || list.is_empty() => Some(Vec::new()),
        Some(list) => Some(
            list.split(',')
                .map(|g| {
                    g.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("--gpus: `{g}` is not a GPU index"))
                })
                .collect::<Result<_, _>>()?,
        ),
        None => file.gpus.clone(),
    };
    Ok(match gpu_override {
        Some(indices) => indices
            .into_iter()
            .map(|index| {
                let found = detected.gpus.iter().find(|g| g.index == index);
                GpuInfo {
                    index,
                    name: found.map_or_else(|| "configured".to_string(), |g| g.name.clone()),
                    uuid: found.map_or_else(String::new, |g| g.uuid.clone()),
                    memory_bytes: found.map_or(0, |g| g.memory_bytes),
                }
            })
            .collect(),
        None => detected
            .gpus
            .iter()
            .map(|g| GpuInfo {
                index: g.index,
                name: g.name.clone(),
                uuid: g.uuid.clone(),
                memory_bytes: g.memory_bytes,
            })
            .collect(),
    })
}

/// The executors' cgroup tree, if cgroups are on and can be had (required as root).
fn executor_cgroups(
    args: &Args,
    file: &config::FileConfig,
    name: &str,
    root: bool,
) -> Result<Option<cgroup::CgroupTree>, String> {
    let mode = args.cgroups.or(file.cgroups).unwrap_or(CgroupMode::Auto);
    let cgroup_root = args
        .cgroup_root
        .clone()
        .or(file.cgroup_root.clone())
        .unwrap_or_else(|| format!("flame-node-{name}"));
    Ok(match mode {
        CgroupMode::Off => None,
        CgroupMode::Auto => match cgroup::CgroupTree::detect(&cgroup_root) {
            Ok(tree) => Some(tree),
            Err(e) if root => {
                return Err(format!(
                    "cannot set up executor cgroups: {e}\nhint: run with `--cgroups off` to run executors without limits or accounting"
                ))
            }
            Err(e) => {
                tracing::warn!("running executors without cgroups (no limits, no accounting): {e}");
                None
            }
        },
    })
}

/// The node's folders: the executors' working and runtime folders' parents and the logs.
struct NodeDirs {
    work: PathBuf,
    runtime: PathBuf,
    log: PathBuf,
}

impl NodeDirs {
    /// Creates them (mode 0755, the log folder 0700), checks that they are the node's own,
    /// and, where executors run as their owners, that those can reach them.
    fn create(
        args: &Args,
        file: &config::FileConfig,
        identity: &executor::IdentityMode,
    ) -> Result<NodeDirs, String> {
        let work = args
            .work_dir
            .clone()
            .or(file.work_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/var/lib/flame/node"));
        let runtime = args
            .runtime_dir
            .clone()
            .or(file.runtime_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/run/flame/node"));
        let log = args
            .log_dir
            .clone()
            .or(file.log_dir.clone())
            .unwrap_or_else(|| PathBuf::from("/var/log/flame/node"));
        for (what, dir, mode) in [
            ("work", &work, 0o755),
            ("runtime", &runtime, 0o755),
            ("log", &log, 0o700),
        ] {
            std::fs::create_dir_all(dir).map_err(|e| {
                format!("cannot create the {what} directory {}: {e}", dir.display())
            })?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).map_err(|e| {
                format!(
                    "cannot set the mode of the {what} directory {}: {e}",
                    dir.display()
                )
            })?;
            owned_by_node(what, dir)?;
        }
        if matches!(
            identity,
            executor::IdentityMode::OwnerUid | executor::IdentityMode::SiteUser
        ) {
            reachable_by_executors("work", &work)?;
            reachable_by_executors("runtime", &runtime)?;
        }
        Ok(NodeDirs { work, runtime, log })
    }
}

/// The node's own folders must be real folders of the node's user: executors' private
/// folders are made inside them through handles (`flame_shims::private_dir`), which is
/// safe only while no executor user can replace or write the folder above.
fn owned_by_node(what: &str, dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot read the {what} directory {}: {e}", dir.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        return Err(format!(
            "the {what} directory {} is not a directory (a link?)\nhint: give the node a \
             real folder of its own",
            dir.display()
        ));
    }
    if meta.uid() != me || meta.permissions().mode() & 0o022 != 0 {
        return Err(format!(
            "the {what} directory {} belongs to uid {} with mode {:04o}; the node (uid {me}) \
             needs it to be its own and writable by no one else",
            dir.display(),
            meta.uid(),
            meta.permissions().mode() & 0o7777
        ));
    }
    Ok(())
}

/// Executors run as their owners' own uids: every folder above their work and runtime
/// folders must let others pass, or every launch fails at its `chdir` with a bare EACCES.
fn reachable_by_executors(what: &str, dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt as _;
    for folder in dir.ancestors() {
        let meta = std::fs::metadata(folder)
            .map_err(|e| format!("cannot read {}: {e}", folder.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o001 == 0 {
            return Err(format!(
                "executors could not reach the {what} folder {}: {} has mode {mode:04o}\n\
                 hint: executors run as their owners' own uids (--executor-identity), so every \
                 folder above it must let others pass: chmod o+x {}",
                dir.display(),
                folder.display(),
                folder.display()
            ));
        }
    }
    Ok(())
}

/// A copy of the cluster CA certificate (public) that every executor may read, for the
/// ranks' `flame-mpi-agent` (`FLAME_CA_FILE`): executors run as their owners' identities,
/// which cannot enter the node's private TLS folder. Written to a temporary file in the
/// runtime folder (root's, mode 0755: no executor can plant a link there) and renamed.
fn publish_ca(
    ca_file: &std::path::Path,
    runtime_dir: &std::path::Path,
) -> Result<std::path::PathBuf, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let bytes = std::fs::read(ca_file)
        .map_err(|e| format!("cannot read the cluster CA {}: {e}", ca_file.display()))?;
    let public = runtime_dir.join("ca.crt");
    let temp = runtime_dir.join(format!(".ca.crt.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&temp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&temp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, &public)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        format!("cannot publish the cluster CA as {}: {e}", public.display())
    })?;
    Ok(public)
}

/// What every rank of a batch job gets besides its own variables: where the head is, for
/// programs of the job that talk to Flame, and the launcher Open MPI's `mpirun` uses to
/// start its daemons through Flame (`flame-mpi-agent`, next to this binary).
fn job_environment(head: &str, ca_file: &std::path::Path) -> Vec<(String, String)> {
    let agent = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("flame-mpi-agent")))
        .filter(|p| p.exists())
        .map_or_else(
            || "flame-mpi-agent".to_string(),
            |p| p.display().to_string(),
        );
    vec![
        ("FLAME_HEAD".into(), head.to_string()),
        ("FLAME_CA_FILE".into(), ca_file.display().to_string()),
        ("OMPI_MCA_plm_rsh_agent".into(), agent),
    ]
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
        _ => std::future::pending::<()>().await,
    }
}

/// Who executors run as, from `--executor-identity` and `--executor-user`; the fixed user
/// only by explicit choice, and a user given without it is an error, not ignored.
fn identity_mode(
    choice: Option<config::IdentityChoice>,
    executor_user: Option<String>,
    allow_root: bool,
    root: bool,
) -> Result<executor::IdentityMode, String> {
    use config::IdentityChoice;
    use executor::IdentityMode;
    if !root {
        let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.name);
        tracing::warn!(
            "flame-node is not root: every executor runs as its own user `{me}`, whatever its \
             owner; owners are not isolated from each other (flame node list says so)"
        );
        return Ok(IdentityMode::Unprivileged(me));
    }
    match (choice.unwrap_or(IdentityChoice::OwnerUid), executor_user) {
        (IdentityChoice::Fixed, None) => Err(
            "--executor-identity fixed needs --executor-user USER (executor_user in the config)"
                .to_string(),
        ),
        (IdentityChoice::Fixed, Some(user)) => {
            let found = launcher::resolve_credentials(&user, None)
                .map_err(|e| format!("--executor-user: {e}"))?;
            if found.uid == 0 && !allow_root {
                return Err(format!(
                    "--executor-user `{user}` is root; that needs --allow-root-executors"
                ));
            }
            tracing::warn!(
                "--executor-identity fixed: every owner's executors run as `{user}`; owners are \
                 not isolated from each other on this node (flame node list says so)"
            );
            Ok(IdentityMode::Fixed(user))
        }
        (choice, Some(user)) => Err(format!(
            "--executor-user `{user}` applies only with --executor-identity fixed (this node is \
             {}); leave it out, or choose fixed to run every owner as one user",
            match choice {
                IdentityChoice::SiteUser => "site-user",
                _ => "owner-uid",
            }
        )),
        (IdentityChoice::OwnerUid, None) => Ok(IdentityMode::OwnerUid),
        (IdentityChoice::SiteUser, None) => Ok(IdentityMode::SiteUser),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use config::IdentityChoice;
    use executor::IdentityMode;

    #[test]
    fn the_fixed_user_only_by_explicit_choice_and_root_only_when_allowed() {
        assert_eq!(
            identity_mode(None, None, false, true),
            Ok(IdentityMode::OwnerUid)
        );
        assert_eq!(
            identity_mode(Some(IdentityChoice::SiteUser), None, false, true),
            Ok(IdentityMode::SiteUser)
        );
        let err = identity_mode(None, Some("nobody".into()), false, true).unwrap_err();
        assert!(
            err.contains("applies only with --executor-identity fixed"),
            "{err}"
        );
        let err = identity_mode(Some(IdentityChoice::Fixed), None, false, true).unwrap_err();
        assert!(err.contains("needs --executor-user"), "{err}");
        assert_eq!(
            identity_mode(
                Some(IdentityChoice::Fixed),
                Some("nobody".into()),
                false,
                true
            ),
            Ok(IdentityMode::Fixed("nobody".into()))
        );
        let err = identity_mode(
            Some(IdentityChoice::Fixed),
            Some("root".into()),
            false,
            true,
        )
        .unwrap_err();
        assert!(err.contains("needs --allow-root-executors"), "{err}");
        // An agent that is not root runs executors as itself, whatever was asked.
        assert!(matches!(
            identity_mode(Some(IdentityChoice::OwnerUid), None, false, false),
            Ok(IdentityMode::Unprivileged(_))
        ));
    }
}
