//! `cityplane firmware …`: the release key, signing images, checking releases.
//!
//! A release is a manifest (version, hardware models, size, SHA-256 of the
//! image, version floor) signed with the release key, which is not the CA
//! (`cityplane_certs::firmware`). Devices are provisioned with its public
//! half and install only what it signed.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cityplane_certs::firmware::{
    check_release, generate_release_key, read_public_key, read_release_key, sign_manifest,
    validate_manifest, verify_release, ReleaseError, RELEASE_PUB_FILE,
};
use cityplane_proto::firmware::{parse_version, ReleaseManifest, SignedRelease};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::certs_cmd::print_out;
use crate::ops_cmd::{print_json, Output};

#[derive(Subcommand, Debug)]
pub enum FirmwareCommand {
    /// Create the release key (release.key, 0600) and its public half (release.pub)
    #[command(
        long_about = "Create the Ed25519 release key that signs firmware releases: DIR/release.key \
(PKCS#8 PEM, mode 0600) and DIR/release.pub (the public key, base64, one line). Devices are \
provisioned with release.pub and install only releases it verifies.\n\n\
The release key is not the CA: keep release.key offline with whoever builds firmware, apart \
from ca.key, so that neither key alone puts code on a device. Refuses to replace an existing \
key unless --force.",
        after_help = "Examples:\n  \
cityplane firmware keygen                      # ./release/release.key, ./release/release.pub\n  \
cityplane firmware keygen --dir /secure/release"
    )]
    Keygen(KeygenArgs),

    /// Sign an image: writes IMAGE.release.json (manifest + signature)
    #[command(
        // --version is the image's; `cityplane --version` still prints ours.
        disable_version_flag = true,
        long_about = "Sign a firmware image with the release key. The image is read once, in \
chunks, for its size and SHA-256; the manifest (version, models, size, sha256, floor, \
downgrade) is signed as the exact JSON text stored in the release file, which is what \
devices verify.\n\n\
A device installs the release only if its hardware model is one of --model and the version is \
not below the device's floor (the highest --floor, or version, it installed), unless \
--downgrade was signed.",
        after_help = "Examples:\n  \
cityplane firmware sign sl200-2.1.0.bin --version 2.1.0 --model 'LumiNode SL-200'\n  \
cityplane firmware sign cam.img --version 3.0 --model CX-1 --model CX-2 --floor 2.9 \\\n    \
--key /secure/release/release.key -o cam-3.0.json\n  \
cityplane firmware sign old.bin --version 1.4.2 --model CX-1 --downgrade   # a signed rollback"
    )]
    Sign(SignArgs),

    /// Check a release file: signature, and optionally image, model and floor
    #[command(
        long_about = "Verify a release file with the release public key, as a device would \
before installing it: the signature over the manifest, then with --image that the file has the \
manifest's size and SHA-256, and with --model/--floor that a device of that model at that \
floor would accept it. Says what is wrong and exits non-zero if anything is.",
        after_help = "Examples:\n  \
cityplane firmware verify sl200-2.1.0.bin.release.json --image sl200-2.1.0.bin\n  \
cityplane firmware verify cam-3.0.json --key /etc/cityplane/release.pub --model CX-2 --floor 2.9\n  \
cityplane firmware verify cam-3.0.json --output json | jq .sha256"
    )]
    Verify(VerifyArgs),
    /// Upload a signed release and its image to the server (devices fetch it from there)
    Publish(crate::rollout_cmd::PublishArgs),
    /// The releases the server has published
    List(crate::rollout_cmd::ReleasesArgs),
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Directory for release.key and release.pub (created with mode 0700
    /// if missing). Example: --dir /secure/release
    #[arg(long, value_name = "DIR", default_value = "release")]
    dir: PathBuf,
    /// Replace an existing release key. Devices provisioned with the old
    /// release.pub then refuse every release signed with the new key until
    /// they are provisioned again.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct SignArgs {
    /// The firmware image file.
    #[arg(value_name = "IMAGE")]
    image: PathBuf,
    /// The image's version: 1 to 4 dotted numbers. Example: --version 2.1.0
    #[arg(long, value_name = "V")]
    version: String,
    /// A hardware model the image fits (a device's hardware_model),
    /// repeatable. Example: --model 'LumiNode SL-200'
    #[arg(long = "model", value_name = "M", required = true)]
    models: Vec<String>,
    /// After installing, devices refuse versions below this one (rollback
    /// protection). Default: this release's version. Example: --floor 2.0
    #[arg(long, value_name = "F")]
    floor: Option<String>,
    /// Allow devices to install this release below their floor: an
    /// explicit, signed rollback.
    #[arg(long)]
    downgrade: bool,
    /// The release private key (from `firmware keygen`).
    #[arg(long, value_name = "FILE", default_value = "release/release.key")]
    key: PathBuf,
    /// Where to write the signed release. Default: IMAGE.release.json
    #[arg(short = 'o', long = "out", value_name = "OUT")]
    out: Option<PathBuf>,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The release file `firmware sign` wrote.
    #[arg(value_name = "RELEASE")]
    release: PathBuf,
    /// Also check that this file is the release's image (size and SHA-256).
    #[arg(long, value_name = "IMAGE")]
    image: Option<PathBuf>,
    /// The release public key devices are provisioned with.
    #[arg(long, value_name = "FILE", default_value = "release/release.pub")]
    key: PathBuf,
    /// Check as a device of this hardware model. Example: --model CX-2
    #[arg(long, value_name = "M")]
    model: Option<String>,
    /// Check as a device whose version floor is F (refused below it unless
    /// the release allows a downgrade). Example: --floor 2.9
    #[arg(long, value_name = "F")]
    floor: Option<String>,
    /// `table` for people, `json` for scripts
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Runs one `firmware` subcommand (blocking: files and hashing only).
pub fn run(cmd: FirmwareCommand) -> Result<()> {
    match cmd {
        FirmwareCommand::Keygen(args) => keygen(args),
        FirmwareCommand::Sign(args) => sign(args),
        FirmwareCommand::Verify(args) => verify(args),
        FirmwareCommand::Publish(args) => crate::block_on(crate::rollout_cmd::publish(args)),
        FirmwareCommand::List(args) => crate::block_on(crate::rollout_cmd::releases(args)),
    }
}

fn keygen(args: KeygenArgs) -> Result<()> {
    let key = generate_release_key(&args.dir, args.force)
        .with_context(|| format!("cannot create a release key in {}", args.dir.display()))?;
    let public = args.dir.join(RELEASE_PUB_FILE);
    let mut out = String::new();
    if args.force {
        out += "Replaced the release key: devices provisioned with the old release.pub refuse \
                releases signed from now on until provisioned again.\n";
    }
    out += &format!(
        "Wrote the release key:\n  \
         {key}  private (mode 0600): keep it offline, apart from the CA (ca.key);\n  \
         {pad}  whoever holds it can sign firmware for every device\n  \
         {public}  public: provision every device with it; devices install only what it verifies\n\
         Next: cityplane firmware sign IMAGE --version 1.0.0 --model MODEL --key {key}\n",
        key = key.display(),
        pad = " ".repeat(key.display().to_string().len()),
        public = public.display(),
    );
    print_out(&out)
}

fn sign(args: SignArgs) -> Result<()> {
    let mut manifest = ReleaseManifest {
        version: args.version,
        models: args.models,
        size: 0,
        sha256: "0".repeat(64),
        floor: args.floor,
        downgrade: args.downgrade,
        fetch: "mqtt".into(),
    };
    // Before reading what may be a large image: the signer's mistakes
    // (version, models, key) should not cost a pass over it.
    validate_manifest(&manifest).context("cannot sign")?;
    let key = read_release_key(&args.key).context("cannot sign")?;
    let (size, sha256) = digest_file(&args.image)?;
    if size == 0 {
        bail!("cannot sign {}: the image is empty", args.image.display());
    }
    manifest.size = size;
    manifest.sha256 = sha256;
    let signed = sign_manifest(&key, &manifest).context("cannot sign")?;
    let out = args.out.unwrap_or_else(|| {
        let mut name = args.image.clone().into_os_string();
        name.push(".release.json");
        PathBuf::from(name)
    });
    write_release(&out, &signed)?;
    if args.output == Output::Json {
        return print_json(&describe_json(&manifest, &out, json!({})));
    }
    print_out(&format!(
        "signed {image}: version {version} for {models}\n  \
         size      {size} bytes\n  \
         sha256    {sha}\n  \
         floor     {floor}{downgrade}\n  \
         release   {out}\n\
         Check it: cityplane firmware verify {out} --image {image}\n",
        image = args.image.display(),
        version = manifest.version,
        models = manifest.models.join(", "),
        sha = manifest.sha256,
        floor = manifest.floor.as_deref().unwrap_or(&manifest.version),
        downgrade = if manifest.downgrade {
            " (downgrade allowed: installs below a device's floor)"
        } else {
            ""
        },
        out = out.display(),
    ))
}

fn verify(args: VerifyArgs) -> Result<()> {
    let output = args.output;
    let result = check(&args);
    if output == Output::Json {
        // Scripts get a verdict on stdout either way; the exit status and
        // stderr still say it failed.
        let verdict = match &result {
            Ok(v) => v.clone(),
            Err(e) => json!({"ok": false, "release": args.release, "error": format!("{e:#}")}),
        };
        print_json(&verdict)?;
        return result.map(|_| ());
    }
    let verdict = result?;
    let mut out = format!(
        "ok: {} is signed by the key in {}\n  version   {}\n  models    {}\n  size      {} bytes\n  \
         sha256    {}\n",
        args.release.display(),
        args.key.display(),
        verdict["version"].as_str().unwrap_or_default(),
        verdict["models"]
            .as_array()
            .map(|m| m.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default(),
        verdict["size"],
        verdict["sha256"].as_str().unwrap_or_default(),
    );
    if let Some(image) = &args.image {
        out += &format!(
            "  image     {} matches (size and SHA-256)\n",
            image.display()
        );
    }
    if let Some(model) = verdict["device"]["model"].as_str() {
        let floor = verdict["device"]["floor"].as_str();
        out += &format!("  {} would install it\n", device(model, floor));
    }
    print_out(&out)
}

/// Everything `verify` checks; the manifest and what was checked, as JSON.
fn check(args: &VerifyArgs) -> Result<Value> {
    let public = read_public_key(&args.key).map_err(|e| {
        let key = args.key.display();
        if std::fs::read_to_string(&args.key).is_ok_and(|t| t.contains("PRIVATE KEY")) {
            anyhow::anyhow!("{key} is a private key: pass the public half, {RELEASE_PUB_FILE}")
        } else {
            anyhow::anyhow!("cannot use {key} as the release public key: {e}")
        }
    })?;
    let release = read_release(&args.release)?;
    let not_verified = || {
        format!(
            "{} does not verify with {}",
            args.release.display(),
            args.key.display()
        )
    };
    let manifest = verify_release(&public, &release)
        .map_err(|e| match e {
            ReleaseError::BadSignature => anyhow::anyhow!(
                "bad signature: not signed by the release key whose public half is in {}, or \
                 changed after signing",
                args.key.display()
            ),
            e => e.into(),
        })
        .with_context(not_verified)?;
    if let Some(image) = &args.image {
        let (size, sha256) = digest_file(image)?;
        if size != manifest.size {
            bail!(
                "{} is not this release's image: it is {size} bytes, the release says {}",
                image.display(),
                manifest.size
            );
        }
        if sha256 != manifest.sha256 {
            bail!(
                "{} is not this release's image: its SHA-256 is {sha256}, the release says {}",
                image.display(),
                manifest.sha256
            );
        }
    }
    let mut verdict = json!(null);
    if args.model.is_some() || args.floor.is_some() {
        // A device checks its own model and floor; without --model any of
        // the release's models stands in, and without --floor a device that
        // never installed anything (floor 0).
        let model = args
            .model
            .clone()
            .or_else(|| manifest.models.first().cloned())
            .unwrap_or_default();
        let floor = args.floor.clone().unwrap_or_else(|| "0".into());
        if parse_version(&floor).is_none() {
            bail!("--floor {floor:?} is not a version (dotted numbers, e.g. 2.1.0)");
        }
        let device = device(&model, args.floor.as_deref());
        check_release(&public, &release, &manifest.version, &model, &floor).map_err(|e| {
            let hint = if matches!(e, ReleaseError::Downgrade { .. }) {
                " (a rollback must be signed with --downgrade)"
            } else {
                ""
            };
            anyhow::anyhow!("{device} would refuse it: {e}{hint}")
        })?;
        verdict = json!({"model": model, "floor": args.floor});
    }
    Ok(describe_json(
        &manifest,
        &args.release,
        json!({"ok": true, "image": args.image, "device": verdict}),
    ))
}

/// "a "CX-2" device at floor 2.9", as `verify --model/--floor` describe it.
fn device(model: &str, floor: Option<&str>) -> String {
    match floor {
        Some(floor) => format!("a {model:?} device at floor {floor}"),
        None => format!("a {model:?} device"),
    }
}

/// The manifest's fields, the release file's path and `extra`.
fn describe_json(manifest: &ReleaseManifest, release: &Path, extra: Value) -> Value {
    let mut out = json!({
        "release": release,
        "version": manifest.version,
        "models": manifest.models,
        "size": manifest.size,
        "sha256": manifest.sha256,
        "floor": manifest.floor,
        "downgrade": manifest.downgrade,
        "fetch": manifest.fetch,
    });
    if let (Some(out), Value::Object(extra)) = (out.as_object_mut(), extra) {
        out.extend(extra);
    }
    out
}

fn read_release(path: &Path) -> Result<SignedRelease> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the release file {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a signed release (made by `cityplane firmware sign`)",
            path.display()
        )
    })
}

/// Writes the release next to its final name, then renames: a crash or a
/// full disk never leaves a truncated release where a publisher looks.
fn write_release(out: &Path, signed: &SignedRelease) -> Result<()> {
    let ctx = || format!("cannot write the release to {}", out.display());
    let mut text = serde_json::to_string_pretty(signed).with_context(ctx)?;
    text.push('\n');
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".release")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)
        .with_context(ctx)?;
    io::Write::write_all(&mut tmp, text.as_bytes()).with_context(ctx)?;
    tmp.as_file().sync_all().with_context(ctx)?;
    tmp.persist(out).map_err(|e| e.error).with_context(ctx)?;
    Ok(())
}

/// Size and lowercase hex SHA-256 of a file, read in chunks: images can
/// be larger than the memory of the machine that signs them.
fn digest_file(path: &Path) -> Result<(u64, String)> {
    let ctx = || format!("cannot read the image {}", path.display());
    let mut file = File::open(path).with_context(ctx)?;
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).with_context(ctx),
        };
        hash.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, cityplane_certs::firmware::hex(hash.finish().as_ref())))
}
