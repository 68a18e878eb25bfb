//! The TLS listener's configuration: server certificate and key, root CA, client certificates
//! off / optional / required (verified against the root CA), TLS 1.2 and 1.3 only, and an
//! optional policy that a client certificate's CN or SAN must equal the MQTT client id.
//!
//! The built `ServerConfig` sits behind a lock and is replaced by [`Tls::reload`] (SIGHUP, or
//! an etcd change); each new connection takes the current one, existing connections keep
//! theirs.

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use wharf_ops::config::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCerts {
    Off,
    Optional,
    Required,
}

impl FromStr for ClientCerts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "off" => Ok(ClientCerts::Off),
            "optional" => Ok(ClientCerts::Optional),
            "required" => Ok(ClientCerts::Required),
            _ => Err("expected off, optional or required".into()),
        }
    }
}

/// What the TLS listener is made from. Key names are the etcd keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The MQTT-over-TLS listener; `None` when only the secure WebSocket listener uses the
    /// certificates.
    pub listen: Option<SocketAddr>,
    /// `serverCert`: PEM chain, leaf first.
    pub cert: PathBuf,
    /// `serverKey`: PEM private key.
    pub key: PathBuf,
    /// `cacert`: PEM root CA for client certificates.
    pub ca: Option<PathBuf>,
    /// `clientCerts`.
    pub client_certs: ClientCerts,
    /// `certIdentity`: a client certificate must name the client id (CN or SAN).
    pub cert_identity: bool,
}

/// Names from a verified client certificate: the subject CN and the SAN DNS names / emails.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    pub names: Vec<String>,
    /// The edge's own bridge, over an in-process stream: no credentials are checked and no
    /// rule applies to it (its topics are the operator's configuration). No socket can say so.
    pub bridge: bool,
}

impl PeerIdentity {
    pub fn from_der(der: &[u8]) -> PeerIdentity {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return PeerIdentity::default();
        };
        let mut names: Vec<String> = cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
            .collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(n)
                    | x509_parser::extensions::GeneralName::RFC822Name(n) => {
                        names.push((*n).to_owned())
                    }
                    _ => {}
                }
            }
        }
        PeerIdentity {
            names,
            bridge: false,
        }
    }

    pub fn allows(&self, client_id: &str) -> bool {
        self.names.iter().any(|n| n == client_id)
    }
}

fn read_certs(key: &str, path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let shown = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| ConfigError::new(key, &shown, format!("cannot read: {e}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConfigError::new(key, &shown, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(ConfigError::new(key, shown, "no certificate in the file"));
    }
    Ok(certs)
}

/// The TLS configuration of a bridge towards a remote broker: its certificate must chain to
/// `ca`; `cert` and `key` are the bridge's own, where the remote asks for one. `key` names
/// the setting in errors (e.g. `bridges[0].tls`).
pub fn client_config(
    key: &str,
    ca: &PathBuf,
    cert: Option<&PathBuf>,
    private_key: Option<&PathBuf>,
) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    let ca_key = format!("{key}.ca");
    for c in read_certs(&ca_key, ca)? {
        roots
            .add(c)
            .map_err(|e| ConfigError::new(&ca_key, ca.display().to_string(), e.to_string()))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| ConfigError::new(key, "", e.to_string()))?
        .with_root_certificates(roots);
    let config = match (cert, private_key) {
        (Some(cert), Some(private_key)) => {
            let certs = read_certs(&format!("{key}.cert"), cert)?;
            let shown = private_key.display().to_string();
            let pk = PrivateKeyDer::from_pem_file(private_key).map_err(|e| {
                ConfigError::new(
                    format!("{key}.key"),
                    &shown,
                    format!("cannot read a PEM private key: {e}"),
                )
            })?;
            builder.with_client_auth_cert(certs, pk).map_err(|e| {
                ConfigError::new(
                    format!("{key}.key"),
                    shown,
                    format!("does not go with the certificate: {e}"),
                )
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// Builds the rustls configuration; any problem names the key and file.
pub fn build(settings: &TlsSettings) -> Result<Arc<ServerConfig>, ConfigError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("serverCert", &settings.cert)?;
    let key_shown = settings.key.display().to_string();
    let key = PrivateKeyDer::from_pem_file(&settings.key).map_err(|e| {
        ConfigError::new(
            "serverKey",
            &key_shown,
            format!("cannot read a PEM private key: {e}"),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| ConfigError::new("tls", "true", e.to_string()))?;
    let builder = match settings.client_certs {
        ClientCerts::Off => builder.with_no_client_auth(),
        mode => {
            let Some(ca) = &settings.ca else {
                return Err(ConfigError::new(
                    "cacert",
                    "",
                    "client certificates need a root CA",
                ));
            };
            let mut roots = RootCertStore::empty();
            for cert in read_certs("cacert", ca)? {
                roots.add(cert).map_err(|e| {
                    ConfigError::new("cacert", ca.display().to_string(), e.to_string())
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if mode == ClientCerts::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier
                .build()
                .map_err(|e| ConfigError::new("cacert", ca.display().to_string(), e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        ConfigError::new(
            "serverKey",
            key_shown,
            format!(
                "does not go with serverCert {}: {e}",
                settings.cert.display()
            ),
        )
    })?;
    Ok(Arc::new(config))
}

/// The live TLS configuration of a listener.
pub struct Tls {
    settings: RwLock<TlsSettings>,
    current: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    pub fn new(settings: TlsSettings) -> Result<Tls, ConfigError> {
        let config = build(&settings)?;
        Ok(Tls {
            settings: RwLock::new(settings),
            current: RwLock::new(config),
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    pub fn settings(&self) -> TlsSettings {
        self.settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the files (with changed settings, if given). On error the old configuration
    /// stays in force.
    pub fn reload(&self, settings: Option<TlsSettings>) -> Result<(), ConfigError> {
        let settings = settings.unwrap_or_else(|| self.settings());
        let config = build(&settings)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        *self.settings.write().unwrap_or_else(|e| e.into_inner()) = settings;
        tracing::info!("TLS certificates reloaded");
        Ok(())
    }
}
