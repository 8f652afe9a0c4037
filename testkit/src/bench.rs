//! Plumbing of the `harness = false` benchmarks: options, where results go,
//! a PKI kept between runs, the `BENCH_JSON` result, our broker as a child
//! process (`cityplane broker`), and the handshake with a child process
//! that is the benchmark binary re-executed.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cityplane_certs::Pki;
use cityplane_proto::Role;

use crate::process::{kill_registered_children, ChildGuard};

/// Runs a benchmark's `work` on a multi-thread tokio runtime. Ctrl-C kills
/// every guarded child process and exits with 130.
pub fn block_on(work: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        tokio::spawn(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                kill_registered_children();
                std::process::exit(130);
            }
        });
        work.await
    })
}

/// The end of a benchmark's `main`: kills every guarded child process, then
/// on an error prints `{name}: {error}` and exits with 1.
pub fn finish(name: &str, result: Result<()>) {
    kill_registered_children();
    if let Err(e) = result {
        eprintln!("{name}: {e:#}");
        std::process::exit(1);
    }
}

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

/// [`prepare_pki`], saying on stderr how far issuing got (every 1,000
/// certificates) and when the PKI is ready.
pub fn prepare_pki_verbose(
    dir: &Path,
    device_prefix: &str,
    devices: usize,
    controller_id: &str,
) -> Result<Pki> {
    let t0 = Instant::now();
    let mut last = 0;
    let pki = prepare_pki(dir, device_prefix, devices, controller_id, |done| {
        if done >= last + 1000 {
            last = done;
            eprint!("\rissuing device certificates: {done}/{devices}");
        }
    })?;
    eprintln!(
        "\rPKI ready in {:.1} s: {} ({devices} devices + {controller_id})",
        t0.elapsed().as_secs_f64(),
        dir.display()
    );
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

/// Starts our broker, the real binary: `{bin} broker --pki
/// bench_dir/{prefix}pki-server --listen 127.0.0.1:0 --config
/// bench_dir/{prefix}cityplane-broker.toml`, and returns once it says where it
/// listens (at most 30 s).
///
/// The server directory is exported from `pki` (no `ca.key`, as in
/// production; re-exported every start). `config_toml` is the `--config`
/// file (`cityplane broker --print-config` shows every key; a missing one
/// keeps its default). The log filter is `CITYPLANE_BENCH_LOG` (default
/// `warn`); stderr goes to `bench_dir/{prefix}cityplane-broker.log`.
/// `bin`, behind the command prefix in the environment variable `var` if
/// set (e.g. `heaptrack -o /tmp/hp`).
fn wrapped(var: &str, bin: &Path) -> Command {
    let wrap = std::env::var(var).unwrap_or_default();
    let mut argv = wrap.split_whitespace();
    match argv.next() {
        Some(first) => {
            let mut command = Command::new(first);
            command.args(argv).arg(bin);
            command
        }
        None => Command::new(bin),
    }
}

/// `cityplane serve` (broker and controller) on a free loopback port, its
/// log (RUST_LOG=warn) in `log`; returns the child and its address.
/// `CITYPLANE_BENCH_SERVE_WRAP` is a command prefix for it, like
/// `CITYPLANE_BENCH_BROKER_WRAP` for the broker.
pub fn start_cityplane_serve(
    bin: &Path,
    pki_dir: &Path,
    data: &Path,
    log: &Path,
) -> Result<(ChildGuard, SocketAddr)> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let child = wrapped("CITYPLANE_BENCH_SERVE_WRAP", bin)
        .args(["serve", "--listen", &addr.to_string()])
        .arg("--pki")
        .arg(pki_dir)
        .arg("--data")
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("start cityplane serve")?;
    Ok((ChildGuard::new(child), addr))
}

/// `CITYPLANE_BENCH_BROKER_WRAP` is a command prefix for the broker (e.g.
/// `heaptrack -o /tmp/hp`; the pid, and so the memory figures, are then the
/// wrapper's).
pub fn start_cityplane_broker(
    bin: &Path,
    pki: &Pki,
    bench_dir: &Path,
    prefix: &str,
    config_toml: &str,
) -> Result<(ChildGuard, SocketAddr)> {
    let server_dir = bench_dir.join(format!("{prefix}pki-server"));
    pki.export_server(&server_dir)
        .with_context(|| format!("export a server directory to {}", server_dir.display()))?;
    let config = bench_dir.join(format!("{prefix}cityplane-broker.toml"));
    std::fs::write(&config, config_toml)?;
    let log_path = bench_dir.join(format!("{prefix}cityplane-broker.log"));
    let mut log = std::fs::File::create(&log_path)?;
    let filter = std::env::var("CITYPLANE_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let mut child = wrapped("CITYPLANE_BENCH_BROKER_WRAP", bin)
        .args(["broker", "--listen", "127.0.0.1:0", "--pki"])
        .arg(&server_dir)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {} broker", bin.display()))?;
    let stderr = child.stderr.take().context("the broker's stderr")?;
    let mut guard = ChildGuard::new(child);
    // Every line goes to the log; the one saying where it listens also to us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            if let Some(at) = line.split_once("listening on ").map(|(_, a)| a) {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(at.split_whitespace().next().unwrap_or_default().to_owned());
                }
            }
        }
    });
    let name = format!("cityplane broker (see {})", log_path.display());
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(addr) => break addr,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                guard.check_alive(&name)?;
                bail!("{name} closed its stderr before it listened");
            }
        }
        guard.check_alive(&name)?;
        if Instant::now() > deadline {
            bail!("{name} did not say where it listens within 30 s");
        }
    };
    let addr = addr
        .parse()
        .with_context(|| format!("{name}: listening on {addr:?}"))?;
    Ok((guard, addr))
}

/// `--name N` from the command line, or `default` (absent or unreadable).
pub fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of some timings (NaN for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}
