//! The objects room: the object book (which nodes hold which owner's objects), the
//! client's object requests, nodes' cache events, and what a lost node or an ended
//! session does to objects.
//!
//! Bytes never reach the head: it keeps, per `(owner, id)`, the size, scope, origin,
//! copies wanted, the nodes that hold a copy (`holders`, confirmed by a node's
//! `ObjectEvent::Stored` or a task's `TaskOutcome::Object`), the nodes a client was told
//! to put it on that have not confirmed yet (`expected`, forgotten after the grant's
//! life), and when it was first recorded. Every lookup is by hash (owner, then id), and
//! an index from node to keys makes a lost node's work proportional to what it held, so
//! each operation is O(1) amortised per object touched and flat from 1k to 1M objects.
//!
//! Grants: the core signs them (Ed25519, deterministic CPU work) with the
//! [`GrantSigner`] the server made at start and passed in [`CoreConfig::grant_signer`];
//! they expire at the event's `now_ms` (unix ms in the server) plus
//! [`limits::OBJECT_GRANT_TTL`].
//!
//! Tenancy: every key is `(owner, id)`. A user may name only itself as owner (the
//! server's `authorize`); an id asked for under the caller's own name that another owner
//! stored is simply not there ("never stored"), so nothing tells one tenant what another
//! stored.
//!
//! Lifetimes: `Session(s)` objects leave the book [`CoreConfig::object_retention_ms`]
//! after session `s` finishes (closed and done, or cancelled), so readers of its last
//! results still find their bytes; then every node that held one, or served the session,
//! gets `ObjectCommand::EndSession`. A node's copy of an ended session's object that the
//! book does not have (a node's inventory after a head restart) joins the others until the
//! retention ends; a session that ended before this head started is taken to have ended at
//! the start; a copy of one whose objects already went is dropped at once (`EndSession`
//! to that node). A `Kept` object stays until its owner removes it, also
//! when a session uses it as common data or task input: the session references it, it
//! does not own it.
//!
//! Lost copies: a lost node's copies go from the book. A client-put object left with
//! fewer copies than it asked for is copied again to another node
//! (`ObjectCommand::Replicate`); one left with none is reported lost ("lost with node
//! X"), and tasks that need it fail naming it.
//!
//! Lineage (rebuilding a lost task output) is the next room, `lineage.rs`.

use super::*;
use crate::quotas::Quota;
use flame_protocol::object::{
    CacheUsage, Grant, GrantAccess, GrantBody, GrantKey, LocatedObject, ObjectCommand,
    ObjectEndpoint, ObjectEvent, ObjectId, ObjectInfo, ObjectLocations, ObjectOrigin, ObjectRef,
    ObjectScope, ObjectSources, ObjectTarget,
};
use flame_protocol::object_grant::GrantSigner;
use std::collections::HashSet;

/// One owner's object.
pub(super) type ObjectKey = (OwnerName, ObjectId);

/// What the head knows of one object.
#[derive(Debug, Clone)]
pub(super) struct ObjectEntry {
    pub(super) size: u64,
    pub(super) scope: ObjectScope,
    pub(super) origin: ObjectOrigin,
    /// Copies wanted on distinct nodes.
    pub(super) replicas: u32,
    /// Nodes that hold a copy (confirmed). A handful: a plain list.
    pub(super) holders: Vec<NodeName>,
    /// Nodes granted a put (or told to replicate) that have not confirmed it yet.
    pub(super) expected: Vec<NodeName>,
    /// Unix ms it was first recorded.
    pub(super) created_ms: u64,
    /// Why no copy is left, once the last one went; `None` while one is or may be there.
    pub(super) missing: Option<String>,
}

impl ObjectEntry {
    /// The nodes that hold it, then those that may (a put not confirmed yet).
    pub(super) fn nodes(&self) -> impl Iterator<Item = &NodeName> {
        self.holders.iter().chain(self.expected.iter())
    }

    fn has_node(&self, node: &str) -> bool {
        self.nodes().any(|n| n.as_str() == node)
    }
}

/// One owner's objects and the bytes they count against its quota.
#[derive(Debug, Default)]
pub(super) struct OwnerObjects {
    objects: HashMap<ObjectId, ObjectEntry>,
    bytes: u64,
}

/// The object book: the objects room.
#[derive(Debug, Default)]
pub(super) struct ObjectBook {
    owners: HashMap<OwnerName, OwnerObjects>,
    /// Node → keys it holds or is expected to hold.
    by_node: HashMap<NodeName, HashSet<ObjectKey>>,
    /// Session → its `Session`-scoped objects (and the outputs of its tasks).
    by_session: HashMap<SessionId, HashSet<ObjectKey>>,
    /// When each expected copy is given up on, in time order (times only grow).
    expiries: VecDeque<(u64, ObjectKey, NodeName)>,
    /// Ended sessions whose objects go at the time given, in time order: a session's
    /// outputs stay readable for [`limits::SESSION_OBJECTS_RETENTION`] after it ends, so a
    /// watcher that reads its last results after the end still gets their bytes.
    endings: VecDeque<Ending>,
    /// The sessions in `endings`, with their owner: a node's copy of one is kept until it.
    ending: HashMap<SessionId, String>,
    /// When this head started (the first event's clock) and the first session id it
    /// handed out: a session below it may have ended just before the start, at a time
    /// this head does not know, so its copies stay a retention from the start.
    life: Option<(u64, u64)>,
}

/// A session that ended, waiting for its objects to go.
#[derive(Debug)]
struct Ending {
    at_ms: u64,
    session: SessionId,
    owner: String,
    /// Nodes that served it, which may hold its objects beyond what the book knows.
    nodes: BTreeSet<NodeName>,
}

impl ObjectBook {
    /// This head's life started at `now_ms` (its first event), with `first_session` the
    /// next session id it hands out. Only the first call counts.
    pub(super) fn life_started(&mut self, now_ms: u64, first_session: u64) {
        self.life.get_or_insert((now_ms, first_session));
    }

    /// Session `sid`'s objects go at `at_ms`, in time order.
    fn push_ending(&mut self, ending: Ending) {
        self.ending.insert(ending.session, ending.owner.clone());
        let at = self.endings.partition_point(|e| e.at_ms <= ending.at_ms);
        self.endings.insert(at, ending);
    }

    /// The object `(owner, id)`, if the book has it.
    pub(super) fn get(&self, owner: &str, id: &ObjectId) -> Option<&ObjectEntry> {
        self.owners.get(owner)?.objects.get(id)
    }

    pub(super) fn get_mut(&mut self, owner: &str, id: &ObjectId) -> Option<&mut ObjectEntry> {
        self.owners.get_mut(owner)?.objects.get_mut(id)
    }

    /// How many objects `owner` has in the book, and their bytes.
    pub(super) fn held(&self, owner: &str) -> (u64, u64) {
        self.owners
            .get(owner)
            .map_or((0, 0), |o| (o.objects.len() as u64, o.bytes))
    }

    /// How many objects the book holds, over every owner (tests).
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.owners.values().map(|o| o.objects.len()).sum()
    }

    /// Records a new object (the caller checked it is not there).
    fn insert(&mut self, owner: &OwnerName, id: ObjectId, entry: ObjectEntry) {
        if let ObjectScope::Session(s) = entry.scope {
            self.by_session
                .entry(s)
                .or_default()
                .insert((owner.clone(), id));
        }
        for node in entry.nodes() {
            self.by_node
                .entry(node.clone())
                .or_default()
                .insert((owner.clone(), id));
        }
        let o = self.owners.entry(owner.clone()).or_default();
        o.bytes = o.bytes.saturating_add(entry.size);
        o.objects.insert(id, entry);
    }

    /// Forgets an object; returns what it was.
    fn remove(&mut self, owner: &str, id: &ObjectId) -> Option<ObjectEntry> {
        let o = self.owners.get_mut(owner)?;
        let entry = o.objects.remove(id)?;
        o.bytes = o.bytes.saturating_sub(entry.size);
        let key = (OwnerName::from(owner.to_string()), *id);
        if o.objects.is_empty() {
            self.owners.remove(owner);
        }
        for node in entry.nodes() {
            self.unindex_node(node, &key);
        }
        if let ObjectScope::Session(s) = entry.scope {
            if let Some(keys) = self.by_session.get_mut(&s) {
                keys.remove(&key);
                if keys.is_empty() {
                    self.by_session.remove(&s);
                }
            }
        }
        Some(entry)
    }

    fn unindex_node(&mut self, node: &str, key: &ObjectKey) {
        if let Some(keys) = self.by_node.get_mut(node) {
            keys.remove(key);
            if keys.is_empty() {
                self.by_node.remove(node);
            }
        }
    }

    /// `node` may hold the object until `deadline_ms` without confirming it.
    fn expect(&mut self, owner: &OwnerName, id: ObjectId, node: &NodeName, deadline_ms: u64) {
        let Some(entry) = self.get_mut(owner, &id) else {
            return;
        };
        if entry.has_node(node) {
            return;
        }
        entry.expected.push(node.clone());
        self.by_node
            .entry(node.clone())
            .or_default()
            .insert((owner.clone(), id));
        self.expiries
            .push_back((deadline_ms, (owner.clone(), id), node.clone()));
    }

    /// `node` holds a copy now. Returns whether the object is in the book.
    pub(super) fn confirm(&mut self, owner: &OwnerName, id: ObjectId, node: &NodeName) -> bool {
        let Some(entry) = self.get_mut(owner, &id) else {
            return false;
        };
        entry.expected.retain(|n| n != node);
        if !entry.holders.contains(node) {
            entry.holders.push(node.clone());
        }
        entry.missing = None;
        self.by_node
            .entry(node.clone())
            .or_default()
            .insert((owner.clone(), id));
        true
    }

    /// `node` no longer holds (nor will hold) a copy. Returns the entry when that left it
    /// with no copy at all.
    fn drop_copy(&mut self, key: &ObjectKey, node: &str) -> Option<&mut ObjectEntry> {
        self.unindex_node(node, key);
        let entry = self.get_mut(&key.0, &key.1)?;
        entry.holders.retain(|n| n.as_str() != node);
        entry.expected.retain(|n| n.as_str() != node);
        (entry.holders.is_empty() && entry.expected.is_empty()).then_some(entry)
    }
}

/// Where a node finds an object input or common data for a task or bind.
#[derive(Debug)]
pub(super) enum Fetch {
    /// The node holds it.
    Local,
    /// It fetches it from these nodes with this grant.
    From(ObjectSources),
    /// No copy is left: why.
    Missing(String),
}

/// What dispatch reads of the objects room, apart from the rest of the core.
pub(super) struct ObjectView<'a> {
    pub(super) book: &'a ObjectBook,
    pub(super) nodes: &'a BTreeMap<NodeName, NodeEntry>,
    pub(super) signer: Option<&'a GrantSigner>,
    pub(super) now_ms: u64,
}

impl ObjectView<'_> {
    /// How `node` gets `owner`'s object `object`.
    pub(super) fn fetch(&self, owner: &str, object: &ObjectRef, node: &str) -> Fetch {
        let Some(entry) = self.book.get(owner, &object.id) else {
            return Fetch::Missing(
                "it is not in the object book: never stored, removed, or its session ended".into(),
            );
        };
        if entry.holders.iter().any(|n| n.as_str() == node) {
            return Fetch::Local;
        }
        let endpoints: Vec<ObjectEndpoint> = entry
            .nodes()
            .filter(|n| n.as_str() != node)
            .filter_map(|n| self.nodes.get(n.as_str())?.endpoint.clone())
            .collect();
        if endpoints.is_empty() {
            if entry.expected.iter().any(|n| n.as_str() == node) {
                // Put there and not confirmed yet: the node looks in its own cache.
                return Fetch::Local;
            }
            return Fetch::Missing(
                entry
                    .missing
                    .clone()
                    .unwrap_or_else(|| "no node that holds it serves objects".into()),
            );
        }
        let Some(signer) = self.signer else {
            return Fetch::Missing("this head has no grant key to let a node read it".into());
        };
        Fetch::From(ObjectSources {
            object: *object,
            endpoints,
            grant: sign(
                signer,
                owner,
                GrantAccess::Read {
                    ids: vec![object.id],
                },
                self.now_ms,
            ),
        })
    }
}

/// A grant for `owner` with `access`, good for [`limits::OBJECT_GRANT_TTL`] from `now_ms`.
pub(super) fn sign(signer: &GrantSigner, owner: &str, access: GrantAccess, now_ms: u64) -> Grant {
    signer.sign(GrantBody {
        owner: owner.to_string(),
        access,
        expires_unix_ms: now_ms.saturating_add(limits::OBJECT_GRANT_TTL.as_millis() as u64),
    })
}

/// A node's object endpoint from its registration: the address it advertises, else the
/// address its connection comes from with its object port.
pub(super) fn endpoint_of(
    registration: &NodeRegistration,
    address: &str,
) -> Option<ObjectEndpoint> {
    let service = registration.objects.as_ref()?;
    let addr = match service.advertise {
        Some(addr) => addr,
        None => {
            let ip: std::net::IpAddr = address.parse().ok()?;
            std::net::SocketAddr::new(ip, service.port)
        }
    };
    Some(ObjectEndpoint {
        node: registration.name.clone(),
        addr,
        host: service.host.clone(),
        socket: service.socket.clone(),
    })
}

fn free_cache(usage: Option<&CacheUsage>) -> u64 {
    usage.map_or(0, |u| {
        u.memory_capacity.saturating_sub(u.memory_used)
            + u.disk_capacity.saturating_sub(u.disk_used)
    })
}

fn error(kind: ErrorKind, message: String) -> ClientResponse {
    ClientResponse::Error(api(kind, message))
}

impl Core {
    /// The key nodes check grants with (empty when the head has none).
    pub(super) fn grant_key(&self) -> GrantKey {
        self.config
            .grant_signer
            .as_ref()
            .map_or_else(GrantKey::default, |s| s.public_key())
    }

    /// What dispatch reads of the objects room.
    pub(super) fn object_view(&self) -> ObjectView<'_> {
        ObjectView {
            book: &self.objects,
            nodes: &self.cluster.nodes,
            signer: self.config.grant_signer.as_deref(),
            now_ms: self.now_ms,
        }
    }

    /// Ready nodes that serve objects and hold no copy of `exclude`'s object, best first
    /// for new copies of `session`'s data: nodes with its executors bound, then the most
    /// free cache, then by name.
    fn object_targets(
        &self,
        session: Option<SessionId>,
        exclude: Option<&ObjectEntry>,
    ) -> Vec<NodeName> {
        let mut bound: HashMap<&str, u32> = HashMap::new();
        if let Some(sid) = session {
            for e in self
                .pool
                .executors
                .values()
                .filter(|e| e.session == Some(sid))
            {
                *bound.entry(e.node.as_str()).or_default() += 1;
            }
        }
        let mut nodes: Vec<(&NodeName, &NodeEntry)> = self
            .cluster
            .nodes
            .iter()
            .filter(|(name, n)| {
                n.conn.is_some()
                    && !n.draining
                    && n.endpoint.is_some()
                    && !exclude.is_some_and(|e| e.has_node(name))
            })
            .collect();
        nodes.sort_by(|(a, na), (b, nb)| {
            let here = |name: &str| bound.get(name).copied().unwrap_or(0);
            here(b)
                .cmp(&here(a))
                .then(free_cache(nb.cache.as_ref()).cmp(&free_cache(na.cache.as_ref())))
                .then(a.cmp(b))
        });
        nodes.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// Queues an object command for `node`.
    fn object_command(&mut self, node: &NodeName, command: ObjectCommand) {
        self.commands
            .entry(node.clone())
            .or_default()
            .push(NodeCommand::Objects(command));
    }

    /// `ClientRequest::PutObjects`: records the objects as expected on `replicas` nodes
    /// and answers one target (endpoint and write grant) per node.
    pub(super) fn put_objects(
        &mut self,
        owner: &str,
        session: Option<SessionId>,
        objects: Vec<ObjectRef>,
        replicas: u32,
        reply: ReplyId,
    ) {
        match self.plan_put(owner, session, &objects, replicas) {
            Ok(targets) => {
                let answer = self.grant_put(owner, session, &objects, replicas, targets);
                self.out.reply(reply, answer);
            }
            Err(e) => self.out.reply(reply, ClientResponse::Error(e)),
        }
    }

    /// Checks a put (sizes, counts, session, quotas) and picks its nodes.
    fn plan_put(
        &self,
        owner: &str,
        session: Option<SessionId>,
        objects: &[ObjectRef],
        replicas: u32,
    ) -> Result<Vec<NodeName>, ApiError> {
        let replicas = replicas.max(1);
        if objects.is_empty() || objects.len() > limits::OBJECT_REQUEST_IDS_MAX {
            return Err(api(
                ErrorKind::InvalidArgument,
                format!(
                    "a put names {} objects; it must name 1 to {}",
                    objects.len(),
                    limits::OBJECT_REQUEST_IDS_MAX
                ),
            ));
        }
        if replicas > limits::OBJECT_REPLICAS_MAX {
            return Err(api(
                ErrorKind::InvalidArgument,
                format!(
                    "{replicas} replicas asked for; at most {} are kept",
                    limits::OBJECT_REPLICAS_MAX
                ),
            ));
        }
        if let Some(big) = objects.iter().find(|o| o.size > limits::OBJECT_BYTES_MAX) {
            return Err(api(
                ErrorKind::LimitExceeded,
                format!(
                    "object {} is {} bytes; the limit is {} bytes",
                    big.id,
                    big.size,
                    limits::OBJECT_BYTES_MAX
                ),
            ));
        }
        if let Some(sid) = session {
            self.check_object_session(owner, sid)?;
        }
        // New objects only count against the quotas; a second put of one adds copies.
        let mut seen = HashSet::new();
        let (mut count, mut bytes) = (0u64, 0u64);
        for o in objects {
            if seen.insert(o.id) && self.objects.get(owner, &o.id).is_none() {
                count += 1;
                bytes = bytes.saturating_add(o.size);
            }
        }
        let quotas = self.config.quotas.of(owner);
        let (held, held_bytes) = self.objects.held(owner);
        if count > 0 {
            crate::quotas::check(quotas, Quota::Objects, owner, held, count)?;
            crate::quotas::check(quotas, Quota::ObjectBytes, owner, held_bytes, bytes)?;
        }
        let mut targets = self.object_targets(session, None);
        if (targets.len() as u32) < replicas {
            return Err(api(
                ErrorKind::Unavailable,
                format!(
                    "{replicas} cop(ies) asked for, but {} ready node(s) serve objects",
                    targets.len()
                ),
            ));
        }
        targets.truncate(replicas as usize);
        Ok(targets)
    }

    /// Whether `owner` may put objects for session `sid`: its own, not finished.
    fn check_object_session(&self, owner: &str, sid: SessionId) -> Result<(), ApiError> {
        let Some(s) = self.tasks.sessions.get(&sid) else {
            return Err(if self.left_memory(sid) {
                api(
                    ErrorKind::FailedPrecondition,
                    format!("session {sid} has finished; its objects are gone"),
                )
            } else {
                api(ErrorKind::NotFound, unknown_session(sid))
            });
        };
        if owner_name(&s.stored.owner) != owner {
            return Err(api(
                ErrorKind::PermissionDenied,
                format!("session {sid} does not belong to owner `{owner}`"),
            ));
        }
        if s.finished || s.cancelled {
            return Err(api(
                ErrorKind::FailedPrecondition,
                format!("session {sid} has ended; objects cannot be put for it"),
            ));
        }
        Ok(())
    }

    /// Records a checked put as expected on `targets` and signs a write grant per node.
    fn grant_put(
        &mut self,
        owner: &str,
        session: Option<SessionId>,
        objects: &[ObjectRef],
        replicas: u32,
        targets: Vec<NodeName>,
    ) -> ClientResponse {
        let Some(signer) = self.config.grant_signer.clone() else {
            return error(
                ErrorKind::Unavailable,
                "this head has no grant key; objects cannot be stored".into(),
            );
        };
        let owner = OwnerName::from(owner.to_string());
        let scope = session.map_or(ObjectScope::Kept, ObjectScope::Session);
        let deadline = self
            .now_ms
            .saturating_add(limits::OBJECT_GRANT_TTL.as_millis() as u64);
        for o in objects {
            match self.objects.get_mut(&owner, &o.id) {
                Some(entry) => {
                    entry.replicas = entry.replicas.max(replicas.max(1));
                    // Kept outlives a session: a put without one keeps the object (its
                    // session index goes; a node keeps the scope its copy was put with).
                    if scope == ObjectScope::Kept && entry.scope != ObjectScope::Kept {
                        if let Some(mut kept) = self.objects.remove(&owner, &o.id) {
                            kept.scope = ObjectScope::Kept;
                            self.objects.insert(&owner, o.id, kept);
                        }
                    }
                }
                None => self.objects.insert(
                    &owner,
                    o.id,
                    ObjectEntry {
                        size: o.size,
                        scope,
                        origin: ObjectOrigin::Put,
                        replicas: replicas.max(1),
                        holders: Vec::new(),
                        expected: Vec::new(),
                        created_ms: self.now_ms,
                        missing: None,
                    },
                ),
            }
            for node in &targets {
                self.objects.expect(&owner, o.id, node, deadline);
            }
        }
        let bytes_max = objects
            .iter()
            .map(|o| o.size)
            .fold(0u64, u64::saturating_add);
        let answer = targets
            .iter()
            .filter_map(|node| {
                let endpoint = self.cluster.nodes.get(node.as_str())?.endpoint.clone()?;
                let grant = sign(
                    &signer,
                    &owner,
                    GrantAccess::Write {
                        node: node.to_string(),
                        scope,
                        bytes_max,
                    },
                    self.now_ms,
                );
                Some(ObjectTarget { endpoint, grant })
            })
            .collect();
        tracing::debug!(owner = %owner, objects = objects.len(), nodes = ?targets, "objects granted a put");
        ClientResponse::ObjectTargets(answer)
    }

    /// Why `owner`'s object `id` has no copy (for `LocateObjects` and task failures).
    fn missing_text(&self, owner: &str, id: &ObjectId) -> String {
        match self.objects.get(owner, id) {
            None => "never stored".to_string(),
            Some(e) => e
                .missing
                .clone()
                .unwrap_or_else(|| "no copy is confirmed yet".to_string()),
        }
    }

    /// `ClientRequest::LocateObjects`.
    pub(super) fn locate_objects(&self, owner: &str, ids: &[ObjectId]) -> ClientResponse {
        if ids.len() > limits::OBJECT_REQUEST_IDS_MAX {
            return error(
                ErrorKind::InvalidArgument,
                format!(
                    "{} objects asked for; at most {} per request",
                    ids.len(),
                    limits::OBJECT_REQUEST_IDS_MAX
                ),
            );
        }
        let Some(signer) = self.config.grant_signer.as_deref() else {
            return error(
                ErrorKind::Unavailable,
                "this head has no grant key; objects cannot be read".into(),
            );
        };
        let mut endpoints: Vec<ObjectEndpoint> = Vec::new();
        let mut index: HashMap<&str, u32> = HashMap::new();
        let mut readable = Vec::new();
        let mut objects = Vec::with_capacity(ids.len());
        for id in ids {
            let entry = self.objects.get(owner, id);
            let mut nodes = Vec::new();
            for node in entry.into_iter().flat_map(ObjectEntry::nodes) {
                let Some(endpoint) = self
                    .cluster
                    .nodes
                    .get(node.as_str())
                    .and_then(|n| n.endpoint.as_ref())
                else {
                    continue;
                };
                let i = *index.entry(node.as_str()).or_insert_with(|| {
                    endpoints.push(endpoint.clone());
                    endpoints.len() as u32 - 1
                });
                nodes.push(i);
            }
            if !nodes.is_empty() {
                readable.push(*id);
            }
            objects.push(LocatedObject {
                object: ObjectRef {
                    id: *id,
                    size: entry.map_or(0, |e| e.size),
                },
                missing: nodes.is_empty().then(|| self.missing_text(owner, id)),
                nodes,
            });
        }
        let grant = sign(
            signer,
            owner,
            GrantAccess::Read { ids: readable },
            self.now_ms,
        );
        ClientResponse::ObjectLocations(ObjectLocations {
            objects,
            endpoints,
            grant,
        })
    }

    /// `ClientRequest::ListObjects`: at most [`limits::MESSAGE_BATCH_MAX`] of `owner`'s
    /// objects (of `session`'s, when given), oldest first.
    pub(super) fn list_objects(&self, owner: &str, session: Option<SessionId>) -> ClientResponse {
        let info = |id: &ObjectId, e: &ObjectEntry| ObjectInfo {
            owner: owner.to_string(),
            object: ObjectRef {
                id: *id,
                size: e.size,
            },
            scope: e.scope,
            origin: e.origin,
            nodes: e.holders.iter().map(|n| n.to_string()).collect(),
            replicas: e.replicas,
            created_ms: e.created_ms,
        };
        let mut list: Vec<ObjectInfo> = match session {
            Some(sid) => self
                .objects
                .by_session
                .get(&sid)
                .into_iter()
                .flatten()
                .filter(|(o, _)| o.as_str() == owner)
                .filter_map(|(_, id)| Some(info(id, self.objects.get(owner, id)?)))
                .collect(),
            None => self
                .objects
                .owners
                .get(owner)
                .into_iter()
                .flat_map(|o| o.objects.iter())
                .map(|(id, e)| info(id, e))
                .collect(),
        };
        list.sort_by(|a, b| {
            a.created_ms
                .cmp(&b.created_ms)
                .then(a.object.id.cmp(&b.object.id))
        });
        list.truncate(limits::MESSAGE_BATCH_MAX);
        ClientResponse::Objects(list)
    }

    /// `ClientRequest::RemoveObjects`: forgets them; every node with a copy drops it.
    /// NotFound names the first id the book did not have (the others are removed).
    pub(super) fn remove_objects(&mut self, owner: &str, ids: &[ObjectId]) -> ClientResponse {
        if ids.len() > limits::OBJECT_REQUEST_IDS_MAX {
            return error(
                ErrorKind::InvalidArgument,
                format!(
                    "{} objects named; at most {} per request",
                    ids.len(),
                    limits::OBJECT_REQUEST_IDS_MAX
                ),
            );
        }
        let mut per_node: BTreeMap<NodeName, Vec<ObjectId>> = BTreeMap::new();
        let mut unknown = None;
        let mut removed = 0;
        for id in ids {
            match self.objects.remove(owner, id) {
                Some(entry) => {
                    removed += 1;
                    for node in entry.nodes() {
                        per_node.entry(node.clone()).or_default().push(*id);
                    }
                }
                None => {
                    unknown.get_or_insert(*id);
                }
            }
        }
        for (node, ids) in per_node {
            let command = ObjectCommand::Remove {
                owner: owner.to_string(),
                ids,
            };
            self.object_command(&node, command);
        }
        match unknown {
            None => ClientResponse::Ok,
            Some(id) => error(
                ErrorKind::NotFound,
                format!(
                    "object {id} of owner `{owner}` is not stored ({removed} of {} named removed)",
                    ids.len()
                ),
            ),
        }
    }

    /// A node's cache events and usage.
    pub(super) fn on_object_events(
        &mut self,
        node: &str,
        events: Vec<ObjectEvent>,
        usage: CacheUsage,
    ) {
        let node = NodeName::from(node);
        if let Some(n) = self.cluster.nodes.get_mut(node.as_str()) {
            n.cache = Some(usage);
        }
        for event in events {
            match event {
                ObjectEvent::Stored {
                    owner,
                    object,
                    scope,
                } => self.object_stored(&node, owner_name(&owner), object, scope),
                ObjectEvent::Dropped { owner, id, reason } => {
                    let key = (OwnerName::from(owner_name(&owner).to_string()), id);
                    let why = format!("dropped by node {node}: {reason}");
                    self.copy_gone(&key, &node, &why);
                }
                ObjectEvent::Full { reason } => {
                    tracing::warn!(node = %node, %reason, "a node's object cache is full");
                }
            }
        }
    }

    /// A node reports a copy: confirmed, or recorded as a new object (a node that
    /// registers reports what it kept, e.g. across a head restart). A copy of a session
    /// that has ended is dropped there instead.
    fn object_stored(
        &mut self,
        node: &NodeName,
        owner: &str,
        object: ObjectRef,
        scope: ObjectScope,
    ) {
        let owner = OwnerName::from(owner.to_string());
        if self.objects.confirm(&owner, object.id, node) {
            return;
        }
        if let ObjectScope::Session(sid) = scope {
            if !self.session_keeps_objects(&owner, sid) {
                let command = ObjectCommand::EndSession {
                    owner: owner.to_string(),
                    session: sid,
                };
                self.object_command(node, command);
                return;
            }
        }
        self.objects.insert(
            &owner,
            object.id,
            ObjectEntry {
                size: object.size,
                scope,
                origin: ObjectOrigin::Put,
                replicas: 1,
                holders: vec![node.clone()],
                expected: Vec::new(),
                created_ms: self.now_ms,
                missing: None,
            },
        );
    }

    /// Whether a node's copy of an object of `owner`'s session `sid` goes in the book:
    /// the session is live, or it ended less than a retention ago (its copy then goes with
    /// the others when the retention ends). A session this head did not see end (it ended
    /// before the start, or was loaded finished) is taken to have ended at the start: a
    /// node's inventory after a head restart must not drop what late readers of a session
    /// that ended just before it still read. An ended session whose objects already went,
    /// or another owner's session, keeps nothing.
    fn session_keeps_objects(&mut self, owner: &OwnerName, sid: SessionId) -> bool {
        if let Some(s) = self.tasks.sessions.get(&sid) {
            if owner_name(&s.stored.owner) != owner.as_str() {
                return false;
            }
            if !s.finished {
                return true;
            }
        }
        if let Some(o) = self.objects.ending.get(&sid) {
            return o == owner.as_str();
        }
        let Some((started_ms, first_session)) = self.objects.life else {
            return false;
        };
        let at_ms = started_ms.saturating_add(self.config.object_retention_ms);
        if sid.0 >= first_session || self.now_ms >= at_ms {
            return false;
        }
        self.objects.push_ending(Ending {
            at_ms,
            session: sid,
            owner: owner.to_string(),
            nodes: BTreeSet::new(),
        });
        true
    }

    /// A task's output kept on `node` (`TaskOutcome::Object`): the node holds it, scoped
    /// to the task's session.
    pub(super) fn object_output(
        &mut self,
        node: &str,
        session: SessionId,
        task: TaskId,
        object: ObjectRef,
    ) {
        let Some(owner) = self
            .tasks
            .sessions
            .get(&session)
            .map(|s| OwnerName::from(owner_name(&s.stored.owner).to_string()))
        else {
            return;
        };
        let node = NodeName::from(node);
        if self.objects.confirm(&owner, object.id, &node) {
            return;
        }
        self.objects.insert(
            &owner,
            object.id,
            ObjectEntry {
                size: object.size,
                scope: ObjectScope::Session(session),
                origin: ObjectOrigin::Output { session, task },
                replicas: 1,
                holders: vec![node],
                expected: Vec::new(),
                created_ms: self.now_ms,
                missing: None,
            },
        );
    }

    /// `node` no longer has its copy of `key` (dropped, or the node was lost): a put
    /// object short of copies is copied again; one with none left is lost (`why`), and a
    /// task output of an unfinished session is rebuilt by re-running its task.
    fn copy_gone(&mut self, key: &ObjectKey, node: &str, why: &str) {
        let confirmed = self
            .objects
            .get(&key.0, &key.1)
            .is_some_and(|e| e.holders.iter().any(|n| n.as_str() == node));
        let Some(entry) = self.objects.drop_copy(key, node) else {
            self.top_up_replicas(key);
            return;
        };
        if !confirmed && entry_never_held(Some(&*entry)) {
            // Only expected there, never confirmed anywhere: it was never stored.
            self.objects.remove(&key.0, &key.1);
            return;
        }
        let (origin, size) = (entry.origin, entry.size);
        let what = match origin {
            ObjectOrigin::Put => why.to_string(),
            ObjectOrigin::Output { session, task } => {
                match self.start_rebuild(key, size, (session, task), why) {
                    Ok(()) => {
                        format!("being rebuilt by re-running task {task} of session {session}")
                    }
                    Err(cannot) => format!(
                        "{why}; task {task} of session {session} that made it is not re-run: \
                         {cannot}"
                    ),
                }
            }
        };
        tracing::warn!(owner = %key.0, object = %key.1, %what, "object lost: no copy left");
        if let Some(entry) = self.objects.get_mut(&key.0, &key.1) {
            entry.missing = Some(what);
        }
    }

    /// A client-put object with fewer confirmed or expected copies than it asked for gets
    /// one more, from a holder, on another ready node.
    fn top_up_replicas(&mut self, key: &ObjectKey) {
        let Some(entry) = self.objects.get(&key.0, &key.1) else {
            return;
        };
        let copies = entry.holders.len() + entry.expected.len();
        if entry.origin != ObjectOrigin::Put
            || copies >= entry.replicas as usize
            || entry.holders.is_empty()
        {
            return;
        }
        let session = match entry.scope {
            ObjectScope::Session(s) => Some(s),
            ObjectScope::Kept => None,
        };
        let Some(target) = self.object_targets(session, Some(entry)).into_iter().next() else {
            tracing::warn!(owner = %key.0, object = %key.1, copies, wanted = entry.replicas,
                "no ready node to hold another copy of an object");
            return;
        };
        let object = ObjectRef {
            id: key.1,
            size: entry.size,
        };
        let scope = entry.scope;
        match self.object_view().fetch(&key.0, &object, &target) {
            Fetch::From(sources) => {
                let deadline = self
                    .now_ms
                    .saturating_add(limits::OBJECT_GRANT_TTL.as_millis() as u64);
                self.objects.expect(&key.0, key.1, &target, deadline);
                let command = ObjectCommand::Replicate {
                    owner: key.0.to_string(),
                    scope,
                    sources,
                };
                self.object_command(&target, command);
            }
            Fetch::Local | Fetch::Missing(_) => {}
        }
    }

    /// A lost node's copies leave the book.
    pub(super) fn objects_node_lost(&mut self, node: &str) {
        let Some(keys) = self.objects.by_node.remove(node) else {
            return;
        };
        let why = format!("lost with node {node}");
        let mut keys: Vec<ObjectKey> = keys.into_iter().collect();
        // In a stable order: what is replicated where must not depend on hashing.
        keys.sort();
        for key in keys {
            self.copy_gone(&key, node, &why);
        }
    }

    /// Session `sid` has ended: no output of it is rebuilt any more, and its objects go
    /// after [`limits::SESSION_OBJECTS_RETENTION`] ([`Core::expire_objects`]), so that
    /// results read after the end still find their bytes.
    pub(super) fn objects_session_ended(&mut self, sid: SessionId) {
        let Some(s) = self.tasks.sessions.get(&sid) else {
            return;
        };
        let owner = owner_name(&s.stored.owner).to_string();
        let mut nodes: BTreeSet<NodeName> = s
            .stored
            .usage
            .iter()
            .map(|u| NodeName::from(u.node.as_str()))
            .collect();
        nodes.extend(
            self.pool
                .executors
                .values()
                .filter(|e| e.session == Some(sid))
                .map(|e| e.node.clone()),
        );
        self.drop_rebuilds(sid);
        let at_ms = self.now_ms.saturating_add(self.config.object_retention_ms);
        self.objects.push_ending(Ending {
            at_ms,
            session: sid,
            owner,
            nodes,
        });
    }

    /// The objects of an ended session leave the book, and every node that held one or
    /// served the session is told, so it drops them.
    fn session_objects_go(&mut self, ending: Ending) {
        let Ending {
            session: sid,
            owner,
            mut nodes,
            ..
        } = ending;
        if let Some(keys) = self.objects.by_session.remove(&sid) {
            for (o, id) in keys {
                if let Some(entry) = self.objects.remove(&o, &id) {
                    nodes.extend(entry.nodes().cloned());
                }
            }
        }
        for node in nodes {
            // Connected nodes that serve objects (a lost one's cache went with it).
            let serves = self
                .cluster
                .nodes
                .get(node.as_str())
                .is_some_and(|n| n.conn.is_some() && n.endpoint.is_some());
            if serves {
                let command = ObjectCommand::EndSession {
                    owner: owner.clone(),
                    session: sid,
                };
                self.object_command(&node, command);
            }
        }
    }

    /// Puts not confirmed within a grant's life are given up; an object left with no
    /// copy and none confirmed ever leaves the book ("never stored").
    pub(super) fn expire_objects(&mut self, now_ms: u64) {
        while self
            .objects
            .endings
            .front()
            .is_some_and(|e| e.at_ms <= now_ms)
        {
            if let Some(ending) = self.objects.endings.pop_front() {
                self.objects.ending.remove(&ending.session);
                self.session_objects_go(ending);
            }
        }
        while let Some((at, _, _)) = self.objects.expiries.front() {
            if *at > now_ms {
                break;
            }
            let Some((_, key, node)) = self.objects.expiries.pop_front() else {
                break;
            };
            let Some(entry) = self.objects.get_mut(&key.0, &key.1) else {
                continue;
            };
            if !entry.expected.contains(&node) {
                continue;
            }
            entry.expected.retain(|n| *n != node);
            let never = entry.holders.is_empty() && entry.expected.is_empty();
            self.objects.unindex_node(&node, &key);
            if never && entry_never_held(self.objects.get(&key.0, &key.1)) {
                self.objects.remove(&key.0, &key.1);
            }
        }
    }
}

/// Whether an object with no copy was never confirmed anywhere (a put that did not
/// happen), as opposed to one whose copies were lost.
fn entry_never_held(entry: Option<&ObjectEntry>) -> bool {
    entry.is_some_and(|e| e.missing.is_none() && e.holders.is_empty())
}

/// One object as the book has it, for the simulation's properties (tests).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) struct BookRow {
    pub(crate) owner: String,
    pub(crate) id: ObjectId,
    pub(crate) scope: ObjectScope,
    pub(crate) origin: ObjectOrigin,
    pub(crate) holders: Vec<String>,
    pub(crate) expected: Vec<String>,
    pub(crate) missing: Option<String>,
}

#[cfg(test)]
impl Core {
    /// Every object in the book, sorted by owner and id (tests).
    pub(crate) fn object_book(&self) -> Vec<BookRow> {
        let mut rows: Vec<BookRow> = self
            .objects
            .owners
            .iter()
            .flat_map(|(owner, o)| {
                o.objects.iter().map(move |(id, e)| BookRow {
                    owner: owner.to_string(),
                    id: *id,
                    scope: e.scope,
                    origin: e.origin,
                    holders: e.holders.iter().map(|n| n.to_string()).collect(),
                    expected: e.expected.iter().map(|n| n.to_string()).collect(),
                    missing: e.missing.clone(),
                })
            })
            .collect();
        rows.sort_by(|a, b| (a.owner.as_str(), a.id).cmp(&(b.owner.as_str(), b.id)));
        rows
    }
}
