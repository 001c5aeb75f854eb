//! `--help` is complete (issue 8): every command and subcommand of fluxd and fluxctl, every
//! argument and every flag has a line of text.

use std::process::Command;

/// The help of `bin args... --help`.
fn help(bin: &str, args: &[String]) -> String {
    let out = Command::new(bin).args(args).arg("--help").output().unwrap();
    assert!(out.status.success(), "{bin} {args:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// Checks one help page and returns its subcommands.
fn check(bin: &str, args: &[String], problems: &mut Vec<String>) -> Vec<String> {
    let text = help(bin, args);
    let mut section = "";
    let mut subcommands = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    if lines
        .first()
        .is_none_or(|l| l.trim().is_empty() || l.starts_with("Usage:"))
    {
        problems.push(format!("{bin} {args:?}: no description"));
    }
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line.trim_end_matches(':');
            continue;
        }
        if !matches!(section, "Commands" | "Arguments" | "Options") || !line.starts_with("  ") {
            continue;
        }
        let entry = line.trim_start();
        if line.starts_with("   ") && !entry.starts_with('-') {
            continue; // continuation of the previous entry's text
        }
        // "NAME  text" on one line, or "NAME" with its text on the next, indented further.
        let has_text = entry.contains("  ")
            || lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("          ") && !n.trim().is_empty());
        if !has_text {
            problems.push(format!("{bin} {args:?}: no text for `{entry}`"));
        }
        if section == "Commands" {
            let name = entry.split_whitespace().next().unwrap().to_string();
            if name != "help" {
                subcommands.push(name);
            }
        }
    }
    subcommands
}

fn walk(bin: &str, args: Vec<String>, problems: &mut Vec<String>, depth: usize) {
    assert!(depth < 5);
    for sub in check(bin, &args, problems) {
        let mut a = args.clone();
        a.push(sub);
        walk(bin, a, problems, depth + 1);
    }
}

#[test]
fn every_command_and_flag_has_help() {
    let mut problems = Vec::new();
    walk(env!("CARGO_BIN_EXE_fluxd"), Vec::new(), &mut problems, 0);
    walk(env!("CARGO_BIN_EXE_fluxctl"), Vec::new(), &mut problems, 0);
    assert!(problems.is_empty(), "{problems:#?}");
    // And the walk did reach the leaves.
    assert!(help(
        env!("CARGO_BIN_EXE_fluxctl"),
        &["instance".into(), "add".into()]
    )
    .contains("<SERVICE>  Service name"));
}

#[test]
fn completions_and_man_pages() {
    for bin in [env!("CARGO_BIN_EXE_fluxd"), env!("CARGO_BIN_EXE_fluxctl")] {
        for shell in ["bash", "zsh", "fish"] {
            let out = Command::new(bin)
                .args(["completions", shell])
                .output()
                .unwrap();
            assert!(
                out.status.success() && out.stdout.len() > 100,
                "{bin} {shell}"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin)
            .arg("man")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let pages = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(pages >= 4, "{bin}: {pages} man pages");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fluxd"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
