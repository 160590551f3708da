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

/// The hash of one [`OBJECT_CHUNK_BYTES`] chunk of an object, as [`chunk_hash`] defines it.
pub type ChunkHash = [u8; OBJECT_ID_BYTES];

/// The hash of chunk `index` of an object of `size` bytes, whose bytes are `piece`.
///
/// An object of one chunk: the chunk's BLAKE3 hash, which is the object's id. An object of
/// several: the BLAKE3 chaining value of the chunk's subtree at its offset in the object
/// (BLAKE3 is a tree hash and every chunk starts on a subtree boundary), so the chunks'
/// hashes merge into the id ([`id_of_chunks`]). Whoever hashes the bytes chunk by chunk
/// thereby checks the whole too, and no path hashes a byte twice.
pub fn chunk_hash(size: u64, index: u64, piece: &[u8]) -> ChunkHash {
    let mut hasher = ChunkHasher::new(size, index);
    hasher.update(piece);
    hasher.finalize()
}

/// [`chunk_hash`] for a chunk whose bytes arrive in pieces.
#[derive(Debug, Clone)]
pub struct ChunkHasher {
    hasher: blake3::Hasher,
    single: bool,
}

impl ChunkHasher {
    /// A hasher for chunk `index` of an object of `size` bytes.
    pub fn new(size: u64, index: u64) -> ChunkHasher {
        use blake3::hazmat::HasherExt;
        let mut hasher = blake3::Hasher::new();
        let single = size <= OBJECT_CHUNK_BYTES;
        if !single {
            hasher.set_input_offset(index.saturating_mul(OBJECT_CHUNK_BYTES));
        }
        ChunkHasher { hasher, single }
    }

    /// Takes the chunk's next bytes.
    pub fn update(&mut self, piece: &[u8]) {
        self.hasher.update(piece);
    }

    /// The chunk's hash.
    pub fn finalize(&self) -> ChunkHash {
        use blake3::hazmat::HasherExt;
        if self.single {
            *self.hasher.finalize().as_bytes()
        } else {
            self.hasher.finalize_non_root()
        }
    }
}

/// The reference of `bytes` and the hash of each of its chunks, in one pass over them.
pub fn digest(bytes: &[u8]) -> (ObjectRef, Vec<ChunkHash>) {
    let size = bytes.len() as u64;
    let chunks: Vec<ChunkHash> = bytes
        .chunks(OBJECT_CHUNK_BYTES as usize)
        .enumerate()
        .map(|(index, piece)| chunk_hash(size, index as u64, piece))
        .collect();
    let id = match id_of_chunks(size, &chunks) {
        Some(id) => id,
        // Unreachable: the chunks were cut from these bytes; hash them whole rather than fail.
        None => ObjectId::of(bytes),
    };
    (ObjectRef { id, size }, chunks)
}

/// The id of an object of `size` bytes whose chunks hash to `chunks` ([`chunk_hash`]), or
/// `None` when there are not [`ObjectRef::chunks`] of them. A reader that checks each chunk
/// it reads against `chunks`, and `chunks` against the id here, has checked the whole.
pub fn id_of_chunks(size: u64, chunks: &[ChunkHash]) -> Option<ObjectId> {
    if chunks.len() as u64 != size.div_ceil(OBJECT_CHUNK_BYTES) {
        return None;
    }
    match chunks {
        [] => Some(ObjectId::of(&[])),
        [one] => Some(ObjectId(*one)),
        _ => {
            use blake3::hazmat::{left_subtree_len, merge_subtrees_root, Mode};
            let left = left_subtree_len(size);
            let (l, r) = chunks.split_at((left / OBJECT_CHUNK_BYTES) as usize);
            let root = merge_subtrees_root(
                &subtree_cv(l, left),
                &subtree_cv(r, size - left),
                Mode::Hash,
            );
            Some(ObjectId(*root.as_bytes()))
        }
    }
}

/// The chaining value of a subtree of `len` bytes made of the chunks `chunks` (their count
/// checked by the caller: BLAKE3's left subtrees are powers of two of its 1 KiB chunks, so
/// beyond one of our chunks every split falls on one of our chunk boundaries).
fn subtree_cv(chunks: &[ChunkHash], len: u64) -> ChunkHash {
    use blake3::hazmat::{left_subtree_len, merge_subtrees_non_root, Mode};
    if chunks.len() <= 1 {
        return chunks.first().copied().unwrap_or_default();
    }
    let left = left_subtree_len(len);
    let (l, r) = chunks.split_at((left / OBJECT_CHUNK_BYTES) as usize);
    merge_subtrees_non_root(&subtree_cv(l, left), &subtree_cv(r, len - left), Mode::Hash)
}

/// The hash of each [`OBJECT_CHUNK_BYTES`] chunk of `bytes` ([`chunk_hash`]).
pub fn chunk_hashes(bytes: &[u8]) -> Vec<ChunkHash> {
    digest(bytes).1
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
        assert_eq!(chunk_hashes(&big)[1], chunk_hash(r.size, 1, &[7u8]));
    }

    /// The chunks' hashes merge into BLAKE3 of the whole, whatever the tree's shape (one
    /// chunk, a power of two, odd counts whose left subtrees nest), and a changed byte in
    /// any chunk changes that chunk's hash only.
    #[test]
    fn chunk_hashes_merge_into_the_id() {
        let c = OBJECT_CHUNK_BYTES as usize;
        for size in [
            0,
            1,
            1023,
            1025,
            c - 1,
            c,
            c + 1,
            2 * c,
            3 * c + 5,
            4 * c,
            5 * c + 7,
        ] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let (r, chunks) = digest(&bytes);
            assert_eq!(r, ObjectRef::of(&bytes), "size {size}");
            assert_eq!(id_of_chunks(r.size, &chunks), Some(r.id), "size {size}");
            assert_eq!(chunks.len() as u64, r.chunks());
            if size > c {
                let mut bad = bytes.clone();
                bad[size - 1] ^= 1;
                let (_, bad_chunks) = digest(&bad);
                assert_eq!(bad_chunks[0], chunks[0]);
                let last = chunks.len() - 1;
                assert_ne!(bad_chunks[last], chunks[last], "size {size}");
                assert_eq!(bad_chunks[..last], chunks[..last]);
                let mut streamed = ChunkHasher::new(r.size, 1);
                for piece in bytes[c..(2 * c).min(size)].chunks(4099) {
                    streamed.update(piece);
                }
                assert_eq!(streamed.finalize(), chunks[1]);
            }
        }
        assert_eq!(id_of_chunks(2 * OBJECT_CHUNK_BYTES, &[[0; 32]]), None);
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
