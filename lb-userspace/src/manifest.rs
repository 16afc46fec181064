//! Parsing Kubernetes YAML into the objects socklb cares about.
//!
//! A file may hold several documents separated by `---`, and a document may be the `kind: List`
//! that `kubectl get -o yaml` writes. Each object is checked strictly, as `kubectl apply
//! --validate=strict` would: an unknown field or kind is an error naming the file and object.
//! Every object is checked, so one pass reports every mistake in a file.

use std::{fmt, path::Path, sync::Arc};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

/// An object read from a manifest.
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
}

impl Object {
    pub fn id(&self) -> ObjectId {
        let (kind, meta) = match self {
            Object::Service(s) => (Kind::Service, &s.metadata),
            Object::EndpointSlice(s) => (Kind::EndpointSlice, &s.metadata),
        };
        ObjectId {
            kind,
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

/// Kind, namespace and name: what an error message names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Something wrong in a manifest file: where, which object if known, and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    /// The object ("Service default/web"), or the document ("document 2") when the object
    /// could not be identified.
    pub object: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.object {
            Some(object) => write!(f, "{}: {}: {}", self.file, object, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// What a file yielded: its good objects, and an error for each bad one.
#[derive(Debug, Default)]
pub struct Parsed {
    pub objects: Vec<Object>,
    pub errors: Vec<ManifestError>,
}

/// Parses the text of one manifest file.
pub fn parse(file: &Path, text: &str) -> Parsed {
    let file = file.display().to_string();
    let mut parsed = Parsed::default();
    let mut values = Vec::new();
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(document) {
            Ok(Value::Null) => {} // empty document, e.g. a trailing `---`
            Ok(value) => values.push((format!("document {}", i + 1), value)),
            Err(e) => {
                parsed.errors.push(ManifestError {
                    file: file.clone(),
                    object: None,
                    message: format!("invalid YAML: {e}"),
                });
                return parsed;
            }
        }
    }
    for (where_, value) in values {
        collect(&file, &where_, value, &mut parsed);
    }
    parsed
}

/// Adds the object(s) in `value` (one object, or a `List` of them) to `parsed`.
fn collect(file: &str, where_: &str, value: Value, parsed: &mut Parsed) {
    let error = |object: String, message: String| ManifestError {
        file: file.into(),
        object: Some(object),
        message,
    };
    let kind = value.get("kind").and_then(Value::as_str).map(str::to_owned);
    let api_version = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let label = describe(&value, where_);
    let result = match (kind.as_deref(), api_version.as_deref()) {
        (Some("List"), _) => {
            let items = match value {
                Value::Object(mut map) => map.remove("items"),
                _ => None,
            };
            match items {
                Some(Value::Array(items)) => {
                    for (i, item) in items.into_iter().enumerate() {
                        collect(file, &format!("{where_} item {}", i + 1), item, parsed);
                    }
                }
                Some(Value::Null) | None => {}
                Some(_) => parsed
                    .errors
                    .push(error(label, "List items must be a sequence".into())),
            }
            return;
        }
        (Some("Service"), Some("v1")) => {
            strict::<Service>(value).map(|s| Object::Service(Arc::new(s)))
        }
        (Some("EndpointSlice"), Some("discovery.k8s.io/v1")) => {
            strict::<EndpointSlice>(value).map(|s| Object::EndpointSlice(Arc::new(s)))
        }
        (Some(kind @ ("Service" | "EndpointSlice")), version) => Err(format!(
            "unsupported apiVersion {:?} for {kind} (expected {})",
            version.unwrap_or(""),
            if kind == "Service" {
                "v1"
            } else {
                "discovery.k8s.io/v1"
            }
        )),
        (Some(kind), _) => Err(format!(
            "unknown kind {kind:?}: socklb reads Service and EndpointSlice"
        )),
        (None, _) => Err("missing field `kind`".into()),
    };
    match result.and_then(validate) {
        Ok(object) => parsed.objects.push(object),
        Err(message) => parsed.errors.push(error(label, message)),
    }
}

/// Deserialises `value` as `T`, rejecting fields `T` does not know.
fn strict<T: DeserializeOwned>(value: Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let object: T = serde_ignored::deserialize(value, |path| {
        // serde_ignored writes `?` for each Option it passed through; drop those segments.
        let path = path.to_string();
        let segments: Vec<&str> = path.split('.').filter(|s| *s != "?").collect();
        unknown.push(segments.join("."));
    })
    .map_err(|e| e.to_string())?;
    if unknown.is_empty() {
        Ok(object)
    } else {
        Err(format!("unknown field(s): {}", unknown.join(", ")))
    }
}

/// Checks what the API server would have required before storing the object.
fn validate(object: Object) -> Result<Object, String> {
    let meta = match &object {
        Object::Service(s) => &s.metadata,
        Object::EndpointSlice(s) => &s.metadata,
    };
    if meta.name.as_deref().unwrap_or("").is_empty() {
        return Err("missing field `metadata.name`".into());
    }
    if let Object::EndpointSlice(slice) = &object {
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL));
        if service.is_none() {
            return Err(format!(
                "missing label {SERVICE_NAME_LABEL} (which Service the slice belongs to)"
            ));
        }
    }
    Ok(object)
}

/// The EndpointSlice label naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// "Service default/web" if the value says so, else where it sits in the file.
fn describe(value: &Value, where_: &str) -> String {
    let kind = value.get("kind").and_then(Value::as_str);
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match (kind, name) {
        (Some(kind), Some(name)) => format!("{kind} {namespace}/{name}"),
        (Some(kind), None) => format!("{kind} ({where_})"),
        _ => where_.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Parsed {
        parse(Path::new("m.yaml"), text)
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";
    const SLICE: &str = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-abc\n  namespace: shop\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints:\n- addresses: [10.244.0.5]\n  conditions: {ready: true}\n";

    #[test]
    fn reads_multi_document_files() {
        let p = parse_str(&format!("{SERVICE}---\n{SLICE}---\n"));
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let ids: Vec<_> = p.objects.iter().map(|o| o.id().to_string()).collect();
        assert_eq!(ids, ["Service shop/web", "EndpointSlice shop/web-abc"]);
    }

    #[test]
    fn reads_kubectl_list() {
        let indent = |s: &str| s.lines().map(|l| format!("    {l}\n")).collect::<String>();
        let text = format!(
            "apiVersion: v1\nkind: List\nmetadata: {{resourceVersion: \"\"}}\nitems:\n  -\n{}  -\n{}",
            indent(SERVICE),
            indent(SLICE)
        );
        let p = parse_str(&text);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.objects.len(), 2);
    }

    #[test]
    fn unknown_field_names_file_object_and_field() {
        let p = parse_str(&SERVICE.replace("clusterIP:", "clusterIPP:"));
        assert!(p.objects.is_empty());
        assert_eq!(p.errors.len(), 1);
        let msg = p.errors[0].to_string();
        assert!(
            msg.starts_with("m.yaml: Service shop/web: unknown field"),
            "{msg}"
        );
        assert!(msg.contains("spec.clusterIPP"), "{msg}");
    }

    #[test]
    fn bad_object_does_not_drop_its_neighbours() {
        let p = parse_str(&format!(
            "{}---\n{SLICE}",
            SERVICE.replace("port: 80", "port: eighty")
        ));
        assert_eq!(p.objects.len(), 1);
        assert_eq!(p.errors.len(), 1);
        assert_eq!(p.errors[0].object.as_deref(), Some("Service shop/web"));
    }

    #[test]
    fn invalid_yaml_is_reported_with_the_file() {
        let p = parse_str("kind: Service\n  bad: : indentation\n");
        assert!(p.objects.is_empty());
        assert!(p.errors[0].to_string().starts_with("m.yaml: invalid YAML"));
    }

    #[test]
    fn unknown_kind_and_missing_fields_are_errors() {
        let p = parse_str(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\napiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n---\nfoo: bar\n",
        );
        let msgs: Vec<_> = p.errors.iter().map(ToString::to_string).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs[0].contains("Deployment default/web: unknown kind"),
            "{msgs:?}"
        );
        assert!(
            msgs[1].contains("Service (document 2): missing field `metadata.name`"),
            "{msgs:?}"
        );
        assert!(
            msgs[2].contains("document 3: missing field `kind`"),
            "{msgs:?}"
        );
    }

    #[test]
    fn slice_needs_its_service_label() {
        let p = parse_str(&SLICE.replace("kubernetes.io/service-name", "app"));
        assert!(
            p.errors[0]
                .message
                .contains("missing label kubernetes.io/service-name")
        );
    }
}
