//! Objects: immutable byte blobs named by their content, kept in the nodes' caches.
//!
//! An object's id is the BLAKE3 hash of its bytes ([`ObjectId::of`]); an [`ObjectRef`] is
//! the id and the size. Objects are scoped to their owner: `(owner, id)` names one object,
//! and two owners who store the same bytes hold two objects (no tenant learns what another
//! stored). A task's input, a session's common data and a task's output are each a
//! [`Payload`]: the bytes inline, or a reference to an object.
//!
//! Bytes never cross the head. The head records where objects are (which nodes hold a
//! copy) and grants access: a [`Grant`] is a statement signed by the head
//! ([`crate::object_grant`], with the `net` feature) that a node checks before it stores
//! or serves a byte. Clients and nodes move the bytes between themselves on a node's
//! object endpoint ([`ObjectEndpoint`]): QUIC with the cluster's TLS (ALPN
//! [`OBJECT_ALPN`]), or, on the same host, a Unix socket that passes a sealed memory file
//! descriptor instead of the bytes. Both speak [`ObjectRequest`] / [`ObjectResponse`]
//! frames; the stream shapes are on those types.

use crate::ids::{SessionId, TaskId};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Bytes in an [`ObjectId`].
pub const OBJECT_ID_BYTES: usize = 32;

/// The ALPN of a node's object endpoint (apart from `flame/1`, so a head or client that
/// dials the wrong port is refused at the handshake).
pub const OBJECT_ALPN: &[u8] = b"flame-obj/1";

/// Bytes per chunk: objects move and are checked in chunks of this size (the last may be
/// shorter). Each chunk's BLAKE3 hash is known before its bytes arrive, so a corrupt
/// chunk is found when it arrives, not after the whole object.
pub const OBJECT_CHUNK_BYTES: u64 = 4 * 1024 * 1024;

/// The largest frame on an object stream or socket, either way: a grant and the chunk
/// hashes of the largest object, with room to spare (about 0.6 MiB; far below the link's
/// frame limit, so many hostile streams cannot hold much memory).
pub const OBJECT_FRAME_BYTES_MAX: usize =
    (crate::limits::OBJECT_BYTES_MAX / OBJECT_CHUNK_BYTES) as usize * (OBJECT_ID_BYTES + 2)
        + 64 * 1024;

/// An object's name: the BLAKE3 hash of its bytes. In postcard it is its 32 bytes; in a
/// human-readable format (JSON for `--output json`) its 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; OBJECT_ID_BYTES]);

impl Serialize for ObjectId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.serialize_str(&self.to_string())
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ObjectId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; OBJECT_ID_BYTES]>::deserialize(d).map(ObjectId)
        }
    }
}

impl ObjectId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> ObjectId {
        ObjectId(*blake3::hash(bytes).as_bytes())
    }

    /// The id a finished [`blake3::Hasher`] gives (for bytes hashed as they arrive).
    pub fn from_hasher(hasher: &blake3::Hasher) -> ObjectId {
        ObjectId(*hasher.finalize().as_bytes())
    }

    /// The first 12 hex digits, for tables and logs.
    pub fn short(&self) -> String {
        crate::auth::hex(&self.0[..6])
    }
}

impl std::fmt::Display for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::auth::hex(&self.0))
    }
}

impl std::fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ObjectId({})", self.short())
    }
}

/// Text that is not an object id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{0}` is not an object id: an object id is 64 hex digits (`flame object list` shows them)"
)]
pub struct ParseObjectIdError(pub String);

impl std::str::FromStr for ObjectId {
    type Err = ParseObjectIdError;
    fn from_str(text: &str) -> Result<ObjectId, ParseObjectIdError> {
        crate::auth::unhex::<OBJECT_ID_BYTES>(text.trim())
            .map(ObjectId)
            .ok_or_else(|| ParseObjectIdError(text.chars().take(80).collect()))
    }
}

/// An object's id and size: what a task input, common data or output carries in place of
/// the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    pub id: ObjectId,
    pub size: u64,
}

impl ObjectRef {
    /// The reference of `bytes`.
    pub fn of(bytes: &[u8]) -> ObjectRef {
        ObjectRef {
            id: ObjectId::of(bytes),
            size: bytes.len() as u64,
        }
    }

    /// How many chunks of [`OBJECT_CHUNK_BYTES`] the object has (0 for an empty one).
    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(OBJECT_CHUNK_BYTES)
    }
}

/// Bytes, inline or as an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    Inline(Bytes),
    Object(ObjectRef),
}

impl Payload {
    /// The size of the bytes it stands for.
    pub fn size(&self) -> u64 {
        match self {
            Payload::Inline(b) => b.len() as u64,
            Payload::Object(o) => o.size,
        }
    }

    /// What it costs on the wire and in the head's memory: the bytes when inline, a
    /// reference's fixed size otherwise.
    pub fn held_bytes(&self) -> usize {
        match self {
            Payload::Inline(b) => b.len(),
            Payload::Object(_) => OBJECT_ID_BYTES + 8,
        }
    }

    /// The object it refers to, if it is one.
    pub fn object(&self) -> Option<&ObjectRef> {
        match self {
            Payload::Inline(_) => None,
            Payload::Object(o) => Some(o),
        }
    }

    /// The bytes, when inline.
    pub fn inline(&self) -> Option<&Bytes> {
        match self {
            Payload::Inline(b) => Some(b),
            Payload::Object(_) => None,
        }
    }
}

impl Default for Payload {
    fn default() -> Self {
        Payload::Inline(Bytes::new())
    }
}

impl From<Bytes> for Payload {
    fn from(bytes: Bytes) -> Self {
        Payload::Inline(bytes)
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Payload::Inline(bytes.into())
    }
}

/// How long an object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ObjectScope {
    /// Until the session ends (closed and finished, or cancelled): task inputs, common
    /// data and outputs, and what a client put for that session.
    Session(SessionId),
    /// Until its owner removes it (`flame object remove`): put on purpose with no session.
    Kept,
}

/// How an object came to be: what the head can do when its last copy is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectOrigin {
    /// A client put it (`Session::put`, `flame object put`, or an input or common data
    /// above the inline threshold). Lost with its last copy unless put with replicas.
    Put,
    /// The output of a task: rebuilt by running that task again (one level of lineage).
    Output { session: SessionId, task: TaskId },
}

/// Where a node serves objects.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ObjectEndpoint {
    /// The node's name; its certificate must name it.
    pub node: String,
    /// Its QUIC object endpoint.
    pub addr: SocketAddr,
    /// The node's host: its `/etc/machine-id` (or boot id) and network namespace. A
    /// client with the same host value may use `socket`.
    pub host: String,
    /// The node's Unix socket for same-host transfers (descriptor passing), when it has one.
    pub socket: Option<String>,
}

/// What a node's object cache holds and may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheUsage {
    pub memory_used: u64,
    pub memory_capacity: u64,
    pub disk_used: u64,
    pub disk_capacity: u64,
    pub objects: u64,
}

/// One object as the head knows it (`flame object list`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectInfo {
    pub owner: String,
    pub object: ObjectRef,
    pub scope: ObjectScope,
    pub origin: ObjectOrigin,
    /// Nodes that hold a copy now. Empty: lost (or, for an output, being rebuilt).
    pub nodes: Vec<String>,
    /// Copies the head keeps on distinct nodes (1 unless put with `--replicas`).
    pub replicas: u32,
    /// Unix time in milliseconds it was first recorded.
    pub created_ms: u64,
}

/// Where a client may put objects: one node's endpoint and the grant it checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectTarget {
    pub endpoint: ObjectEndpoint,
    pub grant: Grant,
}

/// Where objects are, and a grant to read them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLocations {
    /// One entry per object asked for, in the order asked; `nodes` index `endpoints`.
    pub objects: Vec<LocatedObject>,
    pub endpoints: Vec<ObjectEndpoint>,
    /// Read access to every object located, at any node.
    pub grant: Grant,
}

/// One object in an [`ObjectLocations`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocatedObject {
    pub object: ObjectRef,
    /// Indices into [`ObjectLocations::endpoints`]; empty when no copy is left.
    pub nodes: Vec<u32>,
    /// Why there is no copy (lost with a node, being rebuilt), when `nodes` is empty.
    pub missing: Option<String>,
}

/// Where a node fetches an object it does not hold, and its grant to read it there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectSources {
    pub object: ObjectRef,
    /// Nodes that hold a copy, best first.
    pub endpoints: Vec<ObjectEndpoint>,
    pub grant: Grant,
}

/// What the head signs. A grant is a bearer credential for its owner's objects, short
/// lived ([`crate::limits::OBJECT_GRANT_TTL`]), and good only for what `access` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantBody {
    pub owner: String,
    pub access: GrantAccess,
    /// Unix time in milliseconds after which no node accepts it.
    pub expires_unix_ms: u64,
}

/// What a grant allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantAccess {
    /// Read these objects of the owner, at any node.
    Read { ids: Vec<ObjectId> },
    /// Store objects of the owner on `node`, with this scope, up to `bytes_max` in all
    /// per grant (the head counts them against the owner's quota).
    Write {
        node: String,
        scope: ObjectScope,
        bytes_max: u64,
    },
}

/// The head's public key for grants (Ed25519, 32 bytes), given to nodes when they
/// register: a node accepts a grant only under it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GrantKey(pub Vec<u8>);

/// A [`GrantBody`] and the head's Ed25519 signature over [`Grant::signed_bytes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub body: GrantBody,
    pub signature: Vec<u8>,
}

/// What every grant signature covers before the body: a grant can never be mistaken for
/// another signed message.
pub const GRANT_DOMAIN: &[u8] = b"flame object grant v1\0";

impl Grant {
    /// The bytes the signature covers: [`GRANT_DOMAIN`], then the body in postcard.
    pub fn signed_bytes(body: &GrantBody) -> Vec<u8> {
        let mut out = GRANT_DOMAIN.to_vec();
        // Encoding plain data into a Vec cannot fail.
        if let Ok(encoded) = postcard::to_allocvec(body) {
            out.extend_from_slice(&encoded);
        }
        out
    }
}

/// The first frame on a stream to a node's object endpoint.
///
/// * `Put`: the client sends the frame, then the object's bytes raw, `object.size` of them
///   (on the Unix socket: no bytes; the frame's message carries a sealed memfd as
///   `SCM_RIGHTS`). The node answers [`ObjectResponse::Stored`] once every byte matched
///   its chunk hash and the whole its id, and the copy is in its cache; else
///   [`ObjectResponse::Error`].
/// * `Get`: the node answers [`ObjectResponse::Found`], then `len` bytes raw from
///   `offset` (on the Unix socket: no bytes; a read-only descriptor of the object comes
///   with the `Found` frame, and the reader maps it). Several `Get`s of disjoint ranges
///   on parallel streams fetch a large object faster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectRequest {
    Put {
        grant: Grant,
        object: ObjectRef,
        /// The BLAKE3 hash of each chunk, in order ([`OBJECT_CHUNK_BYTES`]).
        chunks: Vec<[u8; OBJECT_ID_BYTES]>,
    },
    Get {
        /// None between nodes: a node presenting its certificate reads with the grant
        /// the head gave it in [`ObjectSources`], so it is always `Some` there too; only
        /// kept optional for a node's own local reads.
        grant: Option<Grant>,
        owner: String,
        id: ObjectId,
        /// Byte range; `len` 0 means to the end. Chunk-aligned except at the end.
        offset: u64,
        len: u64,
    },
}

/// A node's answer on an object stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectResponse {
    Stored,
    /// The object is here: its reference, its chunk hashes (all of them, so the reader
    /// checks each chunk as it comes), and the range that follows.
    Found {
        object: ObjectRef,
        chunks: Vec<[u8; OBJECT_ID_BYTES]>,
        offset: u64,
        len: u64,
    },
    Error(crate::model::ApiError),
}

/// The BLAKE3 hash of each [`OBJECT_CHUNK_BYTES`] chunk of `bytes`.
pub fn chunk_hashes(bytes: &[u8]) -> Vec<[u8; OBJECT_ID_BYTES]> {
    bytes
        .chunks(OBJECT_CHUNK_BYTES as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

/// An event about a node's cache, reported to the head.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectEvent {
    /// A copy is now in the node's cache (put by a client, fetched for a task, made as an
    /// output). Sent also for every object the node holds when it registers.
    Stored {
        owner: String,
        object: ObjectRef,
        scope: ObjectScope,
    },
    /// The copy is gone (evicted, removed, corrupt, its scope ended).
    Dropped {
        owner: String,
        id: ObjectId,
        reason: String,
    },
    /// A put or store failed for want of room (memory and disk budgets full, or the
    /// disk itself full): the operator sees it in `flame node list`.
    Full { reason: String },
}

/// What the head tells a node to do with its cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectCommand {
    /// The session ended: its objects may go (unpinned; dropped at once).
    EndSession { owner: String, session: SessionId },
    /// The owner removed these objects.
    Remove { owner: String, ids: Vec<ObjectId> },
    /// Fetch a copy from `sources` (a replica, or a copy made near future readers).
    Replicate {
        owner: String,
        scope: ObjectScope,
        sources: ObjectSources,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_and_parse() {
        let id = ObjectId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<ObjectId>().unwrap(), id);
        assert_eq!(id.short(), &text[..12]);
        let err = "xyz".parse::<ObjectId>().unwrap_err();
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[test]
    fn ids_are_bytes_in_postcard() {
        let id = ObjectId::of(b"a");
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bytes, id.0.to_vec());
        assert_eq!(postcard::from_bytes::<ObjectId>(&bytes).unwrap(), id);
    }

    #[test]
    fn chunks_cover_the_object() {
        let r = ObjectRef::of(&[]);
        assert_eq!(r.chunks(), 0);
        let big = vec![7u8; OBJECT_CHUNK_BYTES as usize + 1];
        let r = ObjectRef::of(&big);
        assert_eq!(r.chunks(), 2);
        assert_eq!(chunk_hashes(&big).len(), 2);
        assert_eq!(chunk_hashes(&big)[1], *blake3::hash(&[7u8]).as_bytes());
    }

    #[test]
    fn signed_bytes_start_with_the_domain() {
        let body = GrantBody {
            owner: "a".into(),
            access: GrantAccess::Read { ids: vec![] },
            expires_unix_ms: 5,
        };
        let bytes = Grant::signed_bytes(&body);
        assert!(bytes.starts_with(GRANT_DOMAIN));
        assert!(bytes.len() > GRANT_DOMAIN.len());
    }
}
