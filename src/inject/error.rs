//! The injector's errors: what went wrong, as kinds a caller can match on.

use std::path::PathBuf;

/// Errors of the injector library.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// The request body was not an AdmissionReview with a `request`.
    #[error("malformed AdmissionReview: {0}")]
    BadReview(ReviewDefect),
    /// A setting (flag value) is invalid.
    #[error("invalid injector setting {name}: {defect}")]
    Setting { name: &'static str, defect: SettingDefect },
    /// Reading the certificate or key failed.
    #[error("reading {path}: {source}")]
    ReadTls {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The certificate or key PEM could not be used.
    #[error("TLS material in {path}: {defect}")]
    BadTls {
        path: PathBuf,
        #[source]
        defect: TlsDefect,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// Accepting on the listener failed.
    #[error("accepting connections: {0}")]
    Accept(#[source] std::io::Error),
}

/// Why a body is not an AdmissionReview the injector can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReviewDefect {
    #[error("no request")]
    NoRequest,
    #[error("request.uid missing")]
    NoUid,
    #[error("request.object is not a pod")]
    ObjectNotAPod,
    /// The body does not have the shape of an AdmissionReview (serde's message).
    #[error("not an AdmissionReview: {0}")]
    Shape(String),
}

/// Why a flag value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingDefect {
    #[error("must not be empty")]
    Empty,
    #[error("{0:?} is not a Kubernetes quantity")]
    NotAQuantity(String),
    #[error("{0:?} is not name or name/key")]
    NotASecretRef(String),
    #[error("must differ from --egress-port")]
    SameAsEgressPort,
}

/// Why a certificate or key file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsDefect {
    /// The file is not PEM, or holds no block of the expected type.
    #[error(transparent)]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// The PEM parsed but held no certificate.
    #[error("no CERTIFICATE block")]
    NoCertificate,
    /// ring cannot sign with the key (unsupported algorithm or malformed key).
    #[error(transparent)]
    UnusableKey(rustls::Error),
}
