//! Which client and node certificates the head still accepts: the revocation list, and the
//! one certificate each joined node may connect with.
//!
//! Pure code over an in-memory book, like [`crate::auth::TokenBook`]; the server stores
//! what changes ([`crate::store::Store::put_cert_record`]) and loads the book at start.
//!
//! * **Revoked certificates** (`flame-head cert revoke SERIAL | --file CERT`): by serial
//!   number, or by the SHA-256 fingerprint of the certificate's DER. Every certificate the
//!   head issues has a random 16-byte serial, so a serial names one certificate.
//! * **Node certificates.** A join records the fingerprint of the certificate it issued
//!   under the node's name: that node connects with that certificate only, so a later join
//!   with `--replace` shuts out the machine that held the name. `flame-head cert revoke
//!   --node NAME` marks the record revoked: no certificate of that node is accepted until a
//!   `--replace` join issues a new one. A node that joined before records existed (no
//!   record) is accepted with any certificate the CA signed for its name.

use flame_protocol::auth::{normalize_serial, CertRecord, CertTarget};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most revocation records and node records the head keeps, each.
pub const CERT_RECORDS_MAX: usize = 100_000;

/// A stored record, keyed as [`record_key`] says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoredCert {
    Revoked {
        serial: Option<String>,
        fingerprint: Option<String>,
        holder: Option<String>,
        revoked_ms: u64,
    },
    Node {
        fingerprint: String,
        issued_ms: u64,
        revoked_ms: Option<u64>,
    },
}

/// The facts of a presented certificate that the checks need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Presented {
    /// SHA-256 of its DER, hex.
    pub fingerprint: String,
    /// Its serial number, normalised.
    pub serial: String,
    /// The node it names, when it names one.
    pub node: Option<String>,
}

impl Presented {
    /// Reads the facts out of a certificate TLS verified.
    pub fn of(der: &[u8]) -> Result<Presented, flame_protocol::pki::PkiError> {
        use flame_protocol::pki;
        let node = match pki::identity_of(der)? {
            pki::PeerIdentity::Node(name) => Some(name),
            pki::PeerIdentity::User { .. } => None,
        };
        Ok(Presented {
            fingerprint: flame_protocol::auth::hex(&pki::fingerprint(der)),
            serial: pki::serial_of(der)?,
            node,
        })
    }
}

/// Why a certificate is refused, or a revocation could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error(
        "the certificate with serial {serial} has been revoked; ask an admin for a new one \
         (`flame-head user-cert`)"
    )]
    Revoked { serial: String },
    #[error(
        "the certificates of node `{name}` have been revoked; the node may join again only \
         with a token made by `flame-head token create --node --replace {name}`"
    )]
    NodeRevoked { name: String },
    #[error(
        "this certificate of node `{name}` was replaced by a later join of that name; the \
         node must use its new certificate, or join again with a `--replace {name}` token"
    )]
    Superseded { name: String },
    #[error("`{0}` is not a serial number: give hex digits, at most 20 bytes")]
    BadSerial(String),
    #[error("invalid node name: {0}")]
    BadNode(String),
    #[error("no node `{0}` has joined this head (`flame-head cert list` shows the nodes)")]
    UnknownNode(String),
    #[error("the head holds {CERT_RECORDS_MAX} certificate records already")]
    Full,
}

/// The store key of a record: `serial:<hex>`, `sha256:<hex>` or `node:<name>`.
pub fn record_key(record: &StoredCert, node: Option<&str>) -> String {
    match (record, node) {
        (_, Some(name)) => format!("node:{name}"),
        (
            StoredCert::Revoked {
                fingerprint: Some(f),
                ..
            },
            None,
        ) => format!("sha256:{f}"),
        (StoredCert::Revoked { serial, .. }, None) => {
            format!("serial:{}", serial.as_deref().unwrap_or_default())
        }
        (StoredCert::Node { fingerprint, .. }, None) => format!("sha256:{fingerprint}"),
    }
}

/// Revocations and node records.
#[derive(Debug, Default)]
pub struct CertBook {
    /// Revoked serials → the key of their record.
    serials: BTreeMap<String, String>,
    /// Revoked fingerprints → the key of their record.
    fingerprints: BTreeMap<String, String>,
    /// Every `serial:` and `sha256:` record, by key.
    revoked: BTreeMap<String, StoredCert>,
    /// Node records by node name.
    nodes: BTreeMap<String, StoredCert>,
}

impl CertBook {
    /// A book over the stored records (`(key, record)`).
    pub fn new(records: impl IntoIterator<Item = (String, StoredCert)>) -> CertBook {
        let mut book = CertBook::default();
        for (key, record) in records {
            book.insert(key, record);
        }
        book
    }

    fn insert(&mut self, key: String, record: StoredCert) {
        if let Some(name) = key.strip_prefix("node:") {
            self.nodes.insert(name.to_string(), record);
            return;
        }
        if let StoredCert::Revoked {
            serial,
            fingerprint,
            ..
        } = &record
        {
            if let Some(s) = serial {
                self.serials.insert(s.clone(), key.clone());
            }
            if let Some(f) = fingerprint {
                self.fingerprints.insert(f.clone(), key.clone());
            }
        }
        self.revoked.insert(key, record);
    }

    /// Whether a certificate may be used now.
    pub fn check(&self, cert: &Presented) -> Result<(), CertError> {
        if self.serials.contains_key(&cert.serial)
            || self.fingerprints.contains_key(&cert.fingerprint)
        {
            return Err(CertError::Revoked {
                serial: cert.serial.clone(),
            });
        }
        let Some(name) = &cert.node else {
            return Ok(());
        };
        match self.nodes.get(name) {
            Some(StoredCert::Node {
                revoked_ms: Some(_),
                ..
            }) => Err(CertError::NodeRevoked { name: name.clone() }),
            Some(StoredCert::Node { fingerprint, .. }) if *fingerprint != cert.fingerprint => {
                Err(CertError::Superseded { name: name.clone() })
            }
            _ => Ok(()),
        }
    }

    /// Whether a node of this name has joined (or been revoked) here.
    pub fn has_node(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// Records a revocation; returns the `(key, record)` to store. Revoking what is revoked
    /// already changes nothing and is no error. `known_node`: the head knows a node of the
    /// target's name otherwise (it registered before node records existed).
    pub fn revoke(
        &mut self,
        target: CertTarget,
        known_node: bool,
        now_ms: u64,
    ) -> Result<(String, StoredCert), CertError> {
        let record = match target {
            CertTarget::Node(name) => {
                flame_protocol::model::validate_node_name(&name)
                    .map_err(|e| CertError::BadNode(e.to_string()))?;
                let record = match self.nodes.get(&name) {
                    Some(StoredCert::Node {
                        fingerprint,
                        issued_ms,
                        revoked_ms,
                    }) => StoredCert::Node {
                        fingerprint: fingerprint.clone(),
                        issued_ms: *issued_ms,
                        revoked_ms: Some(revoked_ms.unwrap_or(now_ms)),
                    },
                    _ if known_node => StoredCert::Node {
                        fingerprint: String::new(),
                        issued_ms: 0,
                        revoked_ms: Some(now_ms),
                    },
                    _ => return Err(CertError::UnknownNode(name)),
                };
                let key = record_key(&record, Some(&name));
                self.nodes.insert(name, record.clone());
                return Ok((key, record));
            }
            CertTarget::Serial(serial) => StoredCert::Revoked {
                serial: Some(normalize_serial(&serial).ok_or(CertError::BadSerial(serial))?),
                fingerprint: None,
                holder: None,
                revoked_ms: now_ms,
            },
            CertTarget::Certificate {
                fingerprint,
                serial,
                holder,
            } => StoredCert::Revoked {
                serial: Some(normalize_serial(&serial).ok_or(CertError::BadSerial(serial))?),
                fingerprint: Some(fingerprint.to_ascii_lowercase()),
                holder: Some(holder),
                revoked_ms: now_ms,
            },
        };
        let key = record_key(&record, None);
        if let Some(existing) = self.revoked.get(&key) {
            return Ok((key, existing.clone()));
        }
        if self.revoked.len() >= CERT_RECORDS_MAX {
            return Err(CertError::Full);
        }
        self.insert(key.clone(), record.clone());
        Ok((key, record))
    }

    /// Records the certificate a join issued to node `name`, which from now on is the
    /// only one that node may connect with; returns the `(key, record)` to store.
    pub fn issue_node(
        &mut self,
        name: &str,
        fingerprint: String,
        now_ms: u64,
    ) -> Result<(String, StoredCert), CertError> {
        if !self.nodes.contains_key(name) && self.nodes.len() >= CERT_RECORDS_MAX {
            return Err(CertError::Full);
        }
        let record = StoredCert::Node {
            fingerprint,
            issued_ms: now_ms,
            revoked_ms: None,
        };
        self.nodes.insert(name.to_string(), record.clone());
        Ok((record_key(&record, Some(name)), record))
    }

    /// Puts back what [`Self::issue_node`] replaced, when storing the new record failed.
    pub fn restore_node(&mut self, name: &str, previous: Option<StoredCert>) {
        match previous {
            Some(record) => self.nodes.insert(name.to_string(), record),
            None => self.nodes.remove(name),
        };
    }

    /// The node record of `name`, if any.
    pub fn node(&self, name: &str) -> Option<StoredCert> {
        self.nodes.get(name).cloned()
    }

    /// Every record, for `flame-head cert list`: revocations, then nodes.
    pub fn list(&self) -> Vec<CertRecord> {
        let revoked = self.revoked.values().filter_map(|r| match r {
            StoredCert::Revoked {
                serial,
                fingerprint,
                holder,
                revoked_ms,
            } => Some(CertRecord::Revoked {
                serial: serial.clone(),
                fingerprint: fingerprint.clone(),
                holder: holder.clone(),
                revoked_ms: *revoked_ms,
            }),
            StoredCert::Node { .. } => None,
        });
        let nodes = self.nodes.iter().filter_map(|(name, r)| match r {
            StoredCert::Node {
                fingerprint,
                issued_ms,
                revoked_ms,
            } => Some(CertRecord::Node {
                name: name.clone(),
                fingerprint: fingerprint.clone(),
                issued_ms: *issued_ms,
                revoked_ms: *revoked_ms,
            }),
            StoredCert::Revoked { .. } => None,
        });
        revoked.chain(nodes).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user_cert(serial: &str, fingerprint: &str) -> Presented {
        Presented {
            fingerprint: fingerprint.into(),
            serial: serial.into(),
            node: None,
        }
    }

    fn node_cert(name: &str, fingerprint: &str) -> Presented {
        Presented {
            fingerprint: fingerprint.into(),
            serial: "1".into(),
            node: Some(name.into()),
        }
    }

    #[test]
    fn revoked_serials_and_fingerprints_are_refused_after_a_reload() {
        let mut book = CertBook::default();
        assert!(book.check(&user_cert("abc", "f1")).is_ok());
        let (k1, r1) = book
            .revoke(CertTarget::Serial("00:0A:BC".into()), false, 5)
            .unwrap();
        assert_eq!(k1, "serial:abc");
        let (k2, r2) = book
            .revoke(
                CertTarget::Certificate {
                    fingerprint: "F2".into(),
                    serial: "def".into(),
                    holder: "admin ops".into(),
                },
                false,
                6,
            )
            .unwrap();
        let reloaded = CertBook::new([(k1, r1), (k2, r2)]);
        for book in [&book, &reloaded] {
            let err = book.check(&user_cert("abc", "f1")).unwrap_err();
            assert!(
                err.to_string().contains("serial abc has been revoked"),
                "{err}"
            );
            assert!(book.check(&user_cert("999", "f2")).is_err());
            assert!(book.check(&user_cert("999", "f3")).is_ok());
            assert_eq!(book.list().len(), 2);
        }
        assert_eq!(
            book.revoke(CertTarget::Serial("xyz".into()), false, 7)
                .unwrap_err(),
            CertError::BadSerial("xyz".into())
        );
    }

    #[test]
    fn a_node_connects_with_its_latest_certificate_only_until_revoked() {
        let mut book = CertBook::default();
        // A node that joined before records existed keeps working.
        assert!(book.check(&node_cert("n1", "old")).is_ok());
        assert!(!book.has_node("n1"));
        book.issue_node("n1", "a".into(), 1).unwrap();
        assert!(book.has_node("n1"));
        assert!(book.check(&node_cert("n1", "a")).is_ok());
        book.issue_node("n1", "b".into(), 2).unwrap();
        let err = book.check(&node_cert("n1", "a")).unwrap_err();
        assert_eq!(err, CertError::Superseded { name: "n1".into() });
        assert!(book.check(&node_cert("n1", "b")).is_ok());

        let (key, record) = book
            .revoke(CertTarget::Node("n1".into()), false, 3)
            .unwrap();
        assert_eq!(key, "node:n1");
        let reloaded = CertBook::new([(key, record)]);
        for book in [&book, &reloaded] {
            let err = book.check(&node_cert("n1", "b")).unwrap_err();
            assert!(err.to_string().contains("--replace n1"), "{err}");
            assert!(book.check(&node_cert("n2", "b")).is_ok());
        }
        // A replacing join gives the name a certificate again.
        book.issue_node("n1", "c".into(), 4).unwrap();
        assert!(book.check(&node_cert("n1", "c")).is_ok());
        assert_eq!(
            book.revoke(CertTarget::Node("n9".into()), false, 5)
                .unwrap_err(),
            CertError::UnknownNode("n9".into())
        );
        // A node known only from its registration is revoked with any certificate.
        book.revoke(CertTarget::Node("n9".into()), true, 5).unwrap();
        assert!(book.check(&node_cert("n9", "any")).is_err());
        let previous = book.node("n1");
        book.issue_node("n1", "d".into(), 6).unwrap();
        book.restore_node("n1", previous);
        assert!(book.check(&node_cert("n1", "c")).is_ok());
    }
}
