//! The parts of an AdmissionReview (admission.k8s.io/v1) the injector reads, as serde types.
//!
//! Everything else in the body is skipped while parsing (serde's `IgnoredAny`), never built:
//! a `serde_json::Value` of a hostile 3 MiB body of tiny array elements takes about 16
//! times its size in memory, which is how a few concurrent reviews could push the injector
//! out of its memory limit.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub struct AdmissionReview {
    #[serde(rename = "apiVersion")]
    pub api_version: Option<String>,
    pub request: Option<AdmissionRequest>,
}

#[derive(Debug, Deserialize)]
pub struct AdmissionRequest {
    pub uid: Option<String>,
    pub kind: Option<Kind>,
    pub resource: Option<Resource>,
    pub operation: Option<String>,
    pub namespace: Option<String>,
    pub object: Option<PodObject>,
}

#[derive(Debug, Deserialize)]
pub struct Kind {
    pub kind: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Resource {
    pub resource: Option<String>,
}

/// A pod as far as injection cares; `Default` is the empty pod.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodObject {
    pub metadata: Metadata,
    pub spec: Option<PodSpec>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Metadata {
    pub name: Option<String>,
    #[serde(rename = "generateName")]
    pub generate_name: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
    /// Only whether the pod has labels matters (the patch adds to them or creates them).
    pub labels: Option<BTreeMap<String, serde::de::IgnoredAny>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(rename = "initContainers")]
    pub init_containers: Option<Vec<Named>>,
    /// Only whether the pod has a volume list matters.
    pub volumes: Option<Vec<serde::de::IgnoredAny>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Container {
    pub name: Option<String>,
    pub ports: Vec<Port>,
    pub env: Option<Vec<Named>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Port {
    #[serde(rename = "containerPort")]
    pub container_port: Option<u64>,
}

/// A list entry read only for its name (an init container, an env var).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Named {
    pub name: Option<String>,
}
