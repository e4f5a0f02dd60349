//! At most one leader per term.

use std::collections::BTreeMap;

use super::*;

/// Election safety as openraft 0.9 defines it: at most one leader per leader id, (term, node id),
/// among the nodes seen at one instant. Openraft lets two candidates win the same term (the one with
/// the higher node id supersedes the other, whose entries can then no longer commit), so two leaders
/// of one term are allowed; two hosts leading with the same leader id are not (they would be one node
/// id given to two servers). Whether what leaders wrote is safe is checked by [`prefixes_agree`] and
/// [`no_ack_lost`].
pub fn one_leader_per_term(nodes: &[NodeSnapshot]) -> Vec<String> {
    let mut leaders: BTreeMap<(u64, u64), Vec<&str>> = BTreeMap::new();
    for node in nodes.iter().filter(|n| n.is_leader) {
        leaders.entry((node.term, node.node_id)).or_default().push(&node.host);
    }
    leaders
        .into_iter()
        .filter(|(_, hosts)| hosts.len() > 1)
        .map(|((term, id), hosts)| {
            format!("election safety: {} all lead term {term} as node {id}", hosts.join(", "))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::node;

    #[test]
    fn two_leaders_of_one_term_are_a_violation() {
        let mut a = node("a", 0, vec![]);
        a.is_leader = true;
        let mut b = a.clone();
        b.host = "b".into();
        assert_eq!(one_leader_per_term(&[a.clone(), b.clone()]).len(), 1, "one leader id, two hosts");
        b.node_id = 2;
        assert!(one_leader_per_term(&[a.clone(), b.clone()]).is_empty(), "openraft allows this");
        b.term = 2;
        assert!(one_leader_per_term(&[a, b]).is_empty());
    }
}
