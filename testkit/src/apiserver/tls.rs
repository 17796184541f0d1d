//! The emulator's certificates: a self-signed CA, a server certificate for `127.0.0.1`, `::1`,
//! `localhost` (and the IP of an extra listener, if any) signed by it, and client certificates (for kubeconfigs that authenticate with one).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;

/// A certificate and its key, PEM-encoded (as kubeconfigs embed them).
#[derive(Debug, Clone)]
pub struct Pem {
    pub certificate: String,
    pub key: String,
}

/// The CA and what it signed.
pub(crate) struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// Another name the server's certificate carries (the IP of an extra listener).
    extra_name: Option<String>,
    pub ca_pem: String,
    ca_der: CertificateDer<'static>,
}

impl Authority {
    pub fn new(extra_name: Option<&str>) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "ringlb test apiserver CA");
        params.distinguished_name = name;
        let key = KeyPair::generate().expect("CA key");
        let certificate = params.self_signed(&key).expect("CA certificate");
        Authority {
            ca_pem: certificate.pem(),
            ca_der: certificate.der().clone(),
            issuer: Issuer::new(params, key),
            extra_name: extra_name.map(str::to_owned),
        }
    }

    /// A certificate for `names` (IPs or DNS names) signed by the CA, with `common_name`.
    pub fn issue(
        &self,
        names: &[&str],
        common_name: &str,
        organisations: &[&str],
        client: bool,
    ) -> (Pem, CertificateDer<'static>, PrivateKeyDer<'static>) {
        let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("parameters");
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        for organisation in organisations {
            name.push(DnType::OrganizationName, *organisation);
        }
        params.distinguished_name = name;
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("certificate");
        let pem = Pem { certificate: certificate.pem(), key: key.serialize_pem() };
        let der = certificate.der().clone();
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        (pem, der, key_der)
    }

    /// The server's TLS configuration: its own certificate, and client certificates signed by the CA
    /// accepted but not required (a request without one authenticates with a token, or is anonymous).
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        let mut names = vec!["127.0.0.1", "::1", "localhost"];
        names.extend(self.extra_name.as_deref());
        let (_, certificate, key) = self.issue(&names, "kube-apiserver", &[], false);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("the CA is a valid root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .allow_unauthenticated()
            .build()
            .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![certificate], key)
            .expect("server certificate");
        Arc::new(config)
    }
}
