//! `cityplane serve --store postgres://…`, as a user sees it: the real
//! binary on a throwaway PostgreSQL (`cityplane_testkit::postgres`),
//! simulated devices and an operator over mutual TLS.
//!
//! Documents applied and converged survive a restart of the server; while
//! PostgreSQL is down a write is refused with `storage_unavailable` and a
//! reason that says the database is unavailable, queries keep being
//! answered from memory; once it is back, writes are accepted without a
//! restart and nothing acknowledged before the outage is lost. A server
//! that hangs (every process stopped: connections stay open, nothing
//! answers) is the same outage once the URL's `socket_timeout` has passed,
//! not a controller stuck until someone restarts it. The URL's password
//! never reaches the log.
//!
//! Skipped without PostgreSQL 15's binaries, unless
//! `CITYPLANE_REQUIRE_POSTGRES=1` (CI), where it fails.

use crate::common::{free_port, online_fleet, Server};
use crate::disk_full::{
    accepted, apply, assert_not_found, audit, doc, operator, pki_with_devices, query, read,
    wait_converged, DEADLINE, DEVICES,
};

use cityplane_testkit::postgres::Postgres;
use serde_json::json;

/// Trust authentication ignores it; it is there to be kept out of the log.
const PASSWORD: &str = "pw-never-logged";

/// The URL's `socket_timeout`: how long a statement waits for a hung
/// server (the default, 30 s, would outlast the operator's 10 s).
const SOCKET_TIMEOUT_SECS: u64 = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_postgres_keeps_state_across_restarts_and_outages() {
    if !cityplane_testkit::postgres::available(
        "serve_on_postgres_keeps_state_across_restarts_and_outages",
    ) {
        return;
    }
    let mut pg = Postgres::start().expect("PostgreSQL starts");
    let url = pg
        .url()
        .replace("postgres@", &format!("postgres:{PASSWORD}@"))
        + &format!("?socket_timeout={SOCKET_TIMEOUT_SECS}");
    let work = tempfile::Builder::new()
        .prefix("cityplane-pg-e2e-")
        .tempdir()
        .expect("tempdir");
    let data = work.path().join("data");
    let log = work.path().join("serve.log");
    let pki_dir = pki_with_devices(work.path());
    let port = free_port();
    let start = || Server::start_with(&pki_dir, &data, port, &log, "info", &["--store", &url]);
    let restart = || async {
        let mut server = start();
        let op = operator(&pki_dir, port, &mut server, &log).await;
        (server, op)
    };

    // 1. A document, applied and converged, on PostgreSQL.
    let (server, mut op) = restart().await;
    let fleet = online_fleet(&pki_dir, port, DEVICES, DEADLINE).await;
    let answer = apply(&mut op, doc("baseline", 0, "02:00-04:00")).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    wait_converged(&mut op, &fleet, "02:00-04:00", "baseline").await;
    let stored = pg
        .psql("SELECT count(*) FROM cityplane_kv WHERE tree = 'devices'")
        .expect("psql");
    assert_eq!(
        stored,
        DEVICES.to_string(),
        "device records are in PostgreSQL"
    );
    assert!(
        !data.join("db").exists() && !data.join("conf").exists(),
        "no sled database next to the firmware and the secrets key"
    );

    // 2. Restart the server: everything is still there.
    op.disconnect().await;
    let exit = server.stop(DEADLINE);
    assert!(exit.success(), "serve exited with {exit}: {}", read(&log));
    let (mut server, mut op) = restart().await;
    assert!(fleet.wait_online(DEVICES, DEADLINE).await, "fleet back");
    wait_converged(&mut op, &fleet, "02:00-04:00", "after restart").await;
    let dev = query(&mut op, "describe", json!({"id": "dev0001"})).await;
    assert_eq!(
        dev["reported"]["maintenance_window"], "02:00-04:00",
        "{dev}"
    );

    // 3. PostgreSQL goes away: a write is refused, clearly, reads answer.
    pg.stop().expect("stop PostgreSQL");
    let answer = apply(&mut op, doc("while-down", 20, "down")).await;
    assert_eq!(answer["status"], "rejected", "{answer}");
    assert_eq!(answer["code"], "storage_unavailable", "{answer}");
    let reason = answer["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("database is unavailable"), "{answer}");
    assert!(!reason.contains(PASSWORD), "{answer}");
    let st = query(&mut op, "status", json!({})).await;
    assert_eq!(
        (&st["total"], &st["converged"]),
        (&json!(DEVICES), &json!(DEVICES)),
        "{st}"
    );
    assert_not_found(&mut op, "while-down", "while PostgreSQL is down").await;
    let entries = audit(&mut op).await.expect("audit from memory");
    assert_eq!(accepted(&entries), [("baseline", 1)], "{entries:?}");
    assert!(
        server.alive(),
        "serve died without its database: {}",
        read(&log)
    );
    assert_eq!(
        fleet
            .count_with("maintenance_window", &json!("down"), None)
            .0,
        0
    );

    // 4. It is back: writes are accepted without a restart of serve.
    pg.start_again().expect("start PostgreSQL again");
    let answer = apply(&mut op, doc("recovered", 10, "03:00-05:00")).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    wait_converged(&mut op, &fleet, "03:00-05:00", "recovered").await;

    // 5. It hangs: the write is refused once the deadline has passed, as
    // when it is down; reads answer; once it answers again, so do writes.
    pg.freeze().expect("stop every PostgreSQL process");
    let answer = apply(&mut op, doc("while-hung", 30, "hung")).await;
    assert_eq!(answer["status"], "rejected", "{answer}");
    assert_eq!(answer["code"], "storage_unavailable", "{answer}");
    let reason = answer["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&format!(
            "did not answer within {SOCKET_TIMEOUT_SECS} s (socket_timeout"
        )),
        "{answer}"
    );
    let st = query(&mut op, "status", json!({})).await;
    assert_eq!(st["converged"], json!(DEVICES), "{st}");
    assert!(server.alive(), "serve died: {}", read(&log));
    pg.thaw().expect("let PostgreSQL go on");
    let answer = apply(&mut op, doc("thawed", 40, "04:00-06:00")).await;
    assert_eq!(answer["status"], "accepted", "{answer}");
    wait_converged(&mut op, &fleet, "04:00-06:00", "after the hang").await;

    // 6. Restart once more: the accepted documents, not the refused ones.
    op.disconnect().await;
    let exit = server.stop(DEADLINE);
    assert!(exit.success(), "serve exited with {exit}: {}", read(&log));
    let (server, mut op) = restart().await;
    assert!(fleet.wait_online(DEVICES, DEADLINE).await, "fleet back");
    wait_converged(
        &mut op,
        &fleet,
        "04:00-06:00",
        "after the outage and a restart",
    )
    .await;
    assert_not_found(&mut op, "while-down", "after restart").await;
    assert_not_found(&mut op, "while-hung", "after restart").await;
    let entries = audit(&mut op).await.expect("audit");
    let names: Vec<&str> = accepted(&entries).iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["baseline", "recovered", "thawed"], "{entries:?}");
    for refused in ["while-down", "while-hung"] {
        assert!(
            entries
                .iter()
                .any(|(n, r)| n == refused && r.starts_with("rejected (storage_unavailable)")),
            "the refusal of {refused} is audited once the database is back: {entries:?}"
        );
    }

    let log_text = read(&log);
    assert!(log_text.contains("unavailable"), "the outage is logged");
    assert!(!log_text.contains(PASSWORD), "the password reached the log");
    assert!(!log_text.contains("panicked"), "serve panicked: {log_text}");
    op.disconnect().await;
    fleet.shutdown().await;
    let exit = server.stop(DEADLINE);
    assert!(exit.success(), "serve exited with {exit}: {}", read(&log));
}
