//! Times bulk issuance: `cargo run --release -p cityplane-certs --example bulk_issue -- [COUNT] [DIR]`.
//!
//! Without DIR, a temporary directory is used and removed afterwards.

use std::time::Instant;

use cityplane_certs::Pki;
use cityplane_proto::Role;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let count: usize = args
        .next()
        .map(|c| c.parse())
        .transpose()?
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir()?;
    let dir = args
        .next()
        .map(Into::into)
        .unwrap_or_else(|| tmp.path().join("pki"));

    let pki = Pki::init(&dir, true)?;
    let start = Instant::now();
    let out = pki.issue_bulk(Role::Device, "dev", count, |_| {})?;
    let took = start.elapsed();
    println!(
        "issued {} device certificates (skipped {}) in {:.2} s: {:.0} certs/s, {} cores, in {}",
        out.issued.len(),
        out.skipped.len(),
        took.as_secs_f64(),
        out.issued.len() as f64 / took.as_secs_f64(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        dir.display()
    );
    let start = Instant::now();
    let listed = pki.list()?.len();
    println!("listed {listed} in {:.2} s", start.elapsed().as_secs_f64());
    Ok(())
}
