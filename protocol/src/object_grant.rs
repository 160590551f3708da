//! Signing and checking object grants ([`crate::object::Grant`]): Ed25519 (ring).
//!
//! The head holds a [`GrantSigner`], made fresh at each start (grants live minutes, so a
//! restart costs a client one more request); nodes get its public [`GrantKey`] in
//! `HeadToNode::Registered` and check every grant with [`verify`] before they store or
//! serve a byte. A node cannot make grants: a node that is taken over can read only
//! what the head granted it for the tasks it was sent.

use crate::object::{Grant, GrantAccess, GrantBody, GrantKey, ObjectId, ObjectScope};
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

/// Why a grant was not accepted. The text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("the object grant's signature is not the head's (was it made by an earlier head process? ask the head again)")]
    BadSignature,
    #[error("the object grant expired {ago_ms} ms ago; ask the head again")]
    Expired { ago_ms: u64 },
    #[error("the object grant is for owner `{granted}`, not `{wanted}`")]
    WrongOwner { granted: String, wanted: String },
    #[error("the object grant does not cover object {0}")]
    NotCovered(ObjectId),
    #[error("the object grant is for reading, not storing")]
    NotWrite,
    #[error("the object grant is for storing on node `{granted}`, not on `{here}`")]
    WrongNode { granted: String, here: String },
    #[error("this node has no grant key yet (it has not registered with the head)")]
    NoKey,
    #[error("could not make a grant key: {0}")]
    Key(String),
}

/// The head's grant key pair.
pub struct GrantSigner {
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for GrantSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GrantSigner(<redacted>)")
    }
}

impl GrantSigner {
    /// A new random key pair.
    pub fn generate() -> Result<GrantSigner, GrantError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 =
            Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| GrantError::Key(e.to_string()))?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| GrantError::Key(e.to_string()))?;
        Ok(GrantSigner { pair })
    }

    /// The public key nodes check grants with.
    pub fn public_key(&self) -> GrantKey {
        GrantKey(self.pair.public_key().as_ref().to_vec())
    }

    /// Signs `body`.
    pub fn sign(&self, body: GrantBody) -> Grant {
        let signature = self
            .pair
            .sign(&Grant::signed_bytes(&body))
            .as_ref()
            .to_vec();
        Grant { body, signature }
    }
}

/// Checks `grant`'s signature under `key` and its expiry at `now_unix_ms`; returns its body.
pub fn verify<'g>(
    key: &GrantKey,
    grant: &'g Grant,
    now_unix_ms: u64,
) -> Result<&'g GrantBody, GrantError> {
    if key.0.is_empty() {
        return Err(GrantError::NoKey);
    }
    UnparsedPublicKey::new(&ED25519, &key.0)
        .verify(&Grant::signed_bytes(&grant.body), &grant.signature)
        .map_err(|_| GrantError::BadSignature)?;
    if now_unix_ms > grant.body.expires_unix_ms {
        return Err(GrantError::Expired {
            ago_ms: now_unix_ms - grant.body.expires_unix_ms,
        });
    }
    Ok(&grant.body)
}

/// Checks that a verified grant lets its bearer read `owner`'s object `id`.
pub fn check_read(body: &GrantBody, owner: &str, id: &ObjectId) -> Result<(), GrantError> {
    check_owner(body, owner)?;
    match &body.access {
        GrantAccess::Read { ids } if ids.contains(id) => Ok(()),
        _ => Err(GrantError::NotCovered(*id)),
    }
}

/// Checks that a verified grant lets its bearer store objects on `node`; returns the
/// scope they get and the most bytes the grant covers.
pub fn check_write(body: &GrantBody, node: &str) -> Result<(ObjectScope, u64), GrantError> {
    match &body.access {
        GrantAccess::Write {
            node: granted,
            scope,
            bytes_max,
        } => {
            if granted != node {
                return Err(GrantError::WrongNode {
                    granted: granted.clone(),
                    here: node.to_string(),
                });
            }
            Ok((*scope, *bytes_max))
        }
        GrantAccess::Read { .. } => Err(GrantError::NotWrite),
    }
}

fn check_owner(body: &GrantBody, owner: &str) -> Result<(), GrantError> {
    if body.owner != owner {
        return Err(GrantError::WrongOwner {
            granted: body.owner.clone(),
            wanted: owner.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ids: Vec<ObjectId>, expires: u64) -> GrantBody {
        GrantBody {
            owner: "alice".into(),
            access: GrantAccess::Read { ids },
            expires_unix_ms: expires,
        }
    }

    #[test]
    fn a_signed_grant_verifies_and_a_changed_one_does_not() {
        let signer = GrantSigner::generate().unwrap();
        let key = signer.public_key();
        let id = ObjectId::of(b"x");
        let grant = signer.sign(read(vec![id], 1_000));
        let body = verify(&key, &grant, 999).unwrap();
        check_read(body, "alice", &id).unwrap();
        assert_eq!(
            check_read(body, "bob", &id),
            Err(GrantError::WrongOwner {
                granted: "alice".into(),
                wanted: "bob".into()
            })
        );
        assert_eq!(
            check_read(body, "alice", &ObjectId::of(b"y")),
            Err(GrantError::NotCovered(ObjectId::of(b"y")))
        );
        assert_eq!(
            verify(&key, &grant, 1_500),
            Err(GrantError::Expired { ago_ms: 500 })
        );
        let mut forged = grant.clone();
        forged.body.owner = "bob".into();
        assert_eq!(verify(&key, &forged, 0), Err(GrantError::BadSignature));
        let other = GrantSigner::generate().unwrap().public_key();
        assert_eq!(verify(&other, &grant, 0), Err(GrantError::BadSignature));
        assert_eq!(
            verify(&GrantKey::default(), &grant, 0),
            Err(GrantError::NoKey)
        );
    }

    #[test]
    fn write_grants_name_their_node() {
        let signer = GrantSigner::generate().unwrap();
        let grant = signer.sign(GrantBody {
            owner: "alice".into(),
            access: GrantAccess::Write {
                node: "n1".into(),
                scope: ObjectScope::Kept,
                bytes_max: 10,
            },
            expires_unix_ms: u64::MAX,
        });
        let body = verify(&signer.public_key(), &grant, 0).unwrap();
        assert_eq!(check_write(body, "n1"), Ok((ObjectScope::Kept, 10)));
        assert!(matches!(
            check_write(body, "n2"),
            Err(GrantError::WrongNode { .. })
        ));
        assert_eq!(
            check_write(&read(vec![], 0), "n1"),
            Err(GrantError::NotWrite)
        );
    }
}
