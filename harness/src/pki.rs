//! Certificates for a local cluster: a CA, the API server's serving certificate for
//! loopback, client certificates, and the ServiceAccount token signing key.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::error::{Result, io};

/// Files written by [`Pki::generate`].
#[derive(Debug, Clone)]
pub struct Pki {
    /// The CA certificate (trusted for serving and client certificates).
    pub ca_cert: PathBuf,
    /// The API server's certificate and key.
    pub serving: (PathBuf, PathBuf),
    /// The admin client's certificate and key (group `system:masters`).
    pub admin: (PathBuf, PathBuf),
    /// The ServiceAccount token signing key.
    pub sa_key: PathBuf,
    /// Its public half, which verifies tokens.
    pub sa_pub: PathBuf,
}

impl Pki {
    /// Generates everything into `dir`.
    pub fn generate(dir: &Path) -> Result<Pki> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let write = |name: &str, text: String| -> Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
            Ok(path)
        };

        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "baton-e2e-ca");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
        let ca_cert = write("ca.crt", ca.pem())?;

        let mut serving = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".into(),
            "kubernetes.default.svc".into(),
        ])?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = serving.signed_by(&key, &ca)?;
        let serving = (
            write("apiserver.crt", cert.pem())?,
            write("apiserver.key", key.serialize_pem())?,
        );

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "baton-e2e-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate()?;
        let cert = admin.signed_by(&key, &ca)?;
        let admin = (
            write("admin.crt", cert.pem())?,
            write("admin.key", key.serialize_pem())?,
        );

        let sa = KeyPair::generate()?;
        let sa_key = write("sa.key", sa.serialize_pem())?;
        let sa_pub = write("sa.pub", sa.public_key_pem())?;
        Ok(Pki {
            ca_cert,
            serving,
            admin,
            sa_key,
            sa_pub,
        })
    }
}

/// A TLS acceptor for a loopback server (`localhost`, `127.0.0.1`) with a CA of its
/// own, whose certificate (PEM) is written to `ca_file` for clients to trust.
pub fn loopback_tls(ca_file: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &ca)?;
    std::fs::write(ca_file, ca.pem()).map_err(io(format!("writing {}", ca_file.display())))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let tls = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Other(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .map_err(|e| crate::Error::Other(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls)))
}

/// Serves `app` over HTTPS on a loopback port with a CA of its own (its certificate
/// written to `ca_file`). Returns the port and the accept loop's task (abort it to stop).
pub async fn serve_https(
    app: axum::Router,
    ca_file: &Path,
) -> Result<(u16, tokio::task::JoinHandle<()>)> {
    let acceptor = loopback_tls(ca_file)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("binding a loopback HTTPS server"))?;
    let port = listener
        .local_addr()
        .map_err(io("binding a loopback HTTPS server"))?
        .port();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok((port, task))
}
