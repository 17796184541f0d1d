//! Kubernetes Events (`events.k8s.io/v1`) about the Services ringlb serves, as `kubectl describe`
//! shows them: what was allocated or released, and why an address could not be.
//!
//! Each Event is one create, named `<object>.<nanoseconds in hex>` and shaped as kube-runtime's
//! `Recorder` shapes them. That recorder is not used: it keeps every Event it sent for six minutes,
//! to count repeats into a series, and sweeps that cache on every send. A start that allocates
//! 10,000 addresses sends 10,000 Events; the cache then held 23 MB and each send swept all of it.
//! The caller sends an Event only when what it tells a Service changes, so there are no repeats to
//! count.

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// Whether an Event reports progress or a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// Who sends the Events: the controller and this replica.
#[derive(Debug, Clone)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

/// What one Event says.
#[derive(Debug, Clone)]
pub struct Note {
    pub type_: EventType,
    pub reason: String,
    pub action: String,
    pub note: String,
}

/// The Event telling `note` about `regarding` at `now`.
pub fn event(reporter: &Reporter, note: &Note, regarding: &ObjectReference, now: Timestamp) -> Event {
    let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
    let object = regarding.name.as_deref().unwrap_or(&reporter.controller);
    let type_ = match note.type_ {
        EventType::Normal => "Normal",
        EventType::Warning => "Warning",
    };
    Event {
        metadata: ObjectMeta {
            namespace: Some(namespace),
            name: Some(format!("{object}.{:x}", now.as_nanosecond())),
            ..ObjectMeta::default()
        },
        action: Some(note.action.clone()),
        reason: Some(note.reason.clone()),
        note: Some(note.note.clone()),
        type_: Some(type_.to_owned()),
        event_time: Some(MicroTime(now)),
        regarding: Some(regarding.clone()),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Event::default()
    }
}

/// Creates the Event telling `note` about `regarding`.
pub async fn publish(
    client: &Client,
    reporter: &Reporter,
    note: &Note,
    regarding: &ObjectReference,
) -> Result<(), kube::Error> {
    let event = event(reporter, note, regarding, Timestamp::now());
    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
    Api::<Event>::namespaced(client.clone(), namespace).create(&PostParams::default(), &event).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_names_its_object_its_reporter_and_its_time() {
        let reporter = Reporter { controller: "ringlb.io/controller".into(), instance: "node-a".into() };
        let note = Note {
            type_: EventType::Warning,
            reason: "AllocationFailed".into(),
            action: "Allocate".into(),
            note: "no pool has a free address".into(),
        };
        let regarding = ObjectReference {
            kind: Some("Service".into()),
            namespace: Some("shop".into()),
            name: Some("web".into()),
            ..ObjectReference::default()
        };
        let now = Timestamp::from_nanosecond(1_764_547_200_123_456_789).expect("in range");
        let event = event(&reporter, &note, &regarding, now);
        assert_eq!(event.metadata.name.as_deref(), Some("web.187cee545cc4cd15"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reporting_instance.as_deref(), Some("node-a"));
        assert_eq!(event.regarding.as_ref(), Some(&regarding));
        assert_eq!(event.event_time.map(|t| t.0), Some(now));
    }
}
