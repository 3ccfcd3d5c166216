//! Certificate issuing: a CA and the leaves it signs.
//!
//! In: names, identities, a key type and a validity window. Out: PEM certificates and PKCS#8
//! private keys. `legate gen-certs` and the integration tests issue through this one module, so
//! the tests exercise the certificates users get.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// What went wrong while issuing or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid name {0:?}: {1}")]
    Name(String, String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    #[error("{0}")]
    Invalid(String),
}

/// The key algorithm of a generated key pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA on P-256 with SHA-256: small, fast, and accepted everywhere.
    #[default]
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    /// Ed25519.
    #[value(name = "ed25519")]
    Ed25519,
    /// RSA 2048 with SHA-256, for peers that accept nothing else.
    #[value(name = "rsa2048")]
    Rsa2048,
}

impl KeyType {
    fn generate(self) -> Result<KeyPair, Error> {
        Ok(match self {
            KeyType::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
            KeyType::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?,
            KeyType::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)?
            }
        })
    }
}

/// A validity window.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From one hour ago (to absorb clock skew between hosts) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }

    /// A window that ended an hour ago: for testing that expired peers are refused.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now - Duration::days(2),
            not_after: now - Duration::hours(1),
        }
    }

    /// A window that starts tomorrow.
    pub fn not_yet_valid() -> Self {
        let now = OffsetDateTime::now_utc();
        Validity {
            not_before: now + Duration::days(1),
            not_after: now + Duration::days(30),
        }
    }
}

/// What a leaf certificate is for: its extended key usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// A client ambassador's: client authentication, and server authentication for its own
    /// HTTPS status port under its own name (`curl --cacert ca.crt --resolve
    /// client:PORT:127.0.0.1 https://client:PORT/_status`).
    ClientAndStatus,
}

/// The subject of a leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafSpec {
    pub common_name: String,
    pub organizational_unit: Option<String>,
    /// DNS names and IP addresses; each becomes a SAN of the matching type.
    pub names: Vec<String>,
    /// URI SANs, such as `spiffe://example.org/app`.
    pub uris: Vec<String>,
    pub usage: Usage,
    pub key_type: KeyType,
    pub validity: Validity,
}

impl LeafSpec {
    /// A leaf with the common name and nothing else, valid for a year.
    pub fn new(common_name: &str, usage: Usage) -> Self {
        LeafSpec {
            common_name: common_name.to_string(),
            organizational_unit: None,
            names: Vec::new(),
            uris: Vec::new(),
            usage,
            key_type: KeyType::default(),
            validity: Validity::days(365),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The certificate's serial number, to revoke it.
    pub serial: Vec<u8>,
}

/// A certificate authority that can sign leaves.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl Ca {
    /// A new self-signed CA.
    pub fn generate(common_name: &str, key_type: KeyType, validity: Validity) -> Result<Ca, Error> {
        let key = key_type.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its PEM certificate and PEM (PKCS#8) key, to issue more leaves.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Ca {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Signs a new leaf with a fresh key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Issued, Error> {
        let key = spec.key_type.generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&spec.common_name, spec.organizational_unit.as_deref());
        for name in &spec.names {
            params.subject_alt_names.push(san(name)?);
        }
        for uri in &spec.uris {
            let value = rcgen::string::Ia5String::try_from(uri.as_str())
                .map_err(|e| Error::Name(uri.clone(), e.to_string()))?;
            params.subject_alt_names.push(SanType::URI(value));
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        if spec.key_type == KeyType::Rsa2048 {
            params.key_usages.push(KeyUsagePurpose::KeyEncipherment);
        }
        params.extended_key_usages = match spec.usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::ClientAndStatus => vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
        };
        params.not_before = spec.validity.not_before;
        params.not_after = spec.validity.not_after;
        let serial = random_serial()?;
        params.serial_number = Some(serial.clone());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.to_bytes(),
        })
    }

    /// A CRL (PEM) listing `revoked` serial numbers, valid for a week; `number` must grow
    /// with each CRL this CA issues.
    pub fn crl(&self, revoked: &[Vec<u8>], number: u64) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

fn dn(common_name: &str, ou: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(ou) = ou {
        dn.push(DnType::OrganizationalUnitName, ou);
    }
    dn
}

fn san(name: &str) -> Result<SanType, Error> {
    if let Ok(ip) = IpAddr::from_str(name) {
        return Ok(SanType::IpAddress(ip));
    }
    let value = rcgen::string::Ia5String::try_from(name)
        .map_err(|e| Error::Name(name.to_string(), e.to_string()))?;
    Ok(SanType::DnsName(value))
}

fn random_bytes<const N: usize>() -> Result<[u8; N], Error> {
    let mut bytes = [0u8; N];
    // aws-lc's RNG: the one rustls uses too (taken from the provider directly, so that this
    // module stays below `tls`, whose tests issue certificates with it).
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Error::Invalid("the system random number generator failed".into()))?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_serial() -> Result<SerialNumber, Error> {
    let mut bytes = random_bytes::<16>()?;
    bytes[0] &= 0x7f; // positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// Writes `contents` to `path`: mode 0600 for keys, 0644 otherwise. An existing file is an
/// error unless `force`.
pub fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mode = if private { 0o600 } else { 0o644 };
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Error::Exists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    // An overwritten file keeps its old mode; a key must not stay readable by others.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

/// What `gen-certs` is asked to produce.
#[derive(Debug, Clone)]
pub struct GenRequest {
    pub out: PathBuf,
    pub server_names: Vec<String>,
    pub clients: Vec<String>,
    pub trust_domain: Option<String>,
    pub days: u32,
    pub key_type: KeyType,
    pub force: bool,
}

/// What `gen-certs` wrote.
#[derive(Debug, Clone, Default)]
pub struct GenReport {
    pub ca_reused: bool,
    pub ca_cert: PathBuf,
    pub server: Option<(PathBuf, PathBuf)>,
    pub clients: Vec<(String, PathBuf, PathBuf)>,
}

/// Issues what `request` asks for into `request.out`, reusing a CA already there. Every path
/// is checked before anything is written, so a refused run leaves the directory as it was.
pub fn generate(request: &GenRequest) -> Result<GenReport, Error> {
    let out = &request.out;
    for client in &request.clients {
        if client.is_empty()
            || !client
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || client.starts_with('.')
        {
            return Err(Error::Invalid(format!(
                "client name {client:?} must be letters, digits, '-', '_' or '.' (it names the files)"
            )));
        }
        if client == "ca" || client == "server" {
            return Err(Error::Invalid(format!(
                "client name {client:?} would overwrite the {client} files; choose another"
            )));
        }
    }
    if let Some(td) = &request.trust_domain
        && (td.is_empty() || td.contains('/') || td.contains(':'))
    {
        return Err(Error::Invalid(format!(
            "--trust-domain {td:?} must be a bare domain such as example.org"
        )));
    }
    if request.days == 0 {
        return Err(Error::Invalid("--days must be at least 1".into()));
    }
    fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.clone(),
        source,
    })?;

    let ca_cert = out.join("ca.crt");
    let ca_key = out.join("ca.key");
    let ca_reused = match (ca_cert.exists(), ca_key.exists()) {
        (true, true) => true,
        (false, false) => false,
        _ => {
            return Err(Error::Invalid(format!(
                "{} holds only one of ca.crt and ca.key; restore the other or remove both",
                out.display()
            )));
        }
    };
    let server_files = (out.join("server.crt"), out.join("server.key"));
    let client_files: Vec<_> = request
        .clients
        .iter()
        .map(|c| {
            (
                c.clone(),
                out.join(format!("{c}.crt")),
                out.join(format!("{c}.key")),
            )
        })
        .collect();
    if !request.force {
        let mut planned: Vec<&PathBuf> = Vec::new();
        if !request.server_names.is_empty() {
            planned.extend([&server_files.0, &server_files.1]);
        }
        for (_, crt, key) in &client_files {
            planned.extend([crt, key]);
        }
        if let Some(existing) = planned.into_iter().find(|p| p.exists()) {
            return Err(Error::Exists(existing.clone()));
        }
    }

    let ca = if ca_reused {
        let read = |path: &Path| {
            fs::read_to_string(path).map_err(|source| Error::Io {
                path: path.to_path_buf(),
                source,
            })
        };
        Ca::from_pem(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        // The CA outlives its leaves so that reissuing a leaf does not mean redistributing trust.
        // A unique name: verifiers find a certificate's issuer by name, and two CAs both named
        // "legate CA" would turn "unknown issuer" into a confusing "bad signature".
        let ca = Ca::generate(
            &format!("legate CA {}", hex(&random_bytes::<4>()?)),
            request.key_type,
            Validity::days(request.days.saturating_mul(2).max(3650)),
        )?;
        write_file(&ca_key, &ca.key_pem(), true, request.force)?;
        write_file(&ca_cert, ca.cert_pem(), false, request.force)?;
        ca
    };

    let mut report = GenReport {
        ca_reused,
        ca_cert,
        ..GenReport::default()
    };
    let spiffe = |name: &str| {
        request
            .trust_domain
            .as_ref()
            .map(|td| format!("spiffe://{td}/{name}"))
    };
    if let Some(first) = request.server_names.first() {
        let mut spec = LeafSpec::new(first, Usage::Server);
        spec.names = request.server_names.clone();
        spec.uris.extend(spiffe("server"));
        spec.key_type = request.key_type;
        spec.validity = Validity::days(request.days);
        let issued = ca.issue(&spec)?;
        write_file(&server_files.1, &issued.key_pem, true, request.force)?;
        write_file(&server_files.0, &issued.cert_pem, false, request.force)?;
        report.server = Some(server_files);
    }
    for (name, crt, key) in client_files {
        // Also serves the client side's HTTPS status port, under the client's own name only
        // (curl --resolve NAME:PORT:127.0.0.1): a host name such as localhost here would let
        // any client key holder pass as a server for it, and match --allow-dns rules.
        let mut spec = LeafSpec::new(&name, Usage::ClientAndStatus);
        spec.names = vec![name.clone()];
        spec.uris.extend(spiffe(&name));
        spec.key_type = request.key_type;
        spec.validity = Validity::days(request.days);
        let issued = ca.issue(&spec)?;
        write_file(&key, &issued.key_pem, true, request.force)?;
        write_file(&crt, &issued.cert_pem, false, request.force)?;
        report.clients.push((name, crt, key));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_names_become_ip_sans() {
        assert!(matches!(san("127.0.0.1").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(san("::1").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(
            san("redis.internal").unwrap(),
            SanType::DnsName(_)
        ));
    }

    #[test]
    fn reloaded_ca_signs_leaves() {
        let ca = Ca::generate("test", KeyType::EcdsaP256, Validity::days(1)).unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        let leaf = again.issue(&LeafSpec::new("x", Usage::Client)).unwrap();
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(leaf.key_pem.contains("PRIVATE KEY"));
    }

    #[test]
    fn every_key_type_issues() {
        for kt in [KeyType::EcdsaP256, KeyType::Ed25519, KeyType::Rsa2048] {
            let ca = Ca::generate("t", kt, Validity::days(1)).unwrap();
            let mut spec = LeafSpec::new("s", Usage::Server);
            spec.key_type = kt;
            ca.issue(&spec).unwrap();
        }
    }
}
