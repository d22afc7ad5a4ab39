//! Keys, CSRs, certificates and the private CA.
//!
//! All cryptography is OpenSSL's, through the `openssl` crate: nothing here
//! implements a primitive. Upstream issues RSA-4096 keys everywhere; the key
//! type is a parameter ([`KeyType`]) so that EC P-256, whose private-key
//! operations are ~30× cheaper on a router, can be chosen where both ends are
//! ours. Certificates we sign are X.509 v3 with explicit usages; certificates
//! made by the Perl system (v1, no extensions) are accepted everywhere.
//!
//! The CA's serial counter (`ca.serial`, OpenSSL `-CAserial` format: the last
//! serial used, in hex) is read, incremented and rewritten under an exclusive
//! lock, so concurrent signers never issue the same serial twice.

use std::fmt;
use std::path::{Path, PathBuf};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectKeyIdentifier,
};
use openssl::x509::{X509, X509NameBuilder, X509Req, X509ReqBuilder};

use crate::fsutil::{self, FileLock};

/// A failure in key or certificate handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaError(pub String);

impl fmt::Display for CaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CaError {}

impl From<openssl::error::ErrorStack> for CaError {
    fn from(e: openssl::error::ErrorStack) -> Self {
        CaError(format!("OpenSSL: {e}"))
    }
}

impl From<fsutil::FsError> for CaError {
    fn from(e: fsutil::FsError) -> Self {
        CaError(e.to_string())
    }
}

fn ctx<T>(r: Result<T, openssl::error::ErrorStack>, what: &str) -> Result<T, CaError> {
    r.map_err(|e| CaError(format!("{what}: {e}")))
}

/// Which kind of key to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// RSA with this many bits (upstream: 4096).
    Rsa(u32),
    /// EC on the P-256 curve.
    EcP256,
}

impl Default for KeyType {
    fn default() -> Self {
        KeyType::Rsa(4096)
    }
}

impl KeyType {
    /// Parse `rsa4096`, `rsa:3072`, `rsa2048`, `ec256`, `p256`, `ec`.
    pub fn parse(s: &str) -> Option<KeyType> {
        match s.trim().to_ascii_lowercase().replace([':', '-'], "").as_str() {
            "rsa" | "rsa4096" => Some(KeyType::Rsa(4096)),
            "rsa3072" => Some(KeyType::Rsa(3072)),
            "rsa2048" => Some(KeyType::Rsa(2048)),
            "ec" | "ec256" | "p256" | "ecp256" | "prime256v1" => Some(KeyType::EcP256),
            _ => None,
        }
    }

    /// Human name for progress messages.
    pub fn describe(&self) -> String {
        match self {
            KeyType::Rsa(b) => format!("RSA-{b}"),
            KeyType::EcP256 => "EC P-256".into(),
        }
    }

    /// Generate a fresh private key. RSA-4096 takes ~0.4 s on a PC and can
    /// take minutes on a router: callers on an executor must `unblock` this.
    pub fn generate(&self) -> Result<PKey<Private>, CaError> {
        Ok(match self {
            KeyType::Rsa(bits) => PKey::from_rsa(ctx(Rsa::generate(*bits), "RSA key generation")?)?,
            KeyType::EcP256 => {
                let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
                PKey::from_ec_key(ctx(EcKey::generate(&group), "EC key generation")?)?
            }
        })
    }
}

/// Private key as PKCS#8 PEM.
pub fn key_pem(key: &PKey<Private>) -> Result<Vec<u8>, CaError> {
    Ok(key.private_key_to_pem_pkcs8()?)
}

/// Load a PEM private key (PKCS#1 or PKCS#8, RSA or EC).
pub fn load_key(path: &Path) -> Result<PKey<Private>, CaError> {
    let pem = std::fs::read(path).map_err(|e| CaError(format!("cannot read key {}: {e}", path.display())))?;
    PKey::private_key_from_pem(&pem).map_err(|e| CaError(format!("{} is not a PEM private key: {e}", path.display())))
}

/// Load a PEM certificate.
pub fn load_cert(path: &Path) -> Result<X509, CaError> {
    let pem = std::fs::read(path).map_err(|e| CaError(format!("cannot read certificate {}: {e}", path.display())))?;
    X509::from_pem(&pem).map_err(|e| CaError(format!("{} is not a PEM certificate: {e}", path.display())))
}

fn name_cn(cn: &str) -> Result<openssl::x509::X509Name, CaError> {
    let mut b = X509NameBuilder::new()?;
    ctx(b.append_entry_by_nid(Nid::COMMONNAME, cn), "subject name")?;
    Ok(b.build())
}

fn validity(days: u32) -> Result<(Asn1Time, Asn1Time), CaError> {
    // Start an hour back: routers often boot with a clock that lags until NTP syncs.
    // Times go to OpenSSL as text, never as time_t: on 32-bit musl the Rust
    // and C sides disagree on time_t's width (32 vs 64 bits).
    let now = crate::time::unix_now();
    let asn1 = |t: i64| Asn1Time::from_str_x509(&crate::time::asn1_generalized(t));
    Ok((asn1(now - 3600)?, asn1(now + i64::from(days) * 86_400)?))
}

/// A self-signed v3 CA certificate.
pub fn create_ca(key: &PKey<Private>, cn: &str, days: u32) -> Result<X509, CaError> {
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = BigNum::from_u32(1)?.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    let name = name_cn(cn)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(&name)?;
    b.set_pubkey(key)?;
    let (nb, na) = validity(days)?;
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
    b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build()?)?;
    let skid = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(skid)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build())
}

/// A CSR for `key` with subject `CN=<cn>`.
pub fn make_csr(key: &PKey<Private>, cn: &str) -> Result<X509Req, CaError> {
    let mut b = X509ReqBuilder::new()?;
    let name = name_cn(cn)?;
    b.set_subject_name(&name)?;
    b.set_pubkey(key)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build())
}

unsafe extern "C" {
    // Not wrapped by the openssl crate; present in every OpenSSL 1.1+/3.x libcrypto.
    fn X509_REQ_get_signature_nid(req: *const std::ffi::c_void) -> std::ffi::c_int;
}

/// Largest CSR we look at (upstream: 10 KiB).
pub const MAX_CSR: usize = 10_240;

/// Validate a CSR before signing: size, PEM form, self-signature, key
/// strength, signature digest, and (for renewals) the expected CN.
pub fn check_csr(pem: &[u8], expected_cn: Option<&str>) -> Result<X509Req, CaError> {
    use foreign_types::ForeignTypeRef;
    if pem.len() > MAX_CSR {
        return Err(CaError(format!("CSR too large ({} bytes, limit {MAX_CSR})", pem.len())));
    }
    let text = std::str::from_utf8(pem).map_err(|_| CaError("CSR is not text".into()))?;
    if !text.trim_start().starts_with("-----BEGIN CERTIFICATE REQUEST-----") {
        return Err(CaError("CSR must be a PEM certificate request".into()));
    }
    let req = X509Req::from_pem(pem).map_err(|_| CaError("CSR cannot be parsed".into()))?;
    let pubkey: PKey<Public> = req.public_key().map_err(|_| CaError("CSR has no usable public key".into()))?;
    if !req.verify(&pubkey).unwrap_or(false) {
        return Err(CaError("CSR self-signature does not verify".into()));
    }
    match pubkey.id() {
        openssl::pkey::Id::RSA if pubkey.bits() < 2048 => {
            return Err(CaError(format!("CSR key too weak ({} bits, need at least 2048)", pubkey.bits())));
        }
        openssl::pkey::Id::RSA => {}
        openssl::pkey::Id::EC if pubkey.bits() >= 256 => {}
        _ => {
            return Err(CaError("CSR key must be RSA (≥ 2048 bits) or EC (≥ 256 bits)".into()));
        }
    }
    // SAFETY: req is a live X509_REQ; the function only reads it.
    let nid = Nid::from_raw(unsafe { X509_REQ_get_signature_nid(req.as_ref().as_ptr().cast()) });
    let weak = [
        Nid::MD2WITHRSAENCRYPTION,
        Nid::MD4WITHRSAENCRYPTION,
        Nid::MD5WITHRSAENCRYPTION,
        Nid::SHA1WITHRSAENCRYPTION,
        Nid::ECDSA_WITH_SHA1,
    ];
    if weak.contains(&nid) || nid == Nid::UNDEF {
        return Err(CaError(format!(
            "CSR signature algorithm not accepted ({})",
            nid.long_name().unwrap_or("unknown")
        )));
    }
    if let Some(want) = expected_cn {
        let cn = req_cn(&req).unwrap_or_default();
        if cn != want {
            return Err(CaError(format!("CSR common name '{cn}' does not match '{want}'")));
        }
    }
    Ok(req)
}

/// Common name of a CSR.
pub fn req_cn(req: &X509Req) -> Option<String> {
    req.subject_name().entries_by_nid(Nid::COMMONNAME).next()?.data().to_string().ok()
}

/// Common name of a certificate.
pub fn cert_cn(cert: &X509) -> Option<String> {
    cert.subject_name().entries_by_nid(Nid::COMMONNAME).next()?.data().to_string().ok()
}

/// Canonical serial of a certificate (see [`crate::wire::canonical_serial`]).
pub fn cert_serial(cert: &openssl::x509::X509Ref) -> String {
    cert.serial_number()
        .to_bn()
        .and_then(|bn| bn.to_hex_str().map(|s| s.to_string()))
        .ok()
        .and_then(|s| crate::wire::canonical_serial(&s))
        .unwrap_or_default()
}

/// notAfter as OpenSSL prints it (`Jun  7 16:28:00 2027 GMT`).
pub fn not_after(cert: &X509) -> String {
    cert.not_after().to_string()
}

/// Sign a leaf certificate for `pubkey` with subject `CN=<cn>`.
pub fn sign_leaf(
    ca_cert: &X509,
    ca_key: &PKey<Private>,
    pubkey: &openssl::pkey::PKeyRef<Public>,
    cn: &str,
    serial: &BigNum,
    days: u32,
) -> Result<X509, CaError> {
    let mut b = X509::builder()?;
    b.set_version(2)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    let name = name_cn(cn)?;
    b.set_subject_name(&name)?;
    b.set_issuer_name(ca_cert.subject_name())?;
    b.set_pubkey(pubkey)?;
    let (nb, na) = validity(days)?;
    b.set_not_before(&nb)?;
    b.set_not_after(&na)?;
    b.append_extension(BasicConstraints::new().build()?)?;
    b.append_extension(KeyUsage::new().critical().digital_signature().key_encipherment().build()?)?;
    b.append_extension(ExtendedKeyUsage::new().server_auth().client_auth().build()?)?;
    let skid = SubjectKeyIdentifier::new().build(&b.x509v3_context(Some(ca_cert), None))?;
    b.append_extension(skid)?;
    let akid = AuthorityKeyIdentifier::new().keyid(false).build(&b.x509v3_context(Some(ca_cert), None))?;
    b.append_extension(akid)?;
    b.sign(ca_key, MessageDigest::sha256())?;
    Ok(b.build())
}

/// The 6-digit pairing code: SHA-256 over the CSR PEM bytes, first four
/// bytes big-endian, modulo 1 000 000, zero-padded.
pub fn pairing_code(csr_pem: &[u8]) -> String {
    let d = openssl::sha::sha256(csr_pem);
    format!("{:06}", u32::from_be_bytes([d[0], d[1], d[2], d[3]]) % 1_000_000)
}

/// Does `cert` verify against exactly this CA certificate?
pub fn verifies_against(cert: &X509, ca: &X509) -> bool {
    match ca.public_key() {
        Ok(k) => cert.verify(&k).unwrap_or(false) && cert.issuer_name_hash() == ca.subject_name_hash(),
        Err(_) => false,
    }
}

/// The dispatcher's CA: certificate, key and serial counter on disk.
#[derive(Debug, Clone)]
pub struct CaFiles {
    /// CA certificate (`ca` in ctrl-exec.conf).
    pub cert: PathBuf,
    /// CA private key (`<ca_dir>/ca.key`).
    pub key: PathBuf,
    /// Serial counter (`<ca_dir>/ca.serial`).
    pub serial: PathBuf,
    /// Lock serialising all signing.
    pub lock: PathBuf,
}

impl CaFiles {
    /// The CA files for a `ca` certificate path and a `ca_dir`.
    pub fn new(cert: &Path, ca_dir: &Path) -> CaFiles {
        CaFiles {
            cert: cert.to_path_buf(),
            key: ca_dir.join("ca.key"),
            serial: ca_dir.join("ca.serial"),
            lock: ca_dir.join(".ca.lock"),
        }
    }

    /// Refuse early if a CA key or certificate is already there.
    pub fn check_absent(&self) -> Result<(), CaError> {
        for p in [&self.key, &self.cert] {
            if p.exists() {
                return Err(CaError(format!(
                    "{} already exists: refusing to overwrite an existing CA (every agent trusts it; remove it by hand only if you mean to re-pair every agent)",
                    p.display()
                )));
            }
        }
        Ok(())
    }

    /// Create the CA. Refuses if a CA key or certificate is already there.
    pub fn create(&self, key_type: KeyType, days: u32) -> Result<X509, CaError> {
        self.check_absent()?;
        if let Some(d) = self.key.parent() {
            fsutil::ensure_dir(d, 0o750)?;
        }
        if let Some(d) = self.cert.parent() {
            fsutil::ensure_dir(d, 0o755)?;
        }
        let key = key_type.generate()?;
        let cert = create_ca(&key, "ctrl-exec CA", days)?;
        fsutil::atomic_write(&self.key, &key_pem(&key)?, 0o600)?;
        fsutil::atomic_write(&self.serial, b"01\n", 0o600)?;
        fsutil::atomic_write(&self.cert, &cert.to_pem()?, 0o644)?;
        Ok(cert)
    }

    /// Load certificate and key.
    pub fn load(&self) -> Result<(X509, PKey<Private>), CaError> {
        if !self.key.exists() {
            return Err(CaError(format!(
                "no CA key at {} (run 'ctrl-exec setup-ca' first, or set ca_dir in the config)",
                self.key.display()
            )));
        }
        Ok((load_cert(&self.cert)?, load_key(&self.key)?))
    }

    /// Sign `pubkey` as `CN=<cn>` with the next serial, under the signing lock.
    pub fn issue(&self, pubkey: &openssl::pkey::PKeyRef<Public>, cn: &str, days: u32) -> Result<X509, CaError> {
        let (ca_cert, ca_key) = self.load()?;
        let _lock = FileLock::exclusive(&self.lock)?;
        let last = match std::fs::read_to_string(&self.serial) {
            Ok(s) => BigNum::from_hex_str(s.trim())
                .map_err(|_| CaError(format!("{} does not hold a hex serial", self.serial.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BigNum::from_u32(1)?,
            Err(e) => {
                return Err(CaError(format!("cannot read {}: {e}", self.serial.display())));
            }
        };
        let mut next = BigNum::new()?;
        next.checked_add(&last, BigNum::from_u32(1)?.as_ref())?;
        let cert = sign_leaf(&ca_cert, &ca_key, pubkey, cn, &next, days)?;
        let mut hex = next.to_hex_str()?.to_string();
        if hex.len() % 2 == 1 {
            hex.insert(0, '0');
        }
        fsutil::atomic_write(&self.serial, format!("{hex}\n").as_bytes(), 0o600)?;
        Ok(cert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_types_parse() {
        assert_eq!(KeyType::parse("rsa:4096"), Some(KeyType::Rsa(4096)));
        assert_eq!(KeyType::parse("RSA2048"), Some(KeyType::Rsa(2048)));
        assert_eq!(KeyType::parse("ec-p256"), Some(KeyType::EcP256));
        assert_eq!(KeyType::parse("dsa"), None);
    }

    #[test]
    fn issue_chain_and_csr_checks() {
        let d = tempfile::tempdir().unwrap();
        let files = CaFiles::new(&d.path().join("ca.crt"), d.path());
        let ca = files.create(KeyType::EcP256, 30).unwrap();
        assert!(files.create(KeyType::EcP256, 30).is_err(), "must refuse to overwrite");
        let key = KeyType::EcP256.generate().unwrap();
        let pk = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
        let a = files.issue(&pk, "agent1", 10).unwrap();
        let b = files.issue(&pk, "agent2", 10).unwrap();
        assert_eq!(cert_serial(&a), "2");
        assert_eq!(cert_serial(&b), "3");
        assert!(verifies_against(&a, &ca));
        assert_eq!(cert_cn(&b).as_deref(), Some("agent2"));
        assert_eq!(std::fs::read_to_string(&files.serial).unwrap(), "03\n");

        let csr = make_csr(&key, "agent1").unwrap().to_pem().unwrap();
        assert!(check_csr(&csr, Some("agent1")).is_ok());
        assert!(check_csr(&csr, Some("other")).is_err());
        assert!(check_csr(b"garbage", None).is_err());
        assert!(check_csr(&vec![b'a'; MAX_CSR + 1], None).is_err());
    }

    #[test]
    fn pairing_code_vector() {
        // Any input gives six digits; the golden vectors are checked in tests/.
        let c = pairing_code(b"x");
        assert_eq!(c.len(), 6);
        assert!(c.bytes().all(|b| b.is_ascii_digit()));
    }
}
