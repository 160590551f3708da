//! The head's settings: command-line flags over an optional TOML file over defaults.

use anyhow::Context;
use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "flame-head", version, about = "The head of a Flame cluster")]
pub struct Args {
    /// TOML configuration file (flags given here override it).
    #[arg(long, env = "FLAME_HEAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory holding the state (state.redb) and the TLS identity.
    #[arg(long, env = "FLAME_HEAD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on (UDP, QUIC).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Extra DNS names or IP addresses for the head's certificate (created on first start).
    #[arg(long = "tls-san")]
    pub tls_san: Vec<String>,
    /// Largest task input (and session common data) accepted, in bytes.
    #[arg(long)]
    pub task_input_bytes_max: Option<usize>,
}

/// The TOML file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    listen: Option<SocketAddr>,
    #[serde(default)]
    tls_san: Vec<String>,
    task_input_bytes_max: Option<usize>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct HeadConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub tls_san: Vec<String>,
    pub task_input_bytes_max: usize,
}

impl HeadConfig {
    pub fn resolve(args: Args) -> anyhow::Result<HeadConfig> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                toml::from_str::<FileConfig>(&text)
                    .with_context(|| format!("invalid configuration file {}", path.display()))?
            }
            None => FileConfig::default(),
        };
        let task_input_bytes_max = args
            .task_input_bytes_max
            .or(file.task_input_bytes_max)
            .unwrap_or(flame_protocol::limits::TASK_INPUT_BYTES_MAX);
        // Inputs must fit in a frame together with their batch envelope.
        let frame_room = flame_protocol::limits::FRAME_BYTES_MAX - 64 * 1024;
        if task_input_bytes_max == 0 || task_input_bytes_max > frame_room {
            anyhow::bail!(
                "task_input_bytes_max must be between 1 and {frame_room} bytes, not {task_input_bytes_max}"
            );
        }
        let mut tls_san = file.tls_san;
        tls_san.extend(args.tls_san);
        Ok(HeadConfig {
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/flame/head")),
            listen: args.listen.or(file.listen).unwrap_or_else(|| {
                SocketAddr::from(([0, 0, 0, 0], flame_protocol::DEFAULT_HEAD_PORT))
            }),
            tls_san,
            task_input_bytes_max,
        })
    }
}
