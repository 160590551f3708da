//! What executors (and the link) do with the node's object cache: resolve a task's input
//! or a session's common data that is an object (from the cache, else fetched from the
//! nodes the head named, the copy then kept here), keep a large output as an object, and
//! fetch the copies the head asks for.

use crate::objects::{CacheConfig, GrantKeyCell, ObjectStore};
// STAND-IN: at merge this becomes `use flame_protocol::object_transfer::ObjectClient;`.
use bytes::Bytes;
use flame_protocol::limits;
use flame_protocol::object::{digest, ObjectEvent, ObjectRef, ObjectScope, ObjectSources, Payload};
use flame_protocol::object_transfer::ObjectClient;
use flame_protocol::SessionId;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Outputs at least this large are hashed off the runtime's thread.
const HASH_INLINE_BYTES_MAX: usize = 1024 * 1024;

/// The node's object cache and its service, shared by the link and every executor.
pub struct NodeObjects {
    pub store: ObjectStore,
    /// Reads objects from other nodes (with this node's certificate).
    pub client: ObjectClient,
    /// The head's grant key, for the servers; set at each registration.
    pub grant_key: GrantKeyCell,
    /// Outputs larger than this are kept as objects (from the head's `Registered`).
    inline_max: AtomicU64,
    /// Task outputs larger than this fail their task (the head's
    /// `--task-output-bytes-max`, learnt at registration).
    output_max: AtomicU64,
    /// Fetches at once, for executors and the head's replications
    /// ([`limits::NODE_OBJECT_FETCHES_MAX`]).
    fetches: Arc<Semaphore>,
    /// What the node registers of its service.
    pub port: u16,
    pub advertise: Option<SocketAddr>,
    pub host: String,
    pub socket: Option<String>,
}

impl std::fmt::Debug for NodeObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeObjects")
            .field("port", &self.port)
            .field("advertise", &self.advertise)
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// Where the node serves objects, once its endpoints are bound.
pub struct Service {
    pub port: u16,
    pub advertise: Option<SocketAddr>,
    pub host: String,
    pub socket: Option<String>,
}

impl NodeObjects {
    /// The node's objects: a store and a client, and what it registers.
    pub fn new(store: ObjectStore, client: ObjectClient, service: Service) -> NodeObjects {
        NodeObjects {
            store,
            client,
            grant_key: GrantKeyCell::default(),
            inline_max: AtomicU64::new(limits::OBJECT_INLINE_BYTES_DEFAULT),
            output_max: AtomicU64::new(limits::TASK_OUTPUT_BYTES_MAX),
            fetches: Arc::new(Semaphore::new(limits::NODE_OBJECT_FETCHES_MAX)),
            port: service.port,
            advertise: service.advertise,
            host: service.host,
            socket: service.socket,
        }
    }

    /// Opens the store with its event queue ([`limits::NODE_OBJECT_EVENTS_MAX`]), whose
    /// receiver the link drains.
    pub fn open_store(
        config: CacheConfig,
    ) -> Result<(ObjectStore, mpsc::Receiver<ObjectEvent>), String> {
        let (events, events_rx) = mpsc::channel(limits::NODE_OBJECT_EVENTS_MAX);
        let spill = config.spill_dir.display().to_string();
        let store = ObjectStore::open(config, events)
            .map_err(|e| format!("cannot open the object cache (spill folder {spill}): {e}"))?;
        Ok((store, events_rx))
    }

    /// The head's threshold for outputs, from its `Registered`.
    pub fn set_inline_max(&self, bytes: u64) {
        self.inline_max.store(bytes, Ordering::Relaxed);
    }

    /// Sets the largest task output kept (the head's, from its registration answer).
    pub fn set_output_max(&self, bytes: u64) {
        self.output_max.store(bytes, Ordering::Relaxed);
    }

    /// The input's bytes: inline as they are, an object from the cache, else fetched from
    /// `sources` (and the copy kept with scope `Session(session)`, so later tasks and
    /// placement count it). `Err`: why not, naming the object.
    pub async fn resolve(
        &self,
        owner: &str,
        session: SessionId,
        input: &Payload,
        sources: Option<&ObjectSources>,
    ) -> Result<Bytes, String> {
        let object = match input {
            Payload::Inline(bytes) => return Ok(bytes.clone()),
            Payload::Object(object) => *object,
        };
        let local = match self.store.open_read(owner, &object.id) {
            Ok(reader) => reader.read_all().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let local_error = match local {
            Ok(bytes) => return Ok(bytes),
            Err(e) => e,
        };
        let Some(sources) = sources.filter(|s| s.object.id == object.id) else {
            return Err(format!(
                "object {} is not on this node ({local_error}), and the head named no node \
                 holding it",
                object.id
            ));
        };
        let bytes = self.fetch(owner, object, sources).await?;
        let scope = ObjectScope::Session(session);
        // A spare copy: the node it came from holds the object, so this one may be dropped
        // when room is needed. The head hears of it and counts it for later placement.
        match self
            .store
            .insert_spare(owner, object, scope, bytes.clone())
            .await
        {
            Ok(()) => self.store.announce(owner, object, scope),
            // The task has its bytes; only later tasks miss the copy.
            Err(e) => {
                tracing::warn!(object = %object.id, "cannot keep a fetched object in the cache: {e}");
            }
        }
        Ok(bytes)
    }

    /// Reads `object` from `sources`, one of [`limits::NODE_OBJECT_FETCHES_MAX`] at once
    /// (each bounded by the transfer's stall timeout, so the wait for a turn is too).
    async fn fetch(
        &self,
        owner: &str,
        object: ObjectRef,
        sources: &ObjectSources,
    ) -> Result<Bytes, String> {
        let _turn = self
            .fetches
            .acquire()
            .await
            .map_err(|_| format!("cannot fetch object {}: the node is stopping", object.id))?;
        self.get(owner, object, sources).await
    }

    /// Reads `object` from `sources` (the caller holds a fetch slot).
    async fn get(
        &self,
        owner: &str,
        object: ObjectRef,
        sources: &ObjectSources,
    ) -> Result<Bytes, String> {
        self.client
            .get(owner, object, &sources.endpoints, &sources.grant)
            .await
            .map_err(|e| {
                format!(
                    "cannot fetch object {} from {} node(s): {e}",
                    object.id,
                    sources.endpoints.len()
                )
            })
    }

    /// The head's `Replicate`: fetches a copy from `sources` and keeps it with `scope`, on
    /// its own task, in one of the node's fetch slots; `Err` (why) when none is free: a
    /// replication never queues behind the executors' fetches.
    pub fn start_replicate(
        self: Arc<Self>,
        owner: String,
        scope: ObjectScope,
        sources: ObjectSources,
    ) -> Result<(), String> {
        let object = sources.object;
        if self.store.contains(&owner, &object.id) {
            return Ok(());
        }
        let Ok(turn) = self.fetches.clone().try_acquire_owned() else {
            return Err(format!(
                "replication of object {} of {owner} skipped: the node runs {} fetches already",
                object.id,
                limits::NODE_OBJECT_FETCHES_MAX
            ));
        };
        tokio::spawn(async move { self.replicate(turn, &owner, scope, &sources).await });
        Ok(())
    }

    async fn replicate(
        &self,
        _turn: OwnedSemaphorePermit,
        owner: &str,
        scope: ObjectScope,
        sources: &ObjectSources,
    ) {
        let object = sources.object;
        let kept = match self.get(owner, object, sources).await {
            Ok(bytes) => match self.store.insert(owner, object, scope, bytes).await {
                Ok(()) => {
                    self.store.announce(owner, object, scope);
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            tracing::warn!(object = %object.id, %owner, "replication failed: {e}");
        }
    }

    /// A task's output as the head gets it: inline up to the head's threshold, else kept
    /// in the cache (scope `Session(session)`) and named. A cache that refuses it fails the
    /// task with the cache's reason: an output is never lost silently.
    pub async fn output(
        &self,
        owner: &str,
        session: SessionId,
        out: Bytes,
    ) -> flame_protocol::model::TaskOutcome {
        use flame_protocol::model::TaskOutcome;
        let size = out.len() as u64;
        let output_max = self.output_max.load(Ordering::Relaxed);
        if size > output_max {
            return TaskOutcome::Failed(output_too_large(size, output_max));
        }
        if size <= self.inline_max.load(Ordering::Relaxed) {
            return TaskOutcome::Succeeded(out);
        }
        let (object, chunks) = if out.len() < HASH_INLINE_BYTES_MAX {
            digest(&out)
        } else {
            let bytes = out.clone();
            match tokio::task::spawn_blocking(move || digest(&bytes)).await {
                Ok(digested) => digested,
                Err(e) => return TaskOutcome::Failed(format!("cannot hash the output: {e}")),
            }
        };
        let scope = ObjectScope::Session(session);
        // Hashed once, here: the store takes the digest rather than hashing again.
        let stored = self
            .store
            .insert_digested(owner, object, scope, chunks, out, false)
            .await;
        match stored {
            Ok(()) => TaskOutcome::Object(object),
            Err(e) => TaskOutcome::Failed(format!(
                "the task's output ({size} bytes, over the {} inline) could not be kept in \
                 the node's object cache: {e}",
                self.inline_max.load(Ordering::Relaxed)
            )),
        }
    }
}

/// Why a task whose output is `size` bytes failed, the limit being `max`.
pub fn output_too_large(size: u64, max: u64) -> String {
    format!(
        "the task's output is {size} bytes; the head takes at most {max} bytes per output \
         (flame-head --task-output-bytes-max): put larger results somewhere else and return \
         where"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use flame_protocol::model::TaskOutcome;

    /// A node's objects with a cache of `memory` bytes in memory and none on disk.
    fn objects(memory: u64, dir: &std::path::Path) -> NodeObjects {
        let (store, _events) = NodeObjects::open_store(CacheConfig {
            memory_bytes: memory,
            disk_bytes: 0,
            spill_dir: dir.to_path_buf(),
        })
        .unwrap();
        let trust = flame_protocol::endpoint::Trust::Pinned([0; 32]);
        let client = ObjectClient::new(&trust, None).unwrap();
        let service = Service {
            port: 1,
            advertise: None,
            host: "h".into(),
            socket: None,
        };
        NodeObjects::new(store, client, service)
    }

    #[tokio::test]
    async fn outputs_past_the_threshold_are_kept_and_read_back_as_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(1 << 20, dir.path());
        o.set_inline_max(4);
        let small = o
            .output("a", SessionId(1), Bytes::from_static(b"four"))
            .await;
        assert_eq!(small, TaskOutcome::Succeeded(Bytes::from_static(b"four")));
        let out = Bytes::from_static(b"more than four");
        let TaskOutcome::Object(object) = o.output("a", SessionId(1), out.clone()).await else {
            panic!("expected an object");
        };
        assert_eq!(object, ObjectRef::of(&out));
        let input = Payload::Object(object);
        assert_eq!(o.resolve("a", SessionId(2), &input, None).await, Ok(out));
        // Another owner's task cannot read it, and the error names the object.
        let err = o
            .resolve("b", SessionId(2), &input, None)
            .await
            .unwrap_err();
        assert!(err.contains(&object.id.to_string()), "{err}");
    }

    #[tokio::test]
    async fn an_output_over_the_heads_limit_fails_its_task_and_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(1 << 20, dir.path());
        o.set_inline_max(4);
        o.set_output_max(16);
        let at = o.output("a", SessionId(1), vec![1u8; 16].into()).await;
        assert!(matches!(at, TaskOutcome::Object(_)), "{at:?}");
        let over = o.output("a", SessionId(1), vec![2u8; 17].into()).await;
        let TaskOutcome::Failed(why) = over else {
            panic!("{over:?}");
        };
        assert!(
            why.contains("17 bytes") && why.contains("at most 16 bytes"),
            "{why}"
        );
        let kept = ObjectRef::of(&Bytes::from(vec![2u8; 17]));
        assert!(o
            .resolve("a", SessionId(1), &Payload::Object(kept), None)
            .await
            .is_err());
    }

    #[tokio::test]
    async fn an_output_the_cache_refuses_fails_the_task_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let o = objects(8, dir.path());
        o.set_inline_max(4);
        let outcome = o.output("a", SessionId(1), vec![1u8; 64].into()).await;
        let TaskOutcome::Failed(why) = outcome else {
            panic!("expected a failure, got {outcome:?}");
        };
        assert!(why.contains("could not be kept"), "{why}");
    }
}
