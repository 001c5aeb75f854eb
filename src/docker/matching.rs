//! Whether a container matches a rule's selector: every given field must match.

use super::container::Container;
use super::image::canonical_repository;
use crate::model::Selector;

pub fn matches(selector: &Selector, c: &Container) -> bool {
    if selector.is_empty() {
        return false;
    }
    if let Some(image) = &selector.image {
        if canonical_repository(image) != c.image.repository {
            return false;
        }
    }
    if let Some(tag) = &selector.tag {
        if *tag != c.image.tag {
            return false;
        }
    }
    selector
        .labels
        .iter()
        .all(|(k, v)| c.labels.get(k) == Some(v))
        && selector.env.iter().all(|(k, v)| c.env.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::image::ImageRef;
    use std::collections::BTreeMap;

    fn container(image: &str, labels: &[(&str, &str)], env: &[(&str, &str)]) -> Container {
        let m = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        Container {
            id: "0123456789abcdef".into(),
            name: "c".into(),
            image: ImageRef::parse(image),
            labels: m(labels),
            env: m(env),
            serving: true,
            host_network: false,
            published: BTreeMap::new(),
            ip: None,
            skipped: Vec::new(),
            ip6: None,
            published_udp: BTreeMap::new(),
        }
    }

    fn sel(image: Option<&str>, tag: Option<&str>, labels: &[(&str, &str)]) -> Selector {
        Selector {
            image: image.map(str::to_string),
            tag: tag.map(str::to_string),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            env: BTreeMap::new(),
        }
    }

    #[test]
    fn image_tag_labels_env() {
        let c = container("nginx:1.25", &[("tier", "front")], &[("MODE", "prod")]);
        assert!(matches(&sel(Some("nginx"), None, &[]), &c));
        assert!(matches(
            &sel(Some("docker.io/library/nginx"), Some("1.25"), &[]),
            &c
        ));
        assert!(matches(&sel(None, None, &[("tier", "front")]), &c));
        assert!(!matches(&sel(Some("nginx"), Some("1.24"), &[]), &c));
        assert!(!matches(&sel(Some("nginx"), None, &[("tier", "back")]), &c));
        assert!(!matches(&sel(Some("httpd"), None, &[]), &c));
        let mut s = sel(None, None, &[]);
        s.env.insert("MODE".into(), "prod".into());
        assert!(matches(&s, &c));
        s.env.insert("MODE".into(), "dev".into());
        assert!(!matches(&s, &c));
        assert!(
            !matches(&Selector::default(), &c),
            "empty selector matches nothing"
        );
    }

    #[test]
    fn untagged_is_latest() {
        let c = container("webimg", &[], &[]);
        assert!(matches(&sel(Some("webimg"), Some("latest"), &[]), &c));
    }
}
