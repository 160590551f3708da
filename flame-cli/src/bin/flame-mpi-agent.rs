//! `flame-mpi-agent HOST COMMAND...`: Open MPI's `plm_rsh_agent` for jobs run with
//! `flame submit --mpi`. Where `mpirun` would run `ssh HOST COMMAND...` to start its daemon
//! on another node, it runs this instead: the head starts COMMAND on node HOST inside the
//! job's allocation there (the cgroup and user of one of the job's ranks), and relays its
//! output here. No ssh trust between nodes is needed.
//!
//! Like ssh, the words of COMMAND are joined with spaces and run by `/bin/sh -c` (Open MPI
//! quotes its daemon's arguments for a remote shell). Leading `-` options (ssh's) are
//! ignored. The exit status is the command's, or 255 when it could not be run (as ssh
//! does).
//!
//! Everything else comes from the rank's environment, as the head and the node set it:
//! `FLAME_JOB_ID` (the job), `FLAME_HEAD` (where the head is), `FLAME_JOB_TOKEN` (the job's
//! credential, good only for starting commands in this job while it runs) and
//! `FLAME_CA_FILE` (the cluster CA; without it, the CA fingerprint in the credential is
//! trusted). The user's own client settings (config files, `FLAME_TOKEN`, ...) are not
//! read: the agent acts for the job, not for whoever submitted it.

use anyhow::anyhow;
use flame_client::config::{ENV_CA_FILE, ENV_HEAD};
use flame_client::report;
use flame_client::{Client, ClientConfig};
use flame_protocol::auth::{ParsedToken, Secret};
use flame_protocol::messages::ExecEvent;
use flame_protocol::SessionId;
use std::io::Write as _;
use std::process::ExitCode;

/// What ssh exits with when the connection fails.
const AGENT_FAILED: u8 = 255;
/// The variable in which the head gives a job's ranks their credential.
const ENV_JOB_TOKEN: &str = "FLAME_JOB_TOKEN";
/// The variable naming the job.
const ENV_JOB_ID: &str = "FLAME_JOB_ID";

/// What `--help` prints.
const HELP: &str = "\
flame-mpi-agent: Open MPI's remote-start agent for jobs run with `flame submit --mpi`.

usage: flame-mpi-agent HOST COMMAND...

Runs COMMAND (its words joined with spaces, under /bin/sh -c) on node HOST inside the
job's allocation there, as `ssh HOST COMMAND...` would, and relays its output. Leading
`-` options (ssh's) are ignored. Reads FLAME_JOB_ID, FLAME_HEAD, FLAME_JOB_TOKEN and
FLAME_CA_FILE from the rank's environment, which the head and the node set; `flame submit
--mpi` points Open MPI at it, so it is not run by hand.

Exits with COMMAND's status, or 255 when COMMAND could not be run (as ssh does).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Only alone: Open MPI always passes a host and a command, and ssh has no `--help`.
    if matches!(args.as_slice(), [only] if only == "--help" || only == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
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
            eprintln!("flame-mpi-agent: error: {}", report::message(&e));
            if let Some(hint) = report::hint_for(&e) {
                eprintln!("flame-mpi-agent: hint: {hint}");
            }
            ExitCode::from(AGENT_FAILED)
        }
    }
}

async fn run(host: &str, command: String) -> anyhow::Result<u8> {
    let (job, config) = job_config(|name| std::env::var(name).ok())?;
    let client = Client::connect(&config).await?;
    let result = relay(&client, job, host, command).await;
    client.close().await;
    result
}

/// The job and how to reach the head as that job, from the rank's environment (`env`
/// answers lookups; empty counts as unset). No error quotes the credential.
fn job_config(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<(SessionId, ClientConfig)> {
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    let missing = |name: &str| {
        anyhow!(
            "{name} is not set: flame-mpi-agent runs inside a rank of a job submitted with \
             `flame submit --mpi`, where the head and the node set it"
        )
    };
    let job: SessionId = var(ENV_JOB_ID)
        .ok_or_else(|| missing(ENV_JOB_ID))?
        .parse()
        .map_err(|e| anyhow!("{ENV_JOB_ID} is not a job id: {e}"))?;
    let head = var(ENV_HEAD).ok_or_else(|| missing(ENV_HEAD))?;
    let token = Secret::new(var(ENV_JOB_TOKEN).ok_or_else(|| missing(ENV_JOB_TOKEN))?);
    let token = Secret::new(token.expose().trim());
    ParsedToken::parse(token.expose())
        .map_err(|e| anyhow!("{ENV_JOB_TOKEN} is not a valid credential: {e}"))?;
    let config = match var(ENV_CA_FILE) {
        Some(ca_file) => ClientConfig::new(head, ca_file).with_token(token),
        None => ClientConfig::from_token(head, token),
    };
    Ok((job, config))
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use flame_protocol::auth::{hex, FINGERPRINT_BYTES, TOKEN_SECRET_BYTES};
    use flame_protocol::endpoint::Trust;
    use std::collections::HashMap;

    fn credential() -> String {
        ParsedToken {
            id: hex(&7u64.to_be_bytes()),
            secret: [0xab; TOKEN_SECRET_BYTES],
            ca_fingerprint: [0x5c; FINGERPRINT_BYTES],
        }
        .to_secret()
        .expose()
        .to_string()
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn the_job_credential_and_the_ca_come_from_the_environment() {
        let token = credential();
        let (job, config) = job_config(env_of(&[
            (ENV_JOB_ID, "7"),
            (ENV_HEAD, "h:1"),
            (ENV_CA_FILE, "/ca.crt"),
            (ENV_JOB_TOKEN, &format!("{token}\n")),
        ]))
        .unwrap();
        assert_eq!(job, SessionId(7));
        assert_eq!(config.head, "h:1");
        assert_eq!(
            config.token.as_ref().map(Secret::expose),
            Some(token.as_str())
        );
        assert!(matches!(config.trust(), Ok(Trust::CaFile(_))));
        // Without a CA file, the credential's CA fingerprint is trusted.
        let (_, pinned) = job_config(env_of(&[
            (ENV_JOB_ID, "7"),
            (ENV_HEAD, "h:1"),
            (ENV_JOB_TOKEN, &token),
        ]))
        .unwrap();
        assert!(matches!(pinned.trust(), Ok(Trust::Pinned(fp)) if fp == [0x5c; 32]));
    }

    #[test]
    fn a_missing_or_malformed_credential_is_a_clear_error() {
        let err = job_config(env_of(&[(ENV_JOB_ID, "7"), (ENV_HEAD, "h:1")])).unwrap_err();
        assert!(err.to_string().contains(ENV_JOB_TOKEN), "{err}");
        assert!(err.to_string().contains("flame submit --mpi"), "{err}");
        let token = credential();
        let broken = &token[..token.len() - 1];
        let err = job_config(env_of(&[
            (ENV_JOB_ID, "7"),
            (ENV_HEAD, "h:1"),
            (ENV_JOB_TOKEN, broken),
        ]))
        .unwrap_err();
        let shown = format!("{err:#} {err:?}");
        assert!(shown.contains(ENV_JOB_TOKEN), "{shown}");
        assert!(!shown.contains("abababab"), "{shown}");
        let err = job_config(env_of(&[(ENV_JOB_ID, "7"), (ENV_JOB_TOKEN, &token)])).unwrap_err();
        assert!(err.to_string().contains(ENV_HEAD), "{err}");
    }
}
