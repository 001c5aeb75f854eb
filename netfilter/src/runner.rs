//! How iptables commands are run, kept behind a trait so the same code can work on the host,
//! inside a network namespace (tests, simulated hosts) or against a recording fake.

use std::io::Write;
use std::process::{Command, Stdio};
use std::thread;

use crate::Error;

/// Runs one command to completion. Implementations must not go through a shell: the arguments
/// and the input are passed as they are.
pub trait Runner: Send + Sync {
    /// Runs `program` with `args`, writing `stdin` (if any) to its standard input, and returns
    /// its standard output; a non-zero exit is an [`Error::Failed`].
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error>;
}

/// Runs commands as child processes, optionally behind a fixed prefix.
#[derive(Debug, Clone, Default)]
pub struct CommandRunner {
    /// Prepended to every command, e.g. `ip netns exec NS`, so a test can direct every
    /// iptables call into its own namespace. Empty for the daemon, which already runs in the
    /// namespace it manages.
    prefix: Vec<String>,
}

impl CommandRunner {
    /// Runs commands in the caller's own network namespace.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs every command behind `prefix` (the program and its leading arguments).
    pub fn with_prefix(prefix: Vec<String>) -> Self {
        Self { prefix }
    }

    /// Runs every command inside the named network namespace (`ip netns exec NAME ...`).
    pub fn in_netns(name: &str) -> Self {
        Self::with_prefix(vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            name.into(),
        ])
    }
}

impl Runner for CommandRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
        let argv: Vec<&str> = self
            .prefix
            .iter()
            .map(String::as_str)
            .chain(std::iter::once(program))
            .chain(args.iter().copied())
            .collect();
        let command = argv.join(" ");
        let spawn_error = |source| Error::Spawn {
            command: command.clone(),
            source,
        };

        let mut child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;

        // The input can be megabytes; writing it from another thread while this one drains
        // stdout and stderr avoids a deadlock when the child fills a pipe before reading all
        // of its input (e.g. printing an error halfway).
        let (written, output) = thread::scope(|scope| {
            let writer = child.stdin.take().map(|mut pipe| {
                let input = stdin.unwrap_or_default();
                scope.spawn(move || pipe.write_all(input.as_bytes()))
            });
            let output = child.wait_with_output();
            let written = match writer {
                Some(handle) => handle
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("stdin writer thread panicked"))),
                None => Ok(()),
            };
            (written, output)
        });
        let output = output.map_err(spawn_error)?;

        if !output.status.success() {
            // A child that fails early closes its input; the broken pipe is a consequence and
            // its stderr says why.
            return Err(Error::Failed {
                command,
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        written.map_err(spawn_error)?;
        String::from_utf8(output.stdout).map_err(|_| Error::NotUtf8 { command })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_stdin_and_returns_stdout() {
        let big = "x".repeat(4 << 20);
        let out = CommandRunner::new()
            .run("wc", &["-c"], Some(&big))
            .expect("wc runs");
        assert_eq!(out.trim(), (4 << 20).to_string());
    }

    #[test]
    fn prefix_is_prepended() {
        let out = CommandRunner::with_prefix(vec!["echo".into(), "a".into()])
            .run("b", &["c"], None)
            .expect("echo runs");
        assert_eq!(out, "a b c\n");
    }

    #[test]
    fn failure_carries_command_and_stderr() {
        let err = CommandRunner::new()
            .run("sh", &["-c", "echo oops >&2; exit 3"], None)
            .expect_err("exit 3 is a failure");
        let text = err.to_string();
        assert!(text.contains("sh -c"), "{text}");
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn missing_program_is_a_spawn_error() {
        let err = CommandRunner::new()
            .run("flux-no-such-program", &[], None)
            .expect_err("cannot spawn");
        assert!(matches!(err, Error::Spawn { .. }));
    }
}
