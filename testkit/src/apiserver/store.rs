//! The emulator's state: every object as JSON, one global resourceVersion counter (as etcd's
//! revision), the event history watches resume from, and the live event feed.
//!
//! As the real server: every write that changes an object takes the next resourceVersion, a no-op
//! write keeps it and sends no event, a deletion takes one too (the DELETED event carries the last
//! state with the deletion revision), and history older than what was compacted answers 410.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::resources::TYPES;

/// Events kept for watches that resume from an older resourceVersion.
const HISTORY: usize = 100_000;
/// The default Service node port range, 30000-32767.
const NODE_PORTS: usize = 2768;

/// One change, as a watch reports it.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub revision: u64,
    pub type_index: usize,
    pub namespace: String,
    /// `ADDED`, `MODIFIED` or `DELETED`.
    pub kind: &'static str,
    /// With `kind` and `apiVersion`, as watch events carry them.
    pub object: Value,
    /// For a MODIFIED event, the state before (a selector watch turns a change that enters or
    /// leaves the selection into ADDED or DELETED).
    pub previous: Option<Value>,
}

pub(crate) type Key = (usize, String, String);

pub(crate) struct Store {
    pub revision: u64,
    pub objects: BTreeMap<Key, Value>,
    history: VecDeque<Arc<Event>>,
    /// Events at or below this revision are gone: a watch from there answers 410.
    pub compacted: u64,
    pub feed: broadcast::Sender<Arc<Event>>,
    /// Bumped to end every open watch (the emulator "cutting" its streams).
    pub cut: tokio::sync::watch::Sender<u64>,
    next_cluster_ip: u32,
    used_node_ports: BTreeSet<i64>,
    random: u64,
}

impl Store {
    /// A fresh store, as a new cluster's: the four namespaces and the `kubernetes` Service, whose
    /// endpoints are the API server at `port`.
    pub fn new(port: u16) -> Store {
        let seed = SystemTime::now().duration_since(UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64);
        let mut store = Store {
            revision: 100,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 0,
            feed: broadcast::channel(16_384).0,
            cut: tokio::sync::watch::channel(0).0,
            next_cluster_ip: 10,
            used_node_ports: BTreeSet::new(),
            random: seed | 1,
        };
        for namespace in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            store.seed_namespace(namespace);
        }
        let mut kubernetes = json!({
            "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": port}], "type": "ClusterIP", "clusterIP": "10.0.0.1", "clusterIPs": ["10.0.0.1"]}
        });
        super::resources::default_new("Service", &mut kubernetes);
        store.insert_new(type_of("Service"), "default", kubernetes);
        store
    }

    fn seed_namespace(&mut self, name: &str) {
        let mut namespace = json!({"metadata": {"name": name}});
        super::resources::default_new("Namespace", &mut namespace);
        self.insert_new(type_of("Namespace"), "", namespace);
    }

    /// Stores a new object (already defaulted and validated), stamping uid, resourceVersion and
    /// creation time; returns it as stored.
    pub fn insert_new(&mut self, type_index: usize, namespace: &str, mut object: Value) -> Value {
        let kind = TYPES[type_index].kind;
        if kind == "Service" {
            self.allocate_service(&mut object);
        }
        let uid = self.uid();
        let revision = self.next_revision();
        let meta = object["metadata"].as_object_mut().expect("metadata is an object");
        meta.insert("uid".to_owned(), json!(uid));
        meta.insert("resourceVersion".to_owned(), json!(revision.to_string()));
        meta.insert("creationTimestamp".to_owned(), json!(now_rfc3339()));
        if TYPES[type_index].generation {
            meta.insert("generation".to_owned(), json!(1));
        }
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
        self.objects.insert((type_index, namespace.to_owned(), name), object.clone());
        self.record(type_index, namespace, "ADDED", &object, None, revision);
        object
    }

    /// What [`Store::insert_new`] would store, without storing it (`dryRun=All`): allocations are
    /// made and returned, and there is no resourceVersion.
    pub fn dry_run(&mut self, type_index: usize, mut object: Value) -> Value {
        if TYPES[type_index].kind == "Service" {
            let taken = self.used_node_ports.clone();
            let next_ip = self.next_cluster_ip;
            self.allocate_service(&mut object);
            self.used_node_ports = taken;
            self.next_cluster_ip = next_ip;
        }
        let uid = self.uid();
        let meta = object["metadata"].as_object_mut().expect("metadata is an object");
        meta.insert("uid".to_owned(), json!(uid));
        meta.insert("creationTimestamp".to_owned(), json!(now_rfc3339()));
        object
    }

    /// Replaces a stored object; a write that changes nothing keeps its resourceVersion and sends no
    /// event. Returns it as stored.
    pub fn replace(&mut self, key: &Key, mut object: Value) -> Value {
        let Some(old) = self.objects.get(key).cloned() else { return object };
        if TYPES[key.0].kind == "Service" {
            self.reallocate_service(&old, &mut object);
        }
        let old = &old;
        let mut comparable = object.clone();
        comparable["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if comparable == *old {
            return old.clone();
        }
        let type_ = &TYPES[key.0];
        if type_.generation && super::resources::spec_of(old) != super::resources::spec_of(&object) {
            let generation = old["metadata"]["generation"].as_i64().unwrap_or(1) + 1;
            object["metadata"]["generation"] = json!(generation);
        }
        let revision = self.next_revision();
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        self.objects.insert(key.clone(), object.clone());
        self.record(key.0, &key.1, "MODIFIED", &object, Some(old.clone()), revision);
        object
    }

    /// Removes an object; returns its last state with the deletion revision.
    pub fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?;
        let revision = self.next_revision();
        object["metadata"]["resourceVersion"] = json!(revision.to_string());
        if TYPES[key.0].kind == "Service" {
            for port in object["spec"]["ports"].as_array().into_iter().flatten() {
                if let Some(node_port) = port["nodePort"].as_i64() {
                    self.used_node_ports.remove(&node_port);
                }
            }
        }
        self.record(key.0, &key.1, "DELETED", &object, None, revision);
        Some(object)
    }

    /// The events after `revision` for a watch, or `None` when that history is compacted.
    pub fn since(&self, revision: u64) -> Option<Vec<Arc<Event>>> {
        if revision < self.compacted {
            return None;
        }
        Some(self.history.iter().filter(|e| e.revision > revision).cloned().collect())
    }

    /// Forgets the history up to now: a watch resuming from before answers 410 Gone.
    pub fn compact(&mut self) {
        self.compacted = self.revision;
        self.history.clear();
    }

    /// What a restart does to the history: the server's own start-up write, then a cache that
    /// begins there.
    pub fn restarted(&mut self) {
        self.revision += 1;
        self.compact();
    }

    fn next_revision(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    fn record(
        &mut self,
        type_index: usize,
        namespace: &str,
        kind: &'static str,
        object: &Value,
        previous: Option<Value>,
        revision: u64,
    ) {
        let typed = |object: &Value| {
            let mut object = object.clone();
            object["kind"] = json!(TYPES[type_index].kind);
            object["apiVersion"] = json!(TYPES[type_index].api_version());
            object
        };
        let event = Arc::new(Event {
            revision,
            type_index,
            namespace: namespace.to_owned(),
            kind,
            object: typed(object),
            previous: previous.as_ref().map(typed),
        });
        self.history.push_back(Arc::clone(&event));
        while self.history.len() > HISTORY {
            if let Some(dropped) = self.history.pop_front() {
                self.compacted = dropped.revision;
            }
        }
        let _ = self.feed.send(event);
    }

    /// A clusterIP from 10.0.0.0/24 (clusterIPs too) and, for LoadBalancer and NodePort Services,
    /// a nodePort per port number (shared by the protocols of one number, as the real server does).
    fn allocate_service(&mut self, object: &mut Value) {
        let spec = &mut object["spec"];
        let headless = spec["clusterIP"] == json!("None");
        if spec["type"] != json!("ExternalName")
            && !headless
            && spec["clusterIP"].as_str().is_none_or(str::is_empty)
        {
            let ip = format!("10.0.0.{}", self.next_cluster_ip);
            self.next_cluster_ip = if self.next_cluster_ip >= 250 { 10 } else { self.next_cluster_ip + 1 };
            spec["clusterIP"] = json!(ip);
            spec["clusterIPs"] = json!([ip]);
        } else if headless {
            spec["clusterIPs"] = json!(["None"]);
        }
        if spec["type"] == json!("LoadBalancer")
            && spec["externalTrafficPolicy"] == json!("Local")
            && spec.get("healthCheckNodePort").is_none_or(Value::is_null)
        {
            let port = self.free_node_port();
            object["spec"]["healthCheckNodePort"] = json!(port);
        }
        let spec = &mut object["spec"];
        let wants_node_ports = spec["type"] == json!("NodePort")
            || (spec["type"] == json!("LoadBalancer")
                && spec["allocateLoadBalancerNodePorts"] != json!(false));
        if !wants_node_ports {
            return;
        }
        let mut by_number: BTreeMap<i64, i64> = BTreeMap::new();
        let mut ports = spec["ports"].as_array().cloned().unwrap_or_default();
        for port in &mut ports {
            if port["nodePort"].as_i64().is_some() {
                continue;
            }
            let number = port["port"].as_i64().unwrap_or(0);
            let node_port = match by_number.get(&number) {
                Some(&shared) => shared,
                None => {
                    let chosen = self.free_node_port();
                    by_number.insert(number, chosen);
                    chosen
                }
            };
            port["nodePort"] = json!(node_port);
        }
        if !ports.is_empty() {
            spec["ports"] = json!(ports);
        }
    }

    /// What an update of a Service keeps of its allocations, as the real server does: the clusterIP
    /// and each port's nodePort (matched by number and protocol) when the update leaves them out,
    /// nodePorts for new ports, none once the type no longer wants them (and the freed ones return).
    fn reallocate_service(&mut self, old: &Value, object: &mut Value) {
        let spec = &mut object["spec"];
        for field in ["clusterIP", "clusterIPs"] {
            if spec[field].is_null() && !old["spec"][field].is_null() {
                spec[field] = old["spec"][field].clone();
            }
        }
        let wants_node_ports = spec["type"] == json!("NodePort")
            || (spec["type"] == json!("LoadBalancer")
                && spec["allocateLoadBalancerNodePorts"] != json!(false));
        for port in spec.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
            if !wants_node_ports {
                port.as_object_mut().map(|p| p.remove("nodePort"));
                continue;
            }
            if port["nodePort"].is_null()
                && let Some(before) = old["spec"]["ports"].as_array().into_iter().flatten().find(|p| {
                    p["port"] == port["port"] && p["protocol"] == port["protocol"] && !p["nodePort"].is_null()
                })
            {
                port["nodePort"] = before["nodePort"].clone();
            }
        }
        let kept: BTreeSet<i64> =
            spec["ports"].as_array().into_iter().flatten().filter_map(|p| p["nodePort"].as_i64()).collect();
        for port in old["spec"]["ports"].as_array().into_iter().flatten() {
            if let Some(node_port) = port["nodePort"].as_i64()
                && !kept.contains(&node_port)
            {
                self.used_node_ports.remove(&node_port);
            }
        }
        self.used_node_ports.extend(kept);
        self.allocate_service(object);
    }

    /// Whether `object` (a Service, as it will be stored) needs more node ports than the range
    /// (30000-32767) has free; the real server then refuses the write with an internal error.
    pub fn node_ports_exhausted(&self, object: &Value) -> bool {
        let spec = &object["spec"];
        let wants_node_ports = spec["type"] == json!("NodePort")
            || (spec["type"] == json!("LoadBalancer")
                && spec["allocateLoadBalancerNodePorts"] != json!(false));
        let mut wanted: usize = 0;
        if wants_node_ports {
            let ports = spec["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
            let mut numbers: Vec<i64> = ports
                .iter()
                .filter(|p| p["nodePort"].as_i64().is_none())
                .filter_map(|p| p["port"].as_i64())
                .collect();
            numbers.sort_unstable();
            numbers.dedup();
            wanted += numbers.len();
        }
        if spec["type"] == json!("LoadBalancer")
            && spec["externalTrafficPolicy"] == json!("Local")
            && spec.get("healthCheckNodePort").is_none_or(Value::is_null)
        {
            wanted += 1;
        }
        wanted > 0 && self.used_node_ports.len() + wanted > NODE_PORTS
    }

    /// A free node port; callers check [`Store::node_ports_exhausted`] first.
    fn free_node_port(&mut self) -> i64 {
        assert!(self.used_node_ports.len() < NODE_PORTS, "the node port range is full");
        loop {
            let candidate = 30_000 + (self.next_random() % NODE_PORTS as u64) as i64;
            if self.used_node_ports.insert(candidate) {
                return candidate;
            }
        }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: uids and ports only need to look random.
        self.random ^= self.random >> 12;
        self.random ^= self.random << 25;
        self.random ^= self.random >> 27;
        self.random.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn uid(&mut self) -> String {
        let (a, b) = (self.next_random(), self.next_random());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    /// Five lowercase alphanumerics for `metadata.generateName`.
    pub fn name_suffix(&mut self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut random = self.next_random();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(random % ALPHABET.len() as u64) as usize];
                random /= ALPHABET.len() as u64;
                char::from(c)
            })
            .collect()
    }
}

/// The index in [`TYPES`] of the (first) type of `kind`.
pub(crate) fn type_of(kind: &str) -> usize {
    TYPES.iter().position(|t| t.kind == kind).expect("a served kind")
}

/// Now as `metav1.Time` writes it: RFC 3339 in UTC, whole seconds.
pub(crate) fn now_rfc3339() -> String {
    rfc3339_in(0)
}

/// The time `offset` seconds from now, as metav1.Time writes it (whole seconds, UTC).
pub(crate) fn rfc3339_in(offset: i64) -> String {
    let seconds = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64 + offset;
    let (days, rest) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_423), (2025, 12, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
