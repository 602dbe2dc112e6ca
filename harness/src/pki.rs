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
        let files = Files::new(dir)?;
        let ca = ca("baton-e2e-ca")?;
        let ca_cert = files.write("ca.crt", ca.pem())?;
        let serving = files.leaf(
            "apiserver",
            &ca,
            &["localhost", "kubernetes", "kubernetes.default.svc"],
            &[("kube-apiserver", None)],
            vec![ExtendedKeyUsagePurpose::ServerAuth],
        )?;
        let admin = files.leaf(
            "admin",
            &ca,
            &[],
            &[("baton-e2e-admin", Some("system:masters"))],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )?;
        let sa = KeyPair::generate()?;
        let sa_key = files.write("sa.key", sa.serialize_pem())?;
        let sa_pub = files.write("sa.pub", sa.public_key_pem())?;
        Ok(Pki {
            ca_cert,
            serving,
            admin,
            sa_key,
            sa_pub,
        })
    }
}

/// A directory certificates are written into.
struct Files<'a>(&'a Path);

impl<'a> Files<'a> {
    fn new(dir: &'a Path) -> Result<Files<'a>> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Files(dir))
    }

    fn write(&self, name: &str, text: String) -> Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, text).map_err(io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    /// A certificate signed by `ca` for `names` (and 127.0.0.1 when it has names), with
    /// the common name and organization of `subject`, written as `{name}.crt` and
    /// `{name}.key`.
    fn leaf(
        &self,
        name: &str,
        ca: &CertifiedIssuer<'static, KeyPair>,
        names: &[&str],
        subject: &[(&str, Option<&str>)],
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<(PathBuf, PathBuf)> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if !names.is_empty() {
            params
                .subject_alt_names
                .push(SanType::IpAddress([127, 0, 0, 1].into()));
        }
        for (cn, org) in subject {
            params.distinguished_name.push(DnType::CommonName, *cn);
            if let Some(org) = org {
                params
                    .distinguished_name
                    .push(DnType::OrganizationName, *org);
            }
        }
        params.extended_key_usages = usages;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, ca)?;
        Ok((
            self.write(&format!("{name}.crt"), cert.pem())?,
            self.write(&format!("{name}.key"), key.serialize_pem())?,
        ))
    }
}

/// A self-signed CA named `cn`.
fn ca(cn: &str) -> Result<CertifiedIssuer<'static, KeyPair>> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, cn);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?)
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

/// Files written by [`etcd`]: etcd's own CA, a serving certificate for loopback that
/// also authenticates as a client (etcd's gateway dials its own gRPC server with it),
/// and a client certificate for baton.
#[derive(Debug, Clone)]
pub struct EtcdPki {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The members' certificate and key.
    pub serving: (PathBuf, PathBuf),
    /// baton's client certificate and key.
    pub client: (PathBuf, PathBuf),
}

/// Generates an etcd PKI into `dir`.
pub fn etcd(dir: &Path) -> Result<EtcdPki> {
    let files = Files::new(dir)?;
    let ca = ca("etcd-ca")?;
    let ca_cert = files.write("etcd-ca.crt", ca.pem())?;
    let serving = files.leaf(
        "etcd-server",
        &ca,
        &["localhost"],
        &[("etcd", None)],
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let client = files.leaf(
        "baton-etcd-client",
        &ca,
        &[],
        &[("baton-etcd-client", None)],
        vec![ExtendedKeyUsagePurpose::ClientAuth],
    )?;
    Ok(EtcdPki {
        ca_cert,
        serving,
        client,
    })
}
