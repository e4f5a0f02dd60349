//! Join tokens that no longer hold are refused with a clear message, and change nothing.

use std::time::Duration;

use anyhow::Result;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use coyote_tests::Node;
use serde_json::Value;

fn edit_token(token: &str, edit: impl FnOnce(&mut Value)) -> String {
    let body = token.strip_prefix("cyt1_").expect("token prefix");
    let mut v: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
    edit(&mut v);
    format!("cyt1_{}", URL_SAFE_NO_PAD.encode(v.to_string()))
}

fn is_empty_dir(node: &Node) -> bool {
    std::fs::read_dir(&node.dir).map(|mut d| d.next().is_none()).unwrap_or(true)
}

#[test]
fn refused_tokens_get_a_clear_error_and_change_nothing() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut a = Node::new(root.path(), "a");
    a.up()?;

    // A single-use token admits one server, and only one.
    let single = a.token(&["--uses", "1"])?;
    let mut b = Node::new(root.path(), "b");
    b.join(&single)?;
    let c = Node::new(root.path(), "c");
    let err = c.join_expect_failure(&single)?;
    assert!(err.contains("already been used"), "second use: {err}");
    assert!(is_empty_dir(&c), "a refused join left files behind");

    // Expired.
    let short = a.token(&["--ttl", "1s"])?;
    std::thread::sleep(Duration::from_millis(1500));
    let err = c.join_expect_failure(&short)?;
    assert!(err.contains("expired"), "expired token: {err}");

    // Revoked.
    let v = a.cli_json(&["token", "create"])?;
    let revoked = v["token"].as_str().unwrap().to_string();
    a.cli_json(&["token", "revoke", v["id"].as_str().unwrap()])?;
    let err = c.join_expect_failure(&revoked)?;
    assert!(err.contains("revoked"), "revoked token: {err}");

    // A wrong secret.
    let fresh = a.token(&[])?;
    let wrong_secret = edit_token(&fresh, |v| v["s"] = Value::from("not-the-secret"));
    let err = c.join_expect_failure(&wrong_secret)?;
    assert!(err.contains("wrong secret"), "wrong secret: {err}");

    // A token whose CA pin is not this cluster's: the new server refuses to talk to the member.
    let other_pin = edit_token(&fresh, |v| v["p"] = Value::from("ab".repeat(32)));
    let err = c.join_expect_failure(&other_pin)?;
    assert!(err.to_lowercase().contains("pin"), "wrong pin: {err}");

    // Not a token at all, or a damaged one.
    let err = c.join_expect_failure("hello")?;
    assert!(err.contains("not a coyote join token"), "{err}");
    let err = c.join_expect_failure(&fresh[..fresh.len() - 7])?;
    assert!(err.contains("damaged"), "{err}");
    assert!(is_empty_dir(&c));

    // None of this touched the cluster: two members, one join, and the fresh token still works.
    let s = a.status()?;
    assert_eq!(s["members"].as_array().unwrap().len(), 2, "{s}");
    let joins =
        a.events()?.iter().filter(|e| e["kind"] == "node_joined" && e["outcome"] == "applied").count();
    assert_eq!(joins, 1);
    let mut c = c;
    c.join(&fresh)?;
    assert_eq!(a.status()?["members"].as_array().unwrap().len(), 3);
    Ok(())
}
