//! Firmware rollout benchmark (issue 10), against a real `cityplane serve`
//! over mutual TLS on 127.0.0.1:
//!
//! 1. rollout: N simulated devices (this process, each with its own
//!    certificate and the release key), registered in 5 zones; a signed
//!    release of an image of S KiB is published; one rollout with waves of
//!    1 % / 10 % / 89 % and a soak of T seconds per wave takes every device
//!    to it (each device fetches the image in 64 KiB chunks from the
//!    broker's edge, checks size and SHA-256, installs, reboots). The clock
//!    runs from `rollout create` until every device reports the release;
//!    reported: that time minus the soak (3 × T), the server's CPU time
//!    and peak RSS over the rollout, the image bytes the devices received.
//! 2. the peer: the same bytes pushed alone over loopback mTLS: N client
//!    connections (this process, in halves, for the open-files limit), a
//!    TLS server (this process) writes the image to each; the clock runs
//!    from all connected to all received. The rollout's target is 2× this.
//!
//! `cargo bench -p cityplane --bench rollout [-- --devices N] [--image-kib S]
//! [--soak T] [--runs R]` (defaults 10,000, 1,024, 10, 1). Prints a summary
//! and `BENCH_JSON {…}`; writes target/bench/rollout.json.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cityplane::client::{ConnectArgs, Operator};
use cityplane_agent_sim::{Backoff, FirmwareSim, Fleet, PresenceMode, SimConfig};
use cityplane_certs::firmware;
use cityplane_testkit::bench::{self, target_dir};
use cityplane_testkit::machine;
use cityplane_testkit::process::{cpu_time, rss_kib};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");
const OPERATOR: &str = "bench-operator";

struct Args {
    devices: usize,
    image_kib: usize,
    soak: u64,
    runs: usize,
    /// Only the peer (the push alone): to check it quickly.
    push_only: bool,
}

fn args() -> Result<Args> {
    let mut a = Args {
        devices: 10_000,
        image_kib: 1024,
        soak: 10,
        runs: 1,
        push_only: false,
    };
    bench::parse_args(std::env::args().skip(1), |key, value| {
        match key {
            "--devices" => a.devices = value()?.parse()?,
            "--image-kib" => a.image_kib = value()?.parse()?,
            "--soak" => a.soak = value()?.parse()?,
            "--runs" => a.runs = value()?.parse()?,
            "--push-only" => a.push_only = true,
            "--bench" => {}
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    Ok(a)
}

fn main() {
    let result = bench::block_on(run());
    bench::finish("rollout", result);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct RunResult {
    total_s: f64,
    minus_soak_s: f64,
    server_cpu_s: f64,
    peak_rss_mib: f64,
    bytes_received: u64,
    installs: u64,
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let a = args()?;
    let bench_dir = target_dir().join("bench");
    let dir = bench_dir.join("rollout");
    std::fs::create_dir_all(&dir)?;
    let pki_dir = dir.join("pki");
    let pki = bench::prepare_pki_verbose(&pki_dir, "dev", a.devices, "bench-controller")?;
    if !pki.cert_path(OPERATOR).exists() {
        pki.issue(cityplane_proto::Role::Operator, OPERATOR)?;
    }
    // The image and its signed release.
    let release_dir = dir.join("release");
    let _ = std::fs::remove_dir_all(&release_dir);
    firmware::generate_release_key(&release_dir, true)?;
    let key = firmware::read_release_key(&release_dir.join(firmware::RELEASE_KEY_FILE))?;
    let public = firmware::read_public_key(&release_dir.join(firmware::RELEASE_PUB_FILE))?;
    let mut rng = fastrand::Rng::with_seed(7);
    let image: Vec<u8> = (0..a.image_kib * 1024).map(|_| rng.u8(..)).collect();
    let image_path = dir.join("image.bin");
    std::fs::write(&image_path, &image)?;
    let release = firmware::sign_image(
        &key,
        "9.0.0",
        &["LumiNode SL-200", "LumiNode SL-300", "Orbis LX-4"],
        &image,
        false,
    )?;

    let mut runs = Vec::new();
    for i in 0..a.runs {
        if a.push_only {
            break;
        }
        eprintln!("\nrun {} of {}", i + 1, a.runs);
        let r = rollout_once(&a, &pki_dir, &dir, &release, &image_path, public).await?;
        eprintln!(
            "  {:.1} s ({:.1} s minus soak), server CPU {:.1} s, peak RSS {:.0} MiB",
            r.total_s, r.minus_soak_s, r.server_cpu_s, r.peak_rss_mib
        );
        runs.push(r);
    }
    eprintln!(
        "\npeer: the image pushed alone over loopback mTLS to {} connections",
        a.devices
    );
    let mut push = Vec::new();
    for _ in 0..a.runs {
        push.push(push_alone(&pki, a.devices, &image).await?);
    }
    if a.push_only {
        eprintln!("push alone: {push:?} s");
        return Ok(());
    }
    let minus_soak = median(runs.iter().map(|r| r.minus_soak_s).collect());
    let push_s = median(push);
    let result = json!({
        "bench": "rollout",
        "machine": machine::describe(),
        "devices": a.devices,
        "image_bytes": image.len(),
        "waves": "1% / 10% / 89%",
        "soak_s_per_wave": a.soak,
        "runs": a.runs,
        "median": {
            "rollout_total_s": median(runs.iter().map(|r| r.total_s).collect()),
            "rollout_minus_soak_s": minus_soak,
            "server_cpu_s": median(runs.iter().map(|r| r.server_cpu_s).collect()),
            "server_peak_rss_mib": median(runs.iter().map(|r| r.peak_rss_mib).collect()),
            "image_bytes_received_by_devices": median(runs.iter().map(|r| r.bytes_received as f64).collect()),
            "push_alone_s": push_s,
            "ratio_to_push_alone": minus_soak / push_s,
        },
        "runs_detail": runs.iter().map(|r| json!({
            "total_s": r.total_s, "minus_soak_s": r.minus_soak_s, "server_cpu_s": r.server_cpu_s,
            "peak_rss_mib": r.peak_rss_mib, "bytes_received": r.bytes_received, "installs": r.installs,
        })).collect::<Vec<_>>(),
    });
    let m = &result["median"];
    println!(
        "\nrollout of a {} KiB signed release to {} devices (waves 1/10/89 %, soak {} s each), medians of {}:",
        a.image_kib, a.devices, a.soak, a.runs
    );
    println!(
        "  create -> every device on the release: {:.1} s; minus soak {:.1} s",
        m["rollout_total_s"].as_f64().unwrap_or(0.0),
        minus_soak
    );
    println!(
        "  server: CPU {:.1} s, peak RSS {:.0} MiB; image bytes received by devices {:.0} MiB",
        m["server_cpu_s"].as_f64().unwrap_or(0.0),
        m["server_peak_rss_mib"].as_f64().unwrap_or(0.0),
        m["image_bytes_received_by_devices"].as_f64().unwrap_or(0.0) / 1048576.0
    );
    println!(
        "  peer, the same bytes pushed alone over mTLS: {push_s:.1} s; rollout / push = {:.2} (target <= 2)",
        minus_soak / push_s
    );
    bench::write_result(&bench_dir, "rollout", &result, started)
}

async fn rollout_once(
    a: &Args,
    pki_dir: &Path,
    dir: &Path,
    release: &cityplane_proto::firmware::SignedRelease,
    image_path: &Path,
    public: [u8; 32],
) -> Result<RunResult> {
    let data = dir.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let (server, addr) =
        bench::start_cityplane_serve(Path::new(BIN), pki_dir, &data, &dir.join("serve.log"))?;
    let pid = server.id();
    let connect = ConnectArgs {
        server: addr.to_string(),
        pki: pki_dir.to_path_buf(),
        id: OPERATOR.to_owned(),
        timeout: 30,
        cluster: false,
    };
    let mut op = Operator::connect_retrying(&connect, Duration::from_secs(30)).await?;

    let mut sim = SimConfig::new(
        pki_dir,
        format!("localhost:{}", addr.port()),
        "dev",
        a.devices,
    );
    sim.presence = PresenceMode::Skip;
    sim.mix = "streetlight=1".parse().map_err(anyhow::Error::msg)?;
    sim.release_key = Some(public);
    sim.firmware = FirmwareSim::fast();
    sim.faults.reboot_time = (Duration::from_millis(50), Duration::from_millis(150));
    sim.backoff = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
        multiplier: 2.0,
    };
    let fleet = Fleet::start(sim).await.context("simulated fleet")?;
    if !fleet.wait_online(a.devices, Duration::from_secs(300)).await {
        bail!("the fleet did not come online");
    }
    op.register(&fleet.manifest(), 500, |_| {}).await?;
    op.publish_release(release, image_path, 32 * 1024, |_| {})
        .await?;
    eprintln!(
        "{} devices online and registered; release published",
        a.devices
    );

    let peak = Arc::new(AtomicU64::new(0));
    let sampling = {
        let peak = peak.clone();
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let cpu0 = cpu_time(pid);
    let received0 = fleet.stats().firmware.bytes_downloaded;
    let t0 = Instant::now();
    op.query(
        "rollout-create",
        json!({"name": "bench", "target": {"class": "streetlight"}, "firmware": "9.0.0",
               "waves": [{"percent": 1}, {"percent": 10}, {"percent": 89}],
               "success_threshold": 95, "health": {"soak_s": a.soak}}),
    )
    .await?;
    let mut last = String::new();
    loop {
        let s = op.query("rollout-status", json!({"name": "bench"})).await?;
        let done = s["totals"]["succeeded"].as_u64().unwrap_or(0);
        let line = format!("wave {}/3 {} succeeded {done}", s["wave"], s["phase"]);
        if line != last {
            eprintln!("  {:>6.1} s  {line}", t0.elapsed().as_secs_f64());
            last = line;
        }
        if s["phase"] == "completed" && done as usize >= a.devices {
            break;
        }
        if s["phase"] != "active" {
            bail!("the rollout stopped: {s}");
        }
        if t0.elapsed() > Duration::from_secs(1800) {
            bail!("the rollout did not finish in 30 minutes: {s}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time(pid) - cpu0).as_secs_f64();
    sampling.abort();
    let stats = fleet.stats();
    op.disconnect().await;
    fleet.shutdown().await;
    drop(server);
    let soak = 3.0 * a.soak as f64;
    Ok(RunResult {
        total_s: total,
        minus_soak_s: total - soak,
        server_cpu_s: cpu,
        peak_rss_mib: peak.load(Ordering::Relaxed) as f64 / 1024.0,
        bytes_received: stats.firmware.bytes_downloaded - received0,
        installs: stats.firmware.installs,
    })
}

/// The peer: the image written to every device connection by a plain TLS
/// server, in halves (each process holds at most ~19,900 sockets).
async fn push_alone(pki: &cityplane_certs::Pki, devices: usize, image: &[u8]) -> Result<f64> {
    use cityplane_agent_sim::tls::TlsBase;
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(&pki.ca_cert_path())? {
            r.add(c)?;
        }
        Arc::new(r)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()?;
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(rustls_pemfile_certs(&pki.server_cert_path())?, {
            use rustls::pki_types::pem::PemObject;
            rustls::pki_types::PrivateKeyDer::from_pem_file(pki.server_key_path())?
        })?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let base = TlsBase::from_ca_file(&pki.ca_cert_path())?;
    let ids = cityplane_agent_sim::device_ids("dev", devices);
    let image = Arc::new(image.to_vec());
    let mut total = 0.0;
    for half in ids.chunks(devices.div_ceil(2)) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (go, go_rx) = tokio::sync::watch::channel(false);
        let n = half.len();
        let server = {
            let (acceptor, image) = (acceptor.clone(), image.clone());
            tokio::spawn(async move {
                let mut tasks = Vec::new();
                for _ in 0..n {
                    let Ok((tcp, _)) = listener.accept().await else {
                        break;
                    };
                    let (acceptor, image, mut go) =
                        (acceptor.clone(), image.clone(), go_rx.clone());
                    tasks.push(tokio::spawn(async move {
                        let mut tls = acceptor.accept(tcp).await.ok()?;
                        let _ = go.wait_for(|g| *g).await;
                        tls.write_all(&image).await.ok()?;
                        // Close first, then wait for the client's close: a
                        // socket closed with unread input sends a reset, which
                        // throws away what the client has not read yet.
                        tls.shutdown().await.ok()?;
                        let mut rest = [0u8; 64];
                        while tls.read(&mut rest).await.ok()? > 0 {}
                        Some(())
                    }));
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        };
        let connecting = Arc::new(tokio::sync::Semaphore::new(200));
        let mut clients = Vec::new();
        for id in half {
            let identity = base.identity(&pki.cert_path(id), &pki.key_path(id))?;
            let connector = tokio_rustls::TlsConnector::from(identity.config);
            let connecting = connecting.clone();
            clients.push(tokio::spawn(async move {
                let permit = connecting.acquire_owned().await.ok()?;
                let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
                let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
                let tls = connector.connect(name, tcp).await.ok()?;
                drop(permit);
                Some(tls)
            }));
        }
        let mut streams = Vec::new();
        for c in clients {
            streams.push(c.await?.context("a push client did not connect")?);
        }
        let t = Instant::now();
        let _ = go.send(true);
        let size = image.len();
        let readers: Vec<_> = streams
            .into_iter()
            .map(|mut s| {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut got = 0;
                    while got < size {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => got += k,
                        }
                    }
                    got
                })
            })
            .collect();
        let mut short = Vec::new();
        for r in readers {
            let got = r.await?;
            if got != size {
                short.push(got);
            }
        }
        if !short.is_empty() {
            bail!(
                "{} push clients got less than the image (e.g. {:?} bytes of {size})",
                short.len(),
                &short[..short.len().min(5)]
            );
        }
        total += t.elapsed().as_secs_f64();
        server.await?;
    }
    eprintln!(
        "  pushed {} MiB in {total:.1} s",
        (devices * image.len()) >> 20
    );
    Ok(total)
}

fn rustls_pemfile_certs(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("reading {}", path.display()))
}
