//! Mechanical invariants of ARCHITECTURE.md, checked on every `cargo test`
//! by reading the source tree (as rust-analyzer's `tidy.rs` does): which
//! crate may depend on rumqttd, sled and rcgen, where sled and rustls'
//! `danger` API may be used, that no source chmods a file, and that only
//! `proto` spells topic strings.

use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The workspace members' directories, from the root `Cargo.toml` (`.` is
/// the `cityplane` binary's package).
fn members() -> Vec<String> {
    let manifest = std::fs::read_to_string(workspace().join("Cargo.toml")).expect("Cargo.toml");
    let line = manifest
        .lines()
        .find(|l| l.starts_with("members = ["))
        .expect("a one-line members list");
    let out: Vec<String> = line
        .split('"')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(out.len() >= 7, "found the members: {out:?}");
    out
}

/// A member's name in messages: its directory, `cityplane` for the root.
fn member_name(dir: &str) -> &str {
    if dir == "." {
        "cityplane"
    } else {
        dir
    }
}

/// `(crate, dependency names)` of the `[dependencies]` table of every
/// member (dev-dependencies excluded).
fn dependencies() -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for member in members() {
        let manifest = std::fs::read_to_string(workspace().join(&member).join("Cargo.toml"))
            .expect("member manifest");
        let mut in_deps = false;
        let mut deps = Vec::new();
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                in_deps = line == "[dependencies]";
                continue;
            }
            if in_deps {
                if let Some((name, _)) = line.split_once('=') {
                    let name = name.trim().trim_end_matches(".workspace").trim();
                    if !name.is_empty() && !name.starts_with('#') {
                        deps.push(name.to_owned());
                    }
                }
            }
        }
        out.push((member_name(&member).to_owned(), deps));
    }
    out
}

/// Every `.rs` file of every member, with its path relative to the
/// workspace (`src/main.rs`, `broker/src/lib.rs`).
fn sources() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).expect("prefix");
                let text = std::fs::read_to_string(&path).expect("read");
                out.push((rel.to_string_lossy().into_owned(), text));
            }
        }
    }
    let root = workspace();
    let mut out = Vec::new();
    for member in members() {
        // The root package's own code; the other members are walked as such.
        for sub in ["src", "tests", "benches", "examples"] {
            let dir = root.join(&member).join(sub);
            if dir.is_dir() {
                walk(&dir, &root, &mut out);
            }
        }
    }
    assert!(out.len() > 50, "found the sources: {}", out.len());
    out
}

/// Shipped code: a `src/` directory of a member.
fn shipped(path: &str) -> bool {
    path.starts_with("src/") || path.contains("/src/")
}

/// Who may depend on what (ARCHITECTURE.md, "API boundaries").
#[test]
fn heavy_dependencies_stay_inside_their_crates() {
    let allowed: [(&str, &[&str]); 4] = [
        // The router; the controller reads it through the broker's typed link.
        ("rumqttd", &["broker"]),
        ("sled", &["controller"]),
        ("postgres", &["controller"]),
        // Signing is the CA's job; testkit forges certificates for tests.
        ("rcgen", &["certs", "testkit"]),
    ];
    let mut wrong = Vec::new();
    for (krate, deps) in dependencies() {
        for (dep, who) in allowed {
            if deps.iter().any(|d| d == dep) && !who.contains(&krate.as_str()) {
                wrong.push(format!("{krate} depends on {dep} (allowed: {who:?})"));
            }
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn only_the_store_touches_sled() {
    let wrong: Vec<String> = sources()
        .into_iter()
        .filter(|(path, text)| {
            text.contains("sled::")
                && path != "controller/src/store.rs"
                && path != "controller/src/store/sled_engine.rs"
                && path != "tests/it/tidy.rs"
                // The power-loss helper drives stock sled on purpose.
                && path != "controller/tests/it/store_torture.rs"
        })
        .map(|(path, _)| path)
        .collect();
    assert!(wrong.is_empty(), "sled used outside the store: {wrong:?}");
}

/// The PostgreSQL client is the store's alone: its engine and the
/// connections of its own beside it (leases, shard leases, the listener
/// of global changes) under `controller/src/store/`. Tests drive a server
/// through `psql` (testkit's `postgres.rs`).
#[test]
fn only_the_store_touches_postgres() {
    let wrong: Vec<String> = sources()
        .into_iter()
        .filter(|(path, text)| {
            text.replace("cityplane_testkit::postgres", "")
                .contains("postgres::")
                && !path.starts_with("controller/src/store/")
                && path != "tests/it/tidy.rs"
        })
        .map(|(path, _)| path)
        .collect();
    assert!(
        wrong.is_empty(),
        "postgres used outside its store engine: {wrong:?}"
    );
}

#[test]
fn no_chmod_and_no_dangerous_tls_outside_the_verifier() {
    let mut wrong = Vec::new();
    for (path, text) in sources() {
        let test_code = !shipped(&path);
        // Keys are created 0600; a chmod after the fact leaves a window.
        if !test_code && text.contains("set_permissions") {
            wrong.push(format!("{path}: set_permissions"));
        }
        // The client-certificate verifier wraps webpki's; nothing else may
        // reach for rustls' `danger` API (a verifier that accepts anything).
        if !test_code && text.contains("danger") && path != "broker/src/tls.rs" {
            wrong.push(format!("{path}: rustls danger API"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Shipped code outside `proto` builds every topic through
/// `cityplane_proto::topics`: a topic spelled twice drifts (unit tests at the
/// end of a file, after `#[cfg(test)]`, may spell the topics they check).
#[test]
fn only_proto_spells_topic_strings() {
    let mut wrong = Vec::new();
    for (path, text) in sources() {
        if !shipped(&path) || path.starts_with("proto/") {
            continue;
        }
        let shipped = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (n, line) in shipped.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for prefix in ["\"devices/", "\"fleet/", "\"$share", "\"$SYS"] {
                if line.contains(prefix) {
                    wrong.push(format!("{path}:{}: {}", n + 1, line.trim()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "topic strings outside proto: {wrong:#?}");
}

/// The controller's core (fleet state, reconcile, merge) is pure: time
/// comes in as an argument and nothing touches the file system, the network
/// or a runtime, so table and property tests drive it without I/O.
/// Maintenance windows too (only jiff reads a file: the time zone database).
#[test]
fn the_controller_core_reads_no_clock_and_does_no_io() {
    let mut core: Vec<String> = [
        "controller/src/fleet.rs",
        "controller/src/rollout.rs",
        "controller/src/window.rs",
        "controller/src/reconcile.rs",
        "controller/src/delta.rs",
    ]
    .map(String::from)
    .to_vec();
    // Every part of the fleet's state, those added later too (only
    // `fleet/rollouts.rs` was listed, and `fleet/incidents.rs` read the
    // clock).
    let parts: Vec<String> = sources()
        .into_iter()
        .map(|(path, _)| path)
        .filter(|p| p.starts_with("controller/src/fleet/"))
        .collect();
    assert!(parts.len() >= 5, "the fleet's parts: {parts:?}");
    core.extend(parts);
    let core: Vec<&str> = core.iter().map(String::as_str).collect();
    let forbidden = [
        "now_ms(",
        "SystemTime",
        "Instant",
        "std::fs",
        "std::net",
        "tokio::",
        "sled::",
    ];
    let wrong = lines_containing(&core, &forbidden, true);
    assert!(
        wrong.is_empty(),
        "I/O or clock in the controller core: {wrong:#?}"
    );
}

/// The simulated device's rules (commands, firmware updates) are pure too:
/// its session loop passes time in and sends what they decide, so unit
/// tests drive them without TLS. Its tests may read the clock.
#[test]
fn the_device_rules_read_no_clock_and_do_no_io() {
    let forbidden = [
        "::now(",
        "SystemTime",
        "std::fs",
        "std::net",
        "tokio::net",
        "tokio::sync",
        "tokio::time::sleep",
        "crate::mqtt",
    ];
    let wrong = lines_containing(&["agent-sim/src/behaviour.rs"], &forbidden, false);
    assert!(
        wrong.is_empty(),
        "I/O or clock in the device rules: {wrong:#?}"
    );
}

/// The security policy is evaluated on every report by the controller and
/// offline by the CLI: one pure function of its arguments (time included),
/// so both give the same verdict and tests need no clock.
#[test]
fn the_policy_core_reads_no_clock_and_does_no_io() {
    let forbidden = [
        "::now(",
        "SystemTime",
        "Instant",
        "std::fs",
        "std::net",
        "tokio",
    ];
    let wrong = lines_containing(&["proto/src/policy.rs"], &forbidden, true);
    assert!(
        wrong.is_empty(),
        "I/O or clock in the policy core: {wrong:#?}"
    );
}

/// `path:line: text` of every line of `files` outside comments (and, unless
/// `with_tests`, before their unit tests) that contains one of `forbidden`.
fn lines_containing(files: &[&str], forbidden: &[&str], with_tests: bool) -> Vec<String> {
    let mut wrong = Vec::new();
    for (path, text) in sources() {
        if !files.contains(&path.as_str()) {
            continue;
        }
        let checked = if with_tests {
            text.as_str()
        } else {
            text.split("#[cfg(test)]").next().unwrap_or_default()
        };
        for (n, line) in checked.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            if forbidden.iter().any(|f| line.contains(f)) {
                wrong.push(format!("{path}:{}: {}", n + 1, line.trim()));
            }
        }
    }
    wrong
}
