//! The certificates and keys every simulation uses, loaded from a fixture file.

use std::sync::OnceLock;

use coyote_log::tls::{self, ClusterCa};

use crate::params::{CLUSTER_ID, NODES_MAX};

/// Certificates and keys. They are fixed (`sim/fixtures/material.json`), not generated, because the
/// CA's pin is written into the log (`ClusterCreated`): with a new CA per process, a seed replayed in
/// another process would archive different bytes. Regenerate with
/// `cargo test -p coyote-sim --profile sim -- --ignored write_material` (the certificates are valid
/// for 10 years from then, by real time: rustls checks validity against the real clock).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Material {
    pub(crate) ca_cert_pem: String,
    pub(crate) ca_key_pem: String,
    pub(crate) first_cert_pem: String,
    pub(crate) first_key_pem: String,
    /// `(key, csr)` of the joiner at each host index.
    pub(crate) joiner_keys: Vec<(String, String)>,
    #[serde(skip)]
    pub(crate) ca: Option<ClusterCa>,
}

impl Material {
    /// New keys and certificates, for the fixture file.
    pub fn generate() -> Material {
        let ca = ClusterCa::generate(CLUSTER_ID).expect("a CA can be generated");
        let (first_key_pem, csr) = tls::generate_node_key().expect("a node key can be generated");
        let first_cert_pem = ca.sign_node(&csr, 1).expect("the CA signs node 1");
        let joiner_keys =
            (0..NODES_MAX).map(|_| tls::generate_node_key().expect("a node key can be generated")).collect();
        Material {
            ca_cert_pem: ca.cert_pem().to_string(),
            ca_key_pem: ca.key_pem().to_string(),
            first_cert_pem,
            first_key_pem,
            joiner_keys,
            ca: Some(ca),
        }
    }

    pub(crate) fn ca(&self) -> &ClusterCa {
        self.ca.as_ref().expect("loaded with its CA")
    }
}

/// The fixture file the simulation loads its certificates and keys from.
pub const MATERIAL_JSON: &str = include_str!("../fixtures/material.json");

pub(crate) fn material() -> &'static Material {
    static MATERIAL: OnceLock<Material> = OnceLock::new();
    MATERIAL.get_or_init(|| {
        let mut material: Material =
            serde_json::from_str(MATERIAL_JSON).expect("sim/fixtures/material.json is valid");
        let ca =
            ClusterCa::from_pem(&material.ca_cert_pem, &material.ca_key_pem).expect("the fixture CA loads");
        assert!(material.joiner_keys.len() >= NODES_MAX, "the fixtures have a key per possible joiner");
        material.ca = Some(ca);
        material
    })
}

#[cfg(test)]
mod fixtures {
    /// Writes new fixtures (run by hand, see [`super::Material`]).
    #[test]
    #[ignore]
    fn write_material() {
        let json = serde_json::to_string_pretty(&super::Material::generate()).expect("encodes");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/material.json");
        std::fs::write(path, json + "\n").expect("the fixture file is writable");
    }
}
