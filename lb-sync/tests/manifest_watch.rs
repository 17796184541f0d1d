//! Following manifest files: the first snapshot, edits that change what is served, bad edits that must
//! not, and the ways editors and tools replace files. Every wait is bounded by a deadline.

mod support;

use std::fs;
use std::time::Duration;

use lb_core::BuildOptions;
use lb_sync::{ManifestSource, SyncError};
use support::{
    ManifestDir, Running, WEB_BACKENDS, WEB_VIP, addrs, eligible, events_only_source, save_by_rename,
    service_yaml, web_manifest,
};

const FOURTH_NOT_READY: [bool; 4] = [true, true, true, false];

#[tokio::test]
async fn initial_snapshot_is_published_and_marks_the_source_ready() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let control = lb_sync::ControlLoop::new(BuildOptions::default());
    let readiness = control.readiness();
    assert!(!readiness.is_ready(), "nothing published yet");

    let mut running = Running::start_with(control, events_only_source(&manifests.file()));
    let first = running.next_snapshot().await;
    assert_eq!(first.version, 1);
    assert_eq!(eligible(&first, WEB_VIP), addrs(&WEB_BACKENDS[..3]));
    assert!(readiness.is_ready());
    assert_eq!(readiness.published_version(), Some(1));
    running.stop().await;
}

#[tokio::test]
async fn an_edit_that_flips_readiness_publishes_the_next_version() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(&manifests.file()));
    assert_eq!(eligible(&*running.next_snapshot().await, WEB_VIP), addrs(&WEB_BACKENDS[..3]));

    fs::write(manifests.file(), web_manifest([false, true, true, true])).expect("edit in place");
    let flipped = running.next_snapshot().await;
    assert_eq!(flipped.version, 2);
    assert_eq!(eligible(&flipped, WEB_VIP), addrs(&WEB_BACKENDS[1..]));
    running.stop().await;
}

#[tokio::test]
async fn a_rename_over_the_file_like_an_editor_save_is_picked_up() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(&manifests.file()));
    running.next_snapshot().await;

    save_by_rename(&manifests.file(), &web_manifest([true; 4]));
    let saved = running.next_snapshot().await;
    assert_eq!(eligible(&saved, WEB_VIP), addrs(&WEB_BACKENDS));

    // The watch must survive the inode swap: a second save is seen too.
    save_by_rename(&manifests.file(), &web_manifest([true, false, false, false]));
    let saved_again = running.next_snapshot().await;
    assert_eq!((saved_again.version, eligible(&saved_again, WEB_VIP)), (3, addrs(&WEB_BACKENDS[..1])));
    running.stop().await;
}

#[tokio::test]
async fn a_broken_edit_keeps_the_previous_snapshot_until_a_good_one() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(&manifests.file()));
    running.next_snapshot().await;

    let broken_yaml = web_manifest([true; 4]).replace("name: web\n", "name: [web\n");
    let wrong_type = web_manifest([true; 4]).replace("port: 80", "port: eighty");
    for broken in [broken_yaml, wrong_type] {
        let rejected_before = running.readiness.rejected_reloads();
        fs::write(manifests.file(), broken).expect("write a broken edit");
        running.rejected_after(rejected_before).await;
        running.assert_nothing_published();
        assert!(running.readiness.inputs_rejected());
    }

    fs::write(manifests.file(), web_manifest([true; 4])).expect("fix the edit");
    let fixed = running.next_snapshot().await;
    assert_eq!((fixed.version, eligible(&fixed, WEB_VIP)), (2, addrs(&WEB_BACKENDS)));
    assert!(!running.readiness.inputs_rejected());
    running.stop().await;
}

#[tokio::test]
async fn a_deleted_file_keeps_serving_and_its_recreation_is_picked_up() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(&manifests.file()));
    running.next_snapshot().await;

    let rejected_before = running.readiness.rejected_reloads();
    fs::remove_file(manifests.file()).expect("delete the manifest");
    running.rejected_after(rejected_before).await;
    running.assert_nothing_published();

    fs::write(manifests.file(), web_manifest([true; 4])).expect("recreate the manifest");
    let recreated = running.next_snapshot().await;
    assert_eq!((recreated.version, eligible(&recreated, WEB_VIP)), (2, addrs(&WEB_BACKENDS)));
    running.stop().await;
}

#[tokio::test]
async fn edits_that_do_not_change_the_table_publish_nothing() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(&manifests.file()));
    running.next_snapshot().await;

    // Same table, different text: metadata a cluster changes on its own, and a comment. Saved
    // atomically so the source never sees a half-written file, and waited for so each is its own load.
    let with_metadata = web_manifest(FOURTH_NOT_READY).replacen(
        "  namespace: shop\n",
        "  namespace: shop\n  resourceVersion: \"777\"\n",
        1,
    );
    for same_table in [with_metadata, format!("# reviewed\n{}", web_manifest(FOURTH_NOT_READY))] {
        let loads_before = running.readiness.loads();
        save_by_rename(&manifests.file(), &same_table);
        running.loaded_after(loads_before).await;
        running.assert_nothing_published();
    }

    // A real change still publishes, and as version 2: nothing consumed a version meanwhile.
    save_by_rename(&manifests.file(), &web_manifest([true; 4]));
    let next = running.next_snapshot().await;
    assert_eq!((next.version, eligible(&next, WEB_VIP)), (2, addrs(&WEB_BACKENDS)));
    running.stop().await;
}

#[tokio::test]
async fn a_file_added_to_a_watched_directory_is_served() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let mut running = Running::start(events_only_source(manifests.path()));
    assert_eq!(running.next_snapshot().await.len(), 1);

    save_by_rename(&manifests.path().join("api.yaml"), &service_yaml("shop", "api", "127.0.0.51"));
    let with_api = running.next_snapshot().await;
    assert_eq!(with_api.len(), 2, "entries: {:?}", with_api.keys().collect::<Vec<_>>());
    running.stop().await;
}

#[tokio::test]
async fn a_manifest_symlinked_from_another_directory_is_followed() {
    let elsewhere = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let served = tempfile::tempdir().expect("tempdir");
    let link = served.path().join("web.yaml");
    std::os::unix::fs::symlink(elsewhere.file(), &link).expect("symlink");
    let mut running = Running::start(events_only_source(&link));
    running.next_snapshot().await;

    fs::write(elsewhere.file(), web_manifest([true; 4])).expect("edit the symlink's target");
    let edited = running.next_snapshot().await;
    assert_eq!(eligible(&edited, WEB_VIP), addrs(&WEB_BACKENDS));
    running.stop().await;
}

#[tokio::test]
async fn without_file_events_the_periodic_recheck_still_picks_up_edits() {
    let manifests = ManifestDir::with_file(&web_manifest(FOURTH_NOT_READY));
    let source = ManifestSource::new(manifests.file())
        .with_file_events(false)
        .with_poll_interval(Duration::from_millis(50));
    let mut running = Running::start(source);
    running.next_snapshot().await;

    fs::write(manifests.file(), web_manifest([true; 4])).expect("edit");
    let polled = running.next_snapshot().await;
    assert_eq!((polled.version, eligible(&polled, WEB_VIP)), (2, addrs(&WEB_BACKENDS)));
    running.stop().await;
}

#[tokio::test]
async fn a_failed_initial_load_is_returned_and_nothing_is_published() {
    let manifests = ManifestDir::with_file("apiVersion: v1\nkind: Service\nmetadata: {name: [x\n");
    let source = events_only_source(&manifests.file());
    let control = lb_sync::ControlLoop::new(BuildOptions::default());
    let readiness = control.readiness();
    let (sink, mut snapshots) = tokio::sync::mpsc::unbounded_channel();
    let running = control.run(source, sink, std::future::pending::<()>());
    let outcome = tokio::time::timeout(support::MUST_HAPPEN_WITHIN, running)
        .await
        .expect("a failed initial load returns at once");

    let Err(error @ SyncError::InitialLoad { .. }) = outcome else {
        panic!("expected an initial load error, got {outcome:?}");
    };
    assert!(error.to_string().contains("services.yaml"), "{error}");
    assert!(snapshots.try_recv().is_err(), "nothing may be published");
    assert!(!readiness.is_ready());
}
