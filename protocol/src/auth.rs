//! Who may do what: tokens, principals, and the node join exchange.
//!
//! ## Tokens
//! `flame-head token create` makes a token and prints it once; the head keeps only the
//! SHA-256 of its secret. Its text form is
//!
//! ```text
//! flame1.<id: 16 hex>.<secret: 64 hex>.<CA fingerprint: 64 hex>
//! ```
//!
//! The id names the token in `token list` and `token revoke`, and is not secret. The CA
//! fingerprint (SHA-256 of the cluster CA certificate's DER) lets a holder verify the head
//! before it has the CA file: `flame-node join` pins it, so a join token is all a new node
//! needs. Neither the secret nor the whole token is ever printed again, logged, or put in an
//! error message: [`Secret`] is the type that carries it, and its `Debug` hides the value.

use serde::{Deserialize, Serialize};

/// Text that must never be shown: a token, a private key. `Debug` and `Display` print
/// `<redacted>`; read the value with [`Secret::expose`].
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that needs it (hashing, sending, printing once).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Prefix of every token's text form; the number is the format's version.
pub const TOKEN_PREFIX: &str = "flame1";
/// Bytes of a token id.
pub const TOKEN_ID_BYTES: usize = 8;
/// Bytes of a token secret.
pub const TOKEN_SECRET_BYTES: usize = 32;
/// Bytes of a CA fingerprint (SHA-256).
pub const FINGERPRINT_BYTES: usize = 32;
/// Longest text accepted as a token, well above the real length, so that a hostile hello
/// cannot make the head hash megabytes.
pub const TOKEN_TEXT_BYTES_MAX: usize = 256;

/// A token's parts.
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedToken {
    /// `TOKEN_ID_BYTES` bytes as lowercase hex.
    pub id: String,
    pub secret: [u8; TOKEN_SECRET_BYTES],
    pub ca_fingerprint: [u8; FINGERPRINT_BYTES],
}

impl std::fmt::Debug for ParsedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("ca_fingerprint", &hex(&self.ca_fingerprint))
            .finish()
    }
}

/// Why a text is not a token. Never quotes the text: it may be a real token mistyped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("the token is longer than {TOKEN_TEXT_BYTES_MAX} bytes")]
    TooLong,
    #[error("the token does not start with `{TOKEN_PREFIX}.`; tokens come from `flame-head token create`")]
    Prefix,
    #[error("the token has {0} parts separated by `.`, not 4")]
    Parts(usize),
    #[error("the token's {part} is not {bytes} bytes of hex")]
    Hex { part: &'static str, bytes: usize },
}

impl ParsedToken {
    /// Parses the text form; surrounding white space (a trailing newline from a file) is
    /// ignored.
    pub fn parse(text: &str) -> Result<ParsedToken, TokenFormatError> {
        let text = text.trim();
        if text.len() > TOKEN_TEXT_BYTES_MAX {
            return Err(TokenFormatError::TooLong);
        }
        let parts: Vec<&str> = text.split('.').collect();
        if parts.first() != Some(&TOKEN_PREFIX) {
            return Err(TokenFormatError::Prefix);
        }
        if parts.len() != 4 {
            return Err(TokenFormatError::Parts(parts.len()));
        }
        let id = unhex::<TOKEN_ID_BYTES>(parts[1]).ok_or(TokenFormatError::Hex {
            part: "id",
            bytes: TOKEN_ID_BYTES,
        })?;
        let secret = unhex::<TOKEN_SECRET_BYTES>(parts[2]).ok_or(TokenFormatError::Hex {
            part: "secret",
            bytes: TOKEN_SECRET_BYTES,
        })?;
        let ca_fingerprint = unhex::<FINGERPRINT_BYTES>(parts[3]).ok_or(TokenFormatError::Hex {
            part: "CA fingerprint",
            bytes: FINGERPRINT_BYTES,
        })?;
        Ok(ParsedToken {
            id: hex(&id),
            secret,
            ca_fingerprint,
        })
    }

    /// The text form.
    pub fn to_secret(&self) -> Secret {
        Secret(format!(
            "{TOKEN_PREFIX}.{}.{}.{}",
            self.id,
            hex(&self.secret),
            hex(&self.ca_fingerprint)
        ))
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `N` bytes from exactly `2 * N` hex digits (either case).
pub fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// What a token lets its holder be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// Joins nodes: good only for [`crate::messages::Role::Join`], which gets a node a
    /// certificate. Nodes then connect with that certificate.
    Node,
    /// A user: a client that owns its sessions; an admin may also act on everyone's,
    /// register applications, drain nodes and manage tokens.
    User { name: String, admin: bool },
}

/// A token as `token list` shows it: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub kind: TokenKind,
    pub created_ms: u64,
    /// `None`: never expires.
    pub expires_ms: Option<u64>,
    pub revoked: bool,
    /// How many times it may be used (node join tokens: each join is one use); `None`:
    /// without limit.
    pub uses_max: Option<u32>,
    /// How many times it has been used.
    pub uses: u32,
    /// A node join token made with `--replace NAME`: a join with it may take the name
    /// `NAME` of an existing node, whose certificates stop working.
    pub replace: Option<String>,
}

/// What `flame-head cert revoke` withdraws.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertTarget {
    /// Every certificate with this serial number (hex, as `openssl x509 -serial` prints
    /// it; colons, case and leading zeros do not matter).
    Serial(String),
    /// One certificate, by the SHA-256 fingerprint of its DER (hex); its serial and holder
    /// are recorded with it.
    Certificate {
        fingerprint: String,
        serial: String,
        holder: String,
    },
    /// Every certificate of the node `NAME`, until a join made with
    /// `flame-head token create --node --replace NAME` gives it a new one.
    Node(String),
}

/// One entry of `flame-head cert list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertRecord {
    /// A withdrawn user, admin or node certificate, by serial number and/or fingerprint.
    Revoked {
        serial: Option<String>,
        fingerprint: Option<String>,
        holder: Option<String>,
        revoked_ms: u64,
    },
    /// The certificate the head last issued to a node at join: the only one that node
    /// may connect with. `revoked_ms` is set when an admin revoked the node.
    Node {
        name: String,
        fingerprint: String,
        issued_ms: u64,
        revoked_ms: Option<u64>,
    },
}

/// Normalises a certificate serial number written in hex: lower case, without colons,
/// spaces or leading zeros. `None` when it is not hex or is longer than 20 bytes allow.
pub fn normalize_serial(text: &str) -> Option<String> {
    let digits: String = text
        .trim()
        .trim_start_matches("0x")
        .chars()
        .filter(|c| *c != ':' && *c != ' ')
        .collect();
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = digits.trim_start_matches('0').to_ascii_lowercase();
    match trimmed.len() {
        0 => Some("0".into()),
        1..=40 => Some(trimmed),
        _ => None,
    }
}

/// Who a client connection acts for, as the head established it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Principal {
    pub name: String,
    pub admin: bool,
}

/// Longest user name.
pub const USER_NAME_BYTES_MAX: usize = 64;

/// Checks a user (owner) name: 1 to [`USER_NAME_BYTES_MAX`] bytes of `[A-Za-z0-9._@-]`,
/// starting with a letter or digit. The error is the reason.
pub fn validate_user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > USER_NAME_BYTES_MAX {
        return Err(format!(
            "a user name must be 1 to {USER_NAME_BYTES_MAX} bytes"
        ));
    }
    let ok = name
        .chars()
        .enumerate()
        .all(|(i, c)| c.is_ascii_alphanumeric() || (i > 0 && matches!(c, '.' | '_' | '-' | '@')));
    if !ok {
        return Err(format!(
            "`{name}` must be letters, digits and `._@-`, starting with a letter or digit"
        ));
    }
    Ok(())
}

/// A joining node's request, sent on the hello stream after the head's welcome to a
/// [`crate::messages::Role::Join`] hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The node's name; its certificate will carry it.
    pub name: String,
    /// A PKCS#10 certificate signing request (PEM) for the node's own key, which never
    /// leaves the node.
    pub csr_pem: String,
}

/// The head's answer to a [`JoinRequest`]; the connection closes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JoinReply {
    Signed {
        /// The node's certificate (PEM), signed by the cluster CA.
        cert_pem: String,
        /// The cluster CA certificate (PEM), which the node trusts from then on.
        ca_pem: String,
    },
    Refused {
        reason: String,
    },
}

/// Longest CSR accepted in a [`JoinRequest`].
pub const CSR_PEM_BYTES_MAX: usize = 16 * 1024;

/// Validity of a node certificate signed at join (one year); a node joins again to renew.
pub const NODE_CERT_VALIDITY_DAYS: u32 = 365;

/// Most uses a node join token may be given (`--uses`).
pub const TOKEN_USES_MAX: u32 = 100_000;

/// Longest lifetime a token may be given (ten years); `None` means no expiry.
pub const TOKEN_TTL_MS_MAX: u64 = 10 * 365 * 24 * 3600 * 1000;

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParsedToken {
        ParsedToken {
            id: hex(&[1, 2, 3, 4, 5, 6, 7, 8]),
            secret: [0xab; TOKEN_SECRET_BYTES],
            ca_fingerprint: [0x5c; FINGERPRINT_BYTES],
        }
    }

    #[test]
    fn a_token_round_trips_through_its_text() {
        let token = sample();
        let text = token.to_secret();
        assert!(text.expose().starts_with("flame1.0102030405060708."));
        assert_eq!(ParsedToken::parse(text.expose()).unwrap(), token);
        // A trailing newline, as read from a file, is fine.
        let padded = format!("{}\n", text.expose());
        assert_eq!(ParsedToken::parse(&padded).unwrap(), token);
    }

    #[test]
    fn malformed_tokens_are_refused_without_quoting_them() {
        let good = sample().to_secret().expose().to_string();
        let cases = [
            ("nope".to_string(), TokenFormatError::Prefix),
            (
                good.replacen("flame1", "flame2", 1),
                TokenFormatError::Prefix,
            ),
            (format!("{good}.x"), TokenFormatError::Parts(5)),
            (
                good.replacen(".0102030405060708.", ".01020304050607zz.", 1),
                TokenFormatError::Hex {
                    part: "id",
                    bytes: TOKEN_ID_BYTES,
                },
            ),
            ("x".repeat(1000), TokenFormatError::TooLong),
        ];
        for (text, expected) in cases {
            let err = ParsedToken::parse(&text).unwrap_err();
            assert_eq!(err, expected, "{text}");
            assert!(!err.to_string().contains(&hex(&[0xab; 4])), "{err}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_or_display() {
        let token = sample();
        let secret = token.to_secret();
        let shown = format!("{secret:?} {secret} {token:?}");
        assert!(!shown.contains("abab"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0u8, 9, 10, 255];
        assert_eq!(hex(&bytes), "00090aff");
        assert_eq!(unhex::<4>("00090AFF"), Some(bytes));
        assert_eq!(unhex::<4>("00090af"), None);
        assert_eq!(unhex::<4>("00090afg"), None);
    }
}
