//! A directory of manifests as the cluster state (the agent's standalone mode).
//!
//! Every load re-reads all `*.yaml`, `*.yml` and `*.json` files. A file applies as a whole or
//! not at all: if anything in it is wrong (bad YAML, an unknown kind or field, a missing field),
//! every error is reported and the file keeps the objects it last had (none if it is new). So a
//! bad edit changes nothing, whichever object it broke, and fixing it applies the new content.
//!
//! An object defined in two files is used from the file it came from before (the first file
//! by name if it is new); the other copy is reported. Files larger than `MAX_FILE_BYTES` are
//! refused unread, and entries that cannot be read (a broken or looping symlink) reported.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::{
    cluster::{ClusterState, ServiceRef},
    manifest::{self, Kind, ManifestError, Object, ObjectId},
};

/// The largest manifest file read (a `kind: List` of about 10,000 Services); split larger sets
/// over several files.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

pub struct ManifestDir {
    dir: PathBuf,
    /// Last good objects of each file.
    files: BTreeMap<PathBuf, Vec<Object>>,
    /// The file each object was last used from.
    origins: BTreeMap<ObjectId, PathBuf>,
    /// The ClusterIPs programmed for each Service when the agent started (pinned maps): of
    /// two copies of a Service not yet used from a file, the one with these addresses wins,
    /// so a restart does not hand a Service's address to a copy that sorts first.
    pinned: BTreeMap<ServiceRef, BTreeSet<IpAddr>>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            origins: BTreeMap::new(),
            pinned: BTreeMap::new(),
        }
    }

    /// Prefers, among copies of a Service, the one with the addresses programmed for it.
    pub fn preferring(mut self, pinned: BTreeMap<ServiceRef, BTreeSet<IpAddr>>) -> Self {
        self.pinned = pinned;
        self
    }

    /// Whether `object` is a Service whose ClusterIPs are the ones programmed for it.
    fn is_pinned(&self, id: &ObjectId, object: &Object) -> bool {
        let Object::Service(service) = object else {
            return false;
        };
        let key = ServiceRef {
            namespace: id.namespace.clone(),
            name: id.name.clone(),
        };
        let Some(pinned) = self.pinned.get(&key) else {
            return false;
        };
        let spec = service.spec.as_ref();
        let ips = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
        let ip = spec.and_then(|s| s.cluster_ip.clone());
        ips.iter()
            .chain(&ip)
            .filter_map(|ip| ip.parse().ok())
            .any(|ip| pinned.contains(&ip))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Re-reads the directory. Errors are per file or object; a directory that cannot be
    /// listed is an error for the whole load, and the previous state stays.
    pub fn load(&mut self) -> (ClusterState, Vec<ManifestError>) {
        let mut errors = Vec::new();
        match manifest_files(&self.dir) {
            Ok(paths) => {
                let mut files = BTreeMap::new();
                for path in paths {
                    let previous = self.files.remove(&path).unwrap_or_default();
                    let objects = match read_limited(&path) {
                        Ok(text) => {
                            let parsed = manifest::parse(&path, &text);
                            if parsed.errors.is_empty() {
                                parsed.objects
                            } else {
                                errors.extend(parsed.errors);
                                previous
                            }
                        }
                        Err(e) => {
                            errors.push(ManifestError {
                                file: path.display().to_string(),
                                object: None,
                                message: format!("cannot read: {e}"),
                            });
                            previous
                        }
                    };
                    files.insert(path, objects);
                }
                self.files = files;
            }
            Err(e) => errors.push(ManifestError {
                file: self.dir.display().to_string(),
                object: None,
                message: format!("cannot list directory: {e}"),
            }),
        }
        let state = self.state(&mut errors);
        (state, errors)
    }

    /// The cluster state from all files. The same object in two files is an error; the copy
    /// from the file it was used from before counts (the first file by name for a new one).
    fn state(&mut self, errors: &mut Vec<ManifestError>) -> ClusterState {
        let mut state = ClusterState::default();
        let mut chosen: BTreeMap<ObjectId, &Path> = BTreeMap::new();
        for (path, objects) in &self.files {
            for object in objects {
                let id = object.id();
                let was_here = match self.origins.get(&id) {
                    Some(origin) => origin == path,
                    None => self.is_pinned(&id, object),
                };
                match chosen.get(&id) {
                    Some(_) if !was_here => continue,
                    _ => {
                        chosen.insert(id, path);
                    }
                }
            }
        }
        for (path, objects) in &self.files {
            for object in objects {
                let id = object.id();
                let used = chosen[&id];
                if used != path.as_path() {
                    errors.push(ManifestError {
                        file: path.display().to_string(),
                        object: Some(id.to_string()),
                        message: format!("also defined in {}; that one is used", used.display()),
                    });
                    continue;
                }
                let key = ServiceRef {
                    namespace: id.namespace,
                    name: id.name,
                };
                let file = path.display().to_string();
                match (object, id.kind) {
                    (Object::Service(s), Kind::Service) => {
                        state.service_files.insert(key.clone(), file);
                        state.services.insert(key, Arc::clone(s));
                    }
                    (Object::EndpointSlice(s), Kind::EndpointSlice) => {
                        state.slice_files.insert(key.clone(), file);
                        state.slices.insert(key, Arc::clone(s));
                    }
                    _ => unreachable!("id kind follows the object"),
                }
            }
        }
        self.origins = chosen
            .into_iter()
            .map(|(id, path)| (id, path.to_path_buf()))
            .collect();
        state
    }
}

/// A file's text, refused unread if it is larger than `MAX_FILE_BYTES` or not a regular file.
fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let file = fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let too_big = || {
        std::io::Error::other(format!(
            "more than the {MAX_FILE_BYTES} bytes a manifest file may have (split it)"
        ))
    };
    if meta.len() > MAX_FILE_BYTES {
        return Err(too_big());
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    match text.len() as u64 > MAX_FILE_BYTES {
        true => Err(too_big()), // it grew while being read
        false => Ok(text),
    }
}

/// The manifest entries of `dir`, sorted: every entry named like a manifest but directories.
/// One that cannot be read (a broken link, a loop, a FIFO) is listed too, so that reading it
/// reports it and its file keeps its last good objects.
fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let is_manifest = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"));
        // Editors' temporary files (.web.yaml.swp, .#web.yaml) are skipped by the extension
        // check or start with a dot.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !is_manifest || hidden {
            continue;
        }
        if !fs::metadata(&path).is_ok_and(|m| m.is_dir()) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: ns}\nspec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "socklb-md-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn cluster_ip(s: &ClusterState) -> Option<String> {
        s.services
            .values()
            .next()?
            .spec
            .as_ref()?
            .cluster_ip
            .clone()
    }

    #[test]
    fn bad_edits_keep_the_last_good_objects_until_fixed() {
        let d = dir();
        let file = d.join("web.yaml");
        fs::write(&file, SVC).unwrap();
        let mut m = ManifestDir::new(&d);
        let (s, e) = m.load();
        assert!(e.is_empty());
        assert_eq!(cluster_ip(&s).as_deref(), Some("10.96.0.10"));

        // Broken YAML: everything in the file stays.
        fs::write(&file, "kind: Service\n  : : nope").unwrap();
        let (s, e) = m.load();
        assert_eq!(e.len(), 1);
        assert_eq!(cluster_ip(&s).as_deref(), Some("10.96.0.10"));

        // An unknown field: the file keeps its last good content.
        fs::write(
            &file,
            SVC.replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.11, typo: 1"),
        )
        .unwrap();
        let (s, e) = m.load();
        assert!(
            e[0].to_string().contains("Service ns/web: unknown field"),
            "{}",
            e[0]
        );
        assert_eq!(cluster_ip(&s).as_deref(), Some("10.96.0.10"));

        // Fixed: the new content applies.
        fs::write(&file, SVC.replace("10.96.0.10", "10.96.0.11")).unwrap();
        let (s, e) = m.load();
        assert!(e.is_empty());
        assert_eq!(cluster_ip(&s).as_deref(), Some("10.96.0.11"));

        // Removed: gone.
        fs::remove_file(&file).unwrap();
        let (s, _) = m.load();
        assert!(s.services.is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_service_that_cannot_be_resolved_is_reported_with_its_files() {
        let d = dir();
        let dual = SVC.replace(
            "clusterIP: 10.96.0.10,",
            "clusterIP: 10.96.0.10, clusterIPs: [10.96.0.10], ipFamilies: [IPv6],",
        );
        fs::write(d.join("web.yaml"), dual).unwrap();
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: web-1, namespace: ns, labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.244.0.1]}]\n";
        fs::write(d.join("web-slices.yaml"), slice).unwrap();
        let (s, e) = ManifestDir::new(&d).load();
        assert!(e.is_empty(), "{e:?}");
        let (_, errors) =
            crate::cluster::desired(&s, lb_common::Algorithm::LeastConn, &Default::default());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let text = errors[0].to_string();
        assert!(
            text.starts_with(&format!(
                "{}, {}: Service ns/web: ",
                d.join("web.yaml").display(),
                d.join("web-slices.yaml").display()
            )),
            "{text}"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_copy_in_a_new_file_never_takes_over_and_unreadable_entries_are_reported() {
        let d = dir();
        fs::write(d.join("web.yaml"), SVC).unwrap();
        let mut m = ManifestDir::new(&d);
        let (s, e) = m.load();
        assert!(e.is_empty());
        // A file that sorts first with another copy: the copy in use stays.
        fs::write(
            d.join("00-copy.yaml"),
            SVC.replace("10.96.0.10", "10.96.0.99"),
        )
        .unwrap();
        // A symlink loop and a file too large to read (sparse: nothing is read).
        std::os::unix::fs::symlink("loop.yaml", d.join("loop.yaml")).unwrap();
        fs::File::create(d.join("big.yaml"))
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        let (again, e) = m.load();
        assert_eq!(cluster_ip(&again), cluster_ip(&s));
        let text: Vec<String> = e.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 3, "{text:?}");
        // The file in use turned into a loop: reported, and its Service stays.
        fs::remove_file(d.join("00-copy.yaml")).unwrap();
        fs::rename(d.join("web.yaml"), d.join("web.saved")).unwrap();
        std::os::unix::fs::symlink("web.yaml", d.join("web.yaml")).unwrap();
        let (kept, e) = m.load();
        assert_eq!(cluster_ip(&kept), cluster_ip(&s));
        assert!(
            e.iter()
                .any(|e| e.to_string().contains("web.yaml: cannot read"))
        );
        assert!(
            text.iter()
                .any(|t| t.contains("00-copy.yaml: Service ns/web: also defined in"))
        );
        assert!(text.iter().any(|t| t.contains("loop.yaml: cannot read")));
        assert!(
            text.iter()
                .any(|t| t.contains("big.yaml: cannot read") && t.contains("split it"))
        );
        // After a restart the copy with the programmed address still wins over one that
        // sorts first.
        fs::remove_file(d.join("web.yaml")).unwrap();
        fs::rename(d.join("web.saved"), d.join("web.yaml")).unwrap();
        fs::write(
            d.join("00-copy.yaml"),
            SVC.replace("10.96.0.10", "10.96.0.99"),
        )
        .unwrap();
        let pinned = BTreeMap::from([(
            ServiceRef {
                namespace: "ns".into(),
                name: "web".into(),
            },
            BTreeSet::from(["10.96.0.10".parse().unwrap()]),
        )]);
        let (restarted, _) = ManifestDir::new(&d).preferring(pinned).load();
        assert_eq!(cluster_ip(&restarted), cluster_ip(&s));
        let (fresh, _) = ManifestDir::new(&d).load();
        assert_eq!(
            cluster_ip(&fresh).as_deref(),
            Some("10.96.0.99"),
            "without pins the first file wins"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_address_stays_with_the_service_that_holds_it() {
        let d = dir();
        fs::write(d.join("web.yaml"), SVC).unwrap();
        let mut m = ManifestDir::new(&d);
        let algorithm = lb_common::Algorithm::LeastConn;
        let (s, _) = m.load();
        let (held, errors) = crate::cluster::desired(&s, algorithm, &Default::default());
        assert!(errors.is_empty());
        // "aaa" sorts before "web" and wants the same address.
        fs::write(d.join("aaa.yaml"), SVC.replace("name: web", "name: aaa")).unwrap();
        let (s, _) = m.load();
        let (now, errors) = crate::cluster::desired(&s, algorithm, &held);
        assert_eq!(now, held, "the holder keeps its frontends");
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with(&format!(
                "{}: Service ns/aaa: 10.96.0.10:80/TCP is already used by Service ns/web",
                d.join("aaa.yaml").display()
            )),
            "{}",
            errors[0]
        );
        // Another Service that holds an address of its own is edited to want web's: it is
        // refused and keeps its own, and web keeps its.
        fs::remove_file(d.join("aaa.yaml")).unwrap();
        let api = SVC.replace("name: web", "name: api");
        fs::write(d.join("api.yaml"), api.replace("10.96.0.10", "10.96.0.20")).unwrap();
        let (s, _) = m.load();
        let (both, errors) = crate::cluster::desired(&s, algorithm, &held);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(both.frontends().len(), 2);
        fs::write(d.join("api.yaml"), &api).unwrap();
        let (s, _) = m.load();
        let (now, errors) = crate::cluster::desired(&s, algorithm, &both);
        assert_eq!(now, both, "each keeps its address");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].to_string().starts_with(&format!(
                "{}: Service ns/api: 10.96.0.10:80/TCP is already used by Service ns/web",
                d.join("api.yaml").display()
            )),
            "{}",
            errors[0]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_refused_edit_keeps_every_address_still_free() {
        let d = dir();
        let two_ports = SVC.replace(
            "ports: [{port: 80}]",
            "ports: [{name: a, port: 80}, {name: b, port: 81}]",
        );
        fs::write(d.join("web.yaml"), &two_ports).unwrap();
        let api = SVC.replace("name: web", "name: api");
        fs::write(d.join("api.yaml"), api.replace("10.96.0.10", "10.96.0.20")).unwrap();
        let mut m = ManifestDir::new(&d);
        let algorithm = lb_common::Algorithm::LeastConn;
        let (s, _) = m.load();
        let (held, errors) = crate::cluster::desired(&s, algorithm, &Default::default());
        assert!(
            errors.is_empty() && held.frontends().len() == 3,
            "{errors:?}"
        );
        // web is edited to want api's address (refused), and a new Service that sorts first
        // takes web's port 81, which web no longer wants: web keeps port 80.
        fs::write(d.join("web.yaml"), SVC.replace("10.96.0.10", "10.96.0.20")).unwrap();
        let aaa = SVC
            .replace("name: web", "name: aaa")
            .replace("port: 80", "port: 81");
        fs::write(d.join("aaa.yaml"), aaa).unwrap();
        let (s, _) = m.load();
        let (now, errors) = crate::cluster::desired(&s, algorithm, &held);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let owners: Vec<(String, String)> = now
            .frontends()
            .values()
            .map(|f| (f.key.to_string(), f.service.name.clone()))
            .collect();
        assert_eq!(
            owners,
            [
                ("10.96.0.10:80/TCP".to_owned(), "web".to_owned()),
                ("10.96.0.10:81/TCP".to_owned(), "aaa".to_owned()),
                ("10.96.0.20:80/TCP".to_owned(), "api".to_owned()),
            ]
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_error_names_its_file() {
        let d = dir();
        let bad = [
            ("no-ip.yaml", SVC.replace("clusterIP: 10.96.0.10, ", "")),
            ("not-ip.yaml", SVC.replace("10.96.0.10", "ten")),
            ("port-0.yaml", SVC.replace("port: 80", "port: 0")),
            ("port-70000.yaml", SVC.replace("port: 80", "port: 70000")),
        ];
        for (file, text) in &bad {
            let text = text.replace(
                "name: web",
                &format!("name: {}", file.trim_end_matches(".yaml")),
            );
            fs::write(d.join(file), text).unwrap();
        }
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ok-1, namespace: ns, labels: {kubernetes.io/service-name: ok}}\naddressType: IPv4\nports: [{port: 8080}]\nendpoints: [{addresses: [not-an-ip]}]\n";
        fs::write(
            d.join("ok.yaml"),
            SVC.replace("name: web", "name: ok")
                .replace("10.96.0.10", "10.96.0.20"),
        )
        .unwrap();
        fs::write(d.join("ok-slice.yaml"), slice).unwrap();
        let (s, e) = ManifestDir::new(&d).load();
        let (_, errors) =
            crate::cluster::desired(&s, lb_common::Algorithm::LeastConn, &Default::default());
        let text: Vec<String> = e
            .iter()
            .map(ToString::to_string)
            .chain(errors.iter().map(ToString::to_string))
            .collect();
        for (file, _) in &bad {
            assert!(
                text.iter()
                    .any(|t| t.starts_with(&d.join(file).display().to_string())),
                "{file}: {text:#?}"
            );
        }
        assert!(
            text.iter()
                .any(|t| t.contains("ok-slice.yaml") && t.contains("not-an-ip")),
            "{text:#?}"
        );
        assert!(
            text.iter().all(|t| t.starts_with(&d.display().to_string())),
            "an error without its file: {text:#?}"
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn duplicates_across_files_are_reported_and_the_first_wins() {
        let d = dir();
        fs::write(d.join("a.yaml"), SVC).unwrap();
        fs::write(d.join("b.yml"), SVC.replace("10.96.0.10", "10.96.0.99")).unwrap();
        fs::write(d.join("notes.txt"), "not a manifest").unwrap();
        let (s, e) = ManifestDir::new(&d).load();
        assert_eq!(cluster_ip(&s).as_deref(), Some("10.96.0.10"));
        assert_eq!(e.len(), 1);
        assert!(
            e[0].to_string()
                .contains("b.yml: Service ns/web: also defined in")
        );
        fs::remove_dir_all(&d).unwrap();
    }
}
