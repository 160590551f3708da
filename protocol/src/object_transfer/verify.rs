//! How a reader trusts a node's object endpoint: the certificate must chain to the cluster
//! CA and name the node dialled ([`NodeCertVerifier`]).

use super::TransferError;
use crate::auth::FINGERPRINT_BYTES;
use crate::endpoint::{load_certs, provider, Trust};
use crate::pki::PeerIdentity;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::sync::Arc;

/// What a node's certificate must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterCa {
    /// The cluster CA certificate(s), from the CA file.
    Certs(Vec<CertificateDer<'static>>),
    /// The CA with this SHA-256 fingerprint (from a token), taken from the chain the node
    /// presents.
    Pinned([u8; FINGERPRINT_BYTES]),
}

impl ClusterCa {
    /// The CA `trust` names (reads the CA file).
    pub fn from_trust(trust: &Trust) -> Result<ClusterCa, TransferError> {
        match trust {
            Trust::CaFile(path) => Ok(ClusterCa::Certs(load_certs(path)?)),
            Trust::Pinned(fingerprint) => Ok(ClusterCa::Pinned(*fingerprint)),
        }
    }
}

/// Verifies a node's object endpoint: its chain leads to the cluster CA (validity,
/// signatures, key usage; node certificates are issued for client authentication, and
/// are checked as such), and its identity URI names the node dialled.
#[derive(Debug)]
pub struct NodeCertVerifier {
    ca: ClusterCa,
    node: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

/// The verifier for the certificate of node `node`'s object endpoint.
pub fn node_server_verifier(
    ca: &ClusterCa,
    node: &str,
) -> Result<Arc<NodeCertVerifier>, TransferError> {
    crate::pki::node_uri(node).map_err(|e| TransferError::Setup(e.to_string()))?;
    Ok(Arc::new(NodeCertVerifier {
        ca: ca.clone(),
        node: node.to_string(),
        provider: provider(),
    }))
}

/// A certificate that is valid but names someone else.
struct WrongPeer {
    expected: String,
    found: String,
}

/// The same as `Display`: rustls shows [`rustls::OtherError`] by its `Debug`.
impl std::fmt::Debug for WrongPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for WrongPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the certificate names {}, not node {}: the address the head gave for the node is another's",
            self.found, self.expected
        )
    }
}

impl std::error::Error for WrongPeer {}

fn other_error(e: impl std::error::Error + Send + Sync + 'static) -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(e),
    )))
}

impl rustls::client::danger::ServerCertVerifier for NodeCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let mut roots = rustls::RootCertStore::empty();
        let rest: Vec<CertificateDer<'_>> = match &self.ca {
            ClusterCa::Certs(certs) => {
                for cert in certs {
                    roots.add(cert.clone())?;
                }
                intermediates.to_vec()
            }
            ClusterCa::Pinned(fingerprint) => {
                let pinned = intermediates
                    .iter()
                    .find(|cert| crate::pki::fingerprint(cert) == *fingerprint)
                    .ok_or_else(|| {
                        rustls::Error::General(format!(
                            "node {}'s certificate chain does not hold the cluster CA (fingerprint {}...)",
                            self.node,
                            crate::pki::short_fingerprint(fingerprint)
                        ))
                    })?;
                roots.add(pinned.clone().into_owned())?;
                intermediates
                    .iter()
                    .filter(|cert| *cert != pinned)
                    .cloned()
                    .collect()
            }
        };
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(format!("cannot trust the cluster CA: {e}")))?;
        chain.verify_client_cert(end_entity, &rest, now)?;
        match crate::pki::identity_of(end_entity) {
            Ok(PeerIdentity::Node(name)) if name == self.node => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Ok(other) => Err(other_error(WrongPeer {
                expected: self.node.clone(),
                found: other.to_string(),
            })),
            Err(e) => Err(other_error(e)),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
