//! `flame-mpi-agent HOST COMMAND...`: Open MPI's `plm_rsh_agent` for jobs run with
//! `flame submit --mpi`. Where `mpirun` would run `ssh HOST COMMAND...` to start its daemon
//! on another node, it runs this instead: the head starts COMMAND on node HOST inside the
//! job's allocation there (the cgroup and user of one of the job's ranks), and relays its
//! output here. No ssh trust between nodes is needed.
//!
//! Like ssh, the words of COMMAND are joined with spaces and run by `/bin/sh -c` (Open MPI
//! quotes its daemon's arguments for a remote shell). Leading `-` options (ssh's) are
//! ignored. The job, the head and its CA come from the rank's environment (`FLAME_JOB_ID`,
//! `FLAME_HEAD`, `FLAME_CA_FILE`). The exit status is the command's, or 255 when it could
//! not be run (as ssh does).

use flame_client::{Client, ClientConfig, ConfigFlags};
use flame_protocol::messages::ExecEvent;
use flame_protocol::SessionId;
use std::io::Write as _;
use std::process::ExitCode;

/// What ssh exits with when the connection fails.
const AGENT_FAILED: u8 = 255;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&String> = args.iter().skip_while(|a| a.starts_with('-')).collect();
    let Some((host, command)) = words.split_first() else {
        eprintln!("flame-mpi-agent: usage: flame-mpi-agent HOST COMMAND...");
        return ExitCode::from(AGENT_FAILED);
    };
    if command.is_empty() {
        eprintln!("flame-mpi-agent: no command to run on {host}");
        return ExitCode::from(AGENT_FAILED);
    }
    let command = command
        .iter()
        .map(|w| w.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flame-mpi-agent: cannot start the async runtime: {e}");
            return ExitCode::from(AGENT_FAILED);
        }
    };
    match runtime.block_on(run(host, command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("flame-mpi-agent: error: {e:#}");
            ExitCode::from(AGENT_FAILED)
        }
    }
}

async fn run(host: &str, command: String) -> anyhow::Result<u8> {
    let job: SessionId = std::env::var("FLAME_JOB_ID")
        .map_err(|_| {
            anyhow::anyhow!("FLAME_JOB_ID is not set: run me from a rank of `flame submit --mpi`")
        })?
        .parse()
        .map_err(|e| anyhow::anyhow!("FLAME_JOB_ID is not a job id: {e}"))?;
    let config = ClientConfig::resolve(&ConfigFlags::default())?;
    let client = Client::connect(&config).await?;
    let result = relay(&client, job, host, command).await;
    client.close().await;
    result
}

async fn relay(client: &Client, job: SessionId, host: &str, command: String) -> anyhow::Result<u8> {
    let argv = vec!["/bin/sh".to_string(), "-c".to_string(), command];
    let mut stream = client.job_exec(job, host, argv).await?;
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    while let Some(event) = stream.next().await {
        match event? {
            ExecEvent::Stdout(bytes) => {
                stdout.write_all(&bytes)?;
                stdout.flush()?;
            }
            ExecEvent::Stderr(bytes) => {
                stderr.write_all(&bytes)?;
                stderr.flush()?;
            }
            ExecEvent::Exited { code } => {
                return Ok(u8::try_from(code).unwrap_or(AGENT_FAILED));
            }
            ExecEvent::Failed { reason } => {
                anyhow::bail!("cannot run the command on node {host} of job {job}: {reason}")
            }
        }
    }
    anyhow::bail!("the head ended the stream before the command on {host} ended")
}
