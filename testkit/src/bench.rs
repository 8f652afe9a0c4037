//! Plumbing of the `harness = false` benchmarks: options, where results go,
//! a PKI kept between runs, the `BENCH_JSON` result, and the handshake with
//! a child process that is the benchmark binary re-executed.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Result};
use cityplane_certs::Pki;
use cityplane_proto::Role;

/// The cargo target directory of the running benchmark binary
/// (`CARGO_TARGET_DIR`, else `target/<profile>/deps/<binary>`'s, else
/// `target`).
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/<bench binary>
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(Path::to_path_buf))
        .filter(|t| t.join("CACHEDIR.TAG").exists())
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// A PKI kept in `dir` between runs (created with a server certificate when
/// missing) with device certificates `{prefix}0001…` and a controller
/// identity; identities that already have a certificate are not issued
/// again. `progress` gets the count of device certificates done so far.
pub fn prepare_pki(
    dir: &Path,
    device_prefix: &str,
    devices: usize,
    controller_id: &str,
    progress: impl FnMut(usize),
) -> Result<Pki> {
    let pki = match Pki::open(dir) {
        Ok(pki) if pki.ca_key_path().exists() => pki,
        _ => Pki::init(dir, true)?,
    };
    pki.issue_bulk(Role::Device, device_prefix, devices, progress)?;
    if !pki.cert_path(controller_id).exists() {
        pki.issue(Role::Controller, controller_id)?;
    }
    Ok(pki)
}

/// Prints `BENCH_JSON {json}` (one line, after a blank one), writes it
/// pretty to `bench_dir/{name}.json` and says so, with the total run time
/// since `started`.
pub fn write_result(
    bench_dir: &Path,
    name: &str,
    json: &serde_json::Value,
    started: Instant,
) -> Result<()> {
    println!("\nBENCH_JSON {}", serde_json::to_string(json)?);
    let path = bench_dir.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(json)?)?;
    println!(
        "written to {} (total {:.0} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reads the command line of a benchmark run by `cargo bench -- …`:
/// `--key value` or `--key=value`. `option` gets each key and a way to take
/// its value, and says whether it knew the key (unknown ones are reported
/// and ignored); cargo's `--bench` and bare words (a `cargo bench NAME`
/// filter) are skipped.
pub fn parse_args(
    args: impl IntoIterator<Item = String>,
    mut option: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<()> {
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (key, inline) = match arg.split_once('=') {
            Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
            None => (arg, None),
        };
        // `--bench` is passed by `cargo bench`; a bare word is a name filter
        // from `cargo bench NAME`: nothing to filter.
        if key == "--bench" || !key.starts_with('-') {
            continue;
        }
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| anyhow!("{key} needs a value"))
        };
        if !option(&key, &mut value)? {
            eprintln!("ignoring unknown option {key}");
        }
    }
    Ok(())
}

/// A child process's side of the start-up handshake: prints `PORT {port}`
/// on stdout for the parent.
pub fn announce_port(port: u16) -> Result<()> {
    println!("PORT {port}");
    std::io::stdout().flush()?;
    Ok(())
}

/// Blocks until stdin reaches EOF: the parent is gone or done with us.
pub fn wait_for_stdin_eof() {
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
}
