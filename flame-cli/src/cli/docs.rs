//! `flame completions SHELL`, and the hidden `flame generate-docs --out DIR` that packaging
//! runs: both from the clap definition of [`Cli`], through `flame-manuals`.

use super::Cli;
use anyhow::Context as _;
use clap::CommandFactory as _;
use std::io::Write as _;
use std::path::PathBuf;

/// `flame completions`'s arguments.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: flame_manuals::Shell,
}

/// `flame generate-docs`'s arguments.
#[derive(Debug, clap::Args)]
pub struct GenerateDocsArgs {
    /// Folder to write man1/ and completions/ to (created if missing)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Prints the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let mut script = Vec::new();
    flame_manuals::completions(args.shell, Cli::command(), &mut script);
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(&script).and_then(|()| stdout.flush()) {
        // A reader that stopped early (`| head`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("cannot write the completion script to stdout"),
    }
}

/// Writes the man pages and completion scripts of `flame` under `args.out`.
pub fn generate(args: GenerateDocsArgs) -> anyhow::Result<()> {
    flame_manuals::write_all(Cli::command(), flame_manuals::Section::User, &args.out)?;
    Ok(())
}
