//! Committed prefixes agree across nodes.

use coyote_log::store::EventRecord;

use super::*;

/// Committed prefixes agree: any two nodes hold the same archived events up to the smaller of their
/// applied indexes. Each node is compared with the most advanced one only: if every node agrees with
/// it up to its own applied index, any two agree up to the smaller of theirs, and if one does not,
/// that pair disagrees.
pub fn prefixes_agree(nodes: &[NodeSnapshot]) -> Vec<String> {
    let Some(most) = nodes.iter().max_by_key(|n| n.applied) else { return Vec::new() };
    let mut violations = Vec::new();
    for node in nodes.iter().filter(|n| !std::ptr::eq(*n, most)) {
        let upto = node.applied.min(most.applied);
        let prefix = |n| prefix(n, upto);
        if std::sync::Arc::ptr_eq(&node.archive, &most.archive) || prefix(node).eq(prefix(most)) {
            continue;
        }
        let first = prefix(node)
            .zip(prefix(most))
            .find(|(l, r)| l != r)
            .map(|(l, r)| format!("index {} vs {}", l.envelope.index, r.envelope.index))
            .unwrap_or_else(|| format!("{} events vs {}", prefix(node).count(), prefix(most).count()));
        violations.push(format!(
            "prefix: {} and {} disagree below their common applied index {upto} (first difference: {first})",
            node.host, most.host
        ));
    }
    violations
}

/// The archived events of `node` up to `upto`.
fn prefix(node: &NodeSnapshot, upto: u64) -> impl Iterator<Item = &EventRecord> {
    node.archive.iter().take_while(move |r| r.envelope.index <= upto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::{node, record};

    #[test]
    fn prefixes_compare_only_up_to_the_common_applied_index() {
        let a = node("a", 2, vec![record(1, "x"), record(2, "y")]);
        let b = node("b", 1, vec![record(1, "x")]);
        assert!(prefixes_agree(&[a.clone(), b]).is_empty());
        let c = node("c", 2, vec![record(1, "x"), record(2, "z")]);
        assert_eq!(prefixes_agree(&[a.clone(), c]).len(), 1);
        // Two nodes behind the most advanced: one agrees with it, the other does not, wherever the
        // most advanced one stands in the list.
        let ahead = node("ahead", 3, vec![record(1, "x"), record(2, "y"), record(3, "w")]);
        let wrong = node("wrong", 2, vec![record(1, "x"), record(2, "q")]);
        for nodes in
            [vec![ahead.clone(), a.clone(), wrong.clone()], vec![wrong.clone(), a.clone(), ahead.clone()]]
        {
            let found = prefixes_agree(&nodes);
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(found[0].contains("wrong and ahead") && found[0].contains("index 2 vs 2"), "{found:?}");
        }
        // An archive shorter than its applied index says so.
        let short = node("short", 2, vec![record(1, "x")]);
        let found = prefixes_agree(&[ahead, short]);
        assert!(found.len() == 1 && found[0].contains("1 events vs 2"), "{found:?}");
    }
}
