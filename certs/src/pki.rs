//! The PKI directory: the CA, the broker's certificate and one certificate per
//! identity.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use cityplane_proto::messages::Attributes;
use cityplane_proto::{validate_id, validate_org, Role, ADMIN_ORG};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, PublicKeyData, RevokedCertParams, SanType,
    SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};
use x509_parser::pem::parse_x509_pem;

use crate::fsutil::{self, KEY_MODE, PUBLIC_MODE, TMP_PREFIX};
use crate::issued::{IssuedIndex, IssuedRecord};
use crate::peer::{parse_identity, rfc3339, ParsedIdentity};
use crate::revocation::{RevocationFile, RevokedEntry, RevokedRecord};
use crate::serial::{parse_serial, random_serial, serial_hex, to_hex, SERIAL_LEN};
use crate::CertError;

pub const CA_CERT_FILE: &str = "ca.crt";
pub const CA_KEY_FILE: &str = "ca.key";
pub const SERVER_CERT_FILE: &str = "broker.crt";
pub const SERVER_KEY_FILE: &str = "broker.key";
pub const REVOCATION_FILE: &str = "revoked.json";
pub const CRL_FILE: &str = "crl.pem";
/// Every serial this CA signed (see `issued.rs`). Stays in the CA directory.
pub const ISSUED_FILE: &str = "issued.jsonl";
/// Held (`flock`) by every operation that reads the CA's files and writes
/// them again: two writers of `revoked.json` at once (a controller revoking
/// rotated serials, an operator's `certs revoke`, several controllers on
/// one directory) would otherwise each write their own read back, and one
/// revocation would be lost.
pub const LOCK_FILE: &str = ".pki.lock";

/// What a server directory ([`Pki::export_server`]) holds: enough to verify
/// clients and prove the broker's identity, nothing that can sign.
pub const SERVER_FILES: [&str; 5] = [
    CA_CERT_FILE,
    SERVER_CERT_FILE,
    SERVER_KEY_FILE,
    REVOCATION_FILE,
    CRL_FILE,
];

/// Identities that would collide with the PKI's own files.
pub const RESERVED_IDS: [&str; 2] = ["ca", "broker"];

/// Lifetime of the CA and of the broker's certificate: 10 years.
pub const CA_VALIDITY_DAYS: u32 = 3650;
/// A CRL's `nextUpdate` is this far after its `thisUpdate`. Relying parties
/// (mosquitto's `crlfile`) refuse every client once it has passed, so the
/// CRL must be re-signed within this period (`cityplane certs crl`); a short
/// period bounds how long a stale copy of the CRL can be replayed.
pub const CRL_VALIDITY_DAYS: u32 = 30;
/// RFC 5280: serial numbers are at most 20 octets.
const MAX_SERIAL_OCTETS: usize = 20;
/// The longest overlap [`Pki::rotate_overlapping`] accepts: during it a
/// stolen old certificate works too.
pub const MAX_OVERLAP_DAYS: u32 = 30;
/// Default lifetime of identity certificates.
pub const DEFAULT_VALIDITY_DAYS: u32 = 365;
/// Certificates start this long in the past to tolerate clock skew.
pub const BACKDATE: Duration = Duration::hours(1);

/// Threads per core [`Pki::issue_bulk`] runs (mostly waiting on fsync), and their cap.
const BULK_WRITERS_PER_CORE: usize = 16;
const BULK_MAX_WRITERS: usize = 64;

const CA_COMMON_NAME: &str = "cityplane CA";
pub(crate) const ORGANIZATION: &str = "cityplane";
pub(crate) const SERVER_NAME: &str = "broker";

/// One certificate as `list` and `issue` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    pub id: String,
    pub role: Role,
    /// Canonical serial: lowercase hex, no colons, no leading zero bytes.
    pub serial: String,
    /// RFC 3339 (UTC). Empty when unknown: a revoked certificate whose file was
    /// replaced and whose `revoked.json` entry was written by hand.
    pub not_after: String,
    pub revoked: bool,
    /// `DIR/<id>.crt` for the identity's current certificate. Empty for a
    /// revoked certificate whose file has since been replaced by a newer one,
    /// and for a valid certificate whose file is gone.
    pub cert_path: PathBuf,
    /// An operator's organisation (the subject's O). `None` for devices and
    /// controllers, and for a revoked certificate known only from
    /// `revoked.json`.
    #[serde(default)]
    pub org: Option<String>,
    /// RFC 3339 (UTC), set when `revoked` is a revocation recorded for a
    /// later instant (a rotation's overlap): the certificate works until then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_from: Option<String>,
}

/// Validity and usage of a certificate to issue (see [`Pki::issue_with`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// `true`: EKU clientAuth (a normal identity). `false`: EKU serverAuth
    /// only, a certificate with the wrong key usage, for tests.
    pub client_auth: bool,
    /// An operator's organisation, written as the subject's O. `None` for an
    /// operator means [`ADMIN_ORG`]: library callers that issue operators
    /// without saying (tests, benchmarks, the demo) get the city's own
    /// administrators, as before organisations existed; the CLI always
    /// says. Refused for devices and controllers
    /// ([`CertError::OrgNotForRole`]).
    pub org: Option<String>,
}

impl IssueOptions {
    /// Valid from one hour ago (clock skew) until `days` days from now.
    pub fn valid_for_days(days: u32) -> IssueOptions {
        let now = now();
        IssueOptions {
            not_before: now - BACKDATE,
            not_after: now + Duration::days(i64::from(days)),
            client_auth: true,
            org: None,
        }
    }
}

impl Default for IssueOptions {
    /// [`DEFAULT_VALIDITY_DAYS`], clientAuth.
    fn default() -> Self {
        IssueOptions::valid_for_days(DEFAULT_VALIDITY_DAYS)
    }
}

/// What [`Pki::issue_bulk`] did. Both lists are sorted by id; together they
/// hold one certificate per requested id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkIssued {
    /// Certificates created by this call (new ids, and ids whose previous
    /// certificate was revoked).
    pub issued: Vec<CertInfo>,
    /// Ids that already had a valid (not revoked) certificate: left untouched.
    pub skipped: Vec<CertInfo>,
}

impl BulkIssued {
    /// Every requested id's current certificate, sorted by id.
    pub fn into_all(self) -> Vec<CertInfo> {
        let mut all = self.issued;
        all.extend(self.skipped);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// What [`Pki::rotate_reporting`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The new certificate.
    pub cert: CertInfo,
    /// The serials it replaced, now revoked, or from their `effective_at`
    /// (empty if the id had no valid certificate).
    pub revoked: Vec<RevokedEntry>,
}

/// What [`Pki::sign_device_csr`] signed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCsr {
    /// As `list` will show it (its `cert_path` is empty: no file is written).
    pub cert: CertInfo,
    /// The certificate, PEM: what the device is sent.
    pub pem: String,
}

/// A freshly signed CRL (see [`Pki::refresh_crl`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlInfo {
    pub path: PathBuf,
    /// Distinct revoked serials it lists.
    pub revoked: usize,
    /// RFC 3339 (UTC): re-sign before this.
    pub next_update: String,
    /// RFC 3339 (UTC): the next instant a recorded revocation takes effect.
    /// The CRL does not list it yet: re-sign after it.
    pub pending_until: Option<String>,
}

/// A PKI directory. Cheap to create: it holds only the path and the validity
/// of certificates it issues; files are read when needed.
///
/// One writer at a time: two processes issuing or revoking in the same
/// directory concurrently can lose a `revoked.json` update.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    validity_days: u32,
    /// Recorded with every device certificate this handle issues.
    attributes: Attributes,
    /// The organisation of operators this handle issues (see [`Pki::with_org`]).
    org: Option<String>,
}

/// The loaded CA: its signing key and what certificates it signs inherit.
pub(crate) struct Ca {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    pub(crate) not_after: OffsetDateTime,
}

/// What `init` names the broker's certificate for.
pub(crate) fn default_server_names() -> Result<Vec<SanType>, CertError> {
    Ok(vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    ])
}

pub(crate) fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    // X.509 times have whole seconds; keep ours equal to what we write.
    now.replace_nanosecond(0).unwrap_or(now)
}

impl Pki {
    /// Creates a new CA, the broker's certificate, an empty `revoked.json` and
    /// an empty CRL in `dir` (created with mode 0700 if missing).
    ///
    /// Refuses with [`CertError::AlreadyInitialized`] if `ca.crt` or `ca.key`
    /// exists, unless `force`: then the CA is replaced, the revocation list
    /// emptied, and every identity certificate and key in `dir` (all signed by
    /// the old CA, so useless now) removed.
    ///
    /// Refuses with [`CertError::InsecureDir`] a directory that other users
    /// can write to (it is not made private behind the operator's back: whoever
    /// could write there may already have planted something).
    pub fn init(dir: &Path, force: bool) -> Result<Pki, CertError> {
        fsutil::create_dir(dir)?;
        fsutil::check_private_dir(dir)?;
        let pki = Pki::at(dir);
        let ca_exists = pki.ca_cert_path().exists() || pki.ca_key_path().exists();
        if ca_exists && !force {
            return Err(CertError::AlreadyInitialized {
                dir: dir.to_owned(),
            });
        }

        // Everything is built in memory first; nothing is written if any step fails.
        let now = now();
        let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut ca_params = CertificateParams::default();
        ca_params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
        ca_params.not_before = now - BACKDATE;
        ca_params.not_after = now + Duration::days(i64::from(CA_VALIDITY_DAYS));
        ca_params.distinguished_name = dn(&[
            (DnType::OrganizationName, ORGANIZATION),
            (DnType::CommonName, CA_COMMON_NAME),
        ]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca_key_pem = ca_key.serialize_pem();
        let ca = Ca {
            not_after: ca_params.not_after,
            issuer: Issuer::new(ca_params, ca_key),
        };

        let (server_key, server_cert) = crate::server_cert::sign(&ca, &default_server_names()?)?;

        let revocations = RevocationFile::empty();
        let crl = build_crl(&ca, &revocations)?;

        if force {
            pki.remove_identity_files()?;
        }
        // The CA goes last: a crash before it leaves a directory `init` accepts
        // without --force.
        let d = pki.dir();
        fsutil::write_atomic(
            d,
            SERVER_KEY_FILE,
            server_key.serialize_pem().as_bytes(),
            KEY_MODE,
            true,
        )?;
        fsutil::write_atomic(
            d,
            SERVER_CERT_FILE,
            server_cert.pem().as_bytes(),
            PUBLIC_MODE,
            true,
        )?;
        fsutil::write_atomic(
            d,
            REVOCATION_FILE,
            &revocations.to_json()?,
            PUBLIC_MODE,
            true,
        )?;
        fsutil::write_atomic(d, CRL_FILE, crl.pem.as_bytes(), PUBLIC_MODE, true)?;
        fsutil::write_atomic(d, CA_KEY_FILE, ca_key_pem.as_bytes(), KEY_MODE, true)?;
        fsutil::write_atomic(d, CA_CERT_FILE, ca_cert.pem().as_bytes(), PUBLIC_MODE, true)?;
        tracing::info!(dir = %dir.display(), force, "initialised PKI");
        Ok(pki)
    }

    /// Opens an initialised PKI directory. Needs `ca.crt` and `revoked.json`;
    /// `ca.key` is only needed (and checked) when issuing or revoking, so a
    /// host that only verifies (the broker) need not hold the CA key.
    pub fn open(dir: &Path) -> Result<Pki, CertError> {
        let pki = Pki::at(dir);
        for (path, missing) in [
            (pki.ca_cert_path(), CA_CERT_FILE),
            (pki.revocation_path(), REVOCATION_FILE),
        ] {
            if !path.is_file() {
                return Err(CertError::NotInitialized {
                    dir: dir.to_owned(),
                    missing,
                });
            }
        }
        Ok(pki)
    }

    fn at(dir: &Path) -> Pki {
        Pki {
            dir: dir.to_owned(),
            validity_days: DEFAULT_VALIDITY_DAYS,
            attributes: Attributes::default(),
            org: None,
        }
    }

    /// Makes [`issue`](Self::issue), [`rotate`](Self::rotate) and
    /// [`issue_bulk`](Self::issue_bulk) issue certificates valid for `days`
    /// days (default [`DEFAULT_VALIDITY_DAYS`]). Refuses 0.
    /// Device certificates issued through this handle carry these registry
    /// attributes in `issued.jsonl` (see [`crate::registry`]).
    pub fn with_attributes(mut self, attributes: Attributes) -> Pki {
        self.attributes = attributes;
        self
    }

    /// Makes [`issue`](Self::issue), [`rotate`](Self::rotate) and
    /// [`issue_bulk`](Self::issue_bulk) issue operators of `org` (written
    /// as the certificate subject's O). Without it they issue operators of
    /// [`ADMIN_ORG`] (see [`IssueOptions::org`]); issuing a device or a
    /// controller through a handle with an organisation is refused.
    pub fn with_org(mut self, org: &str) -> Result<Pki, CertError> {
        validate_org(org).map_err(CertError::InvalidOrg)?;
        self.org = Some(org.to_owned());
        Ok(self)
    }

    /// The [`IssueOptions`] of `issue`, `rotate` and `issue_bulk`.
    fn issue_options(&self) -> IssueOptions {
        IssueOptions {
            org: self.org.clone(),
            ..IssueOptions::valid_for_days(self.validity_days)
        }
    }

    pub fn with_validity_days(mut self, days: u32) -> Result<Pki, CertError> {
        if days == 0 {
            return Err(CertError::InvalidValidity(
                "a certificate must be valid for at least 1 day".into(),
            ));
        }
        self.validity_days = days;
        Ok(self)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }
    pub fn server_cert_path(&self) -> PathBuf {
        self.dir.join(SERVER_CERT_FILE)
    }
    pub fn server_key_path(&self) -> PathBuf {
        self.dir.join(SERVER_KEY_FILE)
    }
    /// `DIR/<id>.crt`. Does not validate `id`.
    pub fn cert_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.crt"))
    }
    /// `DIR/<id>.key`. Does not validate `id`.
    pub fn key_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.key"))
    }
    pub fn revocation_path(&self) -> PathBuf {
        self.dir.join(REVOCATION_FILE)
    }
    pub fn crl_path(&self) -> PathBuf {
        self.dir.join(CRL_FILE)
    }

    /// Issues the first certificate of `id`.
    ///
    /// Fails with [`CertError::AlreadyIssued`] if `id` has a certificate that
    /// is neither revoked nor expired, in `DIR/<id>.crt` or only in the
    /// issuance record (its file deleted: it may still be in use somewhere);
    /// use [`rotate`](Self::rotate). If every certificate of `id` is revoked,
    /// issues a new one with a new serial.
    pub fn issue(&self, role: Role, id: &str) -> Result<CertInfo, CertError> {
        Ok(self.issue_checked(role, id, false, None)?.cert)
    }

    /// Issues a new certificate (new key, new serial) for `id` and revokes
    /// every valid one it has, whether its file is still there or not. The
    /// role may change. Without any valid certificate this is the same as
    /// [`issue`](Self::issue).
    ///
    /// The old serials are revoked durably before the new files replace the
    /// old ones: a crash in between leaves a revoked certificate that `issue`
    /// replaces.
    pub fn rotate(&self, role: Role, id: &str) -> Result<CertInfo, CertError> {
        Ok(self.issue_checked(role, id, true, None)?.cert)
    }

    /// [`rotate`](Self::rotate), also saying which serials it revoked.
    pub fn rotate_reporting(&self, role: Role, id: &str) -> Result<Rotated, CertError> {
        self.issue_checked(role, id, true, None)
    }

    /// Rotates `id` with the role and organisation of its current
    /// certificate; the old serials are recorded as revoked from `now +
    /// overlap`, so whoever holds them keeps working while the new files are
    /// deployed. An overlap of zero revokes at once, as [`rotate`](Self::rotate).
    ///
    /// [`CertError::NothingToRotate`] if `id` has no valid certificate;
    /// [`CertError::InvalidOverlap`] for a negative overlap or one over
    /// [`MAX_OVERLAP_DAYS`].
    pub fn rotate_overlapping(&self, id: &str, overlap: Duration) -> Result<Rotated, CertError> {
        check_id(id)?;
        if overlap.is_negative() || overlap > Duration::days(i64::from(MAX_OVERLAP_DAYS)) {
            return Err(CertError::InvalidOverlap(format!(
                "{overlap} is not between 0 and {MAX_OVERLAP_DAYS} days"
            )));
        }
        let live = self.live_certs(id, &self.load_revocations()?, &self.load_index()?)?;
        let Some(cur) = live.first() else {
            return Err(CertError::NothingToRotate {
                id: id.to_owned(),
                dir: self.dir.clone(),
            });
        };
        let pki = match (cur.role, &cur.org) {
            (Role::Operator, Some(org)) => self.clone().with_org(org)?,
            // Defaulting would make a contractor's operator one of the city's.
            (Role::Operator, None) => {
                return Err(CertError::bad_file(
                    self.dir.join(ISSUED_FILE),
                    format!("no organisation recorded for operator {id}: rotate it with `certs issue --rotate --org`"),
                ))
            }
            (_, _) => Pki {
                org: None,
                ..self.clone()
            },
        };
        let effective_at = (overlap > Duration::ZERO).then(|| now() + overlap);
        pki.issue_checked(cur.role, id, true, effective_at)
    }

    fn issue_checked(
        &self,
        role: Role,
        id: &str,
        rotate: bool,
        effective_at: Option<OffsetDateTime>,
    ) -> Result<Rotated, CertError> {
        check_id(id)?;
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let mut revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let live = self.live_certs(id, &revocations, &index)?;
        if let (Some(cur), false) = (live.first(), rotate) {
            // A certificate issued before the record existed gets one now, so
            // it stays revocable if its file is later lost.
            self.backfill(&index, &live)?;
            return Err(CertError::AlreadyIssued {
                id: cur.id.clone(),
                serial: cur.serial.clone(),
                not_after: cur.not_after.clone(),
                path: cur.cert_path.clone(),
            });
        }
        // Build before revoking, so a failure here leaves everything as it was.
        let opts = self.issue_options();
        let new = self.generate(&ca, role, id, &opts, &random_serial()?)?;
        let revoked = self.append_revocations(&ca, &mut revocations, &live, effective_at)?;
        for old in &revoked {
            tracing::info!(%id, serial = %old.serial, "rotation revoked the old certificate");
        }
        // The record is durable before the certificate exists anywhere.
        self.record_issued(std::slice::from_ref(&new.info))?;
        self.write(&new, true)?;
        tracing::info!(%id, %role, serial = %new.info.serial, "issued certificate");
        Ok(Rotated {
            cert: new.info,
            revoked,
        })
    }

    /// Issues a certificate with explicit validity and usage, replacing any
    /// certificate `id` has without revoking it. Low level, for tests that
    /// need expired, not-yet-valid or wrong-usage certificates; validates `id`
    /// but does not check [`CertError::AlreadyIssued`].
    pub fn issue_with(
        &self,
        role: Role,
        id: &str,
        opts: &IssueOptions,
    ) -> Result<CertInfo, CertError> {
        check_id(id)?;
        let ca = self.load_ca()?;
        let revocations = self.load_revocations()?;
        let mut new = self.generate(&ca, role, id, opts, &random_serial()?)?;
        new.info.revoked = revocations.find(&new.info.serial).is_some();
        self.record_issued(std::slice::from_ref(&new.info))?;
        self.write(&new, true)?;
        Ok(new.info)
    }

    /// Issues certificates for `{prefix}0001` … `{prefix}{count:04}` (ids grow
    /// past 4 digits when `count` > 9999).
    ///
    /// All ids are validated before anything is written. Ids that already have
    /// a valid (not revoked) certificate file are skipped and keep it; ids
    /// whose certificate is revoked get a new one. An id with a valid
    /// certificate in the issuance record but no file refuses the whole call
    /// ([`CertError::LiveWithoutFile`]) before anything is written. Work runs
    /// on up to 64 threads (signing on every core, many fsyncs in flight).
    /// `on_progress(done)` is called on the calling thread with the number of
    /// ids handled so far (skipped ones count at once), ending with `count`.
    ///
    /// Every file is written atomically; the directory is flushed and the new
    /// serials recorded (one append) at the end, also when a certificate
    /// failed. On error, certificates already written stay (they are valid),
    /// and running again skips them; a crash before the record leaves files
    /// without records, which the next bulk run records.
    pub fn issue_bulk(
        &self,
        role: Role,
        prefix: &str,
        count: usize,
        mut on_progress: impl FnMut(usize),
    ) -> Result<BulkIssued, CertError> {
        let ids: Vec<String> = (1..=count).map(|n| format!("{prefix}{n:04}")).collect();
        for id in &ids {
            check_id(id)?;
        }
        subject_org(role, self.org.as_deref())?;
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let opts = self.issue_options();

        let mut skipped = Vec::new();
        let mut pending = Vec::new();
        let mut orphans = Vec::new();
        for id in ids {
            match self.read_current(&id, &revocations)? {
                Some(cur) if !cur.revoked => skipped.push(cur),
                _ if self
                    .live_in_index(&id, &revocations, &index)
                    .next()
                    .is_some() =>
                {
                    orphans.push(id)
                }
                _ => pending.push(id),
            }
        }
        if !orphans.is_empty() {
            const SHOWN: usize = 10;
            let mut ids = orphans[..orphans.len().min(SHOWN)].join(", ");
            if orphans.len() > SHOWN {
                ids += ", …";
            }
            return Err(CertError::LiveWithoutFile {
                count: orphans.len(),
                ids,
            });
        }
        self.backfill(&index, &skipped)?;
        on_progress(skipped.len());

        let mut issued = Vec::with_capacity(pending.len());
        let mut first_error = None;
        if !pending.is_empty() {
            // Signing is cheap (~0.1 ms); waiting for fsync is not. Many
            // writers in flight let the filesystem commit their fsyncs
            // together, which is what makes 10,000 certificates fast.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let workers = (cores * BULK_WRITERS_PER_CORE)
                .clamp(1, BULK_MAX_WRITERS)
                .min(pending.len());
            let next = AtomicUsize::new(0);
            let stop = AtomicBool::new(false);
            let (tx, rx) = mpsc::channel::<Result<CertInfo, CertError>>();
            std::thread::scope(|s| {
                for _ in 0..workers {
                    let tx = tx.clone();
                    let (next, stop, pending, ca, opts) = (&next, &stop, &pending, &ca, &opts);
                    s.spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            let Some(id) = pending.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                break;
                            };
                            let result = random_serial()
                                .and_then(|serial| self.generate(ca, role, id, opts, &serial))
                                .and_then(|new| self.write(&new, false).map(|()| new.info));
                            let failed = result.is_err();
                            if tx.send(result).is_err() || failed {
                                stop.store(true, Ordering::Relaxed);
                                break;
                            }
                        }
                    });
                }
                drop(tx);
                for result in rx {
                    match result {
                        Ok(info) => {
                            issued.push(info);
                            on_progress(skipped.len() + issued.len());
                        }
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error.get_or_insert(e);
                        }
                    }
                }
            });
        }
        // One fsync for ten thousand records instead of one each; until it
        // is done the files themselves are the record (still in the
        // directory, so still revocable by id).
        fsutil::sync_dir(&self.dir)?;
        self.record_issued(&issued)?;
        if let Some(e) = first_error {
            return Err(e);
        }
        issued.sort_by(|a, b| a.id.cmp(&b.id));
        tracing::info!(%role, issued = issued.len(), skipped = skipped.len(), "bulk issue done");
        Ok(BulkIssued { issued, skipped })
    }

    /// Revokes by id (every valid certificate of the id) or by serial (hex,
    /// any case, colons allowed). An input that names an id with a
    /// certificate file or an issuance record is taken as an id, anything
    /// else that is hex as a serial.
    pub fn revoke(&self, id_or_serial: &str) -> Result<RevokedEntry, CertError> {
        let is_id = validate_id(id_or_serial).is_ok();
        let known_id = is_id
            && (self.cert_path(id_or_serial).exists()
                || self.load_index()?.for_id(id_or_serial).next().is_some());
        if known_id {
            self.revoke_id(id_or_serial)
        } else if parse_serial(id_or_serial).is_some() {
            self.revoke_serial(id_or_serial)
        } else if is_id {
            self.revoke_id(id_or_serial)
        } else {
            Err(CertError::NotFound {
                what: format!("id or serial {id_or_serial:?}"),
                dir: self.dir.clone(),
            })
        }
    }

    /// [`revoke_id_all`](Self::revoke_id_all), returning the newest entry.
    pub fn revoke_id(&self, id: &str) -> Result<RevokedEntry, CertError> {
        let mut all = self.revoke_id_all(id)?;
        all.pop().ok_or_else(|| CertError::NotFound {
            what: format!("id {id:?}"),
            dir: self.dir.clone(),
        })
    }

    /// Revokes every valid certificate of `id`: the one in `DIR/<id>.crt`
    /// and any unexpired one in the issuance record whose file is gone.
    ///
    /// [`CertError::AlreadyRevoked`] when all of them already are (the CRL is
    /// re-signed first, so re-running after a crash completes the job);
    /// [`CertError::NotFound`] when the id never had a certificate here.
    pub fn revoke_id_all(&self, id: &str) -> Result<Vec<RevokedEntry>, CertError> {
        check_id(id)?;
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let mut revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let live = self.live_certs(id, &revocations, &index)?;
        // A rotation's old certificate, still in its overlap: revoking the
        // id means now for it too (it may be the one that was stolen).
        let now = now();
        let hasten: Vec<RevokedRecord> = revocations
            .pending_for_id(id, now)
            .into_iter()
            .map(|r| r.in_effect_from(now))
            .collect();
        let mut hastened = self.append_records(&ca, &mut revocations, hasten)?;
        if live.is_empty() && !hastened.is_empty() {
            return Ok(hastened);
        }
        if live.is_empty() {
            let last_revoked = index
                .for_id(id)
                .map(|r| r.serial.clone())
                .chain(self.read_current(id, &revocations)?.map(|c| c.serial))
                .filter(|s| revocations.find(s).is_some())
                .last();
            return Err(match last_revoked {
                Some(serial) => {
                    self.write_crl(&ca, &revocations)?;
                    CertError::AlreadyRevoked {
                        serial,
                        id: id.to_owned(),
                    }
                }
                None => CertError::NotFound {
                    what: format!("id {id:?}"),
                    dir: self.dir.clone(),
                },
            });
        }
        hastened.extend(self.append_revocations(&ca, &mut revocations, &live, None)?);
        Ok(hastened)
    }

    /// Revokes the certificate with this serial, whether or not a file or
    /// record of it exists here: a serial from an old backup or a device
    /// vendor must be revocable too. The id (and role) come from the
    /// certificate files or the issuance record; an unknown serial is
    /// recorded with an empty id.
    ///
    /// [`CertError::InvalidSerial`] for anything but 1 to 20 octets of hex;
    /// [`CertError::AlreadyRevoked`] if it already is (the CRL is re-signed
    /// first, so re-running after a crash completes the job).
    pub fn revoke_serial(&self, serial: &str) -> Result<RevokedEntry, CertError> {
        let serial = parse_serial(serial)
            .filter(|b| b.len() <= MAX_SERIAL_OCTETS)
            .map(|b| to_hex(&b))
            .ok_or_else(|| CertError::InvalidSerial(serial.to_owned()))?;
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let mut revocations = self.load_revocations()?;
        // A serial only pending (in a rotation's overlap) is revoked again, at once.
        if let Some(rec) = revocations.find_effective(&serial, now()) {
            let id = rec.id.clone();
            self.write_crl(&ca, &revocations)?;
            return Err(CertError::AlreadyRevoked { serial, id });
        }
        let index = self.load_index()?;
        let cert = match index.by_serial(&serial) {
            Some(rec) => rec.unrevoked_info(),
            None => match self
                .current_certs(&revocations)?
                .into_iter()
                .find(|c| c.serial == serial)
            {
                Some(cur) => cur,
                None => {
                    tracing::warn!(%serial, dir = %self.dir.display(), "revoking a serial this directory has no record of");
                    let mut entries = self.append_records(
                        &ca,
                        &mut revocations,
                        vec![RevokedRecord {
                            serial,
                            id: String::new(),
                            revoked_at: rfc3339(now()),
                            role: None,
                            not_after: None,
                            effective_at: None,
                        }],
                    )?;
                    return entries
                        .pop()
                        .ok_or_else(|| CertError::InvalidSerial(String::new()));
                }
            },
        };
        let mut entries = self.append_revocations(&ca, &mut revocations, &[cert], None)?;
        entries
            .pop()
            .ok_or_else(|| CertError::InvalidSerial(String::new()))
    }

    /// Revokes every serial of `serials` (hex, any case, colons allowed)
    /// with one rewrite of `revoked.json` and one CRL signing, where
    /// [`revoke_serial`](Self::revoke_serial) per serial would rewrite and
    /// re-sign both each time (a rotation of thousands of devices revokes
    /// their old certificates in one go). Every serial is checked before
    /// anything is written ([`CertError::InvalidSerial`]). Serials already
    /// revoked, and repeats, are skipped: the entries returned are the ones
    /// this call added, in the order given. Ids come from the issuance
    /// record or the certificate files, as for `revoke_serial`. With
    /// nothing new to add, the CRL is still re-signed from `revoked.json`
    /// (re-running after a crash between the two writes completes it).
    pub fn revoke_serials(&self, serials: &[String]) -> Result<Vec<RevokedEntry>, CertError> {
        let mut wanted = Vec::with_capacity(serials.len());
        for serial in serials {
            let canonical = parse_serial(serial)
                .filter(|b| b.len() <= MAX_SERIAL_OCTETS)
                .map(|b| to_hex(&b))
                .ok_or_else(|| CertError::InvalidSerial(serial.clone()))?;
            wanted.push(canonical);
        }
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let mut revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let mut seen = HashSet::new();
        let new: Vec<String> = wanted
            .into_iter()
            .filter(|s| revocations.find(s).is_none() && seen.insert(s.clone()))
            .collect();
        if new.is_empty() {
            self.write_crl(&ca, &revocations)?;
            return Ok(Vec::new());
        }
        // The files are read only for serials the record does not know.
        let mut files = None;
        let revoked_at = rfc3339(now());
        let mut records = Vec::with_capacity(new.len());
        for serial in new {
            let known = match index.by_serial(&serial) {
                Some(rec) => Some(rec.unrevoked_info()),
                None => {
                    if files.is_none() {
                        files = Some(self.current_certs(&revocations)?);
                    }
                    files.iter().flatten().find(|c| c.serial == serial).cloned()
                }
            };
            if known.is_none() {
                tracing::warn!(%serial, dir = %self.dir.display(), "revoking a serial this directory has no record of");
            }
            records.push(RevokedRecord {
                id: known.as_ref().map(|c| c.id.clone()).unwrap_or_default(),
                role: known.as_ref().map(|c| c.role),
                not_after: known
                    .as_ref()
                    .map(|c| c.not_after.clone())
                    .filter(|s| !s.is_empty()),
                revoked_at: revoked_at.clone(),
                serial,
                effective_at: None,
            });
        }
        self.append_records(&ca, &mut revocations, records)
    }

    /// Signs a device certificate for `id` from the device's own
    /// certificate signing request (PKCS#10, PEM): a rotation in which the
    /// private key never leaves the device.
    ///
    /// The CSR is untrusted input. It must carry a valid self-signature
    /// (proof that the requester holds the key), a P-256 key, exactly the
    /// subject the CA gives a device (CN = `id`, OU = `device`, and O =
    /// `cityplane` or no O) and no requested extensions; anything else is
    /// [`CertError::BadCsr`]. Only the public key is taken from it: the
    /// certificate's contents (subject, validity, clientAuth, key usage)
    /// are built here exactly as [`issue`](Self::issue) builds them.
    /// `id` must hold a valid device certificate already ([`CertError::NotFound`]
    /// otherwise): a rotation renews an identity, it does not create one.
    ///
    /// The new serial is recorded in `issued.jsonl` (with the attributes of
    /// the id's newest record, so the registry keeps them) before the
    /// certificate is returned. No file is written: there is no key to
    /// write, and `DIR/<id>.crt` stays the certificate paired with
    /// `DIR/<id>.key`, which whoever provisioned the device from this
    /// directory still loads. The new certificate is listed from the
    /// record (empty `cert_path`) and counts as a valid certificate of
    /// `id` (`issue` refuses, `rotate` and `revoke --id` revoke it); the
    /// certificate comes back as PEM, for the caller to deliver. The old
    /// certificate is not
    /// revoked here: the caller revokes it ([`revoke_serials`](Self::revoke_serials))
    /// once the device has connected with the new one.
    pub fn sign_device_csr(&self, id: &str, csr_pem: &str) -> Result<SignedCsr, CertError> {
        self.sign_device_csrs(&[(id.to_owned(), csr_pem.to_owned())])?
            .pop()
            .unwrap_or_else(|| {
                Err(CertError::NotFound {
                    what: format!("a valid device certificate of {id:?} to renew"),
                    dir: self.dir.clone(),
                })
            })
    }

    /// [`sign_device_csr`](Self::sign_device_csr) for many `(id, CSR)`
    /// pairs: the CA, the revocation list and the issuance record are read
    /// once and the new serials recorded with one append (a rotation of
    /// thousands of devices would otherwise re-read the whole record per
    /// CSR). One result per pair, in order; the outer error is the PKI's
    /// (unreadable, or the record could not be written: then nothing of
    /// the batch was issued).
    pub fn sign_device_csrs(
        &self,
        requests: &[(String, String)],
    ) -> Result<Vec<Result<SignedCsr, CertError>>, CertError> {
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let opts = IssueOptions {
            org: None,
            ..self.issue_options()
        };
        let mut out = Vec::with_capacity(requests.len());
        let mut records = Vec::new();
        for (id, csr_pem) in requests {
            let signed = (|| {
                let csr = csr_params(id, csr_pem)?;
                let live = self.live_certs(id, &revocations, &index)?;
                if live.is_empty() || live.iter().any(|c| c.role != Role::Device) {
                    return Err(CertError::NotFound {
                        what: format!("a valid device certificate of {id:?} to renew"),
                        dir: self.dir.clone(),
                    });
                }
                let (mut info, pem) = self.build_cert(
                    &ca,
                    Role::Device,
                    id,
                    &opts,
                    &random_serial()?,
                    &csr.public_key,
                )?;
                info.cert_path = PathBuf::new();
                Ok(SignedCsr { cert: info, pem })
            })();
            if let Ok(s) = &signed {
                let attributes = index
                    .for_id(id)
                    .last()
                    .map_or_else(|| self.attributes.clone(), |r| r.attributes.clone());
                records.push(IssuedRecord {
                    serial: s.cert.serial.clone(),
                    id: s.cert.id.clone(),
                    role: Role::Device,
                    not_after: s.cert.not_after.clone(),
                    issued_at: rfc3339(now()),
                    attributes,
                    org: None,
                });
                tracing::info!(%id, serial = %s.cert.serial, "signed a device's certificate signing request");
            }
            out.push(signed);
        }
        if !records.is_empty() {
            IssuedIndex::append(&self.dir, ISSUED_FILE, &records)?;
        }
        Ok(out)
    }

    /// Re-signs `crl.pem` from `revoked.json` with a fresh `nextUpdate`
    /// ([`CRL_VALIDITY_DAYS`]). Run it regularly (cron) when anything reads
    /// the CRL, and after restoring `revoked.json`.
    pub fn refresh_crl(&self) -> Result<CrlInfo, CertError> {
        let _lock = self.lock()?;
        let ca = self.load_ca()?;
        let revocations = self.load_revocations()?;
        self.write_crl(&ca, &revocations)
    }

    /// Copies what a server needs, and nothing that can sign, into `out`
    /// (created 0700; an existing `out` must be private): `ca.crt`,
    /// `broker.crt`, `broker.key` (created 0600), `revoked.json`, `crl.pem`.
    /// Never `ca.key`. Re-running refreshes the copies.
    ///
    /// Refuses `out` if it is this directory or holds a `ca.key`.
    pub fn export_server(&self, out: &Path) -> Result<Vec<PathBuf>, CertError> {
        fsutil::create_dir(out)?;
        fsutil::check_private_dir(out)?;
        self.check_server_dir(out)?;
        let mut written = Vec::new();
        for name in SERVER_FILES {
            let data = fsutil::read(&self.dir.join(name))?;
            let mode = if name == SERVER_KEY_FILE {
                KEY_MODE
            } else {
                PUBLIC_MODE
            };
            fsutil::write_atomic(out, name, &data, mode, false)?;
            written.push(out.join(name));
        }
        // The server's registry is introduced from the issuance record.
        if let Some(data) = fsutil::read_optional(&self.dir.join(ISSUED_FILE))? {
            fsutil::write_atomic(out, ISSUED_FILE, &data, PUBLIC_MODE, false)?;
            written.push(out.join(ISSUED_FILE));
        }
        fsutil::sync_dir(out)?;
        tracing::info!(from = %self.dir.display(), to = %out.display(), "exported a server directory");
        Ok(written)
    }

    /// Copies `revoked.json` and `crl.pem` into a server directory made by
    /// [`export_server`](Self::export_server) from this PKI (its `ca.crt` must
    /// be this CA's), so a broker serving from there sees revocations.
    pub fn publish_revocations(&self, server_dir: &Path) -> Result<(), CertError> {
        self.check_server_dir(server_dir)?;
        let theirs = fsutil::read_optional(&server_dir.join(CA_CERT_FILE))?;
        if theirs.as_deref() != Some(fsutil::read(&self.ca_cert_path())?.as_slice()) {
            return Err(CertError::ServerDir {
                dir: server_dir.to_owned(),
                reason: format!(
                    "its ca.crt is missing or not the CA of {}: create it with \
                     `cityplane certs export-server --pki {} --out {}`",
                    self.dir.display(),
                    self.dir.display(),
                    server_dir.display()
                ),
            });
        }
        // revoked.json first, as in the CA directory: it is what our broker
        // reads, and both are copies of files that are already durable there.
        // issued.jsonl after them: the server's registry reads it.
        for name in [REVOCATION_FILE, CRL_FILE, ISSUED_FILE] {
            if name == ISSUED_FILE && !self.dir.join(name).exists() {
                continue;
            }
            let data = fsutil::read(&self.dir.join(name))?;
            fsutil::write_atomic(server_dir, name, &data, PUBLIC_MODE, true)?;
        }
        Ok(())
    }

    /// The certificate currently in `DIR/<id>.crt`, if any.
    pub fn current_cert(&self, id: &str) -> Result<Option<CertInfo>, CertError> {
        check_id(id)?;
        self.read_current(id, &self.load_revocations()?)
    }

    /// Every identity certificate in the directory, plus revoked certificates
    /// whose file has since been replaced and valid ones whose file is gone
    /// (from the issuance record); those have an empty `cert_path`. Sorted
    /// by id; for one id, replaced certificates come first (oldest revocation
    /// first), then fileless valid ones, then the current one.
    pub fn list(&self) -> Result<Vec<CertInfo>, CertError> {
        let revocations = self.load_revocations()?;
        let index = self.load_index()?;
        let current = self.current_certs(&revocations)?;
        let current_serials: HashSet<&str> = current.iter().map(|c| c.serial.as_str()).collect();
        let mut seen = HashSet::new();
        let mut all = Vec::new();
        let now = now();
        for rec in &revocations.revoked {
            if current_serials.contains(rec.serial.as_str()) || !seen.insert(rec.serial.as_str()) {
                continue;
            }
            let role = rec
                .role
                .or_else(|| current.iter().find(|c| c.id == rec.id).map(|c| c.role));
            let Some(role) = role else {
                // A serial revoked without any record of it here has no id
                // either; that is expected, not worth a warning.
                if !rec.id.is_empty() {
                    tracing::warn!(serial = %rec.serial, id = %rec.id, "revoked entry without a role: not listed");
                }
                continue;
            };
            all.push(CertInfo {
                id: rec.id.clone(),
                role,
                serial: rec.serial.clone(),
                not_after: rec.not_after.clone().unwrap_or_default(),
                revoked: true,
                cert_path: PathBuf::new(),
                // revoked.json does not keep it; issued.jsonl may.
                org: index.by_serial(&rec.serial).and_then(|r| r.org.clone()),
                revoked_from: revocations.pending_until(&rec.serial, now).map(rfc3339),
            });
        }
        // Valid certificates whose file is gone: the ones most worth seeing.
        for rec in &index.records {
            if current_serials.contains(rec.serial.as_str())
                || revocations.find(&rec.serial).is_some()
                || !rec.unexpired_at(now)
                || !seen.insert(rec.serial.as_str())
            {
                continue;
            }
            all.push(rec.unrevoked_info());
        }
        all.extend(current);
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    // ---- internals -------------------------------------------------------

    fn ca_missing(&self, missing: &'static str) -> CertError {
        CertError::NotInitialized {
            dir: self.dir.clone(),
            missing,
        }
    }

    pub(crate) fn load_ca(&self) -> Result<Ca, CertError> {
        let key_path = self.ca_key_path();
        let cert_path = self.ca_cert_path();
        let key_pem =
            fsutil::read_optional(&key_path)?.ok_or_else(|| self.ca_missing(CA_KEY_FILE))?;
        let cert_pem =
            fsutil::read_optional(&cert_path)?.ok_or_else(|| self.ca_missing(CA_CERT_FILE))?;
        let key_pem = String::from_utf8(key_pem)
            .map_err(|_| CertError::bad_file(&key_path, "not a PEM file"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            CertError::bad_file(&key_path, format!("not a usable private key: {e}"))
        })?;

        let (_, pem) = parse_x509_pem(&cert_pem)
            .map_err(|e| CertError::bad_file(&cert_path, format!("not a PEM certificate: {e}")))?;
        let cert = pem.parse_x509().map_err(|e| {
            CertError::bad_file(&cert_path, format!("not a valid certificate: {e}"))
        })?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CertError::bad_file(
                &key_path,
                format!("this key does not belong to {}", cert_path.display()),
            ));
        }
        let not_after = cert.validity().not_after.to_datetime();
        let issuer = Issuer::from_ca_cert_der(&pem.contents.as_slice().into(), key)
            .map_err(|e| CertError::bad_file(&cert_path, format!("not usable as a CA: {e}")))?;
        Ok(Ca { issuer, not_after })
    }

    /// Waits for, then holds, this directory's [`LOCK_FILE`] until the
    /// returned file is dropped. Taken once per public operation (`flock`
    /// is not re-entrant across descriptors: a nested take would wait for
    /// itself).
    fn lock(&self) -> Result<File, CertError> {
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(KEY_MODE)
            .open(&path)
            .map_err(|e| CertError::io("open", &path, e))?;
        file.lock().map_err(|e| CertError::io("lock", &path, e))?;
        Ok(file)
    }

    fn load_revocations(&self) -> Result<RevocationFile, CertError> {
        let path = self.revocation_path();
        if !path.exists() {
            return Err(self.ca_missing(REVOCATION_FILE));
        }
        RevocationFile::load(&path)
    }

    /// Parses `DIR/<id>.crt` if it exists.
    fn read_current(
        &self,
        id: &str,
        revocations: &RevocationFile,
    ) -> Result<Option<CertInfo>, CertError> {
        let path = self.cert_path(id);
        let Some(pem) = fsutil::read_optional(&path)? else {
            return Ok(None);
        };
        let parsed = parse_cert_file(&path, &pem)?;
        if parsed.identity.id != id {
            return Err(CertError::bad_file(
                &path,
                format!(
                    "holds the certificate of {:?}, not of {id:?}: move it out of {}",
                    parsed.identity.id,
                    self.dir.display()
                ),
            ));
        }
        Ok(Some(CertInfo {
            id: parsed.identity.id.clone(),
            role: parsed.identity.role,
            not_after: parsed.not_after_rfc3339(),
            revoked: revocations.find(&parsed.serial).is_some(),
            revoked_from: revocations
                .pending_until(&parsed.serial, now())
                .map(rfc3339),
            serial: parsed.serial,
            cert_path: path,
            org: parsed.identity.org,
        }))
    }

    /// Every `<id>.crt` in the directory, in no particular order.
    fn current_certs(&self, revocations: &RevocationFile) -> Result<Vec<CertInfo>, CertError> {
        let mut certs = Vec::new();
        for id in self.identity_stems("crt")? {
            if let Some(info) = self.read_current(&id, revocations)? {
                certs.push(info);
            }
        }
        Ok(certs)
    }

    /// Stems of `<id>.<ext>` files whose stem is a valid, non-reserved id.
    fn identity_stems(&self, ext: &str) -> Result<Vec<String>, CertError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| CertError::io("list", &self.dir, e))?;
        let mut stems = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| CertError::io("list", &self.dir, e))?;
            let name = entry.file_name();
            let Some(stem) = name
                .to_str()
                .and_then(|n| n.strip_suffix(ext))
                .and_then(|n| n.strip_suffix('.'))
            else {
                continue;
            };
            if check_id(stem).is_ok() {
                stems.push(stem.to_owned());
            }
        }
        Ok(stems)
    }

    /// `init --force`: the old CA's identities (and leftover temporary files) go.
    fn remove_identity_files(&self) -> Result<(), CertError> {
        let mut removed = 0usize;
        for ext in ["crt", "key"] {
            for stem in self.identity_stems(ext)? {
                fsutil::remove_optional(&self.dir.join(format!("{stem}.{ext}")))?;
                removed += 1;
            }
        }
        // The old CA's serials mean nothing to the new one.
        fsutil::remove_optional(&self.dir.join(ISSUED_FILE))?;
        let entries = fs::read_dir(&self.dir).map_err(|e| CertError::io("list", &self.dir, e))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                fsutil::remove_optional(&entry.path())?;
            }
        }
        fsutil::sync_dir(&self.dir)?;
        tracing::warn!(dir = %self.dir.display(), removed, "init --force removed the old CA's identity files");
        Ok(())
    }

    /// Builds (in memory) a key and certificate for `id`.
    fn generate(
        &self,
        ca: &Ca,
        role: Role,
        id: &str,
        opts: &IssueOptions,
        serial: &[u8; SERIAL_LEN],
    ) -> Result<NewCert, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (info, cert_pem) = self.build_cert(ca, role, id, opts, serial, &key)?;
        Ok(NewCert {
            info,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a certificate for `id` over `public_key`: the one place a
    /// leaf's contents are decided, whether the CA made the key
    /// ([`Self::generate`]) or a device did ([`Self::sign_device_csr`]).
    fn build_cert(
        &self,
        ca: &Ca,
        role: Role,
        id: &str,
        opts: &IssueOptions,
        serial: &[u8; SERIAL_LEN],
        public_key: &impl PublicKeyData,
    ) -> Result<(CertInfo, String), CertError> {
        if opts.not_after <= opts.not_before {
            return Err(CertError::InvalidValidity(format!(
                "not_after ({}) must be later than not_before ({})",
                rfc3339(opts.not_after),
                rfc3339(opts.not_before)
            )));
        }
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(serial));
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        params.distinguished_name = subject(role, opts.org.as_deref(), id)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if opts.client_auth {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &ca.issuer)?;
        // Report exactly what was written: read it back from the DER.
        let parsed = parse_identity(cert.der()).map_err(|reason| {
            CertError::bad_file(
                self.cert_path(id),
                format!("generated an unreadable certificate: {reason}"),
            )
        })?;
        debug_assert_eq!(parsed.serial, serial_hex(serial));
        Ok((
            CertInfo {
                id: id.to_owned(),
                role,
                not_after: parsed.not_after_rfc3339(),
                serial: parsed.serial,
                revoked: false,
                cert_path: self.cert_path(id),
                org: parsed.identity.org,
                revoked_from: None,
            },
            cert.pem(),
        ))
    }

    /// Writes the key, then the certificate. A crash in between leaves a key
    /// without certificate (or a new key next to a revoked certificate), which
    /// the next `issue` replaces.
    fn write(&self, new: &NewCert, sync_dir: bool) -> Result<(), CertError> {
        let id = &new.info.id;
        fsutil::write_atomic(
            &self.dir,
            &format!("{id}.key"),
            new.key_pem.as_bytes(),
            KEY_MODE,
            sync_dir,
        )?;
        fsutil::write_atomic(
            &self.dir,
            &format!("{id}.crt"),
            new.cert_pem.as_bytes(),
            PUBLIC_MODE,
            sync_dir,
        )
    }

    /// Adds `certs` to `revoked.json` (in effect from `effective_at`, or at
    /// once) and regenerates `crl.pem`.
    fn append_revocations(
        &self,
        ca: &Ca,
        revocations: &mut RevocationFile,
        certs: &[CertInfo],
        effective_at: Option<OffsetDateTime>,
    ) -> Result<Vec<RevokedEntry>, CertError> {
        let revoked_at = rfc3339(now());
        let records = certs
            .iter()
            .map(|cert| RevokedRecord {
                serial: cert.serial.clone(),
                id: cert.id.clone(),
                revoked_at: revoked_at.clone(),
                role: Some(cert.role),
                not_after: Some(cert.not_after.clone()).filter(|s| !s.is_empty()),
                effective_at: effective_at.map(rfc3339),
            })
            .collect();
        self.append_records(ca, revocations, records)
    }

    fn append_records(
        &self,
        ca: &Ca,
        revocations: &mut RevocationFile,
        records: Vec<RevokedRecord>,
    ) -> Result<Vec<RevokedEntry>, CertError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        revocations.revoked.extend(records.iter().cloned());
        // Both are built before either is written, so a signing failure
        // changes nothing.
        let json = revocations.to_json()?;
        let crl = build_crl(ca, revocations)?;
        // revoked.json first. It is the source crl.pem is derived from, and
        // what our broker enforces. A crash between the two writes leaves
        // the CRL one revocation behind and the command reported failure;
        // re-running it (AlreadyRevoked), the next revocation or `certs crl`
        // re-derives the CRL from revoked.json. The other order would leave a
        // serial only in the CRL, and the next CRL derived from revoked.json
        // would silently drop it again: an un-revocation.
        fsutil::write_atomic(&self.dir, REVOCATION_FILE, &json, PUBLIC_MODE, true)?;
        fsutil::write_atomic(&self.dir, CRL_FILE, crl.pem.as_bytes(), PUBLIC_MODE, true)?;
        for rec in &records {
            tracing::info!(id = %rec.id, serial = %rec.serial, "revoked certificate");
        }
        Ok(records.iter().map(RevokedRecord::entry).collect())
    }

    /// Re-signs `crl.pem` from `revocations` (already durable).
    fn write_crl(&self, ca: &Ca, revocations: &RevocationFile) -> Result<CrlInfo, CertError> {
        let crl = build_crl(ca, revocations)?;
        fsutil::write_atomic(&self.dir, CRL_FILE, crl.pem.as_bytes(), PUBLIC_MODE, true)?;
        Ok(CrlInfo {
            path: self.crl_path(),
            revoked: crl.revoked,
            next_update: rfc3339(crl.next_update),
            pending_until: revocations.next_effective_after(now()).map(rfc3339),
        })
    }

    fn load_index(&self) -> Result<IssuedIndex, CertError> {
        IssuedIndex::load(&self.dir.join(ISSUED_FILE))
    }

    /// Appends `certs` to the issuance record, durably.
    fn record_issued(&self, certs: &[CertInfo]) -> Result<(), CertError> {
        let issued_at = rfc3339(now());
        let records: Vec<IssuedRecord> = certs
            .iter()
            .map(|c| IssuedRecord {
                serial: c.serial.clone(),
                id: c.id.clone(),
                role: c.role,
                not_after: c.not_after.clone(),
                issued_at: issued_at.clone(),
                attributes: if c.role == Role::Device {
                    self.attributes.clone()
                } else {
                    Attributes::default()
                },
                org: c.org.clone(),
            })
            .collect();
        IssuedIndex::append(&self.dir, ISSUED_FILE, &records)
    }

    /// Records certificates found as files but missing from the record
    /// (issued before it existed, or by a bulk run that crashed).
    fn backfill(&self, index: &IssuedIndex, certs: &[CertInfo]) -> Result<(), CertError> {
        let missing: Vec<CertInfo> = certs
            .iter()
            .filter(|c| !c.cert_path.as_os_str().is_empty() && index.by_serial(&c.serial).is_none())
            .cloned()
            .collect();
        self.record_issued(&missing)
    }

    /// Every certificate of `id` that is not revoked: the current file's
    /// (first, if valid) and any unexpired one in the issuance record.
    fn live_certs(
        &self,
        id: &str,
        revocations: &RevocationFile,
        index: &IssuedIndex,
    ) -> Result<Vec<CertInfo>, CertError> {
        let mut live: Vec<CertInfo> = self
            .read_current(id, revocations)?
            .filter(|c| !c.revoked)
            .into_iter()
            .collect();
        for rec in self.live_in_index(id, revocations, index) {
            if !live.iter().any(|c| c.serial == rec.serial) {
                live.push(rec.unrevoked_info());
            }
        }
        Ok(live)
    }

    /// Records of `id` that are neither revoked nor expired.
    fn live_in_index<'a>(
        &self,
        id: &'a str,
        revocations: &'a RevocationFile,
        index: &'a IssuedIndex,
    ) -> impl Iterator<Item = &'a IssuedRecord> {
        let now = now();
        index
            .for_id(id)
            .filter(move |r| revocations.find(&r.serial).is_none() && r.unexpired_at(now))
    }

    /// A server directory is never the CA directory and never holds the CA key.
    fn check_server_dir(&self, dir: &Path) -> Result<(), CertError> {
        let same = match (fs::canonicalize(dir), fs::canonicalize(&self.dir)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same || dir.join(CA_KEY_FILE).exists() {
            return Err(CertError::ServerDir {
                dir: dir.to_owned(),
                reason: "holds ca.key (it is a CA directory): a server directory must hold only \
                         ca.crt, broker.crt, broker.key, revoked.json and crl.pem"
                    .into(),
            });
        }
        Ok(())
    }
}

struct NewCert {
    info: CertInfo,
    cert_pem: String,
    key_pem: String,
}

fn check_id(id: &str) -> Result<(), CertError> {
    validate_id(id)?;
    if RESERVED_IDS.contains(&id) {
        return Err(CertError::ReservedId(id.to_owned()));
    }
    Ok(())
}

/// The subject's O: an operator's organisation ([`ADMIN_ORG`] unless said),
/// [`ORGANIZATION`] for everyone else, who belongs to none.
fn subject_org(role: Role, org: Option<&str>) -> Result<&str, CertError> {
    match (role, org) {
        (Role::Operator, Some(org)) => {
            validate_org(org).map_err(CertError::InvalidOrg)?;
            Ok(org)
        }
        (Role::Operator, None) => Ok(ADMIN_ORG),
        (_, None) => Ok(ORGANIZATION),
        (role, Some(_)) => Err(CertError::OrgNotForRole { role }),
    }
}

/// A device's CSR, parsed and checked (untrusted input: see
/// [`Pki::sign_device_csr`]); only its public key is used.
fn csr_params(id: &str, csr_pem: &str) -> Result<CertificateSigningRequestParams, CertError> {
    check_id(id)?;
    let refuse = |reason: String| CertError::BadCsr {
        id: id.to_owned(),
        reason,
    };
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        refuse(match e {
            rcgen::Error::InvalidCertificationRequestSignature => {
                "its signature does not verify".to_owned()
            }
            rcgen::Error::UnsupportedExtension => "it requests an extension".to_owned(),
            other => format!("unreadable: {other}"),
        })
    })?;
    check_csr_subject(id, &csr.params.distinguished_name).map_err(refuse)?;
    let p = &csr.params;
    if !p.subject_alt_names.is_empty()
        || !p.key_usages.is_empty()
        || !p.extended_key_usages.is_empty()
        || !matches!(p.is_ca, IsCa::NoCa)
    {
        return Err(refuse(
            "it requests extensions; a device asks for none".into(),
        ));
    }
    // The algorithm is read from the CSR's signature; the length and
    // form pin the curve (an uncompressed P-256 point).
    let raw = csr.public_key.der_bytes();
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256
        || raw.len() != 65
        || raw.first() != Some(&4)
    {
        return Err(refuse("its key is not an ECDSA P-256 key".into()));
    }
    Ok(csr)
}

/// A device CSR's subject must be what the CA writes for a device: CN =
/// `id` and OU = `device` once each, and at most O = [`ORGANIZATION`].
fn check_csr_subject(id: &str, subject: &DistinguishedName) -> Result<(), String> {
    let (mut cn, mut ou, mut o) = (0, 0, 0);
    for (ty, value) in subject.iter() {
        let value = match value {
            DnValue::Utf8String(s) => s.as_str(),
            DnValue::PrintableString(s) => s.as_str(),
            _ => return Err("its subject uses an unexpected string type".into()),
        };
        let (count, want) = match ty {
            DnType::CommonName => (&mut cn, id),
            DnType::OrganizationalUnitName => (&mut ou, Role::Device.as_str()),
            DnType::OrganizationName => (&mut o, ORGANIZATION),
            _ => return Err("its subject names more than CN, OU and O".into()),
        };
        if value != want {
            return Err(format!(
                "its subject says {value:?} where a device certificate of {id:?} says {want:?}"
            ));
        }
        *count += 1;
    }
    if cn != 1 || ou != 1 || o > 1 {
        return Err(format!("its subject must be CN={id}, OU=device"));
    }
    Ok(())
}

/// The subject of an identity certificate: O, OU = role, CN = id. Also
/// what a device's CSR says ([`crate::rotation::device_csr`]).
pub(crate) fn subject(
    role: Role,
    org: Option<&str>,
    id: &str,
) -> Result<DistinguishedName, CertError> {
    let org = subject_org(role, org)?;
    Ok(dn(&[
        (DnType::OrganizationName, org),
        (DnType::OrganizationalUnitName, role.as_str()),
        (DnType::CommonName, id),
    ]))
}

pub(crate) fn dn(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in parts {
        dn.push(ty.clone(), *value);
    }
    dn
}

fn parse_cert_file(path: &Path, pem: &[u8]) -> Result<ParsedIdentity, CertError> {
    let (_, pem) = parse_x509_pem(pem)
        .map_err(|e| CertError::bad_file(path, format!("not a PEM certificate: {e}")))?;
    parse_identity(&pem.contents).map_err(|reason| {
        CertError::bad_file(
            path,
            format!("not a cityplane identity certificate: {reason}"),
        )
    })
}

struct SignedCrl {
    pem: String,
    revoked: usize,
    next_update: OffsetDateTime,
}

/// A CRL of every revoked serial, signed by the CA, valid for
/// [`CRL_VALIDITY_DAYS`].
fn build_crl(ca: &Ca, revocations: &RevocationFile) -> Result<SignedCrl, CertError> {
    let this_update = now();
    let next_update = this_update + Duration::days(i64::from(CRL_VALIDITY_DAYS));
    // Increases with every CRL written (RFC 5280 wants a monotonic number).
    let crl_number = u128::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(0);
    let mut revoked_certs = Vec::with_capacity(revocations.revoked.len());
    let mut seen = HashSet::new();
    for rec in revocations.effective_at(this_update) {
        if !seen.insert(rec.serial.as_str()) {
            continue;
        }
        let serial = parse_serial(&rec.serial).ok_or_else(|| CertError::BadRevocationList {
            path: REVOCATION_FILE.into(),
            reason: format!("serial {:?} is not hexadecimal", rec.serial),
        })?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: rec.effective_time().unwrap_or(this_update),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let revoked = revoked_certs.len();
    let params = CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from_slice(&crl_number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    Ok(SignedCrl {
        pem: params.signed_by(&ca.issuer)?.pem()?,
        revoked,
        next_update,
    })
}
