//! The bridge network against the real Docker Engine: two nodes on one host that create it at the same
//! moment can leave two networks of one name, which Docker then refuses to resolve ("ambiguous").
//! `ensure_network` must heal that by itself, or no container could be created on that host again.

use std::collections::HashMap;
use std::path::PathBuf;

use coyote_nodes::runtime::{ContainerRuntime, DockerRuntime, Scope};

const SOCKET: &str = "/var/run/docker.sock";

async fn networks_named(docker: &bollard::Docker, name: &str) -> Vec<String> {
    let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
    let options = bollard::query_parameters::ListNetworksOptions { filters: Some(filters) };
    let listed = docker.list_networks(Some(options)).await.expect("Docker lists networks");
    let mut ids: Vec<String> =
        listed.into_iter().filter(|n| n.name.as_deref() == Some(name)).filter_map(|n| n.id).collect();
    ids.sort();
    ids
}

async fn create_raw(docker: &bollard::Docker, name: &str) -> Result<String, bollard::errors::Error> {
    let request = bollard::models::NetworkCreateRequest {
        name: name.to_string(),
        driver: Some("bridge".into()),
        ..Default::default()
    };
    docker.create_network(request).await.map(|r| r.id)
}

#[tokio::test]
async fn two_networks_of_one_name_are_reduced_to_one() {
    let docker = bollard::Docker::connect_with_unix(SOCKET, 30, bollard::API_DEFAULT_VERSION)
        .expect("the Docker socket")
        .negotiate_version()
        .await
        .expect("Docker answers");
    let name = format!("coyote-dup-test-{}", std::process::id());
    create_raw(&docker, &name).await.expect("the first network");
    if create_raw(&docker, &name).await.is_err() {
        // An engine that refuses duplicate names cannot get into this state: nothing to heal.
        for id in networks_named(&docker, &name).await {
            let _ = docker.remove_network(&id).await;
        }
        eprintln!("this Docker Engine refuses a second network of one name; nothing to test");
        return;
    }
    let before = networks_named(&docker, &name).await;
    assert_eq!(before.len(), 2, "two networks named {name}: {before:?}");
    let inspected = docker.inspect_network(&name, None).await;
    assert!(inspected.is_err(), "Docker resolves an ambiguous name: {inspected:?}");

    let runtime =
        DockerRuntime::new(PathBuf::from(SOCKET), Scope { cluster_id: "duptest".into(), node_id: 1 });
    let ensured = runtime.ensure_network(&name).await;
    let after = networks_named(&docker, &name).await;
    for id in &after {
        let _ = docker.remove_network(id).await;
    }
    ensured.expect("ensure_network heals two networks of one name");
    assert_eq!(after, vec![before[0].clone()], "the network with the lowest id stays, the other goes");
}
