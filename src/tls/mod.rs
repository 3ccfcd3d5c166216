//! TLS: loading PEM material, building the two sides' rustls configs, and the handshakes.
//!
//! In: certificate, key and CA bundle paths plus the protocol floor. Out: a [`ServerTls`] that
//! accepts mutual TLS (raw or `legate/1`, chosen per connection by ALPN) and a [`ClientTls`]
//! that dials it. The crypto provider is pinned to aws-lc-rs, whose post-quantum hybrid key
//! exchange (X25519MLKEM768) is offered first.

pub mod identity;
pub mod record;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ServerConfig};

use crate::net::Stream;

pub use identity::{PeerIdentity, Rules};

/// The ALPN name of the legate-to-legate protocol (`docs/protocol.md`).
pub const LEGATE_ALPN: &[u8] = b"legate/1";

pub use record::Session;

/// An established connection, either side: rustls' handshake, legate's record layer
/// ([`record`]).
pub type ServerStream = record::TlsStream;
pub type ClientStream = record::TlsStream;

/// The TLS versions a tunnel speaks: from `--min-tls-version` and `--max-tls-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersions {
    /// 1.2 and 1.3.
    Tls12,
    /// 1.3 only (the default).
    #[default]
    Tls13,
    /// 1.2 only (`--max-tls-version=TLS1.2`).
    Tls12Only,
}

/// One TLS version as a flag names it: `1.2`, `TLS1.2`, `tls1.3`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Tls12,
    Tls13,
}

impl std::str::FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let lower = s.trim().to_ascii_lowercase();
        match lower.strip_prefix("tls").unwrap_or(&lower) {
            "1.2" => Ok(Version::Tls12),
            "1.3" => Ok(Version::Tls13),
            _ => Err(format!(
                "TLS version {s:?} is not supported; use TLS1.2 or TLS1.3"
            )),
        }
    }
}

impl TlsVersions {
    /// The range between `min` (default 1.3) and `max` (default 1.3). A maximum of 1.2 with no
    /// minimum given means 1.2, as a ghostunnel command line that sets only the maximum
    /// expects; an empty range is an error.
    pub fn new(min: Option<Version>, max: Option<Version>) -> Result<TlsVersions, String> {
        match (min, max) {
            (Some(Version::Tls13), Some(Version::Tls12)) => Err(
                "--min-tls-version TLS1.3 is above --max-tls-version TLS1.2: no version is left"
                    .into(),
            ),
            (_, Some(Version::Tls12)) => Ok(TlsVersions::Tls12Only),
            (Some(Version::Tls12), _) => Ok(TlsVersions::Tls12),
            _ => Ok(TlsVersions::Tls13),
        }
    }
}

/// Why TLS material could not be loaded or a config built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} {} is not valid PEM: {detail}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("{what} {} holds no {expected}", path.display())]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{identity}: the certificate and key do not fit together: {detail}")]
    Identity { identity: String, detail: String },
    #[error("keystore {}: {detail}", path.display())]
    Keystore { path: PathBuf, detail: String },
    #[error(
        "{what} {} is open to group or others (mode {mode:04o}): run chmod 600 {}, or pass --allow-readable-key if it must stay shared",
        path.display(),
        path.display()
    )]
    KeyMode {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("CA bundle {}: {detail}", path.display())]
    Roots { path: PathBuf, detail: String },
    #[error("TLS setup failed: {0}")]
    Config(String),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<Error>),
}

/// The one crypto provider legate uses: aws-lc-rs, post-quantum hybrid key exchange first, and
/// AES-128-GCM before AES-256-GCM: both are AEADs with ample margin, and the 128-bit key does
/// fewer rounds per block, which is throughput on the bulk path (docs/performance.md).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

pub(crate) static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
static TLS13_AND_12: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
pub(crate) static TLS12_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS12];

fn versions(v: TlsVersions) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match v {
        TlsVersions::Tls13 => TLS13_ONLY,
        TlsVersions::Tls12 => TLS13_AND_12,
        TlsVersions::Tls12Only => TLS12_ONLY,
    }
}

/// The HTTPS status port takes 1.2 and 1.3 (monitoring tools lag behind), or 1.2 alone when
/// the tunnel's maximum is 1.2.
fn status_versions(v: TlsVersions) -> TlsVersions {
    match v {
        TlsVersions::Tls12Only => TlsVersions::Tls12Only,
        _ => TlsVersions::Tls12,
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_error(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> Error {
    Error::Pem {
        what,
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// Every PEM block of type `T` in `pem`, in order; none at all is an error naming `expected`.
fn pem_all<T: PemObject>(
    what: &'static str,
    path: &Path,
    pem: &[u8],
    expected: &'static str,
) -> Result<Vec<T>, Error> {
    let items = T::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if items.is_empty() {
        return Err(Error::Empty {
            what,
            path: path.to_path_buf(),
            expected,
        });
    }
    Ok(items)
}

/// Reads every certificate in a PEM file, in order.
pub fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    pem_all(what, path, &read(what, path)?, "PEM CERTIFICATE block")
}

/// Reads a private key: PKCS#8, SEC1 (`EC PRIVATE KEY`) or PKCS#1 (`RSA PRIVATE KEY`).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let what = "private key";
    let pem = read(what, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => Error::Empty {
            what,
            path: path.to_path_buf(),
            expected: "PEM PRIVATE KEY, EC PRIVATE KEY or RSA PRIVATE KEY block",
        },
        e => pem_error(what, path, e),
    })
}

/// Reads a CA bundle into a root store; every certificate in it must be usable as a root.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA bundle", path)? {
        roots.add(cert).map_err(|e| Error::Roots {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

/// A password that never appears in logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Where a tunnel's own certificate chain and key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentitySource {
    /// `--cert` and `--key`: two PEM files.
    Pem { cert: PathBuf, key: PathBuf },
    /// `--keystore`: a PKCS#12 file (with `--storepass`), or one PEM file holding the chain and
    /// the key.
    Keystore { path: PathBuf, password: Secret },
    /// No certificate: a client side with `--disable-authentication`.
    None,
}

/// The files a tunnel's TLS identity and trust come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    pub identity: IdentitySource,
    /// The CA bundle peers must chain to. `None` only on a server side with
    /// `--disable-authentication`, which asks clients for no certificate.
    pub cacert: Option<PathBuf>,
    /// Certificate revocation lists (PEM or DER) checked against peers' leaf certificates.
    pub crl: Option<PathBuf>,
    /// Accept a key or keystore file that group or others may read (`--allow-readable-key`).
    pub allow_readable_key: bool,
}

/// Refuses a private key (or keystore) file that group or others may read or write, as ssh
/// does: a key others can read is a key others have. `--allow-readable-key` waives it.
fn check_key_mode(what: &'static str, path: &Path, allow: bool) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    if allow {
        return Ok(());
    }
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    Err(Error::KeyMode {
        what,
        path: path.to_path_buf(),
        mode,
    })
}

/// Reads a keystore: PEM when it looks like PEM, PKCS#12 otherwise.
pub fn load_keystore(
    path: &Path,
    password: &Secret,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), Error> {
    let what = "keystore";
    let data = read(what, path)?;
    if data.trim_ascii_start().starts_with(b"-----BEGIN") {
        let certs = pem_all(
            what,
            path,
            &data,
            "PEM CERTIFICATE block (a combined PEM keystore holds chain and key)",
        )?;
        let key = PrivateKeyDer::from_pem_slice(&data).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => Error::Empty {
                what,
                path: path.to_path_buf(),
                expected: "private key (a combined PEM keystore holds chain and key)",
            },
            e => pem_error(what, path, e),
        })?;
        return Ok((certs, key));
    }
    let store = p12_keystore::KeyStore::from_pkcs12(
        &data,
        &password.0,
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .map_err(|e| Error::Keystore {
        path: path.to_path_buf(),
        detail: match e {
            p12_keystore::error::Error::MacError(_) => {
                "wrong password (set --storepass or KEYSTORE_PASS)".to_string()
            }
            e => format!("not a readable PKCS#12 or PEM keystore: {e}"),
        },
    })?;
    let (_, chain) = store.private_key_chain().ok_or_else(|| Error::Keystore {
        path: path.to_path_buf(),
        detail: "holds no private key with a certificate chain".to_string(),
    })?;
    let certs = chain
        .certs()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(chain.key().as_der().to_vec().into());
    Ok((certs, key))
}

struct Material {
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    roots: Option<Arc<RootCertStore>>,
    crls: Option<Vec<CertificateRevocationListDer<'static>>>,
}

/// Reads CRLs: PEM `X509 CRL` blocks, or one DER CRL.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, Error> {
    let what = "CRL";
    let data = read(what, path)?;
    if !data.trim_ascii_start().starts_with(b"-----BEGIN") {
        return Ok(vec![CertificateRevocationListDer::from(data)]);
    }
    pem_all(what, path, &data, "PEM X509 CRL block")
}

impl Material {
    /// Loads identity and trust; when several files are bad, every problem is reported, one per
    /// line.
    fn load(files: &Files) -> Result<Material, Error> {
        let (chain, key) = match &files.identity {
            IdentitySource::Pem { cert, key } => (
                load_certs("certificate", cert).map(Some),
                check_key_mode("private key", key, files.allow_readable_key)
                    .and_then(|()| load_key(key))
                    .map(Some),
            ),
            IdentitySource::Keystore { path, password } => {
                match check_key_mode("keystore", path, files.allow_readable_key)
                    .and_then(|()| load_keystore(path, password))
                {
                    Ok((chain, key)) => (Ok(Some(chain)), Ok(Some(key))),
                    Err(e) => (Err(e), Ok(None)),
                }
            }
            IdentitySource::None => (Ok(None), Ok(None)),
        };
        let roots = files.cacert.as_deref().map(load_roots).transpose();
        let crls = files.crl.as_deref().map(load_crls).transpose();
        match (chain, key, roots, crls) {
            (Ok(chain), Ok(key), Ok(roots), Ok(crls)) => Ok(Material {
                identity: chain.zip(key),
                roots,
                crls,
            }),
            (chain, key, roots, crls) => {
                let errors: Vec<Error> = [chain.err(), key.err(), roots.err(), crls.err()]
                    .into_iter()
                    .flatten()
                    .collect();
                Err(if errors.len() == 1 {
                    errors.into_iter().next().expect("one error")
                } else {
                    Error::Several(errors)
                })
            }
        }
    }
}

/// This side's own certificate as a peer trusting the same CA bundle would see it: its names
/// and issuer, and whether its chain verifies (as a client certificate when `as_client`, as a
/// server's otherwise), and against `--crl` when there is one. `None` when there is no
/// certificate or no CA bundle to check it by;
/// `Err` says why the chain does not verify, with the names.
pub fn own_certificate(files: &Files, as_client: bool) -> Option<Result<String, String>> {
    use rustls::client::danger::ServerCertVerifier as _;
    let material = Material::load(files).ok()?;
    let crls = material.crls;
    let ((chain, _), roots) = (material.identity?, material.roots?);
    let (leaf, intermediates) = chain.split_first()?;
    let id = PeerIdentity::from_der(leaf).ok()?;
    let issuer = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.issuer().to_string())
        .unwrap_or_default();
    let mut names: Vec<String> = id.dns_names.iter().map(|d| format!("DNS:{d}")).collect();
    names.extend(id.ips.iter().map(|i| format!("IP:{i}")));
    names.extend(id.uris.iter().map(|u| format!("URI:{u}")));
    let names = format!(
        "{id}, SANs [{}], issued by {issuer}",
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(" ")
        }
    );
    let now = rustls::pki_types::UnixTime::now();
    let verified = if as_client {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider());
        match crls {
            // As the tunnel checks its peers: the leaf against the CRLs.
            Some(crls) => verifier.with_crls(crls).only_check_end_entity_revocation(),
            None => verifier,
        }
        .build()
        .map_err(|e| e.to_string())
        .and_then(|v| {
            v.verify_client_cert(leaf, intermediates, now)
                .map(drop)
                .map_err(|e| e.to_string())
        })
    } else {
        // The name is checked against each client's own --override-server-name, not here: any
        // name that parses will do (a wildcard does not).
        let name = id
            .dns_names
            .first()
            .cloned()
            .or_else(|| id.ips.first().map(ToString::to_string))
            .and_then(|n| ServerName::try_from(n).ok())
            .unwrap_or_else(|| ServerName::try_from("legate.invalid").expect("a valid name"));
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider());
        match crls {
            Some(crls) => verifier.with_crls(crls).only_check_end_entity_revocation(),
            None => verifier,
        }
        .build()
        .map_err(|e| e.to_string())
        .and_then(
            |v| match v.verify_server_cert(leaf, intermediates, &name, &[], now) {
                Ok(_)
                | Err(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        )
    };
    Some(match verified {
        Ok(()) => Ok(format!("{names}; chains to the CA bundle")),
        Err(e) => Err(format!(
            "{names}; does not verify against the CA bundle: {e}"
        )),
    })
}

fn identity_error(files: &Files, e: rustls::Error) -> Error {
    let identity = match &files.identity {
        IdentitySource::Pem { cert, key } => {
            format!("certificate {} and key {}", cert.display(), key.display())
        }
        IdentitySource::Keystore { path, .. } => format!("keystore {}", path.display()),
        IdentitySource::None => "no identity".to_string(),
    };
    Error::Identity {
        identity,
        detail: e.to_string(),
    }
}

/// One loaded set of TLS material for a server side: what every new connection uses until the
/// next successful reload.
struct ServerSnapshot {
    raw: Arc<ServerConfig>,
    legate: Arc<ServerConfig>,
    status: Arc<ServerConfig>,
    not_after: Option<i64>,
}

fn not_after(chain: &[CertificateDer<'_>]) -> Option<i64> {
    let leaf = chain.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// A config that presents `chain`/`key` and asks for no client certificate: the HTTPS status
/// listener's, which shows the tunnel's live certificate.
fn status_config(
    files: &Files,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    tunnel: TlsVersions,
) -> Result<Arc<ServerConfig>, Error> {
    let config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(status_versions(tunnel)))
        .map_err(|e| Error::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| identity_error(files, e))?;
    Ok(Arc::new(config))
}

impl ServerSnapshot {
    fn load(files: &Files, min: TlsVersions) -> Result<ServerSnapshot, Error> {
        let m = Material::load(files)?;
        let (chain, key) = m
            .identity
            .ok_or_else(|| Error::Config("a server side needs its own certificate".into()))?;
        let provider = provider();
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions(min))
            .map_err(|e| Error::Config(e.to_string()))?;
        let builder = match (m.roots, &files.cacert) {
            (Some(roots), Some(path)) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider);
                let verifier = match m.crls {
                    Some(crls) => verifier.with_crls(crls).only_check_end_entity_revocation(),
                    None => verifier,
                };
                let verifier = verifier.build().map_err(|e| Error::Roots {
                    path: path.clone(),
                    detail: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let not_after = not_after(&chain);
        let status = status_config(files, chain.clone(), key.clone_key(), min)?;
        // A new config per load means a new session cache: nobody resumes a session that the
        // new CA bundle, CRL or rules would not admit afresh.
        let mut raw = builder
            .with_single_cert(chain, key)
            .map_err(|e| identity_error(files, e))?;
        // legate's record layer takes the traffic keys after the handshake (`record`).
        raw.enable_secret_extraction = true;
        // Two configs sharing one session cache: rustls refuses a handshake whose ALPN offer has
        // no overlap with a configured list, and raw peers may offer anything (h2, http/1.1).
        let mut legate = raw.clone();
        legate.alpn_protocols = vec![LEGATE_ALPN.to_vec()];
        Ok(ServerSnapshot {
            raw: Arc::new(raw),
            legate: Arc::new(legate),
            status,
            not_after,
        })
    }
}

/// The server side: mutual TLS in, ALPN decides between raw and `legate/1`. Reloadable: new
/// connections use the material of the last successful load.
pub struct ServerTls {
    files: Files,
    min: TlsVersions,
    current: ArcSwap<ServerSnapshot>,
    /// Counts successful reloads; connections made before one must not start new streams.
    generation: tokio::sync::watch::Sender<u64>,
}

impl ServerTls {
    /// Without `files.cacert`, clients are asked for no certificate (`--disable-authentication`).
    pub fn new(files: &Files, min: TlsVersions) -> Result<ServerTls, Error> {
        Ok(ServerTls {
            files: files.clone(),
            min,
            current: ArcSwap::from_pointee(ServerSnapshot::load(files, min)?),
            generation: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Loads the files again. On success new connections use the new material; on failure
    /// nothing changes and the error says why. Open streams are never touched; connections
    /// idle between `legate/1` streams are told through [`ServerTls::reloads`].
    pub fn reload(&self) -> Result<(), Error> {
        let fresh = ServerSnapshot::load(&self.files, self.min)?;
        self.current.store(Arc::new(fresh));
        self.generation.send_modify(|g| *g += 1);
        Ok(())
    }

    /// Changes with every successful reload.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// When the current certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        self.current.load().not_after
    }

    /// A server config presenting the current certificate, without client authentication.
    pub fn status_config(&self) -> Option<Arc<ServerConfig>> {
        Some(self.current.load().status.clone())
    }

    /// Runs the server handshake on `tcp`. The caller bounds it with a timeout.
    pub async fn accept(&self, tcp: Stream) -> std::io::Result<ServerStream> {
        record::accept(tcp, |hello| {
            let wants_legate = hello
                .alpn()
                .is_some_and(|mut offered| offered.any(|p| p == LEGATE_ALPN));
            let snapshot = self.current.load();
            if wants_legate {
                snapshot.legate.clone()
            } else {
                snapshot.raw.clone()
            }
        })
        .await
    }
}

/// The server's certificate checked by webpki (chain, name, validity, CRL), then against the
/// `--verify-*` pins, within the handshake: a server that fails them is sent an alert and never
/// sees a finished connection, as with ghostunnel.
#[derive(Debug)]
struct PinnedVerifier {
    inner: Arc<WebPkiServerVerifier>,
    pins: Rules,
}

impl rustls::client::danger::ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        if self.pins.is_empty() {
            return Ok(verified);
        }
        let refuse = |why: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(PinError(why)),
            )))
        };
        let id = PeerIdentity::from_der(end_entity).map_err(refuse)?;
        if self.pins.admits(&id) {
            Ok(verified)
        } else {
            Err(refuse(format!(
                "server identity {id} does not match the --verify-* pins"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Why the pins refused a server, as the handshake error says it.
#[derive(Debug)]
struct PinError(String);

impl std::fmt::Display for PinError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinError {}

/// One loaded set of TLS material for a client side.
struct ClientSnapshot {
    config: Arc<ClientConfig>,
    status: Option<Arc<ServerConfig>>,
    not_after: Option<i64>,
}

impl ClientSnapshot {
    fn load(
        files: &Files,
        min: TlsVersions,
        offer_legate: bool,
        pins: &Rules,
    ) -> Result<ClientSnapshot, Error> {
        let m = Material::load(files)?;
        let (roots, path) = m
            .roots
            .zip(files.cacert.as_ref())
            .ok_or_else(|| Error::Config("a client side needs --cacert".into()))?;
        let provider = provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
        let verifier = match m.crls {
            Some(crls) => verifier.with_crls(crls).only_check_end_entity_revocation(),
            None => verifier,
        };
        let verifier = verifier.build().map_err(|e| Error::Roots {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        // The default in-memory session store gives resumption on reconnect; a new one per load
        // forgets sessions that the new trust might not allow.
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(versions(min))
            .map_err(|e| Error::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                inner: verifier,
                pins: pins.clone(),
            }));
        let (mut config, status, not_after) = match m.identity {
            Some((chain, key)) => {
                let not_after = not_after(&chain);
                let status = status_config(files, chain.clone(), key.clone_key(), min)?;
                let config = builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| identity_error(files, e))?;
                (config, Some(status), not_after)
            }
            None => (builder.with_no_client_auth(), None, None),
        };
        if offer_legate {
            config.alpn_protocols = vec![LEGATE_ALPN.to_vec()];
        }
        config.enable_secret_extraction = true;
        Ok(ClientSnapshot {
            config: Arc::new(config),
            status,
            not_after,
        })
    }
}

/// The client side: dials a legate server (or any TLS server) with a client certificate.
/// Reloadable like [`ServerTls`].
pub struct ClientTls {
    files: Files,
    min: TlsVersions,
    offer_legate: bool,
    pins: Rules,
    current: ArcSwap<ClientSnapshot>,
    /// Counts successful reloads; pooled connections from before one are not used.
    generation: std::sync::atomic::AtomicU64,
}

impl ClientTls {
    /// `pins`: the `--verify-*` rules the server's certificate must pass besides its name
    /// (checked inside certificate verification, so a server that fails them gets an alert).
    /// `offer_legate` adds the `legate/1` ALPN offer. The name each server's certificate must
    /// carry is given per connection ([`ClientTls::connect`]).
    pub fn new(
        files: &Files,
        min: TlsVersions,
        pins: &Rules,
        offer_legate: bool,
    ) -> Result<ClientTls, Error> {
        let snapshot = ClientSnapshot::load(files, min, offer_legate, pins)?;
        Ok(ClientTls {
            files: files.clone(),
            min,
            offer_legate,
            pins: pins.clone(),
            current: ArcSwap::from_pointee(snapshot),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Loads the files again; see [`ServerTls::reload`].
    pub fn reload(&self) -> Result<(), Error> {
        let fresh = ClientSnapshot::load(&self.files, self.min, self.offer_legate, &self.pins)?;
        self.current.store(Arc::new(fresh));
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Changes with every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// When the current certificate expires (Unix seconds), if there is one.
    pub fn not_after(&self) -> Option<i64> {
        self.current.load().not_after
    }

    /// A server config presenting the current certificate, for the HTTPS status listener.
    pub fn status_config(&self) -> Option<Arc<ServerConfig>> {
        self.current.load().status.clone()
    }

    /// Runs the client handshake on `tcp`, checking the server's certificate against `name`
    /// (an endpoint's own name). The caller bounds it with a timeout.
    pub async fn connect(
        &self,
        tcp: Stream,
        name: ServerName<'static>,
    ) -> std::io::Result<ClientStream> {
        let config = self.current.load().config.clone();
        record::connect(config, name, tcp).await
    }
}

/// A name a server's certificate is checked against, or what is wrong with it.
pub fn server_name(name: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(name.to_string()).map_err(|_| {
        Error::Config(format!(
            "{name:?} is not a valid server name; set --override-server-name or ,name=NAME"
        ))
    })
}

/// The verified identity of the peer on an established connection.
pub fn peer_identity(session: &Session) -> Result<PeerIdentity, String> {
    let cert = session
        .peer_certificate()
        .ok_or("peer presented no certificate")?;
    PeerIdentity::from_der(cert)
}

/// What was negotiated, for the log: version, cipher suite, key exchange group, and whether
/// the handshake was full or resumed, e.g. `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519MLKEM768 full`.
pub fn describe_session(session: &Session) -> String {
    session.describe()
}

/// Whether the peer agreed to `legate/1`.
pub fn negotiated_legate(session: &Session) -> bool {
    session.alpn_protocol() == Some(LEGATE_ALPN)
}

/// Turns a handshake error into its most useful one-line form: what happened in words an
/// operator can act on, with rustls's own reason (such as "invalid peer certificate: Expired").
/// Whether a handshake failed because the server failed the `--verify-*` pins (an
/// authorization refusal rather than a broken handshake).
pub fn refused_by_pins(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(pin_refusal)
        .is_some()
}

fn pin_refusal(e: &rustls::Error) -> Option<&PinError> {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            other.0.downcast_ref::<PinError>()
        }
        _ => None,
    }
}

pub fn describe_handshake_error(e: &std::io::Error) -> String {
    use rustls::{Error as E, InvalidMessage, PeerIncompatible};
    let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) else {
        return if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "peer closed the connection during the handshake".to_string()
        } else {
            e.to_string()
        };
    };
    if let Some(pins) = pin_refusal(tls) {
        return pins.to_string();
    }
    let hint = match tls {
        E::PeerIncompatible(PeerIncompatible::SupportedVersionsExtensionRequired) => Some(
            "peer offered only TLS 1.2 or older; TLS 1.3 is required (--min-tls-version=1.2 allows 1.2)",
        ),
        E::InvalidMessage(InvalidMessage::InvalidContentType) => {
            Some("peer does not speak TLS (plaintext sent to the TLS port?)")
        }
        E::NoCertificatesPresented => Some("peer sent no client certificate; one is required"),
        _ => None,
    };
    match hint {
        Some(hint) => format!("{hint} ({tls})"),
        None => tls.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_ghostunnel_writes_them_and_make_a_range() {
        for (text, want) in [
            ("1.2", Version::Tls12),
            ("TLS1.2", Version::Tls12),
            ("tls1.3", Version::Tls13),
            (" TLS1.3 ", Version::Tls13),
        ] {
            assert_eq!(text.parse::<Version>(), Ok(want), "{text}");
        }
        assert!("TLS1.1".parse::<Version>().is_err());
        assert!("SSL3".parse::<Version>().is_err());
        use Version::*;
        assert_eq!(TlsVersions::new(None, None), Ok(TlsVersions::Tls13));
        assert_eq!(TlsVersions::new(Some(Tls12), None), Ok(TlsVersions::Tls12));
        assert_eq!(
            TlsVersions::new(Some(Tls12), Some(Tls13)),
            Ok(TlsVersions::Tls12)
        );
        assert_eq!(
            TlsVersions::new(None, Some(Tls12)),
            Ok(TlsVersions::Tls12Only)
        );
        assert_eq!(
            TlsVersions::new(Some(Tls12), Some(Tls12)),
            Ok(TlsVersions::Tls12Only)
        );
        assert!(TlsVersions::new(Some(Tls13), Some(Tls12)).is_err());
        assert_eq!(status_versions(TlsVersions::Tls13), TlsVersions::Tls12);
        assert_eq!(
            status_versions(TlsVersions::Tls12Only),
            TlsVersions::Tls12Only
        );
    }
}
