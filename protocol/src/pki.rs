//! The cluster's public-key infrastructure, as every party sees it.
//!
//! A Flame cluster has one CA (`flame-head` keeps it in `<data-dir>/tls/`). It signs the
//! head's server certificate, each node's client certificate (from a signing request the
//! node makes at `flame-node join`, so a node's key never leaves it) and users' client
//! certificates. A certificate names its holder by exactly one subject alternative name URI:
//!
//! | holder      | URI                         |
//! |-------------|-----------------------------|
//! | node        | `urn:flame:node:<name>`     |
//! | user        | `urn:flame:user:<name>`     |
//! | admin user  | `urn:flame:admin:<name>`    |
//!
//! The subject's common name repeats the name for people reading the certificate; only the
//! URI counts. This module makes node signing requests and reads identities; issuing is
//! the head's (`flame-head/src/tls.rs`), and the TLS setup is in [`crate::endpoint`].
//!
//! Built with the crate's `net` feature only (rcgen, ring and x509-parser; see the crate
//! doc).

use crate::auth::{hex, Secret, FINGERPRINT_BYTES};

/// Prefix of every identity URI.
pub const URI_PREFIX: &str = "urn:flame:";
/// Prefix of a node's identity URI; the node's name follows.
pub const NODE_URI_PREFIX: &str = "urn:flame:node:";
/// Prefix of a (non-admin) user's identity URI; the user's name follows.
pub const USER_URI_PREFIX: &str = "urn:flame:user:";
/// Prefix of an admin user's identity URI; the user's name follows.
pub const ADMIN_URI_PREFIX: &str = "urn:flame:admin:";

/// Hex digits of a fingerprint shown in messages: enough to tell CAs apart by eye.
pub const FINGERPRINT_SHORT_HEX: usize = 16;

/// What went wrong making or reading a certificate or signing request.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// The DER is not an X.509 certificate.
    #[error("cannot parse the certificate: {reason}; hint: the file is damaged or not a certificate, get a new one from the head")]
    Parse { reason: String },
    /// The certificate holds no `urn:flame:` URI.
    #[error(
        "the certificate names no Flame identity (no `{URI_PREFIX}...` subject alternative name); \
         hint: it was not issued by a Flame head: use the certificate `flame-node join` wrote, or one the head issued"
    )]
    NoIdentity,
    /// The certificate holds more than one `urn:flame:` URI.
    #[error(
        "the certificate names {count} Flame identities, not one; hint: it was not issued by a Flame head, \
         get a new one from the head"
    )]
    SeveralIdentities { count: usize },
    /// A `urn:flame:` URI that names no known kind of holder, or an invalid name.
    #[error("the certificate's identity `{uri}` is not valid: {reason}")]
    BadIdentity { uri: String, reason: String },
    /// A name that cannot be put in a certificate.
    #[error("`{name}` cannot name a {kind} in a certificate: {reason}")]
    Name {
        kind: &'static str,
        name: String,
        reason: String,
    },
    /// Key generation or encoding failed.
    #[error("cannot create the {what}: {cause}")]
    Generate {
        what: &'static str,
        cause: rcgen::Error,
    },
}

/// Who holds a certificate, read from its identity URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerIdentity {
    /// A node, by its name.
    Node(String),
    /// A user; `admin` users may act on everyone's sessions and manage the cluster.
    User { name: String, admin: bool },
}

impl PeerIdentity {
    /// The identity URI that names this holder in a certificate.
    pub fn uri(&self) -> Result<String, PkiError> {
        match self {
            PeerIdentity::Node(name) => node_uri(name),
            PeerIdentity::User { name, admin } => user_uri(name, *admin),
        }
    }

    /// The holder's name, node or user.
    pub fn name(&self) -> &str {
        match self {
            PeerIdentity::Node(name) | PeerIdentity::User { name, .. } => name,
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Node(name) => write!(f, "node {name}"),
            PeerIdentity::User { name, admin: false } => write!(f, "user {name}"),
            PeerIdentity::User { name, admin: true } => write!(f, "admin {name}"),
        }
    }
}

/// SHA-256 of a certificate's DER: what a token pins the cluster CA by.
pub fn fingerprint(cert_der: &[u8]) -> [u8; FINGERPRINT_BYTES] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert_der);
    let mut out = [0u8; FINGERPRINT_BYTES];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The first [`FINGERPRINT_SHORT_HEX`] hex digits of a fingerprint, for messages.
pub fn short_fingerprint(fingerprint: &[u8; FINGERPRINT_BYTES]) -> String {
    let mut text = hex(fingerprint);
    text.truncate(FINGERPRINT_SHORT_HEX);
    text
}

/// `urn:flame:node:<name>`; the name must be a valid node name.
pub fn node_uri(name: &str) -> Result<String, PkiError> {
    crate::model::validate_node_name(name).map_err(|e| PkiError::Name {
        kind: "node",
        name: name.to_string(),
        reason: e.to_string(),
    })?;
    Ok(format!("{NODE_URI_PREFIX}{name}"))
}

/// `urn:flame:user:<name>`, or `urn:flame:admin:<name>` for an admin; the name must be a
/// valid user name.
pub fn user_uri(name: &str, admin: bool) -> Result<String, PkiError> {
    crate::auth::validate_user_name(name).map_err(|reason| PkiError::Name {
        kind: "user",
        name: name.to_string(),
        reason,
    })?;
    let prefix = if admin {
        ADMIN_URI_PREFIX
    } else {
        USER_URI_PREFIX
    };
    Ok(format!("{prefix}{name}"))
}

/// Reads an identity URI; `None` when it is not a `urn:flame:` URI at all.
fn parse_uri(uri: &str) -> Option<Result<PeerIdentity, PkiError>> {
    let rest = uri.strip_prefix(URI_PREFIX)?;
    let bad = |reason: String| PkiError::BadIdentity {
        uri: uri.to_string(),
        reason,
    };
    let parsed = if let Some(name) = uri.strip_prefix(NODE_URI_PREFIX) {
        crate::model::validate_node_name(name)
            .map(|()| PeerIdentity::Node(name.to_string()))
            .map_err(|e| bad(e.to_string()))
    } else if let Some((name, admin)) = uri
        .strip_prefix(USER_URI_PREFIX)
        .map(|n| (n, false))
        .or_else(|| uri.strip_prefix(ADMIN_URI_PREFIX).map(|n| (n, true)))
    {
        crate::auth::validate_user_name(name)
            .map(|()| PeerIdentity::User {
                name: name.to_string(),
                admin,
            })
            .map_err(bad)
    } else {
        let kind = rest.split(':').next().unwrap_or(rest);
        Err(bad(format!(
            "`{kind}` is not a kind of holder; expected node, user or admin"
        )))
    };
    Some(parsed)
}

/// Who a certificate names: its one `urn:flame:` subject alternative name URI.
///
/// This reads the certificate only; it does not verify it. Call it on a certificate TLS
/// already verified against the cluster CA ([`crate::endpoint::peer_certificate`]).
pub fn identity_of(cert_der: &[u8]) -> Result<PeerIdentity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Parse {
        reason: e.to_string(),
    })?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::Parse {
            reason: format!("its subject alternative names: {e}"),
        })?;
    let Some(san) = san else {
        return Err(PkiError::NoIdentity);
    };
    let mut found: Vec<Result<PeerIdentity, PkiError>> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => parse_uri(uri),
            _ => None,
        })
        .collect();
    match found.len() {
        0 => Err(PkiError::NoIdentity),
        1 => found.remove(0),
        count => Err(PkiError::SeveralIdentities { count }),
    }
}

/// A certificate's serial number, as [`crate::auth::normalize_serial`] writes it.
pub fn serial_of(cert_der: &[u8]) -> Result<String, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Parse {
        reason: e.to_string(),
    })?;
    crate::auth::normalize_serial(&hex(cert.raw_serial())).ok_or_else(|| PkiError::Parse {
        reason: "its serial number is longer than 20 bytes".to_string(),
    })
}

/// A certificate's validity period, as Unix seconds: `(not_before, not_after)`.
pub fn validity_unix(cert_der: &[u8]) -> Result<(i64, i64), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Parse {
        reason: e.to_string(),
    })?;
    let validity = cert.validity();
    Ok((
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

/// The signature algorithm of every key Flame makes.
pub static KEY_ALGORITHM: &rcgen::SignatureAlgorithm = &rcgen::PKCS_ECDSA_P256_SHA256;

/// A fresh key pair and a PEM certificate signing request for the node `name`: subject
/// common name `name`, one subject alternative name URI `urn:flame:node:<name>`. Returns
/// `(csr_pem, key_pem)`; the key stays on the node.
pub fn node_csr(name: &str) -> Result<(String, Secret), PkiError> {
    let uri = node_uri(name)?;
    let generate = |what: &'static str| move |cause| PkiError::Generate { what, cause };
    let key = rcgen::KeyPair::generate_for(KEY_ALGORITHM).map_err(generate("node key"))?;
    let mut params = rcgen::CertificateParams::default();
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, name);
    params.distinguished_name = subject;
    let uri = rcgen::string::Ia5String::try_from(uri).map_err(generate("node identity URI"))?;
    params.subject_alt_names = vec![rcgen::SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(generate("certificate signing request"))?;
    Ok((csr, Secret::new(key.serialize_pem())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate with the given SAN URIs.
    fn cert_with_uris(uris: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI(rcgen::string::Ia5String::try_from(*u).unwrap()))
            .collect();
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName("x.example".try_into().unwrap()));
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn identities_are_read_from_the_one_flame_uri() {
        let node = cert_with_uris(&["urn:flame:node:gpu-07", "https://example.org/x"]);
        assert_eq!(
            identity_of(&node).unwrap(),
            PeerIdentity::Node("gpu-07".into())
        );
        let user = cert_with_uris(&["urn:flame:user:alice@lab"]);
        assert_eq!(
            identity_of(&user).unwrap(),
            PeerIdentity::User {
                name: "alice@lab".into(),
                admin: false
            }
        );
        let admin = cert_with_uris(&["urn:flame:admin:root"]);
        assert_eq!(
            identity_of(&admin).unwrap(),
            PeerIdentity::User {
                name: "root".into(),
                admin: true
            }
        );
    }

    #[test]
    fn certificates_without_exactly_one_valid_identity_are_refused() {
        let none = cert_with_uris(&[]);
        assert!(matches!(identity_of(&none), Err(PkiError::NoIdentity)));
        let two = cert_with_uris(&["urn:flame:node:a", "urn:flame:user:b"]);
        assert!(matches!(
            identity_of(&two),
            Err(PkiError::SeveralIdentities { count: 2 })
        ));
        let unknown = cert_with_uris(&["urn:flame:robot:r2"]);
        let err = identity_of(&unknown).unwrap_err();
        assert!(err.to_string().contains("robot"), "{err}");
        let bad_name = cert_with_uris(&["urn:flame:node:UPPER"]);
        assert!(matches!(
            identity_of(&bad_name),
            Err(PkiError::BadIdentity { .. })
        ));
        assert!(matches!(
            identity_of(b"not a certificate"),
            Err(PkiError::Parse { .. })
        ));
    }

    #[test]
    fn uris_round_trip_and_refuse_bad_names() {
        for id in [
            PeerIdentity::Node("n1".into()),
            PeerIdentity::User {
                name: "bob".into(),
                admin: false,
            },
            PeerIdentity::User {
                name: "eve".into(),
                admin: true,
            },
        ] {
            let uri = id.uri().unwrap();
            assert_eq!(parse_uri(&uri).unwrap().unwrap(), id);
        }
        assert!(node_uri("").is_err());
        assert!(node_uri("a:b").is_err());
        assert!(user_uri("has space", false).is_err());
        assert!(parse_uri("https://example.org").is_none());
    }

    #[test]
    fn a_node_csr_carries_the_name_and_verifies() {
        let (csr_pem, key_pem) = node_csr("node-3").unwrap();
        assert!(key_pem.expose().contains("PRIVATE KEY"));
        assert!(!format!("{key_pem:?}").contains("PRIVATE KEY"));
        // Parsing checks the request's self-signature.
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr_pem).unwrap();
        assert_eq!(
            parsed.params.subject_alt_names,
            vec![rcgen::SanType::URI(
                rcgen::string::Ia5String::try_from("urn:flame:node:node-3").unwrap()
            )]
        );
        let cn = parsed
            .params
            .distinguished_name
            .get(&rcgen::DnType::CommonName);
        assert!(
            matches!(cn, Some(rcgen::DnValue::Utf8String(s)) if s == "node-3"),
            "{cn:?}"
        );
        assert!(node_csr("Bad Name").is_err());
    }

    #[test]
    fn validity_is_read_in_unix_seconds() {
        let key = rcgen::KeyPair::generate_for(KEY_ALGORITHM).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2030, 1, 1);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        assert_eq!(validity_unix(&der).unwrap(), (1_577_836_800, 1_893_456_000));
        assert!(validity_unix(b"junk").is_err());
    }

    #[test]
    fn fingerprints_are_sha256_of_the_der() {
        let fp = fingerprint(b"abc");
        assert_eq!(
            hex(&fp),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(short_fingerprint(&fp), "ba7816bf8f01cfea");
    }
}
