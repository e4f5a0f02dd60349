//! No acknowledged event is lost: the client oracle against the archives.

use super::*;

/// No acknowledged event is lost: every node that applied up to an acknowledged index archived that
/// very proposal there.
pub fn no_ack_lost(nodes: &[NodeSnapshot], acks: &[Ack]) -> Vec<String> {
    let mut violations = Vec::new();
    for node in nodes {
        for ack in acks.iter().filter(|a| a.index <= node.applied) {
            match record_at(&node.archive, ack.index) {
                Some(r) if r.envelope.actor == ack.actor && r.envelope.event == ack.event => {}
                Some(r) => violations.push(format!(
                    "lost ack: {} holds {} {:?} at acknowledged index {}, not {} {:?}",
                    node.host, r.envelope.actor, r.envelope.event, ack.index, ack.actor, ack.event
                )),
                None => violations.push(format!(
                    "lost ack: {} applied up to {} but has no event at acknowledged index {} ({} {:?})",
                    node.host, node.applied, ack.index, ack.actor, ack.event
                )),
            }
        }
    }
    violations
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testing::{node, record};

    #[test]
    fn an_acknowledged_event_must_be_where_it_was_acknowledged() {
        let ack = Ack { index: 2, actor: "sim".into(), event: record(2, "y").envelope.event };
        let good = node("a", 2, vec![record(1, "x"), record(2, "y")]);
        let behind = node("b", 1, vec![record(1, "x")]);
        assert!(no_ack_lost(&[good, behind], std::slice::from_ref(&ack)).is_empty());
        let other = node("c", 3, vec![record(1, "x"), record(2, "z")]);
        assert_eq!(no_ack_lost(&[other], &[ack]).len(), 1);
    }
}
