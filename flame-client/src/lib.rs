//! The Flame client library, used by user programs and by the `flame` command (crate
//! `flame-cli`, the binary over this library). It has no command-line parsing, SSH,
//! progress-bar or table dependencies: those stay in `flame-cli`.
//!
//! A [`Client`] is one QUIC connection to the head; every call opens its own stream, so a
//! client may be cloned and used from many tasks at once. A [`Session`] submits task inputs
//! (one acknowledged call with [`Session::submit`], or pipelined with a [`Submitter`]) and
//! watches their results with a [`ResultStream`].
//!
//! ```no_run
//! use bytes::Bytes;
//! use flame_client::{Client, ClientConfig, ConfigFlags};
//! use flame_protocol::model::{SessionSpec, TaskOutcome};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // `--head`/`--ca-file`/`--token-file` flags, else FLAME_HEAD/FLAME_CA_FILE/
//! // FLAME_TOKEN_FILE, else the config files (see the `config` module).
//! let config = ClientConfig::resolve(&ConfigFlags::default())?;
//! let client = Client::connect(&config).await?;
//! let session = client
//!     .create_session(SessionSpec {
//!         application: "ping".into(),
//!         // Inline, or put to a node's cache first when larger than
//!         // `config.object_inline_max` (so are task inputs; outputs kept on a node
//!         // are fetched before `results.next()` hands them on).
//!         common_data: Bytes::new().into(),
//!         ephemeral: false,
//!         // Empty: the user the token names (an admin may set `--owner`, FLAME_OWNER or
//!         // `owner` in the config files to act for another). Executors are shared
//!         // between owners by the weights the head is given.
//!         owner: String::new(),
//!         // Among one owner's sessions, higher is served first.
//!         priority: 0,
//!         job: None,
//!     })
//!     .await?;
//! // Watch first, so that no result is missed; then submit and close.
//! let mut results = session.watch().await?;
//! let ids = session.submit(vec![Bytes::from("a"), Bytes::from("b")]).await?;
//! session.close().await?;
//! while let Some(batch) = results.next().await {
//!     for result in batch? {
//!         if let TaskOutcome::Succeeded(output) = &result.outcome {
//!             println!("task {}: {} bytes", result.task, output.len());
//!         }
//!     }
//! }
//! assert_eq!(ids.len(), 2);
//! client.close().await;
//! # Ok(())
//! # }
//! ```
//!
//! [`local::LocalCluster`] starts a head and a node on this machine, for tests, examples and
//! `flame local`.
//!
//! Modules and their arrows, which all go one way (no module uses one that uses it):
//! `session` (sessions, submitters, watchers; it also defines the [`Client`] calls that
//! hand out a [`Session`]) → `objects` (putting and getting objects, through the nodes'
//! caches, never the head) → `client` (the connection and its request calls) → `config` →
//! `app_file` (the application file format, whose TOML error text `config` reuses);
//! `session` and `objects` → `batch`; `local` (the local cluster) → `config`; `report` (`error:` and
//! `hint:` output) → the errors of `local`, `config` and `error`, which all of them use.

#![warn(missing_docs)]

pub mod app_file;
pub mod batch;
mod client;
pub mod config;
mod error;
pub mod local;
pub mod objects;
pub mod report;
mod session;
pub mod units;

pub use client::{Client, ExecStream, LogStream, CLOSE_TIMEOUT, LOG_SILENCE_MAX};
pub use config::{ClientConfig, ConfigError, ConfigFlags, IdentityFiles};
pub use error::ClientError;
pub use session::{
    BatchAck, ResultStream, Session, Submitter, SUBMIT_WINDOW_BATCHES, WATCH_BUFFER_FRAMES,
};
