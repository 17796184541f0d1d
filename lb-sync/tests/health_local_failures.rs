//! Health probes the load balancer cannot make for its own lack of descriptors count against no
//! backend: no failed probe, no verdict, and probing resumes when descriptors are back.
//!
//! Its own test binary: it takes every file descriptor of the process for a while, which would
//! break any test running beside it.

mod support;

use std::net::SocketAddr;

use support::{ManifestDir, Running, eligible, events_only_source, slice_header, until};
use testkit::backends::Server;
use testkit::descriptors::Exhausted;

#[tokio::test]
async fn probes_that_fail_for_want_of_descriptors_never_make_a_backend_unhealthy() {
    let live = Server::spawn_on("127.0.0.2:0".parse().expect("addr"), drop).expect("backend");
    let port = live.addr().port();
    let slice = slice_header("shop", "web-abcde", "web").replace("port: 8080", &format!("port: {port}"));
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    \
         ringlb.io/health-check: tcp\n    ringlb.io/health-interval: 20ms\n    ringlb.io/health-fall: \"2\"\n\
         spec:\n  externalIPs: [\"127.0.0.61\"]\n  ports:\n  - name: http\n    port: 80\n    targetPort: {port}\n\
         ---\n{slice}endpoints:\n- addresses: [\"127.0.0.2\"]\n"
    );
    let manifests = ManifestDir::with_file(&manifest);
    let source = events_only_source(&manifests.file());
    let mut running = Running::start(source);
    let status = running.health.clone();
    let up: SocketAddr = live.addr();
    let first = running.next_snapshot().await;
    assert_eq!(eligible(&first, "127.0.0.61:80"), [up]);
    until(&status, "probes pass", |s| s.probes_sent() >= 3).await;

    // Kept full: a probe socket open at the moment of filling would otherwise be closed and
    // reused by every later probe.
    let exhausted = Exhausted::kept_full();
    until(&status, "probes fail for want of descriptors", |s| s.probes_local_failures() >= 5).await;
    drop(exhausted);
    assert_eq!(status.probes_failed(), 0, "no probe counted against the backend");
    assert_eq!(status.unhealthy_backends(), 0, "fall is 2 and many probes could not be made");
    let sent = status.probes_sent();
    until(&status, "probing resumes", |s| s.probes_sent() >= sent + 3).await;
    assert_eq!((status.probes_failed(), status.unhealthy_backends()), (0, 0));
    running.assert_nothing_published();
    running.stop().await;
}
