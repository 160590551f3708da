//! Man pages and shell completions of Flame's commands, generated from the same clap
//! definitions that parse their command lines, so they cannot drift from them.
//!
//! Each binary (`flame`, `flame-head`, `flame-node`) has a hidden `generate-docs --out DIR`
//! subcommand that calls [`write_all`] with its own [`clap::Command`]; `packaging/build.sh`
//! runs it and packs what it writes. `flame completions SHELL` prints one script with
//! [`completions`].
//!
//! The daemons' pages are in section 8 (system administration) and the client's in
//! section 1. Besides following convention, this keeps `flame node`'s page (`flame-node.1`)
//! apart from the agent's (`flame-node.8`).
//!
//! The layout under `DIR` is that of the installed files, so packaging copies folders
//! whole:
//!
//! ```text
//! manS/NAME.S, manS/NAME-SUB.S, ...   one page per visible (sub)command, S the section
//! completions/bash/NAME               /usr/share/bash-completion/completions/
//! completions/zsh/_NAME               the zsh vendor completions folder
//! completions/fish/NAME.fish          /usr/share/fish/vendor_completions.d/
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// The shells completions are made for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// A file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {}: {source}", path.display())]
pub struct ManualsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> ManualsError + '_ {
    move |source| ManualsError {
        path: path.to_path_buf(),
        source,
    }
}

/// The manual section of a command's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// 1: user commands.
    User,
    /// 8: daemons and system administration.
    Admin,
}

impl Section {
    fn number(self) -> &'static str {
        match self {
            Section::User => "1",
            Section::Admin => "8",
        }
    }
}

/// Writes the man pages of `cmd` and of each of its visible subcommands in `section`, and
/// its bash, zsh and fish completions, under `out` (created if missing). Returns the files
/// written. Hidden subcommands (such as `generate-docs` itself) get no page.
pub fn write_all(
    cmd: clap::Command,
    section: Section,
    out: &Path,
) -> Result<Vec<PathBuf>, ManualsError> {
    let mut written = Vec::new();
    let man_dir = out.join(format!("man{}", section.number()));
    std::fs::create_dir_all(&man_dir).map_err(at(&man_dir))?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    write_pages(&cmd, section, &man_dir, &mut written)?;

    let name = cmd.get_name().to_string();
    for shell in SHELLS {
        let dir = out.join("completions").join(shell.to_string());
        std::fs::create_dir_all(&dir).map_err(at(&dir))?;
        let path = dir.join(completion_file_name(shell, &name));
        let mut script = Vec::new();
        completions(shell, cmd.clone(), &mut script);
        std::fs::write(&path, script).map_err(at(&path))?;
        written.push(path);
    }
    Ok(written)
}

/// The page of `cmd`, then those of its visible subcommands, depth first.
fn write_pages(
    cmd: &clap::Command,
    section: Section,
    dir: &Path,
    written: &mut Vec<PathBuf>,
) -> Result<(), ManualsError> {
    let man = clap_mangen::Man::new(cmd.clone()).section(section.number());
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page).map_err(at(&path))?;
    std::fs::write(&path, page).map_err(at(&path))?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, section, dir, written)?;
    }
    Ok(())
}

/// The name the shell looks the completion script of `bin` up by, in its vendor folder.
pub fn completion_file_name(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Bash => bin.to_string(),
        Shell::Zsh => format!("_{bin}"),
        Shell::Fish => format!("{bin}.fish"),
        other => clap_complete::Generator::file_name(&other, bin),
    }
}

/// Writes the completion script of `cmd` for `shell` to `out`.
pub fn completions(shell: Shell, mut cmd: clap::Command, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("demo")
            .version("1.2.3")
            .about("A demo command")
            .arg(
                clap::Arg::new("config")
                    .long("config")
                    .help("Its config file"),
            )
            .subcommand(
                clap::Command::new("token")
                    .about("Manage tokens")
                    .subcommand(clap::Command::new("create").about("Make a token")),
            )
            .subcommand(clap::Command::new("generate-docs").hide(true))
    }

    #[test]
    fn pages_for_each_visible_subcommand_and_three_completion_scripts() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(command(), Section::Admin, dir.path()).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "completions/bash/demo",
                "completions/fish/demo.fish",
                "completions/zsh/_demo",
                "man8/demo-token-create.8",
                "man8/demo-token.8",
                "man8/demo.8",
            ]
        );
        let page = std::fs::read_to_string(dir.path().join("man8/demo.8")).unwrap();
        assert!(page.contains("\\-\\-config"), "{page}");
        assert!(page.contains("demo\\-token(8)"), "{page}");
        assert!(
            !page.contains("generate"),
            "a hidden command is listed:\n{page}"
        );
        let fish = std::fs::read_to_string(dir.path().join("completions/fish/demo.fish")).unwrap();
        assert!(fish.contains("complete -c demo"), "{fish}");
        assert!(fish.contains("token"), "{fish}");
    }

    #[test]
    fn an_unwritable_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"").unwrap();
        let err = write_all(command(), Section::User, &file).unwrap_err();
        assert_eq!(err.path, file.join("man1"));
    }
}
