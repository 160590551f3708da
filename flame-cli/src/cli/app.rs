//! `flame app ...`

use super::GlobalArgs;
use crate::render::outln;
use crate::render::{self, number, text, OutputArgs, OutputFormat};
use anyhow::Context as _;
use clap::Subcommand;
use flame_client::app_file::load_app_file;
use flame_client::report::HintExt as _;
use flame_protocol::model::{ApplicationInfo, ErrorKind};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Subcommand)]
pub enum AppCommand {
    /// Register an application from a TOML file
    Register {
        /// The application file: name, command, and optionally shim, args, env, working_dir,
        /// user, group, users, groups, [resources], [selector], max_instances,
        /// delay_release, max_attempts, retry_on_error, task_timeout, allow_root (executors
        /// may run as root: only if the file says `allow_root = true` and the node runs
        /// with --allow-root-executors; default false)
        file: PathBuf,
    },
    /// Replace a registered application's spec from its TOML file (new executors use it;
    /// idle ones are released, busy ones when their session lets them go)
    Update {
        /// The application file; its `name` says which application
        file: PathBuf,
    },
    /// List registered applications
    List(OutputArgs),
    /// Show one application
    Show {
        name: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Remove an application that has no unfinished session
    Remove { name: String },
}

pub async fn run(global: &GlobalArgs, cmd: AppCommand) -> anyhow::Result<()> {
    match cmd {
        AppCommand::Register { file } => {
            // The file is checked before connecting, so its mistakes show without a head.
            let spec = load_app_file(&file)?;
            let name = spec.name.clone();
            let info = super::with_client(global, |client| async move {
                match client.register_application(spec).await {
                    Err(e) if e.kind() == Some(ErrorKind::AlreadyExists) => Err(e).hint(format!(
                        "`flame app update {}` replaces its spec (new sessions use it)",
                        file.display()
                    )),
                    other => other.with_context(|| format!("cannot register {}", file.display())),
                }
            })
            .await?;
            outln!("Application `{name}` registered: {}", command_line(&info))?;
            Ok(())
        }
        AppCommand::Update { file } => {
            let spec = load_app_file(&file)?;
            let name = spec.name.clone();
            let info = super::with_client(global, |client| async move {
                match client.update_application(spec).await {
                    Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
                        Err(e).hint("`flame app register FILE` registers a new application")
                    }
                    other => {
                        other.with_context(|| format!("cannot update from {}", file.display()))
                    }
                }
            })
            .await?;
            outln!("Application `{name}` updated: {}", command_line(&info))?;
            Ok(())
        }
        AppCommand::List(out) => {
            let apps = super::with_client(global, |client| async move {
                Ok(client.list_applications().await?)
            })
            .await?;
            match out.output {
                OutputFormat::Json => render::print_json(&apps),
                OutputFormat::Table if apps.is_empty() => {
                    outln!("No applications are registered.")?;
                    Ok(())
                }
                OutputFormat::Table => {
                    print_list(&apps)?;
                    Ok(())
                }
            }
        }
        AppCommand::Show { name, output } => {
            let info = super::with_client(global, |client| async move {
                Ok(client.get_application(&name).await?)
            })
            .await?;
            match output.output {
                OutputFormat::Json => render::print_json(&info),
                OutputFormat::Table => {
                    print_one(&info)?;
                    Ok(())
                }
            }
        }
        AppCommand::Remove { name } => {
            super::with_client(global, |client| async move {
                let removed = client.remove_application(&name).await;
                match removed {
                    Err(e) if e.kind() == Some(ErrorKind::FailedPrecondition) => Err(e).hint(
                        "end its sessions first: `flame session cancel ID` ends their tasks now; \
                         `flame session close ID` lets them finish",
                    ),
                    other => Ok(other?),
                }?;
                outln!("Application `{name}` removed.")?;
                Ok(())
            })
            .await
        }
    }
}

fn command_line(info: &ApplicationInfo) -> String {
    let spec = &info.spec;
    std::iter::once(spec.command.as_str())
        .chain(spec.args.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ")
}

fn delay(ms: u64) -> String {
    humantime::format_duration(Duration::from_millis(ms)).to_string()
}

fn shim(info: &ApplicationInfo) -> String {
    info.spec.shim.to_string()
}

fn print_list(apps: &[ApplicationInfo]) -> anyhow::Result<()> {
    let columns = [
        text("Name"),
        text("Shim"),
        text("Command"),
        text("Resources"),
        number("Max"),
        text("Delay release"),
        number("Executors"),
        number("Open sessions"),
    ];
    let rows = apps
        .iter()
        .map(|a| {
            vec![
                a.spec.name.clone(),
                shim(a),
                command_line(a),
                a.spec.resources.to_string(),
                render::group(u64::from(a.spec.max_instances)),
                delay(a.spec.delay_release_ms),
                render::group(u64::from(a.executors)),
                render::group(u64::from(a.open_sessions)),
            ]
        })
        .collect();
    render::print_table(&columns, rows)?;
    Ok(())
}

fn print_one(info: &ApplicationInfo) -> anyhow::Result<()> {
    let spec = &info.spec;
    let env = if spec.env.is_empty() {
        "-".to_string()
    } else {
        spec.env
            .iter()
            .map(|(k, v)| {
                if v.secret {
                    format!("{k}=(secret)")
                } else {
                    format!("{k}={}", v.value)
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    render::print_fields(vec![
        ("Name", spec.name.clone()),
        ("Shim", shim(info)),
        ("Command", spec.command.clone()),
        (
            "Args",
            if spec.args.is_empty() {
                "-".into()
            } else {
                spec.args.join(" ")
            },
        ),
        ("Env", env),
        (
            "Working dir",
            spec.working_dir.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "User",
            match (&spec.user, &spec.group) {
                (Some(u), Some(g)) => format!("{u}:{g}"),
                (Some(u), None) => u.clone(),
                (None, Some(g)) => format!("(each owner's own):{g}"),
                (None, None) => "(each owner's own)".into(),
            },
        ),
        (
            "Users",
            if spec.users.is_empty() && spec.groups.is_empty() {
                "everyone".into()
            } else if spec.users.is_empty() {
                "-".into()
            } else {
                spec.users.join(",")
            },
        ),
        (
            "Groups",
            if spec.groups.is_empty() {
                "-".into()
            } else {
                spec.groups.join(",")
            },
        ),
        ("Resources", spec.resources.to_string()),
        (
            "Selector",
            if spec.selector.is_empty() {
                "-".into()
            } else {
                spec.selector
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            },
        ),
        (
            "Max instances",
            render::group(u64::from(spec.max_instances)),
        ),
        ("Delay release", delay(spec.delay_release_ms)),
        ("Max attempts", spec.max_attempts.to_string()),
        (
            "Retry on error",
            if spec.retry_on_error { "yes" } else { "no" }.into(),
        ),
        (
            "Task timeout",
            spec.task_timeout_ms.map_or_else(|| "-".into(), delay),
        ),
        (
            "Allow root",
            if spec.allow_root { "yes" } else { "no" }.into(),
        ),
        ("Executors", render::group(u64::from(info.executors))),
        (
            "Open sessions",
            render::group(u64::from(info.open_sessions)),
        ),
    ])?;
    Ok(())
}
