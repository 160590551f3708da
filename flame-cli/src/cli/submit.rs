//! `flame submit`'s flags: a batch job of ranks started together (`-n`, run by `job.rs`),
//! or a task array over the lines of a file (`--each`, run by `each.rs`).
//!
//! Module arrows go one way: `each` and `job` read these flags, and this module imports
//! neither; `cli::run` picks between them.

use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Most ranks one job may ask for.
pub const RANKS_MAX: u32 = 65_536;

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// Number of ranks (processes started together, all or none)
    #[arg(short = 'n', long = "ranks", value_name = "RANKS", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(RANKS_MAX)),
          conflicts_with = "each")]
    pub ranks: u32,
    /// Exactly this many ranks on each node used (RANKS must be a multiple)
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..=i64::from(RANKS_MAX)),
          conflicts_with = "each")]
    pub ranks_per_node: Option<u32>,
    /// cpus per rank (e.g. 0.5) [default: 1]
    #[arg(long, value_name = "C", conflicts_with = "each")]
    pub cpus_per_rank: Option<String>,
    /// Memory limit per rank, also booked on its node (e.g. 512M, 8G; units are binary, as
    /// Slurm's: 1G = 1024 MiB) [default: 1G]
    #[arg(long, value_name = "M", conflicts_with = "each")]
    pub mem_per_rank: Option<String>,
    /// GPUs per rank
    #[arg(long, value_name = "G", default_value_t = 0, conflicts_with = "each")]
    pub gpus_per_rank: u32,
    /// Time limit: the job is stopped when it runs longer. Slurm's formats (minutes, MM:SS,
    /// HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) or units (90s, 10m, 1h30m)
    #[arg(short = 't', long = "time", value_name = "LIMIT", value_parser = super::parse_time_limit,
          conflicts_with = "each")]
    pub time_limit: Option<Duration>,
    /// A name for the job, shown by `flame job list`
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Print the job id and return at once; see `flame job`
    #[arg(long, conflicts_with = "each")]
    pub detach: bool,
    /// Prefix each output line with its rank, as `srun --label` does
    #[arg(long, conflicts_with = "each")]
    pub label: bool,
    /// Run COMMAND with `mpirun` on the first node, which starts its daemons through Flame
    #[arg(long, conflicts_with = "each")]
    pub mpi: bool,
    /// Priority among the owner's sessions and jobs
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
    /// Run COMMAND once per line of FILE (`-` for stdin), as tasks of one session on warm
    /// executors of the built-in `shell` application; `{}` in the arguments is the line
    #[arg(long, value_name = "FILE")]
    pub each: Option<PathBuf>,
    /// With --each: at most this many lines run at once
    #[arg(short = 'j', long = "jobs", value_name = "MAX", requires = "each",
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub jobs: Option<u32>,
    /// With --each: print each line's output as it arrives, not in input order
    #[arg(long, requires = "each")]
    pub unordered: bool,
    /// The command and its arguments, after `--` or, as with srun, after the flags
    /// (everything from the first word that is not a flag belongs to the command)
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}
