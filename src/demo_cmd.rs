//! `cityplane demo`: the whole system on a throwaway CA, in one process.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cityplane_agent_sim::{FirmwareSim, Fleet, PresenceMode, SimConfig};
use cityplane_broker::{Broker, BrokerConfig};
use cityplane_certs::firmware;
use cityplane_certs::Pki;
use cityplane_controller::{Controller, ControllerConfig};
use cityplane_proto::Role;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use cityplane::client::{ConnectArgs, Operator};

/// Runs a complete demo: CA and certificates, broker, controller, a
/// simulated fleet, a fleet-wide change, progress while it converges and a
/// fleet table. Everything runs in this process and stops at the end.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Simulated devices (mixed classes)
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,
    /// Keep the PKI and database in this directory instead of a temporary one
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
    /// Seconds allowed for the fleet to converge
    #[arg(long, default_value_t = 90)]
    pub deadline: u64,
    /// Where the compliance report for an auditor is written (HTML)
    #[arg(long, default_value = "cityplane-compliance.html")]
    pub report: std::path::PathBuf,
    /// Serve the operator dashboard (default 127.0.0.1:8080; loopback
    /// only), print a sign-in link and keep the fleet running until Ctrl-C
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:8080")]
    pub dashboard: Option<std::net::SocketAddr>,
}

const OPERATOR: &str = "demo-operator";

/// The dashboard's address and a sign-in link for the demo's operator
/// (issued through the operator protocol, so it is audited like any).
async fn show_dashboard(
    controller: &Controller,
    origin: &str,
    pki: &std::path::Path,
    broker: std::net::SocketAddr,
) {
    let me = cityplane_proto::Identity {
        id: OPERATOR.to_owned(),
        role: Role::Operator,
        org: Some(cityplane_proto::ADMIN_ORG.to_owned()),
    };
    println!("\nThe dashboard: {origin}");
    match controller
        .operator_api()
        .ask(&me, "dashboard-login", serde_json::json!({}))
        .await
    {
        Ok(r) => println!(
            "  sign in within 60 s: {}",
            r["url"].as_str().unwrap_or_default()
        ),
        Err(e) => println!("  no sign-in link: {e}"),
    }
    println!(
        "  another link: cityplane dashboard login --server {broker} --pki {} --id {OPERATOR}",
        pki.display()
    );
    println!("The fleet keeps running; Ctrl-C stops the demo.");
}
const PREFIX: &str = "dev";

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what:<28} [{{bar:40}}] {{pos}}/{{len}} {{msg}} ({{elapsed}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let temp;
    let root = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let pki_dir = root.join("pki");
    let data_dir = root.join("data");
    println!(
        "cityplane demo: {} simulated devices, everything on 127.0.0.1\n",
        args.devices
    );

    // 1. Identities.
    let pki = if pki_dir.join("ca.crt").exists() {
        Pki::open(&pki_dir)?
    } else {
        Pki::init(&pki_dir, false)?
    };
    if pki.current_cert(OPERATOR)?.is_none() {
        pki.issue(Role::Operator, OPERATOR)?;
    }
    let certs = bar(args.devices as u64, "issuing device certificates");
    pki.issue_bulk(Role::Device, PREFIX, args.devices, |n| {
        certs.set_position(n as u64)
    })?;
    certs.finish_with_message("ECDSA P-256, one per device");

    // 2. Broker + controller.
    let broker = Broker::start_closed(BrokerConfig {
        listen: "127.0.0.1:0".parse()?,
        pki: pki_dir.clone(),
        limits: Default::default(),
        // The controller stores published images here; the edge serves them.
        firmware_dir: Some(cityplane_controller::runtime::firmware_dir(&data_dir)),
    })
    .await
    .context("starting the broker")?;
    let addr = broker.local_addr();
    let dashboard = match args.dashboard {
        Some(at) => Some(crate::dashboard::Dashboard::bind(at, &Default::default()).await?),
        None => None,
    };
    let mut cc = ControllerConfig::new(data_dir.clone());
    cc.sign_ins = dashboard.as_ref().map(|d| d.sign_ins());
    cc.pki = Some(pki_dir.clone());
    cc.registry_source = Some(pki_dir.clone());
    // Compliance is sampled and enforced every second: the demo is short.
    cc.compliance_every = Duration::from_secs(1);
    let controller = Controller::start_in_process(&broker, cc)
        .await
        .context("starting the controller")?;
    println!("broker + controller listening on {addr} (mutual TLS)");

    let (stop_dashboard, dashboard_stopped) = tokio::sync::oneshot::channel::<()>();
    let dashboard_task = dashboard.map(|d| {
        let origin = d.origin().to_owned();
        let api = controller.operator_api();
        let task = tokio::spawn(d.serve(api, async {
            let _ = dashboard_stopped.await;
        }));
        (origin, task)
    });
    let outcome = drive(&args, &pki_dir, addr).await;
    if let (Ok(_), Some((origin, _))) = (&outcome, &dashboard_task) {
        // The fleet keeps running: the dashboard shows it live.
        show_dashboard(&controller, origin, &pki_dir, addr).await;
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    let _ = stop_dashboard.send(());
    if let Some((_, task)) = dashboard_task {
        // Open live-update streams would hold a graceful stop forever.
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }

    // 5. Stop everything we started, whatever happened.
    cityplane_broker::logging::stopping();
    let stopping = bar(3, "stopping");
    let outcome = match outcome {
        Ok(mut o) => {
            if let Some(fleet) = o.fleet.take() {
                fleet.shutdown().await;
            }
            Ok(o)
        }
        Err(e) => Err(e),
    };
    stopping.inc(1);
    controller
        .shutdown()
        .await
        .context("stopping the controller")?;
    stopping.inc(1);
    broker.shutdown().await;
    stopping.finish_with_message("nothing left running");

    let o = outcome?;
    print_table(&o.rows);
    if let Some(i) = &o.incident {
        println!(
            "{} is cut off: quarantined by incident {}, online {} (cityplane quarantine list)",
            i["id"].as_str().unwrap_or(""),
            i["incident"].as_str().unwrap_or(""),
            i["online"]
        );
    }
    print_firmware(&o.rows, &o.rollouts);
    println!("\nCompliance before enforcement:");
    print!(
        "{}",
        crate::governance_cmd::compliance_table(&o.compliance.0)
    );
    println!("\nCompliance after enforcement:");
    print!(
        "{}",
        crate::governance_cmd::compliance_table(&o.compliance.1)
    );
    println!(
        "\nThe auditor's report: {}",
        std::fs::canonicalize(&args.report)
            .unwrap_or_else(|_| args.report.clone())
            .display()
    );
    println!(
        "The audit log: {} entries, hash chain {} (head {}; cityplane audit verify)",
        o.audit["head"]["entries"],
        if o.audit["ok"] == true {
            "verified"
        } else {
            "BROKEN"
        },
        o.audit["head"]["hash"]
            .as_str()
            .map_or("-", |h| &h[..h.len().min(16)])
    );
    let (total, converged, failed) = o.totals;
    println!(
        "\n{converged} of {total} devices converged ({failed} failed) in {:.1} s after the change; demo took {:.0} s.",
        o.converge_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    println!("\nWhere to look next:");
    println!("  cityplane serve --help               run broker + controller for real");
    println!("  cityplane apply --help               declare desired state (selectors, priorities, if_generation)");
    println!(
        "  cityplane rollout create --help      change thousands of devices in waves, health-gated"
    );
    println!(
        "  cityplane firmware --help            the release key, signing and publishing images"
    );
    println!("  cityplane policy --help              the security policy: apply, export signed, check offline");
    println!(
        "  cityplane compliance --help          who breaks the policy; the auditor's HTML report"
    );
    println!(
        "  cityplane orgs --help                contractors' organisations: scopes and rights"
    );
    println!(
        "  cityplane quarantine --help          cut devices off in one command; release brings them back on new certificates"
    );
    println!(
        "  cityplane certs rotate --help        rotate the fleet's certificates as a rollout (keys made on the devices)"
    );
    println!(
        "  cityplane secrets --help             per-device admin passwords, rotated, never shown"
    );
    println!(
        "  cityplane demo --dashboard           this demo, then the fleet in a browser until Ctrl-C"
    );
    println!("  agent-sim run --help                 load-test a server with thousands of devices");
    println!("  docs/PROTOCOL.md, ARCHITECTURE.md    the wire contract and how it is built");
    if let Some(dir) = &args.keep {
        println!("  PKI and database kept in {}", dir.display());
    }
    if converged < total {
        bail!(
            "{} devices did not converge before the deadline",
            total - converged
        );
    }
    Ok(())
}

struct Outcome {
    fleet: Option<Fleet>,
    rows: Vec<Value>,
    totals: (u64, u64, u64),
    converge_time: Duration,
    rollouts: Vec<Value>,
    /// The compliance reports before and after enforcement.
    compliance: (Value, Value),
    /// `audit-verify` at the end.
    audit: Value,
    /// The rogue device quarantined, if the fleet has a camera to play it.
    incident: Option<Value>,
}

async fn drive(
    args: &DemoArgs,
    pki_dir: &std::path::Path,
    addr: std::net::SocketAddr,
) -> anyhow::Result<Outcome> {
    // 3. The simulated fleet.
    let mut sim = SimConfig::new(
        pki_dir,
        format!("localhost:{}", addr.port()),
        PREFIX,
        args.devices,
    );
    sim.presence = PresenceMode::Skip;
    // Devices trust the release key's public half (provisioned at the
    // factory); the key itself never leaves the release directory.
    let release_dir = pki_dir.parent().unwrap_or(pki_dir).join("release");
    firmware::generate_release_key(&release_dir, true)?;
    sim.release_key = Some(firmware::read_public_key(
        &release_dir.join(firmware::RELEASE_PUB_FILE),
    )?);
    sim.firmware = FirmwareSim {
        verify_time: Duration::from_millis(200),
        install_time: Duration::from_millis(800),
        health_check_time: Duration::from_millis(300),
        ..FirmwareSim::default()
    };
    sim.faults.reboot_time = (Duration::from_millis(500), Duration::from_millis(1500));
    let fleet = Fleet::start(sim)
        .await
        .context("starting the simulated fleet")?;
    let online = bar(args.devices as u64, "devices connecting (mTLS)");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = fleet.stats();
        online.set_position(s.online as u64);
        if s.online >= args.devices || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    online.finish_with_message("online");

    let connect = ConnectArgs {
        server: addr.to_string(),
        pki: pki_dir.to_path_buf(),
        id: OPERATOR.to_owned(),
        timeout: 10,
        cluster: false,
    };
    let mut op = Operator::connect(&connect)
        .await
        .context("connecting as the operator")?;
    // The registry: the installer's manifest (class, zone) through the
    // operator API. Selectors match these attributes, never the devices' claims.
    // The installer's manifest also records each device's hardware model
    // (label `hw`): rollouts can spread their waves over it.
    let mut manifest = fleet.manifest();
    for entry in &mut manifest {
        let id = entry["id"].as_str().unwrap_or_default().to_owned();
        if let Some(Some(Value::String(model))) = fleet.value_of(&id, "hardware_model") {
            entry["labels"]["hw"] = json!(model);
        }
        // Who maintains it: the lighting contractor, the camera integrator
        // or the city's own services (organisations are scoped by owner).
        entry["owner"] = json!(match entry["class"].as_str() {
            Some("streetlight") => "lighting-co",
            Some("camera") => "camera-int",
            _ => "city-services",
        });
    }
    let registering = bar(manifest.len() as u64, "registering the fleet");
    op.register(&manifest, 250, |n| registering.set_position(n as u64))
        .await?;
    registering.finish_with_message("class, zone, hw: set by the operator");
    print_registry(&manifest);

    let known = bar(args.devices as u64, "controller sees devices online");
    loop {
        let s = op.query("status", json!({})).await?;
        let online = s["online"].as_u64().unwrap_or(0);
        known.set_position(online);
        if online >= args.devices as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    known.finish_with_message("reported state stored");

    // 4. A fleet-wide change, with class-specific overrides.
    let docs = [
        json!({"name": "city-baseline", "target": {"all": true}, "priority": 1,
               "state": {"maintenance_window": "02:00-04:00", "log_level": "warn"}}),
        json!({"name": "streetlight-night-dimming", "target": {"class": "streetlight"}, "priority": 10,
               "state": {"dimming": 40}}),
        json!({"name": "camera-retention", "target": {"class": "camera"}, "priority": 10,
               "state": {"retention_days": 30}}),
    ];
    println!();
    let t0 = Instant::now();
    for doc in docs {
        let name = doc["name"].as_str().unwrap_or_default().to_owned();
        let answer = op
            .request(&cityplane_proto::topics::desired(&name), doc)
            .await?;
        if answer["status"] != "accepted" {
            bail!("the controller rejected {name}: {answer}");
        }
        println!(
            "applied {name:<28} generation {} -> {} devices",
            answer["generation"], answer["devices"]
        );
    }
    let converging = bar(args.devices as u64, "devices converging");
    let deadline = Instant::now() + Duration::from_secs(args.deadline);
    let mut status;
    loop {
        status = op.query("status", json!({})).await?;
        let n = |k: &str| status[k].as_u64().unwrap_or(0);
        converging.set_length(n("total"));
        converging.set_position(n("converged"));
        converging.set_message(format!("{} pending, {} failed", n("pending"), n("failed")));
        if n("pending") == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let converge_time = t0.elapsed();
    converging.finish();

    let rollouts = firmware_rollouts(&mut op, &release_dir).await?;
    let compliance = security_policy(&mut op, &args.report).await?;
    let incident = incident(&mut op, &fleet).await?;
    // Everything above is in the audit log, hash-chained.
    let audit = op.query("audit-verify", json!({})).await?;
    let mut rows = Vec::new();
    loop {
        let page = op
            .query("get-devices", json!({"offset": rows.len(), "limit": 1000}))
            .await?;
        let batch = page["devices"].as_array().cloned().unwrap_or_default();
        let total = page["total"].as_u64().unwrap_or(0) as usize;
        let empty = batch.is_empty();
        rows.extend(batch);
        if rows.len() >= total || empty {
            break;
        }
    }
    op.disconnect().await;
    let n = |k: &str| status[k].as_u64().unwrap_or(0);
    Ok(Outcome {
        fleet: Some(fleet),
        rows,
        totals: (n("total"), n("converged"), n("failed")),
        converge_time,
        rollouts,
        compliance,
        audit,
        incident,
    })
}

/// A camera goes rogue (an uplink to a host outside the city); the policy
/// catches it on its next report and one command cuts it off. Returns what
/// to print: the device, the rule's words, the incident.
async fn incident(op: &mut Operator, fleet: &Fleet) -> anyhow::Result<Option<Value>> {
    let Some(rogue) = fleet
        .manifest()
        .into_iter()
        .find(|d| d["class"] == "camera")
        .and_then(|d| d["id"].as_str().map(str::to_owned))
    else {
        return Ok(None);
    };
    println!(
        "
An incident: {rogue} opens an uplink to 203.0.113.66:4444"
    );
    fleet.tamper(&rogue, "uplink", json!("203.0.113.66:4444"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let why = loop {
        let d = op.query("describe", json!({"id": rogue})).await?;
        if let Some(v) = d["violations"].get("no-unknown-uplink") {
            break v["reason"].as_str().unwrap_or_default().to_owned();
        }
        if Instant::now() > deadline {
            bail!("the policy did not catch {rogue} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("  detected by policy rule no-unknown-uplink: {why}");
    let r = op
        .query(
            "quarantine",
            json!({"target": {"ids": [rogue]},
                   "reason": format!("rule no-unknown-uplink: {why}")}),
        )
        .await?;
    println!(
        "  cityplane quarantine --ids {rogue} --reason …  -> incident {}: certificate refused, session cut",
        r["incident"].as_str().unwrap_or("")
    );
    // The broker cut it before the answer; the controller's record says so.
    let d = op.query("describe", json!({"id": rogue})).await?;
    Ok(Some(
        json!({"id": rogue, "incident": r["incident"], "online": d["online"]}),
    ))
}

/// The city's security policy, as data: published in report mode (the
/// compliance table shows who breaks it), then enforced (remediation
/// rollouts, in waves). Returns the reports before and after.
async fn security_policy(
    op: &mut Operator,
    report: &std::path::Path,
) -> anyhow::Result<(Value, Value)> {
    println!(
        "\nOne security policy for every party (city IT, lighting contractor, camera integrator):"
    );
    for (name, scope, rights) in [
        (
            "lighting-co",
            json!({"class": "streetlight"}),
            json!(["read", "write", "rollout"]),
        ),
        (
            "camera-int",
            json!({"class": "camera"}),
            json!(["read", "rollout"]),
        ),
    ] {
        let r = op
            .query(
                "org-create",
                json!({"name": name, "scope": scope, "rights": rights}),
            )
            .await?;
        println!(
            "  organisation {name:<12} sees {:>4} devices ({scope}), rights {rights}",
            r["devices"]
        );
    }
    let baseline = json!({"services": {"ssh": false, "telnet": false},
                          "default_password_changed": true, "ntp": "ntp.city.local"});
    let policy = |mode: &str| {
        json!({
            "description": "City of Example: IoT security policy",
            "mode": mode,
            "rules": [
                {"id": "camera-default-password", "severity": "critical",
                 "description": "Cameras do not run with the vendor's default admin password",
                 "selector": {"class": "camera"},
                 "check": {"reported": "security.default_password_changed", "equals": true},
                 "remediation": {"set": {"admin_password_hash":
                     "$argon2id$v=19$m=19456,t=2,p=1$Y2l0eXBsYW5l$rotated-by-policy"}}},
                {"id": "lamp-telnet-off", "severity": "high",
                 "description": "Street lights have telnet off",
                 "selector": {"class": "streetlight"},
                 "check": {"reported": "security.services.telnet", "equals": false},
                 "remediation": {"set": {"security": baseline}}},
                {"id": "lamp-city-ntp", "severity": "medium",
                 "description": "Street lights take time from the city's NTP servers",
                 "selector": {"class": "streetlight"},
                 "check": {"reported": "security.ntp", "one_of": ["ntp.city.local"]},
                 "remediation": {"set": {"security": baseline}}},
                {"id": "lamp-firmware", "severity": "high",
                 "description": "Street lights run firmware 2.0.1 or later",
                 "selector": {"class": "streetlight"},
                 "check": {"reported": "firmware", "version_at_least": "2.0.1"}, "mode": "report"},
                {"id": "certificate-valid", "severity": "high",
                 "description": "Device certificates expire in more than 30 days",
                 "selector": {"all": true}, "check": {"certificate_valid_days": 30}, "mode": "report"},
                {"id": "seen-recently", "severity": "medium",
                 "description": "Every device was seen within the last 10 minutes",
                 "selector": {"all": true}, "check": {"seen_within_minutes": 10}, "mode": "report"},
                {"id": "no-unknown-uplink", "severity": "critical",
                 "description": "No device opens an uplink outside the city's network",
                 "selector": {"all": true}, "check": {"reported": "uplink", "present": false},
                 "mode": "report"}
            ]
        })
    };
    let r = op
        .query("policy-apply", json!({"policy": policy("report")}))
        .await?;
    println!(
        "  policy v{} published in report mode: {} rules",
        r["version"], r["rules"]
    );
    // The first evaluation is on publication; give the summary a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = op.query("compliance", json!({"limit": 0})).await?;
    let r = op
        .query("policy-apply", json!({"policy": policy("enforce")}))
        .await?;
    println!(
        "  policy v{} enforces it: remediation rollouts, in waves, for the devices that break a rule",
        r["version"]
    );
    let fixing = bar(before["total"].as_u64().unwrap_or(0), "devices compliant");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut after;
    loop {
        after = op.query("compliance", json!({"limit": 2000})).await?;
        fixing.set_position(after["compliant"].as_u64().unwrap_or(0));
        if after["compliant"] == after["total"] || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    fixing.finish_with_message(format!("{}% compliant", after["compliant_pct"]));
    // One more compliance tick, so the chart's last point is this one.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    after = op.query("compliance", json!({"limit": 2000})).await?;
    let page = cityplane::compliance_html::render_html(&after);
    std::fs::write(report, page).with_context(|| format!("writing {}", report.display()))?;
    Ok((before, after))
}

/// Hardware models of the simulated streetlights.
const LAMP_MODELS: [&str; 3] = ["LumiNode SL-200", "LumiNode SL-300", "Orbis LX-4"];

/// Writes an image of `kib` KiB and signs it; the release file's path.
fn signed(
    dir: &std::path::Path,
    version: &str,
    kib: usize,
    models: &[&str],
    downgrade: bool,
) -> anyhow::Result<(cityplane_proto::firmware::SignedRelease, std::path::PathBuf)> {
    let key = firmware::read_release_key(&dir.join(firmware::RELEASE_KEY_FILE))?;
    // Each version its own bytes.
    let seed = version
        .bytes()
        .fold(kib as u64, |h, b| h * 131 + u64::from(b));
    let mut rng = fastrand::Rng::with_seed(seed);
    let image: Vec<u8> = (0..kib * 1024).map(|_| rng.u8(..)).collect();
    let path = dir.join(format!("lamp-{version}.bin"));
    std::fs::write(&path, &image)?;
    let release = firmware::sign_image(&key, version, models, &image, downgrade)?;
    Ok((release, path))
}

/// Firmware in waves: a release whose build left one lamp model out (its
/// devices refuse it), so its second wave trips the abort and every lamp it
/// reached is rolled back; then a fixed release, to every streetlight.
async fn firmware_rollouts(
    op: &mut Operator,
    release_dir: &std::path::Path,
) -> anyhow::Result<Vec<Value>> {
    println!(
        "
Firmware, signed with a release key that is not the CA, rolled out in waves:"
    );
    let releases = [
        // The 2.0.0 build left the Orbis LX-4 out: those lamps refuse it.
        ("2.0.0", &LAMP_MODELS[..2], false),
        ("2.0.1", &LAMP_MODELS[..], false),
        // What a rollback installs: signed to go below the 2.0.0 floor.
        ("1.4.2", &LAMP_MODELS[..], true),
        ("1.3.9", &LAMP_MODELS[..], true),
    ];
    for (version, models, downgrade) in releases {
        let (release, image) = signed(release_dir, version, 256, models, downgrade)?;
        let r = op
            .publish_release(&release, &image, 32 * 1024, |_| {})
            .await?;
        println!(
            "  published {version:<6} {} KiB for {}{}",
            r["size"].as_u64().unwrap_or(0) / 1024,
            models.join(", "),
            if downgrade {
                " (rollback: may go below the floor)"
            } else {
                ""
            }
        );
    }
    let specs = [
        // Waves spread over hardware models: the canary has each model.
        json!({"name": "lamps-2-0-0", "target": {"class": "streetlight"}, "firmware": "2.0.0",
               "waves": [{"count": 5}, {"percent": 25}, {"percent": 100}], "spread_by": "hw",
               "success_threshold": 60, "health": {"soak_s": 2},
               "abort": [{"failure": "any", "threshold_percent": 20, "min_executed": 15}],
               "rollback": true}),
        json!({"name": "lamps-2-0-1", "target": {"class": "streetlight"}, "firmware": "2.0.1",
               "waves": [{"count": 5}, {"percent": 25}, {"percent": 100}], "spread_by": "hw",
               "success_threshold": 95, "health": {"soak_s": 2},
               "abort": [{"failure": "any", "threshold_percent": 10, "min_executed": 10}],
               "rollback": true}),
    ];
    for spec in specs {
        let name = spec["name"].as_str().unwrap_or_default().to_owned();
        let r = op.query("rollout-create", spec).await?;
        println!(
            "
rollout {name}: {} streetlights in waves of {}",
            r["devices"], r["waves"]
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        let watched = crate::rollout_cmd::status_until(
            op,
            &name,
            true,
            0.5,
            crate::ops_cmd::Output::Table,
            Some(deadline),
        )
        .await;
        if let Err(e) = watched {
            println!("  {e:#}");
        }
        // A rollback goes on after the abort: wait for it to land.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let s = op.query("rollout-status", json!({"name": name})).await?;
            // A device still installing the aborted release takes the
            // rollback once it has rebooted.
            let busy: u64 = [
                "rolling_back",
                "rollback_failed",
                "notified",
                "downloading",
                "installing",
                "rebooting",
                "verifying",
            ]
            .iter()
            .map(|k| s["totals"][*k].as_u64().unwrap_or(0))
            .sum();
            if busy == 0 || Instant::now() > until {
                println!(
                    "  {name}: {} ({})",
                    s["phase"].as_str().unwrap_or(""),
                    s["totals"]
                        .as_object()
                        .map(|m| m
                            .iter()
                            .map(|(k, v)| format!("{k} {v}"))
                            .collect::<Vec<_>>()
                            .join(", "))
                        .unwrap_or_default()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let list = op.query("get-rollouts", json!({})).await?;
    Ok(list["rollouts"].as_array().cloned().unwrap_or_default())
}

/// The registry before the change: devices per class and zone.
fn print_registry(manifest: &[Value]) {
    let mut zones: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    for d in manifest {
        let class = d["class"].as_str().unwrap_or("-").to_owned();
        let zone = d["labels"]["zone"].as_str().unwrap_or("-").to_owned();
        zones.insert(zone.clone());
        *counts.entry((class, zone)).or_default() += 1;
    }
    let classes: std::collections::BTreeSet<&String> = counts.keys().map(|(c, _)| c).collect();
    print!("\nregistry: {:<12}", "CLASS");
    for z in &zones {
        print!(" {z:>7}");
    }
    println!(" {:>7}", "TOTAL");
    for c in classes {
        print!("          {c:<12}");
        let mut total = 0;
        for z in &zones {
            let n = counts.get(&(c.clone(), z.clone())).copied().unwrap_or(0);
            total += n;
            print!(" {n:>7}");
        }
        println!(" {total:>7}");
    }
    println!();
}

/// Streetlights per firmware version, and how each rollout ended.
fn print_firmware(rows: &[Value], rollouts: &[Value]) {
    let mut versions: BTreeMap<String, u64> = BTreeMap::new();
    for r in rows.iter().filter(|r| r["class"] == "streetlight") {
        *versions
            .entry(r["firmware"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    let line: Vec<String> = versions.iter().map(|(v, n)| format!("{v}: {n}")).collect();
    println!(
        "
streetlight firmware  {}",
        line.join(", ")
    );
    for r in rollouts.iter().rev() {
        println!(
            "rollout {:<14} {:<10} {}",
            r["name"].as_str().unwrap_or(""),
            r["phase"].as_str().unwrap_or(""),
            r["reason"].as_str().unwrap_or("")
        );
    }
}

fn print_table(rows: &[Value]) {
    #[derive(Default)]
    struct Counts {
        total: u64,
        online: u64,
        converged: u64,
        failed: u64,
        quarantined: u64,
    }
    let mut by_class: BTreeMap<String, Counts> = BTreeMap::new();
    for r in rows {
        let c = by_class
            .entry(r["class"].as_str().unwrap_or("?").to_owned())
            .or_default();
        c.total += 1;
        c.online += u64::from(r["online"] == true);
        c.converged += u64::from(r["converged"] == true);
        c.failed += u64::from(r["failed"] == true);
        c.quarantined += u64::from(r["quarantined"] == true);
    }
    println!(
        "\n{:<14} {:>7} {:>7} {:>10} {:>7} {:>12}",
        "CLASS", "TOTAL", "ONLINE", "CONVERGED", "FAILED", "QUARANTINED"
    );
    let mut all = Counts::default();
    for (class, c) in &by_class {
        println!(
            "{class:<14} {:>7} {:>7} {:>10} {:>7} {:>12}",
            c.total, c.online, c.converged, c.failed, c.quarantined
        );
        all.total += c.total;
        all.online += c.online;
        all.converged += c.converged;
        all.failed += c.failed;
        all.quarantined += c.quarantined;
    }
    println!(
        "{:<14} {:>7} {:>7} {:>10} {:>7} {:>12}",
        "all", all.total, all.online, all.converged, all.failed, all.quarantined
    );
}
