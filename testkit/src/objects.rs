//! Kubernetes object builders for tests.
