//! What the certs test files share: a throwaway PKI and file inspection.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use cityplane_certs::Pki;
use x509_parser::pem::parse_x509_pem;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

pub fn pki() -> Result<(tempfile::TempDir, Pki), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let pki = Pki::init(&tmp.path().join("pki"), false)?;
    Ok((tmp, pki))
}

pub fn mode(path: &Path) -> Result<u32, Box<dyn std::error::Error>> {
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o777)
}

pub fn pem_der(path: &Path) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let data = std::fs::read(path)?;
    let (_, pem) = parse_x509_pem(&data).map_err(|e| format!("{}: {e:?}", path.display()))?;
    Ok(pem.contents)
}
