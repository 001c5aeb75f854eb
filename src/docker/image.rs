//! Image references as Docker writes them, reduced to what selectors compare: the repository in
//! its canonical form and the tag. `nginx`, `library/nginx` and `docker.io/library/nginx` are
//! one repository; a reference without tag or digest means tag `latest`.

/// Docker Hub's canonical registry name.
const HUB: &str = "docker.io";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Canonical repository: `docker.io/library/nginx`, `registry:5000/team/app`.
    pub repository: String,
    /// Tag; `latest` when the reference had neither tag nor digest, empty for a digest-only
    /// reference (which names no tag, so no tag selector can match it).
    pub tag: String,
}

impl ImageRef {
    /// Parses `[registry[:port]/]path[:tag][@digest]`.
    pub fn parse(reference: &str) -> ImageRef {
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        // A ':' after the last '/' is a tag; one before it belongs to a registry port.
        let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (repo, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        let tag = match (tag, digest) {
            (Some(t), _) => t.to_string(),
            (None, Some(_)) => String::new(),
            (None, None) => "latest".to_string(),
        };
        ImageRef {
            repository: canonical_repository(repo),
            tag,
        }
    }
}

/// What a user typed as an image filter, `nginx` or `nginx:1.25` or
/// `registry:5000/team/app:v2`: the canonical repository and the tag if one was given (unlike
/// [`ImageRef::parse`], no tag means any tag, not `latest`).
pub fn split_filter(reference: &str) -> (String, Option<String>) {
    let name = reference.split_once('@').map_or(reference, |(n, _)| n);
    let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    match name[last_slash..].rfind(':') {
        Some(i) => (
            canonical_repository(&name[..last_slash + i]),
            Some(name[last_slash + i + 1..].to_string()),
        ),
        None => (canonical_repository(name), None),
    }
}

/// `nginx` -> `docker.io/library/nginx`; `team/app` -> `docker.io/team/app`; a first component
/// with a '.' or ':' or equal to `localhost` is a registry and is kept.
pub fn canonical_repository(repo: &str) -> String {
    let mut parts = repo.splitn(2, '/');
    let first = parts.next().unwrap_or_default();
    let rest = parts.next();
    let is_registry =
        rest.is_some() && (first.contains('.') || first.contains(':') || first == "localhost");
    let (registry, path) = if is_registry {
        (first, rest.unwrap_or_default())
    } else {
        (HUB, repo)
    };
    // Docker Hub's old name, still seen in references.
    let registry = if registry == "index.docker.io" {
        HUB
    } else {
        registry
    };
    if registry == HUB && !path.contains('/') {
        format!("{HUB}/library/{path}")
    } else {
        format!("{registry}/{path}")
    }
}

/// True for a reference that is an image id rather than a name, as `docker run <id>` leaves
/// in the container's config.
pub fn is_image_id(reference: &str) -> bool {
    let hex = reference.strip_prefix("sha256:").unwrap_or(reference);
    reference.starts_with("sha256:")
        || (hex.len() >= 12
            && hex.len() <= 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_take_short_names_and_tags() {
        let hub = "docker.io/library/nginx".to_string();
        assert_eq!(split_filter("nginx"), (hub.clone(), None));
        assert_eq!(split_filter("docker.io/library/nginx"), (hub.clone(), None));
        assert_eq!(
            split_filter("library/nginx:1.25"),
            (hub, Some("1.25".into()))
        );
        assert_eq!(
            split_filter("registry:5000/team/app"),
            ("registry:5000/team/app".into(), None)
        );
        assert_eq!(
            split_filter("registry:5000/team/app:v2"),
            ("registry:5000/team/app".into(), Some("v2".into()))
        );
    }

    fn p(s: &str) -> (String, String) {
        let r = ImageRef::parse(s);
        (r.repository, r.tag)
    }

    #[test]
    fn normalises_docker_hub_names() {
        let want = ("docker.io/library/nginx".to_string(), "latest".to_string());
        assert_eq!(p("nginx"), want);
        assert_eq!(p("library/nginx"), want);
        assert_eq!(p("docker.io/library/nginx"), want);
        assert_eq!(p("index.docker.io/library/nginx:latest"), want);
        assert_eq!(p("team/app:v1"), ("docker.io/team/app".into(), "v1".into()));
    }

    #[test]
    fn registries_with_ports_and_digests() {
        assert_eq!(
            p("registry.example.com:5000/team/app:1.2"),
            ("registry.example.com:5000/team/app".into(), "1.2".into())
        );
        assert_eq!(
            p("localhost:5000/app"),
            ("localhost:5000/app".into(), "latest".into())
        );
        assert_eq!(p("localhost/app:x"), ("localhost/app".into(), "x".into()));
        assert_eq!(
            p("nginx@sha256:0123abcd"),
            ("docker.io/library/nginx".into(), String::new())
        );
        assert_eq!(
            p("nginx:1.25@sha256:0123abcd"),
            ("docker.io/library/nginx".into(), "1.25".into())
        );
    }

    #[test]
    fn image_ids() {
        assert!(is_image_id("sha256:0123456789abcdef"));
        assert!(is_image_id("0123456789ab"));
        assert!(!is_image_id("nginx"));
        assert!(!is_image_id("deadbeef"));
    }
}
