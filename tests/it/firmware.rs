//! `cityplane firmware keygen|sign|verify` as a release engineer runs them:
//! the binary, in a scratch directory, its files, output and exit status.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::common::{stdout_of_success, BIN};

/// Runs `cityplane LINE` (split at spaces) in `dir`, so the defaults
/// (`release/…`) land there.
fn cityplane(dir: &Path, line: &str) -> Output {
    Command::new(BIN)
        .args(line.split_whitespace())
        .current_dir(dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("cityplane runs")
}

/// Runs and insists on success; returns stdout.
fn ok(dir: &Path, line: &str) -> String {
    stdout_of_success(line, cityplane(dir, line))
}

/// Runs and insists on failure whose stderr says `says`; returns stdout.
fn fails(dir: &Path, line: &str, says: &str) -> String {
    let out = cityplane(dir, line);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{line:?} should fail");
    assert!(
        stderr.contains(says),
        "{line:?} should say {says:?}, said:\n{stderr}"
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An image larger than the signer's read buffer, so hashing spans chunks.
fn image_bytes() -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(42);
    (0..700_000).map(|_| rng.u8(..)).collect()
}

#[test]
fn keygen_writes_a_private_key_and_refuses_to_replace_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let out = ok(dir, "firmware keygen");
    let key = dir.join("release/release.key");
    let public = dir.join("release/release.pub");
    for says in ["release/release.pub", "offline", "apart from the CA"] {
        assert!(out.contains(says), "keygen should say {says:?}:\n{out}");
    }
    let mode = std::fs::metadata(&key)
        .expect("release.key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "release.key mode {mode:o}");
    let first = std::fs::read(&key).expect("read key");
    let public = std::fs::read_to_string(&public).expect("release.pub");
    assert_eq!(public.trim().len(), 44, "32 bytes in base64: {public:?}");

    fails(dir, "firmware keygen", "already exists");
    fails(dir, "firmware keygen", "Pass --force to make a new one");
    assert_eq!(std::fs::read(&key).expect("read key"), first, "key kept");

    let out = ok(dir, "firmware keygen --force");
    assert!(out.contains("Replaced"), "{out}");
    assert_ne!(
        std::fs::read(&key).expect("read key"),
        first,
        "key replaced"
    );
}

#[test]
fn a_signed_release_verifies_and_every_tampering_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    ok(dir, "firmware keygen");
    ok(dir, "firmware keygen --dir other");
    let bytes = image_bytes();
    std::fs::write(dir.join("sl200.bin"), &bytes).expect("image");

    let signed: serde_json::Value = serde_json::from_str(&ok(
        dir,
        "firmware sign sl200.bin --version 2.1.0 --model SL-200 --model CX-1 --floor 2.0 \
         --output json",
    ))
    .expect("sign --output json");
    assert_eq!(signed["sha256"], sha256_hex(&bytes).as_str());
    assert_eq!(signed["size"], bytes.len());
    assert_eq!(signed["version"], "2.1.0");
    assert_eq!(signed["models"], serde_json::json!(["SL-200", "CX-1"]));
    assert_eq!(signed["release"], "sl200.bin.release.json");
    let verify = "firmware verify sl200.bin.release.json";

    // What a device at floor 1.9 of either model checks, and the image.
    let out = ok(
        dir,
        &format!("{verify} --image sl200.bin --model CX-1 --floor 1.9"),
    );
    assert!(out.starts_with("ok:") && out.contains("matches"), "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&ok(dir, &format!("{verify} --output json"))).expect("json");
    assert_eq!(
        (v["ok"].as_bool(), v["floor"].as_str()),
        (Some(true), Some("2.0"))
    );

    // Another key: devices provisioned with it refuse the release.
    fails(
        dir,
        &format!("{verify} --key other/release.pub"),
        "bad signature",
    );
    // The private key where the public one belongs: said so.
    fails(
        dir,
        &format!("{verify} --key release/release.key"),
        "is a private key",
    );

    // A manifest changed after signing (a version bumped by hand).
    let text = std::fs::read_to_string(dir.join("sl200.bin.release.json")).expect("release");
    let tampered = text.replace("2.1.0", "2.1.1");
    assert_ne!(tampered, text);
    std::fs::write(dir.join("tampered.json"), tampered).expect("write");
    fails(dir, "firmware verify tampered.json", "bad signature");
    // A script reads the verdict as JSON, and the exit status still fails.
    let verdict = fails(
        dir,
        "firmware verify tampered.json --output json",
        "bad signature",
    );
    let verdict: serde_json::Value = serde_json::from_str(&verdict).expect("verdict");
    assert_eq!(verdict["ok"], false);
    assert!(verdict["error"]
        .as_str()
        .is_some_and(|e| e.contains("bad signature")));

    // Wrong image bytes: one byte flipped, then one byte more.
    let mut flipped = bytes.clone();
    flipped[500_000] ^= 1;
    std::fs::write(dir.join("flipped.bin"), &flipped).expect("write");
    fails(
        dir,
        &format!("{verify} --image flipped.bin"),
        "its SHA-256 is",
    );
    let mut longer = bytes.clone();
    longer.push(0);
    std::fs::write(dir.join("longer.bin"), &longer).expect("write");
    fails(
        dir,
        &format!("{verify} --image longer.bin"),
        &format!("it is {} bytes", bytes.len() + 1),
    );

    // A device of another model, and one already past this version.
    fails(dir, &format!("{verify} --model LX-4"), "wrong model");
    fails(
        dir,
        &format!("{verify} --model SL-200 --floor 2.2"),
        "downgrade: 2.1.0 is below this device's floor 2.2",
    );
    // Unless the signer allowed the rollback.
    ok(
        dir,
        "firmware sign sl200.bin --version 2.1.0 --model SL-200 --downgrade -o rollback.json",
    );
    ok(dir, "firmware verify rollback.json --floor 2.2");
}

#[test]
fn signing_refuses_bad_input_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    std::fs::write(dir.join("fw.bin"), b"image").expect("image");
    std::fs::write(dir.join("empty.bin"), b"").expect("image");
    let sign = "firmware sign fw.bin --model SL-200";
    fails(
        dir,
        &format!("{sign} --version 1.0"),
        "cannot read release/release.key",
    );
    ok(dir, "firmware keygen");
    let table = [
        (
            format!("{sign} --version v2.0-rc1"),
            "version \"v2.0-rc1\" is not dotted numbers (e.g. 1.4.3)",
        ),
        (
            format!("{sign} --version 2.0 --floor latest"),
            "floor \"latest\" is not dotted numbers",
        ),
        (
            format!("{sign} --version 2.0 --key release/release.pub"),
            "release/release.pub is not a PEM key",
        ),
        // The signer's mistakes are found before the image is read.
        (
            "firmware sign missing.bin --version 2.0rc --model SL-200".into(),
            "version \"2.0rc\" is not dotted numbers",
        ),
        (
            "firmware sign missing.bin --version 2.0 --model SL-200".into(),
            "cannot read the image missing.bin",
        ),
        (
            "firmware sign empty.bin --version 2.0 --model SL-200".into(),
            "the image is empty",
        ),
    ];
    for (line, says) in &table {
        fails(dir, line, says);
    }
    let left: Vec<_> = std::fs::read_dir(dir)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json") || n.starts_with(".release"))
        .collect();
    assert!(left.is_empty(), "a refused sign wrote {left:?}");
}
