//! The member Lease of L2 cluster mode against the API server emulator: a proposed change is
//! written on the version it was decided on and published back; one decided on an older list
//! is never written; a change made by someone else meanwhile (a 409 or a newer list) wins, and
//! the next proposal is written on top of it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use lb_core::annotations::L2_MEMBERS;
use lb_core::l2::members::{ListChange, Roster, parse_roster};
use lb_sync::l2::members::{self, MemberLease};
use lb_sync::l2::{MemberList, Proposal};
use testkit::apiserver::ApiServer;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(10);

fn addr(last: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, last], 7946))
}

/// Waits until the published list satisfies `wanted`; the members and version then.
async fn wait_list(
    list: &mut watch::Receiver<MemberList>,
    what: &str,
    wanted: impl Fn(&Roster) -> bool,
) -> (Roster, Option<String>) {
    let found = tokio::time::timeout(
        DEADLINE,
        list.wait_for(
            |list| matches!(list, MemberList::Leased { members, version: Some(_) } if wanted(members)),
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
    .expect("the member task runs");
    match &*found {
        MemberList::Leased { members, version } => (members.clone(), version.clone()),
        MemberList::Configured(_) => unreachable!("matched Leased"),
    }
}

fn names(roster: &Roster) -> BTreeSet<&str> {
    roster.keys().map(|n| &**n).collect()
}

#[tokio::test]
async fn changes_are_written_on_the_version_they_were_decided_on_and_others_writes_win() {
    let server = ApiServer::start();
    let client = kube::Client::try_from(server.kube_config().await).expect("a client");
    let namespace = Namespace {
        metadata: ObjectMeta { name: Some("ringlb-system".into()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("namespace");
    let (list_tx, mut list) = watch::channel(MemberList::Leased { members: Roster::new(), version: None });
    let (proposals, proposed) = watch::channel(None);
    let (stop, stopped) = watch::channel(false);
    let lease = MemberLease::beside("ringlb-system", "ringlb");
    let mut until = stopped.clone();
    let task =
        tokio::spawn(members::run(client.clone(), lease, "node-a".into(), list_tx, proposed, async move {
            let _ = until.wait_for(|stop| *stop).await;
        }));

    // No Lease yet: joining creates it.
    proposals.send_replace(Some(Proposal { change: ListChange::Join(addr(1)), version: None }));
    let (roster, v1) = wait_list(&mut list, "node-a listed", |r| r.get("node-a") == Some(&addr(1))).await;
    assert_eq!(names(&roster), BTreeSet::from(["node-a"]));

    // Someone else adds node-b behind this replica's back.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "ringlb-system");
    let mut stored = leases.get("ringlb-l2").await.expect("the member Lease");
    stored
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(L2_MEMBERS.to_owned(), format!(r#"{{"node-a": "{}", "node-b": "{}"}}"#, addr(1), addr(2)));
    leases.replace("ringlb-l2", &PostParams::default(), &stored).await.expect("an outside write");
    // A change decided on the list before it is not written: node-b stays.
    let removal = ListChange::Remove(BTreeSet::from([Arc::from("node-b")]));
    proposals.send_replace(Some(Proposal { change: removal.clone(), version: v1 }));
    let (roster, v2) = wait_list(&mut list, "node-b listed", |r| r.contains_key("node-b")).await;
    let writes_before = server.requests().iter().filter(|r| r.starts_with("PUT")).count();
    assert_eq!(names(&roster), BTreeSet::from(["node-a", "node-b"]));

    // Decided again on the list as it is: written.
    proposals.send_replace(Some(Proposal { change: removal, version: v2 }));
    let (roster, _) = wait_list(&mut list, "node-b removed", |r| !r.contains_key("node-b")).await;
    assert_eq!(names(&roster), BTreeSet::from(["node-a"]));
    let writes = server.requests().iter().filter(|r| r.starts_with("PUT")).count();
    assert_eq!(writes, writes_before + 1, "one write per change");
    let stored = leases.get("ringlb-l2").await.expect("the member Lease");
    let annotation = &stored.metadata.annotations.expect("annotations")[L2_MEMBERS];
    assert_eq!(parse_roster(annotation).expect("parses"), roster);

    stop.send_replace(true);
    tokio::time::timeout(DEADLINE, task).await.expect("stops").expect("no panic");
}
