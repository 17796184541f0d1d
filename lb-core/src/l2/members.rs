//! L2 cluster mode's membership: the replicas that share the IPs are those a member list in the
//! Kubernetes API names (a Lease annotation, [`crate::annotations::L2_MEMBERS`]), and the API is
//! the arbiter of who is in it. Heartbeats say who is alive; the list says who counts.
//!
//! - **Gate** ([`Membership::admits`]): a replica claims IPs only while it is listed (at its own
//!   address) and hears every listed member, or a majority of them (itself included), or leads
//!   a list of at most two. So the side of a partition without a majority falls silent (and
//!   stays out: it is removed), a survivor of three takes over at once, and in a pair only the
//!   leader goes on; a lone follower waits until it leads (the election Lease expires).
//! - **Joining** ([`Membership::poll_change`]): an unlisted replica adds itself when no other
//!   member is listed, or when it hears a listed member, so that a replica cut off from its peers
//!   does not push itself back in and make them flap. A listed replica whose address changed
//!   (a restart on another IP) writes the new one.
//! - **Removal (fencing)**: only the leader of the election removes, only members not heard for
//!   `timeout` (counted from when this replica first saw them listed, for a newcomer), and only
//!   while it hears a majority of the list or the list has at most two members: a leader cut off
//!   from the majority cannot fence the side that serves. The leader never removes itself.
//!   A replica that stops gracefully takes itself off (lb-sync), so members that stop together
//!   do not leave the rest counting them.
//!
//! Every change is proposed against the list version it was decided on; the caller writes it
//! with that version (compare-and-swap) and decides again on the list it then sees.
//!
//! Sans-IO, like the rest of [`crate::l2`]: the list, the heard set and the clock are passed in.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The member list: node name → heartbeat address.
pub type Roster = BTreeMap<Arc<str>, SocketAddr>;

/// A member list annotation that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("the L2 member list {value:?} is not a JSON object of node name to IP:port: {reason}")]
pub struct InvalidRoster {
    pub value: String,
    pub reason: String,
}

/// Parses the annotation's value.
pub fn parse_roster(value: &str) -> Result<Roster, InvalidRoster> {
    let invalid = |reason: String| InvalidRoster { value: value.to_owned(), reason };
    let raw: BTreeMap<String, String> = serde_json::from_str(value).map_err(|e| invalid(e.to_string()))?;
    raw.into_iter()
        .map(|(node, address)| {
            let address = address.parse().map_err(|e| invalid(format!("{address:?}: {e}")))?;
            Ok((Arc::from(node), address))
        })
        .collect()
}

/// The annotation's value for `roster` (what [`parse_roster`] reads back).
pub fn render_roster(roster: &Roster) -> String {
    let raw: BTreeMap<&str, String> = roster.iter().map(|(node, addr)| (&**node, addr.to_string())).collect();
    serde_json::to_string(&raw).expect("a map of strings serialises")
}

/// A change a replica wants made to the member list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListChange {
    /// Add this replica at this address, or move it there.
    Join(SocketAddr),
    /// Remove these members (the leader's fencing).
    Remove(BTreeSet<Arc<str>>),
}

impl ListChange {
    /// `roster` with the change applied, for replica `me`.
    pub fn apply(&self, me: &str, roster: &Roster) -> Roster {
        let mut next = roster.clone();
        match self {
            ListChange::Join(address) => {
                next.insert(Arc::from(me), *address);
            }
            ListChange::Remove(gone) => next.retain(|node, _| !gone.contains(node) || &**node == me),
        }
        next
    }
}

/// One replica's view of the member list. Call order: [`Membership::handle_list`] whenever the
/// list changes; [`Membership::admits`] and [`Membership::poll_change`] with the members heard
/// (within the heartbeat timeout) whenever anything changed; wake at
/// [`Membership::next_deadline`].
#[derive(Debug)]
pub struct Membership {
    me: Arc<str>,
    address: SocketAddr,
    timeout: Duration,
    roster: Roster,
    /// When this replica first saw each member listed: a newcomer is given one `timeout` to be
    /// heard before it counts as gone.
    since: BTreeMap<Arc<str>, Instant>,
}

impl Membership {
    /// Replica `me`, heard at `address`; a member unheard for `timeout` is gone.
    pub fn new(me: &str, address: SocketAddr, timeout: Duration) -> Membership {
        Membership { me: Arc::from(me), address, timeout, roster: Roster::new(), since: BTreeMap::new() }
    }

    /// Takes in the list as it is now; returns the members that left it.
    pub fn handle_list(&mut self, now: Instant, roster: Roster) -> Vec<Arc<str>> {
        let left: Vec<Arc<str>> =
            self.roster.keys().filter(|node| !roster.contains_key(*node)).cloned().collect();
        self.since.retain(|node, _| roster.contains_key(node));
        for node in roster.keys() {
            self.since.entry(Arc::clone(node)).or_insert(now);
        }
        self.roster = roster;
        left
    }

    pub fn roster(&self) -> &Roster {
        &self.roster
    }

    /// Whether the list names this replica at its own address.
    pub fn is_listed(&self) -> bool {
        self.roster.get(&self.me) == Some(&self.address)
    }

    /// How many listed members this replica hears, itself included.
    fn hearing(&self, heard: &BTreeSet<Arc<str>>) -> usize {
        self.roster.keys().filter(|node| **node == self.me || heard.contains(*node)).count()
    }

    /// The gate: whether this replica may claim IPs at all, hearing `heard` (see the module doc).
    pub fn admits(&self, heard: &BTreeSet<Arc<str>>, leading: bool) -> bool {
        if !self.is_listed() {
            return false;
        }
        let (members, hearing) = (self.roster.len(), self.hearing(heard));
        hearing == members || hearing * 2 > members || (leading && members <= 2)
    }

    /// The change this replica wants made now, if any: joining first, then (as leader) removal.
    pub fn poll_change(&self, now: Instant, heard: &BTreeSet<Arc<str>>, leading: bool) -> Option<ListChange> {
        match self.roster.get(&self.me) {
            Some(address) if *address == self.address => {}
            Some(_) => return Some(ListChange::Join(self.address)),
            None => {
                let mut others = self.roster.keys().filter(|node| **node != self.me).peekable();
                let alone = others.peek().is_none();
                return (alone || others.any(|node| heard.contains(node)))
                    .then_some(ListChange::Join(self.address));
            }
        }
        if !leading {
            return None;
        }
        let (members, hearing) = (self.roster.len(), self.hearing(heard));
        if hearing * 2 <= members && members > 2 {
            return None;
        }
        let gone: BTreeSet<Arc<str>> =
            self.unheard(heard).filter(|(_, due)| *due <= now).map(|(n, _)| n).collect();
        (!gone.is_empty()).then_some(ListChange::Remove(gone))
    }

    /// The listed members other than this replica that it does not hear, each with the moment it
    /// may count as gone.
    fn unheard<'a>(
        &'a self,
        heard: &'a BTreeSet<Arc<str>>,
    ) -> impl Iterator<Item = (Arc<str>, Instant)> + 'a {
        self.since
            .iter()
            .filter(move |(node, _)| **node != self.me && !heard.contains(*node))
            .map(|(node, since)| (Arc::clone(node), *since + self.timeout))
    }

    /// The earliest moment after `now` when an unheard newcomer would count as gone.
    pub fn next_deadline(&self, now: Instant, heard: &BTreeSet<Arc<str>>) -> Option<Instant> {
        self.unheard(heard).map(|(_, due)| due).filter(|due| *due > now).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::origin;

    const TIMEOUT: Duration = Duration::from_millis(400);

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 7946))
    }

    /// node-a at .1, node-b at .2, …
    fn roster(nodes: &[&str]) -> Roster {
        nodes.iter().map(|n| (Arc::from(*n), addr(n.as_bytes()[5] - b'a' + 1))).collect()
    }

    fn heard(nodes: &[&str]) -> BTreeSet<Arc<str>> {
        nodes.iter().map(|n| Arc::from(*n)).collect()
    }

    fn member(me: &str, list: &[&str], now: Instant) -> Membership {
        let mut membership = Membership::new(me, addr(me.as_bytes()[5] - b'a' + 1), TIMEOUT);
        membership.handle_list(now, roster(list));
        membership
    }

    fn removal(nodes: &[&str]) -> Option<ListChange> {
        Some(ListChange::Remove(heard(nodes)))
    }

    #[test]
    fn the_roster_annotation_round_trips_and_a_bad_one_is_an_error() {
        let list = roster(&["node-a", "node-b"]);
        let text = render_roster(&list);
        assert_eq!(text, r#"{"node-a":"10.0.0.1:7946","node-b":"10.0.0.2:7946"}"#);
        assert_eq!(parse_roster(&text).expect("parses"), list);
        assert!(parse_roster(r#"{"node-a": "nowhere"}"#).is_err());
        assert!(parse_roster("[]").is_err());
    }

    #[test]
    fn an_unlisted_replica_claims_nothing_and_one_listed_elsewhere_neither() {
        let t0 = origin();
        let a = member("node-a", &["node-b", "node-c"], t0);
        assert!(!a.admits(&heard(&["node-b", "node-c"]), true));
        let mut moved = roster(&["node-a", "node-b"]);
        moved.insert(Arc::from("node-a"), addr(99));
        let mut a = Membership::new("node-a", addr(1), TIMEOUT);
        a.handle_list(t0, moved);
        assert!(!a.admits(&heard(&["node-b"]), true), "listed at another address");
        assert_eq!(a.poll_change(t0, &heard(&[]), false), Some(ListChange::Join(addr(1))), "moves at once");
    }

    #[test]
    fn a_listed_replica_claims_hearing_every_member_or_a_majority() {
        let t0 = origin();
        let three = member("node-a", &["node-a", "node-b", "node-c"], t0);
        assert!(three.admits(&heard(&["node-b", "node-c"]), false), "every member");
        assert!(three.admits(&heard(&["node-b"]), false), "a follower died: 2 of 3 take over at once");
        assert!(!three.admits(&heard(&[]), false), "cut off: 1 of 3 falls silent");
        assert!(!three.admits(&heard(&[]), true), "even as the leader");
        let pair = member("node-b", &["node-a", "node-b"], t0);
        assert!(pair.admits(&heard(&["node-a"]), false));
        assert!(!pair.admits(&heard(&[]), false), "a lone follower of a pair waits for the Lease");
        assert!(pair.admits(&heard(&[]), true), "a pair's leader goes on alone");
        assert!(member("node-a", &["node-a"], t0).admits(&heard(&[]), false), "alone in the list");
    }

    #[test]
    fn a_replica_joins_an_empty_list_or_when_it_hears_a_member_only() {
        let t0 = origin();
        let join = Some(ListChange::Join(addr(3)));
        assert_eq!(member("node-c", &[], t0).poll_change(t0, &heard(&[]), false), join);
        let c = member("node-c", &["node-a", "node-b"], t0);
        assert_eq!(c.poll_change(t0, &heard(&[]), false), None, "cut off: it stays out");
        assert_eq!(c.poll_change(t0, &heard(&["node-b"]), false), join, "it hears a member");
        let listed = member("node-c", &["node-a", "node-c"], t0);
        assert_eq!(listed.poll_change(t0, &heard(&["node-a"]), false), None, "already listed");
    }

    #[test]
    fn only_the_leader_removes_members_unheard_for_the_timeout() {
        let t0 = origin();
        let list = ["node-a", "node-b", "node-c"];
        let a = member("node-a", &list, t0);
        let hears_b = heard(&["node-b"]);
        assert_eq!(a.poll_change(t0 + TIMEOUT, &hears_b, false), None, "a follower never removes");
        let early = t0 + TIMEOUT - Duration::from_millis(1);
        assert_eq!(a.poll_change(early, &hears_b, true), None, "a newly listed member gets one timeout");
        assert_eq!(a.next_deadline(t0, &hears_b), Some(t0 + TIMEOUT));
        assert_eq!(a.poll_change(t0 + TIMEOUT, &hears_b, true), removal(&["node-c"]));
        assert_eq!(a.poll_change(t0 + TIMEOUT, &heard(&list[1..]), true), None, "everyone heard");
    }

    #[test]
    fn a_leader_without_a_majority_fences_nobody_unless_the_list_is_a_pair() {
        let t0 = origin();
        let late = t0 + TIMEOUT;
        let three = member("node-a", &["node-a", "node-b", "node-c"], t0);
        assert_eq!(three.poll_change(late, &heard(&[]), true), None, "the minority side must not fence");
        let pair = member("node-a", &["node-a", "node-b"], t0);
        assert_eq!(pair.poll_change(late, &heard(&[]), true), removal(&["node-b"]));
        let four = member("node-a", &["node-a", "node-b", "node-c", "node-d"], t0);
        assert_eq!(four.poll_change(late, &heard(&["node-b"]), true), None, "2 of 4 is no majority");
        assert_eq!(four.poll_change(late, &heard(&["node-b", "node-c"]), true), removal(&["node-d"]));
    }

    #[test]
    fn a_removal_keeps_the_remover_and_a_join_replaces_an_old_address() {
        let list = roster(&["node-a", "node-b", "node-c"]);
        let removed = ListChange::Remove(heard(&["node-a", "node-c"])).apply("node-a", &list);
        assert_eq!(removed, roster(&["node-a", "node-b"]));
        let joined = ListChange::Join(addr(7)).apply("node-b", &roster(&["node-a"]));
        assert_eq!(joined.get("node-b"), Some(&addr(7)));
        assert_eq!(ListChange::Join(addr(8)).apply("node-b", &joined).get("node-b"), Some(&addr(8)));
    }

    #[test]
    fn members_that_left_the_list_are_reported_and_forgotten() {
        let t0 = origin();
        let mut a = member("node-a", &["node-a", "node-b", "node-c"], t0);
        let left = a.handle_list(t0 + TIMEOUT, roster(&["node-a", "node-b"]));
        assert_eq!(left, vec![Arc::<str>::from("node-c")]);
        // node-c back: a newcomer again, given a fresh timeout from now.
        let back = t0 + TIMEOUT * 2;
        a.handle_list(back, roster(&["node-a", "node-b", "node-c"]));
        assert_eq!(a.poll_change(back, &heard(&["node-b"]), true), None);
        assert_eq!(a.poll_change(back + TIMEOUT, &heard(&["node-b"]), true), removal(&["node-c"]));
    }
}
