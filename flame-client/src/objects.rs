//! Objects: putting bytes into the nodes' caches and reading them back.
//!
//! The head never carries an object's bytes. A put asks the head where to put
//! (`PutObjects`: one target node per copy, each with a write grant) and sends the bytes
//! to those nodes directly; a get asks where the objects are (`LocateObjects`, with a
//! read grant) and reads them from a node. The transfers are
//! [`flame_protocol::object_transfer`]'s: QUIC to the node, or a sealed memfd over the
//! node's Unix socket when it is on this host.
//!
//! [`Client::put_object`] and friends are the explicit calls (`flame object ...`). The
//! [`crate::Submitter`] and [`crate::ResultStream`] use them on their own: inputs larger
//! than [`crate::ClientConfig::object_inline_max`] go as objects, and outputs the nodes
//! kept as objects are fetched before the caller sees them.

use crate::batch::BatchLimits;
use crate::client::Client;
use crate::error::ClientError;
use bytes::Bytes;
use flame_protocol::limits;
use flame_protocol::messages::{ClientRequest, ClientResponse};
use flame_protocol::object::{
    digest, ChunkHash, ObjectEndpoint, ObjectId, ObjectInfo, ObjectLocations, ObjectRef,
    ObjectTarget, Payload, OBJECT_ID_BYTES,
};
use flame_protocol::object_transfer::ObjectClient;
use flame_protocol::SessionId;
use std::collections::HashMap;
use std::sync::Arc;

/// Transfers (one object to one node) one call runs at once; more wait.
pub const OBJECT_TRANSFERS_IN_FLIGHT: usize = 16;

/// Objects of at least this many bytes are hashed on a blocking thread.
const HASH_BLOCKING_BYTES_MIN: usize = 1024 * 1024;

/// The owner to send: the one given, else the client's configured one, else empty (the
/// head takes the caller).
fn owner_of(client: &Client, owner: Option<&str>) -> String {
    owner.unwrap_or_else(|| client.owner()).to_string()
}

/// The references of `blobs` and their chunk hashes, from one pass over each blob, off the
/// runtime's threads when large.
async fn digests_of(blobs: &[Bytes]) -> Result<Vec<(ObjectRef, Vec<ChunkHash>)>, ClientError> {
    let mut refs = Vec::with_capacity(blobs.len());
    for blob in blobs {
        if blob.len() as u64 > limits::OBJECT_BYTES_MAX {
            return Err(ClientError::ObjectInvalid(format!(
                "{} bytes cannot be an object: objects may be at most {} bytes",
                blob.len(),
                limits::OBJECT_BYTES_MAX
            )));
        }
        let r = if blob.len() < HASH_BLOCKING_BYTES_MIN {
            digest(blob)
        } else {
            let blob = blob.clone();
            tokio::task::spawn_blocking(move || digest(&blob))
                .await
                .map_err(|e| ClientError::ObjectInvalid(format!("hashing an object failed: {e}")))?
        };
        refs.push(r);
    }
    Ok(refs)
}

/// Runs `jobs` on the runtime, at most [`OBJECT_TRANSFERS_IN_FLIGHT`] at once; returns
/// their results in the order given. The first error is returned once every job started
/// has ended (dropping the set aborts the rest).
async fn run_bounded<T: Send + 'static>(
    jobs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>>,
) -> Result<Vec<T>, ClientError> {
    let total = jobs.len();
    let mut pending = jobs.into_iter().enumerate();
    let mut running = tokio::task::JoinSet::new();
    let mut out: Vec<Option<T>> = (0..total).map(|_| None).collect();
    loop {
        while running.len() < OBJECT_TRANSFERS_IN_FLIGHT {
            let Some((i, job)) = pending.next() else {
                break;
            };
            running.spawn(async move { (i, job.await) });
        }
        let Some(joined) = running.join_next().await else {
            break;
        };
        let (i, value) = joined.map_err(|e| {
            ClientError::ObjectInvalid(format!("an object transfer task failed: {e}"))
        })?;
        out[i] = Some(value);
    }
    Ok(out.into_iter().flatten().collect())
}

impl Client {
    /// The shared transfer client, made on first use from this client's trust settings.
    pub(crate) fn object_client(&self) -> Result<Arc<ObjectClient>, ClientError> {
        self.object_client_with(|| {
            let trust = self.config().trust()?;
            ObjectClient::new(&trust, None)
                .map(Arc::new)
                .map_err(|source| ClientError::ObjectTransfer {
                    what: "setting up object transfers".to_string(),
                    source: Box::new(source),
                })
        })
    }

    /// Puts `bytes` as an object of `owner` (`None`: this client's owner, else the
    /// caller), kept as long as `session` (`None`: until removed), with `replicas` copies
    /// on distinct nodes (at least 1, at most [`limits::OBJECT_REPLICAS_MAX`]). Returns
    /// once every copy is stored.
    pub async fn put_object(
        &self,
        owner: Option<&str>,
        session: Option<SessionId>,
        bytes: Bytes,
        replicas: u32,
    ) -> Result<ObjectRef, ClientError> {
        let refs = self
            .put_objects(owner, session, vec![bytes], replicas)
            .await?;
        refs.into_iter().next().ok_or_else(|| {
            self.protocol_error("putting an object", "no reference came back".into())
        })
    }

    /// Puts every blob of `blobs` as [`Client::put_object`] does, with one `PutObjects`
    /// request per [`limits::OBJECT_REQUEST_IDS_MAX`] objects and the transfers run
    /// [`OBJECT_TRANSFERS_IN_FLIGHT`] at a time. Returns their references in order (equal
    /// blobs get equal references and are sent once).
    pub async fn put_objects(
        &self,
        owner: Option<&str>,
        session: Option<SessionId>,
        blobs: Vec<Bytes>,
        replicas: u32,
    ) -> Result<Vec<ObjectRef>, ClientError> {
        let digests = digests_of(&blobs).await?;
        let refs: Vec<ObjectRef> = digests.iter().map(|(r, _)| *r).collect();
        let mut unique: HashMap<ObjectId, usize> = HashMap::with_capacity(refs.len());
        let mut distinct: Vec<(ObjectRef, Vec<ChunkHash>, Bytes)> = Vec::new();
        for ((r, chunks), blob) in digests.into_iter().zip(blobs) {
            unique.entry(r.id).or_insert_with(|| {
                distinct.push((r, chunks, blob));
                distinct.len() - 1
            });
        }
        if distinct.is_empty() {
            return Ok(refs);
        }
        let transfer = self.object_client()?;
        let owner = owner_of(self, owner);
        let replicas = replicas.clamp(1, limits::OBJECT_REPLICAS_MAX);
        for group in distinct.chunks(limits::OBJECT_REQUEST_IDS_MAX) {
            let request = ClientRequest::PutObjects {
                owner: owner.clone(),
                session,
                objects: group.iter().map(|(r, _, _)| *r).collect(),
                replicas,
            };
            let targets = match self.request(request).await? {
                ClientResponse::ObjectTargets(targets) if !targets.is_empty() => targets,
                other => return Err(self.unexpected("request PutObjects", &other)),
            };
            let mut jobs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> =
                Vec::with_capacity(group.len() * targets.len());
            for target in targets {
                let target = Arc::new(target);
                for (object, chunks, bytes) in group {
                    jobs.push(Box::pin(put_one(
                        transfer.clone(),
                        target.clone(),
                        *object,
                        chunks.clone(),
                        bytes.clone(),
                    )));
                }
            }
            for result in run_bounded(jobs).await? {
                result?;
            }
        }
        Ok(refs)
    }

    /// Reads `owner`'s object `id` from a node that holds it.
    pub async fn get_object(
        &self,
        owner: Option<&str>,
        id: ObjectId,
    ) -> Result<Bytes, ClientError> {
        let mut got = self.get_objects(owner, &[id]).await?;
        got.pop()
            .ok_or_else(|| self.protocol_error("reading an object", "no bytes came back".into()))
    }

    /// Reads `owner`'s objects `ids`, in order: one `LocateObjects` request per
    /// [`limits::OBJECT_REQUEST_IDS_MAX`], then the transfers,
    /// [`OBJECT_TRANSFERS_IN_FLIGHT`] at a time. An object no node holds is
    /// [`ClientError::ObjectMissing`] with the head's reason.
    pub async fn get_objects(
        &self,
        owner: Option<&str>,
        ids: &[ObjectId],
    ) -> Result<Vec<Bytes>, ClientError> {
        self.fetch_objects(owner, ids).await?.into_iter().collect()
    }

    /// As [`Client::get_objects`], with each object's own outcome.
    pub(crate) async fn fetch_objects(
        &self,
        owner: Option<&str>,
        ids: &[ObjectId],
    ) -> Result<Vec<Result<Bytes, ClientError>>, ClientError> {
        let owner = owner_of(self, owner);
        let mut out = Vec::with_capacity(ids.len());
        if ids.is_empty() {
            return Ok(out);
        }
        let transfer = self.object_client()?;
        for group in ids.chunks(limits::OBJECT_REQUEST_IDS_MAX) {
            let request = ClientRequest::LocateObjects {
                owner: owner.clone(),
                ids: group.to_vec(),
            };
            let locations = match self.request(request).await? {
                ClientResponse::ObjectLocations(locations) => locations,
                other => return Err(self.unexpected("request LocateObjects", &other)),
            };
            let plans = self.plan_gets(group, locations)?;
            let jobs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> = plans
                .into_iter()
                .map(|plan| {
                    Box::pin(get_one(transfer.clone(), plan))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>
                })
                .collect();
            out.extend(run_bounded(jobs).await?);
        }
        Ok(out)
    }

    /// What to read, and where, for each object of `ids`, from the head's answer.
    fn plan_gets(
        &self,
        ids: &[ObjectId],
        locations: ObjectLocations,
    ) -> Result<Vec<GetPlan>, ClientError> {
        let what = "request LocateObjects";
        if locations.objects.len() != ids.len() {
            return Err(self.protocol_error(
                what,
                format!(
                    "{} objects located for {} asked",
                    locations.objects.len(),
                    ids.len()
                ),
            ));
        }
        let shared = Arc::new(SharedLocations {
            owner: locations.grant.body.owner.clone(),
            grant: locations.grant,
        });
        let mut plans = Vec::with_capacity(ids.len());
        for (id, located) in ids.iter().zip(locations.objects) {
            if located.object.id != *id {
                return Err(self.protocol_error(
                    what,
                    format!("asked for {id}, located {}", located.object.id),
                ));
            }
            let mut endpoints = Vec::with_capacity(located.nodes.len());
            for index in &located.nodes {
                let endpoint = locations.endpoints.get(*index as usize).ok_or_else(|| {
                    self.protocol_error(what, format!("node index {index} out of range"))
                })?;
                endpoints.push(endpoint.clone());
            }
            let missing = endpoints.is_empty().then(|| {
                located
                    .missing
                    .unwrap_or_else(|| "no node holds a copy".to_string())
            });
            plans.push(GetPlan {
                object: located.object,
                endpoints,
                missing,
                shared: shared.clone(),
            });
        }
        Ok(plans)
    }

    /// `owner`'s objects, of `session` or all.
    pub async fn list_objects(
        &self,
        owner: Option<&str>,
        session: Option<SessionId>,
    ) -> Result<Vec<ObjectInfo>, ClientError> {
        let request = ClientRequest::ListObjects {
            owner: owner_of(self, owner),
            session,
        };
        match self.request(request).await? {
            ClientResponse::Objects(objects) => Ok(objects),
            other => Err(self.unexpected("request ListObjects", &other)),
        }
    }

    /// Forgets `owner`'s objects `ids`; every node drops its copy.
    pub async fn remove_objects(
        &self,
        owner: Option<&str>,
        ids: &[ObjectId],
    ) -> Result<(), ClientError> {
        let owner = owner_of(self, owner);
        for group in ids.chunks(limits::OBJECT_REQUEST_IDS_MAX) {
            let request = ClientRequest::RemoveObjects {
                owner: owner.clone(),
                ids: group.to_vec(),
            };
            match self.request(request).await? {
                ClientResponse::Ok => {}
                other => return Err(self.unexpected("request RemoveObjects", &other)),
            }
        }
        Ok(())
    }

    /// `payload` as it should travel: inline when at most the configured threshold, else
    /// put first (as an object of `owner` for `session`, or kept) and sent as a reference.
    pub(crate) async fn offload(
        &self,
        owner: &str,
        session: Option<SessionId>,
        payload: Payload,
    ) -> Result<Payload, ClientError> {
        match payload {
            Payload::Inline(bytes) if bytes.len() as u64 > self.config().object_inline_max => {
                let r = self.put_object(Some(owner), session, bytes, 1).await?;
                Ok(Payload::Object(r))
            }
            other => Ok(other),
        }
    }
}

/// The grant and owner every object of one `LocateObjects` answer is read with.
#[derive(Debug)]
struct SharedLocations {
    owner: String,
    grant: flame_protocol::object::Grant,
}

/// One object to read.
#[derive(Debug)]
struct GetPlan {
    object: ObjectRef,
    endpoints: Vec<ObjectEndpoint>,
    /// Why no node holds it, when none does.
    missing: Option<String>,
    shared: Arc<SharedLocations>,
}

async fn put_one(
    transfer: Arc<ObjectClient>,
    target: Arc<ObjectTarget>,
    object: ObjectRef,
    chunks: Vec<ChunkHash>,
    bytes: Bytes,
) -> Result<(), ClientError> {
    transfer
        .put(&target, object, chunks, bytes)
        .await
        .map_err(|source| ClientError::ObjectTransfer {
            what: format!(
                "putting object {} to node {}",
                object.id.short(),
                target.endpoint.node
            ),
            source: Box::new(source),
        })
}

async fn get_one(transfer: Arc<ObjectClient>, plan: GetPlan) -> Result<Bytes, ClientError> {
    if let Some(reason) = plan.missing {
        return Err(ClientError::ObjectMissing {
            id: plan.object.id,
            reason,
        });
    }
    transfer
        .get(
            &plan.shared.owner,
            plan.object,
            &plan.endpoints,
            &plan.shared.grant,
        )
        .await
        .map_err(|source| ClientError::ObjectTransfer {
            what: format!("reading object {}", plan.object.id.short()),
            source: Box::new(source),
        })
}

/// One task input, as it will travel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SubmitInput {
    /// Inline in the batch.
    Inline(Bytes),
    /// Put first; the batch carries the reference.
    Object(Bytes),
}

impl SubmitInput {
    /// What the input costs in a batch: its bytes inline, a reference's size otherwise.
    fn held_bytes(&self) -> usize {
        match self {
            SubmitInput::Inline(b) => b.len(),
            SubmitInput::Object(_) => OBJECT_ID_BYTES + 8,
        }
    }
}

/// Splits `inputs`, in order, into submit batches: an input larger than `inline_max`
/// goes as an object, and counts in its batch's bytes as a reference does. Each batch
/// holds at most `limits.tasks_max` inputs and `limits.bytes_target` held bytes (or a
/// single larger inline input); no batch is empty.
pub(crate) fn split_submit(
    inputs: Vec<Bytes>,
    limits: BatchLimits,
    inline_max: u64,
) -> Vec<Vec<SubmitInput>> {
    let tasks_max = limits.tasks_max.max(1);
    let mut batches = Vec::new();
    let mut current: Vec<SubmitInput> = Vec::new();
    let mut current_bytes = 0usize;
    for input in inputs {
        let input = if input.len() as u64 > inline_max {
            SubmitInput::Object(input)
        } else {
            SubmitInput::Inline(input)
        };
        let held = input.held_bytes();
        let fits_bytes = current_bytes.saturating_add(held) <= limits.bytes_target;
        if !current.is_empty() && (!fits_bytes || current.len() >= tasks_max) {
            batches.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current_bytes = current_bytes.saturating_add(held);
        current.push(input);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// The payloads of one batch: its object inputs put with one `PutObjects` (scope
/// `session`), its inline inputs as they are.
pub(crate) async fn batch_payloads(
    client: &Client,
    owner: &str,
    session: SessionId,
    batch: Vec<SubmitInput>,
) -> Result<Vec<Payload>, ClientError> {
    let large: Vec<Bytes> = batch
        .iter()
        .filter_map(|input| match input {
            SubmitInput::Object(b) => Some(b.clone()),
            SubmitInput::Inline(_) => None,
        })
        .collect();
    let mut refs = if large.is_empty() {
        Vec::new()
    } else {
        client
            .put_objects(Some(owner), Some(session), large, 1)
            .await?
    }
    .into_iter();
    let mut payloads = Vec::with_capacity(batch.len());
    for input in batch {
        payloads.push(match input {
            SubmitInput::Inline(b) => Payload::Inline(b),
            SubmitInput::Object(_) => Payload::Object(refs.next().ok_or_else(|| {
                ClientError::ObjectInvalid("fewer object references than objects put".into())
            })?),
        });
    }
    Ok(payloads)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn inputs(sizes: &[usize]) -> Vec<Bytes> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| Bytes::from(vec![i as u8; n]))
            .collect()
    }

    /// Each batch as sizes, negative for objects.
    fn shape(batches: &[Vec<SubmitInput>]) -> Vec<Vec<i64>> {
        batches
            .iter()
            .map(|b| {
                b.iter()
                    .map(|i| match i {
                        SubmitInput::Inline(b) => b.len() as i64,
                        SubmitInput::Object(b) => -(b.len() as i64),
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn inputs_above_the_threshold_go_as_objects_and_count_as_references() {
        let limits = BatchLimits {
            bytes_target: 100,
            tasks_max: 4,
        };
        let batches = split_submit(inputs(&[10, 1000, 60, 30, 5000, 10, 1, 2]), limits, 100);
        // Objects weigh a reference's 40 bytes: 10 + 40 fit, the 60 does not.
        assert_eq!(
            shape(&batches),
            vec![vec![10, -1000], vec![60, 30], vec![-5000, 10, 1, 2]]
        );
    }

    #[test]
    fn the_threshold_is_inclusive_and_order_and_count_bounds_hold() {
        let limits = BatchLimits {
            bytes_target: 1_000_000,
            tasks_max: 3,
        };
        let batches = split_submit(inputs(&[100, 101, 100, 0, 500]), limits, 100);
        assert_eq!(shape(&batches), vec![vec![100, -101, 100], vec![0, -500]]);
        let flat: Vec<Bytes> = batches
            .into_iter()
            .flatten()
            .map(|i| match i {
                SubmitInput::Inline(b) | SubmitInput::Object(b) => b,
            })
            .collect();
        assert_eq!(flat, inputs(&[100, 101, 100, 0, 500]));
        assert!(split_submit(Vec::new(), limits, 100).is_empty());
    }

    #[test]
    fn a_large_inline_input_still_travels_alone() {
        let limits = BatchLimits {
            bytes_target: 10,
            tasks_max: 100,
        };
        // With no threshold worth the name, everything is inline, as before objects.
        let batches = split_submit(inputs(&[4, 6, 1, 25, 3]), limits, u64::MAX);
        assert_eq!(
            shape(&batches),
            vec![vec![4, 6], vec![1], vec![25], vec![3]]
        );
    }
}
