//! Renders a build report as the text table `ringlb check` prints (and the demo shows at start).

use std::fmt::Write;

use lb_core::{Backend, BackendState, BuildReport, HealthOverlay, ProxyProtocol, ServiceEntry};

/// One line per VIP entry, one indented line per backend, the health-check node ports this node
/// would answer, then rejections and skipped Services.
pub fn render(report: &BuildReport) -> String {
    let mut out = String::new();
    let snapshot = &report.snapshot;
    let _ = writeln!(
        out,
        "{:<28} {:<5} {:<32} {:<10} {:<5} {:>9}",
        "VIP", "PROTO", "SERVICE", "PORT", "SCHED", "ELIGIBLE"
    );
    for entry in snapshot.entries() {
        render_entry(&mut out, entry);
    }
    if snapshot.is_empty() {
        let _ = writeln!(out, "(no VIPs to serve)");
    }
    for check in snapshot.health_check_node_ports().iter() {
        let answer = if check.local_endpoints > 0 { 200 } else { 503 };
        let _ = writeln!(
            out,
            "health check: port {} {}: {} local endpoints ({answer})",
            check.port, check.service, check.local_endpoints
        );
    }
    for skipped in &report.skipped {
        let _ = writeln!(out, "skipped: {}: {}", skipped.service, skipped.reason);
    }
    for error in &report.errors {
        let _ = writeln!(out, "rejected: {error}");
    }
    for service in &report.kept_previous {
        let _ = writeln!(out, "kept: {service}: served from its last good spec, with its current endpoints");
    }
    if report.errors.iter().any(|e| e.object().kind == "Service") {
        let _ = writeln!(
            out,
            "note: a running ringlb keeps serving a rejected Service from its last good spec (policy, ports,\n      \
             VIPs) and its current endpoints, until an edit is accepted"
        );
    }
    out
}

fn render_entry(out: &mut String, entry: &ServiceEntry) {
    let service = format!("{}/{}", entry.service.namespace, entry.service.name);
    let _ = write!(
        out,
        "{:<28} {:<5} {:<32} {:<10} {:<5} {:>9}",
        entry.key.socket_addr().to_string(),
        entry.key.protocol.as_str(),
        service,
        entry.port_name.as_deref().unwrap_or("-"),
        entry.scheduler.kind().name(),
        format!("{}/{}", entry.eligible.len(), entry.backends.len()),
    );
    // Only where set, so the common line keeps its columns.
    if entry.policy.proxy_protocol != ProxyProtocol::None {
        let _ = write!(out, " proxy-protocol={}", entry.policy.proxy_protocol);
    }
    if entry.policy.transparent {
        out.push_str(" transparent");
    }
    out.push('\n');
    // `check` runs no health checks: only readiness and the node leave a backend out.
    let none = HealthOverlay::new();
    for (idx, backend) in entry.backends.iter().enumerate() {
        let state = BackendState::of(entry, idx as u32, None, &none, &none);
        let _ = writeln!(out, "    {}", backend_line(backend, state));
    }
}

fn backend_line(backend: &Backend, state: BackendState) -> String {
    let state = state.name().replace('_', "-");
    let mut line = format!("{:<45} {:<11} weight={}", backend.addr().to_string(), state, backend.weight);
    if let Some(node) = backend.node_name() {
        let _ = write!(line, " node={node}");
    }
    if let Some(target) = &backend.placement.target {
        let _ = write!(line, " target={target}");
    }
    line
}
