//! Putting a rendered configuration in place: written atomically, checked with nginx's own
//! test, reloaded only when it changed, and put back to the last good text when nginx refuses
//! it, so that nginx never loads (nor is left with, for its next start) a file it rejects.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the check or the reload may take before it counts as failed.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The file already holds this text (or nginx refused this very text before).
    Unchanged,
    /// Written, checked and nginx reloaded.
    Applied,
    /// Written and checked, but the reload failed (nginx not running?): the file stays, nginx
    /// reads it at its next start or reload.
    ReloadFailed(String),
    /// nginx's check refused it: the last good file is back in place.
    Rejected(String),
}

pub struct Applier {
    conf: PathBuf,
    test_cmd: String,
    reload_cmd: String,
    /// What the file holds and nginx accepted (at start: what the file held; None when there
    /// was no file, and a refused first text then removes it again).
    last_good: Option<String>,
    /// The last text nginx refused, not tried again until the rendering changes.
    rejected: Option<String>,
    /// The last reload failed: tried again at each `apply` until it works.
    reload_pending: bool,
}

impl Applier {
    pub fn new(conf: PathBuf, test_cmd: String, reload_cmd: String) -> std::io::Result<Applier> {
        let last_good = match std::fs::read_to_string(&conf) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Applier {
            conf,
            test_cmd,
            reload_cmd,
            last_good,
            rejected: None,
            reload_pending: false,
        })
    }

    pub async fn apply(&mut self, text: &str) -> Outcome {
        if self.last_good.as_deref() == Some(text) {
            return match self.reload_pending {
                true => self.reload().await,
                false => Outcome::Unchanged,
            };
        }
        if self.rejected.as_deref() == Some(text) {
            return Outcome::Unchanged;
        }
        if let Err(e) = write_atomic(&self.conf, text.as_bytes()) {
            return Outcome::Rejected(format!("cannot write {}: {e}", self.conf.display()));
        }
        if let Err(why) = run(&self.test_cmd).await {
            self.rejected = Some(text.to_string());
            let restored = match &self.last_good {
                Some(good) => write_atomic(&self.conf, good.as_bytes()),
                None => std::fs::remove_file(&self.conf),
            };
            return Outcome::Rejected(match restored {
                Ok(()) => why,
                Err(e) => format!(
                    "{why}; and the last good file could not be put back: {}: {e}",
                    self.conf.display()
                ),
            });
        }
        self.last_good = Some(text.to_string());
        self.rejected = None;
        self.reload().await
    }

    async fn reload(&mut self) -> Outcome {
        match run(&self.reload_cmd).await {
            Ok(()) => {
                self.reload_pending = false;
                Outcome::Applied
            }
            Err(why) => {
                self.reload_pending = true;
                Outcome::ReloadFailed(why)
            }
        }
    }
}

/// Writes `data` to a temporary file in the same directory, syncs it, renames it over `path`
/// and syncs the directory: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "no file name"))?;
    // A dot name that does not end in .conf, so an `include conf.d/*.conf` never reads it.
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        // Keep the mode an operator gave the file (nginx workers may need to read it).
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        } else {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Runs `cmd` with `/bin/sh -c`; Err carries its output (nginx's error) on one line.
async fn run(cmd: &str) -> Result<(), String> {
    let child = tokio::process::Command::new("/bin/sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
        Err(_) => return Err(format!("`{cmd}` took more than {COMMAND_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("`{cmd}`: {e}")),
        Ok(Ok(out)) => out,
    };
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text += &String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    Err(format!(
        "`{cmd}` failed ({}): {}",
        out.status,
        lines.join(" | ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn applies_checks_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("flux.conf");
        let log = dir.path().join("reloads");
        // A stand-in for `nginx -t`: refuses a file that mentions "broken".
        let test = format!(
            "if grep -q broken {}; then echo 'nginx: [emerg] broken' >&2; exit 1; fi",
            conf.display()
        );
        let reload = format!("echo reload >> {}", log.display());
        let reloads = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
        };
        let mut a = Applier::new(conf.clone(), test, reload).unwrap();

        assert_eq!(a.apply("one\n").await, Outcome::Applied);
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "one\n");
        assert_eq!(a.apply("one\n").await, Outcome::Unchanged);
        assert_eq!(reloads(), 1);

        let r = a.apply("broken\n").await;
        assert!(
            matches!(&r, Outcome::Rejected(why) if why.contains("[emerg] broken")),
            "{r:?}"
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "one\n");
        assert_eq!(a.apply("broken\n").await, Outcome::Unchanged);
        assert_eq!(reloads(), 1);

        assert_eq!(a.apply("two\n").await, Outcome::Applied);
        assert_eq!(reloads(), 2);
        // No stray temporary files.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[tokio::test]
    async fn refused_first_text_removes_the_file_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("flux.conf");
        let mut a = Applier::new(conf.clone(), "false".into(), "true".into()).unwrap();
        assert!(matches!(a.apply("x").await, Outcome::Rejected(_)));
        assert!(!conf.exists());
    }

    #[tokio::test]
    async fn reload_failure_keeps_the_checked_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("flux.conf");
        let mut a = Applier::new(
            conf.clone(),
            "true".into(),
            "echo not running >&2; false".into(),
        )
        .unwrap();
        let r = a.apply("x").await;
        assert!(
            matches!(&r, Outcome::ReloadFailed(why) if why.contains("not running")),
            "{r:?}"
        );
        assert_eq!(std::fs::read_to_string(&conf).unwrap(), "x");
        // Tried again until nginx takes it.
        assert!(matches!(a.apply("x").await, Outcome::ReloadFailed(_)));
        a.reload_cmd = "true".into();
        assert_eq!(a.apply("x").await, Outcome::Applied);
        assert_eq!(a.apply("x").await, Outcome::Unchanged);
    }
}
