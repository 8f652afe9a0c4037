//! `cityplane certs` and the servers after the security review (issue 8), as
//! an operator runs them: the binary, its output and exit status.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cityplane_testkit::process::ChildGuard;

const BIN: &str = env!("CARGO_BIN_EXE_cityplane");

fn cityplane(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("CITYPLANE_PKI")
        .env_remove("RUST_LOG")
        .output()
        .expect("cityplane runs")
}

/// Runs and insists on success; returns stdout.
fn ok(args: &[&str]) -> String {
    crate::common::stdout_of_success(args, cityplane(args))
}

/// Runs and insists on failure; returns stderr.
fn fails(args: &[&str]) -> String {
    let out = cityplane(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The serial `certs issue` printed.
fn serial_of(issue_output: &str) -> String {
    issue_output
        .lines()
        .find_map(|l| l.trim().strip_prefix("serial"))
        .map(|s| s.trim().to_owned())
        .expect("serial line")
}

#[test]
fn revoke_and_rotate_work_without_the_certificate_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    ok(&["certs", "init", "--pki", s(&pki)]);

    let lost = serial_of(&ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "device",
        "--id",
        "lamp1",
    ]));
    std::fs::remove_file(pki.join("lamp1.crt")).expect("rm");
    let err = fails(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "device",
        "--id",
        "lamp1",
    ]);
    assert!(err.contains(&lost) && err.contains("--rotate"), "{err}");
    let out = ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "device",
        "--id",
        "lamp1",
        "--rotate",
    ]);
    assert!(out.contains(&format!("revoked    {lost} (old)")), "{out}");

    let lost = serial_of(&ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "device",
        "--id",
        "lamp2",
    ]));
    std::fs::remove_file(pki.join("lamp2.crt")).expect("rm");
    let out = ok(&["certs", "revoke", "--pki", s(&pki), "--serial", &lost]);
    assert!(
        out.contains(&format!("revoked certificate {lost} of lamp2")),
        "{out}"
    );
    // Again: already revoked, still success (the CRL is re-signed).
    let out = ok(&["certs", "revoke", "--pki", s(&pki), "--serial", &lost]);
    assert!(out.contains("already revoked"), "{out}");

    let lost = serial_of(&ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "operator",
        "--id",
        "alice",
        "--org",
        "city",
    ]));
    std::fs::remove_file(pki.join("alice.crt")).expect("rm");
    let out = ok(&["certs", "revoke", "--pki", s(&pki), "--id", "alice"]);
    assert!(out.contains(&lost), "{out}");

    let revoked = std::fs::read_to_string(pki.join("revoked.json")).expect("revoked.json");
    assert!(revoked.contains(&lost), "{revoked}");
}

#[test]
fn init_refuses_a_world_writable_directory() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("shared");
    std::fs::create_dir(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let err = fails(&["certs", "init", "--pki", s(&dir)]);
    assert!(err.contains("chmod 700"), "{err}");
    assert!(!dir.join("ca.key").exists());
}

#[test]
fn export_server_crl_and_revoke_also_keep_a_server_dir_current() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let srv = tmp.path().join("server-pki");
    ok(&["certs", "init", "--pki", s(&pki)]);
    let out = ok(&["certs", "export-server", "--pki", s(&pki), "--out", s(&srv)]);
    assert!(out.contains("no ca.key"), "{out}");
    assert!(!srv.join("ca.key").exists(), "ca.key is never exported");
    let mode = std::fs::metadata(srv.join("broker.key"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let serial = serial_of(&ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "device",
        "--id",
        "d1",
    ]));
    let out = ok(&[
        "certs",
        "revoke",
        "--pki",
        s(&pki),
        "--id",
        "d1",
        "--also",
        s(&srv),
    ]);
    assert!(
        out.contains(&format!(
            "copied revoked.json, crl.pem and issued.jsonl to {}",
            srv.display()
        )),
        "{out}"
    );
    let list = std::fs::read_to_string(srv.join("revoked.json")).expect("server list");
    assert!(list.contains(&serial), "{list}");

    let out = ok(&["certs", "crl", "--pki", s(&pki), "--also", s(&srv)]);
    assert!(out.contains("1 revoked serial(s)); next update"), "{out}");
    assert_eq!(
        std::fs::read(srv.join("crl.pem")).expect("crl"),
        std::fs::read(pki.join("crl.pem")).expect("crl")
    );
    // The CA directory is not a server directory.
    let err = fails(&["certs", "crl", "--pki", s(&pki), "--also", s(&pki)]);
    assert!(err.contains("ca.key"), "{err}");
}

/// Starts `cityplane broker` on `pki` and returns its stderr up to the line
/// saying it listens.
fn broker_stderr_until_listening(pki: &Path) -> String {
    let mut child = Command::new(BIN)
        .args(["broker", "--listen", "127.0.0.1:0", "--pki", s(pki)])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("broker starts");
    let stderr = child.stderr.take().expect("stderr");
    let _guard = ChildGuard::new(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = String::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("broker did not say it listens; stderr so far:\n{got}"));
        got += &line;
        got.push('\n');
        if line.contains("listening on") {
            return got;
        }
    }
}

#[test]
fn broker_warns_when_its_directory_holds_the_ca_key() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let srv = tmp.path().join("server-pki");
    ok(&["certs", "init", "--pki", s(&pki)]);
    ok(&["certs", "export-server", "--pki", s(&pki), "--out", s(&srv)]);

    let err = broker_stderr_until_listening(&pki);
    let warnings: Vec<&str> = err.lines().filter(|l| l.contains("ca.key")).collect();
    assert_eq!(warnings.len(), 1, "one warning line:\n{err}");
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("export-server"),
        "{err}"
    );

    let err = broker_stderr_until_listening(&srv);
    assert!(
        !err.contains("ca.key"),
        "no warning on a server directory:\n{err}"
    );
}

/// `serve --print-config` prints the configuration and exits, as `broker
/// --print-config` does (it used to start serving).
#[test]
fn serve_print_config_prints_and_exits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = ChildGuard::new(
        Command::new(BIN)
            .args(["serve", "--print-config", "--data"])
            .arg(dir.path().join("data"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "serve --print-config kept running"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
        .expect("read");
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("listen") && out.contains("data"), "{out}");
    assert!(!dir.path().join("data").exists(), "it opened the database");
}

#[test]
fn an_operator_is_issued_into_an_organisation_and_nothing_else_is() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    ok(&["certs", "init", "--pki", s(&pki)]);
    fn with<'a>(pki: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["certs", "issue", "--pki", pki];
        args.extend_from_slice(extra);
        args
    }
    let issue = |extra: &[&'static str]| with(s(&pki), extra);
    let err = fails(&issue(&["--role", "operator", "--id", "bob"]));
    assert!(
        err.contains("--org city") && err.contains("--org lighting-co"),
        "{err}"
    );
    let err = fails(&issue(&["--role", "device", "--id", "d1", "--org", "city"]));
    assert!(err.contains("--org is for operators"), "{err}");
    let err = fails(&issue(&[
        "--role", "operator", "--id", "bob", "--org", "Bad/Org",
    ]));
    assert!(err.contains("organisation"), "{err}");
    ok(&issue(&[
        "--role",
        "operator",
        "--id",
        "bob",
        "--org",
        "lighting-co",
    ]));
    ok(&issue(&["--role", "device", "--id", "d1"]));

    let list = ok(&["certs", "list", "--pki", s(&pki)]);
    let row = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(id))
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("{id} listed: {list}"))
    };
    assert_eq!(row("bob")[1..3], ["operator", "lighting-co"], "{list}");
    assert_eq!(row("d1")[1..3], ["device", "-"], "{list}");
    let issued = std::fs::read_to_string(pki.join("issued.jsonl")).expect("issued.jsonl");
    assert!(issued.contains(r#""org":"lighting-co""#), "{issued}");
}

/// Issue 12: `certs rotate --id` with an overlap keeps the old certificate
/// working until a stated instant, and `certs list` says so.
#[test]
fn certs_rotate_with_an_overlap_lists_the_old_serial_as_revoked_from_later() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = tmp.path().join("pki");
    let srv = tmp.path().join("srv");
    ok(&["certs", "init", "--pki", s(&pki)]);
    let old = serial_of(&ok(&[
        "certs",
        "issue",
        "--pki",
        s(&pki),
        "--role",
        "operator",
        "--id",
        "op",
        "--org",
        "lighting-co",
    ]));
    ok(&["certs", "export-server", "--pki", s(&pki), "--out", s(&srv)]);

    let out = ok(&[
        "certs",
        "rotate",
        "--pki",
        s(&pki),
        "--id",
        "op",
        "--overlap",
        "1h",
        "--also",
        s(&srv),
    ]);
    let new = serial_of(&out);
    assert_ne!(new, old);
    let until = out
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("old        {old} works until "))
        })
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no 'works until' line for {old}: {out}"));
    let until_t =
        time::OffsetDateTime::parse(until, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
    let from_now = until_t - time::OffsetDateTime::now_utc();
    assert!(
        from_now > time::Duration::minutes(55) && from_now <= time::Duration::hours(1),
        "{until} is not an hour from now"
    );
    assert!(
        out.contains("certs crl") && out.contains("copied revoked.json"),
        "{out}"
    );
    // The server directory got the pending entry.
    let published = std::fs::read_to_string(srv.join("revoked.json")).expect("published");
    assert!(
        published.contains(&old) && published.contains(until),
        "{published}"
    );

    // The new certificate is in place, its key private; same organisation.
    assert_eq!(
        std::fs::metadata(pki.join("op.key"))
            .expect("key")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let list = ok(&["certs", "list", "--pki", s(&pki)]);
    let line_of = |serial: &str| {
        list.lines()
            .find(|l| l.contains(serial))
            .unwrap_or_else(|| panic!("{serial} not listed: {list}"))
            .to_owned()
    };
    assert!(
        line_of(&old).contains(&format!("revoked from {until}")),
        "{list}"
    );
    let new_line = line_of(&new);
    assert!(
        new_line.contains("lighting-co") && new_line.trim_end().ends_with("no"),
        "{list}"
    );
    assert!(pki.join("op.crt").is_file());

    // The CRL does not list it yet, and `certs crl` says when it will.
    let crl = ok(&["certs", "crl", "--pki", s(&pki)]);
    assert!(
        crl.contains("(0 revoked serial(s))") && crl.contains(until),
        "{crl}"
    );

    // Refusals: too long an overlap, --overlap without --id, nothing to rotate.
    let err = fails(&[
        "certs",
        "rotate",
        "--pki",
        s(&pki),
        "--id",
        "op",
        "--overlap",
        "31d",
    ]);
    assert!(err.contains("at most 30 days"), "{err}");
    fails(&[
        "certs",
        "rotate",
        "--pki",
        s(&pki),
        "--server",
        "--overlap",
        "1h",
    ]);
    let err = fails(&["certs", "rotate", "--pki", s(&pki), "--id", "ghost"]);
    assert!(err.contains("no valid certificate"), "{err}");

    // The server's own certificate: a new one, a reminder to export and restart.
    let before = std::fs::read(pki.join("broker.crt")).expect("broker.crt");
    let out = ok(&["certs", "rotate", "--pki", s(&pki), "--server"]);
    assert!(
        out.contains("localhost, 127.0.0.1") && out.contains("export-server"),
        "{out}"
    );
    assert_ne!(
        std::fs::read(pki.join("broker.crt")).expect("broker.crt"),
        before
    );

    let help = ok(&["certs", "rotate", "--help"]);
    assert!(
        help.contains("Examples:") && help.contains("--overlap 24h"),
        "{help}"
    );
}
