//! TLS for `wss://`: rustls with the ring provider, the system roots plus an optional CA
//! bundle, certificate and host name verification always on unless `tls_insecure`.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::ServerName;

use super::LinkError;

/// The client configuration: system roots plus `ca_file`, or no verification at all when
/// `insecure` (the caller warns at every connect).
pub fn client_config(ca_file: Option<&Path>, insecure: bool) -> Result<rustls::ClientConfig, LinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::TlsSetup(e.to_string()))?;
    if insecure {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
            .with_no_client_auth());
    }
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "system CA store");
    }
    let (_, _) = roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        use rustls_pki_types::pem::PemObject;
        let setup = |e: &dyn std::fmt::Display| LinkError::TlsSetup(format!("ca_file {}: {e}", path.display()));
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path).map_err(|e| setup(&e))?;
        let mut added = 0;
        for cert in certs {
            roots.add(cert.map_err(|e| setup(&e))?).map_err(|e| setup(&e))?;
            added += 1;
        }
        if added == 0 {
            return Err(setup(&"no CERTIFICATE in the file"));
        }
    }
    if roots.is_empty() {
        return Err(LinkError::TlsSetup("no trusted CA certificates (no system roots and no ca_file)".into()));
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// The name the certificate must be valid for: the URL's host (a DNS name or an IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, LinkError> {
    ServerName::try_from(host.to_string())
        .map_err(|e| LinkError::Url(format!("{host:?} is not a valid TLS server name: {e}")))
}

/// An operator-readable reason for a failed TLS handshake.
pub fn explain(e: &std::io::Error, host: &str, ca_file: Option<&Path>) -> String {
    let trusted = match ca_file {
        Some(p) => format!("the system roots and {}", p.display()),
        None => "the system roots (set [link] ca_file for a private CA)".to_string(),
    };
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::InvalidCertificate(c)) => {
            use rustls::CertificateError as C;
            match c {
                C::UnknownIssuer | C::BadSignature => {
                    format!("the server certificate is not signed by a trusted CA ({c:?}; trusted: {trusted})")
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    format!("the server certificate is not valid for the host name {host:?} ({c:?})")
                }
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                    format!("the server certificate is outside its validity period ({c:?})")
                }
                other => format!("the server certificate was refused: {other:?}"),
            }
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    }
}

/// Accepts any certificate: only with the explicit `tls_insecure = true`, warned about
/// at every connect.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
