//! Shell completions and man pages, generated from the clap definitions of fluxd and fluxctl
//! (`fluxd completions SHELL`, `fluxd man DIR`, and the same for fluxctl), so that they can
//! never disagree with `--help`. `scripts/install` installs them.

use std::io::Write;
use std::path::Path;

pub use clap_complete::Shell;

/// Writes the completion script for `shell` to stdout.
pub fn completions(mut cmd: clap::Command, shell: Shell) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    std::io::stdout().write_all(&out)
}

/// Writes one man page (section 1) per command and subcommand into `dir`, and prints each
/// file's path.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let before: std::collections::BTreeSet<_> = list(dir)?;
    clap_mangen::generate_to(cmd, dir)?;
    for p in list(dir)? {
        if !before.contains(&p) || p.extension().is_some_and(|e| e == "1") {
            println!("{}", p.display());
        }
    }
    Ok(())
}

fn list(dir: &Path) -> std::io::Result<std::collections::BTreeSet<std::path::PathBuf>> {
    std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect()
}
