//! `flame object ...`: put, get, list and remove objects in the nodes' caches.
//!
//! The bytes go between this process and a node directly (a Unix socket with a memory
//! file descriptor on the same host, QUIC otherwise); the head only says where.

use super::GlobalArgs;
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Args, Subcommand};
use flame_client::report::HintExt as _;
use flame_protocol::limits::{OBJECT_BYTES_MAX, OBJECT_REPLICAS_MAX};
use flame_protocol::object::{ObjectId, ObjectInfo, ObjectOrigin, ObjectScope};
use flame_protocol::SessionId;
use serde::Serialize;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;

#[derive(Debug, Subcommand)]
pub enum ObjectCommand {
    /// Put a file (or stdin, `-`) into a node's cache and print its id
    Put(PutArgs),
    /// Write an object's bytes to a file or stdout
    Get(GetArgs),
    /// List your objects (of one session, or all)
    List(ListArgs),
    /// Remove objects: every node drops its copy
    Remove {
        /// Object ids, as `flame object list` shows them
        #[arg(required = true, value_name = "ID")]
        ids: Vec<ObjectId>,
    },
}

#[derive(Debug, Args)]
pub struct PutArgs {
    /// The file to put; `-` reads stdin
    pub file: PathBuf,
    /// Keep it as long as this session (its tasks may name it); without, it is kept until
    /// `flame object remove`
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,
    /// Copies on distinct nodes, so that it outlives a node
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(OBJECT_REPLICAS_MAX)))]
    pub replicas: u32,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// The object's id
    pub id: ObjectId,
    /// Write here (a new or replaced file) instead of stdout
    #[arg(long = "to", short = 'O', value_name = "FILE")]
    pub to: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this session's objects
    #[arg(long, value_name = "ID")]
    pub session: Option<u64>,
    #[command(flatten)]
    pub out: OutputArgs,
}

/// What `flame object put -o json` prints.
#[derive(Debug, Serialize)]
struct Put {
    id: ObjectId,
    size: u64,
}

pub async fn run(global: &GlobalArgs, cmd: ObjectCommand) -> anyhow::Result<()> {
    let owner = global.owner.clone();
    match cmd {
        ObjectCommand::Put(args) => {
            let bytes = read_input(&args.file)?;
            let session = args.session.map(SessionId);
            let object = super::with_client(global, |client| async move {
                client
                    .put_object(owner.as_deref(), session, bytes, args.replicas)
                    .await
                    .context("cannot put the object")
            })
            .await?;
            match args.out.output {
                OutputFormat::Json => render::print_json(&Put {
                    id: object.id,
                    size: object.size,
                }),
                OutputFormat::Table => {
                    outln!("{}", object.id)?;
                    Ok(())
                }
            }
        }
        ObjectCommand::Get(args) => {
            let id = args.id;
            let bytes = super::with_client(global, |client| async move {
                client
                    .get_object(owner.as_deref(), id)
                    .await
                    .with_context(|| format!("cannot get object {id}"))
                    .hint("`flame object list` shows your objects and where they are")
            })
            .await?;
            write_output(args.to.as_ref(), &bytes)
        }
        ObjectCommand::List(args) => {
            let session = args.session.map(SessionId);
            let objects = super::with_client(global, |client| async move {
                Ok(client.list_objects(owner.as_deref(), session).await?)
            })
            .await?;
            match args.out.output {
                OutputFormat::Json => render::print_json(&objects),
                OutputFormat::Table if objects.is_empty() => {
                    outln!("No objects.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&objects)?;
                    Ok(())
                }
            }
        }
        ObjectCommand::Remove { ids } => {
            let count = ids.len();
            super::with_client(global, |client| async move {
                Ok(client.remove_objects(owner.as_deref(), &ids).await?)
            })
            .await?;
            outln!("Removed {count} object(s).")?;
            Ok(())
        }
    }
}

/// The bytes of `file` (`-`: stdin), refused above [`OBJECT_BYTES_MAX`] before reading.
fn read_input(file: &PathBuf) -> anyhow::Result<Bytes> {
    let too_big = |size: u64| {
        anyhow::anyhow!(
            "{} is {}, more than the largest object ({})",
            file.display(),
            render::bytes(size),
            render::bytes(OBJECT_BYTES_MAX)
        )
    };
    if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .take(OBJECT_BYTES_MAX + 1)
            .read_to_end(&mut buf)
            .context("cannot read stdin")?;
        if buf.len() as u64 > OBJECT_BYTES_MAX {
            return Err(too_big(buf.len() as u64));
        }
        return Ok(buf.into());
    }
    let meta =
        std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", file.display());
    }
    if meta.len() > OBJECT_BYTES_MAX {
        return Err(too_big(meta.len()));
    }
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(bytes.into())
}

/// Writes `bytes` to `to` (through a temporary name, so a failed write leaves no half
/// file) or stdout.
fn write_output(to: Option<&PathBuf>, bytes: &[u8]) -> anyhow::Result<()> {
    let Some(path) = to else {
        let mut out = std::io::stdout().lock();
        out.write_all(bytes)
            .and_then(|()| out.flush())
            .map_err(crate::render::stdout_error)?;
        return Ok(());
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn scope(s: &ObjectScope) -> String {
    match s {
        ObjectScope::Session(id) => format!("session {id}"),
        ObjectScope::Kept => "kept".to_string(),
    }
}

fn origin(o: &ObjectOrigin) -> String {
    match o {
        ObjectOrigin::Put => "put".to_string(),
        ObjectOrigin::Output { session, task } => format!("output of {session}/{task}"),
    }
}

fn print_list(objects: &[ObjectInfo]) -> anyhow::Result<()> {
    let now = render::now_ms();
    let columns = [
        text("Id"),
        number("Size"),
        text("Lives"),
        text("Origin"),
        text("Nodes"),
        number("Replicas"),
        text("Created"),
    ];
    let rows = objects
        .iter()
        .map(|o| {
            vec![
                o.object.id.to_string(),
                render::bytes(o.object.size),
                scope(&o.scope),
                origin(&o.origin),
                if o.nodes.is_empty() {
                    "LOST".to_string()
                } else {
                    o.nodes.join(",")
                },
                o.replicas.to_string(),
                render::ago(o.created_ms, now),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}
