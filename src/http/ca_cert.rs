//! `GET /ca.crt`: the site CA's certificate (`--ca-cert`), public, so that a technician can
//! install it on each tablet from the box itself. Read from its file at each request: it is
//! small, asked for once per tablet, and a renewed file is served without a reload.

use std::path::Path;

use log::{info, warn};

use crate::http::conn::Response;
use crate::http::status::Status;
use crate::protocol::error_json;

/// The largest CA file served: a certificate is 1 to 2 KB in PEM.
pub const MAX_CA_CERT_BYTES: u64 = 64 * 1024;

/// Reads the CA file: PEM text holding a certificate, at most `MAX_CA_CERT_BYTES`; the error
/// names the file and what is wrong with it.
pub fn read_ca_cert(path: &Path) -> Result<String, String> {
    let cannot = |error: &dyn std::fmt::Display| {
        format!("cannot read the CA certificate {} (--ca-cert): {error}", path.display())
    };
    let size = std::fs::metadata(path).map_err(|error| cannot(&error))?.len();
    if size > MAX_CA_CERT_BYTES {
        return Err(cannot(&format_args!(
            "{size} bytes, more than a certificate ({MAX_CA_CERT_BYTES} at most)"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|error| cannot(&error))?;
    if !text.contains("-----BEGIN CERTIFICATE-----") {
        return Err(cannot(&"no PEM \"-----BEGIN CERTIFICATE-----\" in it"));
    }
    Ok(text)
}

/// The answer to `GET /ca.crt`: the file as a certificate download, or 404 without `--ca-cert`.
pub fn ca_certificate(path: Option<&Path>) -> Response {
    let Some(path) = path else {
        return Response::json(Status::NOT_FOUND, error_json("no CA certificate here (--ca-cert)"));
    };
    match read_ca_cert(path) {
        Ok(pem) => {
            info!("served the CA certificate {}", path.display());
            Response { content_type: "application/x-x509-ca-cert", ..Response::json(Status::OK, pem) }
                .with_header("Content-Disposition", "attachment; filename=\"resq-push-ca.crt\"")
        }
        Err(error) => {
            warn!("GET /ca.crt: {error}");
            Response::json(Status::SERVICE_UNAVAILABLE, error_json("the CA certificate cannot be read"))
        }
    }
}
