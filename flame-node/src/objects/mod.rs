// STAND-IN: replaced at merge by the cache engineer's module (flame-node/src/objects/),
// and `object_transfer` below by `flame_protocol::object_transfer` (the transfer
// engineer's). It holds only the API of the issue-20 contract that the node's link, start-up
// and executors call, with minimal in-memory bodies so the node builds and its tests run
// meanwhile. Delete this whole file at merge; the one line to change elsewhere is the
// `use crate::objects::object_transfer` in `executor/objects.rs` (marked there).
#![allow(dead_code, clippy::unused_async)]

use bytes::Bytes;
use flame_protocol::object::{CacheUsage, GrantKey, ObjectEvent, ObjectId, ObjectRef, ObjectScope};
use flame_protocol::SessionId;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

/// The cache's budgets and spill folder.
pub struct CacheConfig {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub spill_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache full: {reason}")]
    Full { reason: String },
    #[error("object {id} is not in this node's cache")]
    NotFound { id: ObjectId },
    #[error("object bytes do not match their id {id}")]
    Corrupt { id: ObjectId },
}

type Entries = HashMap<(String, ObjectId), (Bytes, ObjectScope)>;

/// STAND-IN cache: memory only.
#[derive(Clone)]
pub struct ObjectStore {
    entries: Arc<Mutex<Entries>>,
    memory_bytes: u64,
    events: mpsc::Sender<ObjectEvent>,
}

/// STAND-IN reader.
pub struct ObjectReader {
    object: ObjectRef,
    bytes: Bytes,
}

impl ObjectReader {
    pub fn object(&self) -> ObjectRef {
        self.object
    }
    pub async fn read_all(&self) -> Result<Bytes, CacheError> {
        Ok(self.bytes.clone())
    }
}

impl ObjectStore {
    pub fn open(
        config: CacheConfig,
        events: mpsc::Sender<ObjectEvent>,
    ) -> Result<ObjectStore, CacheError> {
        Ok(ObjectStore {
            entries: Arc::default(),
            memory_bytes: config.memory_bytes,
            events,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn insert(
        &self,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
        bytes: Bytes,
    ) -> Result<(), CacheError> {
        if ObjectRef::of(&bytes) != object {
            return Err(CacheError::Corrupt { id: object.id });
        }
        if self.usage().memory_used + object.size > self.memory_bytes {
            return Err(CacheError::Full {
                reason: format!("{} bytes do not fit", object.size),
            });
        }
        self.lock()
            .insert((owner.to_string(), object.id), (bytes, scope));
        let stored = ObjectEvent::Stored {
            owner: owner.to_string(),
            object,
            scope,
        };
        let _ = self.events.send(stored).await;
        Ok(())
    }

    pub fn contains(&self, owner: &str, id: &ObjectId) -> bool {
        self.lock().contains_key(&(owner.to_string(), *id))
    }

    pub fn open_read(&self, owner: &str, id: &ObjectId) -> Result<ObjectReader, CacheError> {
        let entries = self.lock();
        let (bytes, _) = entries
            .get(&(owner.to_string(), *id))
            .ok_or(CacheError::NotFound { id: *id })?;
        Ok(ObjectReader {
            object: ObjectRef::of(bytes),
            bytes: bytes.clone(),
        })
    }

    pub fn end_session(&self, owner: &str, session: SessionId) {
        self.lock()
            .retain(|(o, _), (_, s)| !(o == owner && *s == ObjectScope::Session(session)));
    }

    pub fn remove(&self, owner: &str, ids: &[ObjectId]) {
        self.lock()
            .retain(|(o, id), _| !(o == owner && ids.contains(id)));
    }

    pub fn usage(&self) -> CacheUsage {
        let entries = self.lock();
        CacheUsage {
            memory_used: entries.values().map(|(b, _)| b.len() as u64).sum(),
            memory_capacity: self.memory_bytes,
            disk_used: 0,
            disk_capacity: 0,
            objects: entries.len() as u64,
        }
    }

    pub fn inventory(&self) -> Vec<(String, ObjectRef, ObjectScope)> {
        self.lock()
            .iter()
            .map(|((owner, _), (bytes, scope))| (owner.clone(), ObjectRef::of(bytes), *scope))
            .collect()
    }
}

/// STAND-IN: the key the head signs grants with, set at each registration.
#[derive(Clone, Default)]
pub struct GrantKeyCell(Arc<Mutex<Option<GrantKey>>>);

impl GrantKeyCell {
    pub fn set(&self, key: GrantKey) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }
}

/// STAND-IN: the QUIC object server.
pub mod server {
    pub async fn serve(
        endpoint: quinn::Endpoint,
        _store: super::ObjectStore,
        _node: String,
        _keys: super::GrantKeyCell,
    ) {
        while let Some(incoming) = endpoint.accept().await {
            incoming.refuse();
        }
    }
}

/// STAND-IN: the same-host object server.
pub mod unix {
    pub async fn serve_unix(
        listener: tokio::net::UnixListener,
        _store: super::ObjectStore,
        _node: String,
        _keys: super::GrantKeyCell,
    ) {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    }
}

/// STAND-IN for `flame_protocol::object_transfer` (the transfer engineer's).
pub mod object_transfer {
    use bytes::Bytes;
    use flame_protocol::endpoint::{ClientIdentity, Trust};
    use flame_protocol::object::{Grant, ObjectEndpoint, ObjectRef};

    #[derive(Debug, thiserror::Error)]
    pub enum TransferError {
        #[error("no transfer client in this build (stand-in)")]
        Unavailable,
    }

    pub struct ObjectClient;

    impl ObjectClient {
        pub fn new(
            _trust: &Trust,
            _identity: Option<ClientIdentity>,
        ) -> Result<ObjectClient, TransferError> {
            Ok(ObjectClient)
        }

        pub async fn get(
            &self,
            _owner: &str,
            _object: ObjectRef,
            _endpoints: &[ObjectEndpoint],
            _grant: &Grant,
        ) -> Result<Bytes, TransferError> {
            Err(TransferError::Unavailable)
        }
    }

    pub fn host_id() -> String {
        std::fs::read_to_string("/etc/machine-id")
            .unwrap_or_default()
            .trim()
            .to_string()
    }
}
