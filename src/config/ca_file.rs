//! `upstream.ca_file`: the PEM file of extra trust roots, read and checked at validation so a
//! bad file is a config error naming the file, not a TLS failure at the first request.

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read {path}: {reason} (expected a PEM file of CA certificates)")]
    Unreadable { path: String, reason: String },
    #[error(
        "{path} holds no PEM certificate (expected one or more -----BEGIN CERTIFICATE----- blocks)"
    )]
    NoCertificates { path: String },
    #[error("{path}: certificate {index} is not usable as a trust root: {reason}")]
    Rejected {
        path: String,
        index: usize,
        reason: String,
    },
}

/// Reads every certificate in a PEM file and checks each one can serve as a trust anchor.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let display = path.display().to_string();
    let unreadable = |reason: String| CaFileError::Unreadable {
        path: display.clone(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| unreadable(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| unreadable(e.to_string()))?;
    if certs.is_empty() {
        return Err(CaFileError::NoCertificates { path: display });
    }
    for (index, cert) in certs.iter().enumerate() {
        webpki_anchor_check(cert).map_err(|reason| CaFileError::Rejected {
            path: display.clone(),
            index: index + 1,
            reason,
        })?;
    }
    Ok(certs)
}

fn webpki_anchor_check(cert: &CertificateDer<'_>) -> Result<(), String> {
    let mut store = RootCertStore::empty();
    store.add(cert.clone()).map_err(|e| e.to_string())
}
